//! A bounded queue of datagrams between quinn's socket calls (synchronous, poll-based) and
//! the tasks that move records over a stream. Bounded by bytes, as a socket buffer is:
//! a full queue either drops (as a router does; QUIC reads it as loss and slows down) or
//! tells the sender to wait, whichever the caller asks for.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;

#[derive(Debug)]
struct State<T> {
    items: VecDeque<(T, Bytes)>,
    bytes: usize,
    reader: Option<Waker>,
    writers: Vec<Waker>,
    closed: bool,
}

#[derive(Debug)]
pub(crate) struct Queue<T> {
    state: Mutex<State<T>>,
    cap_bytes: usize,
}

/// Why a datagram was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PushError {
    Full,
    Closed,
}

impl<T> Queue<T> {
    pub(crate) fn new(cap_bytes: usize) -> Self {
        Queue {
            state: Mutex::new(State {
                items: VecDeque::new(),
                bytes: 0,
                reader: None,
                writers: Vec::new(),
                closed: false,
            }),
            cap_bytes,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a datagram unless that would pass the bound (one datagram always fits in an
    /// empty queue, so nothing is refused for its size alone).
    pub(crate) fn push(&self, tag: T, data: Bytes) -> Result<(), PushError> {
        let mut s = self.lock();
        if s.closed {
            return Err(PushError::Closed);
        }
        if s.bytes > 0 && s.bytes + data.len() > self.cap_bytes {
            return Err(PushError::Full);
        }
        s.bytes += data.len();
        s.items.push_back((tag, data));
        if let Some(w) = s.reader.take() {
            w.wake();
        }
        Ok(())
    }

    /// Ready when a push may succeed (or the queue is closed, so the push fails at once).
    pub(crate) fn poll_space(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.lock();
        if s.closed || s.bytes < self.cap_bytes {
            return Poll::Ready(());
        }
        if !s.writers.iter().any(|w| w.will_wake(cx.waker())) {
            s.writers.push(cx.waker().clone());
        }
        Poll::Pending
    }

    pub(crate) fn try_pop(&self) -> Option<(T, Bytes)> {
        let mut s = self.lock();
        let item = s.items.pop_front()?;
        s.bytes -= item.1.len();
        for w in s.writers.drain(..) {
            w.wake();
        }
        Some(item)
    }

    /// The next datagram; `None` once the queue is closed and empty.
    pub(crate) fn poll_pop(&self, cx: &mut Context<'_>) -> Poll<Option<(T, Bytes)>> {
        if let Some(item) = self.try_pop() {
            return Poll::Ready(Some(item));
        }
        let mut s = self.lock();
        // Checked again under the lock a push takes, so no wake-up is missed.
        if let Some(item) = s.items.pop_front() {
            s.bytes -= item.1.len();
            return Poll::Ready(Some(item));
        }
        if s.closed {
            return Poll::Ready(None);
        }
        s.reader = Some(cx.waker().clone());
        Poll::Pending
    }

    pub(crate) async fn pop(&self) -> Option<(T, Bytes)> {
        std::future::poll_fn(|cx| self.poll_pop(cx)).await
    }

    /// Registers `cx` to be woken by the next push, if the queue is empty now.
    pub(crate) fn register_reader(&self, cx: &mut Context<'_>) -> bool {
        let mut s = self.lock();
        if s.items.is_empty() && !s.closed {
            s.reader = Some(cx.waker().clone());
            true
        } else {
            false
        }
    }

    /// Refuses further pushes and wakes everyone; what is queued can still be popped.
    pub(crate) fn close(&self) {
        let mut s = self.lock();
        s.closed = true;
        if let Some(w) = s.reader.take() {
            w.wake();
        }
        for w in s.writers.drain(..) {
            w.wake();
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.lock().closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_by_bytes_but_never_refuses_a_lone_datagram() {
        let q = Queue::<()>::new(10);
        assert_eq!(q.push((), Bytes::from_static(&[0; 8])), Ok(()));
        assert_eq!(
            q.push((), Bytes::from_static(&[0; 3])),
            Err(PushError::Full)
        );
        assert_eq!(q.push((), Bytes::from_static(&[0; 2])), Ok(()));
        assert!(q.try_pop().is_some());
        assert!(q.try_pop().is_some());
        assert_eq!(q.push((), Bytes::from_static(&[0; 50])), Ok(()));
        q.close();
        assert_eq!(q.push((), Bytes::new()), Err(PushError::Closed));
        assert!(q.try_pop().is_some(), "what was queued survives the close");
    }

    #[tokio::test]
    async fn a_waiting_reader_is_woken_and_sees_the_end() {
        let q = std::sync::Arc::new(Queue::<u8>::new(100));
        let reader = {
            let q = q.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                while let Some((tag, _)) = q.pop().await {
                    got.push(tag);
                }
                got
            })
        };
        tokio::task::yield_now().await;
        q.push(1, Bytes::from_static(b"a")).expect("room");
        q.push(2, Bytes::from_static(b"b")).expect("room");
        q.close();
        assert_eq!(reader.await.expect("reader"), vec![1, 2]);
    }
}

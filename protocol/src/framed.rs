//! Reads and writes codec frames on any async byte stream: QUIC streams between agent and
//! controller, and the controller's local socket.

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::codec::{self, FrameError, HEADER_BYTES, MAX_FRAME_BYTES};

/// Writes one frame. Does not flush beyond what the stream does by itself.
pub async fn write_frame<W, T>(w: &mut W, msg: &T) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let frame = codec::encode(msg)?;
    w.write_all(&frame).await?;
    Ok(())
}

/// Reads one frame. `Ok(None)` is a clean end of stream between frames.
pub async fn read_frame<R, T>(r: &mut R) -> Result<Option<T>, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    read_frame_limited(r, MAX_FRAME_BYTES).await
}

/// Reads one frame of at most `max_bytes` (for peers that have not authenticated yet, so
/// a stranger's frame header cannot make the reader hold megabytes).
pub async fn read_frame_limited<R, T>(r: &mut R, max_bytes: usize) -> Result<Option<T>, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut header = [0u8; HEADER_BYTES];
    let mut filled = 0;
    while filled < HEADER_BYTES {
        let n = r.read(&mut header[filled..]).await?;
        if n == 0 {
            return if filled == 0 {
                Ok(None)
            } else {
                Err(FrameError::Truncated)
            };
        }
        filled += n;
    }
    let len = codec::body_len(header, max_bytes.min(MAX_FRAME_BYTES))?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => FrameError::Io(e),
    })?;
    codec::decode(&body).map(Some)
}

/// Reads frames in a task of its own and hands them over a channel, so a `select!` loop
/// can wait on them: a frame read is not cancel-safe, a channel receive is. The task ends
/// after the stream ends or fails (that last result is delivered too), or when the
/// receiver is dropped; abort the handle to stop it sooner.
pub fn spawn_reader<R, T>(
    mut r: R,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::mpsc::Receiver<Result<Option<T>, FrameError>>,
)
where
    R: AsyncRead + Unpin + Send + 'static,
    T: DeserializeOwned + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let handle = tokio::spawn(async move {
        loop {
            let frame = read_frame::<_, T>(&mut r).await;
            let done = !matches!(frame, Ok(Some(_)));
            if tx.send(frame).await.is_err() || done {
                break;
            }
        }
    });
    (handle, rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip_and_clean_eof() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            write_frame(&mut a, &"one".to_string())
                .await
                .expect("write");
            write_frame(&mut a, &"two".to_string())
                .await
                .expect("write");
        });
        assert_eq!(
            read_frame::<_, String>(&mut b)
                .await
                .expect("read")
                .as_deref(),
            Some("one")
        );
        assert_eq!(
            read_frame::<_, String>(&mut b)
                .await
                .expect("read")
                .as_deref(),
            Some("two")
        );
        writer.await.expect("writer");
        assert!(
            read_frame::<_, String>(&mut b)
                .await
                .expect("eof")
                .is_none()
        );
    }

    #[tokio::test]
    async fn oversized_header_is_refused_before_reading_the_body() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&(MAX_FRAME_BYTES as u32 + 1).to_be_bytes())
            .await
            .expect("write");
        let err = read_frame::<_, String>(&mut b)
            .await
            .expect_err("too large");
        assert!(matches!(err, FrameError::TooLarge { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_frame_cut_short_is_truncated() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[0, 0, 0, 10, 1, 2]).await.expect("write");
        drop(a);
        let err = read_frame::<_, String>(&mut b)
            .await
            .expect_err("truncated");
        assert!(matches!(err, FrameError::Truncated), "{err}");
    }
}

//! A run's durable event log: an append-only file of codec frames, one `RunEvent` each,
//! numbered from 1 without gaps. The file is the truth: live streaming and replay after a
//! reconnect are the same thing, a reader tailing the file up to the latest sequence number.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use protocol::codec::{self, HEADER_BYTES, MAX_FRAME_BYTES};
use protocol::{EventKind, RunEvent};
use tokio::sync::watch;

/// How far a log has been written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cursor {
    pub last_seq: u64,
    pub ended: bool,
}

#[derive(Debug)]
pub struct EventLog {
    path: PathBuf,
    file: Mutex<File>,
    cursor: watch::Sender<Cursor>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl EventLog {
    /// Opens the log at `path`, creating it if missing. A record torn by a crash mid-write
    /// is cut off, so the log always ends on a whole event.
    pub fn open(path: &Path) -> io::Result<Self> {
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)?;
        let mut cursor = Cursor::default();
        let mut good_len = 0u64;
        {
            let mut reader = BufReader::new(&mut file);
            reader.seek(SeekFrom::Start(0))?;
            while let Some((event, len)) = read_record(&mut reader)? {
                cursor.last_seq = event.seq;
                cursor.ended = matches!(event.kind, EventKind::Ended(_));
                good_len += len;
            }
        }
        if file.metadata()?.len() != good_len {
            file.set_len(good_len)?;
        }
        Ok(EventLog {
            path: path.to_owned(),
            file: Mutex::new(file),
            cursor: watch::channel(cursor).0,
        })
    }

    /// Appends one event and wakes readers. Nothing is appended after `Ended`.
    pub fn append(&self, kind: EventKind) -> io::Result<u64> {
        let mut file = self.file.lock().expect("event log lock is never poisoned");
        let cursor = *self.cursor.borrow();
        if cursor.ended {
            return Err(io::Error::other("the run has ended; its log is closed"));
        }
        let ended = matches!(kind, EventKind::Ended(_));
        let event = RunEvent {
            seq: cursor.last_seq + 1,
            at_ms: now_ms(),
            kind,
        };
        let frame = codec::encode(&event).map_err(io::Error::other)?;
        file.write_all(&frame)?;
        if ended {
            file.sync_data()?;
        }
        self.cursor.send_replace(Cursor {
            last_seq: event.seq,
            ended,
        });
        Ok(event.seq)
    }

    pub fn cursor(&self) -> Cursor {
        *self.cursor.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<Cursor> {
        self.cursor.subscribe()
    }

    /// A reader positioned after event `after_seq`.
    pub fn reader(&self, after_seq: u64) -> io::Result<EventReader> {
        let mut reader = EventReader {
            file: BufReader::new(File::open(&self.path)?),
            next_seq: 1,
        };
        while reader.next_seq <= after_seq {
            match read_record(&mut reader.file)? {
                Some((event, _)) => reader.next_seq = event.seq + 1,
                None => break,
            }
        }
        Ok(reader)
    }
}

/// Reads events in order from a log file.
#[derive(Debug)]
pub struct EventReader {
    file: BufReader<File>,
    next_seq: u64,
}

impl EventReader {
    /// The sequence number the next event read will have.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Reads events up to and including `up_to_seq`, stopping early at `max_bytes` of
    /// encoded events so a batch always fits in one frame.
    pub fn read_batch(&mut self, up_to_seq: u64, max_bytes: usize) -> io::Result<Vec<RunEvent>> {
        let mut batch = Vec::new();
        let mut bytes = 0usize;
        while self.next_seq <= up_to_seq && bytes < max_bytes {
            match read_record(&mut self.file)? {
                Some((event, len)) => {
                    self.next_seq = event.seq + 1;
                    bytes += len as usize;
                    batch.push(event);
                }
                None => break,
            }
        }
        Ok(batch)
    }
}

/// One whole record and its length on disk, or `None` at the end (or a torn tail).
fn read_record(r: &mut impl Read) -> io::Result<Option<(RunEvent, u64)>> {
    let mut header = [0u8; HEADER_BYTES];
    if !read_full(r, &mut header)? {
        return Ok(None);
    }
    let Ok(len) = codec::body_len(header, MAX_FRAME_BYTES) else {
        return Ok(None);
    };
    let mut body = vec![0u8; len];
    if !read_full(r, &mut body)? {
        return Ok(None);
    }
    match codec::decode::<RunEvent>(&body) {
        Ok(event) => Ok(Some((event, (HEADER_BYTES + len) as u64))),
        Err(_) => Ok(None),
    }
}

/// Fills `buf`; `false` when the input ends first.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => return Ok(false),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::{RunEnd, Stream};

    fn out(line: &str) -> EventKind {
        EventKind::Output {
            stream: Stream::Stdout,
            line: line.into(),
        }
    }

    #[test]
    fn append_replay_and_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.log");
        let log = EventLog::open(&path).expect("open");
        for i in 1..=5 {
            assert_eq!(log.append(out(&format!("line {i}"))).expect("append"), i);
        }
        let mut reader = log.reader(2).expect("reader");
        let batch = reader.read_batch(u64::MAX, usize::MAX).expect("read");
        assert_eq!(batch.iter().map(|e| e.seq).collect::<Vec<_>>(), [3, 4, 5]);

        log.append(EventKind::Ended(RunEnd::Exited {
            code: 0,
            stop_requested: false,
        }))
        .expect("end");
        assert!(log.append(out("late")).is_err(), "nothing after Ended");
        drop(log);

        let log = EventLog::open(&path).expect("reopen");
        assert_eq!(
            log.cursor(),
            Cursor {
                last_seq: 6,
                ended: true
            }
        );
    }

    #[test]
    fn a_torn_tail_is_cut_off() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.log");
        let log = EventLog::open(&path).expect("open");
        log.append(out("whole")).expect("append");
        drop(log);
        let mut file = OpenOptions::new().append(true).open(&path).expect("open");
        file.write_all(&[0, 0, 0, 50, 1, 2, 3]).expect("torn write");
        drop(file);

        let log = EventLog::open(&path).expect("reopen");
        assert_eq!(log.cursor().last_seq, 1);
        assert_eq!(log.append(out("next")).expect("append"), 2);
        let events = log
            .reader(0)
            .expect("reader")
            .read_batch(u64::MAX, usize::MAX)
            .expect("read");
        assert_eq!(events.len(), 2);
    }

    #[test]
    fn batches_respect_the_byte_bound() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = EventLog::open(&dir.path().join("events.log")).expect("open");
        for _ in 0..10 {
            log.append(out(&"x".repeat(100))).expect("append");
        }
        let mut reader = log.reader(0).expect("reader");
        let first = reader.read_batch(u64::MAX, 250).expect("read");
        assert_eq!(first.len(), 3);
        assert_eq!(reader.next_seq(), 4);
    }
}

//! A run's durable event log: append-only segment files of codec frames, one `RunEvent`
//! each, numbered from 1 without gaps. The files are the truth: live streaming and replay
//! after a reconnect are the same thing, a reader tailing them up to the latest number.
//!
//! The log is capped: it is cut into segments (a quarter of the cap each, named by their
//! first sequence number), and when the total passes the cap the oldest segments are
//! deleted and a `LogTruncated` notice says through which number. A write that fails (a
//! full disk) loses that event, is counted, and the next write that succeeds first
//! records a `LinesDropped` notice.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use protocol::codec::{self, HEADER_BYTES, MAX_FRAME_BYTES};
use protocol::{EventKind, Notice, RunEvent};
use tokio::sync::watch;

/// The default cap on one run's log.
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;
/// Segments are never smaller than this, whatever the cap.
const MIN_SEGMENT_BYTES: u64 = 64 * 1024;
const SEGMENT_SUFFIX: &str = ".events";

/// How far a log has been written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cursor {
    pub last_seq: u64,
    pub ended: bool,
}

#[derive(Debug)]
pub struct EventLog {
    dir: PathBuf,
    segment_bytes: u64,
    max_bytes: u64,
    state: Mutex<Writer>,
    cursor: watch::Sender<Cursor>,
}

#[derive(Debug)]
struct Writer {
    file: File,
    /// The first sequence number of the current segment.
    first: u64,
    /// Bytes in the current segment.
    len: u64,
    /// (first seq, bytes) of each closed segment, oldest first.
    closed: Vec<(u64, u64)>,
    /// Events lost to failed writes since the last successful one, and why.
    dropped: u64,
    drop_reason: String,
}

/// Wall-clock milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now_ms() -> u64 {
    protocol::clock::now_ms()
}

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}{SEGMENT_SUFFIX}")
}

/// The segments in `dir`, by first sequence number.
fn segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let first = name.to_str()?.strip_suffix(SEGMENT_SUFFIX)?.parse().ok()?;
            Some((first, e.path()))
        })
        .collect();
    found.sort();
    Ok(found)
}

impl EventLog {
    /// Opens the log in `dir`, creating it if missing. A record torn by a crash mid-write
    /// is cut off, so the log always ends on a whole event.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut found = segments(dir)?;
        if found.is_empty() {
            let path = dir.join(segment_name(1));
            File::create(&path)?;
            found.push((1, path));
        }
        let mut cursor = Cursor::default();
        let mut closed = Vec::new();
        let last = found.len() - 1;
        let mut current = None;
        for (i, (first, path)) in found.into_iter().enumerate() {
            let mut file = OpenOptions::new().read(true).append(true).open(&path)?;
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
            if i < last {
                closed.push((first, good_len));
                continue;
            }
            if file.metadata()?.len() != good_len {
                file.set_len(good_len)?;
            }
            current = Some((file, first, good_len));
        }
        let (file, first, len) = current.expect("at least one segment");
        let max_bytes = max_bytes.max(4 * MIN_SEGMENT_BYTES);
        Ok(EventLog {
            dir: dir.to_owned(),
            segment_bytes: max_bytes / 4,
            max_bytes,
            state: Mutex::new(Writer {
                file,
                first,
                len,
                closed,
                dropped: 0,
                drop_reason: String::new(),
            }),
            cursor: watch::channel(cursor).0,
        })
    }

    /// Appends one event and wakes readers. Nothing is appended after `Ended`. A failed
    /// write is counted and reported by a `LinesDropped` notice, written together with the
    /// next event that fits.
    pub fn append(&self, kind: EventKind) -> io::Result<u64> {
        let mut w = self.state.lock().expect("event log lock is never poisoned");
        if self.cursor.borrow().ended {
            return Err(io::Error::other("the run has ended; its log is closed"));
        }
        let mut kinds = Vec::with_capacity(2);
        if w.dropped > 0 {
            kinds.push(EventKind::Notice(Notice::LinesDropped {
                lines: w.dropped,
                reason: w.drop_reason.clone(),
            }));
        }
        kinds.push(kind);
        match self.write(&mut w, kinds) {
            Ok(seq) => {
                w.dropped = 0;
                Ok(seq)
            }
            Err(e) => {
                w.dropped += 1;
                w.drop_reason = format!(
                    "writing the run's log in {} failed: {e}",
                    self.dir.display()
                );
                Err(e)
            }
        }
    }

    /// Opens the log of an ended run started again: writes `kind` (its `StartedAgain`
    /// notice) after the `Ended`, and appends go on from there.
    pub fn reopen(&self, kind: EventKind) -> io::Result<u64> {
        let mut w = self.state.lock().expect("event log lock is never poisoned");
        if !self.cursor.borrow().ended {
            return Err(io::Error::other("the run has not ended"));
        }
        self.write(&mut w, vec![kind])
    }

    /// Writes `kinds` as consecutive events in one write (all or none); returns the last
    /// sequence number.
    fn write(&self, w: &mut Writer, kinds: Vec<EventKind>) -> io::Result<u64> {
        let cursor = *self.cursor.borrow();
        let mut seq = cursor.last_seq;
        let mut ended = false;
        let mut frames = Vec::new();
        let at_ms = now_ms();
        for kind in kinds {
            seq += 1;
            ended |= matches!(kind, EventKind::Ended(_));
            let event = RunEvent { seq, at_ms, kind };
            frames.extend(codec::encode(&event).map_err(io::Error::other)?);
        }
        if w.len > 0 && w.len + frames.len() as u64 > self.segment_bytes {
            self.roll(w, cursor.last_seq + 1)?;
        }
        if let Err(e) = w.file.write_all(&frames) {
            // Leave no partial record behind: the next write starts on a whole event.
            let _ = w.file.set_len(w.len);
            return Err(e);
        }
        w.len += frames.len() as u64;
        if ended {
            w.file.sync_data()?;
        }
        self.cursor.send_replace(Cursor {
            last_seq: seq,
            ended,
        });
        if let Some(through_seq) = self.enforce_cap(w)
            && !ended
        {
            return self.write(
                w,
                vec![EventKind::Notice(Notice::LogTruncated { through_seq })],
            );
        }
        Ok(seq)
    }

    /// Starts a new segment whose first event will be `first_seq`.
    fn roll(&self, w: &mut Writer, first_seq: u64) -> io::Result<()> {
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(self.dir.join(segment_name(first_seq)))?;
        w.closed.push((w.first, w.len));
        w.file = file;
        w.first = first_seq;
        w.len = 0;
        Ok(())
    }

    /// Deletes the oldest segments while the log is over its cap; returns the last
    /// sequence number deleted, if any were.
    fn enforce_cap(&self, w: &mut Writer) -> Option<u64> {
        let mut total: u64 = w.len + w.closed.iter().map(|(_, len)| len).sum::<u64>();
        let mut through = None;
        while total > self.max_bytes && !w.closed.is_empty() {
            let (first, len) = w.closed.remove(0);
            let _ = std::fs::remove_file(self.dir.join(segment_name(first)));
            total -= len;
            let next_first = w.closed.first().map_or(w.first, |(f, _)| *f);
            through = Some(next_first - 1);
        }
        through
    }

    pub fn cursor(&self) -> Cursor {
        *self.cursor.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<Cursor> {
        self.cursor.subscribe()
    }

    /// A reader positioned after event `after_seq` (or at the oldest event kept, if the
    /// cap deleted that far).
    pub fn reader(&self, after_seq: u64) -> io::Result<EventReader> {
        let found = segments(&self.dir)?;
        let want = after_seq + 1;
        let (first, path) = found
            .iter()
            .rev()
            .find(|(first, _)| *first <= want)
            .or(found.first())
            .ok_or_else(|| io::Error::other("the log has no segments"))?;
        let mut reader = EventReader {
            dir: self.dir.clone(),
            file: BufReader::new(File::open(path)?),
            next_seq: *first,
        };
        while reader.next_seq <= after_seq {
            match reader.next_record()? {
                Some((event, _)) => reader.next_seq = event.seq + 1,
                None => break,
            }
        }
        Ok(reader)
    }
}

/// Reads events in order from a log, across its segments.
#[derive(Debug)]
pub struct EventReader {
    dir: PathBuf,
    file: BufReader<File>,
    next_seq: u64,
}

impl EventReader {
    /// The sequence number the next event read will have.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The next whole record, moving to the next segment at the end of this one.
    fn next_record(&mut self) -> io::Result<Option<(RunEvent, u64)>> {
        if let Some(record) = read_record(&mut self.file)? {
            return Ok(Some(record));
        }
        // The next segment starts at `next_seq`, or later if the cap deleted that far.
        let next = segments(&self.dir)?
            .into_iter()
            .find(|(first, _)| *first >= self.next_seq);
        match next {
            Some((_, path)) => {
                self.file = BufReader::new(File::open(path)?);
                read_record(&mut self.file)
            }
            None => Ok(None),
        }
    }

    /// Reads events up to and including `up_to_seq`, stopping early at `max_bytes` of
    /// encoded events so a batch always fits in one frame.
    pub fn read_batch(&mut self, up_to_seq: u64, max_bytes: usize) -> io::Result<Vec<RunEvent>> {
        let mut batch = Vec::new();
        let mut bytes = 0usize;
        while self.next_seq <= up_to_seq && bytes < max_bytes {
            match self.next_record()? {
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
        let path = dir.path().join("log");
        let log = EventLog::open(&path, DEFAULT_MAX_BYTES).expect("open");
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

        let log = EventLog::open(&path, DEFAULT_MAX_BYTES).expect("reopen");
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
        let path = dir.path().join("log");
        let log = EventLog::open(&path, DEFAULT_MAX_BYTES).expect("open");
        log.append(out("whole")).expect("append");
        drop(log);
        let mut file = OpenOptions::new()
            .append(true)
            .open(path.join(segment_name(1)))
            .expect("open");
        file.write_all(&[0, 0, 0, 50, 1, 2, 3]).expect("torn write");
        drop(file);

        let log = EventLog::open(&path, DEFAULT_MAX_BYTES).expect("reopen");
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
        let log = EventLog::open(&dir.path().join("log"), DEFAULT_MAX_BYTES).expect("open");
        for _ in 0..10 {
            log.append(out(&"x".repeat(100))).expect("append");
        }
        let mut reader = log.reader(0).expect("reader");
        let first = reader.read_batch(u64::MAX, 250).expect("read");
        assert_eq!(first.len(), 3);
        assert_eq!(reader.next_seq(), 4);
    }

    fn all(log: &EventLog, after: u64) -> Vec<RunEvent> {
        log.reader(after)
            .expect("reader")
            .read_batch(u64::MAX, usize::MAX)
            .expect("read")
    }

    #[test]
    fn the_cap_deletes_the_oldest_segments_and_says_so() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        let cap = 4 * MIN_SEGMENT_BYTES;
        let log = EventLog::open(&path, cap).expect("open");
        let line = "x".repeat(1000);
        for _ in 0..2_000 {
            log.append(out(&line)).expect("append");
        }
        let on_disk: u64 = segments(&path)
            .expect("segments")
            .iter()
            .map(|(_, p)| p.metadata().expect("stat").len())
            .sum();
        assert!(on_disk <= cap, "{on_disk} bytes kept, cap {cap}");

        let events = all(&log, 0);
        let first = events[0].seq;
        assert!(first > 1, "the oldest events are gone");
        // From the oldest kept on, numbers have no gaps, across segment boundaries.
        for (i, e) in events.iter().enumerate() {
            assert_eq!(e.seq, first + i as u64);
        }
        let truncated: Vec<u64> = events
            .iter()
            .filter_map(|e| match e.kind {
                EventKind::Notice(Notice::LogTruncated { through_seq }) => Some(through_seq),
                _ => None,
            })
            .collect();
        assert!(!truncated.is_empty());
        assert!(truncated.iter().all(|t| *t < e_seq(&events, *t)));
        // A reader asked for a deleted position starts at the oldest kept event.
        assert_eq!(all(&log, 5)[0].seq, first);
        // Reopening finds the same state.
        let last = log.cursor().last_seq;
        drop(log);
        let log = EventLog::open(&path, cap).expect("reopen");
        assert_eq!(log.cursor().last_seq, last);
        assert_eq!(log.append(out("after")).expect("append"), last + 1);
    }

    /// The sequence number of the notice that reported truncation through `through`.
    fn e_seq(events: &[RunEvent], through: u64) -> u64 {
        events
            .iter()
            .find(|e| matches!(e.kind, EventKind::Notice(Notice::LogTruncated { through_seq }) if through_seq == through))
            .map(|e| e.seq)
            .expect("notice present")
    }

    /// A full disk: writes fail and are counted; once there is room again, the count is
    /// recorded before the next event. Needs root for a small tmpfs; says so otherwise.
    #[test]
    fn a_full_disk_drops_lines_and_says_how_many() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mnt = dir.path().join("small");
        std::fs::create_dir(&mnt).expect("mkdir");
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
            .arg(&mnt)
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            eprintln!(
                "SKIPPED a_full_disk_drops_lines_and_says_how_many: mounting a tmpfs needs root"
            );
            return;
        }
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(&self.0).status();
            }
        }
        let _unmount = Unmount(mnt.clone());
        let log = EventLog::open(&mnt.join("log"), DEFAULT_MAX_BYTES).expect("open");
        log.append(out("before")).expect("room");
        let filler = mnt.join("filler");
        let mut f = File::create(&filler).expect("filler");
        let chunk = vec![0u8; 4096];
        while f.write_all(&chunk).is_ok() {}
        drop(f);
        let line = "y".repeat(8192);
        let failed = (0..5).filter(|_| log.append(out(&line)).is_err()).count();
        assert_eq!(failed, 5, "the disk is full");
        std::fs::remove_file(&filler).expect("free space");
        log.append(out("after")).expect("room again");
        let kinds: Vec<EventKind> = all(&log, 0).into_iter().map(|e| e.kind).collect();
        assert_eq!(kinds[0], out("before"));
        assert!(
            matches!(&kinds[1], EventKind::Notice(Notice::LinesDropped { lines: 5, reason }) if reason.contains("No space left")),
            "{:?}",
            kinds[1]
        );
        assert_eq!(kinds[2], out("after"));
    }
}

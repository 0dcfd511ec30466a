//! Writes a sync stream: one zstd stream holding the encoded delta and then a tar of the
//! new content, one entry per distinct hash, in the delta's stream order. Files are read
//! as they are written out, never whole in memory. A file edited between the scan and now
//! no longer has the hash the delta promises: the agent's check of every entry refuses
//! the sync (its tree untouched), so it is not hashed a second time here.

use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use protocol::delta::Delta;

/// zstd level: 3 is zstd's (and rsync's) default, the best size per CPU second here.
const LEVEL: i32 = 3;

/// Progress shared with whoever draws it.
#[derive(Debug, Default)]
pub struct Sent {
    pub files: AtomicU64,
    pub bytes: AtomicU64,
}

/// Writes the stream for `delta` (already encoded as `delta_blob`) to `out`.
pub fn write_stream(
    root: &Path,
    delta: &Delta,
    delta_blob: &[u8],
    out: impl Write,
    sent: &Arc<Sent>,
) -> anyhow::Result<()> {
    let mut encoder = zstd::stream::write::Encoder::new(out, LEVEL)?;
    encoder.write_all(delta_blob)?;
    let mut tar = tar::Builder::new(encoder);
    for (index, (_, size_bytes, path)) in delta.stream_order().into_iter().enumerate() {
        let full = root.join(path);
        let file =
            std::fs::File::open(&full).with_context(|| format!("opening {}", full.display()))?;
        let mut header = tar::Header::new_gnu();
        header.set_size(size_bytes);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        let exact = Exact {
            inner: file.take(size_bytes),
            remaining: size_bytes,
            sent,
        };
        // Large reads: io::copy drains a BufReader through its own buffer, so a big file
        // goes to the compressor in 256 KiB pieces rather than 8 KiB ones.
        let capacity = (size_bytes as usize).clamp(8 * 1024, 256 * 1024);
        let mut reader = std::io::BufReader::with_capacity(capacity, exact);
        tar.append_data(&mut header, protocol::delta::entry_name(index), &mut reader)
            .with_context(|| format!("sending {path}"))?;
        sent.files.fetch_add(1, Ordering::Relaxed);
    }
    tar.into_inner()?.finish()?.flush()?;
    Ok(())
}

/// Yields exactly `remaining` bytes, counting them, or fails if the file shrank.
struct Exact<'a, R> {
    inner: R,
    remaining: u64,
    sent: &'a Sent,
}

impl<R: Read> Read for Exact<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file shrank while it was being synced",
            ));
        }
        self.remaining -= n as u64;
        self.sent.bytes.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

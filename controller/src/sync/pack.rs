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
/// For content that does not compress (weights, archives, media): zstd's fast mode,
/// which passes such data through at memory speed instead of searching it for matches.
const INCOMPRESSIBLE_LEVEL: i32 = -64;
/// Files at least this big get their compressibility sampled; smaller ones are not worth
/// the sample.
const SAMPLE_FROM_BYTES: u64 = 256 * 1024;
const SAMPLE_BYTES: usize = 64 * 1024;

/// The level for a file, from a sample of its middle: level 1 saving under 5% of it means
/// the data is already compressed or random.
pub fn level_for(sample: &[u8]) -> i32 {
    if sample.is_empty() {
        return LEVEL;
    }
    match zstd::bulk::compress(sample, 1) {
        Ok(packed) if packed.len() * 100 >= sample.len() * 95 => INCOMPRESSIBLE_LEVEL,
        _ => LEVEL,
    }
}

fn sample_of(file: &std::fs::File, size_bytes: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; SAMPLE_BYTES.min(size_bytes as usize)];
    let offset = (size_bytes / 2).saturating_sub(buf.len() as u64 / 2);
    match file.read_exact_at(&mut buf, offset) {
        Ok(()) => buf,
        Err(_) => Vec::new(),
    }
}

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
    let mut level = LEVEL;
    for (index, (_, size_bytes, path)) in delta.stream_order().into_iter().enumerate() {
        let full = root.join(path);
        let file =
            std::fs::File::open(&full).with_context(|| format!("opening {}", full.display()))?;
        // Per file: content that does not compress is not worth zstd's time. The level
        // may change between blocks of one frame; the agent's decoder needs nothing.
        let wanted = if size_bytes >= SAMPLE_FROM_BYTES {
            level_for(&sample_of(&file, size_bytes))
        } else {
            LEVEL
        };
        if wanted != level {
            tar.get_mut()
                .set_parameter(zstd::zstd_safe::CParameter::CompressionLevel(wanted))?;
            level = wanted;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incompressible_samples_get_the_fast_level() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let random: Vec<u8> = (0..SAMPLE_BYTES)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let text = b"def train(model, data):\n    return model.fit(data)\n".repeat(1500);
        assert_eq!(level_for(&random), INCOMPRESSIBLE_LEVEL);
        assert_eq!(level_for(&text[..SAMPLE_BYTES]), LEVEL);
        assert_eq!(level_for(&[]), LEVEL);
    }
}

//! The one bincode configuration and the frame format: a 4-byte big-endian length followed
//! by that many bytes of bincode. Pure functions; `framed` does the I/O.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The largest frame either side accepts. Bulk data travels outside frames.
pub const MAX_FRAME_BYTES: usize = 4 * 1024 * 1024;

/// The length prefix's size.
pub const HEADER_BYTES: usize = 4;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The frame's declared length is over the limit; the stream cannot be trusted after it.
    #[error("frame of {len_bytes} bytes exceeds the limit of {max_bytes} bytes")]
    TooLarge { len_bytes: usize, max_bytes: usize },
    /// The frame's bytes are not a valid message of the expected type.
    #[error("malformed frame: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    /// The message could not be serialized.
    #[error("message could not be encoded: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    /// The frame decoded, but bytes were left over.
    #[error("malformed frame: {0} trailing bytes")]
    Trailing(usize),
    /// The stream ended in the middle of a frame.
    #[error("the stream ended in the middle of a frame")]
    Truncated,
    /// The underlying stream failed.
    #[error("stream error: {0}")]
    Io(#[from] std::io::Error),
}

fn config() -> impl bincode::config::Config {
    // Fixed: little-endian varints. The limit stops a hostile length field inside a frame
    // from allocating more than the frame itself could hold.
    bincode::config::standard().with_limit::<MAX_FRAME_BYTES>()
}

/// Encodes `msg` as a whole frame, length prefix included.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; HEADER_BYTES];
    bincode::serde::encode_into_std_write(msg, &mut out, config())?;
    let len_bytes = out.len() - HEADER_BYTES;
    if len_bytes > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge {
            len_bytes,
            max_bytes: MAX_FRAME_BYTES,
        });
    }
    let len = u32::try_from(len_bytes).expect("bounded by MAX_FRAME_BYTES");
    out[..HEADER_BYTES].copy_from_slice(&len.to_be_bytes());
    Ok(out)
}

/// Reads a frame's declared body length from its header, refusing lengths over `max_bytes`.
pub fn body_len(header: [u8; HEADER_BYTES], max_bytes: usize) -> Result<usize, FrameError> {
    let len_bytes = u32::from_be_bytes(header) as usize;
    if len_bytes > max_bytes {
        return Err(FrameError::TooLarge {
            len_bytes,
            max_bytes,
        });
    }
    Ok(len_bytes)
}

/// Decodes a frame body (the bytes after the header).
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    let (msg, used) = bincode::serde::decode_from_slice(body, config())?;
    if used != body.len() {
        return Err(FrameError::Trailing(body.len() - used));
    }
    Ok(msg)
}

/// The largest manifest or delta either side accepts (they travel outside frames,
/// zstd-compressed, on a sync stream): about two million entries.
pub const MAX_BLOB_BYTES: usize = 256 * 1024 * 1024;

fn blob_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_BLOB_BYTES>()
}

/// Encodes a manifest or delta (no length prefix: the sync exchange carries the length).
pub fn encode_blob<T: Serialize>(value: &T) -> Result<Vec<u8>, FrameError> {
    let out = bincode::serde::encode_to_vec(value, blob_config())?;
    if out.len() > MAX_BLOB_BYTES {
        return Err(FrameError::TooLarge {
            len_bytes: out.len(),
            max_bytes: MAX_BLOB_BYTES,
        });
    }
    Ok(out)
}

/// Decodes a manifest or delta, refusing trailing bytes.
pub fn decode_blob<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    let (value, used) = bincode::serde::decode_from_slice(body, blob_config())?;
    if used != body.len() {
        return Err(FrameError::Trailing(body.len() - used));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_big_endian_length() {
        let frame = encode(&"hi".to_string()).expect("encodes");
        assert_eq!(frame, vec![0, 0, 0, 3, 2, b'h', b'i']);
        let header: [u8; 4] = frame[..4].try_into().expect("4 bytes");
        assert_eq!(body_len(header, MAX_FRAME_BYTES).expect("fits"), 3);
        assert_eq!(decode::<String>(&frame[4..]).expect("decodes"), "hi");
    }

    #[test]
    fn oversized_frames_are_refused_both_ways() {
        let err = body_len(u32::MAX.to_be_bytes(), MAX_FRAME_BYTES).expect_err("too large");
        assert!(
            matches!(err, FrameError::TooLarge { len_bytes, .. } if len_bytes == u32::MAX as usize)
        );
        let big = vec![0u8; MAX_FRAME_BYTES + 1];
        assert!(matches!(
            encode(&big),
            Err(FrameError::TooLarge { .. }) | Err(FrameError::Encode(_))
        ));
    }

    #[test]
    fn garbage_and_trailing_bytes_are_refused() {
        assert!(decode::<String>(&[0xff, 0xff, 0xff]).is_err());
        assert!(matches!(
            decode::<u8>(&[1, 2]),
            Err(FrameError::Trailing(1))
        ));
        // A length field inside the body that claims more than the limit allows.
        assert!(decode::<Vec<u8>>(&[0xfc, 0xff, 0xff, 0xff, 0x7f]).is_err());
    }
}

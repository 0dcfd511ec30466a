//! Property tests of everything in `protocol` that reads bytes from a peer: the frame
//! codec and every message decode, the relay's datagrams, manifest and delta checks, and
//! a copy's zstd tar. Arbitrary bytes, and structured mutations (bytes flipped, cut,
//! inserted, lengths rewritten) of the golden encodings, must give a value or a clean
//! error: never a panic, never a write outside the destination.
//!
//! Cases per property: `PROPTEST_CASES`, else each property's own (a few hundred, for
//! CI). Before a release: `PROPTEST_CASES=1000000 cargo test -p protocol --test props
//! --release` (see README, Testing).

use std::path::Path;

use proptest::prelude::*;
use protocol::codec::{self, FrameError, MAX_BLOB_BYTES, MAX_FRAME_BYTES};
use protocol::delta::Delta;
use protocol::manifest::{self, Manifest};
use protocol::streams::{
    CopyHead, CopyInHead, CopyKind, CopyOpen, CopySource, ExecInput, ExecOpen, ExecOutput,
    ForwardOpen, ForwardReady,
};
use protocol::{
    AgentMsg, BulkOpen, ControllerMsg, Hello, RunEvent, SyncApplied, SyncDone, SyncGo, SyncHave,
    SyncOpen, WireError,
};

/// `PROPTEST_CASES` when set (a release's long run), else `default`.
fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// The golden frames of every message (the snapshots `message` and `streams` keep), as
/// seeds for mutation: header included.
fn golden_frames() -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/snapshots");
    let mut frames = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("the golden snapshots") {
        let text = std::fs::read_to_string(entry.expect("entry").path()).expect("read");
        for line in text.lines().filter(|l| {
            l.len() >= 8 && l.len() % 2 == 0 && l.bytes().all(|b| b.is_ascii_hexdigit())
        }) {
            frames.push(hex::decode(line).expect("hex"));
        }
    }
    assert!(frames.len() > 40, "golden frames found: {}", frames.len());
    frames
}

/// Decodes `body` as every message a peer can send; each must decode or refuse.
fn decode_all(body: &[u8]) {
    fn one<T: serde::de::DeserializeOwned>(body: &[u8]) {
        match codec::decode::<T>(body) {
            Ok(_) | Err(FrameError::Decode(_) | FrameError::Trailing(_)) => {}
            Err(other) => panic!("decoding gave {other:?}, not a decode error"),
        }
    }
    one::<AgentMsg>(body);
    one::<ControllerMsg>(body);
    one::<BulkOpen>(body);
    one::<Hello>(body);
    one::<RunEvent>(body);
    one::<WireError>(body);
    one::<SyncOpen>(body);
    one::<SyncHave>(body);
    one::<SyncGo>(body);
    one::<SyncDone>(body);
    one::<SyncApplied>(body);
    one::<ExecOpen>(body);
    one::<ExecInput>(body);
    one::<ExecOutput>(body);
    one::<ForwardOpen>(body);
    one::<ForwardReady>(body);
    one::<CopyOpen>(body);
    one::<CopyHead>(body);
    one::<CopyInHead>(body);
}

/// A mutation of a valid frame, as a flaky or hostile peer would send it.
#[derive(Debug, Clone)]
enum Mutation {
    Flip {
        at: usize,
        bits: u8,
    },
    Cut {
        at: usize,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
    Remove {
        at: usize,
        len: usize,
    },
    /// A varint-sized length field made huge.
    Huge {
        at: usize,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..).prop_map(|(at, bits)| Mutation::Flip { at, bits }),
        any::<usize>().prop_map(|at| Mutation::Cut { at }),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (any::<usize>(), 1usize..8).prop_map(|(at, len)| Mutation::Remove { at, len }),
        any::<usize>().prop_map(|at| Mutation::Huge { at }),
    ]
}

fn mutate(frame: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut bytes = frame.to_vec();
    for m in mutations {
        if bytes.is_empty() {
            break;
        }
        let len = bytes.len();
        match m {
            Mutation::Flip { at, bits } => bytes[at % len] ^= bits,
            Mutation::Cut { at } => bytes.truncate(at % len),
            Mutation::Insert { at, bytes: more } => {
                let at = at % (len + 1);
                bytes.splice(at..at, more.iter().copied());
            }
            Mutation::Remove { at, len: n } => {
                let at = at % len;
                let end = (at + n).min(len);
                bytes.drain(at..end);
            }
            // bincode's varint for u64: 0xfd then 8 little-endian bytes.
            Mutation::Huge { at } => {
                let at = at % (len + 1);
                bytes.splice(
                    at..at,
                    [0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
                );
            }
        }
    }
    bytes
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn arbitrary_bytes_decode_or_are_refused(body in prop::collection::vec(any::<u8>(), 0..4096)) {
        decode_all(&body);
    }

    #[test]
    fn mutated_golden_frames_decode_or_are_refused(
        pick in any::<prop::sample::Index>(),
        mutations in prop::collection::vec(mutation(), 1..6),
    ) {
        let frames = golden_frames();
        let frame = &frames[pick.index(frames.len())];
        let bytes = mutate(frame, &mutations);
        decode_all(bytes.get(codec::HEADER_BYTES..).unwrap_or_default());
        decode_all(&bytes);
    }

    #[test]
    fn a_declared_length_is_taken_only_within_the_limit(header in any::<[u8; 4]>()) {
        let declared = u32::from_be_bytes(header) as usize;
        match codec::body_len(header, MAX_FRAME_BYTES) {
            Ok(len) => prop_assert!(len == declared && len <= MAX_FRAME_BYTES),
            Err(FrameError::TooLarge { len_bytes, .. }) => {
                prop_assert!(len_bytes == declared && declared > MAX_FRAME_BYTES)
            }
            Err(other) => prop_assert!(false, "{other:?}"),
        }
    }

    #[test]
    fn a_stream_of_arbitrary_bytes_reads_as_frames_or_one_clean_error(
        stream in prop::collection::vec(any::<u8>(), 0..2048),
        limit in 0usize..512,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        rt.block_on(async {
            let mut reader = &stream[..];
            // Every frame read is whole and within the limit; the stream ends cleanly,
            // or one error ends the reading.
            for _ in 0..stream.len() + 1 {
                match protocol::framed::read_frame_limited::<_, ControllerMsg>(&mut reader, limit)
                    .await
                {
                    Ok(Some(_)) => {}
                    Ok(None) => return,
                    Err(FrameError::TooLarge { len_bytes, .. }) => {
                        assert!(len_bytes > limit);
                        return;
                    }
                    Err(_) => return,
                }
            }
            panic!("more frames than bytes");
        });
    }

    #[test]
    fn relay_datagrams_decode_or_are_refused(bytes in prop::collection::vec(any::<u8>(), 0..1600)) {
        if let Ok(frame) = protocol::relay::Frame::decode(&bytes) {
            // What decoded encodes back to the same bytes.
            let mut out = Vec::new();
            frame.encode(&mut out);
            prop_assert_eq!(out, bytes);
        }
    }

    #[test]
    fn a_path_a_manifest_accepts_stays_inside_the_tree(path in path_like()) {
        if manifest::check_path(&path).is_ok() {
            let p = Path::new(&path);
            prop_assert!(!p.is_absolute(), "{path:?}");
            prop_assert!(!path.is_empty() && !path.contains('\0'), "{path:?}");
            prop_assert!(
                p.components().all(|c| matches!(c, std::path::Component::Normal(_))),
                "{path:?}"
            );
        }
    }

    #[test]
    fn a_symlink_a_manifest_accepts_points_inside_the_tree(
        link in path_like(),
        target in path_like(),
    ) {
        // A link's own path is checked as any path is (above).
        if manifest::check_path(&link).is_ok() && manifest::check_symlink(&link, &target).is_ok() {
            prop_assert!(!Path::new(&target).is_absolute(), "{link:?} -> {target:?}");
            // Resolved from the link's directory, the target never climbs above the root.
            let mut depth: i64 = Path::new(&link)
                .parent()
                .map_or(0, |p| p.components().count() as i64);
            for c in Path::new(&target).components() {
                match c {
                    std::path::Component::ParentDir => depth -= 1,
                    std::path::Component::Normal(_) => depth += 1,
                    std::path::Component::CurDir => {}
                    other => prop_assert!(false, "{other:?} in {target:?}"),
                }
                prop_assert!(depth >= 0, "{link:?} -> {target:?} leaves the tree");
            }
        }
    }

    #[test]
    fn manifests_and_deltas_from_arbitrary_bytes_check_or_are_refused(
        bytes in prop::collection::vec(any::<u8>(), 0..2048),
    ) {
        if let Ok(m) = codec::decode_blob::<Manifest>(&bytes) {
            let _ = m.check();
        }
        if let Ok(delta) = codec::decode_blob::<Delta>(&bytes) {
            let _ = delta.apply_to(&Manifest::default());
            let _ = delta.summary();
        }
    }
}

/// Strings shaped like paths: components of names, `.`, `..`, empty ones, odd bytes.
fn path_like() -> impl Strategy<Value = String> {
    let part = prop_oneof![
        Just(".".to_owned()),
        Just("..".to_owned()),
        Just(String::new()),
        "[a-z]{1,4}",
        any::<String>().prop_map(|s| s.chars().take(6).collect()),
    ];
    (any::<bool>(), prop::collection::vec(part, 1..6))
        .prop_map(|(abs, parts)| format!("{}{}", if abs { "/" } else { "" }, parts.join("/")))
}

proptest! {
    // Each case unpacks into a directory of its own: fewer of them.
    #![proptest_config(cases(64))]

    #[test]
    fn a_copy_of_arbitrary_bytes_unpacks_only_inside_its_destination(
        raw in prop::collection::vec(any::<u8>(), 0..4096),
        compress in any::<bool>(),
        name in "[a-z]{1,6}",
        dir in any::<bool>(),
    ) {
        let parent = tempfile::tempdir().expect("tempdir");
        let dest = parent.path().join("dest");
        std::fs::create_dir(&dest).expect("dest");
        let input = if compress {
            zstd::encode_all(&raw[..], 1).expect("zstd")
        } else {
            raw
        };
        let source = CopySource {
            name,
            kind: if dir { CopyKind::Dir } else { CopyKind::File },
            bytes: 1 << 20,
            files: 100,
        };
        let staged = protocol::copy::unpack(&input[..], &source, &dest, |_| {});
        drop(staged);
        // Nothing beside the destination, and nothing left in it once staging is dropped.
        let beside: Vec<_> = std::fs::read_dir(parent.path())
            .expect("read")
            .map(|e| e.expect("entry").file_name())
            .collect();
        prop_assert_eq!(beside, vec![std::ffi::OsString::from("dest")]);
        prop_assert_eq!(std::fs::read_dir(&dest).expect("read").count(), 0);
    }

    #[test]
    fn a_blob_over_its_bound_is_never_decompressed_past_it(
        len in 0usize..4096,
        byte in any::<u8>(),
        bound in 1usize..2048,
    ) {
        // What the sync's manifest and delta reads do: zstd with a bound.
        let packed = zstd::bulk::compress(&vec![byte; len], 1).expect("zstd");
        match zstd::bulk::decompress(&packed, bound) {
            Ok(out) => prop_assert!(out.len() <= bound && out.len() == len),
            Err(_) => prop_assert!(len > bound),
        }
        prop_assert!(MAX_BLOB_BYTES > MAX_FRAME_BYTES);
    }
}

//! How much memory decoding a peer's bytes can make this side allocate: a frame of N
//! bytes at most `AMPLIFICATION` times N plus `SLACK` (serde's cautious preallocation),
//! for arbitrary bytes and for frames built to amplify (long runs of the smallest
//! elements); a manifest or delta (a sync's blob, from an authenticated peer) at most its
//! stated bound, `MAX_BLOB_BYTES`, plus `SLACK`, whatever its size. Alone in its binary,
//! with one test, so the counting allocator sees nothing else. Cases: `PROPTEST_CASES`,
//! else 256.

use peakmem_alloc::{INSTRUMENTED_SYSTEM, PeakMemAlloc, PeakMemAllocTrait};
use proptest::prelude::*;
use protocol::codec;

#[global_allocator]
static ALLOCATOR: &PeakMemAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

/// The bound: a frame of N bytes makes at most `AMPLIFICATION * N + SLACK` bytes live.
const AMPLIFICATION: usize = 128;
const SLACK: usize = 2 << 20;

/// The most bytes live at once while `f` ran, above what was live before.
fn peak_during(f: impl FnOnce()) -> usize {
    ALLOCATOR.reset_peak_memory();
    f();
    ALLOCATOR.get_peak_memory()
}

fn decode_every_message(body: &[u8]) {
    let _ = codec::decode::<protocol::AgentMsg>(body);
    let _ = codec::decode::<protocol::ControllerMsg>(body);
    let _ = codec::decode::<protocol::BulkOpen>(body);
    let _ = codec::decode::<protocol::SyncHave>(body);
    let _ = codec::decode::<protocol::streams::ExecOpen>(body);
}

fn decode_every_blob(body: &[u8]) {
    let _ = codec::decode_blob::<protocol::Manifest>(body);
    let _ = codec::decode_blob::<protocol::delta::Delta>(body);
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(256)
}

/// A frame body that claims `count` elements and then repeats `element` for as long as
/// `len` allows: the most elements per byte a peer can send.
fn amplifying(prefix: &[u8], count: u64, element: &[u8], len: usize) -> Vec<u8> {
    let mut body = prefix.to_vec();
    // bincode's varint for a u64 length.
    body.push(0xfd);
    body.extend_from_slice(&count.to_le_bytes());
    while body.len() + element.len() <= len {
        body.extend_from_slice(element);
    }
    body
}

#[test]
fn decoding_a_frame_allocates_within_its_bound() {
    let config = ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let strategy = (
        prop::collection::vec(any::<u8>(), 0..65536),
        0u8..=255,
        prop::collection::vec(any::<u8>(), 1..4),
        1usize..65536,
    );
    let worst = std::cell::Cell::new(0f64);
    let worst_blob = std::cell::Cell::new(0usize);
    runner
        .run(&strategy, |(random, tag, element, len)| {
            // Arbitrary bytes, and a container claimed huge and filled with tiny elements
            // after each possible one-byte variant tag.
            for body in [random, amplifying(&[tag], u64::MAX >> 1, &element, len)] {
                let blob_peak = peak_during(|| decode_every_blob(&body));
                worst_blob.set(worst_blob.get().max(blob_peak));
                prop_assert!(
                    blob_peak <= codec::MAX_BLOB_BYTES + SLACK,
                    "a blob of {} bytes made {blob_peak} bytes live",
                    body.len()
                );
                let peak = peak_during(|| decode_every_message(&body));
                let bound = AMPLIFICATION * body.len() + SLACK;
                if body.len() >= 16384 {
                    worst.set(worst.get().max(peak as f64 / body.len() as f64));
                }
                prop_assert!(
                    peak <= bound,
                    "{} bytes made {peak} bytes live, over {bound}",
                    body.len()
                );
            }
            Ok(())
        })
        .expect("within the bound");
    eprintln!(
        "worst bytes live per frame byte (frames of 16 KiB and more): {:.1}; worst blob: {} bytes",
        worst.get(),
        worst_blob.get()
    );
}

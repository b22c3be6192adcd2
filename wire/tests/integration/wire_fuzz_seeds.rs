//! Writes seed corpora for the fuzz targets in `wire/fuzz` (valid frames of every type, and
//! streams of them), so libFuzzer starts from the schema's shapes rather than from nothing.
//! Ignored by `cargo test`; scripts/fuzz.sh runs it with `RINGPOST_FUZZ_SEEDS=<dir>`.

use crate::frames;

use std::path::PathBuf;

use bytes::BytesMut;
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::TestRunner;
use ringpost_wire::framing::encode_prefixed;
use ringpost_wire::{Frame, FrameKind};

/// Frames per type in the seeds.
const SEEDS_PER_KIND: usize = 4;
/// Seeds larger than this are skipped: small inputs mutate faster.
const SEED_BYTES_MAX: usize = 8 * 1024;

#[test]
#[ignore = "writes files; run by scripts/fuzz.sh"]
fn write_fuzz_seeds() {
    let Some(root) = std::env::var_os("RINGPOST_FUZZ_SEEDS").map(PathBuf::from) else {
        panic!("set RINGPOST_FUZZ_SEEDS to the directory to write seeds into");
    };
    let mut runner = TestRunner::deterministic();
    let mut frames: Vec<Frame> = Vec::new();
    for &kind in FrameKind::ALL {
        let strategy = frames::frame_of(kind);
        let mut kept = 0;
        // Small frames of this type; large random ones are skipped.
        for _ in 0..64 {
            if kept == SEEDS_PER_KIND {
                break;
            }
            let frame = strategy.new_tree(&mut runner).expect("strategy").current();
            if frame.encode().map(|b| b.len()).unwrap_or(usize::MAX) <= SEED_BYTES_MAX {
                frames.push(frame);
                kept += 1;
            }
        }
    }

    let single = ["frame_decode", "frame_view"];
    for target in single {
        std::fs::create_dir_all(root.join(target)).expect("create seed dir");
    }
    std::fs::create_dir_all(root.join("decode_prefixed")).expect("create seed dir");
    for (i, frame) in frames.iter().enumerate() {
        let bytes = frame.encode().expect("seed frames are within bounds");
        for target in single {
            std::fs::write(root.join(target).join(format!("{i:04}")), &bytes).expect("write");
        }
        // decode_prefixed: a chunk size byte, then this frame and the next behind prefixes.
        let mut stream = BytesMut::from(&[7u8][..]);
        encode_prefixed(frame, &mut stream).expect("prefix");
        encode_prefixed(&frames[(i + 1) % frames.len()], &mut stream).expect("prefix");
        std::fs::write(
            root.join("decode_prefixed").join(format!("{i:04}")),
            &stream,
        )
        .expect("write");
    }
}

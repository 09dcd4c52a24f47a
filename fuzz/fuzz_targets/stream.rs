//! Arbitrary bytes, split by a ring of arbitrary capacity and arrival size, through the
//! decoder and the engine (with the strict fakes: a write outside guest RAM aborts). The
//! whole input is the stream (so the real QEMU captures that seed the corpus stay valid
//! streams); the ring's capacity, the arrival size and the dialect are derived from the
//! input's length, so mutations that change the length also change how records split.
#![no_main]

use agent::postcopy::EngineConfig;
use agent::testing::run_stream_with;
use agent::wire::command::Dialect;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let stream = data;
    let n = data.len();
    let capacity = 520 + n.wrapping_mul(2_654_435_761) % 8192;
    let chunk = 1 + n.wrapping_mul(40_503) % 4096;
    // One length in eight speaks v5: the 7.2 captures dominate the corpus.
    let dialect = if n % 8 == 7 { Dialect::SeedV5 } else { Dialect::Qemu72 };
    let out = run_stream_with(stream, capacity, chunk, EngineConfig { dialect, machine: None });
    if let Err(e) = out.result {
        assert!(e.offset <= stream.len() as u64, "error offset beyond the stream: {e}");
    }
});

//! Arbitrary bytes, split by a ring of arbitrary capacity and arrival size, through the
//! decoder and the engine (with the strict fakes: a write outside guest RAM aborts). The
//! first two bytes choose the ring (and, by the low bit of the first, the v5 dialect); the
//! rest is the stream, seeded from real QEMU captures.
#![no_main]

use agent::postcopy::EngineConfig;
use agent::testing::run_stream_with;
use agent::wire::command::Dialect;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (ring, stream) = data.split_at(data.len().min(2));
    let first = ring.first().copied().unwrap_or(0);
    let capacity = 520 + usize::from(first >> 1) * 64;
    let chunk = 1 + usize::from(ring.get(1).copied().unwrap_or(255)) * 16;
    let dialect = if first & 1 == 1 { Dialect::SeedV5 } else { Dialect::Qemu72 };
    let out = run_stream_with(stream, capacity, chunk, EngineConfig { dialect, machine: None });
    if let Err(e) = out.result {
        assert!(e.offset <= stream.len() as u64, "error offset beyond the stream: {e}");
    }
});

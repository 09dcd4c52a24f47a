//! Arbitrary bytes, split by a ring of arbitrary capacity and arrival size, through the
//! decoder and the engine (with the strict fakes: a write outside guest RAM aborts). The
//! first two bytes choose the ring; the rest is the stream, seeded from real QEMU captures.
#![no_main]

use agent::testing::run_stream;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (ring, stream) = data.split_at(data.len().min(2));
    let capacity = 520 + usize::from(ring.first().copied().unwrap_or(0)) * 64;
    let chunk = 1 + usize::from(ring.get(1).copied().unwrap_or(255)) * 16;
    let out = run_stream(stream, capacity, chunk);
    if let Err(e) = out.result {
        assert!(e.offset <= stream.len() as u64, "error offset beyond the stream: {e}");
    }
});

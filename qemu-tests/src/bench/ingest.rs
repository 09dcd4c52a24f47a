//! Ingest: decode + place a recorded QEMU stream, next to memcpy of the same bytes.

use std::hint::black_box;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use agent::postcopy::{Engine, EngineConfig, Shared};
use hal::stage2::Ept;

use super::fault::BufferReturnPath;
use crate::hosted::mem::Mapping;
use crate::hosted::ports::{HostPorts, SharedTable, Wakeups};

/// The receive ring's size in the hosted destination: the stream is handed to the engine in
/// windows of this size, straight from memory (the bytes are already in the ring).
pub const WINDOW: usize = 256 << 10;

/// One decode + place of `stream` into guest memory behind an EPT table. Returns the time
/// and the guest RAM pages placed. With `touched`, the setup (up to the block list) is
/// decoded first, untimed, and the frames are touched before the clock starts, as the
/// hypervisor's guest RAM (physical memory) would be; otherwise the first write to each
/// 2 MiB of frames takes a page fault inside the timed part.
pub fn decode_and_place(stream: &[u8], touched: bool) -> (Duration, u64) {
    let words = (64u64 << 30) / (64 * 4096);
    let received: Vec<AtomicU64> = (0..words).map(|_| AtomicU64::new(0)).collect();
    let requested: Vec<AtomicU64> = (0..words).map(|_| AtomicU64::new(0)).collect();
    let shared = Shared::new(&received, &requested, BufferReturnPath::default());
    let table = SharedTable::<Ept>::default();
    let wakeups = Wakeups::new(1);
    let mut engine = Engine::new(&shared, HostPorts::new(&table, &wakeups), EngineConfig::default());
    let mut at = 0;
    if touched {
        while shared.layout().is_none() && at < stream.len() {
            let p = engine.receive(&stream[at..stream.len().min(at + 64)], &[]).expect("setup decodes");
            at += p.consumed;
        }
        engine.ports().prefault();
    }
    let t = Instant::now();
    while at < stream.len() {
        let window = &stream[at..stream.len().min(at + WINDOW)];
        // A record cut by the window end is completed from the next window, as a ring's
        // wrap would be.
        let next = &stream[at + window.len()..stream.len().min(at + window.len() + WINDOW)];
        let p = engine.receive(window, next).expect("a real capture decodes");
        at += p.consumed;
        if p.finished {
            break;
        }
        if p.consumed == 0 {
            engine.end_of_input().expect("complete capture");
            break;
        }
    }
    let time = t.elapsed();
    let stats = engine.stats();
    black_box(&engine.ports().blocks);
    (time, stats.pages + stats.zero_pages)
}

/// memcpy of `stream.len()` bytes into fresh memory allocated as the guest frames are
/// (anonymous, transparent huge pages allowed: faulted in by the copy), and again into the
/// same memory, already touched.
pub fn memcpy(stream: &[u8]) -> (Duration, Duration) {
    let mut map = Mapping::anon(stream.len()).expect("mmap");
    let _ = map.madvise(0, map.len(), libc::MADV_HUGEPAGE);
    let cold = &mut map.bytes_mut()[..stream.len()];
    let t = Instant::now();
    cold.copy_from_slice(black_box(stream));
    let cold_time = t.elapsed();
    black_box(&cold);
    let t = Instant::now();
    cold.copy_from_slice(black_box(stream));
    let warm_time = t.elapsed();
    black_box(&cold);
    (cold_time, warm_time)
}

/// MB/s (10^6 bytes per second).
pub fn mb_per_s(bytes: usize, time: Duration) -> f64 {
    bytes as f64 / time.as_secs_f64() / 1e6
}

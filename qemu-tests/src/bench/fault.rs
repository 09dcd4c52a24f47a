//! Fault service: the agent's software path next to a userfaultfd round trip.
//!
//! Two halves of a postcopy fault, each timed per event over the real code:
//! * **report → request**: `Shared::on_guest_fault` for a missing page, up to the REQ_PAGES
//!   bytes handed to the return path (the exit handler's part);
//! * **arrival → mapped + released**: `Engine::receive` of one PAGE record (8-byte header +
//!   4 KiB) for a page a vCPU is parked on: decode, copy into the frame, map it in a real EPT
//!   table, set the received bit, claim and release the vCPU (the stream context's part).
//!   The record sits in a receive buffer the transport has just written (cache-warm); the
//!   frame is one the guest never touched (cache-cold).
//!
//! The network time in between (the request travelling to the source and the page coming
//! back) is the same for us and for QEMU and is not measured.

use std::hint::black_box;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use agent::config::TARGET_PAGE_SIZE;
use agent::ports::{ReturnPath, SendFailed};
use agent::postcopy::{Access, Engine, EngineConfig, Fault, Shared};
use agent::testing::{pattern_page, StreamBuilder};
use agent::wire::command::Command;
use agent::wire::ram::RamRecord;
use agent::wire::Writer;
use hal::stage2::Ept;

use crate::hosted::ports::{HostPorts, SharedTable, Wakeups};

/// Pages of the benchmark guest (64 MiB).
pub const PAGES: u64 = 16 << 10;
/// vCPUs of the benchmark guest; they fault in turn (the interop tests run 4 too).
pub const VCPUS: usize = 4;

/// A return path that appends to a preallocated buffer (a vsock TX ring stands in here).
#[derive(Debug, Default)]
pub struct BufferReturnPath(pub Vec<u8>);

impl ReturnPath for BufferReturnPath {
    fn send(&mut self, message: &[u8]) -> Result<(), SendFailed> {
        self.0.extend_from_slice(message);
        Ok(())
    }
}

fn bitmap() -> Vec<AtomicU64> {
    (0..PAGES.div_ceil(64)).map(|_| AtomicU64::new(0)).collect()
}

/// The stream up to RUN (machine `none`: the block sits at guest-physical 0, no legacy
/// hole): one `pc.ram` block of [`PAGES`] pages that never arrived, then a
/// PART header so page records can follow.
fn prefix() -> Vec<u8> {
    let mut s = StreamBuilder::new();
    s.header().configuration(b"none").command(Command::OpenReturnPath).advise(4096, 4096);
    s.ram_start(2, &[(b"pc.ram", PAGES * TARGET_PAGE_SIZE)]);
    s.command(Command::Listen).command(Command::Run).ram_part(2, false);
    s.bytes
}

/// One PAGE|CONTINUE record for `page` (the first one names the block).
fn page_record(page: u64) -> Vec<u8> {
    let block: Option<&[u8]> = if page == 0 { Some(b"pc.ram") } else { None };
    let mut buf = vec![0u8; 16];
    let mut w = Writer::new(&mut buf);
    RamRecord::Page { block, offset: page * TARGET_PAGE_SIZE }.emit(&mut w).expect("record");
    let n = w.len();
    buf.truncate(n);
    buf.extend_from_slice(&pattern_page(page));
    buf
}

/// Per-event durations of both halves, over `PAGES` distinct pages.
#[derive(Debug)]
pub struct FaultSamples {
    /// Fault report → request bytes emitted.
    pub report_to_request: Vec<Duration>,
    /// Page record in → page mapped, vCPU released.
    pub arrival_to_release: Vec<Duration>,
    /// Requests sent (one per page: the samples are first touches).
    pub requests: u64,
    /// vCPU releases.
    pub releases: u64,
}

/// The engine in RUNNING with [`PAGES`] missing pages and touched frames, its shared state,
/// table and wake-up tokens, and one PAGE record per page, handed to `f`.
fn with_running_engine<T>(
    f: impl FnOnce(
        &Shared<'_, BufferReturnPath>,
        &SharedTable<Ept>,
        &Wakeups,
        &mut BenchEngine<'_>,
        &[Vec<u8>],
    ) -> T,
) -> T {
    let (received, requested) = (bitmap(), bitmap());
    let shared = Shared::new(&received, &requested, BufferReturnPath(Vec::with_capacity(1 << 20)));
    let table = SharedTable::<Ept>::default();
    let wakeups = Wakeups::new(VCPUS);
    let mut engine = Engine::new(&shared, HostPorts::new(&table, &wakeups), EngineConfig::default());
    let prefix = prefix();
    let p = engine.receive(&prefix, &[]).expect("prefix");
    assert_eq!(p.consumed, prefix.len(), "prefix decoded");
    engine.ports().prefault();
    let records: Vec<Vec<u8>> = (0..PAGES).map(page_record).collect();
    f(&shared, &table, &wakeups, &mut engine, &records)
}

type BenchEngine<'s> = Engine<'s, 's, 'static, BufferReturnPath, HostPorts<'s, Ept>>;

/// Runs both halves once over every page.
pub fn measure() -> FaultSamples {
    with_running_engine(|shared, table, wakeups, engine, records| {
        measure_on(shared, table, wakeups, engine, records)
    })
}

fn measure_on(
    shared: &Shared<'_, BufferReturnPath>,
    table: &SharedTable<Ept>,
    wakeups: &Wakeups,
    engine: &mut BenchEngine<'_>,
    records: &[Vec<u8>],
) -> FaultSamples {
    let mut report_to_request = Vec::with_capacity(PAGES as usize);
    let mut arrival_to_release = Vec::with_capacity(PAGES as usize);
    let mut releases = 0;
    // The receive buffer: a record arrives in it just before it is decoded (the transport
    // has just written it), so it is timed from there, cache-warm, as it would be.
    let mut rx = vec![0u8; 2 * TARGET_PAGE_SIZE as usize];
    for (page, record) in records.iter().enumerate() {
        let gpa = page as u64 * TARGET_PAGE_SIZE;
        let vcpu = page % VCPUS;
        let t = Instant::now();
        let fault = shared.on_guest_fault(black_box(gpa), Access::Read, vcpu);
        report_to_request.push(t.elapsed());
        assert!(matches!(fault, Ok(Fault::Wait { .. })), "page {page}: {fault:?}");

        let rx = &mut rx[..record.len()];
        rx.copy_from_slice(record);
        let t = Instant::now();
        let p = engine.receive(black_box(rx), &[]).expect("page record");
        arrival_to_release.push(t.elapsed());
        assert_eq!(p.consumed, record.len());
        // The release took the vCPU's token; consume it as the vCPU would.
        assert!(wakeups.park(vcpu, || true), "vCPU {vcpu} released");
        releases += 1;
        assert!(table.translate(gpa).is_some(), "page {page} mapped");
    }
    let requests = shared.counters.requests.load(std::sync::atomic::Ordering::Relaxed);
    FaultSamples { report_to_request, arrival_to_release, requests, releases }
}

/// The report → request path alone, untimed per call, for an instruction count under
/// callgrind (`--toggle-collect` on this function). Returns the requests sent.
#[inline(never)]
pub fn report_loop(shared: &Shared<'_, BufferReturnPath>, pages: u64) -> u64 {
    let mut waits = 0;
    for page in 0..pages {
        let vcpu = (page % VCPUS as u64) as usize;
        let fault = shared.on_guest_fault(black_box(page * TARGET_PAGE_SIZE), Access::Read, vcpu);
        waits += u64::from(matches!(fault, Ok(Fault::Wait { .. })));
    }
    waits
}

/// The arrival → release path alone (see [`report_loop`]).
#[inline(never)]
pub fn arrival_loop<E: FnMut(&[u8])>(records: &[Vec<u8>], mut receive: E) {
    for r in records {
        receive(black_box(r));
    }
}

/// Runs [`report_loop`] and [`arrival_loop`] once over every page (the body the
/// `fault-loops` subcommand runs under callgrind).
pub fn run_loops() -> (u64, u64) {
    with_running_engine(|shared, _, _, engine, records| {
        let waits = report_loop(shared, PAGES);
        arrival_loop(records, |r| {
            engine.receive(r, &[]).expect("page record");
        });
        (waits, engine.stats().pages)
    })
}

/// `n` timings of an empty interval: what a clock pair itself costs.
pub fn empty_intervals(n: usize) -> Vec<Duration> {
    (0..n)
        .map(|_| {
            let t = Instant::now();
            black_box(());
            t.elapsed()
        })
        .collect()
}

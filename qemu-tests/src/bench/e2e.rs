//! Fault service end to end, over a real socket, next to the userfaultfd round trip with
//! the same page source.
//!
//! **Ours** (the hosted destination's real code, three threads):
//! * a vCPU thread touches a discarded page: the clock starts, `Shared::on_guest_fault`
//!   sends REQ_PAGES(_ID) on the return path (one end of a unix socketpair) and the vCPU
//!   parks on its wake-up token (`hosted::ports::Wakeups`);
//! * the [`responder`] thread (the source) parses the request and writes the page back as
//!   a `ram` PART section;
//! * the stream thread reads the socket and feeds `Engine::receive`, which decodes the
//!   record, copies the page into its frame, maps it in the real `hal::stage2` EPT table and
//!   releases the vCPU; the vCPU wakes, walks the table again, finds the page: the clock
//!   stops.
//!
//! **userfaultfd** (what QEMU 7.2's destination does, same responder, same bytes):
//! * a thread touches a page of an anonymous mapping (THP off) registered MISSING: the clock
//!   starts; the kernel puts it to sleep and makes the uffd readable;
//! * the handler thread `poll`s and `read`s the fault, sends the same REQ_PAGES(_ID) bytes
//!   over the same kind of socket to the same responder, reads the answer back through the
//!   agent's decoder into a temporary page, and places it with `UFFDIO_COPY`, which wakes
//!   the toucher; its load returns: the clock stops. (QEMU splits the handler in two, its
//!   fault thread sends the request and its stream thread places the page; the wake-ups
//!   along the way are the same.)
//!
//! Every fault is on a page never touched before (each side has its own pages). The sides
//! alternate in blocks; at the end every placed page is compared with the source's.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use agent::config::TARGET_PAGE_SIZE;
use agent::decoder::{Decoder, Record, Step};
use agent::postcopy::{Access, Engine, EngineConfig, Fault, Shared};
use agent::testing::StreamBuilder;
use agent::wire::command::{Command, Dialect};
use agent::wire::ram::RamRecord;
use agent::wire::return_path::RpMessage;
use hal::stage2::Ept;

use super::responder::{serve, PageSource, Served, RAM_SECTION};
use crate::baseline::sys::{self, UffdioApi, UffdioCopy, UffdioRegister};
use crate::hosted::mem::{Mapping, PAGE};
use crate::hosted::ports::{HostPorts, SharedTable, SocketReturnPath, Wakeups};

/// The block both sides fault in.
const BLOCK: &[u8] = b"pc.ram";
/// A fault not served in this long is a failure, not a sample.
const STUCK: Duration = Duration::from_secs(10);

/// How many faults, in which order.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// Blocks per side; the sides alternate (ours first in even blocks, userfaultfd first in
    /// odd ones).
    pub blocks: usize,
    /// Faults per block.
    pub per_block: usize,
    /// Unreported faults per side before the first block.
    pub warmup: usize,
}

/// What [`measure`] saw.
#[derive(Debug, Default)]
pub struct EndToEnd {
    /// Ours: fault → resumed, per fault.
    pub ours: Vec<Duration>,
    /// userfaultfd: touch → load returned, per fault.
    pub uffd: Vec<Duration>,
    /// Ours: page requests the agent sent.
    pub ours_requests: u64,
    /// What the responder served to each side (ours, userfaultfd).
    pub served: (Served, Served),
    /// Pages whose frame equals the source's page afterwards (ours, userfaultfd).
    pub pages_matching: (usize, usize),
    /// Pages faulted per side (warm-up included).
    pub pages: usize,
}

/// The stream up to RUN (machine `none`: the block sits at guest-physical 0), then nothing:
/// every later byte is a page the responder sends.
fn prefix(pages: u64) -> Vec<u8> {
    let mut s = StreamBuilder::new();
    s.header().configuration(b"none").command(Command::OpenReturnPath).advise(4096, 4096);
    s.ram_start(RAM_SECTION, &[(BLOCK, pages * TARGET_PAGE_SIZE)]);
    s.command(Command::Listen).command(Command::Run);
    s.bytes
}

fn bitmap(pages: u64) -> Vec<AtomicU64> {
    (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect()
}

/// Runs both sides, alternating in blocks; see the module documentation.
pub fn measure(config: &Config) -> Result<EndToEnd, String> {
    let pages = config.warmup + config.blocks * config.per_block;
    let source = PageSource::new(pages as u64);
    let (received, requested) = (bitmap(pages as u64), bitmap(pages as u64));
    let io = |what: &'static str| move |e: std::io::Error| format!("{what}: {e}");
    let (dest, src) = UnixStream::pair().map_err(io("socketpair"))?;
    let shared =
        Shared::new(&received, &requested, SocketReturnPath(Some(dest.try_clone().map_err(io("dup"))?)));
    let table = SharedTable::<Ept>::default();
    let wakeups = Wakeups::new(1);
    let mut engine = Engine::new(&shared, HostPorts::new(&table, &wakeups), EngineConfig::default());
    let prefix = prefix(pages as u64);
    let p = engine.receive(&prefix, &[]).map_err(|e| format!("prefix: {e}"))?;
    if p.consumed != prefix.len() {
        return Err(format!("prefix: {} of {} bytes decoded", p.consumed, prefix.len()));
    }
    // The hypervisor's guest RAM is physical memory: it never faults on first touch.
    engine.ports().prefault();
    let (uffd_conn, uffd_src) = UnixStream::pair().map_err(io("socketpair"))?;
    let stop_stream = dest.try_clone().map_err(io("dup"))?;

    let mut out = EndToEnd { pages, ..EndToEnd::default() };
    std::thread::scope(|s| {
        let ours_responder = s.spawn(|| serve(src, &source));
        let uffd_responder = s.spawn(|| serve(uffd_src, &source));
        let driver = s.spawn(|| {
            let r = drive(config, &shared, &table, &wakeups, uffd_conn, &source);
            // Ends the stream thread's read (and the responder's).
            let _ = stop_stream.shutdown(std::net::Shutdown::Both);
            r
        });
        // This thread is the stream context: it owns the engine (and the guest frames).
        let streamed = stream_loop(&mut engine, dest);
        let driven = driver.join().map_err(|_| "the vCPU thread panicked".to_string())?;
        let served_ours = ours_responder.join().map_err(|_| "responder panicked".to_string())?;
        let served_uffd = uffd_responder.join().map_err(|_| "responder panicked".to_string())?;
        let (ours, uffd, uffd_matching) = driven?;
        streamed?;
        out.ours = ours;
        out.uffd = uffd;
        out.served = (served_ours?, served_uffd?);
        out.pages_matching.1 = uffd_matching;
        Ok::<(), String>(())
    })?;
    out.ours_requests = shared.counters.requests.load(Ordering::Relaxed);
    let frames = engine.ports().blocks[0].bytes();
    out.pages_matching.0 = (0..pages)
        .filter(|&i| {
            let at = i * PAGE;
            source.page(at as u64).is_some_and(|p| frames[at..at + PAGE] == *p)
        })
        .count();
    Ok(out)
}

/// The stream context: reads the socket as bytes come and hands them to the engine, until
/// the socket is shut down.
fn stream_loop<P, R>(engine: &mut Engine<'_, '_, '_, R, P>, mut conn: UnixStream) -> Result<(), String>
where
    R: agent::ports::ReturnPath,
    P: agent::ports::GuestMemory
        + agent::ports::Stage2
        + agent::ports::PageWaiters
        + agent::ports::DeviceStateSink,
{
    let mut buf = vec![0u8; 256 << 10];
    let (mut start, mut end) = (0usize, 0usize);
    loop {
        if start > 0 {
            buf.copy_within(start..end, 0);
            end -= start;
            start = 0;
        }
        match conn.read(&mut buf[end..]) {
            Ok(0) => return Ok(()),
            Ok(n) => end += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("stream read: {e}")),
        }
        while start < end {
            let p = engine.receive(&buf[start..end], &[]).map_err(|e| format!("engine: {e}"))?;
            start += p.consumed;
            if p.consumed == 0 {
                break;
            }
        }
    }
}

type Driven = (Vec<Duration>, Vec<Duration>, usize);

/// The faulting side of both: our vCPU and the userfaultfd toucher are this one thread,
/// taking turns block by block.
fn drive(
    config: &Config,
    shared: &Shared<'_, SocketReturnPath<UnixStream>>,
    table: &SharedTable<Ept>,
    wakeups: &Wakeups,
    conn: UnixStream,
    source: &PageSource,
) -> Result<Driven, String> {
    let pages = config.warmup + config.blocks * config.per_block;
    let io = |what: &'static str| move |e: std::io::Error| format!("{what}: {e}");
    let uffd = sys::userfaultfd().map_err(io("userfaultfd"))?;
    let mut api = UffdioApi { api: sys::UFFD_API, ..Default::default() };
    sys::uffdio_api(&uffd, &mut api).map_err(io("UFFDIO_API"))?;
    let mut region = Mapping::anon(pages * PAGE).map_err(io("mmap"))?;
    // QEMU turns transparent huge pages off on RAM it serves with userfaultfd.
    region.madvise(0, region.len(), libc::MADV_NOHUGEPAGE).map_err(io("madvise"))?;
    let mut reg = UffdioRegister {
        start: region.addr(),
        len: region.len() as u64,
        mode: sys::UFFDIO_REGISTER_MODE_MISSING,
        ioctls: 0,
    };
    sys::uffdio_register(&uffd, &mut reg).map_err(io("UFFDIO_REGISTER"))?;
    let base = region.addr();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        // The handler owns the uffd: if it fails, closing it wakes a stuck toucher (its page
        // then reads as zero and the check below fails) instead of hanging.
        let handler = s.spawn(|| uffd_handler(uffd, conn, base, pages as u64, &stop));
        let result = (|| {
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            let (mut next_ours, mut next_uffd) = (0usize, 0usize);
            // (side, faults, kept): side 0 is ours, 1 userfaultfd.
            let mut plan = vec![(0, config.warmup, false), (1, config.warmup, false)];
            for b in 0..config.blocks {
                let order = if b % 2 == 0 { [0, 1] } else { [1, 0] };
                plan.extend(order.map(|side| (side, config.per_block, true)));
            }
            for (side, n, keep) in plan {
                for _ in 0..n {
                    let d = if side == 0 {
                        let gpa = next_ours as u64 * TARGET_PAGE_SIZE;
                        next_ours += 1;
                        our_fault(shared, table, wakeups, gpa)?
                    } else {
                        let page = next_uffd;
                        next_uffd += 1;
                        let want = source.page(page as u64 * TARGET_PAGE_SIZE).map(stamp);
                        let t = Instant::now();
                        let got = region.touch_read(page * PAGE);
                        let d = t.elapsed();
                        if Some(got) != want {
                            return Err(format!("userfaultfd page {page}: read {got:#x}, not the source's"));
                        }
                        d
                    };
                    if keep {
                        if side == 0 {
                            ours.push(d)
                        } else {
                            theirs.push(d)
                        }
                    }
                }
            }
            Ok((ours, theirs))
        })();
        stop.store(true, Ordering::Release);
        let handled = handler.join().map_err(|_| "the uffd handler panicked".to_string())?;
        let (ours, theirs) = result?;
        let handled = handled?;
        if handled != pages as u64 {
            return Err(format!("the uffd handler placed {handled} pages, not {pages}"));
        }
        let bytes = region.bytes();
        let matching = (0..pages)
            .filter(|&i| {
                source.page((i * PAGE) as u64).is_some_and(|p| bytes[i * PAGE..(i + 1) * PAGE] == *p)
            })
            .count();
        Ok((ours, theirs, matching))
    })
}

/// The first 8 bytes of a page, as a load of them returns.
fn stamp(page: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&page[..8]);
    u64::from_ne_bytes(b)
}

/// One fault of our vCPU 0 at `gpa`, timed from the exit into the agent to the successful
/// walk after the release.
fn our_fault(
    shared: &Shared<'_, SocketReturnPath<UnixStream>>,
    table: &SharedTable<Ept>,
    wakeups: &Wakeups,
    gpa: u64,
) -> Result<Duration, String> {
    if table.translate(gpa).is_some() {
        return Err(format!("{gpa:#x} is mapped before its fault"));
    }
    let t = Instant::now();
    match shared.on_guest_fault(gpa, Access::Read, 0) {
        Ok(Fault::Wait { .. }) => {
            if !wakeups.park(0, || t.elapsed() > STUCK) {
                return Err(format!("{gpa:#x}: no release in {STUCK:?}"));
            }
        }
        Ok(Fault::Resume) => {}
        Err(e) => return Err(format!("{gpa:#x}: {e:?}")),
    }
    if table.translate(gpa).is_none() {
        return Err(format!("{gpa:#x}: released but not mapped"));
    }
    Ok(t.elapsed())
}

/// QEMU's fault thread and stream thread in one: per fault, request the page from the
/// responder, decode the answer into a temporary page, `UFFDIO_COPY` it. Returns the pages
/// placed.
fn uffd_handler(
    uffd: OwnedFd,
    mut conn: UnixStream,
    base: u64,
    pages: u64,
    stop: &AtomicBool,
) -> Result<u64, String> {
    let io = |what: &'static str| move |e: std::io::Error| format!("{what}: {e}");
    // QEMU's temporary host page (`postcopy_host_page`), page aligned.
    let mut tmp = Mapping::anon(PAGE).map_err(io("mmap"))?;
    let mut decoder = Decoder::new(Dialect::Qemu72);
    // The stream so far (what QEMU's loader has parsed before RUN).
    let prefix = prefix(pages);
    let mut at = 0;
    while at < prefix.len() {
        match decoder.next(&prefix[at..], &[]).map_err(|e| format!("prefix: {e}"))? {
            Step::Record { len, .. } => at += len,
            Step::NeedMore => return Err("prefix: incomplete".into()),
        }
    }
    let mut rx = vec![0u8; 64 << 10];
    let (mut start, mut end) = (0usize, 0usize);
    let mut request = [0u8; 64];
    let mut placed = 0u64;
    let mut named = false;
    while !stop.load(Ordering::Acquire) {
        if !sys::poll_readable(&uffd, 100).map_err(io("poll(uffd)"))? {
            continue;
        }
        let Some(msg) = sys::read_uffd_msg(&uffd).map_err(io("read(uffd)"))? else { continue };
        if msg.event != sys::UFFD_EVENT_PAGEFAULT {
            return Err(format!("unexpected uffd event {:#x}", msg.event));
        }
        let addr = msg.address & !(PAGE as u64 - 1);
        let offset = addr - base;
        let len = TARGET_PAGE_SIZE as u32;
        let req = if named {
            RpMessage::ReqPages { start: offset, len }
        } else {
            RpMessage::ReqPagesId { start: offset, len, block: BLOCK }
        };
        named = true;
        let n = req.emit(&mut request).ok_or("request does not fit")?;
        conn.write_all(&request[..n]).map_err(io("request"))?;
        // Read the answer: the PART section with the page, up to its footer.
        let (mut page_at, mut filled) = (None, 0usize);
        loop {
            let step = decoder.next(&rx[start..end], &[]).map_err(|e| format!("answer: {e}"))?;
            let (len, footer) = match step {
                Step::Record { record, len, .. } => match record {
                    Record::Ram(RamRecord::Page { offset, .. }) => {
                        page_at = Some(offset);
                        (len, false)
                    }
                    Record::PageData(piece) => {
                        tmp.bytes_mut()[filled..filled + piece.len()].copy_from_slice(piece);
                        filled += piece.len();
                        (len, false)
                    }
                    Record::Footer => (len, true),
                    _ => (len, false),
                },
                Step::NeedMore => {
                    if start > 0 {
                        rx.copy_within(start..end, 0);
                        end -= start;
                        start = 0;
                    }
                    match conn.read(&mut rx[end..]) {
                        Ok(0) => return Err("the responder closed the connection".into()),
                        Ok(n) => end += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(format!("answer read: {e}")),
                    }
                    continue;
                }
            };
            start += len;
            if footer {
                break;
            }
        }
        if page_at != Some(offset) || filled != PAGE {
            return Err(format!("asked for {offset:#x}, got {page_at:?} ({filled} bytes)"));
        }
        let mut copy = UffdioCopy { dst: addr, src: tmp.addr(), len: PAGE as u64, mode: 0, copy: 0 };
        sys::uffdio_copy(&uffd, &mut copy).map_err(io("UFFDIO_COPY"))?;
        placed += 1;
    }
    Ok(placed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A few faults of each side: every page lands, each request is served once. (No timing
    /// is checked.)
    #[test]
    fn both_sides_place_the_source_pages() {
        let r = measure(&Config { blocks: 2, per_block: 8, warmup: 4 }).expect("end to end");
        assert_eq!((r.ours.len(), r.uffd.len()), (16, 16));
        assert_eq!(r.pages, 20);
        assert_eq!(r.pages_matching, (20, 20));
        assert_eq!((r.served.0.pages, r.served.1.pages), (20, 20));
        assert_eq!(r.ours_requests, 20);
    }
}

//! The userfaultfd missing-page round trip, as QEMU 7.2's postcopy destination does it.
//!
//! QEMU registers guest RAM (anonymous memory, THP off) with `UFFDIO_REGISTER` in
//! MISSING mode; a vCPU touching a page that has not arrived sleeps in the kernel; QEMU's
//! fault thread `poll`s the uffd, `read`s the `uffd_msg`, asks the source for the page,
//! and once it is there places it with `UFFDIO_COPY` from a temporary page, which also
//! wakes the vCPU. This module measures exactly the local part of that: no network, the
//! page is prepared in advance, so one sample is
//!
//! touch (fault, sleep) → handler wakes from `poll` → `read` → stamp + `UFFDIO_COPY`
//! (copy + wake) → the faulting thread is scheduled again and the load returns.
//!
//! Each sample touches a fresh page; the time is taken with [`Instant`] just before the
//! load and just after it returns. The handler stamps the first 8 bytes of the prepared
//! page with the fault address before each copy, so the result proves that the right
//! page landed at the right place (see [`RoundTrips::pages_matching`]).

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::sys::{self, UffdioApi, UffdioCopy, UffdioRegister, PAGE};
use crate::hosted::mem::Mapping;
use crate::{bail, Error, Result};

/// Round trips done before the measured ones (first-use costs: page-table pages,
/// thread wake-up paths); they touch fresh pages too and are not reported.
pub const DEFAULT_WARMUP: usize = 16;

/// Where the faulting thread and the handler thread run.
///
/// On this 2-vCPU VM the placement decides the result: on one CPU the round trip is two
/// context switches; on two CPUs each hand-over is a cross-CPU wake-up of an idle vCPU
/// (an IPI through the host), several times slower. QEMU pins neither its vCPU threads
/// nor its fault thread, so [`Placement::Unpinned`] is what QEMU gets, and it varies with
/// where the scheduler happens to put the two threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Placement {
    /// No affinity set (QEMU's case).
    #[default]
    Unpinned,
    /// Both threads on this CPU.
    SameCpu(usize),
    /// Faulting thread on the first CPU, handler thread on the second.
    CrossCpu(usize, usize),
}

impl Placement {
    fn cpus(self) -> (Option<usize>, Option<usize>) {
        match self {
            Placement::Unpinned => (None, None),
            Placement::SameCpu(c) => (Some(c), Some(c)),
            Placement::CrossCpu(a, b) => (Some(a), Some(b)),
        }
    }
}

/// What [`measure_with`] does.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// Measured round trips.
    pub samples: usize,
    /// Unreported round trips before them.
    pub warmup: usize,
    /// Thread placement.
    pub placement: Placement,
}

impl Config {
    /// `samples` round trips after [`DEFAULT_WARMUP`], unpinned.
    pub fn new(samples: usize) -> Self {
        Config { samples, warmup: DEFAULT_WARMUP, placement: Placement::Unpinned }
    }
}

/// The result of [`measure`].
#[derive(Debug, Clone)]
pub struct RoundTrips {
    /// One duration per measured round trip, in touch order.
    pub samples: Vec<Duration>,
    /// Instructions (user + kernel, faulting thread + handler thread) per measured round
    /// trip, from `perf_event_open(PERF_COUNT_HW_INSTRUCTIONS)`; `None` when the
    /// machine exposes no hardware counter (see [`RoundTrips::instructions_unavailable`]).
    pub instructions_per_round_trip: Option<f64>,
    /// Why `instructions_per_round_trip` is `None`.
    pub instructions_unavailable: Option<String>,
    /// Page-fault events the handler resolved (warm-up included).
    pub faults_handled: usize,
    /// Measured pages whose whole content equals [`prepared_page`] for their address
    /// after the round trip (should be `samples.len()`).
    pub pages_matching: usize,
}

/// The page the handler places at `addr`: bytes `i % 251 + 1` (never zero), with the
/// first 8 bytes replaced by `addr` (native endian).
pub fn prepared_page(addr: u64) -> Vec<u8> {
    let mut page: Vec<u8> = (0..PAGE).map(|i| (i % 251 + 1) as u8).collect();
    page[..8].copy_from_slice(&addr.to_ne_bytes());
    page
}

/// `samples` missing-fault round trips (after [`DEFAULT_WARMUP`] unreported ones),
/// threads unpinned as in QEMU (see [`Placement`]).
pub fn missing_fault_round_trips(samples: usize) -> Result<Vec<Duration>> {
    Ok(measure(samples, DEFAULT_WARMUP)?.samples)
}

fn io_err(what: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error(format!("{what}: {e}"))
}

/// Measures `samples` round trips after `warmup` unreported ones (unpinned), and checks
/// every measured page's content afterwards.
pub fn measure(samples: usize, warmup: usize) -> Result<RoundTrips> {
    measure_with(&Config { samples, warmup, placement: Placement::Unpinned })
}

/// [`measure`] with a thread placement. The calling thread is the faulting thread; with
/// a pinned placement its affinity is restored to all CPUs it had before at the end.
pub fn measure_with(config: &Config) -> Result<RoundTrips> {
    let (fault_cpu, handler_cpu) = config.placement.cpus();
    let before = std::fs::read_to_string("/proc/thread-self/status").ok();
    if let Some(cpu) = fault_cpu {
        sys::pin_current_thread(cpu).map_err(io_err("pinning the faulting thread"))?;
    }
    let result = run(config.samples, config.warmup, handler_cpu);
    if fault_cpu.is_some() {
        restore_affinity(before.as_deref());
    }
    result
}

/// Re-allows the CPUs listed in `Cpus_allowed_list` of a saved `/proc/thread-self/status`.
fn restore_affinity(status: Option<&str>) {
    let Some(list) =
        status.and_then(|s| s.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:"))).map(str::trim)
    else {
        return;
    };
    let mut cpus = Vec::new();
    for part in list.split(',') {
        let mut ends = part.split('-').filter_map(|x| x.trim().parse::<usize>().ok());
        if let Some(a) = ends.next() {
            cpus.extend(a..=ends.next().unwrap_or(a));
        }
    }
    let _ = sys::set_current_thread_cpus(&cpus);
}

fn run(samples: usize, warmup: usize, handler_cpu: Option<usize>) -> Result<RoundTrips> {
    if samples == 0 {
        bail!("uffd: need at least one sample");
    }
    let total = samples + warmup;
    let uffd = sys::userfaultfd().map_err(io_err("userfaultfd"))?;
    let mut api = UffdioApi { api: sys::UFFD_API, ..Default::default() };
    sys::uffdio_api(&uffd, &mut api).map_err(io_err("UFFDIO_API"))?;
    let mut region = Mapping::anon(total * PAGE).map_err(io_err("mmap"))?;
    // QEMU turns transparent huge pages off on RAM it serves with userfaultfd.
    region.madvise(0, region.len(), libc::MADV_NOHUGEPAGE).map_err(io_err("madvise(MADV_NOHUGEPAGE)"))?;
    let mut reg = UffdioRegister {
        start: region.addr(),
        len: region.len() as u64,
        mode: sys::UFFDIO_REGISTER_MODE_MISSING,
        ioctls: 0,
    };
    sys::uffdio_register(&uffd, &mut reg).map_err(io_err("UFFDIO_REGISTER"))?;
    if reg.ioctls & sys::UFFDIO_COPY_BIT == 0 {
        bail!("UFFDIO_REGISTER: UFFDIO_COPY not available on the range");
    }

    // The handler thread owns the uffd: if it fails, closing the uffd wakes a stuck
    // toucher (its page then reads as zero and the stamp check fails) instead of hanging.
    let stop = Arc::new(AtomicBool::new(false));
    let handler = {
        let stop = Arc::clone(&stop);
        std::thread::Builder::new().name("uffd-handler".into()).spawn(move || {
            if let Some(cpu) = handler_cpu {
                sys::pin_current_thread(cpu).map_err(io_err("pinning the handler thread"))?;
            }
            handle_faults(uffd, &stop, warmup, total)
        })?
    };
    let faulted = fault_loop(&region, warmup, samples);
    stop.store(true, Ordering::Release);
    let handled = join(handler)?;
    let (samples, main_counter) = faulted?;

    let base = region.addr();
    let bytes = region.bytes();
    let pages_matching = (warmup..total)
        .filter(|&i| {
            let addr = base + (i * PAGE) as u64;
            bytes[i * PAGE..(i + 1) * PAGE] == prepared_page(addr)[..]
        })
        .count();

    let (instructions_per_round_trip, instructions_unavailable) = match (main_counter, handled.instructions) {
        (Ok(a), Ok(b)) => (Some((a + b) as f64 / samples.len() as f64), None),
        (Err(e), _) | (_, Err(e)) => (None, Some(e)),
    };
    Ok(RoundTrips {
        samples,
        instructions_per_round_trip,
        instructions_unavailable,
        faults_handled: handled.faults,
        pages_matching,
    })
}

/// What the handler thread reports.
struct Handled {
    faults: usize,
    /// Instructions while resolving the measured faults, or why there is no count.
    instructions: std::result::Result<u64, String>,
}

fn join(handler: JoinHandle<Result<Handled>>) -> Result<Handled> {
    match handler.join() {
        Ok(r) => r,
        Err(_) => bail!("uffd handler thread panicked"),
    }
}

/// Opens and starts a counter for the calling thread.
fn start_counter() -> std::result::Result<sys::InstructionCounter, String> {
    let c = sys::InstructionCounter::new()
        .map_err(|e| format!("perf_event_open(PERF_COUNT_HW_INSTRUCTIONS): {e}"))?;
    c.enable().map_err(|e| format!("PERF_EVENT_IOC_ENABLE: {e}"))?;
    Ok(c)
}

/// Stops a counter and reads it.
fn stop_counter(c: std::result::Result<sys::InstructionCounter, String>) -> std::result::Result<u64, String> {
    let mut c = c?;
    c.disable().map_err(|e| format!("PERF_EVENT_IOC_DISABLE: {e}"))?;
    c.read().map_err(|e| format!("reading the counter: {e}"))
}

/// The faulting side: touches page `i` for every `i`, timing the measured ones.
#[allow(clippy::type_complexity)]
fn fault_loop(
    region: &Mapping,
    warmup: usize,
    samples: usize,
) -> Result<(Vec<Duration>, std::result::Result<u64, String>)> {
    let base = region.addr();
    for i in 0..warmup {
        let got = region.touch_read(i * PAGE);
        if got != base + (i * PAGE) as u64 {
            bail!("uffd warm-up page {i}: read {got:#x}, not its stamp");
        }
    }
    let mut out = Vec::with_capacity(samples);
    let counter = start_counter();
    for i in warmup..warmup + samples {
        let t0 = Instant::now();
        let got = region.touch_read(i * PAGE);
        out.push(t0.elapsed());
        if got != base + (i * PAGE) as u64 {
            bail!("uffd page {i}: read {got:#x}, not its stamp");
        }
    }
    Ok((out, stop_counter(counter)))
}

/// The handler side, QEMU's fault thread plus its `UFFDIO_COPY`: poll, read the event,
/// stamp the prepared page with the address, copy it in (which wakes the toucher).
fn handle_faults(uffd: OwnedFd, stop: &AtomicBool, warmup: usize, total: usize) -> Result<Handled> {
    let mut src = Mapping::anon(PAGE).map_err(io_err("mmap source page"))?;
    src.bytes_mut().copy_from_slice(&prepared_page(0));
    let mut faults = 0;
    let mut counter = Err("no measured fault".to_string());
    let mut instructions = Err("no measured fault".to_string());
    if warmup == 0 {
        counter = start_counter();
    }
    while !stop.load(Ordering::Acquire) && faults < total {
        if !sys::poll_readable(&uffd, 100).map_err(io_err("poll(uffd)"))? {
            continue;
        }
        let Some(msg) = sys::read_uffd_msg(&uffd).map_err(io_err("read(uffd)"))? else {
            continue;
        };
        if msg.event != sys::UFFD_EVENT_PAGEFAULT {
            bail!("unexpected uffd event {:#x}", msg.event);
        }
        let addr = msg.address & !(PAGE as u64 - 1);
        src.bytes_mut()[..8].copy_from_slice(&addr.to_ne_bytes());
        let mut copy = UffdioCopy { dst: addr, src: src.addr(), len: PAGE as u64, mode: 0, copy: 0 };
        sys::uffdio_copy(&uffd, &mut copy).map_err(io_err("UFFDIO_COPY"))?;
        faults += 1;
        if faults == warmup {
            counter = start_counter();
        } else if faults == total {
            instructions = stop_counter(std::mem::replace(&mut counter, Err(String::new())));
        }
    }
    Ok(Handled { faults, instructions })
}

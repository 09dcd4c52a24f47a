//! The main loop: stream bytes from the transport through the agent; after RUN, the guest
//! vCPU runs, and its stage-2 faults become page requests; a parked vCPU runs again once its
//! page is mapped. After the migration the guest goes on running for a while (a real VM keeps
//! running on its destination); then the loop ends with a one-line report (`RESULT {json}`) on
//! the debug console.

use core::fmt::Write;

use agent::ports::ReturnPath;
use agent::postcopy::{Engine, EngineConfig, Fault, Shared, State};
use agent::sync::AtomicU64;
use hal::stage2::port::TablePort;
use hal::stage2::{FramePool, Gpa, Stage2};
use hal::virt::{Access, ExitReason, Vcpu};

use crate::console::Console;
use crate::cycles::Samples;
use crate::devices::{Devices, IoResult};
use crate::exit::{exit, Code};
use crate::guest::{self, GuestKind};
use crate::latency::{self, Latency};
use crate::memory::{frames_mut, FRAMES_BASE, FRAMES_LEN, TABLE_SLAB};
use crate::platform::{ImagePorts, DEVICE_STATE_BYTES};
use crate::transport::{Poll, StreamIn};

/// Words of each page bitmap: one bit per 4 KiB page of the frames region.
const BITMAP_WORDS: usize = (FRAMES_LEN / (64 * 4096)) as usize;
/// RAX of the pattern guest's result hypercall: "PGRS".
const GUEST_RESULT: u64 = 0x5047_5253;

static RECEIVED: [AtomicU64; BITMAP_WORDS] = [const { AtomicU64::new(0) }; BITMAP_WORDS];
static REQUESTED: [AtomicU64; BITMAP_WORDS] = [const { AtomicU64::new(0) }; BITMAP_WORDS];

/// What the guest reported with its result hypercall.
#[derive(Clone, Copy, Debug)]
struct GuestResult {
    checksum: u64,
    mismatches: u64,
    written: u64,
}

/// Why the guest stopped for good, for the report.
pub type StopReason = heapless::String<160>;

/// The guest vCPU's progress.
#[derive(Default)]
struct GuestState {
    kind: Option<GuestKind>,
    restored: bool,
    parked: bool,
    /// Stopped for good: its result came, it halted, it ran its time after the migration, or
    /// it did something the image does not emulate (`stopped`).
    done: bool,
    stopped: Option<StopReason>,
    result: Option<GuestResult>,
    stage2_faults: u64,
    faults_served: u64,
    exits: u64,
    io_exits: u64,
    /// TSC of the stage-2 exit the parked vCPU waits on.
    blocked_since: Option<u64>,
}

/// How the run ends after its report.
#[derive(Clone, Copy, Debug)]
pub enum AtEnd {
    /// Through isa-debug-exit (QEMU) or the shutdown port (Bochs).
    Exit,
    /// Halt with interrupts off, so that the harness can read guest memory from the emulator
    /// before it ends the emulator itself (`hold` on the command line).
    Hold,
}

/// What the command line asks of the run.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// How the run ends.
    pub at_end: AtEnd,
    /// Guest-physical address of a 32-bit progress counter to report (`probe=0x...`).
    pub probe: Option<u64>,
    /// How long the guest runs once the migration is complete (`after-end-ms=N`).
    pub run_after_end_ms: u64,
    /// After a break, how long to wait for the source to come back (`recover-timeout-ms=N`);
    /// `None`: for ever.
    pub recover_timeout_ms: Option<u64>,
}

/// The timestamps of the stream, for its rate.
#[derive(Default)]
struct StreamClock {
    first_byte: Option<u64>,
    /// TSC and stream bytes when the guest started here (RUN).
    run: Option<(u64, u64)>,
    complete: Option<u64>,
    last_progress: u64,
}

/// Receives a migration from `stream` (its return path `rp`) and runs the guest on a vCPU of
/// vendor `V`, which `make` creates for the stage-2 table's root pointer (nCR3 or EPTP), with
/// where the table's flushes go; never returns.
pub fn migrate<V: Vcpu, S: StreamIn, R: ReturnPath>(
    make: impl FnOnce(u64) -> (V, V::Invalidate),
    mut stream: S,
    rp: impl Fn() -> R,
    transport: &'static str,
    opts: Options,
) -> ! {
    let shared = Shared::new(&RECEIVED, &REQUESTED, rp());
    // SAFETY: the slab is used by this one table only.
    let slab = unsafe { &mut *core::ptr::addr_of_mut!(TABLE_SLAB) };
    let table =
        Stage2::<V::Format>::new(FramePool::identity(slab).expect("table slab")).expect("stage-2 root");
    let (mut vcpu, invalidate) = make(table.root_pointer());
    // The vendor's names, for the log.
    let (stage2_exit, entry) =
        if V::VENDOR == "vmx" { ("EPT violation", "VMRESUME") } else { ("#NPF", "VMRUN") };
    static mut DEVICE_STATE: [u8; DEVICE_STATE_BYTES] = [0; DEVICE_STATE_BYTES];
    // SAFETY: this static is borrowed here once, for the life of the loop.
    let device_state = unsafe { &mut *core::ptr::addr_of_mut!(DEVICE_STATE) };
    let ports = ImagePorts::new(TablePort::new(table, invalidate), device_state);
    let mut engine = Engine::new(&shared, ports, EngineConfig::default());
    let mut guest = GuestState::default();
    let mut devices = Devices::default();
    let (mut exit_to_request, mut page_to_resume) = (Samples::new(), Samples::new());
    let mut latency = Latency::new();
    let mut clock = StreamClock::default();
    let mut arrival: Option<u64> = None;
    let mut run_until: Option<u64> = None;
    let mut breaks: heapless::Vec<Recovered, 8> = heapless::Vec::new();
    let mut paused_since: Option<u64> = None;
    // The harness waits for this line before it connects (COM1's set-up resets its FIFO).
    let _ = writeln!(Console, "waiting for the migration stream on {transport}");
    defmt::info!("waiting for the migration stream on {=str}", transport);
    loop {
        let poll = stream.poll();
        if !engine.finished() {
            let cut = match poll {
                Poll::Data => {
                    clock.first_byte.get_or_insert_with(hal::cpu::rdtsc);
                    let consumed = receive(&mut engine, &mut stream, &shared, V::VENDOR, opts.at_end);
                    // A record the break cut short stays unconsumed: that is the end of it.
                    consumed == 0 && stream.closed()
                }
                Poll::Closed => true,
                Poll::Reconnected => {
                    shared.reconnect(rp());
                    engine.reconnected();
                    if let (Some(since), Some(last)) = (paused_since.take(), breaks.last_mut()) {
                        last.paused_cycles = hal::cpu::rdtsc() - since;
                    }
                    defmt::info!("postcopy recovery: the source reconnected; resuming");
                    false
                }
                Poll::Nothing => false,
            };
            if cut && paused_since.is_none() {
                match engine.connection_lost() {
                    Ok(brk) if stream.listen_again() => {
                        defmt::info!(
                            "postcopy recovery: connection lost after RUN: PAUSED at stream offset {=u64}, {=u64} pages missing; listening again",
                            brk.offset,
                            brk.missing_pages
                        );
                        paused_since = Some(hal::cpu::rdtsc());
                        let _ = breaks.push(Recovered { brk, paused_cycles: 0 });
                    }
                    Ok(_) => {
                        let e = agent::Error::new(
                            engine.stats().bytes,
                            agent::Field::EndOfStream,
                            agent::Defect::Truncated,
                        );
                        report_error(V::VENDOR, &e, &shared, engine.stats().bytes, opts.at_end)
                    }
                    Err(e) => report_error(V::VENDOR, &e, &shared, engine.stats().bytes, opts.at_end),
                }
            }
            if engine.finished() {
                let now = hal::cpu::rdtsc();
                clock.complete = Some(now);
                run_until = Some(now + opts.run_after_end_ms * 1000 * latency::calibrate());
                defmt::info!("migration complete: the guest runs {=u64} ms more", opts.run_after_end_ms);
                stream.finish();
            }
        }
        if let (Some(since), Some(ms)) = (paused_since, opts.recover_timeout_ms) {
            if hal::cpu::rdtsc() - since > ms * 1000 * latency::calibrate() {
                let missing = breaks.last().map_or(0, |b| b.brk.missing_pages);
                defmt::error!("postcopy recovery: the source did not come back within {=u64} ms", ms);
                let _ = writeln!(
                    Console,
                    "RESULT {{\"state\":\"error\",\"vendor\":\"{}\",\"postcopy_state\":\"{}\",\"stream_bytes\":{},\"error\":\"the source did not come back within {ms} ms of the break: the migration is PAUSED with {missing} pages missing\"}}",
                    V::VENDOR,
                    shared.state.get().name(),
                    engine.stats().bytes,
                );
                end(opts.at_end, Code::Failure)
            }
        }
        progress(&mut clock, &engine, &shared, guest.faults_served);
        if let Some(t) = engine.ports().released.take() {
            guest.parked = false;
            arrival = Some(t);
        }
        let state = shared.state.get();
        if clock.run.is_none() && matches!(state, State::Running) {
            clock.run = Some((hal::cpu::rdtsc(), engine.stats().bytes));
        }
        if !guest.restored && (matches!(state, State::Running | State::End) || engine.finished()) {
            match guest::restore(engine.ports().device_state()) {
                Ok(restored) => {
                    vcpu.load(&restored.state);
                    devices = restored.devices;
                    guest.kind = Some(restored.kind);
                    defmt::info!(
                        "vCPU 0 restored from {=str}: RIP {=u64:#x}, CR0 {=u64:#x}, CR3 {=u64:#x}",
                        restored.kind.name(),
                        restored.state.rip,
                        restored.state.cr0,
                        restored.state.cr3
                    );
                }
                Err(e) => {
                    defmt::error!("no vCPU to run: {=str}", e.as_str());
                    guest.done = true;
                    guest.stopped = Some(e);
                }
            }
            guest.restored = true;
            devices.resume(hal::cpu::rdtsc());
        }
        if run_until.is_some_and(|t| hal::cpu::rdtsc() >= t) && !guest.done {
            guest.done = true;
            defmt::info!("the guest ran its time after the migration: stopped");
        }
        if guest.restored && !guest.parked && !guest.done {
            let resumed = arrival.take().map(|t| (t, hal::cpu::rdtsc()));
            let reason = vcpu.run(engine.ports().stage2.invalidate());
            let at_exit = hal::cpu::rdtsc();
            // Logged after the entry, so that the log's own cost stays out of the sample.
            if let Some((t, now)) = resumed {
                page_to_resume.add(t, now);
                if let Some(since) = guest.blocked_since.take() {
                    latency.add(now - since);
                }
                let n = guest.stage2_faults;
                defmt::info!("fault {=u64}: page arrived, mapped, vCPU 0 released", n);
                defmt::info!(
                    "fault {=u64}: {=str} resumed vCPU 0, {=u64} cycles after the arrival",
                    n,
                    entry,
                    now - t
                );
            }
            guest.exits += 1;
            match reason {
                ExitReason::Interrupt => {
                    // SAFETY: the IDT handles the timer and spurious vectors.
                    unsafe { hal::cpu::interrupt_window() }
                }
                ExitReason::NestedPageFault { gpa, access } => {
                    guest.stage2_faults += 1;
                    let n = guest.stage2_faults;
                    let fault = shared.on_guest_fault(gpa, access, 0);
                    let now = hal::cpu::rdtsc();
                    let rip = vcpu.rip();
                    let kind = match access {
                        Access::Read => "read",
                        Access::Write => "write",
                        Access::Execute => "fetch",
                    };
                    defmt::info!(
                        "fault {=u64}: {=str} exit, GPA {=u64:#x}, {=str}, guest RIP {=u64:#x}",
                        n,
                        stage2_exit,
                        gpa,
                        kind,
                        rip
                    );
                    match fault {
                        Ok(Fault::Resume) => {
                            guest.faults_served += 1;
                            defmt::info!("fault {=u64}: the page is there: resume", n);
                        }
                        Ok(Fault::Wait { block, offset }) => {
                            exit_to_request.add(at_exit, now);
                            guest.faults_served += 1;
                            guest.parked = true;
                            guest.blocked_since = Some(at_exit);
                            defmt::info!(
                                "fault {=u64}: page request for block {=usize} offset {=u64:#x} sent, {=u64} cycles after the exit; vCPU 0 parked",
                                n,
                                block,
                                offset,
                                now - at_exit
                            );
                        }
                        Err(e) => {
                            defmt::error!(
                                "guest fault at {=u64:#x} refused: {}",
                                gpa,
                                defmt::Debug2Format(&e)
                            );
                            guest.done = true;
                            let mut why = StopReason::new();
                            let _ = write!(
                                why,
                                "{kind} of guest-physical {gpa:#x} at RIP {rip:#x}: outside guest RAM (MMIO the image does not emulate)"
                            );
                            guest.stopped = Some(why);
                        }
                    }
                }
                ExitReason::Hypercall if vcpu.regs().rax == GUEST_RESULT => {
                    let r = *vcpu.regs();
                    guest.result = Some(GuestResult { checksum: r.rbx, mismatches: r.rcx, written: r.rdx });
                    defmt::info!(
                        "guest result: checksum {=u64:#x}, {=u64} mismatches, {=u64} pages written",
                        r.rbx,
                        r.rcx,
                        r.rdx
                    );
                    vcpu.skip_instruction(&reason);
                }
                ExitReason::Cpuid => {
                    guest::cpuid(vcpu.regs());
                    vcpu.skip_instruction(&reason);
                }
                ExitReason::Hlt => {
                    vcpu.skip_instruction(&reason);
                    guest.done = true;
                }
                ExitReason::Io { port, write, size, string: false } => {
                    guest.io_exits += 1;
                    let regs = vcpu.regs();
                    match devices.io(port, write, size, regs.rax, hal::cpu::rdtsc()) {
                        IoResult::Done(value) => {
                            if let Some(v) = value {
                                let mask =
                                    if size >= 4 { u64::from(u32::MAX) } else { (1u64 << (8 * size)) - 1 };
                                regs.rax = (regs.rax & !mask) | (v & mask);
                            }
                            vcpu.skip_instruction(&reason);
                        }
                        IoResult::Unsupported(e) => {
                            let rip = vcpu.rip();
                            let mut why = StopReason::new();
                            let _ = write!(why, "I/O port {port:#x} at RIP {rip:#x}: {e}");
                            defmt::error!("guest stopped: {=str}", why.as_str());
                            guest.done = true;
                            guest.stopped = Some(why);
                        }
                        IoResult::NotEmulated => {
                            let rip = vcpu.rip();
                            let dir = if write { "OUT to" } else { "IN from" };
                            let mut why = StopReason::new();
                            let _ = write!(
                                why,
                                "{dir} I/O port {port:#x} ({size} bytes) at RIP {rip:#x}: a device the image does not emulate"
                            );
                            defmt::error!("guest stopped: {=str}", why.as_str());
                            guest.done = true;
                            guest.stopped = Some(why);
                        }
                    }
                }
                other => {
                    let rip = vcpu.rip();
                    defmt::error!(
                        "guest stopped: unhandled exit {} at RIP {=u64:#x}",
                        defmt::Debug2Format(&other),
                        rip
                    );
                    guest.done = true;
                    let mut why = StopReason::new();
                    let _ = write!(why, "an exit the image does not handle ({other:?}) at RIP {rip:#x}");
                    guest.stopped = Some(why);
                }
            }
        }
        if engine.finished() && guest.done {
            let stats = engine.stats();
            let blocks = engine.ports().blocks.clone();
            let table = engine.ports().stage2.table();
            let probe = opts.probe.and_then(|gpa| read_guest_u32(table, gpa));
            // Static: the list is too large for the stack.
            static mut WRITTEN: Written = Written::new();
            // SAFETY: reached once, at the end of the run.
            let written = unsafe { &mut *core::ptr::addr_of_mut!(WRITTEN) };
            written_pages(table, shared.layout(), written);
            let report = Report {
                breaks: &breaks,
                vendor: V::VENDOR,
                transport,
                stats,
                blocks: &blocks,
                guest: &guest,
                latency: &latency,
                clock: &clock,
                sink: stream.sink(),
                probe,
                written,
            };
            report.write(&shared, &mut exit_to_request, &mut page_to_resume);
            let ok = guest.result.is_some() || guest.kind == Some(GuestKind::Qemu);
            end(opts.at_end, if ok { Code::Success } else { Code::Failure })
        }
    }
}

/// A break of the connection the migration recovered from (or is waiting to).
struct Recovered {
    brk: agent::postcopy::Break,
    /// TSC cycles until the source reconnected (0 while it has not).
    paused_cycles: u64,
}

/// Hands the transport's bytes to the engine; joins pieces when it is stuck on a record spread
/// over more than two. Returns the bytes consumed.
fn receive<P: agent::ports::StreamPorts, S: StreamIn, R: ReturnPath>(
    engine: &mut Engine<'_, '_, '_, R, P>,
    stream: &mut S,
    shared: &Shared<'_, R>,
    vendor: &str,
    at_end: AtEnd,
) -> usize {
    let mut total = 0;
    loop {
        let (first, second) = stream.readable();
        let waiting = first.len() + second.len();
        if waiting == 0 {
            return total;
        }
        match engine.receive(first, second) {
            Ok(p) => {
                stream.consume(p.consumed);
                total += p.consumed;
                if p.finished {
                    return total;
                }
                if p.consumed == 0 && !stream.stuck() {
                    return total;
                }
            }
            Err(e) => report_error(vendor, &e, shared, engine.stats().bytes, at_end),
        }
    }
}

/// Prints a `PROGRESS` line for the harness's live display, at most every 100 ms.
fn progress<P: agent::ports::StreamPorts, R: ReturnPath>(
    clock: &mut StreamClock,
    engine: &Engine<'_, '_, '_, R, P>,
    shared: &Shared<'_, R>,
    faults_served: u64,
) {
    let now = hal::cpu::rdtsc();
    if now.saturating_sub(clock.last_progress) < 100_000 * latency::calibrate() {
        return;
    }
    clock.last_progress = now;
    let s = engine.stats();
    let c = &shared.counters;
    let requests = c.requests.load(agent::sync::Ordering::Relaxed);
    let _ = writeln!(
        Console,
        "PROGRESS {{\"bytes\":{},\"pages_received\":{},\"discarded_pages\":{},\"page_requests\":{},\"faults_served\":{},\"state\":\"{}\"}}",
        s.bytes,
        s.pages + s.zero_pages,
        s.discarded_pages,
        requests,
        faults_served,
        shared.state.get().name()
    );
}

/// The 32-bit value at guest-physical `gpa`, through the stage-2 table (`None` if unmapped).
fn read_guest_u32<F: hal::stage2::Format>(table: &Stage2<'_, F>, gpa: u64) -> Option<u32> {
    let t = table.translate(Gpa(gpa))?;
    // SAFETY: the guest does not run now; the translation leads into the guest frames.
    let bytes = unsafe { frames_mut(t.hpa.0, 4) };
    Some(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

/// Pages the guest wrote since RUN, from the stage-2 dirty bits (NPT sets them on every guest
/// write; the engine's own writes go to the frames directly and leave them clear): one bit per
/// 4 KiB frame of the guest frames region.
fn written_pages<F: hal::stage2::Format>(
    table: &Stage2<'_, F>,
    layout: Option<&agent::layout::Layout>,
    w: &mut Written,
) {
    let Some(layout) = layout else {
        return;
    };
    for r in layout.regions() {
        let mut gpa = r.gpa;
        while gpa < r.gpa + r.len {
            if let Some(t) = table.translate(Gpa(gpa)).filter(|t| t.dirty) {
                w.add(t.hpa.0);
            }
            gpa += 4096;
        }
    }
}

/// Frames the guest wrote: one bit per 4 KiB frame from [`FRAMES_BASE`].
struct Written {
    count: u64,
    bits: [u64; BITMAP_WORDS],
}

impl Written {
    const fn new() -> Self {
        Self { count: 0, bits: [0; BITMAP_WORDS] }
    }

    fn add(&mut self, hpa: u64) {
        let frame = ((hpa - FRAMES_BASE) / 4096) as usize;
        if let Some(word) = self.bits.get_mut(frame / 64) {
            if *word & (1 << (frame % 64)) == 0 {
                *word |= 1 << (frame % 64);
                self.count += 1;
            }
        }
    }
}

/// Everything the final report says.
struct Report<'a> {
    breaks: &'a [Recovered],
    vendor: &'a str,
    transport: &'a str,
    stats: agent::postcopy::Stats,
    blocks: &'a [(u64, u64)],
    guest: &'a GuestState,
    latency: &'a Latency,
    clock: &'a StreamClock,
    sink: Option<(u64, u64)>,
    probe: Option<u32>,
    written: &'a Written,
}

impl Report<'_> {
    /// One `RESULT {json}` line.
    fn write<R: ReturnPath>(
        &self,
        shared: &Shared<'_, R>,
        exit_to_request: &mut Samples,
        page_to_resume: &mut Samples,
    ) {
        let c = &shared.counters;
        let load = |a: &agent::sync::AtomicU64| a.load(agent::sync::Ordering::Relaxed);
        let (s, guest) = (&self.stats, self.guest);
        let mut w = Console;
        let _ = write!(
            w,
            "RESULT {{\"state\":\"{}\",\"vendor\":\"{}\",\"transport\":\"{}\",\"stage2_faults\":{},\"faults_served\":{},\"page_requests\":{},\
             \"pages_received\":{},\"zero_pages\":{},\"discarded_pages\":{},\"duplicate_pages\":{},\"stream_bytes\":{},\
             \"guest_exits\":{},\"guest_io_exits\":{},\"fault_exit_to_request_cycles_p50\":{},\"fault_exit_to_request_cycles_p99\":{},\
             \"page_to_resume_cycles_p50\":{},\"page_to_resume_cycles_p99\":{},\"fault_samples\":{},\"tsc_cycles_per_us\":{},",
            shared.state.get().name(),
            self.vendor,
            self.transport,
            guest.stage2_faults,
            guest.faults_served,
            load(&c.requests),
            s.pages + s.zero_pages,
            s.zero_pages,
            s.discarded_pages,
            s.duplicate_pages,
            s.bytes,
            guest.exits,
            guest.io_exits,
            exit_to_request.percentile(50),
            exit_to_request.percentile(99),
            page_to_resume.percentile(50),
            page_to_resume.percentile(99),
            exit_to_request.count(),
            latency::calibrate(),
        );
        let _ = self.latency.json(&mut w);
        let rate = |bytes: u64, cycles: u64| bytes as f64 / (latency::ns(cycles).max(1) as f64 / 1e9) / 1e6;
        if let (Some(a), Some(b)) = (self.clock.first_byte, self.clock.complete) {
            let _ = write!(
                w,
                ",\"stream_seconds\":{:.3},\"stream_mb_per_s\":{:.2}",
                latency::ns(b - a) as f64 / 1e9,
                rate(s.bytes, b - a)
            );
        }
        if let (Some((t, bytes)), Some(b)) = (self.clock.run, self.clock.complete) {
            let n = s.bytes - bytes;
            let _ = write!(
                w,
                ",\"postcopy_stream_bytes\":{n},\"postcopy_seconds\":{:.3},\"postcopy_mb_per_s\":{:.2}",
                latency::ns(b - t) as f64 / 1e9,
                rate(n, b - t)
            );
        }
        match self.sink {
            Some((bytes, cycles)) => {
                let _ = write!(w, ",\"sink\":{{\"bytes\":{bytes},\"mb_per_s\":{:.2}}}", rate(bytes, cycles));
            }
            None => {
                let _ = write!(w, ",\"sink\":null");
            }
        }
        let _ = write!(w, ",\"guest_kind\":\"{}\"", guest.kind.map_or("none", |k| k.name()));
        let _ = write!(w, ",\"breaks\":[");
        for (i, b) in self.breaks.iter().enumerate() {
            let section = b.brk.open_ram_section.map_or(-1, i64::from);
            let _ = write!(
                w,
                "{}{{\"offset\":{},\"open_ram_section\":{},\"eos_read\":{},\"missing_pages\":{},\"paused_ms\":{}}}",
                if i == 0 { "" } else { "," },
                b.brk.offset,
                section,
                b.brk.eos_read,
                b.brk.missing_pages,
                latency::ns(b.paused_cycles) / 1_000_000
            );
        }
        let _ = write!(
            w,
            "],\"resent_requests\":{}",
            shared.counters.resent_requests.load(agent::sync::Ordering::Relaxed)
        );
        match self.probe {
            Some(v) => {
                let _ = write!(w, ",\"probe_value\":{v}");
            }
            None => {
                let _ = write!(w, ",\"probe_value\":null");
            }
        }
        // Little-endian u64 words as 16 hex digits each, up to the last non-zero one.
        let _ = write!(
            w,
            ",\"guest_written_pages\":{},\"frames_base\":{FRAMES_BASE},\"guest_written_frames\":\"",
            self.written.count
        );
        let last = self.written.bits.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        for word in &self.written.bits[..last] {
            let _ = write!(w, "{word:016x}");
        }
        let _ = write!(w, "\"");
        match guest.result {
            Some(r) => {
                let _ = write!(
                    w,
                    ",\"guest_result\":{{\"checksum\":{},\"mismatches\":{},\"written\":{}}}",
                    r.checksum, r.mismatches, r.written
                );
            }
            None => {
                let _ = write!(w, ",\"guest_result\":null");
            }
        }
        match &guest.stopped {
            Some(why) => {
                let _ = write!(w, ",\"guest_stopped\":\"{why}\"");
            }
            None => {
                let _ = write!(w, ",\"guest_stopped\":null");
            }
        }
        let _ = write!(w, ",\"blocks\":[");
        let layout = shared.layout();
        for (i, &(hpa, len)) in self.blocks.iter().enumerate() {
            let name =
                layout.and_then(|l| l.blocks().get(i)).map(|b| core::str::from_utf8(&b.name).unwrap_or("?"));
            let sep = if i == 0 { "" } else { "," };
            let _ = write!(w, "{sep}{{\"name\":\"{}\",\"hpa\":{hpa},\"len\":{len}}}", name.unwrap_or("?"));
        }
        let _ = writeln!(w, "],\"error\":null}}");
    }
}

fn end(at_end: AtEnd, code: Code) -> ! {
    match at_end {
        AtEnd::Exit => exit(code),
        AtEnd::Hold => loop {
            hal::cpu::hlt();
        },
    }
}

/// A refused stream: the agent has sent SHUT(1); report its one-line error and end.
fn report_error<R: ReturnPath>(
    vendor: &str,
    e: &agent::Error,
    shared: &Shared<'_, R>,
    bytes: u64,
    at_end: AtEnd,
) -> ! {
    defmt::error!("stream refused, SHUT(1) sent: {}", defmt::Display2Format(e));
    let _ = writeln!(
        Console,
        "RESULT {{\"state\":\"error\",\"vendor\":\"{vendor}\",\"postcopy_state\":\"{}\",\"stream_bytes\":{bytes},\"error\":\"{e}\"}}",
        shared.state.get().name(),
    );
    end(at_end, Code::Failure)
}

//! The main loop: bytes from COM1 into the receive ring and through the agent; after RUN, the
//! guest vCPU runs, and its stage-2 faults become page requests; a parked vCPU runs again once
//! its page is mapped. Ends with a one-line report (`RESULT {json}`) on the debug console.

use core::fmt::Write;

use agent::postcopy::{Engine, EngineConfig, Fault, Shared, State};
use agent::sync::AtomicU64;
use hal::serial::{Uart, COM1};
use hal::stage2::port::TablePort;
use hal::stage2::{FramePool, Stage2};
use hal::virt::{Access, ExitReason, Vcpu};

use crate::console::Console;
use crate::cycles::Samples;
use crate::exit::{exit, Code};
use crate::guest;
use crate::memory::{FRAMES_LEN, TABLE_SLAB};
use crate::platform::{ImagePorts, DEVICE_STATE_BYTES};
use crate::transport::{Ring, SerialReturnPath, RING_BYTES};

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

/// The guest vCPU's progress.
#[derive(Default)]
struct GuestState {
    restored: bool,
    parked: bool,
    /// Stopped for good: its result came, it halted, or it did something the image does not
    /// emulate (`stopped`).
    done: bool,
    stopped: Option<&'static str>,
    result: Option<GuestResult>,
    stage2_faults: u64,
    faults_served: u64,
    exits: u64,
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

/// Receives a migration over COM1 and runs the guest on a vCPU of vendor `V`, which `make`
/// creates for the stage-2 table's root pointer (nCR3 or EPTP), with where the table's flushes
/// go; never returns.
pub fn migrate<V: Vcpu>(make: impl FnOnce(u64) -> (V, V::Invalidate), at_end: AtEnd) -> ! {
    // SAFETY: COM1 is the stream's 16550; this is its only set-up, and the two handles are
    // used from this one loop.
    let (mut rx, tx) = unsafe { (Uart::init(COM1), Uart::attach(COM1)) };
    let shared = Shared::new(&RECEIVED, &REQUESTED, SerialReturnPath(tx));
    // SAFETY: the slab is used by this one table only.
    let slab = unsafe { &mut *core::ptr::addr_of_mut!(TABLE_SLAB) };
    let table =
        Stage2::<V::Format>::new(FramePool::identity(slab).expect("table slab")).expect("stage-2 root");
    let (mut vcpu, invalidate) = make(table.root_pointer());
    // The vendor's names, for the log.
    let (stage2_exit, entry) =
        if V::VENDOR == "vmx" { ("EPT violation", "VMRESUME") } else { ("#NPF", "VMRUN") };
    static mut DEVICE_STATE: [u8; DEVICE_STATE_BYTES] = [0; DEVICE_STATE_BYTES];
    static mut RING_BUF: [u8; RING_BYTES] = [0; RING_BYTES];
    // SAFETY: these statics are borrowed here once, for the life of the loop.
    let (device_state, ring_buf) =
        unsafe { (&mut *core::ptr::addr_of_mut!(DEVICE_STATE), &mut *core::ptr::addr_of_mut!(RING_BUF)) };
    let ports = ImagePorts::new(TablePort::new(table, invalidate), device_state);
    let mut engine = Engine::new(&shared, ports, EngineConfig::default());
    let mut ring = Ring::new(ring_buf);
    let mut guest = GuestState::default();
    let (mut exit_to_request, mut page_to_resume) = (Samples::new(), Samples::new());
    let mut arrival: Option<u64> = None;
    // The harness waits for this line before it connects (COM1's set-up resets its FIFO).
    let _ = writeln!(Console, "waiting for the migration stream on COM1");
    defmt::info!("waiting for the migration stream on COM1");
    loop {
        ring.fill_from(&mut rx);
        if !engine.finished() && ring.len() > 0 {
            let (first, second) = ring.readable();
            match engine.receive(first, second) {
                Ok(p) => ring.consume(p.consumed),
                Err(e) => report_error(V::VENDOR, &e, &shared, engine.stats().bytes, at_end),
            }
        }
        if let Some(t) = engine.ports().released.take() {
            guest.parked = false;
            arrival = Some(t);
        }
        let state = shared.state.get();
        if !guest.restored && (matches!(state, State::Running | State::End) || engine.finished()) {
            match guest::vcpu_record(engine.ports().device_state()) {
                Ok(record) => {
                    vcpu.load(&guest::state(&record));
                    defmt::info!(
                        "vCPU 0 restored from the migrated record: RIP {=u64:#x}, CR3 {=u64:#x}",
                        record.rip.get(),
                        record.cr3.get()
                    );
                }
                Err(e) => {
                    defmt::error!("no vCPU to run: {=str}", e);
                    guest.done = true;
                    guest.stopped = Some(e);
                }
            }
            guest.restored = true;
        }
        if guest.restored && !guest.parked && !guest.done {
            let resumed = arrival.take().map(|t| (t, hal::cpu::rdtsc()));
            let reason = vcpu.run(engine.ports().stage2.invalidate());
            let at_exit = hal::cpu::rdtsc();
            // Logged after the VMRUN, so that the log's own cost stays out of the sample.
            if let Some((t, now)) = resumed {
                page_to_resume.add(t, now);
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
                            guest.stopped =
                                Some("a stage-2 fault the agent refused (outside guest RAM: MMIO)");
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
                ExitReason::Io { port: 0xe9, write: true, size: 1, string: false } => {
                    let byte = vcpu.regs().rax as u8;
                    let _ = write!(Console, "{}", byte as char);
                    vcpu.skip_instruction(&reason);
                }
                other => {
                    let rip = vcpu.rip();
                    defmt::error!(
                        "guest stopped: unhandled exit {} at RIP {=u64:#x}",
                        defmt::Debug2Format(&other),
                        rip
                    );
                    guest.done = true;
                    guest.stopped = Some("an exit the image does not emulate (see the log)");
                }
            }
        }
        if engine.finished() && guest.done {
            let stats = engine.stats();
            let blocks = engine.ports().blocks.clone();
            report(
                V::VENDOR,
                &shared,
                stats,
                &blocks,
                &guest,
                &mut exit_to_request,
                &mut page_to_resume,
                at_end,
            );
        }
    }
}

/// The final report: one `RESULT {json}` line.
#[allow(clippy::too_many_arguments)]
fn report(
    vendor: &str,
    shared: &Shared<'_, SerialReturnPath>,
    s: agent::postcopy::Stats,
    blocks: &[(u64, u64)],
    guest: &GuestState,
    exit_to_request: &mut Samples,
    page_to_resume: &mut Samples,
    at_end: AtEnd,
) -> ! {
    let c = &shared.counters;
    let load = |a: &agent::sync::AtomicU64| a.load(agent::sync::Ordering::Relaxed);
    let mut w = Console;
    let _ = write!(
        w,
        "RESULT {{\"state\":\"{}\",\"vendor\":\"{vendor}\",\"stage2_faults\":{},\"faults_served\":{},\"page_requests\":{},\
         \"pages_received\":{},\"zero_pages\":{},\"discarded_pages\":{},\"duplicate_pages\":{},\"stream_bytes\":{},\
         \"guest_exits\":{},\"fault_exit_to_request_cycles_p50\":{},\"fault_exit_to_request_cycles_p99\":{},\
         \"page_to_resume_cycles_p50\":{},\"page_to_resume_cycles_p99\":{},\"fault_samples\":{},",
        shared.state.get().name(),
        guest.stage2_faults,
        guest.faults_served,
        load(&c.requests),
        s.pages + s.zero_pages,
        s.zero_pages,
        s.discarded_pages,
        s.duplicate_pages,
        s.bytes,
        guest.exits,
        exit_to_request.percentile(50),
        exit_to_request.percentile(99),
        page_to_resume.percentile(50),
        page_to_resume.percentile(99),
        exit_to_request.count(),
    );
    match guest.result {
        Some(r) => {
            let _ = write!(
                w,
                "\"guest_result\":{{\"checksum\":{},\"mismatches\":{},\"written\":{}}},",
                r.checksum, r.mismatches, r.written
            );
        }
        None => {
            let _ = write!(w, "\"guest_result\":null,");
        }
    }
    match guest.stopped {
        Some(why) => {
            let _ = write!(w, "\"guest_stopped\":\"{why}\",");
        }
        None => {
            let _ = write!(w, "\"guest_stopped\":null,");
        }
    }
    let _ = write!(w, "\"blocks\":[");
    let layout = shared.layout();
    for (i, &(hpa, len)) in blocks.iter().enumerate() {
        let name =
            layout.and_then(|l| l.blocks().get(i)).map(|b| core::str::from_utf8(&b.name).unwrap_or("?"));
        let sep = if i == 0 { "" } else { "," };
        let _ = write!(w, "{sep}{{\"name\":\"{}\",\"hpa\":{hpa},\"len\":{len}}}", name.unwrap_or("?"));
    }
    let _ = writeln!(w, "],\"error\":null}}");
    end(at_end, if guest.result.is_some() { Code::Success } else { Code::Failure })
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
fn report_error(
    vendor: &str,
    e: &agent::Error,
    shared: &Shared<'_, SerialReturnPath>,
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

//! The guest vCPU's state from the migrated device state, and the CPUID it sees.
//!
//! Two kinds of guest arrive: the project's pattern guest, whose source sends the project's
//! own vCPU record (`postcopy/vcpu`), and a real QEMU 7.2 VM, whose vCPU is QEMU's `cpu` device
//! (with `cpu_common`), restored with its PIT (`i8254`) at the virtual time the source stopped
//! (`timer`).

use core::fmt::Write;

use agent::qemu_state::{CpuCommon, Device, Segment, Timers, X86Cpu, I8254};
use agent::wire::vcpu::VcpuRecord;
use agent::wire::Parsed;
use hal::virt::{ArchState, GuestRegs, SegmentState};

use crate::devices::Devices;
use crate::run::StopReason;

/// Where the vCPU came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestKind {
    /// The project's pattern guest (the project's vCPU record).
    Pattern,
    /// A QEMU 7.2 VM (QEMU's `cpu` device state).
    Qemu,
}

impl GuestKind {
    /// The name in the report.
    pub fn name(self) -> &'static str {
        match self {
            GuestKind::Pattern => "pattern",
            GuestKind::Qemu => "qemu",
        }
    }
}

/// A vCPU ready to run, and the devices it polls.
pub struct Restored {
    /// Its architectural state.
    pub state: ArchState,
    /// Which kind of guest.
    pub kind: GuestKind,
    /// Its emulated devices.
    pub devices: Devices,
}

/// The vCPU (vCPU 0) and its devices from the migrated device state.
// Called once, at RUN; there is no heap to box the reason in.
#[allow(clippy::result_large_err)]
pub fn restore(device_state: &[u8]) -> Result<Restored, StopReason> {
    if let Ok(record) = vcpu_record(device_state) {
        return Ok(Restored { state: state(&record), kind: GuestKind::Pattern, devices: Devices::default() });
    }
    let fail = |what: &str, e: &dyn core::fmt::Display| {
        let mut why = StopReason::new();
        let _ = write!(why, "{what}: {e}");
        why
    };
    let cpu = match X86Cpu::find(device_state, 0) {
        Ok(Some(cpu)) => cpu,
        Ok(None) => {
            let mut why = StopReason::new();
            let _ = why.push_str(
                "the device state holds no vCPU (neither the project's record nor QEMU's cpu device)",
            );
            return Err(why);
        }
        Err(e) => return Err(fail("QEMU's cpu device state", &e)),
    };
    let common = CpuCommon::find(device_state, 0).map_err(|e| fail("QEMU's cpu_common device state", &e))?;
    if common.is_some_and(|c| c.halted != 0) {
        let mut why = StopReason::new();
        let _ = why.push_str(
            "the vCPU was halted at migration, waiting for an interrupt the image does not deliver",
        );
        return Err(why);
    }
    let timers = Timers::find(device_state, 0).map_err(|e| fail("QEMU's timer state", &e))?;
    let pit = I8254::find(device_state, 0).map_err(|e| fail("QEMU's i8254 state", &e))?;
    let clock = timers.map_or(0, |t| t.clock_at_stop_ns());
    let mut devices = Devices::at_clock(clock);
    if let Some(pit) = pit {
        devices.pit =
            Some(hal::pit::Pit::from_migrated(&pit, clock).map_err(|e| fail("QEMU's i8254 state", &e))?);
    }
    Ok(Restored { state: qemu_state(&cpu), kind: GuestKind::Qemu, devices })
}

/// QEMU's segment (its `flags` are the descriptor's high dword) in SVM's compact attributes:
/// type, S, DPL, P from bits 8-15, AVL, L, D/B, G from bits 20-23.
fn qemu_segment(s: &Segment) -> SegmentState {
    SegmentState {
        selector: s.selector as u16,
        attrib: (((s.flags >> 8) & 0xff) | ((s.flags >> 12) & 0xf00)) as u16,
        limit: s.limit,
        base: s.base,
    }
}

/// The general registers (RSP aside) from the sixteen in their encoding order (RAX, RCX, RDX,
/// RBX, RSP, RBP, RSI, RDI, R8-R15), the order of both QEMU's `regs[]` and the project's record.
fn gprs(g: impl Fn(usize) -> u64) -> GuestRegs {
    GuestRegs {
        rax: g(0),
        rcx: g(1),
        rdx: g(2),
        rbx: g(3),
        rbp: g(5),
        rsi: g(6),
        rdi: g(7),
        r8: g(8),
        r9: g(9),
        r10: g(10),
        r11: g(11),
        r12: g(12),
        r13: g(13),
        r14: g(14),
        r15: g(15),
    }
}

/// The architectural state of QEMU's vCPU.
fn qemu_state(c: &X86Cpu) -> ArchState {
    let g = |i: usize| c.regs[i];
    let regs = gprs(g);
    ArchState {
        regs,
        rsp: g(4),
        rip: c.rip,
        rflags: c.rflags,
        cr0: c.cr0,
        cr2: c.cr2,
        cr3: c.cr3,
        cr4: c.cr4,
        efer: c.efer,
        segs: c.segs.map(|s| qemu_segment(&s)),
        ldtr: qemu_segment(&c.ldt),
        tr: Some(qemu_segment(&c.tr)),
        gdtr: (c.gdt.base, c.gdt.limit),
        idtr: (c.idt.base, c.idt.limit),
    }
}

/// Finds the project's vCPU record (vCPU 0) at the start of the migrated device state.
fn vcpu_record(device_state: &[u8]) -> Result<VcpuRecord, &'static str> {
    match VcpuRecord::parse_section(device_state) {
        Ok(Parsed::Done(Some((0, record)), _)) => Ok(record),
        Ok(Parsed::Done(Some(_), _)) => Err("the device state holds a vCPU record for another vCPU first"),
        Ok(Parsed::Done(None, _)) => Err("the device state does not start with the project's vCPU record"),
        Ok(Parsed::Need(_)) => Err("the device state ends inside the vCPU record"),
        Err(_) => Err("the vCPU record is malformed"),
    }
}

fn segment(s: &agent::wire::vcpu::Segment) -> SegmentState {
    SegmentState {
        selector: s.selector.get(),
        attrib: s.attrib.get(),
        limit: s.limit.get(),
        base: s.base.get(),
    }
}

/// The architectural state the record describes (vendor-neutral; each backend loads it).
fn state(r: &VcpuRecord) -> ArchState {
    let g = |i: usize| r.gprs[i].get();
    let regs = gprs(g);
    ArchState {
        regs,
        rsp: g(4),
        rip: r.rip.get(),
        rflags: r.rflags.get(),
        cr0: r.cr0.get(),
        cr3: r.cr3.get(),
        cr4: r.cr4.get(),
        efer: r.efer.get(),
        cr2: 0,
        segs: {
            let (cs, data) = (segment(&r.cs), segment(&r.data));
            [data, cs, data, data, data, data]
        },
        ldtr: SegmentState::default(),
        tr: None,
        gdtr: (r.gdtr_base.get(), r.gdtr_limit.get()),
        idtr: (r.idtr_base.get(), r.idtr_limit.get()),
    }
}

/// Executes CPUID for the guest: the host's answer without SVM or VMX (the guest cannot nest)
/// and with the hypervisor-present bit.
pub fn cpuid(regs: &mut GuestRegs) {
    let (leaf, sub) = (regs.rax as u32, regs.rcx as u32);
    let (mut a, b, mut c, d) = hal::cpu::cpuid(leaf, sub);
    match leaf {
        1 => c = (c | 1 << 31) & !(1 << 5),
        0x8000_0001 => c &= !(1 << 2),
        0x8000_000a => a = 0,
        _ => {}
    }
    regs.rax = u64::from(a);
    regs.rbx = u64::from(b);
    regs.rcx = u64::from(c);
    regs.rdx = u64::from(d);
}

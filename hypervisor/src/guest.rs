//! The guest vCPU's state from the migrated vCPU record, and the CPUID it sees.

use agent::wire::vcpu::VcpuRecord;
use agent::wire::Parsed;
use hal::virt::{ArchState, GuestRegs, SegmentState};

/// Finds the project's vCPU record (vCPU 0) at the start of the migrated device state.
pub fn vcpu_record(device_state: &[u8]) -> Result<VcpuRecord, &'static str> {
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
pub fn state(r: &VcpuRecord) -> ArchState {
    let g = |i: usize| r.gprs[i].get();
    let regs = GuestRegs {
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
    };
    ArchState {
        regs,
        rsp: g(4),
        rip: r.rip.get(),
        rflags: r.rflags.get(),
        cr0: r.cr0.get(),
        cr3: r.cr3.get(),
        cr4: r.cr4.get(),
        efer: r.efer.get(),
        cs: segment(&r.cs),
        data: segment(&r.data),
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

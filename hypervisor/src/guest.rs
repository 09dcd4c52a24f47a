//! The guest vCPU: restored from the migrated vCPU record, and the exits it takes.

use agent::wire::vcpu::VcpuRecord;
use agent::wire::Parsed;
use hal::virt::svm::vcpu::{SvmVcpu, TSS64};
use hal::virt::svm::vmcb::Segment;

const EFER_SVME: u64 = 1 << 12;

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

fn segment(s: &agent::wire::vcpu::Segment) -> Segment {
    Segment { selector: s.selector.get(), attrib: s.attrib.get(), limit: s.limit.get(), base: s.base.get() }
}

/// Loads the record into the vCPU: the registers, RIP, RFLAGS, control registers, EFER (with
/// SVME, which SVM requires), segments and descriptor tables; TR is a busy 64-bit TSS at 0.
pub fn restore(vcpu: &mut SvmVcpu, r: &VcpuRecord) {
    let g = |i: usize| r.gprs[i].get();
    vcpu.regs.rcx = g(1);
    vcpu.regs.rdx = g(2);
    vcpu.regs.rbx = g(3);
    vcpu.regs.rbp = g(5);
    vcpu.regs.rsi = g(6);
    vcpu.regs.rdi = g(7);
    vcpu.regs.r8 = g(8);
    vcpu.regs.r9 = g(9);
    vcpu.regs.r10 = g(10);
    vcpu.regs.r11 = g(11);
    vcpu.regs.r12 = g(12);
    vcpu.regs.r13 = g(13);
    vcpu.regs.r14 = g(14);
    vcpu.regs.r15 = g(15);
    let v = vcpu.vmcb();
    v.rax = g(0);
    v.rsp = g(4);
    v.rip = r.rip.get();
    v.rflags = r.rflags.get() | 2;
    v.cr0 = r.cr0.get();
    v.cr3 = r.cr3.get();
    v.cr4 = r.cr4.get();
    v.efer = r.efer.get() | EFER_SVME;
    v.cs = segment(&r.cs);
    let data = segment(&r.data);
    for s in [&mut v.ds, &mut v.es, &mut v.ss, &mut v.fs, &mut v.gs] {
        *s = data;
    }
    v.gdtr = Segment { selector: 0, attrib: 0, limit: r.gdtr_limit.get(), base: r.gdtr_base.get() };
    v.idtr = Segment { selector: 0, attrib: 0, limit: r.idtr_limit.get(), base: r.idtr_base.get() };
    v.tr = Segment { selector: 0, attrib: TSS64, limit: 0x67, base: 0 };
    v.cpl = 0;
}

/// Executes CPUID for the guest: the host's answer without SVM (the guest cannot nest) and
/// with the hypervisor-present bit.
pub fn cpuid(vcpu: &mut SvmVcpu) {
    let (leaf, sub) = (vcpu.vmcb().rax as u32, vcpu.regs.rcx as u32);
    let (mut a, b, mut c, d) = hal::cpu::cpuid(leaf, sub);
    match leaf {
        1 => c |= 1 << 31,
        0x8000_0001 => c &= !(1 << 2),
        0x8000_000a => a = 0,
        _ => {}
    }
    vcpu.vmcb().rax = u64::from(a);
    vcpu.regs.rbx = u64::from(b);
    vcpu.regs.rcx = u64::from(c);
    vcpu.regs.rdx = u64::from(d);
}

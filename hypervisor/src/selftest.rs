//! A self-test of the SVM path with a guest built in place: 32-bit protected mode, paging off
//! (nested paging still applies), code at guest-physical 0x1000 reading 0x2000, which is not
//! mapped: the #NPF must name 0x2000; once it is mapped, the guest's VMMCALL must carry the
//! value there.

use core::fmt::Write;

use hal::stage2::invalidate::{NextVmrunFlush, TlbControl};
use hal::stage2::{FramePool, Gpa, Hpa, Npt, Perms, Stage2};
use hal::virt::svm::vcpu::{self, flat, SvmVcpu, DATA, TSS64};
use hal::virt::svm::vmcb::Segment;
use hal::virt::{Access, ExitReason};

use crate::console::Console;
use crate::memory::{frames_mut, FRAMES_BASE, TABLE_SLAB};
use crate::svm_pages;

/// Runs the self-test; `Err` names what went wrong.
pub fn run() -> Result<(), &'static str> {
    let features = vcpu::features().map_err(|_| "SVM with nested paging is not available")?;
    let _ = writeln!(Console, "SVM: {features:?}");
    // SAFETY: the slab is used by this one table only.
    let slab = unsafe { &mut *core::ptr::addr_of_mut!(TABLE_SLAB) };
    let mut table = Stage2::<Npt>::new(FramePool::identity(slab).map_err(|_| "pool")?).map_err(|_| "root")?;
    let (code, data) = (FRAMES_BASE, FRAMES_BASE + 0x1000);
    // SAFETY: two frames nobody else uses yet; the guest does not run.
    unsafe {
        let c = frames_mut(code, 16);
        // mov eax, [0x2000]; vmmcall; hlt
        c[..9].copy_from_slice(&[0xa1, 0x00, 0x20, 0x00, 0x00, 0x0f, 0x01, 0xd9, 0xf4]);
        frames_mut(data, 8).copy_from_slice(&0x1234_5678u64.to_le_bytes());
    }
    table.map_4k(Gpa(0x1000), Hpa(code), Perms::RWX).map_err(|_| "map")?.ignore();
    // SAFETY: the nested table maps guest frames only; SVM is not used elsewhere.
    let mut vcpu = unsafe { SvmVcpu::new(svm_pages(), features, table.root_pointer()) };
    let v = vcpu.vmcb();
    v.cs = Segment { selector: 8, attrib: 0xc9b, limit: 0xffff_ffff, base: 0 };
    for s in [&mut v.ds, &mut v.es, &mut v.ss] {
        *s = flat(0x10, DATA);
    }
    v.tr = Segment { selector: 0x18, attrib: TSS64, limit: 0x67, base: 0 };
    v.cr0 = 0x11;
    v.efer = 1 << 12;
    v.rflags = 2;
    v.rip = 0x1000;
    let exit = run_to_exit(&mut vcpu, TlbControl::DoNothing);
    let _ = writeln!(Console, "selftest exit 1: {exit:x?}");
    if exit != (ExitReason::NestedPageFault { gpa: 0x2000, access: Access::Read }) {
        return Err("the first exit is not a #NPF reading 0x2000");
    }
    let flush = table.map_4k(Gpa(0x2000), Hpa(data), Perms::RWX).map_err(|_| "map")?;
    let mut tlb = NextVmrunFlush::new(features.flush_by_asid);
    flush.flush(&mut tlb);
    let exit = run_to_exit(&mut vcpu, tlb.take());
    let rax = vcpu.vmcb().rax;
    let _ = writeln!(Console, "selftest exit 2: {exit:x?}, RAX {rax:#x}");
    if exit != ExitReason::Hypercall || rax != 0x1234_5678 {
        return Err("the second exit is not VMMCALL with the value read");
    }
    Ok(())
}

/// Runs the vCPU to its next exit that is not the host's timer.
fn run_to_exit(vcpu: &mut SvmVcpu, mut tlb: TlbControl) -> ExitReason {
    loop {
        match vcpu.run_with_tlb(core::mem::replace(&mut tlb, TlbControl::DoNothing)) {
            // SAFETY: the IDT handles the timer and spurious vectors.
            ExitReason::Interrupt => unsafe { hal::cpu::interrupt_window() },
            exit => return exit,
        }
    }
}

/// Recurses until the stack runs into its guard page (a page fault on the guard, reported as
/// a double fault from its own stack).
pub fn overflow(depth: u64) -> u64 {
    let frame = core::hint::black_box([depth; 64]);
    // A bound the compiler cannot see through, never reached: the guard page comes first.
    if depth == core::hint::black_box(u64::MAX) {
        return frame[0];
    }
    frame[0] + overflow(depth + 1)
}

//! A vCPU under SVM with nested paging (image only).
//!
//! The exit stub (`svm_run`) saves the host's callee-saved registers, `CLGI`, `VMSAVE`s the
//! host's hidden state (FS, GS, TR, LDTR and the syscall MSRs, which `VMRUN` does not
//! switch), loads the guest's general registers and hidden state (`VMLOAD`), sets RFLAGS.IF
//! (with GIF still clear, so nothing is delivered to the host; inside the guest a physical
//! interrupt exits, [`misc1::INTR`]) and runs the guest. After the exit it stores the guest's
//! registers, `VMSAVE`s the guest's hidden state, `VMLOAD`s the host's, clears IF and `STGI`s:
//! an interrupt that caused the exit stays pending until the caller opens a window for it.

use super::exit::{decode, instruction_len};
use super::vmcb::{misc1, misc2, Segment, Vmcb, NP_ENABLE, V_INTR_MASKING};
use crate::cpu::{cpuid, rdmsr, wrmsr};
use crate::stage2::invalidate::{NextVmrunFlush, TlbControl};
use crate::stage2::Npt;
use crate::virt::{
    load_guest_regs, pop_host_regs, push_host_regs, store_guest_regs, ArchState, ExitReason, GuestRegs,
    SegmentState, Vcpu,
};

const EFER: u32 = 0xc000_0080;
const EFER_NXE: u64 = 1 << 11;
const EFER_SVME: u64 = 1 << 12;
const VM_CR: u32 = 0xc001_0114;
const VM_CR_SVMDIS: u64 = 1 << 4;
const VM_HSAVE_PA: u32 = 0xc001_0117;

/// A 4 KiB page-aligned page.
#[repr(C, align(4096))]
#[derive(Debug)]
pub struct Page(pub [u8; 4096]);

impl Page {
    /// A zero page.
    pub const fn zeroed() -> Self {
        Self([0; 4096])
    }
}

/// What SVM offers on this CPU (CPUID 0x8000000A), with TCG's gaps in mind: QEMU TCG has
/// nested paging and VGIF, but no NRIP save, decode assists, clean bits or flush-by-ASID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// Number of ASIDs.
    pub asids: u32,
    /// Nested paging (EDX bit 0).
    pub nested_paging: bool,
    /// NRIP save (EDX bit 3): the VMCB gives the next RIP after an intercepted instruction.
    pub nrip_save: bool,
    /// VMCB clean bits (EDX bit 5).
    pub vmcb_clean: bool,
    /// Flush by ASID (EDX bit 6): TLB_CONTROL 3.
    pub flush_by_asid: bool,
    /// Decode assists (EDX bit 7).
    pub decode_assists: bool,
}

/// Why SVM cannot be used here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// CPUID 0x80000001 ECX bit 2 is clear: not an AMD CPU with SVM.
    NoSvm,
    /// VM_CR.SVMDIS: the firmware disabled SVM.
    Disabled,
    /// No nested paging.
    NoNestedPaging,
}

/// The pages SVM needs, provided by the image (statics, physical = virtual).
#[derive(Debug)]
pub struct SvmPages {
    /// The guest's VMCB.
    pub vmcb: &'static mut Vmcb,
    /// The host save area named by VM_HSAVE_PA.
    pub host_save: &'static mut Page,
    /// Where the exit stub `VMSAVE`s the host's hidden state.
    pub host_vmsave: &'static mut Vmcb,
    /// The I/O permission map (12 KiB).
    pub iopm: &'static mut [Page; 3],
    /// The MSR permission map (8 KiB).
    pub msrpm: &'static mut [Page; 2],
}

/// A vCPU.
#[derive(Debug)]
pub struct SvmVcpu {
    pages: SvmPages,
    /// The guest's general registers outside the VMCB.
    pub regs: GuestRegs,
    features: Features,
}

/// Reads CPUID 0x8000000A and checks that SVM with nested paging can be enabled.
pub fn features() -> Result<Features, Unavailable> {
    if cpuid(0x8000_0000, 0).0 < 0x8000_000a || cpuid(0x8000_0001, 0).2 & (1 << 2) == 0 {
        return Err(Unavailable::NoSvm);
    }
    // SAFETY: VM_CR exists on every CPU with SVM (checked above).
    if unsafe { rdmsr(VM_CR) } & VM_CR_SVMDIS != 0 {
        return Err(Unavailable::Disabled);
    }
    let (_, asids, _, edx) = cpuid(0x8000_000a, 0);
    let bit = |n: u32| edx & (1 << n) != 0;
    let f = Features {
        asids,
        nested_paging: bit(0),
        nrip_save: bit(3),
        vmcb_clean: bit(5),
        flush_by_asid: bit(6),
        decode_assists: bit(7),
    };
    if !f.nested_paging {
        return Err(Unavailable::NoNestedPaging);
    }
    Ok(f)
}

extern "C" {
    /// The exit stub (below): runs the guest of the VMCB at `vmcb_pa` until the next exit.
    fn svm_run(regs: *mut GuestRegs, vmcb_pa: u64, host_vmsave_pa: u64);
}

core::arch::global_asm!(concat!(
    r#"
    .section .text
    .global svm_run
svm_run:
"#,
    push_host_regs!(),
    r#"    push rdi
    push rdx
    clgi
    mov rax, rdx
    vmsave rax
    mov rax, rsi
    push rax
"#,
    load_guest_regs!(),
    r#"    mov rdi, [rdi + 32]
    vmload rax
    sti
    vmrun rax
    cli
    vmsave rax
    push rdi
    mov rdi, [rsp + 24]
"#,
    store_guest_regs!(),
    r#"    pop rax
    mov [rdi + 32], rax
    pop rax
    pop rax
    vmload rax
    stgi
    pop rdi
"#,
    pop_host_regs!(),
    r#"    ret
"#
));

impl SvmVcpu {
    /// Enables SVM on this CPU (EFER.SVME, and EFER.NXE for non-executable NPT leaves; the
    /// host save area) and sets up a VMCB for a guest with nested paging rooted at `n_cr3`:
    /// ASID 1, every I/O port and MSR intercepted, CPUID, HLT, VMMCALL, the SVM instructions,
    /// physical interrupts and triple faults intercepted.
    ///
    /// # Safety
    ///
    /// Physical addresses equal virtual ones for the pages (the image maps memory 1:1); the
    /// nested page table at `n_cr3` maps only memory the guest may own; nothing else on this
    /// CPU uses SVM.
    pub unsafe fn new(pages: SvmPages, features: Features, n_cr3: u64) -> Self {
        // SAFETY: EFER exists; setting SVME (SVM available, checked by `features`) and NXE
        // changes nothing the running host code depends on. VM_HSAVE_PA names a page the
        // vCPU owns for as long as SVM is on.
        unsafe {
            wrmsr(EFER, rdmsr(EFER) | EFER_SVME | EFER_NXE);
            wrmsr(VM_HSAVE_PA, &*pages.host_save as *const Page as u64);
        }
        let vcpu = Self { pages, regs: GuestRegs::default(), features };
        for page in vcpu.pages.iopm.iter_mut().chain(vcpu.pages.msrpm.iter_mut()) {
            page.0.fill(0xff);
        }
        let iopm_pa = vcpu.pages.iopm.as_ptr() as u64;
        let msrpm_pa = vcpu.pages.msrpm.as_ptr() as u64;
        let v = &mut *vcpu.pages.vmcb;
        *v = Vmcb::zeroed();
        v.intercept_misc1 = misc1::INTR
            | misc1::NMI
            | misc1::CPUID
            | misc1::HLT
            | misc1::IOIO_PROT
            | misc1::MSR_PROT
            | misc1::SHUTDOWN;
        v.intercept_misc2 = misc2::VMRUN
            | misc2::VMMCALL
            | misc2::VMLOAD
            | misc2::VMSAVE
            | misc2::STGI
            | misc2::CLGI
            | misc2::SKINIT;
        v.iopm_base_pa = iopm_pa;
        v.msrpm_base_pa = msrpm_pa;
        v.guest_asid = 1;
        v.v_intr = V_INTR_MASKING;
        v.np_control = NP_ENABLE;
        v.n_cr3 = n_cr3;
        // The power-on PAT: WB, WT, UC-, UC, repeated.
        v.g_pat = 0x0007_0406_0007_0406;
        vcpu
    }

    /// The SVM features this vCPU runs with.
    pub fn features(&self) -> Features {
        self.features
    }

    /// The VMCB, for the guest's state.
    pub fn vmcb(&mut self) -> &mut Vmcb {
        self.pages.vmcb
    }

    /// Runs the guest until its next exit, first flushing the TLB as `tlb` says (the NPT
    /// flush tokens since the last run, collected in a
    /// [`NextVmrunFlush`](crate::stage2::invalidate::NextVmrunFlush)).
    pub fn run_with_tlb(&mut self, tlb: TlbControl) -> ExitReason {
        self.pages.vmcb.tlb_control = tlb as u8;
        self.pages.vmcb.rax = self.regs.rax;
        let vmcb_pa = &*self.pages.vmcb as *const Vmcb as u64;
        let host_pa = &*self.pages.host_vmsave as *const Vmcb as u64;
        // SAFETY: `new` enabled SVM and set the VMCB up (its caller vouched for the nested
        // table); the stub saves and restores every host register it changes.
        unsafe { svm_run(&mut self.regs, vmcb_pa, host_pa) };
        let v = &mut *self.pages.vmcb;
        v.tlb_control = 0;
        self.regs.rax = v.rax;
        decode(v.exitcode, v.exitinfo1, v.exitinfo2)
    }
}

/// SVM's segment in the VMCB from the vendor-neutral one (the same attribute format).
const fn segment(s: &SegmentState) -> Segment {
    Segment { selector: s.selector, attrib: s.attrib, limit: s.limit, base: s.base }
}

const EFER_SVME_BIT: u64 = 1 << 12;

impl Vcpu for SvmVcpu {
    const VENDOR: &'static str = "svm";
    type Format = Npt;
    type Invalidate = NextVmrunFlush;

    fn load(&mut self, st: &ArchState) {
        self.regs = st.regs;
        let v = &mut *self.pages.vmcb;
        v.rsp = st.rsp;
        v.rip = st.rip;
        v.rflags = st.rflags | 2;
        v.cr0 = st.cr0;
        v.cr3 = st.cr3;
        v.cr4 = st.cr4;
        // SVM requires EFER.SVME in the guest's EFER.
        v.efer = st.efer | EFER_SVME_BIT;
        v.cr2 = st.cr2;
        use crate::virt::seg;
        v.es = segment(&st.segs[seg::ES]);
        v.cs = segment(&st.segs[seg::CS]);
        v.ss = segment(&st.segs[seg::SS]);
        v.ds = segment(&st.segs[seg::DS]);
        v.fs = segment(&st.segs[seg::FS]);
        v.gs = segment(&st.segs[seg::GS]);
        v.ldtr = segment(&st.ldtr);
        v.gdtr = Segment { selector: 0, attrib: 0, limit: st.gdtr.1, base: st.gdtr.0 };
        v.idtr = Segment { selector: 0, attrib: 0, limit: st.idtr.1, base: st.idtr.0 };
        v.tr = match &st.tr {
            Some(tr) => segment(tr),
            None => Segment { selector: 0, attrib: TSS64, limit: 0x67, base: 0 },
        };
        // The CPL is SS's DPL (attributes bits 5-6), or 0 in real mode.
        v.cpl = if st.cr0 & 1 == 0 { 0 } else { ((st.segs[seg::SS].attrib >> 5) & 3) as u8 };
    }

    fn run(&mut self, pending: &mut NextVmrunFlush) -> ExitReason {
        self.run_with_tlb(pending.take())
    }

    fn regs(&mut self) -> &mut GuestRegs {
        &mut self.regs
    }

    fn rip(&mut self) -> u64 {
        self.pages.vmcb.rip
    }

    fn skip_instruction(&mut self, reason: &ExitReason) {
        let v = &mut *self.pages.vmcb;
        v.rip = match (reason, instruction_len(reason)) {
            // IN/OUT: EXITINFO2 is the next RIP.
            (ExitReason::Io { .. }, _) => v.exitinfo2,
            _ if self.features.nrip_save && v.nrip != 0 => v.nrip,
            (_, Some(len)) => v.rip + len,
            (_, None) => v.rip,
        };
    }
}

/// A flat 64-bit code segment's VMCB attributes: type 0xb (execute/read, accessed), S, P, L.
pub const CODE64: u16 = 0x29b;
/// A flat data segment's attributes: type 0x3 (read/write, accessed), S, P, D/B, G.
pub const DATA: u16 = 0xc93;
/// A busy 64-bit TSS's attributes: type 0xb, P.
pub const TSS64: u16 = 0x8b;

/// A segment with `selector`, `attrib`, base 0 and the 4 GiB limit.
pub const fn flat(selector: u16, attrib: u16) -> Segment {
    Segment { selector, attrib, limit: 0xffff_ffff, base: 0 }
}

//! A vCPU under VMX with EPT (image only).
//!
//! Set-up (SDM Vol. 3C ch. 24-26): IA32_FEATURE_CONTROL allows VMXON, CR0 and CR4 satisfy the
//! FIXED MSRs (CR4.VMXE), VMXON, VMCLEAR + VMPTRLD of the VMCS; every control computed from
//! the (TRUE_*) capability MSRs: external interrupts and NMIs exit, HLT and every IN/OUT exit,
//! every MSR access exits (no MSR bitmap), EPT on. The host state is the running image's (its
//! GDT, IDT and real TSS). The exit stub (`vmx_run`) saves the host's callee-saved registers,
//! writes HOST_RSP and HOST_RIP, loads the guest's general registers and VMLAUNCHes or
//! VMRESUMEs; at the exit it stores the guest's registers and returns. A VM exit clears
//! RFLAGS.IF: an interrupt that caused the exit stays pending until the caller opens a window.

use core::arch::asm;

use super::exit::decode;
use super::vmcs::{self as f, access_rights, adjust_controls, ctl, fixed, msr};
use crate::cpu::{cpuid, rdmsr, wrmsr};
use crate::stage2::invalidate::Invept;
use crate::stage2::Ept;
use crate::virt::svm::vcpu::Page;
use crate::virt::{
    load_guest_regs, pop_host_regs, push_host_regs, store_guest_regs, ArchState, ExitReason, GuestRegs,
    SegmentState, Vcpu,
};

const EFER: u32 = 0xc000_0080;
const EFER_LMA: u64 = 1 << 10;
const IA32_PAT: u32 = 0x277;
const IA32_SYSENTER_CS: u32 = 0x174;
const IA32_SYSENTER_ESP: u32 = 0x175;
const IA32_SYSENTER_EIP: u32 = 0x176;
const FS_BASE: u32 = 0xc000_0100;
const GS_BASE: u32 = 0xc000_0101;
const CR4_VMXE: u64 = 1 << 13;

/// Why VMX cannot be used here, or where its set-up failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmxError {
    /// CPUID.1:ECX.VMX is clear.
    NoVmx,
    /// IA32_FEATURE_CONTROL is locked without VMXON outside SMX.
    DisabledByFirmware,
    /// No EPT with a 4-level walk, write-back tables and single-context INVEPT.
    NoEpt,
    /// A control the image needs is not allowed (the control MSR, the refused bits).
    Control(u32, u32),
    /// A VMX instruction failed (VMXON, VMCLEAR, VMPTRLD, VMWRITE), with the VM-instruction
    /// error where there is one.
    Instruction(&'static str, u64),
}

/// The pages VMX needs, provided by the image (statics, physical = virtual).
#[derive(Debug)]
pub struct VmxPages {
    /// The VMXON region.
    pub vmxon: &'static mut Page,
    /// The VMCS.
    pub vmcs: &'static mut Page,
}

/// A vCPU.
#[derive(Debug)]
pub struct VmxVcpu {
    _pages: VmxPages,
    /// The guest's general registers (VMX keeps none but RSP in the VMCS).
    pub regs: GuestRegs,
    launched: bool,
    cr0_fixed: (u64, u64),
    cr4_fixed: (u64, u64),
    entry_controls: u32,
}

/// Checks that VMX with EPT (4-level, write-back, single-context INVEPT) is available.
pub fn available() -> Result<(), VmxError> {
    if cpuid(1, 0).2 & (1 << 5) == 0 {
        return Err(VmxError::NoVmx);
    }
    // SAFETY: the VMX capability MSRs exist on every CPU with VMX (checked above).
    let (procbased2, ept) =
        unsafe { (rdmsr(msr::IA32_VMX_PROCBASED_CTLS2), rdmsr(msr::IA32_VMX_EPT_VPID_CAP)) };
    let ept_allowed = (procbased2 >> 32) as u32 & ctl::PROC2_ENABLE_EPT != 0;
    let needed = 1 << 6 | 1 << 14 | 1 << 20 | 1 << 25;
    if !ept_allowed || ept & needed != needed {
        return Err(VmxError::NoEpt);
    }
    Ok(())
}

/// VMWRITE of `value` to `field` of the current VMCS.
///
/// # Safety
///
/// VMX root operation with a current VMCS, and the write is valid for the field.
unsafe fn vmwrite(field: u32, value: u64) -> Result<(), VmxError> {
    let failed: u8;
    // SAFETY: the caller guarantees VMX root operation and a current VMCS; VMWRITE touches no
    // memory of the program.
    unsafe {
        asm!("vmwrite {f}, {v}", "setbe {x}", f = in(reg) u64::from(field), v = in(reg) value, x = out(reg_byte) failed, options(nostack))
    };
    if failed != 0 {
        // SAFETY: as above; the error field is readable after a VMfailValid.
        return Err(VmxError::Instruction(
            "VMWRITE",
            u64::from(field) << 32 | unsafe { vmread(f::VM_INSTRUCTION_ERROR) },
        ));
    }
    Ok(())
}

/// VMREAD of `field` of the current VMCS (0 if it fails).
///
/// # Safety
///
/// VMX root operation with a current VMCS.
unsafe fn vmread(field: u32) -> u64 {
    let value: u64;
    // SAFETY: the caller guarantees VMX root operation and a current VMCS.
    unsafe { asm!("vmread {v}, {f}", f = in(reg) u64::from(field), v = out(reg) value, options(nostack)) };
    value
}

/// A VMX instruction with a memory operand holding a physical address (VMXON, VMCLEAR,
/// VMPTRLD); `Err` on VMfail.
macro_rules! vmx_pa {
    ($insn:literal, $pa:expr) => {{
        let pa: u64 = $pa;
        let failed: u8;
        // SAFETY: the caller's contract (see the call sites): VMX is enabled in CR4, the page
        // at `pa` holds the revision id and belongs to this vCPU.
        unsafe { asm!(concat!($insn, " [{p}]"), "setbe {x}", p = in(reg) &pa, x = out(reg_byte) failed, options(nostack)) };
        if failed != 0 {
            Err(VmxError::Instruction($insn, 0))
        } else {
            Ok(())
        }
    }};
}

extern "C" {
    /// The exit stub (below): enters the guest of the current VMCS (VMRESUME if `launched`)
    /// and returns 0 at its next exit, 1 if the entry failed.
    fn vmx_run(regs: *mut GuestRegs, launched: u64) -> u64;
}

core::arch::global_asm!(concat!(
    r#"
    .section .text
    .global vmx_run
vmx_run:
"#,
    push_host_regs!(),
    r#"    push rdi
    push rsi
    mov rax, 0x6c14
    vmwrite rax, rsp
    lea rcx, [rip + vmx_exit]
    mov rax, 0x6c16
    vmwrite rax, rcx
    mov rax, [rdi + 112]
"#,
    load_guest_regs!(),
    r#"    cmp qword ptr [rsp], 0
    mov rdi, [rdi + 32]
    jne 2f
    vmlaunch
    jmp 3f
2:  vmresume
3:  add rsp, 8
    pop rdi
"#,
    pop_host_regs!(),
    r#"    mov eax, 1
    ret
vmx_exit:
    push rdi
    mov rdi, [rsp + 16]
    mov [rdi + 112], rax
"#,
    store_guest_regs!(),
    r#"    pop rax
    mov [rdi + 32], rax
    add rsp, 8
    pop rdi
"#,
    pop_host_regs!(),
    r#"    xor eax, eax
    ret
"#
));

/// The control value for `wanted` from `capability` (the TRUE_* MSR when IA32_VMX_BASIC bit
/// 55 says it exists).
fn controls(wanted: u32, plain: u32, true_msr: u32, has_true: bool) -> Result<u32, VmxError> {
    let which = if has_true { true_msr } else { plain };
    // SAFETY: the VMX capability MSRs exist on a CPU with VMX.
    let cap = unsafe { rdmsr(which) };
    adjust_controls(wanted, cap).map_err(|refused| VmxError::Control(which, refused))
}

/// The base of the descriptor at `selector` of the GDT at `gdt` (a 64-bit system descriptor
/// for the TSS).
///
/// # Safety
///
/// `gdt` is the loaded GDT and `selector` indexes a TSS descriptor in it.
unsafe fn tss_base(gdt: u64, selector: u16) -> u64 {
    let at = (gdt + u64::from(selector & !7)) as *const u64;
    // SAFETY: the caller guarantees the two quadwords of the descriptor are in the GDT.
    let (low, high) = unsafe { (at.read_unaligned(), at.add(1).read_unaligned()) };
    (low >> 16 & 0xff_ffff) | (low >> 56 & 0xff) << 24 | (high & 0xffff_ffff) << 32
}

impl VmxVcpu {
    /// Enters VMX root operation on this CPU and sets up a VMCS for a guest on the EPT table
    /// whose EPTP is `eptp`.
    ///
    /// # Safety
    ///
    /// Physical addresses equal virtual ones for the pages (the image maps memory 1:1); the
    /// EPT table maps only memory the guest may own; nothing else on this CPU uses VMX; the
    /// GDT, IDT and TSS loaded now stay for the life of the vCPU.
    pub unsafe fn new(pages: VmxPages, eptp: u64) -> Result<Self, VmxError> {
        available()?;
        // SAFETY: the MSRs read and written here exist on a CPU with VMX; enabling VMXON in
        // IA32_FEATURE_CONTROL (when unlocked) and CR4.VMXE changes nothing else.
        let (basic, cr0_fixed, cr4_fixed) = unsafe {
            let feature = rdmsr(msr::IA32_FEATURE_CONTROL);
            if feature & 1 == 0 {
                wrmsr(msr::IA32_FEATURE_CONTROL, feature | 1 | 1 << 2);
            } else if feature & (1 << 2) == 0 {
                return Err(VmxError::DisabledByFirmware);
            }
            let basic = rdmsr(msr::IA32_VMX_BASIC);
            let cr0_fixed = (rdmsr(msr::IA32_VMX_CR0_FIXED0), rdmsr(msr::IA32_VMX_CR0_FIXED1));
            let cr4_fixed = (rdmsr(msr::IA32_VMX_CR4_FIXED0), rdmsr(msr::IA32_VMX_CR4_FIXED1));
            (basic, cr0_fixed, cr4_fixed)
        };
        let (cr0, cr4): (u64, u64);
        // SAFETY: reading and writing CR0/CR4 at CPL 0; the fixed bits (NE, VMXE) do not change
        // how the running image behaves.
        unsafe {
            asm!("mov {}, cr0", out(reg) cr0, options(nomem, nostack));
            asm!("mov {}, cr4", out(reg) cr4, options(nomem, nostack));
            asm!("mov cr0, {}", in(reg) fixed(cr0, cr0_fixed.0, cr0_fixed.1), options(nostack));
            asm!("mov cr4, {}", in(reg) fixed(cr4 | CR4_VMXE, cr4_fixed.0, cr4_fixed.1), options(nostack));
        }
        let revision = (basic as u32 & 0x7fff_ffff).to_le_bytes();
        pages.vmxon.0[..4].copy_from_slice(&revision);
        pages.vmcs.0[..4].copy_from_slice(&revision);
        let (vmxon_pa, vmcs_pa) = (pages.vmxon.0.as_ptr() as u64, pages.vmcs.0.as_ptr() as u64);
        vmx_pa!("vmxon", vmxon_pa)?;
        vmx_pa!("vmclear", vmcs_pa)?;
        vmx_pa!("vmptrld", vmcs_pa)?;
        let has_true = basic & (1 << 55) != 0;
        let pin = controls(
            ctl::PIN_EXTERNAL_INTERRUPT_EXITING | ctl::PIN_NMI_EXITING,
            msr::IA32_VMX_PINBASED_CTLS,
            msr::IA32_VMX_TRUE_PINBASED_CTLS,
            has_true,
        )?;
        let proc = controls(
            ctl::PROC_HLT_EXITING | ctl::PROC_UNCONDITIONAL_IO_EXITING | ctl::PROC_ACTIVATE_SECONDARY,
            msr::IA32_VMX_PROCBASED_CTLS,
            msr::IA32_VMX_TRUE_PROCBASED_CTLS,
            has_true,
        )?;
        let proc2 = controls(
            ctl::PROC2_ENABLE_EPT,
            msr::IA32_VMX_PROCBASED_CTLS2,
            msr::IA32_VMX_PROCBASED_CTLS2,
            false,
        )?;
        let exit = controls(
            ctl::EXIT_HOST_ADDRESS_SPACE_SIZE | ctl::EXIT_SAVE_IA32_EFER | ctl::EXIT_LOAD_IA32_EFER,
            msr::IA32_VMX_EXIT_CTLS,
            msr::IA32_VMX_TRUE_EXIT_CTLS,
            has_true,
        )?;
        let entry = controls(
            ctl::ENTRY_LOAD_IA32_EFER,
            msr::IA32_VMX_ENTRY_CTLS,
            msr::IA32_VMX_TRUE_ENTRY_CTLS,
            has_true,
        )?;
        let (gdt, idt, tr, cs, ss, ds, es, fs, gs, cr3, cr0, cr4) = host_registers();
        // SAFETY: VMX root operation with this vCPU's VMCS current (just loaded); each write is
        // a valid value for its field (host state of the running image, computed controls).
        unsafe {
            let fields: [(u32, u64); 33] = [
                (f::PIN_BASED_CONTROLS, pin.into()),
                (f::PROC_BASED_CONTROLS, proc.into()),
                (f::SECONDARY_PROC_BASED_CONTROLS, proc2.into()),
                (f::EXIT_CONTROLS, exit.into()),
                (f::ENTRY_CONTROLS, entry.into()),
                (f::EXCEPTION_BITMAP, 0),
                (f::EPT_POINTER, eptp),
                (f::VMCS_LINK_POINTER, u64::MAX),
                (f::HOST_CR0, cr0),
                (f::HOST_CR3, cr3),
                (f::HOST_CR4, cr4),
                (f::HOST_CS_SELECTOR, cs.into()),
                (f::HOST_SS_SELECTOR, ss.into()),
                (f::HOST_DS_SELECTOR, ds.into()),
                (f::HOST_ES_SELECTOR, es.into()),
                (f::HOST_FS_SELECTOR, fs.into()),
                (f::HOST_GS_SELECTOR, gs.into()),
                (f::HOST_TR_SELECTOR, tr.into()),
                (f::HOST_FS_BASE, rdmsr(FS_BASE)),
                (f::HOST_GS_BASE, rdmsr(GS_BASE)),
                (f::HOST_TR_BASE, tss_base(gdt.0, tr)),
                (f::HOST_GDTR_BASE, gdt.0),
                (f::HOST_IDTR_BASE, idt),
                (f::HOST_SYSENTER_CS, rdmsr(IA32_SYSENTER_CS)),
                (f::HOST_SYSENTER_ESP, rdmsr(IA32_SYSENTER_ESP)),
                (f::HOST_SYSENTER_EIP, rdmsr(IA32_SYSENTER_EIP)),
                (f::HOST_IA32_EFER, rdmsr(EFER)),
                (f::HOST_IA32_PAT, rdmsr(IA32_PAT)),
                (f::GUEST_IA32_PAT, 0x0007_0406_0007_0406),
                (f::GUEST_DR7, 0x400),
                (f::GUEST_ACTIVITY_STATE, 0),
                (f::GUEST_INTERRUPTIBILITY, 0),
                (f::GUEST_LDTR_ACCESS_RIGHTS, 1 << 16),
            ];
            for (field, value) in fields {
                vmwrite(field, value)?;
            }
        }
        Ok(Self {
            _pages: pages,
            regs: GuestRegs::default(),
            launched: false,
            cr0_fixed,
            cr4_fixed,
            entry_controls: entry,
        })
    }

    fn write(&mut self, field: u32, value: u64) {
        // SAFETY: `new` left this vCPU's VMCS current in VMX root operation; the fields the
        // callers write take any value of their width (guest state, checked at entry).
        if let Err(e) = unsafe { vmwrite(field, value) } {
            panic!("VMWRITE of {field:#x} failed: {e:?}");
        }
    }

    fn read(&self, field: u32) -> u64 {
        // SAFETY: as in `write`.
        unsafe { vmread(field) }
    }

    fn segment(&mut self, selector: u32, s: &SegmentState) {
        // Selector, limit, access rights and base fields of one register are at the same
        // index in their groups (SDM Vol. 3C appendix B).
        let index = selector - f::GUEST_ES_SELECTOR;
        self.write(selector, s.selector.into());
        self.write(f::GUEST_ES_LIMIT + index, s.limit.into());
        self.write(f::GUEST_ES_ACCESS_RIGHTS + index, access_rights(s.attrib).into());
        self.write(f::GUEST_ES_BASE + index, s.base);
    }
}

/// (GDTR base and limit, IDTR base, TR, CS, SS, DS, ES, FS, GS, CR3, CR0, CR4) of the running
/// image.
#[allow(clippy::type_complexity)]
fn host_registers() -> ((u64, u16), u64, u16, u16, u16, u16, u16, u16, u16, u64, u64, u64) {
    let mut gdtr = [0u8; 10];
    let mut idtr = [0u8; 10];
    let (tr, cs, ss, ds, es, fs, gs): (u16, u16, u16, u16, u16, u16, u16);
    let (cr0, cr3, cr4): (u64, u64, u64);
    // SAFETY: SGDT/SIDT write 10 bytes into the local buffers; the other instructions read
    // registers at CPL 0.
    unsafe {
        asm!("sgdt [{}]", in(reg) gdtr.as_mut_ptr(), options(nostack));
        asm!("sidt [{}]", in(reg) idtr.as_mut_ptr(), options(nostack));
        asm!("str {0:x}", out(reg) tr, options(nomem, nostack));
        asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack));
        asm!("mov {0:x}, ss", out(reg) ss, options(nomem, nostack));
        asm!("mov {0:x}, ds", out(reg) ds, options(nomem, nostack));
        asm!("mov {0:x}, es", out(reg) es, options(nomem, nostack));
        asm!("mov {0:x}, fs", out(reg) fs, options(nomem, nostack));
        asm!("mov {0:x}, gs", out(reg) gs, options(nomem, nostack));
        asm!("mov {}, cr0", out(reg) cr0, options(nomem, nostack));
        asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack));
        asm!("mov {}, cr4", out(reg) cr4, options(nomem, nostack));
    }
    let base = |b: &[u8; 10]| u64::from_le_bytes([b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9]]);
    (
        (base(&gdtr), u16::from_le_bytes([gdtr[0], gdtr[1]])),
        base(&idtr),
        tr,
        cs,
        ss,
        ds,
        es,
        fs,
        gs,
        cr3,
        cr0,
        cr4,
    )
}

impl Vcpu for VmxVcpu {
    const VENDOR: &'static str = "vmx";
    type Format = Ept;
    type Invalidate = Invept;

    fn load(&mut self, st: &ArchState) {
        self.regs = st.regs;
        // Without unrestricted guest, CR0 needs PE, PG and NE, and CR4 needs VMXE: the guest
        // reads its own values through the read shadows.
        let cr0 = fixed(st.cr0, self.cr0_fixed.0, self.cr0_fixed.1);
        let cr4 = fixed(st.cr4, self.cr4_fixed.0, self.cr4_fixed.1);
        self.write(f::GUEST_CR0, cr0);
        self.write(f::CR0_GUEST_HOST_MASK, cr0 ^ st.cr0);
        self.write(f::CR0_READ_SHADOW, st.cr0);
        self.write(f::GUEST_CR4, cr4);
        self.write(f::CR4_GUEST_HOST_MASK, cr4 ^ st.cr4);
        self.write(f::CR4_READ_SHADOW, st.cr4);
        self.write(f::GUEST_CR3, st.cr3);
        self.write(f::GUEST_IA32_EFER, st.efer);
        let entry = if st.efer & EFER_LMA != 0 {
            self.entry_controls | ctl::ENTRY_IA32E_MODE_GUEST
        } else {
            self.entry_controls & !ctl::ENTRY_IA32E_MODE_GUEST
        };
        self.write(f::ENTRY_CONTROLS, entry.into());
        self.write(f::GUEST_RSP, st.rsp);
        self.write(f::GUEST_RIP, st.rip);
        self.write(f::GUEST_RFLAGS, st.rflags | 2);
        use crate::virt::seg;
        self.segment(f::GUEST_ES_SELECTOR, &st.segs[seg::ES]);
        self.segment(f::GUEST_CS_SELECTOR, &st.segs[seg::CS]);
        self.segment(f::GUEST_SS_SELECTOR, &st.segs[seg::SS]);
        self.segment(f::GUEST_DS_SELECTOR, &st.segs[seg::DS]);
        self.segment(f::GUEST_FS_SELECTOR, &st.segs[seg::FS]);
        self.segment(f::GUEST_GS_SELECTOR, &st.segs[seg::GS]);
        self.segment(f::GUEST_LDTR_SELECTOR, &st.ldtr);
        let tr = st.tr.unwrap_or(SegmentState { selector: 0, attrib: 0x8b, limit: 0x67, base: 0 });
        self.segment(f::GUEST_TR_SELECTOR, &tr);
        self.write(f::GUEST_GDTR_BASE, st.gdtr.0);
        self.write(f::GUEST_GDTR_LIMIT, st.gdtr.1.into());
        self.write(f::GUEST_IDTR_BASE, st.idtr.0);
        self.write(f::GUEST_IDTR_LIMIT, st.idtr.1.into());
    }

    fn run(&mut self, _pending: &mut Invept) -> ExitReason {
        // INVEPT ran when each flush token was flushed: nothing is owed here.
        // SAFETY: `new` set up and loaded the VMCS in VMX root operation; the stub restores
        // every host register it changes.
        let failed = unsafe { vmx_run(&mut self.regs, u64::from(self.launched)) };
        if failed != 0 {
            return ExitReason::EntryFailed { error: self.read(f::VM_INSTRUCTION_ERROR) };
        }
        self.launched = true;
        decode(
            self.read(f::EXIT_REASON) as u32,
            self.read(f::EXIT_QUALIFICATION),
            self.read(f::GUEST_PHYSICAL_ADDRESS),
            self.read(f::EXIT_INTERRUPTION_INFO) as u32,
            self.read(f::EXIT_INTERRUPTION_ERROR) as u32,
        )
    }

    fn regs(&mut self) -> &mut GuestRegs {
        &mut self.regs
    }

    fn rip(&mut self) -> u64 {
        self.read(f::GUEST_RIP)
    }

    fn skip_instruction(&mut self, _reason: &ExitReason) {
        // VMX reports the length of the instruction that exited.
        let rip = self.read(f::GUEST_RIP) + self.read(f::EXIT_INSTRUCTION_LEN);
        self.write(f::GUEST_RIP, rip);
    }
}

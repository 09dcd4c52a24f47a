//! The fields of `vmstate_x86_cpu` (QEMU 7.2 `target/i386/machine.c`, `cpu`, version 12) as
//! an x86_64 QEMU writes them: 66 fields, 1817 bytes. `VMSTATE_UINTTL` is 8 bytes on a
//! 64-bit target; `VMSTATE_INT32`/`UINT32` 4; an x87 register goes through `fpreg_tmp`
//! (`VMSTATE_WITH_TMP`): 64-bit mantissa, then 16-bit sign and exponent. Fields marked
//! `_V(12)` (xcr0, xstate_bv, the YMM high halves) are there because 7.2 writes version 12.

use core::mem::size_of;

use zerocopy::byteorder::big_endian::{I32, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::layout::{vm_field, VmElem, VmKind, VmStruct};

/// `segment` (`SegmentCache`): selector, base, limit, flags. QEMU's flags are the
/// descriptor's high dword (type at bit 8, S 12, DPL 13, P 15, AVL 20, L 21, D/B 22, G 23).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct SegmentWire {
    /// Selector (32 bits on the wire).
    pub selector: U32,
    /// Base.
    pub base: U64,
    /// Limit, in bytes (already scaled by G).
    pub limit: U32,
    /// Descriptor high-dword bits.
    pub flags: U32,
}

/// `segment`.
pub static SEGMENT: VmStruct = VmStruct {
    name: "segment",
    version: 1,
    fields: &[
        vm_field!(SegmentWire, "selector", selector),
        vm_field!(SegmentWire, "base", base),
        vm_field!(SegmentWire, "limit", limit),
        vm_field!(SegmentWire, "flags", flags),
    ],
};

impl VmElem for SegmentWire {
    const KIND: VmKind = VmKind::Struct(&SEGMENT);
}

/// `fpreg_tmp`: one x87 register as `floatx80` halves.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct FpRegTmpWire {
    /// Mantissa (bit 63: the explicit integer bit); an MMX register is this alone.
    pub mantissa: U64,
    /// Sign (bit 15) and exponent.
    pub exponent: U16,
}

/// `fpreg_tmp` (no version set: 0).
pub static FPREG_TMP: VmStruct = VmStruct {
    name: "fpreg_tmp",
    version: 0,
    fields: &[vm_field!(FpRegTmpWire, "tmp_mant", mantissa), vm_field!(FpRegTmpWire, "tmp_exp", exponent)],
};

/// `fpreg`: the register through its temporary.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct FpRegWire {
    /// The temporary's fields.
    pub tmp: FpRegTmpWire,
}

impl VmElem for FpRegTmpWire {
    const KIND: VmKind = VmKind::Tmp(&FPREG_TMP);
}

/// `fpreg` (no version set: 0).
pub static FPREG: VmStruct =
    VmStruct { name: "fpreg", version: 0, fields: &[vm_field!(FpRegWire, "tmp", tmp)] };

impl VmElem for FpRegWire {
    const KIND: VmKind = VmKind::Struct(&FPREG);
}

/// `xmm_reg` (quadwords 0 and 1 of a ZMM register) or `ymmh_reg` (quadwords 2 and 3).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct QuadPairWire {
    /// The lower quadword.
    pub low: U64,
    /// The upper quadword.
    pub high: U64,
}

impl QuadPairWire {
    /// The two quadwords as one 128-bit value.
    pub fn get(&self) -> u128 {
        u128::from(self.high.get()) << 64 | u128::from(self.low.get())
    }
}

/// `xmm_reg`.
pub static XMM_REG: VmStruct = VmStruct {
    name: "xmm_reg",
    version: 1,
    fields: &[vm_field!(QuadPairWire, "_q_ZMMReg[0]", low), vm_field!(QuadPairWire, "_q_ZMMReg[1]", high)],
};

/// The YMM halves: same bytes as [`QuadPairWire`], another description.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(transparent)]
pub struct YmmhWire(pub QuadPairWire);

/// `ymmh_reg`.
pub static YMMH_REG: VmStruct = VmStruct {
    name: "ymmh_reg",
    version: 1,
    fields: &[vm_field!(QuadPairWire, "_q_ZMMReg[2]", low), vm_field!(QuadPairWire, "_q_ZMMReg[3]", high)],
};

impl VmElem for QuadPairWire {
    const KIND: VmKind = VmKind::Struct(&XMM_REG);
}

impl VmElem for YmmhWire {
    const KIND: VmKind = VmKind::Struct(&YMMH_REG);
}

/// `mtrr_var`: one variable-range MTRR.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct MtrrVarWire {
    /// IA32_MTRR_PHYSBASEn.
    pub base: U64,
    /// IA32_MTRR_PHYSMASKn.
    pub mask: U64,
}

/// `mtrr_var`.
pub static MTRR_VAR: VmStruct = VmStruct {
    name: "mtrr_var",
    version: 1,
    fields: &[vm_field!(MtrrVarWire, "base", base), vm_field!(MtrrVarWire, "mask", mask)],
};

impl VmElem for MtrrVarWire {
    const KIND: VmKind = VmKind::Struct(&MTRR_VAR);
}

/// The fields of `cpu` version 12, in QEMU's order (doc comments give QEMU's names where
/// the member's differs).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
#[allow(missing_docs)]
pub struct CpuWire {
    /// RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8..R15.
    pub regs: [U64; 16],
    /// `env.eip` (RIP).
    pub eip: U64,
    pub eflags: U64,
    pub hflags: U32,
    pub fpuc: U16,
    /// FSW with TOP (bits 11..13) merged in.
    pub fpus: U16,
    /// Bit i set: register i is valid (the inverse of QEMU's `fptags`).
    pub fptag: U16,
    /// Must be 0 (QEMU refuses the old non-softfloat format).
    pub fpregs_format: U16,
    pub fpregs: [FpRegWire; 8],
    /// ES, CS, SS, DS, FS, GS.
    pub segs: [SegmentWire; 6],
    pub ldt: SegmentWire,
    pub tr: SegmentWire,
    pub gdt: SegmentWire,
    pub idt: SegmentWire,
    pub sysenter_cs: U32,
    pub sysenter_esp: U64,
    pub sysenter_eip: U64,
    pub cr0: U64,
    pub cr2: U64,
    pub cr3: U64,
    pub cr4: U64,
    pub dr: [U64; 8],
    pub a20_mask: I32,
    pub mxcsr: U32,
    /// Low 128 bits of XMM0..15.
    pub xmm: [QuadPairWire; 16],
    pub efer: U64,
    pub star: U64,
    pub lstar: U64,
    pub cstar: U64,
    pub fmask: U64,
    pub kernelgsbase: U64,
    pub smbase: U32,
    pub pat: U64,
    pub hflags2: U32,
    pub vm_hsave: U64,
    pub vm_vmcb: U64,
    pub tsc_offset: U64,
    pub intercept: U64,
    pub intercept_cr_read: U16,
    pub intercept_cr_write: U16,
    pub intercept_dr_read: U16,
    pub intercept_dr_write: U16,
    pub intercept_exceptions: U32,
    pub v_tpr: u8,
    pub mtrr_fixed: [U64; 11],
    pub mtrr_deftype: U64,
    pub mtrr_var: [MtrrVarWire; 8],
    /// Vector of an injected external interrupt, -1 for none.
    pub interrupt_injected: I32,
    pub mp_state: U32,
    /// KVM's TSC; 0 under TCG, whose TSC follows the `timer` section.
    pub tsc: U64,
    /// Pending or injected exception, -1 for none.
    pub exception_nr: I32,
    pub soft_interrupt: u8,
    pub nmi_injected: u8,
    pub nmi_pending: u8,
    pub has_error_code: u8,
    pub sipi_vector: U32,
    pub mcg_cap: U64,
    pub mcg_status: U64,
    pub mcg_ctl: U64,
    pub mce_banks: [U64; 40],
    pub tsc_aux: U64,
    pub system_time_msr: U64,
    pub wall_clock_msr: U64,
    pub xcr0: U64,
    pub xstate_bv: U64,
    /// Bits 128..255 of YMM0..15.
    pub ymmh: [YmmhWire; 16],
}

/// `cpu`, version 12.
pub static CPU: VmStruct = VmStruct {
    name: "cpu",
    version: 12,
    fields: &[
        vm_field!(CpuWire, "env.regs", regs),
        vm_field!(CpuWire, "env.eip", eip),
        vm_field!(CpuWire, "env.eflags", eflags),
        vm_field!(CpuWire, "env.hflags", hflags),
        vm_field!(CpuWire, "env.fpuc", fpuc),
        vm_field!(CpuWire, "env.fpus_vmstate", fpus),
        vm_field!(CpuWire, "env.fptag_vmstate", fptag),
        vm_field!(CpuWire, "env.fpregs_format_vmstate", fpregs_format),
        vm_field!(CpuWire, "env.fpregs", fpregs),
        vm_field!(CpuWire, "env.segs", segs),
        vm_field!(CpuWire, "env.ldt", ldt),
        vm_field!(CpuWire, "env.tr", tr),
        vm_field!(CpuWire, "env.gdt", gdt),
        vm_field!(CpuWire, "env.idt", idt),
        vm_field!(CpuWire, "env.sysenter_cs", sysenter_cs),
        vm_field!(CpuWire, "env.sysenter_esp", sysenter_esp),
        vm_field!(CpuWire, "env.sysenter_eip", sysenter_eip),
        vm_field!(CpuWire, "env.cr[0]", cr0),
        vm_field!(CpuWire, "env.cr[2]", cr2),
        vm_field!(CpuWire, "env.cr[3]", cr3),
        vm_field!(CpuWire, "env.cr[4]", cr4),
        vm_field!(CpuWire, "env.dr", dr),
        vm_field!(CpuWire, "env.a20_mask", a20_mask),
        vm_field!(CpuWire, "env.mxcsr", mxcsr),
        vm_field!(CpuWire, "env.xmm_regs[0]", xmm),
        vm_field!(CpuWire, "env.efer", efer),
        vm_field!(CpuWire, "env.star", star),
        vm_field!(CpuWire, "env.lstar", lstar),
        vm_field!(CpuWire, "env.cstar", cstar),
        vm_field!(CpuWire, "env.fmask", fmask),
        vm_field!(CpuWire, "env.kernelgsbase", kernelgsbase),
        vm_field!(CpuWire, "env.smbase", smbase),
        vm_field!(CpuWire, "env.pat", pat),
        vm_field!(CpuWire, "env.hflags2", hflags2),
        vm_field!(CpuWire, "env.vm_hsave", vm_hsave),
        vm_field!(CpuWire, "env.vm_vmcb", vm_vmcb),
        vm_field!(CpuWire, "env.tsc_offset", tsc_offset),
        vm_field!(CpuWire, "env.intercept", intercept),
        vm_field!(CpuWire, "env.intercept_cr_read", intercept_cr_read),
        vm_field!(CpuWire, "env.intercept_cr_write", intercept_cr_write),
        vm_field!(CpuWire, "env.intercept_dr_read", intercept_dr_read),
        vm_field!(CpuWire, "env.intercept_dr_write", intercept_dr_write),
        vm_field!(CpuWire, "env.intercept_exceptions", intercept_exceptions),
        vm_field!(CpuWire, "env.v_tpr", v_tpr),
        vm_field!(CpuWire, "env.mtrr_fixed", mtrr_fixed),
        vm_field!(CpuWire, "env.mtrr_deftype", mtrr_deftype),
        vm_field!(CpuWire, "env.mtrr_var", mtrr_var),
        vm_field!(CpuWire, "env.interrupt_injected", interrupt_injected),
        vm_field!(CpuWire, "env.mp_state", mp_state),
        vm_field!(CpuWire, "env.tsc", tsc),
        vm_field!(CpuWire, "env.exception_nr", exception_nr),
        vm_field!(CpuWire, "env.soft_interrupt", soft_interrupt),
        vm_field!(CpuWire, "env.nmi_injected", nmi_injected),
        vm_field!(CpuWire, "env.nmi_pending", nmi_pending),
        vm_field!(CpuWire, "env.has_error_code", has_error_code),
        vm_field!(CpuWire, "env.sipi_vector", sipi_vector),
        vm_field!(CpuWire, "env.mcg_cap", mcg_cap),
        vm_field!(CpuWire, "env.mcg_status", mcg_status),
        vm_field!(CpuWire, "env.mcg_ctl", mcg_ctl),
        vm_field!(CpuWire, "env.mce_banks", mce_banks),
        vm_field!(CpuWire, "env.tsc_aux", tsc_aux),
        vm_field!(CpuWire, "env.system_time_msr", system_time_msr),
        vm_field!(CpuWire, "env.wall_clock_msr", wall_clock_msr),
        vm_field!(CpuWire, "env.xcr0", xcr0),
        vm_field!(CpuWire, "env.xstate_bv", xstate_bv),
        vm_field!(CpuWire, "env.xmm_regs[1]", ymmh),
    ],
};

// Every member listed, in order, no gap; nested descriptions likewise.
const _: () = assert!(CPU.lays_out(size_of::<CpuWire>()));
const _: () = assert!(CPU.fields.len() == 66 && size_of::<CpuWire>() == 1817);
const _: () = assert!(SEGMENT.lays_out(size_of::<SegmentWire>()) && FPREG.lays_out(size_of::<FpRegWire>()));

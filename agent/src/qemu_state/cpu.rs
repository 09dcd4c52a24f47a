//! The `cpu` section (`vmstate_x86_cpu`, version 12) decoded into what a vCPU restore needs.
//! Instance = the vCPU's index. The fields are in [`super::cpu_wire`], the subsections in
//! [`super::cpu_subsections`].

use super::body::{error, mirror, subsections, Values};
use super::cpu_subsections::ALL;
use super::cpu_wire::{CpuWire, SegmentWire, CPU};
use super::layout::{VmFieldRef, VmStruct};
use super::Device;
use crate::error::{Defect, Error, Field};

/// A segment register as QEMU keeps it (`SegmentCache`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    /// Selector.
    pub selector: u32,
    /// Base.
    pub base: u64,
    /// Limit in bytes (QEMU stores it scaled by G).
    pub limit: u32,
    /// The descriptor's high dword: type bits 8..11, S 12, DPL 13..14, P 15, AVL 20, L 21,
    /// D/B 22, G 23 (`DESC_*_MASK` in QEMU).
    pub flags: u32,
}

impl Segment {
    fn from_wire(w: &SegmentWire) -> Self {
        Self { selector: w.selector.get(), base: w.base.get(), limit: w.limit.get(), flags: w.flags.get() }
    }

    /// Present.
    pub const fn present(&self) -> bool {
        self.flags & 1 << 15 != 0
    }

    /// Descriptor privilege level.
    pub const fn dpl(&self) -> u8 {
        (self.flags >> 13 & 3) as u8
    }

    /// D/B: a 32-bit code or stack segment.
    pub const fn big(&self) -> bool {
        self.flags & 1 << 22 != 0
    }

    /// L: a 64-bit code segment.
    pub const fn long(&self) -> bool {
        self.flags & 1 << 21 != 0
    }

    /// The attributes in SVM's VMCB form (type, S, DPL, P in bits 0..7; AVL, L, D/B, G in
    /// 8..11): descriptor bits 8..15 and 20..23.
    pub const fn vmcb_attrib(&self) -> u16 {
        ((self.flags >> 8 & 0xff) | (self.flags >> 12 & 0xf00)) as u16
    }
}

/// An x87 register (`floatx80`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fp80 {
    /// Mantissa (an MMX register's value).
    pub mantissa: u64,
    /// Sign (bit 15) and exponent.
    pub exponent: u16,
}

/// x87 and SSE state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fpu {
    /// FCW.
    pub fcw: u16,
    /// FSW, TOP included.
    pub fsw: u16,
    /// Bit i set: ST-register i is valid (FXSAVE's abridged tag word).
    pub ftw_valid: u16,
    /// ST0..7 as QEMU numbers them (physical registers).
    pub regs: [Fp80; 8],
    /// Last x87 opcode (subsection `cpu/fpop_ip_dp`, else 0).
    pub fop: u16,
    /// Last x87 instruction pointer.
    pub fip: u64,
    /// Last x87 data pointer.
    pub fdp: u64,
    /// MXCSR.
    pub mxcsr: u32,
    /// XMM0..15.
    pub xmm: [u128; 16],
    /// Bits 128..255 of YMM0..15.
    pub ymmh: [u128; 16],
    /// XCR0.
    pub xcr0: u64,
    /// XSTATE_BV.
    pub xstate_bv: u64,
}

/// An exception pending in a nested guest (`cpu/exception_info`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExceptionInfo {
    /// Pending (not yet delivered).
    pub pending: bool,
    /// Injected.
    pub injected: bool,
    /// `payload` is meaningful (CR2 for #PF, DR6 for #DB).
    pub has_payload: bool,
    /// The payload.
    pub payload: u64,
}

/// Interrupts and exceptions in flight. QEMU saves no error code for `exception_nr`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Events {
    /// Vector of an injected external interrupt, -1 for none.
    pub interrupt_injected: i32,
    /// Exception vector, -1 for none (injected unless `exception` says pending).
    pub exception_nr: i32,
    /// The event was a software interrupt.
    pub soft_interrupt: bool,
    /// An NMI is being injected.
    pub nmi_injected: bool,
    /// An NMI is pending.
    pub nmi_pending: bool,
    /// The exception has an error code (which QEMU does not send).
    pub has_error_code: bool,
    /// Subsection `cpu/exception_info`, when sent.
    pub exception: Option<ExceptionInfo>,
    /// A triple fault is pending (`cpu/triple_fault`).
    pub triple_fault: bool,
}

/// MSRs from the subsections. Absent subsections leave QEMU's reset value (see each).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Msrs {
    /// IA32_TSC_ADJUST (0).
    pub tsc_adjust: u64,
    /// IA32_TSC_DEADLINE (0).
    pub tsc_deadline: u64,
    /// IA32_MISC_ENABLE (1: fast strings).
    pub misc_enable: u64,
    /// IA32_FEATURE_CONTROL (0).
    pub feature_control: u64,
    /// KVM's MSR_KVM_POLL_CONTROL (1).
    pub poll_control: u64,
    /// MSR_SMI_COUNT (0).
    pub smi_count: u64,
    /// IA32_XSS (0).
    pub xss: u64,
    /// IA32_SPEC_CTRL (0).
    pub spec_ctrl: u64,
    /// PKRU (0).
    pub pkru: u32,
    /// IA32_PKRS (0).
    pub pkrs: u32,
    /// TSC frequency in kHz the source was told (0: not sent).
    pub tsc_khz: i64,
    /// Nested paging of an SVM guest: nCR3 and QEMU's paging mode (0, 0).
    pub nested_cr3: u64,
    /// See `nested_cr3`.
    pub nested_pg_mode: u32,
    /// SVM V_INTR state of a nested guest (0).
    pub svm_int_ctl: u32,
    /// PAE PDPTEs of a nested guest (`cpu/pdptrs`).
    pub pdptrs: Option<[u64; 4]>,
}

/// The state of one x86 vCPU from QEMU 7.2's `cpu` section.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct X86Cpu {
    /// RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8..R15 (QEMU's `R_*` order, the encoding's).
    pub regs: [u64; 16],
    /// RIP.
    pub rip: u64,
    /// RFLAGS.
    pub rflags: u64,
    /// QEMU's hidden flags (`HF_*`: CPL, CS32, SS32, PE, LMA, CS64, SMM, SVME, GUEST, ...).
    /// QEMU's loader replaces the CPL bits with SS.DPL; a restore should do the same.
    pub hflags: u32,
    /// `HF2_*`: GIF, NMI blocking, VINTR, NPT, ...
    pub hflags2: u32,
    /// ES, CS, SS, DS, FS, GS.
    pub segs: [Segment; 6],
    /// LDTR.
    pub ldt: Segment,
    /// TR.
    pub tr: Segment,
    /// GDTR (base and limit).
    pub gdt: Segment,
    /// IDTR (base and limit).
    pub idt: Segment,
    /// CR0.
    pub cr0: u64,
    /// CR2.
    pub cr2: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// DR0..DR7.
    pub dr: [u64; 8],
    /// EFER.
    pub efer: u64,
    /// STAR.
    pub star: u64,
    /// LSTAR.
    pub lstar: u64,
    /// CSTAR.
    pub cstar: u64,
    /// SFMASK.
    pub fmask: u64,
    /// KERNEL_GS_BASE.
    pub kernelgsbase: u64,
    /// SYSENTER_CS.
    pub sysenter_cs: u32,
    /// SYSENTER_ESP.
    pub sysenter_esp: u64,
    /// SYSENTER_EIP.
    pub sysenter_eip: u64,
    /// PAT.
    pub pat: u64,
    /// A20 mask (-1: A20 enabled).
    pub a20_mask: i32,
    /// SMBASE.
    pub smbase: u32,
    /// KVM's TSC value (0 under TCG: TCG's TSC is derived from the `timer` section).
    pub tsc: u64,
    /// TSC_AUX.
    pub tsc_aux: u64,
    /// KVM's MP state (0 = runnable; TCG leaves 0 and uses `cpu_common.halted`).
    pub mp_state: u32,
    /// SIPI vector.
    pub sipi_vector: u32,
    /// MTRRs: the 11 fixed-range registers, MTRRdefType, 8 variable (base, mask).
    pub mtrr_fixed: [u64; 11],
    /// MTRRdefType.
    pub mtrr_deftype: u64,
    /// Variable-range MTRRs (base, mask).
    pub mtrr_var: [(u64, u64); 8],
    /// Events in flight.
    pub events: Events,
    /// x87 / SSE / AVX state.
    pub fpu: Fpu,
    /// MSRs carried by subsections.
    pub msrs: Msrs,
    /// The subsections the record held: bit i = [`ALL`]`[i]`.
    pub subsections: u64,
}

impl X86Cpu {
    /// CS.
    pub const fn cs(&self) -> &Segment {
        &self.segs[1]
    }

    /// Whether the record held the subsection named `name` (e.g. `cpu/msr_smi_count`).
    pub fn has_subsection(&self, name: &str) -> bool {
        self.subsection_names().any(|n| n == name)
    }

    /// Names of the subsections the record held, in stream order.
    pub fn subsection_names(&self) -> impl Iterator<Item = &'static str> + '_ {
        ALL.iter().enumerate().filter(|(i, _)| self.subsections >> i & 1 != 0).map(|(_, s)| s.name)
    }

    fn from_wire(w: &CpuWire) -> Self {
        let seg = |i: usize| Segment::from_wire(&w.segs[i]);
        let fpu = Fpu {
            fcw: w.fpuc.get(),
            fsw: w.fpus.get(),
            ftw_valid: w.fptag.get(),
            regs: w.fpregs.map(|r| Fp80 { mantissa: r.tmp.mantissa.get(), exponent: r.tmp.exponent.get() }),
            mxcsr: w.mxcsr.get(),
            xmm: w.xmm.map(|x| x.get()),
            ymmh: w.ymmh.map(|y| y.0.get()),
            xcr0: w.xcr0.get(),
            xstate_bv: w.xstate_bv.get(),
            ..Fpu::default()
        };
        let events = Events {
            interrupt_injected: w.interrupt_injected.get(),
            exception_nr: w.exception_nr.get(),
            soft_interrupt: w.soft_interrupt != 0,
            nmi_injected: w.nmi_injected != 0,
            nmi_pending: w.nmi_pending != 0,
            has_error_code: w.has_error_code != 0,
            ..Events::default()
        };
        Self {
            regs: w.regs.map(|r| r.get()),
            rip: w.eip.get(),
            rflags: w.eflags.get(),
            hflags: w.hflags.get(),
            hflags2: w.hflags2.get(),
            segs: [seg(0), seg(1), seg(2), seg(3), seg(4), seg(5)],
            ldt: Segment::from_wire(&w.ldt),
            tr: Segment::from_wire(&w.tr),
            gdt: Segment::from_wire(&w.gdt),
            idt: Segment::from_wire(&w.idt),
            cr0: w.cr0.get(),
            cr2: w.cr2.get(),
            cr3: w.cr3.get(),
            cr4: w.cr4.get(),
            dr: w.dr.map(|d| d.get()),
            efer: w.efer.get(),
            star: w.star.get(),
            lstar: w.lstar.get(),
            cstar: w.cstar.get(),
            fmask: w.fmask.get(),
            kernelgsbase: w.kernelgsbase.get(),
            sysenter_cs: w.sysenter_cs.get(),
            sysenter_esp: w.sysenter_esp.get(),
            sysenter_eip: w.sysenter_eip.get(),
            pat: w.pat.get(),
            a20_mask: w.a20_mask.get(),
            smbase: w.smbase.get(),
            tsc: w.tsc.get(),
            tsc_aux: w.tsc_aux.get(),
            mp_state: w.mp_state.get(),
            sipi_vector: w.sipi_vector.get(),
            mtrr_fixed: w.mtrr_fixed.map(|m| m.get()),
            mtrr_deftype: w.mtrr_deftype.get(),
            mtrr_var: w.mtrr_var.map(|v| (v.base.get(), v.mask.get())),
            events,
            fpu,
            msrs: Msrs { misc_enable: 1, poll_control: 1, ..Msrs::default() },
            subsections: 0,
        }
    }

    /// Takes the values the image keeps from one subsection.
    fn take(&mut self, v: Values<'_>) {
        let m = &mut self.msrs;
        match v.layout.name {
            "cpu/exception_info" => {
                let (pending, injected, has_payload) = (v.get(0) != 0, v.get(1) != 0, v.get(2) != 0);
                self.events.exception =
                    Some(ExceptionInfo { pending, injected, has_payload, payload: v.get(3) });
            }
            "cpu/fpop_ip_dp" => {
                (self.fpu.fop, self.fpu.fip, self.fpu.fdp) = (v.get(0) as u16, v.get(1), v.get(2))
            }
            "cpu/msr_tsc_adjust" => m.tsc_adjust = v.get(0),
            "cpu/msr_tscdeadline" => m.tsc_deadline = v.get(0),
            "cpu/msr_ia32_misc_enable" => m.misc_enable = v.get(0),
            "cpu/msr_ia32_feature_control" => m.feature_control = v.get(0),
            "cpu/poll_control_msr" => m.poll_control = v.get(0),
            "cpu/msr_smi_count" => m.smi_count = v.get(0),
            "cpu/xss" => m.xss = v.get(0),
            "cpu/spec_ctrl" => m.spec_ctrl = v.get(0),
            "cpu/pkru" => m.pkru = v.get(0) as u32,
            "cpu/pkrs" => m.pkrs = v.get(0) as u32,
            "cpu/tsc_khz" => m.tsc_khz = v.get(0) as i64,
            "cpu/svn_npt" => (m.nested_cr3, m.nested_pg_mode) = (v.get(0), v.get(1) as u32),
            "cpu/svm_guest" => m.svm_int_ctl = v.get(0) as u32,
            "cpu/pdptrs" => m.pdptrs = Some([v.elem(0, 0), v.elem(0, 1), v.elem(0, 2), v.elem(0, 3)]),
            "cpu/triple_fault" => self.events.triple_fault = v.get(0) != 0,
            // Accepted and kept only as a bit of `subsections` (the image decides whether it
            // can run a guest that uses them).
            _ => {}
        }
    }
}

impl Device for X86Cpu {
    const IDSTR: &'static [u8] = b"cpu";
    const LAYOUT: &'static VmStruct = &CPU;
    const SUBSECTIONS: &'static [&'static VmStruct] = &ALL;

    fn decode_body(state: &[u8], at: usize) -> Result<(Self, usize), Error> {
        let (wire, end) = mirror::<CpuWire>(state, at, &CPU)?;
        if wire.fpregs_format.get() != 0 {
            // QEMU's post_load refuses it ("Unsupported old non-softfloat CPU state").
            let index = CPU.fields.iter().position(|f| f.name == "env.fpregs_format_vmstate").unwrap_or(0);
            let offset = at + core::mem::offset_of!(CpuWire, fpregs_format);
            let found = wire.fpregs_format.get().into();
            let field = Field::VmState(VmFieldRef::field(&CPU, index));
            return Err(error(offset, field, Defect::BadValue { found, expected: 0 }));
        }
        let mut cpu = Self::from_wire(wire);
        let (end, seen) = subsections(state, end, &CPU, &ALL, |v| cpu.take(v))?;
        cpu.subsections = seen;
        Ok((cpu, end))
    }
}

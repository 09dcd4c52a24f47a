//! The Virtual Machine Control Block (APM Vol. 2 appendix B): a 4 KiB page, the control area
//! (what to intercept, how to run, why it exited) at 0x000 and the guest's state save area at
//! 0x400. Every field's offset is checked against the manual's tables at compile time.

use core::mem::{offset_of, size_of};

/// A segment register in the state save area (APM Table B-2): selector, attributes (the
/// descriptor's type, S, DPL, P in bits 0-7 and AVL, L, D/B, G in bits 8-11), limit, base.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Selector.
    pub selector: u16,
    /// Attributes (VMCB format).
    pub attrib: u16,
    /// Limit.
    pub limit: u32,
    /// Base.
    pub base: u64,
}

/// Intercept bits of the first miscellaneous vector (offset 0x00c).
pub mod misc1 {
    /// Physical interrupts (INTR).
    pub const INTR: u32 = 1 << 0;
    /// NMI.
    pub const NMI: u32 = 1 << 1;
    /// CPUID.
    pub const CPUID: u32 = 1 << 18;
    /// HLT.
    pub const HLT: u32 = 1 << 24;
    /// IN/OUT, through the I/O permission map.
    pub const IOIO_PROT: u32 = 1 << 27;
    /// RDMSR/WRMSR, through the MSR permission map.
    pub const MSR_PROT: u32 = 1 << 28;
    /// Triple fault (SHUTDOWN).
    pub const SHUTDOWN: u32 = 1 << 31;
}

/// Intercept bits of the second miscellaneous vector (offset 0x010).
pub mod misc2 {
    /// VMRUN (required: a VMCB without it fails to run).
    pub const VMRUN: u32 = 1 << 0;
    /// VMMCALL.
    pub const VMMCALL: u32 = 1 << 1;
    /// VMLOAD.
    pub const VMLOAD: u32 = 1 << 2;
    /// VMSAVE.
    pub const VMSAVE: u32 = 1 << 3;
    /// STGI.
    pub const STGI: u32 = 1 << 4;
    /// CLGI.
    pub const CLGI: u32 = 1 << 5;
    /// SKINIT.
    pub const SKINIT: u32 = 1 << 6;
}

/// `v_intr` bit 24: virtual interrupt masking (the host's RFLAGS.IF masks physical interrupts
/// while the guest runs; the guest's IF only masks virtual ones).
pub const V_INTR_MASKING: u64 = 1 << 24;
/// `np_control` bit 0: nested paging on.
pub const NP_ENABLE: u64 = 1 << 0;

/// The VMCB.
#[repr(C, align(4096))]
#[derive(Debug, Clone)]
pub struct Vmcb {
    /// CR reads (bits 0-15) and writes (16-31) to intercept.
    pub intercept_cr: u32,
    /// DR reads and writes to intercept.
    pub intercept_dr: u32,
    /// Exception vectors to intercept (bit n: vector n).
    pub intercept_exceptions: u32,
    /// [`misc1`] intercepts.
    pub intercept_misc1: u32,
    /// [`misc2`] intercepts.
    pub intercept_misc2: u32,
    /// Further instruction intercepts.
    pub intercept_misc3: u32,
    _reserved0: [u8; 0x24],
    /// PAUSE filter threshold.
    pub pause_filter_threshold: u16,
    /// PAUSE filter count.
    pub pause_filter_count: u16,
    /// Physical address of the 12 KiB I/O permission map.
    pub iopm_base_pa: u64,
    /// Physical address of the 8 KiB MSR permission map.
    pub msrpm_base_pa: u64,
    /// Added to the guest's TSC.
    pub tsc_offset: u64,
    /// The guest's address-space id (not 0: that is the host's).
    pub guest_asid: u32,
    /// TLB flush on the next VMRUN ([`crate::stage2::TlbControl`]).
    pub tlb_control: u8,
    _reserved1: [u8; 3],
    /// Virtual interrupt control (V_TPR, V_IRQ, [`V_INTR_MASKING`]...).
    pub v_intr: u64,
    /// Interrupt shadow (bit 0).
    pub interrupt_shadow: u64,
    /// Why the guest exited.
    pub exitcode: u64,
    /// First exit information field.
    pub exitinfo1: u64,
    /// Second exit information field.
    pub exitinfo2: u64,
    /// An event that was being delivered when the exit happened.
    pub exitintinfo: u64,
    /// [`NP_ENABLE`] and related enables.
    pub np_control: u64,
    /// AVIC APIC BAR.
    pub avic_apic_bar: u64,
    /// Guest-physical address of the GHCB (SEV-ES).
    pub ghcb_pa: u64,
    /// An event to inject on VMRUN.
    pub event_inj: u64,
    /// The nested page table root (nCR3).
    pub n_cr3: u64,
    /// LBR virtualization enable.
    pub lbr_virtualization: u64,
    /// Which VMCB areas are unchanged since the last VMRUN (0: reload everything).
    pub vmcb_clean: u32,
    _reserved2: u32,
    /// The next RIP after the intercepted instruction (NRIP save feature only).
    pub nrip: u64,
    /// Instruction bytes fetched (decode assists only).
    pub bytes_fetched: u8,
    /// The bytes.
    pub guest_instruction_bytes: [u8; 15],
    _reserved3: [u8; 0x400 - 0xe0],

    /// ES.
    pub es: Segment,
    /// CS.
    pub cs: Segment,
    /// SS.
    pub ss: Segment,
    /// DS.
    pub ds: Segment,
    /// FS.
    pub fs: Segment,
    /// GS.
    pub gs: Segment,
    /// GDTR (base and limit).
    pub gdtr: Segment,
    /// LDTR.
    pub ldtr: Segment,
    /// IDTR (base and limit).
    pub idtr: Segment,
    /// TR.
    pub tr: Segment,
    _reserved4: [u8; 0x4cb - 0x4a0],
    /// Current privilege level.
    pub cpl: u8,
    _reserved5: u32,
    /// EFER (must have SVME).
    pub efer: u64,
    _reserved6: [u8; 0x548 - 0x4d8],
    /// CR4.
    pub cr4: u64,
    /// CR3.
    pub cr3: u64,
    /// CR0.
    pub cr0: u64,
    /// DR7.
    pub dr7: u64,
    /// DR6.
    pub dr6: u64,
    /// RFLAGS.
    pub rflags: u64,
    /// RIP.
    pub rip: u64,
    _reserved7: [u8; 0x5d8 - 0x580],
    /// RSP.
    pub rsp: u64,
    /// S_CET.
    pub s_cet: u64,
    /// SSP.
    pub ssp: u64,
    /// ISST_ADDR.
    pub isst_addr: u64,
    /// RAX.
    pub rax: u64,
    /// STAR.
    pub star: u64,
    /// LSTAR.
    pub lstar: u64,
    /// CSTAR.
    pub cstar: u64,
    /// SFMASK.
    pub sfmask: u64,
    /// KernelGsBase.
    pub kernel_gs_base: u64,
    /// SYSENTER_CS.
    pub sysenter_cs: u64,
    /// SYSENTER_ESP.
    pub sysenter_esp: u64,
    /// SYSENTER_EIP.
    pub sysenter_eip: u64,
    /// CR2.
    pub cr2: u64,
    _reserved8: [u8; 0x668 - 0x648],
    /// Guest PAT.
    pub g_pat: u64,
    _rest: [u8; 0x1000 - 0x670],
}

// The manual's offsets (APM Vol. 2, Tables B-1 and B-2).
const _: () = {
    assert!(size_of::<Vmcb>() == 0x1000);
    assert!(size_of::<Segment>() == 16);
    assert!(offset_of!(Vmcb, intercept_misc1) == 0x00c);
    assert!(offset_of!(Vmcb, intercept_misc2) == 0x010);
    assert!(offset_of!(Vmcb, pause_filter_threshold) == 0x03c);
    assert!(offset_of!(Vmcb, iopm_base_pa) == 0x040);
    assert!(offset_of!(Vmcb, msrpm_base_pa) == 0x048);
    assert!(offset_of!(Vmcb, tsc_offset) == 0x050);
    assert!(offset_of!(Vmcb, guest_asid) == 0x058);
    assert!(offset_of!(Vmcb, tlb_control) == 0x05c);
    assert!(offset_of!(Vmcb, v_intr) == 0x060);
    assert!(offset_of!(Vmcb, exitcode) == 0x070);
    assert!(offset_of!(Vmcb, exitinfo1) == 0x078);
    assert!(offset_of!(Vmcb, exitinfo2) == 0x080);
    assert!(offset_of!(Vmcb, exitintinfo) == 0x088);
    assert!(offset_of!(Vmcb, np_control) == 0x090);
    assert!(offset_of!(Vmcb, event_inj) == 0x0a8);
    assert!(offset_of!(Vmcb, n_cr3) == 0x0b0);
    assert!(offset_of!(Vmcb, vmcb_clean) == 0x0c0);
    assert!(offset_of!(Vmcb, nrip) == 0x0c8);
    assert!(offset_of!(Vmcb, es) == 0x400);
    assert!(offset_of!(Vmcb, cs) == 0x410);
    assert!(offset_of!(Vmcb, gdtr) == 0x460);
    assert!(offset_of!(Vmcb, idtr) == 0x480);
    assert!(offset_of!(Vmcb, tr) == 0x490);
    assert!(offset_of!(Vmcb, cpl) == 0x4cb);
    assert!(offset_of!(Vmcb, efer) == 0x4d0);
    assert!(offset_of!(Vmcb, cr4) == 0x548);
    assert!(offset_of!(Vmcb, cr3) == 0x550);
    assert!(offset_of!(Vmcb, cr0) == 0x558);
    assert!(offset_of!(Vmcb, rflags) == 0x570);
    assert!(offset_of!(Vmcb, rip) == 0x578);
    assert!(offset_of!(Vmcb, rsp) == 0x5d8);
    assert!(offset_of!(Vmcb, rax) == 0x5f8);
    assert!(offset_of!(Vmcb, star) == 0x600);
    assert!(offset_of!(Vmcb, cr2) == 0x640);
    assert!(offset_of!(Vmcb, g_pat) == 0x668);
};

impl Vmcb {
    /// An all-zero VMCB.
    pub const fn zeroed() -> Self {
        const ZERO: Segment = Segment { selector: 0, attrib: 0, limit: 0, base: 0 };
        Self {
            intercept_cr: 0,
            intercept_dr: 0,
            intercept_exceptions: 0,
            intercept_misc1: 0,
            intercept_misc2: 0,
            intercept_misc3: 0,
            _reserved0: [0; 0x24],
            pause_filter_threshold: 0,
            pause_filter_count: 0,
            iopm_base_pa: 0,
            msrpm_base_pa: 0,
            tsc_offset: 0,
            guest_asid: 0,
            tlb_control: 0,
            _reserved1: [0; 3],
            v_intr: 0,
            interrupt_shadow: 0,
            exitcode: 0,
            exitinfo1: 0,
            exitinfo2: 0,
            exitintinfo: 0,
            np_control: 0,
            avic_apic_bar: 0,
            ghcb_pa: 0,
            event_inj: 0,
            n_cr3: 0,
            lbr_virtualization: 0,
            vmcb_clean: 0,
            _reserved2: 0,
            nrip: 0,
            bytes_fetched: 0,
            guest_instruction_bytes: [0; 15],
            _reserved3: [0; 0x400 - 0xe0],
            es: ZERO,
            cs: ZERO,
            ss: ZERO,
            ds: ZERO,
            fs: ZERO,
            gs: ZERO,
            gdtr: ZERO,
            ldtr: ZERO,
            idtr: ZERO,
            tr: ZERO,
            _reserved4: [0; 0x4cb - 0x4a0],
            cpl: 0,
            _reserved5: 0,
            efer: 0,
            _reserved6: [0; 0x548 - 0x4d8],
            cr4: 0,
            cr3: 0,
            cr0: 0,
            dr7: 0,
            dr6: 0,
            rflags: 0,
            rip: 0,
            _reserved7: [0; 0x5d8 - 0x580],
            rsp: 0,
            s_cet: 0,
            ssp: 0,
            isst_addr: 0,
            rax: 0,
            star: 0,
            lstar: 0,
            cstar: 0,
            sfmask: 0,
            kernel_gs_base: 0,
            sysenter_cs: 0,
            sysenter_esp: 0,
            sysenter_eip: 0,
            cr2: 0,
            _reserved8: [0; 0x668 - 0x648],
            g_pat: 0,
            _rest: [0; 0x1000 - 0x670],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vmcb_is_one_page_and_fields_sit_at_the_manuals_offsets() {
        let mut v = std::boxed::Box::new(Vmcb::zeroed());
        v.exitcode = 0x400;
        v.rip = 0x1234;
        v.cs.attrib = 0x29b;
        // SAFETY: a Vmcb is plain integers, 4096 bytes; viewing it as bytes is sound.
        let bytes = unsafe { core::slice::from_raw_parts((&*v as *const Vmcb).cast::<u8>(), 4096) };
        assert_eq!(&bytes[0x70..0x78], &0x400u64.to_le_bytes());
        assert_eq!(&bytes[0x578..0x580], &0x1234u64.to_le_bytes());
        assert_eq!(&bytes[0x412..0x414], &0x29bu16.to_le_bytes());
        assert_eq!(core::mem::align_of::<Vmcb>(), 4096);
    }
}

//! VMCS field encodings (SDM Vol. 3C appendix B) and the capability MSRs (appendix A).
//!
//! An encoding's bits: 0 access type (0 full), 9:1 index, 11:10 type (0 control, 1 read-only
//! data, 2 guest state, 3 host state), 14:13 width (0 16-bit, 1 64-bit, 2 32-bit, 3 natural).
//! The host tests below check every constant against that structure.

#![allow(missing_docs)]

// 16-bit guest state.
pub const GUEST_ES_SELECTOR: u32 = 0x0800;
pub const GUEST_CS_SELECTOR: u32 = 0x0802;
pub const GUEST_SS_SELECTOR: u32 = 0x0804;
pub const GUEST_DS_SELECTOR: u32 = 0x0806;
pub const GUEST_FS_SELECTOR: u32 = 0x0808;
pub const GUEST_GS_SELECTOR: u32 = 0x080a;
pub const GUEST_LDTR_SELECTOR: u32 = 0x080c;
pub const GUEST_TR_SELECTOR: u32 = 0x080e;
// 16-bit host state.
pub const HOST_ES_SELECTOR: u32 = 0x0c00;
pub const HOST_CS_SELECTOR: u32 = 0x0c02;
pub const HOST_SS_SELECTOR: u32 = 0x0c04;
pub const HOST_DS_SELECTOR: u32 = 0x0c06;
pub const HOST_FS_SELECTOR: u32 = 0x0c08;
pub const HOST_GS_SELECTOR: u32 = 0x0c0a;
pub const HOST_TR_SELECTOR: u32 = 0x0c0c;
// 64-bit control.
pub const EPT_POINTER: u32 = 0x201a;
// 64-bit read-only data.
pub const GUEST_PHYSICAL_ADDRESS: u32 = 0x2400;
// 64-bit guest state.
pub const VMCS_LINK_POINTER: u32 = 0x2800;
pub const GUEST_IA32_PAT: u32 = 0x2804;
pub const GUEST_IA32_EFER: u32 = 0x2806;
// 64-bit host state.
pub const HOST_IA32_PAT: u32 = 0x2c00;
pub const HOST_IA32_EFER: u32 = 0x2c02;
// 32-bit control.
pub const PIN_BASED_CONTROLS: u32 = 0x4000;
pub const PROC_BASED_CONTROLS: u32 = 0x4002;
pub const EXCEPTION_BITMAP: u32 = 0x4004;
pub const EXIT_CONTROLS: u32 = 0x400c;
pub const ENTRY_CONTROLS: u32 = 0x4012;
pub const SECONDARY_PROC_BASED_CONTROLS: u32 = 0x401e;
// 32-bit read-only data.
pub const VM_INSTRUCTION_ERROR: u32 = 0x4400;
pub const EXIT_REASON: u32 = 0x4402;
pub const EXIT_INTERRUPTION_INFO: u32 = 0x4404;
pub const EXIT_INTERRUPTION_ERROR: u32 = 0x4406;
pub const EXIT_INSTRUCTION_LEN: u32 = 0x440c;
// 32-bit guest state.
pub const GUEST_ES_LIMIT: u32 = 0x4800;
pub const GUEST_CS_LIMIT: u32 = 0x4802;
pub const GUEST_SS_LIMIT: u32 = 0x4804;
pub const GUEST_DS_LIMIT: u32 = 0x4806;
pub const GUEST_FS_LIMIT: u32 = 0x4808;
pub const GUEST_GS_LIMIT: u32 = 0x480a;
pub const GUEST_LDTR_LIMIT: u32 = 0x480c;
pub const GUEST_TR_LIMIT: u32 = 0x480e;
pub const GUEST_GDTR_LIMIT: u32 = 0x4810;
pub const GUEST_IDTR_LIMIT: u32 = 0x4812;
pub const GUEST_ES_ACCESS_RIGHTS: u32 = 0x4814;
pub const GUEST_CS_ACCESS_RIGHTS: u32 = 0x4816;
pub const GUEST_SS_ACCESS_RIGHTS: u32 = 0x4818;
pub const GUEST_DS_ACCESS_RIGHTS: u32 = 0x481a;
pub const GUEST_FS_ACCESS_RIGHTS: u32 = 0x481c;
pub const GUEST_GS_ACCESS_RIGHTS: u32 = 0x481e;
pub const GUEST_LDTR_ACCESS_RIGHTS: u32 = 0x4820;
pub const GUEST_TR_ACCESS_RIGHTS: u32 = 0x4822;
pub const GUEST_INTERRUPTIBILITY: u32 = 0x4824;
pub const GUEST_ACTIVITY_STATE: u32 = 0x4826;
pub const GUEST_SYSENTER_CS: u32 = 0x482a;
// 32-bit host state.
pub const HOST_SYSENTER_CS: u32 = 0x4c00;
// Natural-width control.
pub const CR0_GUEST_HOST_MASK: u32 = 0x6000;
pub const CR4_GUEST_HOST_MASK: u32 = 0x6002;
pub const CR0_READ_SHADOW: u32 = 0x6004;
pub const CR4_READ_SHADOW: u32 = 0x6006;
// Natural-width read-only data.
pub const EXIT_QUALIFICATION: u32 = 0x6400;
// Natural-width guest state.
pub const GUEST_CR0: u32 = 0x6800;
pub const GUEST_CR3: u32 = 0x6802;
pub const GUEST_CR4: u32 = 0x6804;
pub const GUEST_ES_BASE: u32 = 0x6806;
pub const GUEST_CS_BASE: u32 = 0x6808;
pub const GUEST_SS_BASE: u32 = 0x680a;
pub const GUEST_DS_BASE: u32 = 0x680c;
pub const GUEST_FS_BASE: u32 = 0x680e;
pub const GUEST_GS_BASE: u32 = 0x6810;
pub const GUEST_LDTR_BASE: u32 = 0x6812;
pub const GUEST_TR_BASE: u32 = 0x6814;
pub const GUEST_GDTR_BASE: u32 = 0x6816;
pub const GUEST_IDTR_BASE: u32 = 0x6818;
pub const GUEST_DR7: u32 = 0x681a;
pub const GUEST_RSP: u32 = 0x681c;
pub const GUEST_RIP: u32 = 0x681e;
pub const GUEST_RFLAGS: u32 = 0x6820;
pub const GUEST_SYSENTER_ESP: u32 = 0x6824;
pub const GUEST_SYSENTER_EIP: u32 = 0x6826;
// Natural-width host state.
pub const HOST_CR0: u32 = 0x6c00;
pub const HOST_CR3: u32 = 0x6c02;
pub const HOST_CR4: u32 = 0x6c04;
pub const HOST_FS_BASE: u32 = 0x6c06;
pub const HOST_GS_BASE: u32 = 0x6c08;
pub const HOST_TR_BASE: u32 = 0x6c0a;
pub const HOST_GDTR_BASE: u32 = 0x6c0c;
pub const HOST_IDTR_BASE: u32 = 0x6c0e;
pub const HOST_SYSENTER_ESP: u32 = 0x6c10;
pub const HOST_SYSENTER_EIP: u32 = 0x6c12;
pub const HOST_RSP: u32 = 0x6c14;
pub const HOST_RIP: u32 = 0x6c16;

/// Capability MSRs (SDM Vol. 3C appendix A).
pub mod msr {
    pub const IA32_FEATURE_CONTROL: u32 = 0x3a;
    pub const IA32_VMX_BASIC: u32 = 0x480;
    pub const IA32_VMX_PINBASED_CTLS: u32 = 0x481;
    pub const IA32_VMX_PROCBASED_CTLS: u32 = 0x482;
    pub const IA32_VMX_EXIT_CTLS: u32 = 0x483;
    pub const IA32_VMX_ENTRY_CTLS: u32 = 0x484;
    pub const IA32_VMX_CR0_FIXED0: u32 = 0x486;
    pub const IA32_VMX_CR0_FIXED1: u32 = 0x487;
    pub const IA32_VMX_CR4_FIXED0: u32 = 0x488;
    pub const IA32_VMX_CR4_FIXED1: u32 = 0x489;
    pub const IA32_VMX_PROCBASED_CTLS2: u32 = 0x48b;
    pub const IA32_VMX_EPT_VPID_CAP: u32 = 0x48c;
    pub const IA32_VMX_TRUE_PINBASED_CTLS: u32 = 0x48d;
    pub const IA32_VMX_TRUE_PROCBASED_CTLS: u32 = 0x48e;
    pub const IA32_VMX_TRUE_EXIT_CTLS: u32 = 0x48f;
    pub const IA32_VMX_TRUE_ENTRY_CTLS: u32 = 0x490;
}

/// Control bits the image uses (SDM Vol. 3C §24.6-24.8).
pub mod ctl {
    /// Pin-based: external interrupts exit.
    pub const PIN_EXTERNAL_INTERRUPT_EXITING: u32 = 1 << 0;
    /// Pin-based: NMIs exit.
    pub const PIN_NMI_EXITING: u32 = 1 << 3;
    /// Primary: HLT exits.
    pub const PROC_HLT_EXITING: u32 = 1 << 7;
    /// Primary: every IN/OUT exits.
    pub const PROC_UNCONDITIONAL_IO_EXITING: u32 = 1 << 24;
    /// Primary: the secondary controls apply.
    pub const PROC_ACTIVATE_SECONDARY: u32 = 1 << 31;
    /// Secondary: EPT.
    pub const PROC2_ENABLE_EPT: u32 = 1 << 1;
    /// Exit: the host runs in 64-bit mode.
    pub const EXIT_HOST_ADDRESS_SPACE_SIZE: u32 = 1 << 9;
    /// Exit: save the guest's IA32_EFER.
    pub const EXIT_SAVE_IA32_EFER: u32 = 1 << 20;
    /// Exit: load the host's IA32_EFER.
    pub const EXIT_LOAD_IA32_EFER: u32 = 1 << 21;
    /// Entry: the guest runs in IA-32e mode.
    pub const ENTRY_IA32E_MODE_GUEST: u32 = 1 << 9;
    /// Entry: load the guest's IA32_EFER.
    pub const ENTRY_LOAD_IA32_EFER: u32 = 1 << 15;
}

/// A control value from what the image wants and the capability MSR's allowed settings:
/// bits 31:0 of the MSR must be 1 (allowed-0), bits 63:32 may be 1 (allowed-1) (SDM Vol. 3C
/// §A.3). `Err` names the wanted bits the CPU does not allow.
pub const fn adjust_controls(wanted: u32, capability: u64) -> Result<u32, u32> {
    let must_be_one = capability as u32;
    let may_be_one = (capability >> 32) as u32;
    let refused = wanted & !may_be_one;
    if refused != 0 {
        return Err(refused);
    }
    Ok((wanted | must_be_one) & may_be_one)
}

/// A control register value that satisfies the FIXED0 (must be 1) and FIXED1 (may be 1) MSRs
/// (SDM Vol. 3C §A.7, A.8).
pub const fn fixed(value: u64, fixed0: u64, fixed1: u64) -> u64 {
    (value | fixed0) & fixed1
}

/// VMX access rights from SVM's compact segment attributes: bits 0-7 stay, AVL/L/D-B/G move
/// from bits 8-11 to 12-15, and a null selector with no attributes is unusable (bit 16).
pub const fn access_rights(attrib: u16) -> u32 {
    if attrib == 0 {
        return 1 << 16;
    }
    (attrib as u32 & 0xff) | ((attrib as u32 & 0xf00) << 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (width, type) of an encoding: width 0 16-bit, 1 64-bit, 2 32-bit, 3 natural; type 0
    /// control, 1 read-only, 2 guest, 3 host.
    fn kind(encoding: u32) -> (u32, u32) {
        assert_eq!(encoding & 1, 0, "{encoding:#x}: full access");
        ((encoding >> 13) & 3, (encoding >> 10) & 3)
    }

    #[test]
    fn every_encoding_has_the_width_and_type_of_its_group() {
        let groups: [(&[u32], (u32, u32)); 12] = [
            (&[GUEST_ES_SELECTOR, GUEST_CS_SELECTOR, GUEST_TR_SELECTOR, GUEST_LDTR_SELECTOR], (0, 2)),
            (&[HOST_ES_SELECTOR, HOST_CS_SELECTOR, HOST_TR_SELECTOR], (0, 3)),
            (&[EPT_POINTER], (1, 0)),
            (&[GUEST_PHYSICAL_ADDRESS], (1, 1)),
            (&[VMCS_LINK_POINTER, GUEST_IA32_EFER, GUEST_IA32_PAT], (1, 2)),
            (&[HOST_IA32_EFER, HOST_IA32_PAT], (1, 3)),
            (
                &[
                    PIN_BASED_CONTROLS,
                    PROC_BASED_CONTROLS,
                    EXIT_CONTROLS,
                    ENTRY_CONTROLS,
                    SECONDARY_PROC_BASED_CONTROLS,
                ],
                (2, 0),
            ),
            (&[VM_INSTRUCTION_ERROR, EXIT_REASON, EXIT_INSTRUCTION_LEN, EXIT_INTERRUPTION_INFO], (2, 1)),
            (&[GUEST_CS_LIMIT, GUEST_TR_ACCESS_RIGHTS, GUEST_INTERRUPTIBILITY, GUEST_ACTIVITY_STATE], (2, 2)),
            (&[EXIT_QUALIFICATION], (3, 1)),
            (&[GUEST_CR0, GUEST_RIP, GUEST_RSP, GUEST_RFLAGS, GUEST_GDTR_BASE], (3, 2)),
            (&[HOST_CR0, HOST_RIP, HOST_RSP, HOST_TR_BASE, HOST_IDTR_BASE], (3, 3)),
        ];
        for (fields, expected) in groups {
            for &f in fields {
                assert_eq!(kind(f), expected, "{f:#x}");
            }
        }
        // Indexes in the manual's order within a group.
        assert_eq!((GUEST_TR_SELECTOR >> 1) & 0x1ff, 7);
        assert_eq!((HOST_RIP >> 1) & 0x1ff, 11);
        assert_eq!((GUEST_TR_ACCESS_RIGHTS >> 1) & 0x1ff, 17);
    }

    #[test]
    fn controls_honour_the_allowed_settings() {
        // Bits 1, 2, 4 must be 1; bits 0-7 and 31 may be.
        let cap = 0x8000_00ff_0000_0016;
        assert_eq!(adjust_controls(1 << 0, cap), Ok(0x17));
        assert_eq!(adjust_controls(1 << 31, cap), Ok(0x8000_0016));
        assert_eq!(adjust_controls(1 << 8 | 1, cap), Err(1 << 8));
        assert_eq!(fixed(0x1, 0x8000_0021, 0xffff_ffff), 0x8000_0021);
        assert_eq!(fixed(0x4000_0000, 0, 0xbfff_ffff), 0);
    }

    #[test]
    fn access_rights_from_compact_attributes() {
        assert_eq!(access_rights(0x29b), 0x209b, "64-bit code: L moves to bit 13");
        assert_eq!(access_rights(0xc93), 0xc093, "flat data: D/B and G to bits 14, 15");
        assert_eq!(access_rights(0x08b), 0x008b, "busy TSS");
        assert_eq!(access_rights(0), 1 << 16, "unusable");
    }
}

//! The subsections of `cpu` in QEMU 7.2 (x86_64), in the order QEMU lists (and sends) them,
//! each sent only when its `needed` function says so. All are version 1 and fixed-size.
//! TCG with `-cpu qemu64` on `pc`/`q35` sent `poll_control_msr` (TCG leaves the MSR at 0,
//! and it is needed when not 1) and `msr_smi_count` (SeaBIOS' SMIs) in every capture.
//!
//! Left out: `cpu/nested_state` (KVM nested virtualization only, variable-sized) and
//! `cpu/efer32` (32-bit targets). Both are refused as unknown subsections.

use super::layout::{seq, VmField, VmKind, VmStruct};

const U8: VmKind = VmKind::Uint8;
const U16: VmKind = VmKind::Uint16;
const U32: VmKind = VmKind::Uint32;
const U64: VmKind = VmKind::Uint64;

const fn scalar(name: &'static str, kind: VmKind) -> VmField {
    VmField::scalar(name, kind)
}

/// A subsection holding one field.
macro_rules! single {
    ($id:ident, $name:literal, $field:literal, $kind:expr) => {
        #[doc = concat!("`", $name, "`.")]
        pub static $id: VmStruct =
            VmStruct { name: $name, version: 1, fields: &seq([scalar($field, $kind)]) };
    };
}

/// `cpu/exception_info`: an exception pending while the vCPU ran a nested guest.
pub static EXCEPTION_INFO: VmStruct = VmStruct {
    name: "cpu/exception_info",
    version: 1,
    fields: &seq([
        scalar("env.exception_pending", U8),
        scalar("env.exception_injected", U8),
        scalar("env.exception_has_payload", U8),
        scalar("env.exception_payload", U64),
    ]),
};
single!(ASYNC_PF_MSR, "cpu/async_pf_msr", "env.async_pf_en_msr", U64);
single!(ASYNC_PF_INT_MSR, "cpu/async_pf_int_msr", "env.async_pf_int_msr", U64);
single!(PV_EOI_MSR, "cpu/async_pv_eoi_msr", "env.pv_eoi_en_msr", U64);
single!(STEAL_TIME_MSR, "cpu/steal_time_msr", "env.steal_time_msr", U64);
single!(POLL_CONTROL_MSR, "cpu/poll_control_msr", "env.poll_control_msr", U64);
/// `cpu/fpop_ip_dp`: the last x87 opcode, instruction and data pointers.
pub static FPOP_IP_DP: VmStruct = VmStruct {
    name: "cpu/fpop_ip_dp",
    version: 1,
    fields: &seq([scalar("env.fpop", U16), scalar("env.fpip", U64), scalar("env.fpdp", U64)]),
};
single!(MSR_TSC_ADJUST, "cpu/msr_tsc_adjust", "env.tsc_adjust", U64);
single!(MSR_TSCDEADLINE, "cpu/msr_tscdeadline", "env.tsc_deadline", U64);
single!(MSR_IA32_MISC_ENABLE, "cpu/msr_ia32_misc_enable", "env.msr_ia32_misc_enable", U64);
single!(MSR_IA32_FEATURE_CONTROL, "cpu/msr_ia32_feature_control", "env.msr_ia32_feature_control", U64);
/// `cpu/msr_architectural_pmu` (3 fixed and 18 general counters).
pub static MSR_ARCHITECTURAL_PMU: VmStruct = VmStruct {
    name: "cpu/msr_architectural_pmu",
    version: 1,
    fields: &seq([
        scalar("env.msr_fixed_ctr_ctrl", U64),
        scalar("env.msr_global_ctrl", U64),
        scalar("env.msr_global_status", U64),
        scalar("env.msr_global_ovf_ctrl", U64),
        VmField::array("env.msr_fixed_counters", U64, 3),
        VmField::array("env.msr_gp_counters", U64, 18),
        VmField::array("env.msr_gp_evtsel", U64, 18),
    ]),
};
static BND_REGS: VmStruct =
    VmStruct { name: "bnd_regs", version: 1, fields: &seq([scalar("lb", U64), scalar("ub", U64)]) };
/// `cpu/mpx`.
pub static MPX: VmStruct = VmStruct {
    name: "cpu/mpx",
    version: 1,
    fields: &seq([
        VmField::structs("env.bnd_regs", &BND_REGS, 4),
        scalar("env.bndcs_regs.cfgu", U64),
        scalar("env.bndcs_regs.sts", U64),
        scalar("env.msr_bndcfgs", U64),
    ]),
};
/// `cpu/msr_hyperv_hypercall`.
pub static MSR_HYPERV_HYPERCALL: VmStruct = VmStruct {
    name: "cpu/msr_hyperv_hypercall",
    version: 1,
    fields: &seq([scalar("env.msr_hv_guest_os_id", U64), scalar("env.msr_hv_hypercall", U64)]),
};
single!(MSR_HYPERV_VAPIC, "cpu/msr_hyperv_vapic", "env.msr_hv_vapic", U64);
single!(MSR_HYPERV_TIME, "cpu/msr_hyperv_time", "env.msr_hv_tsc", U64);
/// `cpu/msr_hyperv_crash` (5 parameters).
pub static MSR_HYPERV_CRASH: VmStruct = VmStruct {
    name: "cpu/msr_hyperv_crash",
    version: 1,
    fields: &seq([VmField::array("env.msr_hv_crash_params", U64, 5)]),
};
single!(MSR_HYPERV_RUNTIME, "cpu/msr_hyperv_runtime", "env.msr_hv_runtime", U64);
/// `cpu/msr_hyperv_synic` (16 SINTs).
pub static MSR_HYPERV_SYNIC: VmStruct = VmStruct {
    name: "cpu/msr_hyperv_synic",
    version: 1,
    fields: &seq([
        scalar("env.msr_hv_synic_control", U64),
        scalar("env.msr_hv_synic_evt_page", U64),
        scalar("env.msr_hv_synic_msg_page", U64),
        VmField::array("env.msr_hv_synic_sint", U64, 16),
    ]),
};
/// `cpu/msr_hyperv_stimer` (4 timers).
pub static MSR_HYPERV_STIMER: VmStruct = VmStruct {
    name: "cpu/msr_hyperv_stimer",
    version: 1,
    fields: &seq([
        VmField::array("env.msr_hv_stimer_config", U64, 4),
        VmField::array("env.msr_hv_stimer_count", U64, 4),
    ]),
};
/// `cpu/msr_hyperv_reenlightenment`.
pub static MSR_HYPERV_REENLIGHTENMENT: VmStruct = VmStruct {
    name: "cpu/msr_hyperv_reenlightenment",
    version: 1,
    fields: &seq([
        scalar("env.msr_hv_reenlightenment_control", U64),
        scalar("env.msr_hv_tsc_emulation_control", U64),
        scalar("env.msr_hv_tsc_emulation_status", U64),
    ]),
};
static ZMMH_REG: VmStruct = VmStruct {
    name: "zmmh_reg",
    version: 1,
    fields: &seq([
        scalar("_q_ZMMReg[4]", U64),
        scalar("_q_ZMMReg[5]", U64),
        scalar("_q_ZMMReg[6]", U64),
        scalar("_q_ZMMReg[7]", U64),
    ]),
};
static HI16_ZMM_REG: VmStruct = VmStruct {
    name: "hi16_zmm_reg",
    version: 1,
    fields: &seq([
        scalar("_q_ZMMReg[0]", U64),
        scalar("_q_ZMMReg[1]", U64),
        scalar("_q_ZMMReg[2]", U64),
        scalar("_q_ZMMReg[3]", U64),
        scalar("_q_ZMMReg[4]", U64),
        scalar("_q_ZMMReg[5]", U64),
        scalar("_q_ZMMReg[6]", U64),
        scalar("_q_ZMMReg[7]", U64),
    ]),
};
/// `cpu/avx512`: opmasks, ZMM0..15 bits 256..511, ZMM16..31 whole.
pub static AVX512: VmStruct = VmStruct {
    name: "cpu/avx512",
    version: 1,
    fields: &seq([
        VmField::array("env.opmask_regs", U64, 8),
        VmField::structs("env.xmm_regs[0]", &ZMMH_REG, 16),
        VmField::structs("env.xmm_regs[1]", &HI16_ZMM_REG, 16),
    ]),
};
single!(XSS, "cpu/xss", "env.xss", U64);
single!(UMWAIT, "cpu/umwait", "env.umwait", U32);
single!(TSC_KHZ, "cpu/tsc_khz", "env.tsc_khz", VmKind::Int64);
single!(MSR_SMI_COUNT, "cpu/msr_smi_count", "env.msr_smi_count", U64);
single!(PKRU, "cpu/pkru", "env.pkru", U32);
single!(PKRS, "cpu/pkrs", "env.pkrs", U32);
single!(SPEC_CTRL, "cpu/spec_ctrl", "env.spec_ctrl", U64);
single!(AMD_TSC_SCALE_MSR, "cpu/amd_tsc_scale_msr", "env.amd_tsc_scale_msr", U64);
single!(MCG_EXT_CTL, "cpu/mcg_ext_ctl", "env.mcg_ext_ctl", U64);
/// `cpu/intel_pt` (8 address ranges).
pub static INTEL_PT: VmStruct = VmStruct {
    name: "cpu/intel_pt",
    version: 1,
    fields: &seq([
        scalar("env.msr_rtit_ctrl", U64),
        scalar("env.msr_rtit_status", U64),
        scalar("env.msr_rtit_output_base", U64),
        scalar("env.msr_rtit_output_mask", U64),
        scalar("env.msr_rtit_cr3_match", U64),
        VmField::array("env.msr_rtit_addrs", U64, 8),
    ]),
};
single!(VIRT_SSBD, "cpu/virt_ssbd", "env.virt_ssbd", U64);
/// `cpu/svn_npt` (sic, QEMU's spelling): nested paging of a guest running its own SVM guest.
pub static SVM_NPT: VmStruct = VmStruct {
    name: "cpu/svn_npt",
    version: 1,
    fields: &seq([scalar("env.nested_cr3", U64), scalar("env.nested_pg_mode", U32)]),
};
single!(SVM_GUEST, "cpu/svm_guest", "env.int_ctl", U32);
single!(MSR_TSX_CTRL, "cpu/msr_tsx_ctrl", "env.tsx_ctrl", U32);
/// `cpu/intel_sgx`.
pub static INTEL_SGX: VmStruct = VmStruct {
    name: "cpu/intel_sgx",
    version: 1,
    fields: &seq([VmField::array("env.msr_ia32_sgxlepubkeyhash", U64, 4)]),
};
/// `cpu/pdptrs`: the PAE PDPTEs a nested guest was entered with.
pub static PDPTRS: VmStruct =
    VmStruct { name: "cpu/pdptrs", version: 1, fields: &seq([VmField::array("env.pdptrs", U64, 4)]) };
/// `cpu/msr_xfd`.
pub static MSR_XFD: VmStruct = VmStruct {
    name: "cpu/msr_xfd",
    version: 1,
    fields: &seq([scalar("env.msr_xfd", U64), scalar("env.msr_xfd_err", U64)]),
};
/// `cpu/intel_amx_xtile`: tile configuration and 8 KiB of tile data.
pub static INTEL_AMX_XTILE: VmStruct = VmStruct {
    name: "cpu/intel_amx_xtile",
    version: 1,
    fields: &seq([VmField::array("env.xtilecfg", U8, 64), VmField::array("env.xtiledata", U8, 8192)]),
};
static LBR_RECORDS_VAR: VmStruct = VmStruct {
    name: "lbr_records_var",
    version: 1,
    fields: &seq([scalar("from", U64), scalar("to", U64), scalar("info", U64)]),
};
/// `cpu/arch_lbr` (32 records).
pub static ARCH_LBR: VmStruct = VmStruct {
    name: "cpu/arch_lbr",
    version: 1,
    fields: &seq([
        scalar("env.msr_lbr_ctl", U64),
        scalar("env.msr_lbr_depth", U64),
        VmField::structs("env.lbr_records", &LBR_RECORDS_VAR, 32),
    ]),
};
single!(TRIPLE_FAULT, "cpu/triple_fault", "env.triple_fault_pending", U8);

/// QEMU 7.2's list, in its order.
pub static ALL: [&VmStruct; 42] = [
    &EXCEPTION_INFO,
    &ASYNC_PF_MSR,
    &ASYNC_PF_INT_MSR,
    &PV_EOI_MSR,
    &STEAL_TIME_MSR,
    &POLL_CONTROL_MSR,
    &FPOP_IP_DP,
    &MSR_TSC_ADJUST,
    &MSR_TSCDEADLINE,
    &MSR_IA32_MISC_ENABLE,
    &MSR_IA32_FEATURE_CONTROL,
    &MSR_ARCHITECTURAL_PMU,
    &MPX,
    &MSR_HYPERV_HYPERCALL,
    &MSR_HYPERV_VAPIC,
    &MSR_HYPERV_TIME,
    &MSR_HYPERV_CRASH,
    &MSR_HYPERV_RUNTIME,
    &MSR_HYPERV_SYNIC,
    &MSR_HYPERV_STIMER,
    &MSR_HYPERV_REENLIGHTENMENT,
    &AVX512,
    &XSS,
    &UMWAIT,
    &TSC_KHZ,
    &MSR_SMI_COUNT,
    &PKRU,
    &PKRS,
    &SPEC_CTRL,
    &AMD_TSC_SCALE_MSR,
    &MCG_EXT_CTL,
    &INTEL_PT,
    &VIRT_SSBD,
    &SVM_NPT,
    &SVM_GUEST,
    &MSR_TSX_CTRL,
    &INTEL_SGX,
    &PDPTRS,
    &MSR_XFD,
    &INTEL_AMX_XTILE,
    &ARCH_LBR,
    &TRIPLE_FAULT,
];

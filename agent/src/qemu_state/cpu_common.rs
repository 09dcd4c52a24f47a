//! The `cpu_common` section (QEMU 7.2 `cpu.c`, `vmstate_cpu_common`, version 1): the
//! accelerator-independent part of a vCPU. Instance = the vCPU's index.

use zerocopy::byteorder::big_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::body::{mirror, subsections};
use super::layout::{seq, vm_field, VmField, VmKind, VmStruct};
use super::Device;
use crate::error::Error;

/// The fields of `cpu_common`.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct CpuCommonWire {
    /// `halted`: the vCPU executed HLT and waits for an interrupt.
    pub halted: U32,
    /// `interrupt_request`: `CPU_INTERRUPT_*` bits (0x2 HARD: the interrupt line is up).
    pub interrupt_request: U32,
}

/// `cpu_common`, version 1.
pub static CPU_COMMON: VmStruct = VmStruct {
    name: "cpu_common",
    version: 1,
    fields: &[
        vm_field!(CpuCommonWire, "halted", halted),
        vm_field!(CpuCommonWire, "interrupt_request", interrupt_request),
    ],
};

const _: () = assert!(CPU_COMMON.lays_out(core::mem::size_of::<CpuCommonWire>()));

/// `cpu_common/exception_index`: sent under TCG when an exception is being raised.
pub static EXCEPTION_INDEX: VmStruct = VmStruct {
    name: "cpu_common/exception_index",
    version: 1,
    fields: &seq([VmField::scalar("exception_index", VmKind::Int32)]),
};

/// `cpu_common/crash_occurred`: the guest reported a panic (pvpanic, Hyper-V crash MSRs).
pub static CRASH_OCCURRED: VmStruct = VmStruct {
    name: "cpu_common/crash_occurred",
    version: 1,
    fields: &seq([VmField::scalar("crash_occurred", VmKind::Bool)]),
};

/// QEMU 7.2's list, in its order.
pub static SUBSECTIONS: [&VmStruct; 2] = [&EXCEPTION_INDEX, &CRASH_OCCURRED];

/// The decoded `cpu_common` section.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuCommon {
    /// The vCPU is halted (HLT), waiting for an interrupt.
    pub halted: u32,
    /// `CPU_INTERRUPT_*` bits pending (0x2: a hardware interrupt is requested by the PIC or
    /// APIC; the captures' guest runs with interrupts off, so the PIT's IRQ0 stays pending).
    pub interrupt_request: u32,
    /// `cpu_common/exception_index`, when sent (QEMU's default is -1: none).
    pub exception_index: Option<i32>,
    /// `cpu_common/crash_occurred`.
    pub crash_occurred: bool,
}

impl Device for CpuCommon {
    const IDSTR: &'static [u8] = b"cpu_common";
    const LAYOUT: &'static VmStruct = &CPU_COMMON;
    const SUBSECTIONS: &'static [&'static VmStruct] = &SUBSECTIONS;

    fn decode_body(state: &[u8], at: usize) -> Result<(Self, usize), Error> {
        let (w, end) = mirror::<CpuCommonWire>(state, at, &CPU_COMMON)?;
        let mut c =
            Self { halted: w.halted.get(), interrupt_request: w.interrupt_request.get(), ..Self::default() };
        let (end, _) = subsections(state, end, &CPU_COMMON, &SUBSECTIONS, |v| match v.layout.name {
            "cpu_common/exception_index" => c.exception_index = Some(v.get(0) as u32 as i32),
            _ => c.crash_occurred = v.get(0) != 0,
        })?;
        Ok((c, end))
    }
}

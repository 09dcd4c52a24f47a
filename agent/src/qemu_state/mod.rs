//! QEMU 7.2 device state the image decodes: the vCPU (`cpu`, `cpu_common`), the virtual
//! clock (`timer`) and the PIT (`i8254`), from the FULL records of a migration's device
//! state (`docs/wire-format.md`, "QEMU device state the image decodes").
//!
//! Layouts come from QEMU 7.2's own descriptions (`target/i386/machine.c`, `cpu.c`,
//! `softmmu/cpu-timers.c`, `hw/timer/i8254_common.c`) and are checked against the
//! VMDESCRIPTION JSON of real streams (`agent/tests/qemu_state.rs`). Everything is
//! big-endian, fixed-size and bounds-checked: no input panics, and every defect is an
//! [`Error`] whose offset is in the device state given and whose field is the VMState field
//! ([`crate::Field::VmState`]), the section header or the footer.
//!
//! ```ignore
//! let cpu = X86Cpu::find(device_state, 0)?;      // Result<Option<X86Cpu>, Error>
//! let pit = I8254::find(device_state, 0)?;
//! let clock = Timers::find(device_state, 0)?.map(|t| t.clock_at_stop_ns());
//! ```

mod body;
pub mod cpu;
pub mod cpu_common;
pub mod cpu_subsections;
pub mod cpu_wire;
pub mod layout;
pub mod pit;
pub mod section;
pub mod timer;

pub use cpu::{Events, ExceptionInfo, Fp80, Fpu, Msrs, Segment, X86Cpu};
pub use cpu_common::CpuCommon;
pub use layout::{VmField, VmFieldRef, VmKind, VmStruct};
pub use pit::{PitChannel, I8254};
pub use section::{candidates, find, Candidate, Found};
pub use timer::Timers;

use crate::error::Error;

/// A device whose FULL record the image decodes.
pub trait Device: Sized {
    /// The section idstr.
    const IDSTR: &'static [u8];
    /// Its body's description; `version` is the only section version accepted (what 7.2
    /// sends).
    const LAYOUT: &'static VmStruct;
    /// The subsections QEMU 7.2 may send after the fields, in QEMU's order.
    const SUBSECTIONS: &'static [&'static VmStruct];

    /// Decodes the body that starts at `at` in `state`, subsections included; returns the
    /// value and the offset just past the body (where the footer must be).
    fn decode_body(state: &[u8], at: usize) -> Result<(Self, usize), Error>;

    /// [`find`] without the record's place.
    fn find(state: &[u8], instance: u32) -> Result<Option<Self>, Error> {
        Ok(find::<Self>(state, instance)?.map(|f| f.value))
    }
}

/// How many descriptions errors can name.
const DESCRIBED: usize = 4 + cpu_common::SUBSECTIONS.len() + cpu_subsections::ALL.len();

/// Every description an error can name ([`VmFieldRef`] is an index into this list): the four
/// sections, then their subsections.
pub(crate) static DESCRIPTIONS: [&VmStruct; DESCRIBED] = {
    let mut all: [&VmStruct; DESCRIBED] = [&cpu_wire::CPU; DESCRIBED];
    all[1] = &cpu_common::CPU_COMMON;
    all[2] = &timer::TIMER;
    all[3] = &pit::I8254_LAYOUT;
    let mut i = 0;
    while i < cpu_common::SUBSECTIONS.len() {
        all[4 + i] = cpu_common::SUBSECTIONS[i];
        i += 1;
    }
    let mut j = 0;
    while j < cpu_subsections::ALL.len() {
        all[4 + i + j] = cpu_subsections::ALL[j];
        j += 1;
    }
    all
};

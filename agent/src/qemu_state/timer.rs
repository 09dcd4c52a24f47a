//! The `timer` section (QEMU 7.2 `softmmu/cpu-timers.c`, `vmstate_timers`, version 2): the
//! offsets behind QEMU's guest-visible clocks. Instance 0.
//!
//! Why the image needs it: device times in the stream (the PIT's `count_load_time`, ...) are
//! QEMU_CLOCK_VIRTUAL nanoseconds. Without icount (the `timer/icount` subsection, refused
//! here), that clock is `cpu_get_clock()`, which returns `cpu_clock_offset + get_clock()`
//! while ticks are enabled and `cpu_clock_offset` alone while they are disabled
//! (`cpu_get_clock_locked`). `cpu_disable_ticks`, run when the source stops the VM before
//! sending device state, stores the running value into `cpu_clock_offset`. So with the VM
//! stopped, **the virtual clock equals `cpu_clock_offset`**: the guest's time at the stop,
//! the value a destination continues from.

use zerocopy::byteorder::big_endian::I64;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::body::{mirror, subsections};
use super::layout::{vm_field, Unused, VmStruct};
use super::Device;
use crate::error::Error;

/// The fields of `timer` version 2.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct TimerWire {
    /// `cpu_ticks_offset`: TCG's TSC base (the TSC counts host ticks plus this).
    pub cpu_ticks_offset: I64,
    /// `VMSTATE_UNUSED(8)`: a field QEMU dropped long ago.
    pub unused: Unused<8>,
    /// `cpu_clock_offset` (version 2): the virtual clock while the VM is stopped.
    pub cpu_clock_offset: I64,
}

/// `timer`, version 2.
pub static TIMER: VmStruct = VmStruct {
    name: "timer",
    version: 2,
    fields: &[
        vm_field!(TimerWire, "cpu_ticks_offset", cpu_ticks_offset),
        vm_field!(TimerWire, "unused", unused),
        vm_field!(TimerWire, "cpu_clock_offset", cpu_clock_offset),
    ],
};

const _: () = assert!(TIMER.lays_out(core::mem::size_of::<TimerWire>()));

/// The decoded `timer` section.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timers {
    /// TCG's TSC offset (`cpu_get_ticks` = host ticks + this while running).
    pub cpu_ticks_offset: i64,
    /// The virtual clock's offset; with the VM stopped, the virtual clock itself.
    pub cpu_clock_offset: i64,
}

impl Timers {
    /// QEMU_CLOCK_VIRTUAL, in ns, at the moment the source stopped the guest (see the module
    /// documentation): the base of every device time in the stream.
    pub const fn clock_at_stop_ns(&self) -> i64 {
        self.cpu_clock_offset
    }
}

impl Device for Timers {
    const IDSTR: &'static [u8] = b"timer";
    const LAYOUT: &'static VmStruct = &TIMER;
    /// `timer/icount` (icount mode only) is not accepted.
    const SUBSECTIONS: &'static [&'static VmStruct] = &[];

    fn decode_body(state: &[u8], at: usize) -> Result<(Self, usize), Error> {
        let (w, end) = mirror::<TimerWire>(state, at, &TIMER)?;
        let t =
            Self { cpu_ticks_offset: w.cpu_ticks_offset.get(), cpu_clock_offset: w.cpu_clock_offset.get() };
        let (end, _) = subsections(state, end, &TIMER, &[], |_| {})?;
        Ok((t, end))
    }
}

//! The `i8254` section (QEMU 7.2 `hw/timer/i8254_common.c`, `vmstate_pit_common`,
//! version 3): the PIT's three channels. Instance 0 on `pc` and `q35`.
//!
//! Times are QEMU_CLOCK_VIRTUAL nanoseconds (see [`super::timer`]). A channel's count at
//! virtual time `t` is QEMU's `pit_get_count`: with `d = (t - count_load_time) * 1193182 /
//! 10^9`, mode 2 reads `count - d % count`, mode 3 `count - (2 d) % count`, modes 0, 1, 4, 5
//! `(count - d) & 0xffff`. `hal::pit` continues from this state.

use zerocopy::byteorder::big_endian::{I32, I64, U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::body::{mirror, subsections};
use super::layout::{vm_field, VmElem, VmKind, VmStruct};
use super::Device;
use crate::error::Error;

/// `pit channel` (version 2): one `PITChannelState`.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
#[allow(missing_docs)]
pub struct PitChannelWire {
    pub count: I32,
    pub latched_count: U16,
    pub count_latched: u8,
    pub status_latched: u8,
    pub status: u8,
    pub read_state: u8,
    pub write_state: u8,
    pub write_latch: u8,
    pub rw_mode: u8,
    pub mode: u8,
    pub bcd: u8,
    pub gate: u8,
    pub count_load_time: I64,
    pub next_transition_time: I64,
}

/// `pit channel`, version 2.
pub static PIT_CHANNEL: VmStruct = VmStruct {
    name: "pit channel",
    version: 2,
    fields: &[
        vm_field!(PitChannelWire, "count", count),
        vm_field!(PitChannelWire, "latched_count", latched_count),
        vm_field!(PitChannelWire, "count_latched", count_latched),
        vm_field!(PitChannelWire, "status_latched", status_latched),
        vm_field!(PitChannelWire, "status", status),
        vm_field!(PitChannelWire, "read_state", read_state),
        vm_field!(PitChannelWire, "write_state", write_state),
        vm_field!(PitChannelWire, "write_latch", write_latch),
        vm_field!(PitChannelWire, "rw_mode", rw_mode),
        vm_field!(PitChannelWire, "mode", mode),
        vm_field!(PitChannelWire, "bcd", bcd),
        vm_field!(PitChannelWire, "gate", gate),
        vm_field!(PitChannelWire, "count_load_time", count_load_time),
        vm_field!(PitChannelWire, "next_transition_time", next_transition_time),
    ],
};

impl VmElem for PitChannelWire {
    const KIND: VmKind = VmKind::Struct(&PIT_CHANNEL);
}

/// The fields of `i8254` version 3.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct I8254Wire {
    /// `channels[0].irq_disabled` (version 3): the HPET in legacy mode took IRQ0 over.
    pub irq_disabled: U32,
    /// The channels.
    pub channels: [PitChannelWire; 3],
    /// `channels[0].next_transition_time` again (it replaced the old `irq_timer`); loaded
    /// last, so it is the value QEMU keeps.
    pub next_transition_time: I64,
}

/// `i8254`, version 3.
pub static I8254_LAYOUT: VmStruct = VmStruct {
    name: "i8254",
    version: 3,
    fields: &[
        vm_field!(I8254Wire, "channels[0].irq_disabled", irq_disabled),
        vm_field!(I8254Wire, "channels", channels),
        vm_field!(I8254Wire, "channels[0].next_transition_time", next_transition_time),
    ],
};

const _: () = assert!(I8254_LAYOUT.lays_out(core::mem::size_of::<I8254Wire>()));

/// One decoded PIT channel (`PITChannelState`), values as QEMU holds them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PitChannel {
    /// Reload value, 1..=0x10000 (QEMU stores a written 0 as 0x10000).
    pub count: i32,
    /// The latched count, read by the next reads.
    pub latched_count: u16,
    /// 0: no count latched; else the access mode the latch is read with (1 LSB, 2 MSB,
    /// 3 LSB then MSB).
    pub count_latched: u8,
    /// A status byte is latched (read-back command).
    pub status_latched: u8,
    /// The latched status.
    pub status: u8,
    /// Next byte of a live read: 1 LSB, 2 MSB, 3 LSB of a word, 4 its MSB.
    pub read_state: u8,
    /// Next byte of a write, same values.
    pub write_state: u8,
    /// LSB written, waiting for its MSB.
    pub write_latch: u8,
    /// Access mode of the last control word (1, 2, 3).
    pub rw_mode: u8,
    /// Counting mode 0..5 (6, 7 as the control word gave them).
    pub mode: u8,
    /// BCD counting.
    pub bcd: u8,
    /// Gate input (channel 2: port 0x61 bit 0).
    pub gate: u8,
    /// Virtual time of the last reload (or gate edge), ns.
    pub count_load_time: i64,
    /// Virtual time of the next output change (channel 0 drives IRQ0), ns, -1 for none.
    pub next_transition_time: i64,
}

impl PitChannel {
    fn from_wire(w: &PitChannelWire) -> Self {
        Self {
            count: w.count.get(),
            latched_count: w.latched_count.get(),
            count_latched: w.count_latched,
            status_latched: w.status_latched,
            status: w.status,
            read_state: w.read_state,
            write_state: w.write_state,
            write_latch: w.write_latch,
            rw_mode: w.rw_mode,
            mode: w.mode,
            bcd: w.bcd,
            gate: w.gate,
            count_load_time: w.count_load_time.get(),
            next_transition_time: w.next_transition_time.get(),
        }
    }
}

/// The decoded `i8254` section.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct I8254 {
    /// IRQ0 is disabled (HPET legacy replacement).
    pub irq_disabled: u32,
    /// Channels 0, 1, 2 (ports 0x40, 0x41, 0x42).
    pub channels: [PitChannel; 3],
}

impl Device for I8254 {
    const IDSTR: &'static [u8] = b"i8254";
    const LAYOUT: &'static VmStruct = &I8254_LAYOUT;
    const SUBSECTIONS: &'static [&'static VmStruct] = &[];

    fn decode_body(state: &[u8], at: usize) -> Result<(Self, usize), Error> {
        let (w, end) = mirror::<I8254Wire>(state, at, &I8254_LAYOUT)?;
        let mut channels = w.channels.map(|c| PitChannel::from_wire(&c));
        channels[0].next_transition_time = w.next_transition_time.get();
        let (end, _) = subsections(state, end, &I8254_LAYOUT, &[], |_| {})?;
        Ok((Self { irq_disabled: w.irq_disabled.get(), channels }, end))
    }
}

//! The i8254 PIT the image emulates for a migrated guest (ports 0x40-0x43, and port 0x61's
//! channel-2 bits), continuing from the PIT state QEMU 7.2 migrated so that a guest polling
//! a channel sees the same count, in the same phase, after the migration.
//!
//! Time is QEMU's: `now_ns` is QEMU_CLOCK_VIRTUAL of the source, that is the virtual clock at
//! the stop (`agent::qemu_state::Timers::clock_at_stop_ns`, the `timer` section's
//! `cpu_clock_offset`) plus the time the guest has run here since it resumed. The migrated
//! `count_load_time`s are on that clock already. Counting follows QEMU's `hw/timer/i8254.c`
//! and `i8254_common.c` exactly (including their quirks: the gate only restarts modes 1, 2,
//! 3, 5 on a rising edge, a control word does not clear a pending latch), so the guest cannot
//! tell the destination from the source. With `d = (now - count_load_time) * 1193182 / 10^9`
//! (whole ticks):
//!
//! | mode | count read | output |
//! |---|---|---|
//! | 0, 1, 4, 5 | `(count - d) & 0xffff` | 0: `d >= count`; 1: `d < count`; 4, 5: `d == count` |
//! | 2 (and 6, 7) | `count - d % count` | 2: high except the tick where `d % count == 0` |
//! | 3 | `count - (2 d) % count` | high for the first half period |
//!
//! BCD counting is refused ([`PitError::Bcd`]): no guest the image runs uses it, and the
//! image reports it rather than counting wrongly.

use core::fmt;

use agent::qemu_state::{PitChannel, I8254};

/// The PIT's input clock, Hz (QEMU's `PIT_FREQ`).
pub const PIT_HZ: u64 = 1_193_182;
const NS_PER_S: u64 = 1_000_000_000;

/// Channel 0..2 data ports.
pub const DATA_PORT: u16 = 0x40;
/// Mode/command register (write only; reads return 0, as QEMU's).
pub const CONTROL_PORT: u16 = 0x43;
/// System control port B: bit 0 channel 2's gate, bit 1 speaker data, bit 4 a toggle, bit 5
/// channel 2's output (QEMU's `pcspk`).
pub const SPEAKER_PORT: u16 = 0x61;

/// Read/write states: which byte comes next (1, the LSB, is also what QEMU does for any
/// value it does not know: the `_` arms).
const RW_MSB: u8 = 2;
const RW_WORD0: u8 = 3;
const RW_WORD1: u8 = 4;

/// What the PIT refuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PitError {
    /// BCD counting (control word bit 0, or a migrated channel counting in BCD).
    Bcd {
        /// The channel.
        channel: u8,
    },
    /// A migrated value QEMU's PIT cannot hold (a hostile or corrupt stream).
    Migrated {
        /// The channel.
        channel: u8,
        /// QEMU's field name.
        field: &'static str,
        /// Its value.
        value: i64,
    },
}

impl fmt::Display for PitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Bcd { channel } => write!(f, "PIT channel {channel}: BCD counting is not supported"),
            Self::Migrated { channel, field, value } => {
                write!(f, "PIT channel {channel}: migrated {field} = {value} is out of range")
            }
        }
    }
}

/// One channel (`PITChannelState` without the IRQ timer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Channel {
    /// Reload value, 1..=0x10000.
    count: u32,
    latched_count: u16,
    /// 0, or the access mode the latched count is read with.
    count_latched: u8,
    status_latched: bool,
    status: u8,
    read_state: u8,
    write_state: u8,
    write_latch: u8,
    rw_mode: u8,
    mode: u8,
    gate: bool,
    /// Virtual time of the last reload or gate edge.
    load_ns: i64,
}

impl Channel {
    /// QEMU's reset state (`pit_reset_common`).
    const fn reset(gate: bool, now_ns: i64) -> Self {
        Self {
            count: 0x10000,
            latched_count: 0,
            count_latched: 0,
            status_latched: false,
            status: 0,
            read_state: 0,
            write_state: 0,
            write_latch: 0,
            rw_mode: 0,
            mode: 3,
            gate,
            load_ns: now_ns,
        }
    }

    fn from_migrated(i: u8, c: &PitChannel, clock_at_stop_ns: i64) -> Result<Self, PitError> {
        let bad = |field, value: i64| PitError::Migrated { channel: i, field, value };
        if c.bcd != 0 {
            return Err(PitError::Bcd { channel: i });
        }
        let count = u32::try_from(c.count).ok().filter(|n| (1..=0x10000).contains(n));
        let count = count.ok_or(bad("count", c.count.into()))?;
        let small = |field, v: u8, max: u8| if v > max { Err(bad(field, v.into())) } else { Ok(v) };
        if c.count_load_time > clock_at_stop_ns {
            return Err(bad("count_load_time", c.count_load_time));
        }
        Ok(Self {
            count,
            latched_count: c.latched_count,
            count_latched: small("count_latched", c.count_latched, RW_WORD0)?,
            status_latched: small("status_latched", c.status_latched, 1)? != 0,
            status: c.status,
            read_state: small("read_state", c.read_state, RW_WORD1)?,
            write_state: small("write_state", c.write_state, RW_WORD1)?,
            write_latch: c.write_latch,
            rw_mode: small("rw_mode", c.rw_mode, 3)?,
            mode: small("mode", c.mode, 7)?,
            gate: small("gate", c.gate, 1)? != 0,
            load_ns: c.count_load_time,
        })
    }

    /// Whole input ticks since the last load (`muldiv64`; 0 before it).
    fn ticks(&self, now_ns: i64) -> u64 {
        let elapsed = u128::try_from(now_ns.saturating_sub(self.load_ns)).unwrap_or(0);
        u64::try_from(elapsed * u128::from(PIT_HZ) / u128::from(NS_PER_S)).unwrap_or(u64::MAX)
    }

    /// `pit_get_count`: 1..=0x10000 in modes 2 and 3, 0..=0xffff otherwise.
    fn count_at(&self, now_ns: i64) -> u32 {
        let d = self.ticks(now_ns);
        let n = u64::from(self.count);
        let c = match self.mode {
            0 | 1 | 4 | 5 => n.wrapping_sub(d) & 0xffff,
            3 => n - d.wrapping_mul(2) % n,
            _ => n - d % n,
        };
        c as u32
    }

    /// `pit_get_out`.
    fn out_at(&self, now_ns: i64) -> bool {
        let d = self.ticks(now_ns);
        let n = u64::from(self.count);
        match self.mode {
            1 => d < n,
            2 => d.is_multiple_of(n) && d != 0,
            3 => d % n < (n + 1) >> 1,
            4 | 5 => d == n,
            _ => d >= n,
        }
    }

    /// `pit_get_next_transition_time`: when the output changes next.
    fn next_transition(&self, now_ns: i64) -> Option<i64> {
        let d = self.ticks(now_ns);
        let n = u64::from(self.count);
        let next = match self.mode {
            2 => {
                let base = d - d % n;
                if d == base && d != 0 {
                    base + n
                } else {
                    base + n + 1
                }
            }
            3 => {
                let base = d - d % n;
                let half = (n + 1) >> 1;
                if d - base < half {
                    base + half
                } else {
                    base + n
                }
            }
            4 | 5 if d == n => n + 1,
            _ if d < n => n,
            _ => return None,
        };
        let ns = u128::from(next) * u128::from(NS_PER_S) / u128::from(PIT_HZ);
        let at = self.load_ns.saturating_add(i64::try_from(ns).unwrap_or(i64::MAX));
        Some(if at <= now_ns { now_ns.saturating_add(1) } else { at })
    }

    /// `pit_load_count`.
    fn load(&mut self, value: u32, now_ns: i64) {
        self.count = if value == 0 { 0x10000 } else { value };
        self.load_ns = now_ns;
    }

    /// `pit_latch_count`: a second latch before the first is read is ignored.
    fn latch(&mut self, now_ns: i64) {
        if self.count_latched == 0 {
            self.latched_count = self.count_at(now_ns) as u16;
            self.count_latched = self.rw_mode;
        }
    }

    fn read(&mut self, now_ns: i64) -> u8 {
        if self.status_latched {
            self.status_latched = false;
            return self.status;
        }
        let [lo, hi] = self.latched_count.to_le_bytes();
        match self.count_latched {
            0 => {}
            RW_MSB => {
                self.count_latched = 0;
                return hi;
            }
            RW_WORD0 => {
                self.count_latched = RW_MSB;
                return lo;
            }
            _ => {
                self.count_latched = 0;
                return lo;
            }
        }
        let [lo, hi, ..] = self.count_at(now_ns).to_le_bytes();
        match self.read_state {
            RW_MSB => hi,
            RW_WORD0 => {
                self.read_state = RW_WORD1;
                lo
            }
            RW_WORD1 => {
                self.read_state = RW_WORD0;
                hi
            }
            _ => lo,
        }
    }

    fn write(&mut self, value: u8, now_ns: i64) {
        match self.write_state {
            RW_MSB => self.load(u32::from(value) << 8, now_ns),
            RW_WORD0 => {
                self.write_latch = value;
                self.write_state = RW_WORD1;
            }
            RW_WORD1 => {
                self.load(u32::from(self.write_latch) | u32::from(value) << 8, now_ns);
                self.write_state = RW_WORD0;
            }
            _ => self.load(value.into(), now_ns),
        }
    }

    /// `pit_set_channel_gate`: a rising edge restarts modes 1, 2, 3 and 5.
    fn set_gate(&mut self, gate: bool, now_ns: i64) {
        if matches!(self.mode, 1 | 2 | 3 | 5) && !self.gate && gate {
            self.load_ns = now_ns;
        }
        self.gate = gate;
    }
}

/// The emulated PIT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pit {
    channels: [Channel; 3],
    /// Port 0x61 bit 1 (QEMU keeps it in `pcspk`, which the image does not decode: off).
    speaker_data: bool,
    /// Port 0x61 bit 4, toggled by every read.
    refresh: bool,
    /// No time before this (the stop, or power-on): a caller's clock may not go back past it.
    floor_ns: i64,
}

impl Pit {
    /// A PIT just reset at `now_ns` (QEMU's reset: mode 3, reload 0x10000, gates 1, 1, 0).
    pub const fn new(now_ns: i64) -> Self {
        let channels =
            [Channel::reset(true, now_ns), Channel::reset(true, now_ns), Channel::reset(false, now_ns)];
        Self { channels, speaker_data: false, refresh: false, floor_ns: now_ns }
    }

    /// The PIT as the source left it: `state` from its `i8254` section, `clock_at_stop_ns`
    /// from its `timer` section. Refuses BCD counting and values QEMU cannot produce (a zero
    /// or negative reload, a load after the stop, states out of range).
    pub fn from_migrated(state: &I8254, clock_at_stop_ns: i64) -> Result<Self, PitError> {
        let [a, b, c] = &state.channels;
        let channels = [
            Channel::from_migrated(0, a, clock_at_stop_ns)?,
            Channel::from_migrated(1, b, clock_at_stop_ns)?,
            Channel::from_migrated(2, c, clock_at_stop_ns)?,
        ];
        Ok(Self { channels, speaker_data: false, refresh: false, floor_ns: clock_at_stop_ns })
    }

    /// Whether `port` is one of the PIT's.
    pub const fn claims(port: u16) -> bool {
        matches!(port, 0x40..=0x43 | SPEAKER_PORT)
    }

    /// A guest `in` of one byte. Ports the PIT does not claim read as 0xff.
    pub fn read(&mut self, port: u16, now_ns: i64) -> u8 {
        let now = now_ns.max(self.floor_ns);
        match port {
            0x40..=0x42 => self.channels[usize::from(port - DATA_PORT)].read(now),
            SPEAKER_PORT => {
                self.refresh = !self.refresh;
                let ch2 = &self.channels[2];
                u8::from(ch2.gate)
                    | u8::from(self.speaker_data) << 1
                    | u8::from(self.refresh) << 4
                    | u8::from(ch2.out_at(now)) << 5
            }
            CONTROL_PORT => 0,
            _ => 0xff,
        }
    }

    /// A guest `out` of one byte. A control word asking for BCD counting is refused and
    /// changes nothing; ports the PIT does not claim are ignored.
    pub fn write(&mut self, port: u16, value: u8, now_ns: i64) -> Result<(), PitError> {
        let now = now_ns.max(self.floor_ns);
        match port {
            0x40..=0x42 => self.channels[usize::from(port - DATA_PORT)].write(value, now),
            CONTROL_PORT => return self.control(value, now),
            SPEAKER_PORT => {
                self.speaker_data = value & 2 != 0;
                self.channels[2].set_gate(value & 1 != 0, now);
            }
            _ => {}
        }
        Ok(())
    }

    fn control(&mut self, value: u8, now: i64) -> Result<(), PitError> {
        let select = value >> 6;
        if select == 3 {
            // Read-back: bits 1..3 pick channels; bit 5 clear latches the count, bit 4 clear
            // the status (once until read).
            for (i, c) in self.channels.iter_mut().enumerate() {
                if value & 2 << i == 0 {
                    continue;
                }
                if value & 0x20 == 0 {
                    c.latch(now);
                }
                if value & 0x10 == 0 && !c.status_latched {
                    c.status = u8::from(c.out_at(now)) << 7 | c.rw_mode << 4 | c.mode << 1;
                    c.status_latched = true;
                }
            }
            return Ok(());
        }
        let c = &mut self.channels[usize::from(select)];
        match value >> 4 & 3 {
            0 => c.latch(now),
            _ if value & 1 != 0 => return Err(PitError::Bcd { channel: select }),
            access => {
                c.rw_mode = access;
                c.read_state = access;
                c.write_state = access;
                c.mode = value >> 1 & 7;
            }
        }
        Ok(())
    }

    /// Channel `channel`'s count at `now_ns` (what an immediate latch would hold), 0 for a
    /// channel that does not exist.
    pub fn count(&self, channel: usize, now_ns: i64) -> u32 {
        self.channels.get(channel).map_or(0, |c| c.count_at(now_ns.max(self.floor_ns)))
    }

    /// Channel `channel`'s output at `now_ns` (channel 0's drives IRQ0).
    pub fn out(&self, channel: usize, now_ns: i64) -> bool {
        self.channels.get(channel).is_some_and(|c| c.out_at(now_ns.max(self.floor_ns)))
    }

    /// When channel `channel`'s output changes next after `now_ns`, if it does (QEMU arms
    /// IRQ0's timer there).
    pub fn next_transition(&self, channel: usize, now_ns: i64) -> Option<i64> {
        self.channels.get(channel)?.next_transition(now_ns.max(self.floor_ns))
    }

    /// Channel `channel`'s counting mode (0..7) and reload value.
    pub fn mode_and_reload(&self, channel: usize) -> Option<(u8, u32)> {
        self.channels.get(channel).map(|c| (c.mode, c.count))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent::qemu_state::{Device, Timers};

    const MS: i64 = 1_000_000;
    const T0: i64 = 5 * MS;

    /// Control word for `channel`, access `access` (1 LSB, 2 MSB, 3 both), `mode`, binary.
    fn control(channel: u8, access: u8, mode: u8) -> u8 {
        channel << 6 | access << 4 | mode << 1
    }

    fn programmed(mode: u8, reload: u16) -> Pit {
        let mut pit = Pit::new(0);
        pit.write(CONTROL_PORT, control(0, 3, mode), T0).unwrap();
        let [lo, hi] = reload.to_le_bytes();
        pit.write(0x40, lo, T0).unwrap();
        pit.write(0x40, hi, T0).unwrap();
        pit
    }

    fn latched(pit: &mut Pit, now: i64) -> u16 {
        pit.write(CONTROL_PORT, control(0, 0, 0), now).unwrap();
        u16::from_le_bytes([pit.read(0x40, now + 100), pit.read(0x40, now + 200)])
    }

    #[test]
    fn mode_2_reload_65536_after_one_millisecond() {
        // 1 ms = 1193.182 ticks: 1193 whole ticks; 65536 - 1193 = 64343 = 0xfb57.
        let mut pit = programmed(2, 0);
        assert_eq!(pit.count(0, T0 + MS), 64343);
        pit.write(CONTROL_PORT, 0x00, T0 + MS).unwrap();
        assert_eq!(pit.read(0x40, T0 + 7 * MS), 0x57, "the latch, not the live count");
        assert_eq!(pit.read(0x40, T0 + 9 * MS), 0xfb);
        // The period wraps: 55 ms = 65625.01 ticks, 89 past the reload.
        assert_eq!(latched(&mut pit, T0 + 55 * MS), 65447);
    }

    #[test]
    fn modes_2_3_and_0_count_as_qemu() {
        // 2.5 ms = 2982 ticks: 1000 - 2982 % 1000 = 18.
        assert_eq!(latched(&mut programmed(2, 1000), T0 + 2_500_000), 18);
        // A whole number of periods reads the reload, not 0 (838096 ns = 1000.0001 ticks).
        assert_eq!(programmed(2, 1000).count(0, T0 + 838_096), 1000);
        assert_eq!(programmed(2, 1000).count(0, T0 + 838_095), 1);
        // Mode 3 counts by two: 1000 - 2386 % 1000 = 614.
        assert_eq!(latched(&mut programmed(3, 1000), T0 + MS), 614);
        // Mode 0 counts down once and wraps: 59 ticks at 50 us, out low; 1193 at 1 ms.
        let mut pit = programmed(0, 100);
        assert_eq!((latched(&mut pit, T0 + 50_000), pit.out(0, T0 + 50_000)), (41, false));
        assert_eq!((latched(&mut pit, T0 + MS), pit.out(0, T0 + MS)), (64443, true));
        assert_eq!(pit.next_transition(0, T0 + MS), None);
    }

    #[test]
    fn a_latch_holds_until_read_and_a_second_is_ignored() {
        let mut pit = programmed(2, 0);
        pit.write(CONTROL_PORT, 0x00, T0 + MS).unwrap();
        pit.write(CONTROL_PORT, 0x00, T0 + 2 * MS).unwrap();
        assert_eq!([pit.read(0x40, T0 + 3 * MS), pit.read(0x40, T0 + 3 * MS)], [0x57, 0xfb]);
        // 2 ms = 2386 ticks: the next latch is fresh.
        assert_eq!(latched(&mut pit, T0 + 2 * MS), 63150);
    }

    #[test]
    fn byte_orders_of_live_and_latched_reads() {
        // LSB only: reload 200, each read the live low byte (1 ms: 200 - 1193 % 200 = 7).
        let mut pit = Pit::new(0);
        pit.write(CONTROL_PORT, control(0, 1, 2), T0).unwrap();
        pit.write(0x40, 200, T0).unwrap();
        assert_eq!([pit.read(0x40, T0 + MS), pit.read(0x40, T0 + MS)], [7, 7]);
        // MSB only: a write of 0x10 loads 0x1000; 1193 ticks later 0x1000 - 1193 = 0x0b57.
        pit.write(CONTROL_PORT, control(1, 2, 2), T0).unwrap();
        pit.write(0x41, 0x10, T0).unwrap();
        assert_eq!(pit.read(0x41, T0 + MS), 0x0b);
        // LSB then MSB, live: the bytes of two different instants.
        let mut pit = programmed(2, 0);
        assert_eq!(pit.read(0x40, T0 + MS), 0x57);
        assert_eq!(pit.read(0x40, T0 + 2 * MS), ((65536 - 2386) >> 8) as u8);
        assert_eq!(pit.read(0x40, T0 + 2 * MS), ((65536 - 2386) & 0xff) as u8, "back to the LSB");
    }

    #[test]
    fn read_back_latches_status_then_count() {
        let mut pit = programmed(2, 0);
        // Read-back of channel 0, count and status: status first (out low, access 3, mode 2).
        pit.write(CONTROL_PORT, 0b1100_0010, T0 + MS).unwrap();
        assert_eq!(pit.read(0x40, T0 + 4 * MS), 0x34);
        assert_eq!([pit.read(0x40, T0 + 4 * MS), pit.read(0x40, T0 + 4 * MS)], [0x57, 0xfb]);
        // Status only, for channels 1 and 2 (power-on: mode 3, no access mode yet).
        pit.write(CONTROL_PORT, 0b1110_1100, T0).unwrap();
        assert_eq!(pit.read(0x41, T0) & 0x7f, 3 << 1);
        assert_eq!(pit.read(0x42, T0) & 0x7f, 3 << 1);
    }

    #[test]
    fn bcd_is_refused_and_changes_nothing() {
        let mut pit = programmed(2, 0);
        let before = pit;
        assert_eq!(pit.write(CONTROL_PORT, control(0, 3, 2) | 1, T0 + MS), Err(PitError::Bcd { channel: 0 }));
        assert_eq!(pit, before);
    }

    #[test]
    fn port_61_gates_channel_2_and_shows_its_output() {
        let mut pit = Pit::new(0);
        pit.write(CONTROL_PORT, control(2, 3, 0), T0).unwrap();
        pit.write(0x42, 100, T0).unwrap();
        pit.write(0x42, 0, T0).unwrap();
        pit.write(SPEAKER_PORT, 1, T0).unwrap();
        let a = pit.read(SPEAKER_PORT, T0 + 50_000);
        let b = pit.read(SPEAKER_PORT, T0 + MS);
        assert_eq!((a & 0x21, b & 0x21), (0x01, 0x21), "gate on; output high after 100 ticks");
        assert_ne!(a & 0x10, b & 0x10, "bit 4 toggles");
        // Mode 2: a rising gate restarts the count.
        pit.write(CONTROL_PORT, control(2, 3, 2), T0).unwrap();
        pit.write(0x42, 0, T0).unwrap();
        pit.write(0x42, 0, T0).unwrap();
        pit.write(SPEAKER_PORT, 0, T0 + MS).unwrap();
        pit.write(SPEAKER_PORT, 1, T0 + 2 * MS).unwrap();
        assert_eq!(pit.count(2, T0 + 3 * MS), 64343);
    }

    #[test]
    fn the_clock_does_not_go_back_before_the_floor() {
        let pit = Pit::new(T0);
        assert_eq!(pit.count(0, 0), 0x10000);
        assert_eq!(pit.count(7, T0), 0);
    }

    #[test]
    fn hostile_migrated_state_is_refused() {
        let mut state = I8254::default();
        for (i, c) in state.channels.iter_mut().enumerate() {
            *c = PitChannel { count: 0x10000, mode: 3, gate: u8::from(i != 2), ..PitChannel::default() };
        }
        assert!(Pit::from_migrated(&state, 0).is_ok());
        type Spoil = fn(&mut PitChannel);
        let cases: [(Spoil, PitError); 4] = [
            (|c| c.count = 0, PitError::Migrated { channel: 1, field: "count", value: 0 }),
            (|c| c.count = 0x10001, PitError::Migrated { channel: 1, field: "count", value: 0x10001 }),
            (|c| c.bcd = 1, PitError::Bcd { channel: 1 }),
            (
                |c| c.count_load_time = 1,
                PitError::Migrated { channel: 1, field: "count_load_time", value: 1 },
            ),
        ];
        for (spoil, error) in cases {
            let mut s = state;
            spoil(&mut s.channels[1]);
            assert_eq!(Pit::from_migrated(&s, 0), Err(error));
        }
    }

    /// The dirty guest's PIT from a real QEMU 7.2 stream: channel 0 in mode 2, reload 65536,
    /// loaded at `count_load_time`; at the stop the count is what the guest had just latched,
    /// and afterwards what QEMU's formula gives.
    #[test]
    fn continues_the_pit_of_a_real_capture() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../agent/tests/captures/pc-precopy-dirty.bin");
        let stream = std::fs::read(path).unwrap();
        // The records follow the last RAM footer, so the whole stream can be searched.
        let state = I8254::find(&stream, 0).unwrap().unwrap();
        let clock = Timers::find(&stream, 0).unwrap().unwrap().clock_at_stop_ns();
        let ch0 = state.channels[0];
        let mut pit = Pit::from_migrated(&state, clock).unwrap();
        assert_eq!(pit.mode_and_reload(0), Some((2, 0x10000)));
        let qemu = |now: i64| {
            let d = i128::from(now - ch0.count_load_time) * 1_193_182 / 1_000_000_000;
            (65536 - d % 65536) as u32
        };
        assert_eq!(pit.count(0, clock), qemu(clock));
        assert_eq!(latched(&mut pit, clock), ch0.latched_count, "the guest's last read");
        for later in [1, 999, MS, 3 * MS + 17, 60 * MS, 1_000 * MS] {
            assert_eq!(pit.count(0, clock + later), qemu(clock + later), "{later} ns after the stop");
        }
        let next = pit.next_transition(0, clock).unwrap();
        assert!(clock < next && next <= clock + 54_925_000, "IRQ0 within one period");
        assert!(!pit.out(0, clock + 1));
    }
}

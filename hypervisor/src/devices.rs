//! The devices the image emulates for a migrated guest: the PIT (ports 0x40-0x43, and the
//! channel-2 gate and output at 0x61), continued from the migrated `i8254` state at the virtual
//! time the source stopped, and the debug console (0xe9). Any other port stops the guest with a
//! report naming it; the migration itself goes on.

use core::fmt::Write;

use hal::pit::Pit;

use crate::console::Console;
use crate::latency;

/// What an I/O access came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoResult {
    /// Emulated; for IN, the value read.
    Done(Option<u64>),
    /// No emulated device answers this port.
    NotEmulated,
    /// The device refuses what the guest asked (e.g. BCD counting on the PIT).
    Unsupported(hal::pit::PitError),
}

/// The emulated devices of one guest.
#[derive(Debug, Default)]
pub struct Devices {
    /// The PIT, if the guest came with one (a QEMU VM's `i8254` state).
    pub pit: Option<Pit>,
    /// The guest's virtual clock when the source stopped it (QEMU's `timer` state), ns.
    pub clock_at_stop_ns: i64,
    /// TSC when the guest was resumed here.
    resumed_tsc: u64,
}

impl Devices {
    /// No devices yet; the guest's virtual clock stood at `clock_at_stop_ns` when it stopped.
    pub fn at_clock(clock_at_stop_ns: i64) -> Self {
        Self { clock_at_stop_ns, ..Self::default() }
    }

    /// The guest resumes now (TSC `tsc`): its virtual clock goes on from `clock_at_stop_ns`.
    pub fn resume(&mut self, tsc: u64) {
        self.resumed_tsc = tsc;
    }

    /// The guest's virtual time at TSC `tsc`, ns.
    fn now_ns(&self, tsc: u64) -> i64 {
        self.clock_at_stop_ns.saturating_add(latency::ns(tsc.saturating_sub(self.resumed_tsc)) as i64)
    }

    /// An IN (`write` false) or OUT of `size` bytes at `port`; `value` is RAX for OUT.
    pub fn io(&mut self, port: u16, write: bool, size: u8, value: u64, tsc: u64) -> IoResult {
        let now = self.now_ns(tsc);
        match (port, write, size) {
            (0xe9, true, 1) => {
                let _ = write!(Console, "{}", value as u8 as char);
                IoResult::Done(None)
            }
            (0x40..=0x43 | 0x61, _, 1) => match &mut self.pit {
                Some(pit) if write => match pit.write(port, value as u8, now) {
                    Ok(()) => IoResult::Done(None),
                    Err(e) => IoResult::Unsupported(e),
                },
                Some(pit) => IoResult::Done(Some(u64::from(pit.read(port, now)))),
                None => IoResult::NotEmulated,
            },
            _ => IoResult::NotEmulated,
        }
    }
}

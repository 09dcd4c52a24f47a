//! The local APIC timer: a periodic interrupt, intercepted as an exit while a guest runs,
//! acknowledged in the host. The period bounds how long a busy guest can keep the stream
//! (the receive ring and the return path) waiting.

use hal::apic::LocalApic;
use spin::Once;

use crate::exceptions::{SPURIOUS_VECTOR, TIMER_VECTOR};

static APIC: Once<LocalApic> = Once::new();

/// Timer ticks between interrupts (QEMU's APIC timer counts nanoseconds at divide 1: 250 µs).
const PERIOD_TICKS: u32 = 250_000;

/// Masks the legacy PICs, enables the local APIC and starts the periodic timer.
pub fn init() {
    // SAFETY: pc, q35 and Bochs have the 8259 pair at 0x20/0xa0; nothing here uses them.
    unsafe { hal::apic::mask_legacy_pic() };
    // SAFETY: the boot page tables map the first 4 GiB 1:1, the APIC page included, and this
    // module is the only one that programs the APIC.
    let apic = APIC.call_once(|| unsafe { LocalApic::new() });
    apic.enable(SPURIOUS_VECTOR);
    apic.start_periodic(TIMER_VECTOR, PERIOD_TICKS);
}

/// Acknowledges the timer interrupt.
pub fn end_of_interrupt() {
    if let Some(apic) = APIC.get() {
        apic.end_of_interrupt();
    }
}

//! The defmt global logger: frames (rzcobs-encoded, interned format strings) on COM2, decoded
//! on the host with `defmt-decoder` from this image's `.defmt` section. The debug console
//! (`console`) carries only what must be readable without the ELF: panics, exceptions, and
//! the final `RESULT` line.
//!
//! One CPU logs, and no interrupt handler logs, so the logger needs no lock: a flag catches
//! reentrancy (a bug) instead.

use core::sync::atomic::{AtomicBool, Ordering};

use hal::serial::Uart;

/// COM2's base port.
const COM2: u16 = 0x2f8;

static TAKEN: AtomicBool = AtomicBool::new(false);
static mut ENCODER: defmt::Encoder = defmt::Encoder::new();
static mut PORT: Option<Uart> = None;

/// Sets COM2 up for the log.
pub fn init() {
    // SAFETY: COM2 is the log's 16550 and nothing else uses it; called once, before any log.
    unsafe { *core::ptr::addr_of_mut!(PORT) = Some(Uart::init(COM2)) };
}

fn write(bytes: &[u8]) {
    // SAFETY: only the logger, holding TAKEN, gets here, on the one CPU: no aliasing.
    if let Some(port) = unsafe { (*core::ptr::addr_of_mut!(PORT)).as_mut() } {
        port.write(bytes);
    }
}

#[defmt::global_logger]
struct Logger;

// SAFETY: `acquire` and `release` bracket every frame (defmt's contract); TAKEN makes the
// encoder exclusive between them, and nothing else touches ENCODER.
unsafe impl defmt::Logger for Logger {
    fn acquire() {
        assert!(!TAKEN.swap(true, Ordering::Acquire), "defmt logger re-entered");
        // SAFETY: TAKEN was clear: this is the only user of the encoder.
        unsafe { (*core::ptr::addr_of_mut!(ENCODER)).start_frame(write) };
    }

    unsafe fn flush() {}

    unsafe fn release() {
        // SAFETY: called after `acquire` (defmt's contract): TAKEN is held.
        unsafe { (*core::ptr::addr_of_mut!(ENCODER)).end_frame(write) };
        TAKEN.store(false, Ordering::Release);
    }

    unsafe fn write(bytes: &[u8]) {
        // SAFETY: as in `release`.
        unsafe { (*core::ptr::addr_of_mut!(ENCODER)).write(bytes, write) };
    }
}

defmt::timestamp!("tsc={=u64}", hal::cpu::rdtsc());

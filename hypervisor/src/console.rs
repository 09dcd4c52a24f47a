//! Text output on QEMU's / Bochs' debug console (port 0xe9): bring-up messages and the
//! reports of panics and exceptions, readable even when nothing else works.

/// The debug console.
pub struct Console;

impl core::fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        print(s);
        Ok(())
    }
}

/// Writes `s` to the debug console.
pub fn print(s: &str) {
    for b in s.bytes() {
        // SAFETY: port 0xe9 is the emulator's debug console; writing it has no memory effect.
        unsafe { hal::cpu::outb(0xe9, b) };
    }
}

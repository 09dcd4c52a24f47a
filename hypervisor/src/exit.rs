//! Ending the run: QEMU's `isa-debug-exit` device (port 0xf4, 4 bytes) makes QEMU exit with
//! status `(code << 1) | 1`; Bochs shuts down on "Shutdown" written to port 0x8900.

/// How the run ended.
#[derive(Clone, Copy, Debug)]
#[repr(u32)]
pub enum Code {
    /// Migration complete and the guest's result reported: QEMU exits 0x21 (33).
    Success = 0x10,
    /// Anything else: QEMU exits 0x23 (35).
    Failure = 0x11,
}

/// Ends the run with `code`; halts forever if no exit device answers.
pub fn exit(code: Code) -> ! {
    // SAFETY: port 0xf4 is isa-debug-exit (QEMU ends the process), 0x8900 the Bochs shutdown
    // port; neither touches memory.
    unsafe {
        hal::cpu::outl(0xf4, code as u32);
        for b in b"Shutdown" {
            hal::cpu::outb(0x8900, *b);
        }
    }
    loop {
        hal::cpu::hlt();
    }
}

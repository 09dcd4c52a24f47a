//! The 16550 UART, polled: the transport of the migration stream (COM1) in the image.
//!
//! Registers (offsets from the base port): 0 data (DLL when DLAB), 1 IER (DLM when DLAB),
//! 2 FCR (write), 3 LCR, 4 MCR, 5 LSR. Set up for 8N1, FIFOs on and cleared, interrupts off;
//! the divisor is irrelevant to an emulated UART attached to a socket but set all the same
//! (Bochs prints garbage without it).

use crate::cpu::{inb, outb};

/// COM1's base port.
pub const COM1: u16 = 0x3f8;

const DATA: u16 = 0;
const IER: u16 = 1;
const FCR: u16 = 2;
const LCR: u16 = 3;
const MCR: u16 = 4;
const LSR: u16 = 5;
const LSR_DATA_READY: u8 = 1 << 0;
const LSR_THR_EMPTY: u8 = 1 << 5;

/// A 16550 at a base port.
#[derive(Debug)]
pub struct Uart {
    base: u16,
}

impl Uart {
    /// Initialises the UART at `base` (8N1, 115200 divisor, FIFOs on, interrupts off).
    ///
    /// # Safety
    ///
    /// A 16550 is at `base` (or nothing: reads return 0xff) and nothing else drives it.
    pub unsafe fn init(base: u16) -> Self {
        let regs =
            [(IER, 0x00), (LCR, 0x80), (DATA, 0x01), (IER, 0x00), (LCR, 0x03), (FCR, 0xc7), (MCR, 0x03)];
        for (reg, value) in regs {
            // SAFETY: the caller guarantees a UART is at `base`; these are its set-up registers.
            unsafe { outb(base + reg, value) };
        }
        Self { base }
    }

    /// A second handle on a UART that [`Uart::init`] set up (the receive side and the
    /// transmit side are used from different places).
    ///
    /// # Safety
    ///
    /// As [`Uart::init`]; the handles do not race (one CPU, no interrupt handler uses them).
    pub unsafe fn attach(base: u16) -> Self {
        Self { base }
    }

    fn lsr(&self) -> u8 {
        // SAFETY: `init`'s caller guaranteed the UART; reading LSR has no memory effect.
        unsafe { inb(self.base + LSR) }
    }

    /// A received byte, if one is waiting.
    pub fn try_read(&mut self) -> Option<u8> {
        // SAFETY: as in `lsr`; reading DATA pops the receive FIFO.
        (self.lsr() & LSR_DATA_READY != 0).then(|| unsafe { inb(self.base + DATA) })
    }

    /// Reads waiting bytes into `buf`; returns how many.
    pub fn read_available(&mut self, buf: &mut [u8]) -> usize {
        let mut n = 0;
        while n < buf.len() {
            match self.try_read() {
                Some(b) => {
                    buf[n] = b;
                    n += 1;
                }
                None => break,
            }
        }
        n
    }

    /// Sends `bytes`, waiting for room in the transmitter.
    pub fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            while self.lsr() & LSR_THR_EMPTY == 0 {
                core::hint::spin_loop();
            }
            // SAFETY: as in `lsr`; writing DATA queues one byte.
            unsafe { outb(self.base + DATA, b) };
        }
    }
}

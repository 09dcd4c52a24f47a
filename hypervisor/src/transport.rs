//! The stream's transport: COM1. Received bytes go into the receive ring the agent decodes in
//! place; the return path writes to the same UART.
//!
//! COM1 is polled: by the main loop while no vCPU runs, and at every exit while one does (the
//! local APIC timer guarantees an exit at least every period), so a busy guest cannot keep
//! the stream waiting longer than that. Polling rather than the UART's interrupt keeps the
//! path simple: the emulated UART holds back what its 16-byte FIFO cannot take (the
//! emulator's socket stops being read), so no byte is lost between polls.

use agent::ports::{ReturnPath, SendFailed};
use hal::serial::Uart;

/// Bytes of the receive ring: more than any record header (the agent's bounce buffer is 512),
/// and several pages, so a page's payload is usually handed out in one piece.
pub const RING_BYTES: usize = 64 * 1024;

/// A receive ring over a static buffer.
pub struct Ring {
    buf: &'static mut [u8; RING_BYTES],
    head: usize,
    len: usize,
}

impl Ring {
    /// A ring over `buf`.
    pub fn new(buf: &'static mut [u8; RING_BYTES]) -> Self {
        Self { buf, head: 0, len: 0 }
    }

    /// Moves what the UART holds into the free space; returns how many bytes came.
    pub fn fill_from(&mut self, uart: &mut Uart) -> usize {
        let mut total = 0;
        while self.len < RING_BYTES {
            let tail = (self.head + self.len) % RING_BYTES;
            let room = if tail >= self.head { RING_BYTES - tail } else { self.head - tail };
            let room = room.min(RING_BYTES - self.len);
            let n = uart.read_available(&mut self.buf[tail..tail + room]);
            self.len += n;
            total += n;
            if n < room {
                break;
            }
        }
        total
    }

    /// The readable bytes: up to the end of the buffer, then from its start.
    pub fn readable(&self) -> (&[u8], &[u8]) {
        let first = self.len.min(RING_BYTES - self.head);
        (&self.buf[self.head..self.head + first], &self.buf[..self.len - first])
    }

    /// Drops `n` bytes from the front.
    pub fn consume(&mut self, n: usize) {
        let n = n.min(self.len);
        self.head = (self.head + n) % RING_BYTES;
        self.len -= n;
    }

    /// Bytes waiting.
    pub fn len(&self) -> usize {
        self.len
    }
}

/// The return path: COM1's transmitter.
pub struct SerialReturnPath(pub Uart);

impl ReturnPath for SerialReturnPath {
    fn send(&mut self, message: &[u8]) -> Result<(), SendFailed> {
        self.0.write(message);
        Ok(())
    }
}

//! The stream's transports, behind [`StreamIn`]: virtio-vsock (`crate::vsock`) when the
//! machine has the device, else COM1. For COM1, received bytes go into a receive ring the agent
//! decodes in place; the return path writes to the same UART.
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

/// What a poll of the transport found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Poll {
    /// Stream bytes are waiting.
    Data,
    /// Nothing new.
    Nothing,
    /// The source closed the connection, and every byte was read.
    Closed,
    /// After [`StreamIn::listen_again`]: a new connection for the migration (a postcopy
    /// recovery); its bytes follow.
    Reconnected,
}

/// The receive side of the stream's transport, as the main loop drives it.
pub trait StreamIn {
    /// Takes what arrived.
    fn poll(&mut self) -> Poll;
    /// The bytes waiting, in order, in (at most) two pieces.
    fn readable(&self) -> (&[u8], &[u8]);
    /// Drops `n` bytes from the front.
    fn consume(&mut self, n: usize);
    /// The decoder made no progress with [`StreamIn::readable`] although more bytes wait
    /// beyond the two pieces: joins them; false if nothing could be joined.
    fn stuck(&mut self) -> bool;
    /// The migration is over: end the connection from this side.
    fn finish(&mut self);
    /// The connection broke after RUN: accept the source's next one (postcopy recovery);
    /// false if this transport cannot (COM1 has no connections).
    fn listen_again(&mut self) -> bool {
        false
    }
    /// The source closed the connection (bytes may still wait, a record cut short among
    /// them).
    fn closed(&self) -> bool {
        false
    }
    /// The raw-rate sink's measurement: (bytes, TSC cycles), if the transport has one and it
    /// ran.
    fn sink(&self) -> Option<(u64, u64)> {
        None
    }
}

/// COM1 and its receive ring.
pub struct Serial {
    /// The receive ring.
    pub ring: Ring,
    /// The UART's receive side.
    pub uart: Uart,
}

impl StreamIn for Serial {
    fn poll(&mut self) -> Poll {
        self.ring.fill_from(&mut self.uart);
        if self.ring.len() > 0 {
            Poll::Data
        } else {
            Poll::Nothing
        }
    }

    fn readable(&self) -> (&[u8], &[u8]) {
        self.ring.readable()
    }

    fn consume(&mut self, n: usize) {
        self.ring.consume(n);
    }

    fn stuck(&mut self) -> bool {
        // One contiguous ring: a record is never in more than two pieces.
        false
    }

    fn finish(&mut self) {}
}

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

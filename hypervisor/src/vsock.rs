//! The stream's transport when the machine has a virtio-vsock device: the migration comes in on
//! port [`MIGRATION_PORT`] (the return path goes back on the same connection), and a raw-rate
//! sink listens on [`SINK_PORT`]: it receives `be64 N` then N bytes, counts them, touches
//! nothing else, and answers `be64 N` once all have come; its rate is the device's own, against
//! which the migration's rate is measured.
//!
//! The driver (`hal::virtio`) is polled like COM1: by the main loop, and at every guest exit.

use agent::ports::{ReturnPath, SendFailed};
use hal::virtio::pci::PortIo;
use hal::virtio::queue::QueueMemory;
use hal::virtio::vsock::{Events, Rx, RxBuffer, Tx, TxBuffer, RX_QUEUE_LEN, TX_QUEUE_LEN};
use hal::virtio::{BringUpError, MmioNotify, VsockMemory};
use spin::Mutex;

use crate::transport::{Poll, StreamIn};

/// The migration stream's port.
pub const MIGRATION_PORT: u32 = 1234;
/// The raw-rate sink's port.
pub const SINK_PORT: u32 = 1235;
static LISTEN: [u32; 2] = [MIGRATION_PORT, SINK_PORT];

/// The transmit side, shared by the receive loop (control packets, credit) and the return path.
static TX: spin::Once<Mutex<Tx<MmioNotify>>> = spin::Once::new();

/// What the sink measured.
#[derive(Clone, Copy, Debug, Default)]
pub struct SinkResult {
    /// Bytes counted.
    pub bytes: u64,
    /// TSC at the first and at the last byte.
    pub cycles: u64,
}

/// The sink connection's progress.
#[derive(Debug, Default)]
struct Sink {
    header: [u8; 8],
    header_len: usize,
    expected: u64,
    counted: u64,
    first: Option<u64>,
}

/// Which connection is open.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Open {
    None,
    Sink,
    Migration,
}

/// The receive side of the device, as the main loop's stream input.
pub struct Vsock {
    rx: Rx<MmioNotify>,
    open: Open,
    sink: Sink,
    /// The sink's result, once it has answered.
    pub sink_result: Option<SinkResult>,
    migration_closed: bool,
    migration_bytes: u64,
    /// After a break: the next migration connection is a reconnection.
    awaiting_reconnect: bool,
    reconnected: bool,
    was_reconnection: bool,
    /// Packets refused (malformed, stray).
    pub refused: u64,
}

/// Brings the device up; `Ok(None)` when the machine has none (the image then uses COM1).
pub fn probe() -> Result<Option<(Vsock, VsockReturnPath)>, BringUpError> {
    static mut RX_QUEUE: QueueMemory<RX_QUEUE_LEN> = QueueMemory::new();
    static mut RX_BUFFERS: [RxBuffer; RX_QUEUE_LEN] = [const { RxBuffer::new() }; RX_QUEUE_LEN];
    static mut TX_QUEUE: QueueMemory<TX_QUEUE_LEN> = QueueMemory::new();
    static mut TX_BUFFERS: [TxBuffer; TX_QUEUE_LEN] = [const { TxBuffer::new() }; TX_QUEUE_LEN];
    static mut EVENT_QUEUE: QueueMemory<4> = QueueMemory::new();
    static mut EVENT_BUFFERS: [u64; 4] = [0; 4];
    static TAKEN: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);
    assert!(!TAKEN.swap(true, core::sync::atomic::Ordering::SeqCst), "vsock probed twice");
    // SAFETY: the flag above hands the statics out once; they are in the image's identity-
    // mapped RAM, where the device reaches them at their addresses.
    let mem = unsafe {
        VsockMemory {
            rx_queue: &mut *core::ptr::addr_of_mut!(RX_QUEUE),
            rx_buffers: &mut *core::ptr::addr_of_mut!(RX_BUFFERS),
            tx_queue: &mut *core::ptr::addr_of_mut!(TX_QUEUE),
            tx_buffers: &mut *core::ptr::addr_of_mut!(TX_BUFFERS),
            event_queue: &mut *core::ptr::addr_of_mut!(EVENT_QUEUE),
            event_buffers: &mut *core::ptr::addr_of_mut!(EVENT_BUFFERS),
        }
    };
    // SAFETY: only this probe uses the configuration ports, at boot.
    let mut cfg = unsafe { PortIo::new() };
    // SAFETY: the image's page tables map the first 4 GiB 1:1, where the firmware put the
    // device's BARs (checked: a BAR above 4 GiB fails the bring-up); nothing else drives it.
    let dev = match unsafe { hal::virtio::bring_up(&mut cfg, mem, &LISTEN, 4 << 30) } {
        Ok(dev) => dev,
        Err(BringUpError::NotFound) => return Ok(None),
        Err(e) => return Err(e),
    };
    defmt::info!(
        "virtio-vsock at {=u8}:{=u8}.{=u8}, common configuration at {=u64:#x}, guest CID {=u64}",
        dev.bdf.bus,
        dev.bdf.device,
        dev.bdf.function,
        dev.common,
        dev.guest_cid
    );
    let tx = TX.call_once(|| Mutex::new(dev.tx));
    let vsock = Vsock {
        rx: dev.rx,
        open: Open::None,
        sink: Sink::default(),
        sink_result: None,
        migration_closed: false,
        migration_bytes: 0,
        awaiting_reconnect: false,
        reconnected: false,
        was_reconnection: false,
        refused: 0,
    };
    Ok(Some((vsock, VsockReturnPath(tx))))
}

impl Vsock {
    fn tx() -> spin::MutexGuard<'static, Tx<MmioNotify>> {
        // `probe` set it before any `Vsock` exists.
        TX.get().expect("vsock TX").lock()
    }

    fn events(&mut self, ev: Events) {
        self.refused += u64::from(ev.refused);
        if let Some(port) = ev.accepted {
            self.open = if port == SINK_PORT { Open::Sink } else { Open::Migration };
            self.sink = Sink::default();
            self.was_reconnection = self.open == Open::Migration && self.awaiting_reconnect;
            if self.was_reconnection {
                self.awaiting_reconnect = false;
                self.reconnected = true;
            }
            defmt::info!("vsock: connection accepted on port {=u32}", port);
        }
    }

    /// Counts the sink's bytes; answers once all have come.
    fn drain_sink(&mut self) {
        loop {
            let (first, _) = self.rx.readable();
            if first.is_empty() {
                break;
            }
            let n = first.len();
            let s = &mut self.sink;
            s.first.get_or_insert_with(hal::cpu::rdtsc);
            let mut used = 0;
            if s.header_len < 8 {
                let take = (8 - s.header_len).min(n);
                s.header[s.header_len..s.header_len + take].copy_from_slice(&first[..take]);
                s.header_len += take;
                used = take;
                if s.header_len == 8 {
                    s.expected = u64::from_be_bytes(s.header);
                }
            }
            // Bytes past the announced count are dropped: the sink only counts.
            s.counted += ((n - used) as u64).min(s.expected.saturating_sub(s.counted));
            let mut tx = Self::tx();
            self.rx.consume(n, &mut tx);
            let s = &self.sink;
            if s.header_len == 8 && s.counted == s.expected && self.sink_result.is_none() {
                let cycles = hal::cpu::rdtsc() - s.first.unwrap_or(0);
                self.sink_result = Some(SinkResult { bytes: s.counted, cycles });
                let _ = tx.send(&s.counted.to_be_bytes());
                defmt::info!("vsock sink: {=u64} bytes in {=u64} cycles", s.counted, cycles);
            }
        }
    }
}

impl StreamIn for Vsock {
    fn poll(&mut self) -> Poll {
        let ev = {
            let mut tx = Self::tx();
            self.rx.poll(&mut tx)
        };
        self.events(ev);
        if self.open == Open::Sink {
            self.drain_sink();
            if ev.closed || Self::tx().conn.is_none() {
                let mut tx = Self::tx();
                self.rx.reset(&mut tx);
                self.open = Open::None;
            }
            return Poll::Nothing;
        }
        if self.open == Open::Migration {
            self.migration_bytes += ev.bytes as u64;
            if ev.closed && self.migration_bytes == 0 {
                // A connection the host gave up on before sending anything (its handshake
                // timed out, but the request still reached us): not the migration; listen on.
                defmt::info!("vsock: a connection closed before any byte: listening again");
                let mut tx = Self::tx();
                self.rx.reset(&mut tx);
                self.open = Open::None;
                if self.was_reconnection {
                    self.awaiting_reconnect = true;
                    self.reconnected = false;
                }
            } else if ev.closed {
                self.migration_closed = true;
            }
        }
        if self.reconnected {
            self.reconnected = false;
            Poll::Reconnected
        } else if self.rx.available() > 0 {
            Poll::Data
        } else if self.migration_closed {
            Poll::Closed
        } else {
            Poll::Nothing
        }
    }

    fn readable(&self) -> (&[u8], &[u8]) {
        if self.open == Open::Migration {
            self.rx.readable()
        } else {
            (&[], &[])
        }
    }

    fn consume(&mut self, n: usize) {
        let mut tx = Self::tx();
        self.rx.consume(n, &mut tx);
    }

    fn stuck(&mut self) -> bool {
        let mut tx = Self::tx();
        self.rx.stitch(&mut tx).is_ok()
    }

    fn finish(&mut self) {
        let mut tx = Self::tx();
        tx.shutdown();
    }

    fn closed(&self) -> bool {
        self.migration_closed
    }

    fn listen_again(&mut self) -> bool {
        let mut tx = Self::tx();
        self.rx.reset(&mut tx);
        self.open = Open::None;
        self.migration_closed = false;
        self.migration_bytes = 0;
        self.awaiting_reconnect = true;
        true
    }

    fn sink(&self) -> Option<(u64, u64)> {
        self.sink_result.map(|r| (r.bytes, r.cycles))
    }
}

/// The return path: the connection's transmit side (whichever connection is open: after a
/// postcopy recovery, the new one).
#[derive(Clone, Copy)]
pub struct VsockReturnPath(&'static Mutex<Tx<MmioNotify>>);

impl ReturnPath for VsockReturnPath {
    fn send(&mut self, message: &[u8]) -> Result<(), SendFailed> {
        self.0.lock().send(message).map_err(|_| SendFailed)
    }
}

//! virtio-vsock (virtio 1.x, "Socket Device"), stream sockets, the guest side: one connection
//! at a time, accepted on a listening port.
//!
//! Why not virtio-drivers' `VsockConnectionManager`: its defaults (1 KiB per-connection
//! buffer, 8-entry queues, 512-byte RX buffers) would throttle a migration stream, it needs a
//! heap, and it copies every received byte into its own ring. Here the RX buffers themselves
//! are the agent's receive ring: the payloads of the used RX buffers, in order, are what
//! [`Rx::readable`] hands to the decoder, and a buffer goes back to the device only once the
//! decoder has consumed its last byte. Page payloads are therefore copied once, from the RX
//! buffer into the guest frame.
//!
//! A record header split over two buffers is the decoder's business (it joins the two
//! slices it is given). A header split over more than two (a tiny packet in between) is
//! joined here: [`Rx::stitch`] moves the front buffer's few remaining bytes into the free
//! room in front of the next buffer's payload (its headroom and its already parsed vsock
//! header), which is the only copy the receive path makes besides the page placement.
//!
//! Credit (virtio "Device Operation: Flow control"): we advertise `buf_alloc` = all RX payload
//! space and count in `fwd_cnt` every payload byte whose buffer went back to the device;
//! every packet we send carries both, and a CREDIT_UPDATE goes out when `fwd_cnt` has moved
//! by a quarter of `buf_alloc` since the peer last heard it, or when the peer asks
//! (CREDIT_REQUEST). Our sends honour the peer's credit (`peer_buf_alloc - (tx_cnt -
//! peer_fwd_cnt)`): bytes it cannot take yet wait in a bounded pending buffer.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::queue::{QueueMemory, SplitQueue};

/// The host's CID.
pub const HOST_CID: u64 = 2;
/// Bytes of a packet header.
pub const HEADER_LEN: usize = 44;
/// RX buffers (and RX queue entries).
pub const RX_QUEUE_LEN: usize = 64;
/// Payload bytes of an RX buffer.
pub const RX_PAYLOAD: usize = 16 * 1024;
/// Room in front of each RX buffer's header for [`Rx::stitch`]: more than the longest record
/// header the agent joins (its 512-byte bounce buffer).
pub const HEADROOM: usize = 512;
/// TX buffers (and TX queue entries).
pub const TX_QUEUE_LEN: usize = 16;
/// Bytes of a TX buffer, header included.
pub const TX_BUFFER: usize = 1024;
/// Bytes waiting for the peer's credit or a free TX buffer, at most.
pub const PENDING: usize = 8 * 1024;
/// What we advertise: all RX payload space.
pub const BUF_ALLOC: u32 = (RX_QUEUE_LEN * RX_PAYLOAD) as u32;

/// The queues' indices.
pub const RX_QUEUE: u16 = 0;
/// The TX queue.
pub const TX_QUEUE: u16 = 1;
/// The event queue.
pub const EVENT_QUEUE: u16 = 2;

const TYPE_STREAM: u16 = 1;
const SHUTDOWN_BOTH: u32 = 3;

/// Packet operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Op {
    /// Connect.
    Request = 1,
    /// Connection accepted.
    Response = 2,
    /// Reset.
    Rst = 3,
    /// No more data in one or both directions.
    Shutdown = 4,
    /// Data.
    Rw = 5,
    /// The sender's credit.
    CreditUpdate = 6,
    /// Asks for the receiver's credit.
    CreditRequest = 7,
}

impl Op {
    fn from_wire(v: u16) -> Option<Op> {
        Some(match v {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }
}

/// `struct virtio_vsock_hdr` (little-endian, packed).
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct Header {
    /// Source CID.
    pub src_cid: U64,
    /// Destination CID.
    pub dst_cid: U64,
    /// Source port.
    pub src_port: U32,
    /// Destination port.
    pub dst_port: U32,
    /// Payload bytes.
    pub len: U32,
    /// Socket type (1: stream).
    pub kind: U16,
    /// [`Op`].
    pub op: U16,
    /// Shutdown flags.
    pub flags: U32,
    /// The sender's receive buffer space.
    pub buf_alloc: U32,
    /// Bytes the sender has consumed from its receive buffer.
    pub fwd_cnt: U32,
}

const _: () = assert!(core::mem::size_of::<Header>() == HEADER_LEN);

/// Where the driver's notifications (kicks) go.
pub trait Notify {
    /// Tells the device that queue `queue` has new buffers.
    fn notify(&mut self, queue: u16);
}

/// The one connection, with both directions' credit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connection {
    /// Our port (the listening port it came in on).
    pub local_port: u32,
    /// The peer's CID.
    pub peer_cid: u64,
    /// The peer's port.
    pub peer_port: u32,
    /// The peer will send nothing more (SHUTDOWN or RST received).
    pub peer_closed: bool,
    /// Payload bytes whose RX buffer went back to the device.
    fwd_cnt: u32,
    /// The `fwd_cnt` the peer last heard.
    reported_fwd_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Payload bytes sent.
    tx_cnt: u32,
}

impl Connection {
    fn new(local_port: u32, h: &Header) -> Self {
        let mut c = Connection {
            local_port,
            peer_cid: h.src_cid.get(),
            peer_port: h.src_port.get(),
            peer_closed: false,
            fwd_cnt: 0,
            reported_fwd_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
        };
        c.peer_credit_from(h);
        c
    }

    fn peer_credit_from(&mut self, h: &Header) {
        self.peer_buf_alloc = h.buf_alloc.get();
        self.peer_fwd_cnt = h.fwd_cnt.get();
    }

    /// Bytes the peer can take now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn matches(&self, h: &Header) -> bool {
        h.src_cid.get() == self.peer_cid
            && h.src_port.get() == self.peer_port
            && h.dst_port.get() == self.local_port
    }

    /// Whether the peer should hear our `fwd_cnt` now.
    fn credit_update_due(&self) -> bool {
        self.fwd_cnt.wrapping_sub(self.reported_fwd_cnt) >= BUF_ALLOC / 4
    }
}

/// What can go wrong on the transmit side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxError {
    /// No connection.
    NotConnected,
    /// The pending buffer is full: the peer gives no credit, or the device takes no buffers.
    Full,
}

/// A TX buffer.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct TxBuffer([u8; TX_BUFFER]);

impl TxBuffer {
    /// A zeroed buffer, for a `static`.
    pub const fn new() -> Self {
        TxBuffer([0; TX_BUFFER])
    }
}

impl Default for TxBuffer {
    fn default() -> Self {
        Self::new()
    }
}

/// The transmit side and the connection's state (both sides update the connection: the
/// receive side with the peer's credit and `fwd_cnt`, the transmit side with `tx_cnt`).
#[derive(Debug)]
pub struct Tx<K: Notify> {
    queue: SplitQueue<TX_QUEUE_LEN>,
    bufs: &'static mut [TxBuffer; TX_QUEUE_LEN],
    /// Bit i: TX buffer i belongs to the driver.
    free: u32,
    kick: K,
    guest_cid: u64,
    /// The connection, if one is open.
    pub conn: Option<Connection>,
    pending: heapless::Deque<u8, PENDING>,
    /// Control packets dropped because no TX buffer came back in time (a stuck device).
    pub control_dropped: u64,
}

impl<K: Notify> Tx<K> {
    /// The transmit side over `queue` and `bufs`; `guest_cid` is ours (the device's config).
    pub fn new(
        queue: &'static mut QueueMemory<TX_QUEUE_LEN>,
        bufs: &'static mut [TxBuffer; TX_QUEUE_LEN],
        kick: K,
        guest_cid: u64,
    ) -> Self {
        const _: () = assert!(TX_QUEUE_LEN <= 32);
        Self {
            queue: SplitQueue::new(queue),
            bufs,
            free: u32::MAX >> (32 - TX_QUEUE_LEN),
            kick,
            guest_cid,
            conn: None,
            pending: heapless::Deque::new(),
            control_dropped: 0,
        }
    }

    /// The queue, for the device's set-up.
    pub fn queue(&self) -> &SplitQueue<TX_QUEUE_LEN> {
        &self.queue
    }

    pub(crate) fn set_notify(&mut self, kick: K) {
        self.kick = kick;
    }

    /// Our CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Sends `data` on the connection: now as far as the peer's credit and the TX buffers
    /// allow, the rest when [`Tx::flush`] runs again (the receive side calls it when credit
    /// comes). All or nothing: `Full` queues none of it.
    pub fn send(&mut self, data: &[u8]) -> Result<(), TxError> {
        if self.conn.is_none() {
            return Err(TxError::NotConnected);
        }
        if PENDING - self.pending.len() < data.len() {
            self.flush();
            if PENDING - self.pending.len() < data.len() {
                return Err(TxError::Full);
            }
        }
        for &b in data {
            // Room was checked above.
            let _ = self.pending.push_back(b);
        }
        self.flush();
        Ok(())
    }

    /// Bytes accepted by [`Tx::send`] that have not gone to the device yet.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Takes back the buffers the device has sent.
    fn reclaim(&mut self) {
        while let Some(u) = self.queue.pop_used() {
            if (u.id as usize) < TX_QUEUE_LEN {
                self.free |= 1 << u.id;
            }
        }
    }

    fn take_buffer(&mut self) -> Option<u16> {
        self.reclaim();
        if self.free == 0 {
            return None;
        }
        let id = self.free.trailing_zeros() as u16;
        self.free &= !(1 << id);
        Some(id)
    }

    /// Fills TX buffer `id` with a header for `conn` and `payload`, and publishes it.
    fn post(&mut self, id: u16, header: Header, payload_len: usize) {
        let buf = &mut self.bufs[usize::from(id)].0;
        buf[..HEADER_LEN].copy_from_slice(header.as_bytes());
        let addr = buf.as_ptr() as u64;
        self.queue.set_buffer(id, addr, (HEADER_LEN + payload_len) as u32, false);
        self.queue.publish(id);
    }

    fn header(&self, to: (u64, u32), from_port: u32, op: Op, len: u32, flags: u32) -> Header {
        let (buf_alloc, fwd_cnt) = match &self.conn {
            Some(c) => (BUF_ALLOC, c.fwd_cnt),
            None => (BUF_ALLOC, 0),
        };
        Header {
            src_cid: self.guest_cid.into(),
            dst_cid: to.0.into(),
            src_port: from_port.into(),
            dst_port: to.1.into(),
            len: len.into(),
            kind: TYPE_STREAM.into(),
            op: (op as u16).into(),
            flags: flags.into(),
            buf_alloc: buf_alloc.into(),
            fwd_cnt: fwd_cnt.into(),
        }
    }

    /// Moves pending bytes to the device as far as credit and buffers allow.
    pub fn flush(&mut self) {
        let mut posted = false;
        while let Some(conn) = self.conn {
            let credit = conn.peer_credit() as usize;
            let chunk = self.pending.len().min(credit).min(TX_BUFFER - HEADER_LEN);
            if chunk == 0 {
                break;
            }
            let Some(id) = self.take_buffer() else {
                break;
            };
            let header =
                self.header((conn.peer_cid, conn.peer_port), conn.local_port, Op::Rw, chunk as u32, 0);
            let buf = &mut self.bufs[usize::from(id)].0;
            for b in &mut buf[HEADER_LEN..HEADER_LEN + chunk] {
                // `chunk` <= the pending length.
                *b = self.pending.pop_front().unwrap_or(0);
            }
            self.post(id, header, chunk);
            if let Some(c) = &mut self.conn {
                c.tx_cnt = c.tx_cnt.wrapping_add(chunk as u32);
                c.reported_fwd_cnt = c.fwd_cnt;
            }
            posted = true;
        }
        if posted {
            self.kick.notify(TX_QUEUE);
        }
    }

    /// Sends a header-only packet; waits (bounded) for a TX buffer if all are in flight.
    fn control(&mut self, to: (u64, u32), from_port: u32, op: Op, flags: u32) {
        let mut id = self.take_buffer();
        let mut spins = 0u32;
        while id.is_none() && spins < 10_000_000 {
            core::hint::spin_loop();
            spins += 1;
            id = self.take_buffer();
        }
        let Some(id) = id else {
            self.control_dropped += 1;
            return;
        };
        let header = self.header(to, from_port, op, 0, flags);
        self.post(id, header, 0);
        if let Some(c) = &mut self.conn {
            c.reported_fwd_cnt = c.fwd_cnt;
        }
        self.kick.notify(TX_QUEUE);
    }

    fn control_to_peer(&mut self, op: Op, flags: u32) {
        if let Some(c) = self.conn {
            self.control((c.peer_cid, c.peer_port), c.local_port, op, flags);
        }
    }

    /// Tells the peer our `fwd_cnt` if it is due.
    fn credit_update_if_due(&mut self) {
        if self.conn.is_some_and(|c| c.credit_update_due()) {
            self.control_to_peer(Op::CreditUpdate, 0);
        }
    }

    /// Ends the connection from our side: SHUTDOWN (both directions); the peer answers with
    /// RST, and the host side sees its stream close.
    pub fn shutdown(&mut self) {
        self.flush();
        self.control_to_peer(Op::Shutdown, SHUTDOWN_BOTH);
    }
}

/// An RX buffer: headroom for [`Rx::stitch`], then what the device writes (header, payload).
#[repr(C, align(64))]
#[derive(Debug)]
pub struct RxBuffer([u8; HEADROOM + HEADER_LEN + RX_PAYLOAD]);

impl RxBuffer {
    /// A zeroed buffer, for a `static`.
    pub const fn new() -> Self {
        RxBuffer([0; HEADROOM + HEADER_LEN + RX_PAYLOAD])
    }
}

impl Default for RxBuffer {
    fn default() -> Self {
        Self::new()
    }
}

/// Payload bytes of a used RX buffer not consumed yet: `[start, end)` of the buffer.
#[derive(Clone, Copy, Debug)]
struct Segment {
    id: u16,
    start: usize,
    end: usize,
    /// The packet's payload length, counted into `fwd_cnt` when the buffer goes back.
    len: u32,
}

/// What one [`Rx::poll`] saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Events {
    /// A connection was accepted on this port.
    pub accepted: Option<u32>,
    /// Payload bytes that arrived.
    pub bytes: usize,
    /// The peer ended the connection (SHUTDOWN or RST, or a transport reset).
    pub closed: bool,
    /// Packets refused: malformed, for another CID, or for no connection (answered with RST).
    pub refused: u32,
}

/// The receive side: RX buffers, and the payloads waiting for the decoder, in order.
#[derive(Debug)]
pub struct Rx<K: Notify> {
    queue: SplitQueue<RX_QUEUE_LEN>,
    bufs: &'static mut [RxBuffer; RX_QUEUE_LEN],
    ready: heapless::Deque<Segment, RX_QUEUE_LEN>,
    listen: &'static [u32],
    republished: u16,
    kick: K,
}

/// Why [`Rx::stitch`] could not join the front buffer to the next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StitchError {
    /// Fewer than two payloads are waiting.
    NothingToJoin,
    /// The front's remainder is longer than the room in front of the next payload.
    TooLong(usize),
}

impl<K: Notify> Rx<K> {
    /// The receive side over `queue` and `bufs`, accepting connections on `listen`. Every
    /// buffer is published at once; call [`Rx::kick`] once the device is live.
    pub fn new(
        queue: &'static mut QueueMemory<RX_QUEUE_LEN>,
        bufs: &'static mut [RxBuffer; RX_QUEUE_LEN],
        listen: &'static [u32],
        kick: K,
    ) -> Self {
        let mut rx = Self {
            queue: SplitQueue::new(queue),
            bufs,
            ready: heapless::Deque::new(),
            listen,
            republished: 0,
            kick,
        };
        for id in 0..RX_QUEUE_LEN as u16 {
            rx.recycle(id);
        }
        rx
    }

    /// The queue, for the device's set-up.
    pub fn queue(&self) -> &SplitQueue<RX_QUEUE_LEN> {
        &self.queue
    }

    pub(crate) fn set_notify(&mut self, kick: K) {
        self.kick = kick;
    }

    fn recycle(&mut self, id: u16) {
        let addr = self.bufs[usize::from(id)].0[HEADROOM..].as_ptr() as u64;
        self.queue.set_buffer(id, addr, (HEADER_LEN + RX_PAYLOAD) as u32, true);
        self.queue.publish(id);
        self.republished += 1;
    }

    /// Notifies the device of the buffers given back since the last kick, unless it said it
    /// needs no notification.
    pub fn kick(&mut self) {
        if self.republished > 0 && !self.queue.notification_suppressed() {
            self.kick.notify(RX_QUEUE);
        }
        self.republished = 0;
    }

    /// Takes what the device has delivered: answers control packets, queues payloads of the
    /// connection for [`Rx::readable`], and tells the peer about credit when due.
    pub fn poll(&mut self, tx: &mut Tx<K>) -> Events {
        let mut ev = Events::default();
        while let Some(used) = self.queue.pop_used() {
            let Ok(id) = u16::try_from(used.id) else {
                ev.refused += 1;
                continue;
            };
            if usize::from(id) >= RX_QUEUE_LEN {
                ev.refused += 1;
                continue;
            }
            let written = (used.len as usize).min(HEADER_LEN + RX_PAYLOAD);
            let buf = &self.bufs[usize::from(id)].0[HEADROOM..];
            let header = match Header::read_from_bytes(&buf[..HEADER_LEN]) {
                Ok(h) if written >= HEADER_LEN => h,
                _ => {
                    ev.refused += 1;
                    self.recycle(id);
                    continue;
                }
            };
            let keep = self.packet(tx, &header, written - HEADER_LEN, id, &mut ev);
            if !keep {
                self.recycle(id);
            }
        }
        tx.flush();
        tx.credit_update_if_due();
        self.kick();
        ev
    }

    /// Handles one packet; true when its buffer now holds payload waiting for the decoder.
    fn packet(&mut self, tx: &mut Tx<K>, h: &Header, room: usize, id: u16, ev: &mut Events) -> bool {
        let op = Op::from_wire(h.op.get());
        if h.dst_cid.get() != tx.guest_cid || h.kind.get() != TYPE_STREAM || op.is_none() {
            ev.refused += 1;
            return false;
        }
        let from = (h.src_cid.get(), h.src_port.get());
        let ours = tx.conn.is_some_and(|c| c.matches(h));
        match op {
            Some(Op::Request) => {
                if tx.conn.is_none() && self.listen.contains(&h.dst_port.get()) {
                    tx.conn = Some(Connection::new(h.dst_port.get(), h));
                    tx.control_to_peer(Op::Response, 0);
                    ev.accepted = Some(h.dst_port.get());
                } else {
                    ev.refused += 1;
                    tx.control(from, h.dst_port.get(), Op::Rst, 0);
                }
                false
            }
            Some(Op::Rst) if ours => {
                ev.closed = true;
                self.close(tx);
                false
            }
            Some(Op::Rst) => false,
            _ if !ours => {
                ev.refused += 1;
                tx.control(from, h.dst_port.get(), Op::Rst, 0);
                false
            }
            Some(op) => {
                if let Some(c) = &mut tx.conn {
                    c.peer_credit_from(h);
                }
                match op {
                    Op::Rw => {
                        let len = h.len.get() as usize;
                        if len > room || len > RX_PAYLOAD {
                            ev.refused += 1;
                            return false;
                        }
                        if len == 0 || tx.conn.is_some_and(|c| c.peer_closed) {
                            return false;
                        }
                        let start = HEADROOM + HEADER_LEN;
                        // The deque holds at most every buffer once.
                        let _ =
                            self.ready.push_back(Segment { id, start, end: start + len, len: len as u32 });
                        ev.bytes += len;
                        true
                    }
                    Op::Shutdown => {
                        if let Some(c) = &mut tx.conn {
                            c.peer_closed = true;
                        }
                        ev.closed = true;
                        false
                    }
                    Op::CreditRequest => {
                        tx.control_to_peer(Op::CreditUpdate, 0);
                        false
                    }
                    // CREDIT_UPDATE: the credit was taken above; RESPONSE: we never connect.
                    _ => false,
                }
            }
            None => false,
        }
    }

    /// Forgets the connection: its unread payloads go back to the device.
    fn close(&mut self, tx: &mut Tx<K>) {
        while let Some(seg) = self.ready.pop_front() {
            self.recycle(seg.id);
        }
        tx.conn = None;
        tx.pending.clear();
    }

    /// Ends the connection after a SHUTDOWN from the peer (or when we are done with it):
    /// answers with RST and forgets it.
    pub fn reset(&mut self, tx: &mut Tx<K>) {
        tx.control_to_peer(Op::Rst, 0);
        self.close(tx);
        self.kick();
    }

    /// The payload bytes waiting, in order: the front buffer's rest, then the next buffer's.
    pub fn readable(&self) -> (&[u8], &[u8]) {
        let slice = |s: Option<&Segment>| match s {
            Some(s) => &self.bufs[usize::from(s.id)].0[s.start..s.end],
            None => &[][..],
        };
        let mut it = self.ready.iter();
        (slice(it.next()), slice(it.next()))
    }

    /// Payload bytes waiting in all buffers.
    pub fn available(&self) -> usize {
        self.ready.iter().map(|s| s.end - s.start).sum()
    }

    /// Payloads (buffers) waiting.
    pub fn segments(&self) -> usize {
        self.ready.len()
    }

    /// Drops `n` bytes from the front; buffers emptied go back to the device, their payload
    /// counted in `fwd_cnt`.
    pub fn consume(&mut self, mut n: usize, tx: &mut Tx<K>) {
        while n > 0 {
            let Some(front) = self.ready.front_mut() else {
                break;
            };
            let take = n.min(front.end - front.start);
            front.start += take;
            n -= take;
            if front.start == front.end {
                self.retire_front(tx);
            }
        }
    }

    fn retire_front(&mut self, tx: &mut Tx<K>) {
        if let Some(seg) = self.ready.pop_front() {
            if let Some(c) = &mut tx.conn {
                c.fwd_cnt = c.fwd_cnt.wrapping_add(seg.len);
            }
            self.recycle(seg.id);
        }
    }

    /// Joins the front payload's rest to the next payload (copied into the room in front of
    /// it), so that a record header spread over three or more small packets becomes readable
    /// in two pieces. Call it when the decoder made no progress with [`Rx::readable`].
    pub fn stitch(&mut self, tx: &mut Tx<K>) -> Result<(), StitchError> {
        let (Some(&front), Some(&next)) = (self.ready.front(), self.ready.iter().nth(1)) else {
            return Err(StitchError::NothingToJoin);
        };
        let rest = front.end - front.start;
        if rest > next.start {
            return Err(StitchError::TooLong(rest));
        }
        let mut tmp = [0u8; HEADROOM + HEADER_LEN];
        tmp[..rest].copy_from_slice(&self.bufs[usize::from(front.id)].0[front.start..front.end]);
        let at = next.start - rest;
        self.bufs[usize::from(next.id)].0[at..next.start].copy_from_slice(&tmp[..rest]);
        if let Some(n) = self.ready.iter_mut().nth(1) {
            n.start = at;
        }
        self.retire_front(tx);
        Ok(())
    }
}

#[cfg(test)]
#[path = "vsock_tests.rs"]
mod tests;

//! Host tests of the vsock driver against a simulated device (the peer's side of the
//! queues, as the vhost-user daemon plays it).

use std::boxed::Box;
use std::vec::Vec;

use proptest::prelude::*;
use zerocopy::{FromBytes, IntoBytes};

use super::*;
use crate::virtio::queue::device::Device;

const CID: u64 = 3;
const PORT: u32 = 1234;
const PEER_PORT: u32 = 50_000;
static LISTEN: [u32; 2] = [PORT, 1235];

#[derive(Clone, Copy, Debug, Default)]
struct Kicks;

impl Notify for Kicks {
    fn notify(&mut self, _queue: u16) {}
}

/// The driver and the device's view of its RX and TX queues.
struct Harness {
    rx: Rx<Kicks>,
    tx: Tx<Kicks>,
    rx_dev: Device<RX_QUEUE_LEN>,
    tx_dev: Device<TX_QUEUE_LEN>,
    /// RX buffers the device holds, in the order it got them.
    rx_bufs: std::collections::VecDeque<(u16, u64, u32)>,
}

fn header(op: Op, len: u32, buf_alloc: u32, fwd_cnt: u32) -> Header {
    Header {
        src_cid: HOST_CID.into(),
        dst_cid: CID.into(),
        src_port: PEER_PORT.into(),
        dst_port: PORT.into(),
        len: len.into(),
        kind: 1.into(),
        op: (op as u16).into(),
        flags: 0.into(),
        buf_alloc: buf_alloc.into(),
        fwd_cnt: fwd_cnt.into(),
    }
}

impl Harness {
    fn new() -> Self {
        let rx = Rx::new(
            Box::leak(Box::new(QueueMemory::new())),
            Box::leak((0..RX_QUEUE_LEN).map(|_| RxBuffer::new()).collect::<Vec<_>>().try_into().unwrap()),
            &LISTEN,
            Kicks,
        );
        let tx = Tx::new(
            Box::leak(Box::new(QueueMemory::new())),
            Box::leak((0..TX_QUEUE_LEN).map(|_| TxBuffer::new()).collect::<Vec<_>>().try_into().unwrap()),
            Kicks,
            CID,
        );
        let (rx_dev, tx_dev) = (Device::of(rx.queue()), Device::of(tx.queue()));
        let mut h = Harness { rx, tx, rx_dev, tx_dev, rx_bufs: Default::default() };
        h.take_rx_buffers();
        h
    }

    fn take_rx_buffers(&mut self) {
        while let Some((id, addr, len, writes)) = self.rx_dev.take() {
            assert!(writes, "RX buffers are device-writable");
            assert_eq!(len as usize, HEADER_LEN + RX_PAYLOAD);
            self.rx_bufs.push_back((id, addr, len));
        }
    }

    /// The device delivers one packet into the next RX buffer; false if it has none.
    fn deliver(&mut self, h: Header, payload: &[u8]) -> bool {
        self.take_rx_buffers();
        let Some((id, addr, len)) = self.rx_bufs.pop_front() else {
            return false;
        };
        assert!(HEADER_LEN + payload.len() <= len as usize);
        // SAFETY: test-only DMA: the buffer was published to the device and is not read by
        // the driver until it comes back through the used ring.
        let buf = unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, len as usize) };
        buf[..HEADER_LEN].copy_from_slice(h.as_bytes());
        buf[HEADER_LEN..HEADER_LEN + payload.len()].copy_from_slice(payload);
        self.rx_dev.give_back(id, (HEADER_LEN + payload.len()) as u32);
        true
    }

    /// Packets the driver sent, as (header, payload); their buffers go back.
    fn sent(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some((id, addr, len, writes)) = self.tx_dev.take() {
            assert!(!writes, "TX buffers are device-readable");
            // SAFETY: test-only: the published TX buffer, read as the device would.
            let buf = unsafe { core::slice::from_raw_parts(addr as *const u8, len as usize) };
            let h = Header::read_from_bytes(&buf[..HEADER_LEN]).unwrap();
            assert_eq!(h.len.get() as usize, len as usize - HEADER_LEN);
            out.push((h, buf[HEADER_LEN..].to_vec()));
            self.tx_dev.give_back(id, 0);
        }
        out
    }

    fn poll(&mut self) -> Events {
        self.rx.poll(&mut self.tx)
    }

    fn connect(&mut self, peer_buf_alloc: u32) {
        assert!(self.deliver(header(Op::Request, 0, peer_buf_alloc, 0), &[]));
        assert_eq!(self.poll().accepted, Some(PORT));
        let sent = self.sent();
        assert_eq!(sent.len(), 1);
        let (h, _) = sent[0];
        assert_eq!(Op::from_wire(h.op.get()), Some(Op::Response));
        assert_eq!((h.dst_port.get(), h.src_port.get(), h.dst_cid.get()), (PEER_PORT, PORT, HOST_CID));
        assert_eq!((h.buf_alloc.get(), h.fwd_cnt.get()), (BUF_ALLOC, 0));
    }

    fn readable(&self) -> Vec<u8> {
        let (a, b) = self.rx.readable();
        [a, b].concat()
    }
}

#[test]
fn a_request_on_a_listening_port_is_accepted_and_one_elsewhere_reset() {
    let mut h = Harness::new();
    let mut other = header(Op::Request, 0, 4096, 0);
    other.dst_port = 9.into();
    assert!(h.deliver(other, &[]));
    let ev = h.poll();
    assert_eq!((ev.accepted, ev.refused), (None, 1));
    let sent = h.sent();
    assert_eq!(Op::from_wire(sent[0].0.op.get()), Some(Op::Rst));
    h.connect(4096);
    // A second connection while one is open is reset.
    let mut second = header(Op::Request, 0, 4096, 0);
    second.src_port = 7.into();
    assert!(h.deliver(second, &[]));
    assert_eq!(h.poll().refused, 1);
    assert_eq!(Op::from_wire(h.sent()[0].0.op.get()), Some(Op::Rst));
}

#[test]
fn payloads_are_read_in_place_in_order_and_buffers_return_when_consumed() {
    let mut h = Harness::new();
    h.connect(4096);
    assert!(h.deliver(header(Op::Rw, 5, 4096, 0), b"hello"));
    assert!(h.deliver(header(Op::Rw, 6, 4096, 0), b" world"));
    assert!(h.deliver(header(Op::Rw, 1, 4096, 0), b"!"));
    assert_eq!(h.poll().bytes, 12);
    assert_eq!(h.rx.readable(), (&b"hello"[..], &b" world"[..]));
    assert_eq!(h.rx.available(), 12);
    let held = h.rx_bufs.len();
    h.rx.consume(7, &mut h.tx);
    assert_eq!(h.rx.readable(), (&b"orld"[..], &b"!"[..]));
    h.take_rx_buffers();
    assert_eq!(h.rx_bufs.len(), held + 1, "the emptied buffer went back");
    h.rx.consume(5, &mut h.tx);
    assert_eq!(h.rx.available(), 0);
    assert_eq!(h.tx.conn.unwrap().fwd_cnt, 12);
}

#[test]
fn credit_updates_go_out_when_a_quarter_of_the_buffer_was_consumed_or_when_asked() {
    let mut h = Harness::new();
    h.connect(4096);
    let chunk = [7u8; RX_PAYLOAD];
    let quarter = BUF_ALLOC as usize / 4;
    let mut consumed = 0;
    while consumed < quarter {
        assert!(h.deliver(header(Op::Rw, RX_PAYLOAD as u32, 4096, 0), &chunk));
        h.poll();
        assert!(h.sent().is_empty(), "no update before a quarter is consumed");
        h.rx.consume(RX_PAYLOAD, &mut h.tx);
        consumed += RX_PAYLOAD;
    }
    h.poll();
    let sent = h.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(Op::from_wire(sent[0].0.op.get()), Some(Op::CreditUpdate));
    assert_eq!(sent[0].0.fwd_cnt.get() as usize, consumed);
    assert!(h.deliver(header(Op::CreditRequest, 0, 4096, 0), &[]));
    h.poll();
    let sent = h.sent();
    assert_eq!(Op::from_wire(sent[0].0.op.get()), Some(Op::CreditUpdate));
    assert_eq!(sent[0].0.buf_alloc.get(), BUF_ALLOC);
}

#[test]
fn sends_wait_for_the_peers_credit() {
    let mut h = Harness::new();
    h.connect(10);
    let msg: Vec<u8> = (0..25).collect();
    h.tx.send(&msg).unwrap();
    let sent = h.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].1, msg[..10]);
    assert_eq!(h.tx.pending(), 15);
    // The peer consumed 10: its next packet says so; the rest goes out as far as 10 more.
    assert!(h.deliver(header(Op::CreditUpdate, 0, 10, 10), &[]));
    h.poll();
    let sent = h.sent();
    assert_eq!(sent.iter().map(|(_, p)| p.clone()).collect::<Vec<_>>().concat(), msg[10..20]);
    assert!(h.deliver(header(Op::CreditUpdate, 0, 100, 20), &[]));
    h.poll();
    assert_eq!(h.sent().iter().map(|(_, p)| p.clone()).collect::<Vec<_>>().concat(), msg[20..]);
    assert_eq!(h.tx.pending(), 0);
}

#[test]
fn a_full_pending_buffer_refuses_the_whole_message() {
    let mut h = Harness::new();
    h.connect(0);
    h.tx.send(&[1; PENDING]).unwrap();
    assert_eq!(h.tx.send(&[2; 3]), Err(TxError::Full));
    assert_eq!(h.tx.pending(), PENDING);
}

#[test]
fn a_record_over_three_tiny_packets_is_stitched_into_two_pieces() {
    let mut h = Harness::new();
    h.connect(4096);
    for p in [&b"ab"[..], b"c", b"defg"] {
        assert!(h.deliver(header(Op::Rw, p.len() as u32, 4096, 0), p));
    }
    h.poll();
    assert_eq!(h.rx.segments(), 3);
    h.rx.stitch(&mut h.tx).unwrap();
    assert_eq!(h.rx.readable(), (&b"abc"[..], &b"defg"[..]));
    h.rx.stitch(&mut h.tx).unwrap();
    assert_eq!(h.rx.readable(), (&b"abcdefg"[..], &b""[..]));
    assert_eq!(h.rx.stitch(&mut h.tx), Err(StitchError::NothingToJoin));
    // Stitched bytes were counted once, when their first buffer went back.
    assert_eq!(h.tx.conn.unwrap().fwd_cnt, 3);
    h.rx.consume(7, &mut h.tx);
    assert_eq!(h.tx.conn.unwrap().fwd_cnt, 7);
}

#[test]
fn shutdown_closes_and_rst_forgets_the_connection() {
    let mut h = Harness::new();
    h.connect(4096);
    assert!(h.deliver(header(Op::Rw, 3, 4096, 0), b"abc"));
    assert!(h.deliver(header(Op::Shutdown, 0, 4096, 0), &[]));
    let ev = h.poll();
    assert!(ev.closed);
    assert!(h.tx.conn.unwrap().peer_closed);
    assert_eq!(h.readable(), b"abc", "data before the shutdown stays readable");
    h.rx.reset(&mut h.tx);
    assert_eq!(Op::from_wire(h.sent()[0].0.op.get()), Some(Op::Rst));
    assert!(h.tx.conn.is_none());
    h.connect(4096);
    assert!(h.deliver(header(Op::Rst, 0, 4096, 0), &[]));
    assert!(h.poll().closed);
    assert!(h.tx.conn.is_none());
}

#[test]
fn malformed_and_stray_packets_are_refused_and_their_buffers_reused() {
    let mut h = Harness::new();
    h.connect(4096);
    let mut lying = header(Op::Rw, 100, 4096, 0);
    assert!(h.deliver(lying, b"short"));
    lying.dst_cid = 99.into();
    assert!(h.deliver(lying, b""));
    let mut stray = header(Op::Rw, 1, 4096, 0);
    stray.src_port = 1.into();
    assert!(h.deliver(stray, b"x"));
    let ev = h.poll();
    assert_eq!((ev.refused, ev.bytes), (3, 0));
    assert_eq!(Op::from_wire(h.sent()[0].0.op.get()), Some(Op::Rst), "the stray peer is reset");
    h.take_rx_buffers();
    assert_eq!(h.rx_bufs.len(), RX_QUEUE_LEN, "every buffer is back with the device");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any split of a stream into packets, read by a consumer that takes any amount and
    /// stitches when it cannot progress, gives the same bytes; the peer never sends past the
    /// credit our headers grant.
    #[test]
    fn any_packet_split_gives_the_same_bytes_within_credit(
        seed in any::<u64>(),
        len in 1usize..200_000,
    ) {
        let mut rng = seed | 1;
        let mut next = |n: usize| { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; (rng % n as u64) as usize };
        let stream: Vec<u8> = (0..len).map(|i| (i * 31 + i / 7) as u8).collect();
        let mut h = Harness::new();
        h.connect(4096);
        let (mut sent, mut out) = (0usize, Vec::new());
        let mut peer_view_fwd = 0u32;
        let mut peer_view_alloc = BUF_ALLOC;
        while out.len() < len {
            // The peer sends while our credit allows.
            while sent < len {
                let credit = peer_view_alloc as usize - (sent - peer_view_fwd as usize);
                let tiny = next(4) == 0;
                let size = (1 + next(if tiny { 8 } else { RX_PAYLOAD })).min(len - sent).min(credit);
                if size == 0 || !h.deliver(header(Op::Rw, size as u32, 4096, 0), &stream[sent..sent + size]) {
                    break;
                }
                sent += size;
            }
            h.poll();
            for (hd, _) in h.sent() {
                peer_view_fwd = hd.fwd_cnt.get();
                peer_view_alloc = hd.buf_alloc.get();
            }
            // The consumer takes up to a random amount; if it would need more than the two
            // pieces give (a unit of up to 512 bytes), it stitches.
            let (a, b) = h.rx.readable();
            let want = 1 + next(512);
            if a.len() + b.len() >= want || out.len() + a.len() + b.len() == len {
                let more = next(a.len() + b.len() + 1);
                let take = (a.len() + b.len()).min(want.max(more));
                out.extend_from_slice(&[a, b].concat()[..take]);
                h.rx.consume(take, &mut h.tx);
            } else if h.rx.segments() > 2 || (h.rx.segments() == 2 && sent == len) {
                h.rx.stitch(&mut h.tx).unwrap();
            }
            prop_assert!(sent - (h.tx.conn.unwrap().fwd_cnt as usize) <= BUF_ALLOC as usize);
        }
        prop_assert_eq!(out, stream);
        prop_assert_eq!(h.tx.conn.unwrap().fwd_cnt as usize, len);
    }
}

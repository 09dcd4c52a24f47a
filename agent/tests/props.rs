//! Property tests: no input panics the decoder or the engine; every record emitted parses
//! back to itself; a valid stream decodes the same however the ring splits it.

use agent::config::TARGET_PAGE_SIZE;
use agent::testing::{postcopy_stream, run_stream, StreamBuilder, TestRing};
use agent::wire::command::{Advise, Command, Dialect};
use agent::wire::discard::{DiscardHeader, DiscardMask, DiscardRange};
use agent::wire::header::{ConfigSubsection, Configuration};
use agent::wire::ram::{BlockEntry, RamRecord};
use agent::wire::return_path::RpMessage;
use agent::wire::section::FullHeader;
use agent::wire::{Parsed, Writer};
use proptest::prelude::*;
use zerocopy::byteorder::big_endian::U64;

fn name() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 1..=255)
}

fn emit(f: impl FnOnce(&mut Writer<'_>) -> Option<()>) -> Vec<u8> {
    let mut buf = vec![0u8; 2048];
    let mut w = Writer::new(&mut buf);
    f(&mut w).expect("fits");
    let n = w.len();
    buf.truncate(n);
    buf
}

fn command() -> impl Strategy<Value = (Command<'static>, Dialect)> {
    let v72 = prop_oneof![
        Just(Command::OpenReturnPath),
        any::<u32>().prop_map(Command::Ping),
        (any::<u64>(), any::<u64>()).prop_map(|(h, t)| Command::Advise(Some(Advise {
            host_page_size: U64::new(h),
            target_page_size: U64::new(t)
        }))),
        Just(Command::Advise(None)),
        Just(Command::Listen),
        Just(Command::Run),
        any::<u32>().prop_map(Command::Packaged),
        Just(Command::EnableColo),
        Just(Command::Resume),
        (11u16..).prop_map(|cmd| Command::Unknown { cmd, len: 0 }),
    ];
    prop_oneof![
        v72.prop_map(|c| (c, Dialect::Qemu72)),
        any::<u8>().prop_map(|s| (Command::PostcopyEnd(s), Dialect::SeedV5)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048), cap in 520usize..5000, chunk in 1usize..600) {
        let _ = run_stream(&bytes, cap, chunk);
        let mut headed = b"QEVM\x00\x00\x00\x03".to_vec();
        headed.extend_from_slice(&bytes);
        let _ = run_stream(&headed, cap, chunk);
    }

    #[test]
    fn arbitrary_v5_streams_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..1024), masks in prop::collection::vec((any::<u64>(), any::<u32>()), 1..4), fbo in any::<u8>()) {
        let mut s = StreamBuilder { dialect: Dialect::SeedV5, ..Default::default() };
        s.header().command(Command::OpenReturnPath).advise(4096, 4096).ram_start(2, &[(b"ram", 1 << 20)]);
        s.discard_v5(b"ram", fbo, &masks).raw(&bytes);
        let v5 = agent::postcopy::EngineConfig { dialect: Dialect::SeedV5, machine: None };
        let _ = agent::testing::run_stream_with(&s.bytes, 4096, 777, v5);
    }

    /// A corrupted stream ends the same way through a small split ring as read whole: the
    /// same typed error at the same offset (inside the stream), or a completion with every
    /// page there; and the same memory, return path and counters either way.
    #[test]
    fn mutated_streams_end_the_same_however_the_ring_splits_them(flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8), cap in 520usize..5000, chunk in 1usize..1500) {
        let mut stream = postcopy_stream(6, 1..4);
        for (at, byte) in flips {
            let i = at.index(stream.len());
            stream[i] = byte;
        }
        let whole = run_stream(&stream, 1 << 20, 1 << 20);
        let split = run_stream(&stream, cap, chunk);
        match &whole.result {
            Err(e) => prop_assert!(e.offset <= stream.len() as u64, "{}", e),
            Ok(p) => prop_assert!(p.finished),
        }
        prop_assert_eq!(split.result, whole.result);
        prop_assert_eq!(split.ports.memory.blocks, whole.ports.memory.blocks);
        prop_assert_eq!(split.ports.device_state, whole.ports.device_state);
        prop_assert_eq!(split.rp, whole.rp);
        prop_assert_eq!(split.stats, whole.stats);
    }

    #[test]
    fn commands_round_trip((cmd, dialect) in command()) {
        let bytes = emit(|w| cmd.emit(dialect, w));
        prop_assert_eq!(Command::parse(&bytes, dialect), Ok(Parsed::Done(cmd, bytes.len())));
    }

    #[test]
    fn recv_bitmap_round_trips(block in name()) {
        let cmd = Command::RecvBitmap(&block);
        let bytes = emit(|w| cmd.emit(Dialect::Qemu72, w));
        prop_assert_eq!(Command::parse(&bytes, Dialect::Qemu72), Ok(Parsed::Done(cmd, bytes.len())));
    }

    #[test]
    fn discards_round_trip(block in name(), ranges in prop::collection::vec((any::<u64>(), any::<u64>()), 1..12), v5 in any::<bool>(), fbo in any::<u8>()) {
        let dialect = if v5 { Dialect::SeedV5 } else { Dialect::Qemu72 };
        let header = DiscardHeader { block: &block, first_bit_offset: v5.then_some(fbo), entries: ranges.len() as u16 };
        let mut bytes = emit(|w| Command::RamDiscard(header).emit(dialect, w));
        let head_len = bytes.len();
        for &(a, b) in &ranges {
            bytes.extend(emit(|w| if v5 { DiscardMask::emit(a, b as u32, w) } else { DiscardRange::emit(a, b, w) }));
        }
        prop_assert_eq!(Command::parse(&bytes, dialect), Ok(Parsed::Done(Command::RamDiscard(header), head_len)));
        let mut at = head_len;
        for &(a, b) in &ranges {
            if v5 {
                prop_assert_eq!(DiscardMask::parse(&bytes[at..]), Ok(Parsed::Done((a, b as u32), 12)));
            } else {
                prop_assert_eq!(DiscardRange::parse(&bytes[at..]), Ok(Parsed::Done((a, b), 16)));
            }
            at += DiscardHeader::entry_len(dialect);
        }
        prop_assert_eq!(at, bytes.len());
    }

    #[test]
    fn section_headers_round_trip(idstr in name(), start in any::<bool>(), id in any::<u32>(), inst in any::<u32>(), ver in any::<u32>()) {
        let h = FullHeader { start, section_id: id, idstr: &idstr, instance_id: inst, version_id: ver };
        let bytes = emit(|w| h.emit(w));
        prop_assert_eq!(FullHeader::parse(&bytes), Ok(Parsed::Done(h, bytes.len())));
    }

    #[test]
    fn ram_records_round_trip(block in prop::option::of(name()), page in 0u64..(1 << 40), fill in any::<u8>(), kind in 0u8..4) {
        let offset = page * TARGET_PAGE_SIZE;
        let rec = match kind {
            0 => RamRecord::Zero { block: block.as_deref(), offset, fill },
            1 => RamRecord::Page { block: block.as_deref(), offset },
            2 => RamRecord::MemSize(offset),
            _ => RamRecord::Eos,
        };
        let bytes = emit(|w| rec.emit(w));
        prop_assert_eq!(RamRecord::parse(&bytes), Ok(Parsed::Done(rec, bytes.len())));
    }

    #[test]
    fn block_entries_and_configuration_round_trip(n in name(), len in any::<u64>(), bits in any::<u32>(), uuid in any::<[u8; 16]>()) {
        let e = BlockEntry { name: &n, used_length: len };
        let bytes = emit(|w| e.emit(w));
        prop_assert_eq!(BlockEntry::parse(&bytes), Ok(Parsed::Done(e, bytes.len())));
        let machine = &n[..n.len().min(64)];
        let c = Configuration { machine };
        let bytes = emit(|w| c.emit(w));
        prop_assert_eq!(Configuration::parse(&bytes), Ok(Parsed::Done(c, bytes.len())));
        for sub in [ConfigSubsection::TargetPageBits(bits), ConfigSubsection::Capabilities(bits), ConfigSubsection::Uuid(&uuid)] {
            let bytes = emit(|w| sub.emit(w));
            prop_assert_eq!(ConfigSubsection::parse(&bytes), Ok(Parsed::Done(sub, bytes.len())));
        }
    }

    #[test]
    fn return_path_messages_round_trip(block in name(), start in any::<u64>(), len in any::<u32>(), v in any::<u32>()) {
        for msg in [RpMessage::Shut(v), RpMessage::Pong(v), RpMessage::ReqPages { start, len }, RpMessage::ReqPagesId { start, len, block: &block }] {
            let mut buf = [0u8; 512];
            let n = msg.emit(&mut buf).unwrap();
            prop_assert_eq!(RpMessage::parse(&buf[..n]), Ok(Parsed::Done(msg, n)));
        }
    }

    #[test]
    fn valid_streams_decode_the_same_through_any_ring(pages in 1u64..12, lo in 0u64..6, span in 0u64..6, cap in 520usize..9000, chunk in 1usize..5000) {
        let lo = lo.min(pages - 1);
        let hi = (lo + span).min(pages);
        let stream = postcopy_stream(pages, lo..hi);
        let whole = run_stream(&stream, 1 << 20, 1 << 20);
        prop_assert!(whole.result.as_ref().is_ok_and(|p| p.finished));
        let split = run_stream(&stream, cap, chunk);
        prop_assert_eq!(split.result.map(|p| p.finished), Ok(true));
        prop_assert_eq!(split.ports.memory.blocks, whole.ports.memory.blocks);
        prop_assert_eq!(split.ports.device_state, whole.ports.device_state);
        prop_assert_eq!(split.rp, whole.rp);
        prop_assert_eq!(split.stats, whole.stats);
    }
}

#[test]
fn builder_streams_are_what_the_spec_shows() {
    // The blob of `-machine none` ends with PING(3) and RUN: the last 14 bytes.
    let mut blob = StreamBuilder::new();
    blob.command(Command::Ping(3)).command(Command::Run);
    assert_eq!(blob.bytes, [0x08, 0, 2, 0, 4, 0, 0, 0, 3, 0x08, 0, 5, 0, 0]);
}

/// The records of `stream` as decoded through a ring of `capacity` bytes filled `chunk` bytes
/// at a time, as owned strings, with the pieces of each payload joined: what the decoder
/// says, independent of where the ring split it.
fn records_through_ring(stream: &[u8], capacity: usize, chunk: usize) -> Vec<String> {
    use agent::decoder::{Decoder, Record, Step};
    let mut decoder = Decoder::new(Dialect::Qemu72);
    let mut ring = TestRing::new(capacity);
    let mut written = 0;
    let mut out: Vec<String> = Vec::new();
    let mut payload: Option<(&'static str, Vec<u8>)> = None;
    loop {
        let n = ring.arrive(&stream[written..], chunk);
        written += n;
        let mut progressed = false;
        loop {
            let (first, second) = ring.readable();
            let step = decoder.next(first, second).expect("valid stream");
            let Step::Record { record, len: used, .. } = step else { break };
            progressed = true;
            let piece = match record {
                Record::PageData(d) => Some(("page", d)),
                Record::DeviceData(d) => Some(("device", d)),
                Record::VmDescriptionData(d) => Some(("vmdesc", d)),
                Record::CommandPayload(d) => Some(("payload", d)),
                _ => None,
            };
            match (piece, payload.as_mut()) {
                (Some((kind, d)), Some((k, buf))) if *k == kind => buf.extend_from_slice(d),
                (Some((kind, d)), _) => {
                    if let Some((k, buf)) = payload.take() {
                        out.push(format!("{k} {buf:?}"));
                    }
                    payload = Some((kind, d.to_vec()));
                }
                (None, _) => {
                    if let Some((k, buf)) = payload.take() {
                        out.push(format!("{k} {buf:?}"));
                    }
                    out.push(format!("{record:?}"));
                }
            }
            ring.consume(used);
        }
        if written == stream.len() && !progressed && n == 0 {
            if let Some((k, buf)) = payload.take() {
                out.push(format!("{k} {buf:?}"));
            }
            assert!(decoder.at_end(), "the whole stream decoded");
            return out;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// The decoder itself (not only the engine's effects) yields the same records, payloads
    /// joined, however a ring splits a valid stream.
    #[test]
    fn the_same_records_through_any_ring(pages in 1u64..6, cap in 520usize..6000, chunk in 1usize..5000) {
        let stream = postcopy_stream(pages, 0..pages.min(2));
        let whole = records_through_ring(&stream, stream.len() + 1, stream.len());
        let split = records_through_ring(&stream, cap, chunk);
        prop_assert_eq!(split, whole);
    }
}

#[test]
fn a_real_capture_yields_the_same_records_through_small_rings() {
    let stream =
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/captures/pc-postcopy.bin")).unwrap();
    let whole = records_through_ring(&stream, stream.len() + 1, stream.len());
    assert!(whole.len() > 8000, "{} records", whole.len());
    for (cap, chunk) in [(513, 511), (4099, 4097), (9000, 77)] {
        assert_eq!(records_through_ring(&stream, cap, chunk), whole, "ring {cap}, arrivals of {chunk}");
    }
}

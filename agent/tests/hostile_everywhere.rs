//! Every class of hostile record (`docs/wire-format.md` §9-10) inserted at many record boundaries of every
//! committed real capture and of generated streams in both dialects, including a layout
//! above 4 GiB. Each insertion must end in the typed error its class names, at the inserted
//! record's offset, with SHUT(1) sent when the return path is open and every page received
//! before the insertion intact; an inserted EOF must never complete a migration whose pages
//! have not all arrived.

use agent::config::TARGET_PAGE_SIZE;
use agent::decoder::{Decoder, Record, Step};
use agent::postcopy::EngineConfig;
use agent::testing::{pattern_page, postcopy_stream, run_stream_with, Outcome, StreamBuilder};
use agent::wire::command::{Command, Dialect};
use agent::wire::ram::RamRecord;
use agent::wire::section::{FullHeader, ShortHeader};
use agent::wire::{SectionType, Writer};
use agent::{Defect, Field};

/// Where a record may be inserted: after a top-level record, outside a PACKAGED blob.
#[derive(Clone, Copy, Debug)]
struct Boundary {
    at: usize,
    /// The return path is open there.
    rp_open: bool,
}

/// What the stream says about itself: boundaries, the `ram` section id, the first block.
struct Shape {
    boundaries: Vec<Boundary>,
    ram_section: u32,
    block: (Vec<u8>, u64),
}

fn shape(stream: &[u8], dialect: Dialect) -> Shape {
    let mut d = Decoder::new(dialect);
    let (mut at, mut in_package, mut rp_open) = (0usize, false, false);
    let mut shape = Shape { boundaries: Vec::new(), ram_section: 0, block: (Vec::new(), 0) };
    while at < stream.len() {
        let Ok(Step::Record { record, len, .. }) = d.next(&stream[at..], &[]) else { break };
        at += len;
        let top_level = match record {
            Record::Command(Command::OpenReturnPath) => {
                rp_open = true;
                true
            }
            Record::Command(Command::Packaged(_)) => {
                in_package = true;
                false
            }
            // RUN closes a PACKAGED blob: right after it is the top level again.
            Record::Command(Command::Run) => {
                in_package = false;
                true
            }
            Record::Command(Command::RamDiscard(_)) => false,
            Record::DiscardEnd | Record::Footer => true,
            Record::Command(_) => true,
            Record::RamStart { section_id } => {
                shape.ram_section = section_id;
                false
            }
            Record::Block(b) if shape.block.0.is_empty() => {
                shape.block = (b.name.to_vec(), b.used_length);
                false
            }
            _ => false,
        };
        // Only once the block list is known (a PART needs the `ram` section).
        if top_level && !in_package && !shape.block.0.is_empty() {
            shape.boundaries.push(Boundary { at, rp_open });
        }
    }
    shape
}

/// (class, bytes, field, defect, offset of the faulty record within the bytes).
type Hostile = (&'static str, Vec<u8>, Field, Defect, u64);

/// One hostile record of each class, for a stream of this shape, and the error it must give.
fn hostile_records(shape: &Shape, dialect: Dialect) -> Vec<Hostile> {
    let put = |f: &dyn Fn(&mut Writer<'_>) -> Option<()>| {
        let mut buf = [0u8; 600];
        let mut w = Writer::new(&mut buf);
        f(&mut w).unwrap();
        let n = w.len();
        buf[..n].to_vec()
    };
    let part = put(&|w| ShortHeader::emit(SectionType::Part, shape.ram_section, w));
    let (block, len) = (&shape.block.0, shape.block.1);
    let mut unknown_block = part.clone();
    unknown_block.extend(put(&|w| RamRecord::Page { block: Some(b"no-such-block"), offset: 0 }.emit(w)));
    let mut past_the_block = part.clone();
    past_the_block.extend(put(&|w| RamRecord::Zero { block: Some(block), offset: len, fill: 0 }.emit(w)));
    let instance_1 = FullHeader { start: true, section_id: 90, idstr: b"ram", instance_id: 1, version_id: 4 };
    let other_iterative =
        FullHeader { start: true, section_id: 91, idstr: b"block", instance_id: 0, version_id: 1 };
    let page = TARGET_PAGE_SIZE;
    let in_part = part.len() as u64;
    let mut records = vec![
        ("unknown section type", vec![0x09], Field::SectionType, Defect::Unknown { found: 9 }, 0),
        ("unknown command", vec![0x08, 0, 0x0b, 0, 0], Field::CommandId, Defect::Unknown { found: 11 }, 0),
        (
            "PING announcing 60,000 bytes",
            vec![0x08, 0, 2, 0xea, 0x60],
            Field::CommandLength,
            Defect::BadValue { found: 60000, expected: 4 },
            0,
        ),
        (
            "part of an unknown section",
            vec![0x02, 0, 0, 0xde, 0xad],
            Field::SectionId,
            Defect::Unknown { found: 0xdead },
            0,
        ),
        ("page of an unknown block", unknown_block, Field::RamBlockName, Defect::UnknownBlock, in_part),
        (
            "page past the block",
            past_the_block,
            Field::RamOffset,
            Defect::OutOfRange { start: len, len: page, limit: len },
            in_part,
        ),
        (
            "ram instance 1",
            put(&|w| instance_1.emit(w)),
            Field::SectionInstance,
            Defect::BadValue { found: 1, expected: 0 },
            0,
        ),
        (
            "another iterative section",
            put(&|w| other_iterative.emit(w)),
            Field::SectionIdstr,
            Defect::Unsupported,
            0,
        ),
    ];
    match dialect {
        Dialect::Qemu72 => records.extend([
            (
                "RECV_BITMAP announcing 60,000 bytes",
                vec![0x08, 0, 10, 0xea, 0x60],
                Field::CommandLength,
                Defect::BadValue { found: 60000, expected: 256 },
                0,
            ),
            ("COLO", vec![0x08, 0, 8, 0, 0], Field::CommandId, Defect::Unsupported, 0),
        ]),
        // v5 has neither: 8 and 10 are unknown numbers there.
        Dialect::SeedV5 => records.extend([
            ("7.2's COLO number", vec![0x08, 0, 8, 0, 0], Field::CommandId, Defect::Unknown { found: 8 }, 0),
            (
                "7.2's LISTEN number",
                vec![0x08, 0, 4, 0, 0],
                Field::CommandId,
                Defect::Unknown { found: 4 },
                0,
            ),
        ]),
    }
    records
}

fn with_insert(stream: &[u8], at: usize, record: &[u8]) -> Vec<u8> {
    [&stream[..at], record, &stream[at..]].concat()
}

/// Pages received before `at` in the clean stream are intact in `out` (the fake memory
/// already refuses any write outside a block).
fn received_pages_intact(clean_prefix: &Outcome, out: &Outcome) {
    for (a, b) in clean_prefix.ports.memory.blocks.iter().zip(&out.ports.memory.blocks) {
        assert_eq!(a, b, "block {:?} changed", String::from_utf8_lossy(&a.name));
    }
}

fn every_class_everywhere(name: &str, stream: &[u8], dialect: Dialect, points: usize) {
    let config = EngineConfig { dialect, machine: None };
    let run = |s: &[u8]| run_stream_with(s, 4096, 1500, config);
    let whole = run(stream);
    let shape = shape(stream, dialect);
    assert!(shape.boundaries.len() >= 2, "{name}: {} boundaries", shape.boundaries.len());
    let step = shape.boundaries.len().div_ceil(points).max(1);
    let chosen: Vec<Boundary> =
        shape.boundaries.iter().step_by(step).chain(shape.boundaries.last()).copied().collect();
    let records = hostile_records(&shape, dialect);
    for b in &chosen {
        let clean_prefix = run(&stream[..b.at]);
        for (class, record, field, defect, within) in &records {
            let out = run(&with_insert(stream, b.at, record));
            let e = out.result.as_ref().expect_err(class);
            let expected = (*field, *defect, b.at as u64 + within);
            assert_eq!((e.field, e.defect, e.offset), expected, "{name} @{}: {class}", b.at);
            if b.rp_open {
                assert_eq!(
                    out.rp.last().map(Vec::as_slice),
                    Some(&[0, 1, 0, 4, 0, 0, 0, 1][..]),
                    "{name}: {class}"
                );
            }
            received_pages_intact(&clean_prefix, &out);
        }
        // An EOF here: complete only if every page is there (then RAM is the whole run's).
        let out = run(&with_insert(stream, b.at, &[0]));
        match &out.result {
            Ok(p) => {
                assert!(p.finished, "{name} @{}", b.at);
                assert_eq!(
                    out.ports.memory.blocks, whole.ports.memory.blocks,
                    "{name} @{}: EOF completed early",
                    b.at
                );
            }
            Err(e) => assert!(e.offset <= stream.len() as u64 + 1, "{name} @{}: {e}", b.at),
        }
    }
}

fn capture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/tests/captures/{name}.bin", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

#[test]
fn every_class_at_many_boundaries_of_every_real_capture() {
    for name in ["none-precopy", "pc-precopy-dirty", "q35-precopy", "pc-postcopy", "q35-postcopy"] {
        every_class_everywhere(name, &capture(name), Dialect::Qemu72, 12);
    }
}

#[test]
fn every_class_at_every_boundary_of_generated_streams_in_both_dialects() {
    every_class_everywhere("7.2 postcopy", &postcopy_stream(24, 4..12), Dialect::Qemu72, usize::MAX);
    every_class_everywhere("v5 postcopy", &v5_postcopy_stream(24, 4..12), Dialect::SeedV5, usize::MAX);
}

#[test]
fn every_class_with_a_layout_above_4_gib() {
    every_class_everywhere("q35 above 4 GiB", &q35_above_4gib(), Dialect::Qemu72, usize::MAX);
}

/// A v5 postcopy stream: precopy of every page, a semi-sparse discard, LISTEN, RUN, the
/// discarded pages again, POSTCOPY_END, EOF.
fn v5_postcopy_stream(pages: u64, discarded: std::ops::Range<u64>) -> Vec<u8> {
    let mut s = StreamBuilder { dialect: Dialect::SeedV5, ..Default::default() };
    s.header().command(Command::OpenReturnPath).command(Command::Ping(1)).advise(4096, 4096);
    s.ram_start(2, &[(b"pc.ram", pages * TARGET_PAGE_SIZE)]).ram_part(2, false);
    for p in 0..pages {
        s.page(if p == 0 { Some(b"pc.ram") } else { None }, p * TARGET_PAGE_SIZE, &pattern_page(p));
    }
    s.eos(2);
    let mask = discarded.clone().fold(0u32, |m, p| m | 1 << p);
    s.discard_v5(b"pc.ram", 0, &[(0, mask)]).command(Command::Listen).command(Command::Run);
    s.ram_part(2, false);
    for p in discarded {
        s.page(Some(b"pc.ram"), p * TARGET_PAGE_SIZE, &pattern_page(p ^ 0xffff));
    }
    s.eos(2).command(Command::PostcopyEnd(0)).eof();
    s.bytes
}

/// q35 with 2.75 GiB of `pc.ram` (0.75 GiB of it mapped at 4 GiB): a few pages around 2 GiB
/// and above 4 GiB in precopy, a discard of some above 4 GiB, LISTEN/RUN, them again, END.
/// Most pages are never sent, so even the clean stream ends with `PagesMissing`.
fn q35_above_4gib() -> Vec<u8> {
    let ram = 0xb000_0000u64;
    let mut s = StreamBuilder::new();
    s.header().configuration(b"pc-q35-7.2").command(Command::OpenReturnPath).advise(4096, 4096);
    s.ram_start(2, &[(b"pc.ram", ram), (b"pc.bios", 0x4_0000)]).ram_part(2, false);
    let high = [0x8000_0000u64, 0x8000_1000, 0xafff_f000];
    for (i, &off) in [0x7fff_f000u64].iter().chain(&high).enumerate() {
        s.page(Some(b"pc.ram"), off, &pattern_page(i as u64));
    }
    s.eos(2).discard(b"pc.ram", &[(0x8000_0000, 0x2000)]);
    let mut blob = StreamBuilder::new();
    blob.command(Command::Listen).command(Command::Run);
    s.packaged(&blob.bytes).ram_part(2, false);
    s.page(Some(b"pc.ram"), 0x8000_1000, &pattern_page(7)).page(None, 0x8000_0000, &pattern_page(8));
    s.eos(2).ram_part(2, true).eos(2).eof();
    s.bytes
}

#[test]
fn the_layout_above_4_gib_maps_pages_at_4_gib() {
    let config = EngineConfig::default();
    let out = run_stream_with(&q35_above_4gib(), 4096, 1500, config);
    let e = out.result.unwrap_err();
    assert_eq!(e.field, Field::EndOfStream);
    assert!(matches!(e.defect, Defect::PagesMissing { block: 0, .. }), "{e}");
    // pc.ram offset 2 GiB is guest-physical 4 GiB on q35 with this much RAM.
    assert_eq!(out.ports.stage2.mapped.get(&(4 << 30)), Some(&(0, 0x8000_0000)));
    assert_eq!(out.ports.stage2.mapped.get(&((4 << 30) + 0x1000)), Some(&(0, 0x8000_1000)));
    assert_eq!(out.ports.stage2.mapped.get(&0x7fff_f000), Some(&(0, 0x7fff_f000)));
    let ram = out.ports.memory.block(b"pc.ram").unwrap();
    assert_eq!(ram.read(0x8000_0000, 4096), pattern_page(8), "re-sent after the discard");
}

/// The fuzz target's seed for layouts above 4 GiB is this file's stream (regenerate with
/// `UPDATE_SEEDS=1 cargo test -p agent --test hostile_everywhere`).
#[test]
fn the_fuzz_seed_above_4_gib_is_current() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/seeds/q35-above-4gib.bin");
    let stream = q35_above_4gib();
    if std::env::var_os("UPDATE_SEEDS").is_some() {
        std::fs::write(path, &stream).unwrap();
    }
    assert_eq!(std::fs::read(path).unwrap(), stream, "run with UPDATE_SEEDS=1");
}

//! Hostile and malformed streams (`docs/wire-format.md` §9-10): every defect is a typed error naming the
//! field and the stream offset, SHUT(1) goes back when the return path is open, pages that
//! had arrived stay intact, and nothing is written outside guest RAM (the fake memory
//! panics on any such write).

use agent::config::{MAX_PACKAGED_LEN, TARGET_PAGE_SIZE};
use agent::postcopy::State;
use agent::testing::{pattern_page, postcopy_stream, run_stream, Outcome, StreamBuilder};
use agent::wire::command::{Command, Dialect};
use agent::wire::section::FullHeader;
use agent::{Defect, Error, Field};

const RAM_PAGES: u64 = 16;

/// A stream with the return path open, ADVISE, every page of `pc.ram` (16) and `pc.bios` (2)
/// received in precopy.
fn setup() -> StreamBuilder {
    let mut s = StreamBuilder::new();
    s.header().configuration(b"pc-i440fx-7.2").command(Command::OpenReturnPath).advise(4096, 4096);
    s.ram_start(2, &[(b"pc.ram", RAM_PAGES * TARGET_PAGE_SIZE), (b"pc.bios", 2 * TARGET_PAGE_SIZE)]);
    s.ram_part(2, false);
    for p in 0..RAM_PAGES {
        s.page(if p == 0 { Some(b"pc.ram") } else { None }, p * TARGET_PAGE_SIZE, &pattern_page(p));
    }
    s.zero(Some(b"pc.bios"), 0, 0).zero(None, TARGET_PAGE_SIZE, 0).eos(2);
    s
}

fn fails(stream: &[u8]) -> (Error, Outcome) {
    let out = run_stream(stream, 4096, 1000);
    let err = out.result.expect_err("a defective stream must fail");
    (err, out)
}

/// The error, SHUT(1) last on the return path, and the received pages untouched.
fn check(stream: &[u8], field: Field, defect: Defect) -> Error {
    let (err, out) = fails(stream);
    assert_eq!((err.field, err.defect), (field, defect), "{err}");
    assert!(err.offset < stream.len() as u64);
    assert_eq!(out.rp.last().map(Vec::as_slice), Some(&[0, 1, 0, 4, 0, 0, 0, 1][..]), "SHUT(1) last");
    if let Some(ram) = out.ports.memory.block(b"pc.ram") {
        for p in 0..RAM_PAGES {
            assert_eq!(ram.read(p * TARGET_PAGE_SIZE, 4096), pattern_page(p), "received page {p} intact");
        }
    }
    err
}

#[test]
fn truncation_anywhere_is_a_typed_error() {
    let stream = postcopy_stream(4, 1..3);
    // Every cut inside the records before the first page payload, then a cut every 61 bytes
    // (which lands in every kind of record: headers, payloads, the blob, footers).
    let cuts = (0..700).chain((700..stream.len()).step_by(61));
    for cut in cuts {
        let out = run_stream(&stream[..cut], 300 + cut % 700, 1 + cut % 97);
        let err = out.result.expect_err("truncated");
        assert_eq!(err.defect, Defect::Truncated, "cut at {cut}: {err}");
        assert!(matches!(err.field, Field::EndOfStream | Field::Packaged), "cut at {cut}: {err}");
        assert!(err.offset <= cut as u64);
    }
}

#[test]
fn bad_magic_and_version() {
    let (e, _) = fails(b"QEVN\x00\x00\x00\x03");
    assert_eq!((e.field, e.offset), (Field::Magic, 0));
    let (e, _) = fails(b"QEVM\x00\x00\x00\x02");
    assert_eq!((e.field, e.defect), (Field::Version, Defect::BadValue { found: 2, expected: 3 }));
}

#[test]
fn unknown_record_types() {
    let mut s = setup();
    let at = s.bytes.len() as u64;
    s.raw(&[0x09]);
    let e = check(&s.bytes, Field::SectionType, Defect::Unknown { found: 9 });
    assert_eq!(e.offset, at, "the offset names the record");
    let mut s = setup();
    s.raw(&[0x05, 3, b'a', b'b', b'c']);
    check(&s.bytes, Field::SectionType, Defect::Unknown { found: 5 });
    let mut s = setup();
    s.raw(&[0x08, 0x00, 0x0b, 0x00, 0x00]);
    check(&s.bytes, Field::CommandId, Defect::Unknown { found: 11 });
}

#[test]
fn a_record_longer_than_any_ring_is_refused_not_awaited() {
    // RECV_BITMAP announcing 60,000 payload bytes: a destination waiting for them would stall
    // a receive ring smaller than that forever (found by the fuzzer).
    let mut s = setup();
    s.raw(&[0x08, 0, 10, 0xea, 0x60]).raw(&[3; 600]);
    check(&s.bytes, Field::CommandLength, Defect::BadValue { found: 60000, expected: 256 });
}

#[test]
fn wrong_fixed_lengths() {
    let mut s = setup();
    s.raw(&[0x08, 0, 2, 0, 5, 0, 0, 0, 1, 0]);
    check(&s.bytes, Field::CommandLength, Defect::BadValue { found: 5, expected: 4 });
    let mut s = setup();
    s.raw(&[0x08, 0, 5, 0, 1, 0]);
    check(&s.bytes, Field::CommandLength, Defect::BadValue { found: 1, expected: 0 });
}

#[test]
fn commands_in_the_wrong_state() {
    let wrong = |state| Defect::WrongState { state };
    let mut s = setup();
    s.command(Command::Run);
    check(&s.bytes, Field::CommandId, wrong(State::Advise));
    let mut s = setup();
    s.advise(4096, 4096);
    check(&s.bytes, Field::CommandId, wrong(State::Advise));
    let mut s = setup();
    s.command(Command::Listen).discard(b"pc.ram", &[(0, 4096)]);
    check(&s.bytes, Field::CommandId, wrong(State::Listening));
    let mut s = StreamBuilder::new();
    s.header().command(Command::OpenReturnPath).command(Command::Listen);
    check(&s.bytes, Field::CommandId, wrong(State::None));
    // EOF between LISTEN and RUN: the guest never ran.
    let mut s = setup();
    s.command(Command::Listen).eof();
    check(&s.bytes, Field::EndOfStream, wrong(State::Listening));
}

#[test]
fn setup_sections_after_listen() {
    // A second block list, or main-stream device state, once pages may be placed live.
    let mut s = setup();
    s.command(Command::Listen).ram_start(3, &[(b"pc.ram", 0x10000)]);
    check(&s.bytes, Field::SectionType, Defect::WrongState { state: State::Listening });
    let mut s = setup();
    s.command(Command::Listen).device(9, b"cpu", &[0; 8]);
    check(&s.bytes, Field::SectionType, Defect::WrongState { state: State::Listening });
}

#[test]
fn ping_without_return_path() {
    let mut s = StreamBuilder::new();
    s.header().command(Command::Ping(1));
    let (e, out) = fails(&s.bytes);
    assert_eq!((e.field, e.defect), (Field::CommandId, Defect::NoReturnPath));
    assert!(out.rp.is_empty(), "no return path: nothing sent");
}

#[test]
fn advise_with_other_page_sizes() {
    let mut s = StreamBuilder::new();
    s.header().command(Command::OpenReturnPath).advise(0x20_1000, 4096);
    check(&s.bytes, Field::AdviseHostPageSize, Defect::BadValue { found: 0x20_1000, expected: 4096 });
    let mut s = StreamBuilder::new();
    s.header().command(Command::OpenReturnPath).advise(4096, 8192);
    check(&s.bytes, Field::AdviseTargetPageSize, Defect::BadValue { found: 8192, expected: 4096 });
}

#[test]
fn discard_ranges_misaligned_or_outside_the_block() {
    let mut s = setup();
    s.discard(b"pc.ram", &[(0x800, 4096)]);
    check(&s.bytes, Field::DiscardStart, Defect::Misaligned { value: 0x800, align: 4096 });
    let mut s = setup();
    s.discard(b"pc.ram", &[(0, 100)]);
    check(&s.bytes, Field::DiscardLength, Defect::Misaligned { value: 100, align: 4096 });
    let mut s = setup();
    s.discard(b"pc.ram", &[(0x8000, 0x9000)]);
    check(&s.bytes, Field::DiscardLength, Defect::OutOfRange { start: 0x8000, len: 0x9000, limit: 0x10000 });
    let mut s = setup();
    s.discard(b"pc.ram", &[(u64::MAX - 0xfff, 0x2000)]);
    check(
        &s.bytes,
        Field::DiscardLength,
        Defect::OutOfRange { start: u64::MAX - 0xfff, len: 0x2000, limit: 0x10000 },
    );
    // A v5 mask bit before the block start.
    let mut s = StreamBuilder { dialect: agent::wire::command::Dialect::SeedV5, ..Default::default() };
    s.header().advise(4096, 4096).ram_start(2, &[(b"ram", 0x10000)]).discard_v5(b"ram", 4, &[(0, 0b1)]);
    let out = agent::testing::run_stream_with(
        &s.bytes,
        4096,
        4096,
        agent::postcopy::EngineConfig { dialect: agent::wire::command::Dialect::SeedV5, machine: None },
    );
    assert_eq!(out.result.unwrap_err().field, Field::DiscardStart);
}

#[test]
fn unknown_block_names() {
    let mut s = setup();
    s.discard(b"nosuch", &[(0, 4096)]);
    check(&s.bytes, Field::DiscardBlockName, Defect::UnknownBlock);
    let mut s = setup();
    s.ram_part(2, false).page(Some(b"nosuch"), 0, &pattern_page(0));
    check(&s.bytes, Field::RamBlockName, Defect::UnknownBlock);
}

#[test]
fn page_offsets_beyond_a_block() {
    let mut s = setup();
    s.ram_part(2, false).page(Some(b"pc.bios"), 2 * TARGET_PAGE_SIZE, &pattern_page(0));
    check(&s.bytes, Field::RamOffset, Defect::OutOfRange { start: 0x2000, len: 0x1000, limit: 0x2000 });
    let mut s = setup();
    s.ram_part(2, false).zero(Some(b"pc.ram"), 0xffff_ffff_ffff_f000, 0);
    check(
        &s.bytes,
        Field::RamOffset,
        Defect::OutOfRange { start: 0xffff_ffff_ffff_f000, len: 0x1000, limit: 0x10000 },
    );
}

#[test]
fn a_block_list_larger_than_the_page_bitmaps_is_refused_before_memory_is_asked() {
    // 4 PiB announced: the fake memory would abort the test if asked to provide it.
    let mut s = StreamBuilder::new();
    s.header().command(Command::OpenReturnPath).ram_start(2, &[(b"pc.ram", 1 << 52)]);
    let (e, out) = fails(&s.bytes);
    let cap = agent::testing::TEST_RAM_CAPACITY;
    assert_eq!((e.field, e.defect), (Field::RamBlockList, Defect::TooLong { len: 1 << 52, cap }));
    assert!(out.ports.memory.blocks.is_empty(), "no block declared");
}

#[test]
fn continue_with_no_previous_block() {
    let mut s = StreamBuilder::new();
    s.header().command(Command::OpenReturnPath).ram_start(2, &[(b"pc.ram", 0x10000)]);
    s.ram_part(2, false).zero(None, 0, 0);
    let (e, out) = fails(&s.bytes);
    assert_eq!((e.field, e.defect), (Field::RamBlockName, Defect::NoPreviousBlock));
    assert!(out.ports.memory.blocks.is_empty() || out.ports.memory.blocks[0].is_zero(), "nothing written");
}

#[test]
fn packaged_too_long_for_the_stream_or_over_the_cap() {
    let mut s = setup();
    s.command(Command::Packaged(1000)).command(Command::Listen);
    let (e, _) = fails(&s.bytes);
    assert_eq!((e.field, e.defect), (Field::EndOfStream, Defect::Truncated));
    let mut s = setup();
    s.command(Command::Packaged(MAX_PACKAGED_LEN + 1));
    let len = u64::from(MAX_PACKAGED_LEN) + 1;
    check(&s.bytes, Field::Packaged, Defect::TooLong { len, cap: MAX_PACKAGED_LEN.into() });
    // A blob whose records do not end with RUN, and one where RUN is not last.
    let mut blob = StreamBuilder::new();
    blob.command(Command::Listen).device(7, b"timer", &[0; 16]).command(Command::Ping(3));
    let mut s = setup();
    s.packaged(&blob.bytes).eof();
    check(&s.bytes, Field::Packaged, Defect::Unknown { found: 3 });
    let mut blob = StreamBuilder::new();
    blob.command(Command::Listen).command(Command::Run).command(Command::Ping(3));
    let mut s = setup();
    s.packaged(&blob.bytes).eof();
    check(&s.bytes, Field::Packaged, Defect::BadValue { found: 9, expected: 0 });
}

#[test]
fn unknown_flag_bits() {
    for flags in [0x200u64, 0x0a, 0x001, 0x400, 0x12] {
        let mut s = setup();
        s.ram_part(2, false).raw(&(0x1000 | flags).to_be_bytes());
        check(&s.bytes, Field::RamFlags, Defect::Unknown { found: flags });
    }
    for flags in [0x040u64, 0x100, 0x080] {
        let mut s = setup();
        s.ram_part(2, false).raw(&(0x1000 | flags).to_be_bytes());
        check(&s.bytes, Field::RamFlags, Defect::Unsupported);
    }
}

#[test]
fn footer_and_section_id_mismatches() {
    let mut s = setup();
    s.ram_part(2, false).raw(&0x10u64.to_be_bytes()).raw(&[0x7e, 0, 0, 0, 3]);
    check(&s.bytes, Field::SectionFooter, Defect::BadValue { found: 3, expected: 2 });
    let mut s = setup();
    s.ram_part(9, false);
    check(&s.bytes, Field::SectionId, Defect::Unknown { found: 9 });
}

#[test]
fn a_page_after_run_never_overwrites_a_present_page() {
    // The guest may have written a page since it arrived: a second copy is dropped.
    let mut s = setup();
    let mut blob = StreamBuilder::new();
    blob.command(Command::Listen).command(Command::Run);
    s.packaged(&blob.bytes).ram_part(2, false).page(Some(b"pc.ram"), 0, &[0xee; 4096]).eos(2);
    s.ram_part(2, true).eos(2).eof();
    let out = run_stream(&s.bytes, 1 << 16, 1 << 16);
    assert!(out.result.unwrap().finished);
    assert_eq!(out.stats.duplicate_pages, 1);
    assert_eq!(out.ports.memory.blocks[0].read(0, 4096), pattern_page(0));
}

/// `postcopy_stream` with the postcopy phase cut: RUN, then only the first `sent` of the
/// discarded pages, then the ram END and the final EOF, as a finishing source would send them.
fn postcopy_with_pages_withheld(sent: u64) -> (Vec<u8>, u64) {
    let (pages, discarded) = (8u64, 2..6u64);
    let full = postcopy_stream(pages, discarded.clone());
    let ping4 = [8, 0, 2, 0, 4, 0, 0, 0, 4];
    let at = full.windows(9).position(|w| w == ping4).unwrap() + 9;
    let mut s = StreamBuilder { bytes: full[..at].to_vec(), ..Default::default() };
    s.ram_part(2, false);
    for p in discarded.clone().take(sent as usize) {
        s.page(Some(b"pc.ram"), p * TARGET_PAGE_SIZE, &pattern_page(p));
    }
    s.eos(2).ram_part(2, true).eos(2).eof();
    (s.bytes, discarded.end - discarded.start)
}

#[test]
fn a_migration_with_pages_missing_at_the_end_is_not_complete() {
    // The source's final EOF with discarded pages never sent again: holes in guest RAM.
    for sent in 0..4 {
        let (stream, discarded) = postcopy_with_pages_withheld(sent);
        let (e, out) = fails(&stream);
        let first = (2 + sent) * TARGET_PAGE_SIZE;
        let missing = discarded - sent;
        assert_eq!(
            (e.field, e.defect),
            (Field::EndOfStream, Defect::PagesMissing { block: 0, missing, first })
        );
        assert_eq!(e.offset, stream.len() as u64 - 1, "named at the final EOF");
        assert_ne!(out.state, State::End, "never END with pages missing");
        assert_eq!(
            out.rp.last().map(Vec::as_slice),
            Some(&[0, 1, 0, 4, 0, 0, 0, 1][..]),
            "SHUT(1), not SHUT(0)"
        );
    }
    // EOF right after the PACKAGED command (RUN is its last record): nothing of postcopy came.
    let full = postcopy_stream(8, 2..6);
    let run = [8, 0, 5, 0, 0];
    let at = full.windows(5).rposition(|w| w == run).unwrap() + 5;
    let mut s = StreamBuilder { bytes: full[..at].to_vec(), ..Default::default() };
    s.eof();
    let (e, _) = fails(&s.bytes);
    assert_eq!(e.defect, Defect::PagesMissing { block: 0, missing: 4, first: 2 * TARGET_PAGE_SIZE });
    // A precopy completion that never sent some pages.
    let mut s = StreamBuilder::new();
    s.header().command(Command::OpenReturnPath).ram_start(2, &[(b"pc.ram", 4 * TARGET_PAGE_SIZE)]);
    s.ram_part(2, true).zero(Some(b"pc.ram"), 0, 0).zero(None, 2 * TARGET_PAGE_SIZE, 0).eos(2).eof();
    let (e, _) = fails(&s.bytes);
    assert_eq!(e.defect, Defect::PagesMissing { block: 0, missing: 2, first: TARGET_PAGE_SIZE });
}

#[test]
fn v5_postcopy_end_with_pages_missing_is_refused_and_no_page_overwrites_after_it() {
    let v5 = agent::postcopy::EngineConfig { dialect: Dialect::SeedV5, machine: None };
    let base = || {
        let mut s = StreamBuilder { dialect: Dialect::SeedV5, ..Default::default() };
        s.header().command(Command::OpenReturnPath).advise(4096, 4096);
        s.ram_start(2, &[(b"ram", 4 * TARGET_PAGE_SIZE)]).ram_part(2, false);
        for p in 0..4 {
            s.page(if p == 0 { Some(b"ram") } else { None }, p * TARGET_PAGE_SIZE, &pattern_page(p));
        }
        s.eos(2).discard_v5(b"ram", 0, &[(0, 0b10)]).command(Command::Listen).command(Command::Run);
        s
    };
    // Page 1 discarded and never sent again.
    let mut s = base();
    s.command(Command::PostcopyEnd(0)).eof();
    let out = agent::testing::run_stream_with(&s.bytes, 4096, 4096, v5);
    let e = out.result.unwrap_err();
    assert_eq!(e.defect, Defect::PagesMissing { block: 0, missing: 1, first: TARGET_PAGE_SIZE });
    // Page 1 sent, END, then page 0 again: the guest runs on, the second copy is dropped.
    let mut s = base();
    s.ram_part(2, false).page(Some(b"ram"), TARGET_PAGE_SIZE, &pattern_page(11)).eos(2);
    s.command(Command::PostcopyEnd(0)).ram_part(2, false).page(Some(b"ram"), 0, &[0xee; 4096]).eos(2).eof();
    let out = agent::testing::run_stream_with(&s.bytes, 4096, 4096, v5);
    assert!(out.result.unwrap().finished);
    assert_eq!(out.stats.duplicate_pages, 1);
    assert_eq!(out.ports.memory.blocks[0].read(0, 4096), pattern_page(0), "page 0 kept after END");
    assert_eq!(out.ports.memory.blocks[0].read(TARGET_PAGE_SIZE, 4096), pattern_page(11));
}

/// A stream whose block list is `blocks` on `machine`, with nothing after it.
fn block_list(machine: &[u8], blocks: &[(&[u8], u64)]) -> Vec<u8> {
    let mut s = StreamBuilder::new();
    s.header().configuration(machine).command(Command::OpenReturnPath).ram_start(2, blocks);
    s.bytes
}

#[test]
fn guest_physical_layouts_that_do_not_fit_are_refused_before_memory_is_asked() {
    const GIB: u64 = 1 << 30;
    let ram = 64 << 20;
    let window = agent::layout::BIOS_WINDOW;
    let too_long = |len| Defect::TooLong { len, cap: window };
    let cases: [(&[u8], u64, Defect); 5] = [
        // Longer than 4 GiB: `4 GiB - len` would underflow.
        (b"pc-i440fx-7.2", 5 * GIB, too_long(5 * GIB)),
        // Exactly 4 GiB: it would start at 0, over pc.ram.
        (b"pc-i440fx-7.2", 4 * GIB, too_long(4 * GIB)),
        // 4 GiB - 128 KiB: it would start at 128 KiB, over pc.ram.
        (b"pc-q35-7.2", 4 * GIB - 0x20000, too_long(4 * GIB - 0x20000)),
        // 3.5 GiB: over the PCI hole, the APICs and the upper part of pc.ram.
        (b"pc-i440fx-7.2", 3 * GIB + GIB / 2, too_long(3 * GIB + GIB / 2)),
        // One page more than the firmware window.
        (b"pc-q35-7.2", window + 0x1000, too_long(window + 0x1000)),
    ];
    for (machine, bios, defect) in cases {
        let stream = block_list(machine, &[(b"pc.ram", ram), (b"pc.bios", bios)]);
        let (e, out) = fails(&stream);
        assert_eq!((e.field, e.defect), (Field::GuestPhysicalMap, defect), "bios of {bios:#x}");
        assert!(out.ports.memory.blocks.is_empty(), "no memory asked for");
        assert!(out.ports.stage2.mapped.is_empty(), "nothing mapped");
    }
    // Above 4 GiB: 2.75 GiB of q35 RAM puts 0.75 GiB at 4 GiB; a bios that fits is accepted.
    let stream = block_list(b"pc-q35-7.2", &[(b"pc.ram", 0xb000_0000), (b"pc.bios", 0x4_0000)]);
    let out = run_stream(&stream, 4096, 4096);
    assert_eq!(out.result.unwrap_err().defect, Defect::Truncated, "the list itself is fine");
    assert_eq!(out.ports.memory.blocks.len(), 2);
}

#[test]
fn a_flat_machine_maps_every_block() {
    // More blocks than the old region table held (8): each must be mapped, none dropped.
    let names: Vec<Vec<u8>> = (0..12).map(|i| format!("blk{i}").into_bytes()).collect();
    let blocks: Vec<(&[u8], u64)> = names.iter().map(|n| (n.as_slice(), TARGET_PAGE_SIZE)).collect();
    let mut s = StreamBuilder::new();
    s.header().configuration(b"none").ram_start(2, &blocks).ram_part(2, true);
    for (i, name) in names.iter().enumerate() {
        s.page(Some(name), 0, &pattern_page(i as u64));
    }
    s.eos(2).eof();
    let out = run_stream(&s.bytes, 1 << 16, 1 << 16);
    assert!(out.result.unwrap().finished);
    for i in 0..12u64 {
        assert_eq!(out.ports.stage2.mapped.get(&(i * TARGET_PAGE_SIZE)), Some(&(i as usize, 0)), "block {i}");
    }
}

#[test]
fn device_state_over_the_cap_is_refused() {
    // A precopy completion with 17 MiB of device state in the main stream.
    let mut s = setup();
    s.device(9, b"cpu", &vec![0x55; 17 << 20]).eof();
    let (e, out) = fails(&s.bytes);
    let cap = agent::config::MAX_DEVICE_STATE_LEN;
    assert_eq!(e.field, Field::DeviceState);
    assert!(matches!(e.defect, Defect::TooLong { len, cap: c } if len > cap && c == cap), "{e}");
    assert!(out.ports.device_state.len() as u64 <= cap, "no more than the cap kept");
}

#[test]
fn a_ram_section_other_than_instance_0_is_refused() {
    let mut s = StreamBuilder::new();
    s.header().command(Command::OpenReturnPath);
    let h = FullHeader { start: true, section_id: 2, idstr: b"ram", instance_id: 1, version_id: 4 };
    s.section_header(h);
    check(&s.bytes, Field::SectionInstance, Defect::BadValue { found: 1, expected: 0 });
}

#[test]
fn a_stream_cut_between_discard_entries_still_flushes_the_unmaps() {
    let mut s = setup();
    s.discard(b"pc.ram", &[(0, 0x2000), (0x4000, 0x1000)]);
    // Cut inside the second entry: the first range is already unmapped.
    let cut = s.bytes.len() - 8;
    let out = run_stream(&s.bytes[..cut], 4096, 1000);
    assert_eq!(out.result.unwrap_err().defect, Defect::Truncated);
    assert_eq!(out.ports.stage2.unflushed, 0);
    assert_eq!(out.ports.stage2.flushes, 1, "the unmaps made were flushed");
    assert!(!out.ports.stage2.mapped.contains_key(&0) && out.ports.stage2.mapped.contains_key(&0x2000));
}

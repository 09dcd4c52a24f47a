//! Postcopy recovery in the engine: a connection that breaks after RUN pauses the migration
//! (pages kept, vCPUs waiting), a new connection answers RECV_BITMAP in QEMU's exact encoding,
//! takes POSTCOPY_RESUME, acknowledges it, sends the outstanding page requests again and goes
//! on; hostile resumes get typed errors.

use agent::config::TARGET_PAGE_SIZE;
use agent::postcopy::{Access, Engine, EngineConfig, Fault, Progress, Shared, State};
use agent::testing::{bitmap, feed_through_ring, pattern_page, FakePorts, StreamBuilder, VecReturnPath};
use agent::wire::command::Command;
use agent::wire::return_path::{RpMessage, RECV_BITMAP_END_MARK};
use agent::wire::Parsed;
use agent::{Defect, Field};

const PAGES: u64 = 100;
const DISCARDED: std::ops::Range<u64> = 10..80;

/// A postcopy stream in three parts: up to RUN; the postcopy pages `10..40` then half of page
/// 40 (where the connection breaks); and what the source sends after a resume: the rest of the
/// discarded pages, END, EOF.
fn stream() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let ram = PAGES * TARGET_PAGE_SIZE;
    let mut s = StreamBuilder::new();
    s.header().configuration(b"pc-i440fx-7.2");
    s.command(Command::OpenReturnPath).command(Command::Ping(1)).advise(4096, 4096);
    s.ram_start(2, &[(b"pc.ram", ram), (b"pc.bios", 0x4000)]);
    s.ram_part(2, false);
    for p in 0..PAGES {
        let name: Option<&[u8]> = if p == 0 { Some(b"pc.ram") } else { None };
        s.page(name, p * TARGET_PAGE_SIZE, &pattern_page(p));
    }
    for p in 0..4 {
        let name: Option<&[u8]> = if p == 0 { Some(b"pc.bios") } else { None };
        s.zero(name, p * TARGET_PAGE_SIZE, 0);
    }
    s.eos(2);
    let (a, b) = (DISCARDED.start * TARGET_PAGE_SIZE, DISCARDED.end * TARGET_PAGE_SIZE);
    s.discard(b"pc.ram", &[(a, b - a)]);
    let mut blob = StreamBuilder::new();
    blob.command(Command::Listen).command(Command::Run);
    s.packaged(&blob.bytes);
    let before = s.bytes.clone();
    let mut s = StreamBuilder::new();
    s.ram_part(2, false);
    for p in 10..41 {
        let name: Option<&[u8]> = if p == 10 { Some(b"pc.ram") } else { None };
        s.page(name, p * TARGET_PAGE_SIZE, &pattern_page(p ^ 0xffff));
    }
    // Cut inside page 40's payload.
    let cut = s.bytes.len() - 2000;
    let during = s.bytes[..cut].to_vec();
    let mut s = StreamBuilder::new();
    s.ram_part(2, false);
    for p in 40..DISCARDED.end {
        let name: Option<&[u8]> = if p == 40 { Some(b"pc.ram") } else { None };
        s.page(name, p * TARGET_PAGE_SIZE, &pattern_page(p ^ 0xffff));
    }
    s.eos(2).ram_part(2, true).eos(2).eof();
    (before, during, s.bytes)
}

/// The handshake QEMU's source sends on the new connection: RECV_BITMAP per block, RESUME.
fn handshake(blocks: &[&[u8]], resume: bool) -> Vec<u8> {
    let mut s = StreamBuilder::new();
    for b in blocks {
        s.command(Command::RecvBitmap(b));
    }
    if resume {
        s.command(Command::Resume);
    }
    s.bytes
}

/// The return path's bytes, joined.
fn rp_bytes(rp: &VecReturnPath) -> Vec<u8> {
    rp.sent.concat()
}

/// Parses `bytes` as QEMU's source reads the return path (framed messages; after a
/// RECV_BITMAP, the unframed size, bitmap and end mark).
fn parse_rp(mut bytes: &[u8]) -> Vec<(String, Option<Vec<u64>>)> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let (msg, n) = match RpMessage::parse(bytes) {
            Ok(Parsed::Done(msg, n)) => (msg, n),
            other => panic!("malformed return path {bytes:02x?}: {other:?}"),
        };
        let name = format!("{msg:?}");
        bytes = &bytes[n..];
        if let RpMessage::RecvBitmap { .. } = msg {
            let size = u64::from_be_bytes(bytes[..8].try_into().unwrap()) as usize;
            assert_eq!(size % 8, 0, "the size is a multiple of 8");
            let words =
                bytes[8..8 + size].chunks(8).map(|w| u64::from_le_bytes(w.try_into().unwrap())).collect();
            let end = u64::from_be_bytes(bytes[8 + size..16 + size].try_into().unwrap());
            assert_eq!(end, RECV_BITMAP_END_MARK);
            bytes = &bytes[16 + size..];
            out.push((name, Some(words)));
        } else {
            out.push((name, None));
        }
    }
    out
}

type TestEngine<'s, 'a> = Engine<'s, 'a, 'static, VecReturnPath, FakePorts>;

/// Runs `test` with a fresh engine over fresh bitmaps and a recording return path.
fn with_engine(test: impl FnOnce(&Shared<'_, VecReturnPath>, &mut TestEngine<'_, '_>)) {
    let (received, requested) = (bitmap(8 << 30), bitmap(8 << 30));
    let shared = Shared::new(&received, &requested, VecReturnPath::default());
    let mut engine = Engine::new(&shared, FakePorts::default(), EngineConfig::default());
    test(&shared, &mut engine);
}

/// Feeds `bytes` through a ring larger than them.
fn feed(engine: &mut TestEngine<'_, '_>, bytes: &[u8]) -> Result<Progress, agent::Error> {
    feed_through_ring(engine, bytes, 1 << 20, 1 << 20)
}

/// The stream up to the break, the break, and a new connection.
fn break_and_reconnect(
    shared: &Shared<'_, VecReturnPath>,
    engine: &mut TestEngine<'_, '_>,
    pieces: &[&[u8]],
) {
    for piece in pieces {
        feed(engine, piece).unwrap();
    }
    engine.connection_lost().unwrap();
    reconnect(shared, engine);
}

/// A new connection: a fresh return path.
fn reconnect(shared: &Shared<'_, VecReturnPath>, engine: &mut TestEngine<'_, '_>) {
    shared.reconnect(VecReturnPath::default());
    engine.reconnected();
}

#[test]
fn a_break_after_run_pauses_and_the_resume_answers_bitmaps_acks_and_asks_again() {
    let (before, during, after) = stream();
    let (received, requested) = (bitmap(8 << 30), bitmap(8 << 30));
    let shared = Shared::new(&received, &requested, VecReturnPath::default());
    let mut engine = Engine::new(&shared, FakePorts::default(), EngineConfig::default());
    feed_through_ring(&mut engine, &before, 1 << 20, 1 << 20).unwrap();
    assert!(!feed_through_ring(&mut engine, &during, 1 << 20, 1 << 20).unwrap().finished);
    let page = |p: u64| p * TARGET_PAGE_SIZE;
    // vCPU 0 waits for page 50 (requested before the break).
    assert_eq!(
        shared.on_guest_fault(page(50), Access::Read, 0),
        Ok(Fault::Wait { block: 0, offset: page(50) })
    );

    let brk = engine.connection_lost().expect("a break after RUN pauses");
    assert_eq!(shared.state.get(), State::Paused);
    assert_eq!(brk.open_ram_section, Some(2));
    // Pages 10..40 arrived; page 40 was cut in its payload: 40..80 are missing.
    assert_eq!(brk.missing_pages, 40);
    assert_eq!(
        brk.offset as usize,
        before.len() + during.len() - (4096 - 2000) - 8,
        "just before page 40's record"
    );
    // While paused, a fault parks and sends nothing.
    assert_eq!(
        shared.on_guest_fault(page(60), Access::Write, 1),
        Ok(Fault::Wait { block: 0, offset: page(60) })
    );
    assert_eq!(shared.on_guest_fault(page(20), Access::Read, 2), Ok(Fault::Resume), "received pages stay");
    let sent_before = shared.with_rp(|rp| rp.port().sent.len());

    shared.reconnect(VecReturnPath::default());
    engine.reconnected();
    feed_through_ring(&mut engine, &handshake(&[b"pc.ram", b"pc.bios"], true), 1 << 20, 1 << 20).unwrap();
    assert_eq!(sent_before, 2, "PONG(1) and the request for page 50 on the old connection");
    let rp = shared.with_rp(|rp| parse_rp(&rp_bytes(rp.port())));
    assert_eq!(rp[0].0, "RecvBitmap { block: [112, 99, 46, 114, 97, 109] }");
    let words = rp[0].1.clone().unwrap();
    assert_eq!(words.len(), 2, "100 pages: 13 bytes rounded up to 16");
    let expected = |p: u64| !(DISCARDED.contains(&p) && p >= 40);
    for p in 0..128u64 {
        let bit = words[(p / 64) as usize] >> (p % 64) & 1 == 1;
        assert_eq!(bit, p < PAGES && expected(p), "page {p}");
    }
    assert_eq!(rp[1].0, "RecvBitmap { block: [112, 99, 46, 98, 105, 111, 115] }");
    assert_eq!(rp[1].1, Some(vec![0xf]), "4 pages of pc.bios");
    assert_eq!(rp[2].0, "ResumeAck(1)");
    assert_eq!(
        rp[3..].iter().map(|(m, _)| m.clone()).collect::<Vec<_>>(),
        [
            format!("ReqPagesId {{ start: {}, len: 4096, block: [112, 99, 46, 114, 97, 109] }}", page(50)),
            format!("ReqPages {{ start: {}, len: 4096 }}", page(60)),
        ],
        "the outstanding requests again, the first naming its block"
    );
    assert_eq!(shared.state.get(), State::Running);

    assert!(feed_through_ring(&mut engine, &after, 1 << 20, 1 << 20).unwrap().finished);
    assert_eq!(shared.state.get(), State::End);
    let mut released = engine.ports().released.clone();
    released.sort();
    assert_eq!(released, [0, 1], "both waiting vCPUs released once");
    let ram = engine.ports().memory.blocks[0].bytes();
    for p in 0..PAGES {
        let want = if DISCARDED.contains(&p) { pattern_page(p ^ 0xffff) } else { pattern_page(p) };
        assert_eq!(&ram[page(p) as usize..page(p + 1) as usize], &want[..], "page {p}");
    }
}

#[test]
fn two_breaks_in_a_row_and_a_break_during_the_handshake_recover() {
    let (before, during, _) = stream();
    with_engine(|shared, engine| {
        // Second connection: one bitmap answered, then it breaks too.
        break_and_reconnect(shared, engine, &[&before, &during]);
        feed(engine, &handshake(&[b"pc.ram"], false)).unwrap();
        let brk = engine.connection_lost().expect("a break during the handshake pauses again");
        assert_eq!((shared.state.get(), brk.missing_pages), (State::Paused, 40));
        // Third connection: a RESUME with only the bitmap of the old connection is refused.
        reconnect(shared, engine);
        let e = feed(engine, &handshake(&[b"pc.bios"], true)).unwrap_err();
        assert_eq!((e.field, e.defect), (Field::CommandId, Defect::BitmapsMissing { blocks: 1 }));
    });
}

#[test]
fn the_whole_handshake_on_a_third_connection_completes_the_migration() {
    let (before, during, after) = stream();
    with_engine(|shared, engine| {
        feed(engine, &before).unwrap();
        feed(engine, &during).unwrap();
        for _ in 0..2 {
            engine.connection_lost().unwrap();
            reconnect(shared, engine);
            feed(engine, &handshake(&[b"pc.ram", b"pc.bios"], true)).unwrap();
            assert_eq!(shared.state.get(), State::Running);
        }
        assert!(feed(engine, &after).unwrap().finished);
        assert_eq!(shared.state.get(), State::End);
    });
}

#[test]
fn hostile_resumes_get_typed_errors() {
    let (before, during, _) = stream();
    // RECV_BITMAP for a block the destination does not have.
    with_engine(|shared, engine| {
        break_and_reconnect(shared, engine, &[&before, &during]);
        let e = feed(engine, &handshake(&[b"vga.vram"], true)).unwrap_err();
        assert_eq!((e.field, e.defect), (Field::RecvBitmapBlock, Defect::UnknownBlock));
        assert_eq!(shared.with_rp(|rp| parse_rp(&rp_bytes(rp.port())))[0].0, "Shut(1)");
    });
    // RESUME without any bitmap.
    with_engine(|shared, engine| {
        break_and_reconnect(shared, engine, &[&before]);
        let e = feed(engine, &handshake(&[], true)).unwrap_err();
        assert_eq!((e.field, e.defect), (Field::CommandId, Defect::BitmapsMissing { blocks: 2 }));
    });
    // RECV_BITMAP on a connection that never broke.
    with_engine(|_, engine| {
        feed(engine, &before).unwrap();
        let e = feed(engine, &handshake(&[b"pc.ram"], false)).unwrap_err();
        assert_eq!((e.field, e.defect), (Field::CommandId, Defect::WrongState { state: State::Running }));
    });
}

#[test]
fn a_break_before_run_is_the_end_of_the_migration() {
    let (before, _, _) = stream();
    let cut = before.len() - 20;
    let (received, requested) = (bitmap(8 << 30), bitmap(8 << 30));
    let shared = Shared::new(&received, &requested, VecReturnPath::default());
    let mut engine = Engine::new(&shared, FakePorts::default(), EngineConfig::default());
    feed_through_ring(&mut engine, &before[..cut], 1 << 20, 1 << 20).unwrap();
    let e = engine.connection_lost().unwrap_err();
    assert_eq!(e.field, Field::EndOfStream);
    assert_ne!(shared.state.get(), State::Paused);
}

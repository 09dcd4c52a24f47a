//! The engine on QEMU 7.2-shaped postcopy streams: state, return path, memory, stage 2,
//! and the fault → request → wait → release protocol.

use agent::config::TARGET_PAGE_SIZE;
use std::sync::atomic::Ordering;

use agent::postcopy::{Access, Engine, EngineConfig, Fault, FaultError, Shared, State};
use agent::testing::{
    bitmap, feed_through_ring, pattern_page, postcopy_stream, run_stream, run_stream_with, FakePorts,
    StreamBuilder, VecReturnPath,
};
use agent::wire::command::{Command, Dialect};
use agent::wire::return_path::RpMessage;
use agent::wire::Parsed;
use agent::{Defect, Field};

const PAGES: u64 = 64;

fn rp_messages(rp: &[Vec<u8>]) -> Vec<String> {
    rp.iter()
        .map(|m| match RpMessage::parse(m) {
            Ok(Parsed::Done(msg, n)) if n == m.len() => format!("{msg:?}"),
            other => panic!("malformed return-path message {m:02x?}: {other:?}"),
        })
        .collect()
}

fn expected_ram(discarded: std::ops::Range<u64>) -> Vec<u8> {
    let mut ram = vec![0u8; (PAGES * TARGET_PAGE_SIZE) as usize];
    for p in 0..PAGES {
        let page = match (discarded.contains(&p), p % 3) {
            (true, _) => pattern_page(p ^ 0xffff),
            (false, 0) => continue,
            (false, _) => pattern_page(p),
        };
        let at = (p * TARGET_PAGE_SIZE) as usize;
        ram[at..at + page.len()].copy_from_slice(&page);
    }
    ram
}

#[test]
fn postcopy_stream_completes_with_the_right_ram_and_return_path() {
    let stream = postcopy_stream(PAGES, 10..20);
    let out = run_stream(&stream, 1 << 20, 1 << 20);
    assert!(out.result.unwrap().finished);
    assert_eq!(out.state, State::End);
    assert_eq!(
        rp_messages(&out.rp),
        ["Pong(1)", "Pong(2)", "Pong(3)", "Pong(4)", "Shut(0)"],
        "PONG for every PING, SHUT(0) last"
    );
    assert_eq!(out.ports.memory.blocks[0].bytes(), expected_ram(10..20));
    assert_eq!(out.stats.discarded_pages, 10);
    assert_eq!(out.stats.pages + out.stats.zero_pages, PAGES + 4 + 10);
    assert_eq!(out.ports.stage2.flushes, 1, "one flush for one RAM_DISCARD command");
    assert_eq!(out.ports.stage2.unflushed, 0);
    // Every pc.ram page is mapped at its guest-physical address, pc.bios below 4 GiB.
    for p in 0..PAGES {
        assert_eq!(out.ports.stage2.mapped.get(&(p * TARGET_PAGE_SIZE)), Some(&(0, p * TARGET_PAGE_SIZE)));
    }
    assert_eq!(out.ports.stage2.mapped.get(&((4 << 30) - 0x4000)), Some(&(1, 0)));
    // Device state is the blob between LISTEN and PING(3), byte for byte.
    let mut devices = StreamBuilder::new();
    devices.device(3, b"timer", &[1, 2, 3, 4, 5, 6, 7, 8]).device(4, b"globalstate", b"running\0");
    assert_eq!(out.ports.device_state, devices.bytes);
}

#[test]
fn every_split_point_gives_the_same_result() {
    let stream = postcopy_stream(8, 2..5);
    let whole = run_stream(&stream, 1 << 20, 1 << 20);
    // Ring capacities from the bounce limit up to a few pages, arrivals of odd sizes: every
    // record is split at every offset somewhere in these runs.
    for capacity in [520, 777, 4096, 4103, 9000] {
        for chunk in [1, 3, 64, 511, 4097] {
            let split = run_stream(&stream, capacity, chunk);
            assert_eq!(split.result, whole.result, "capacity {capacity} chunk {chunk}");
            assert_eq!(split.ports.memory.blocks, whole.ports.memory.blocks);
            assert_eq!(split.ports.device_state, whole.ports.device_state);
            assert_eq!(split.rp, whole.rp);
            assert_eq!(split.stats, whole.stats);
        }
    }
}

/// The stream of `postcopy_stream` up to and including PING(4), and the rest.
fn split_at_run(stream: &[u8]) -> (&[u8], &[u8]) {
    let ping4 = [8, 0, 2, 0, 4, 0, 0, 0, 4];
    let at = stream.windows(9).position(|w| w == ping4).unwrap() + 9;
    stream.split_at(at)
}

#[test]
fn faults_request_once_wait_and_are_released_when_the_page_is_mapped() {
    let stream = postcopy_stream(PAGES, 10..20);
    let (before, after) = split_at_run(&stream);
    let (received, requested) = (bitmap(8 << 30), bitmap(8 << 30));
    let shared = Shared::new(&received, &requested, VecReturnPath::default());
    let mut engine = Engine::new(&shared, FakePorts::default(), EngineConfig::default());
    assert!(!feed_through_ring(&mut engine, before, 1 << 20, 1 << 20).unwrap().finished);
    assert_eq!(shared.state.get(), State::Running);

    let page = |p: u64| p * TARGET_PAGE_SIZE;
    let fault = |gpa, vcpu| shared.on_guest_fault(gpa, Access::Read, vcpu);
    assert_eq!(fault(page(3) + 8, 0), Ok(Fault::Resume), "received in precopy");
    // vCPUs 0 and 1 wait on page 12, vCPU 2 on page 15; vCPU 3 writes page 12 too.
    assert_eq!(fault(page(12) + 100, 0), Ok(Fault::Wait { block: 0, offset: page(12) }));
    assert_eq!(fault(page(12), 1), Ok(Fault::Wait { block: 0, offset: page(12) }));
    assert_eq!(fault(page(15), 2), Ok(Fault::Wait { block: 0, offset: page(15) }));
    assert_eq!(
        shared.on_guest_fault(page(12), Access::Write, 3),
        Ok(Fault::Wait { block: 0, offset: page(12) })
    );
    assert_eq!(fault(0xb8000, 4), Err(FaultError::OutsideGuestRam { gpa: 0xb8000 }));
    assert_eq!(fault(page(PAGES), 4), Err(FaultError::OutsideGuestRam { gpa: page(PAGES) }));
    assert_eq!(fault(page(1), 64), Err(FaultError::NoSuchVcpu { vcpu: 64 }));
    let sent = shared.with_rp(|rp| rp_messages(&rp.port().sent));
    assert_eq!(
        &sent[4..],
        [
            format!("ReqPagesId {{ start: {}, len: 4096, block: [112, 99, 46, 114, 97, 109] }}", page(12)),
            format!("ReqPages {{ start: {}, len: 4096 }}", page(15)),
        ],
        "one request per missing page, REQ_PAGES_ID first, REQ_PAGES for the same block"
    );
    assert_eq!(shared.counters.requests.load(Ordering::Relaxed), 2);
    assert_eq!(shared.counters.write_faults.load(Ordering::Relaxed), 1);

    assert!(feed_through_ring(&mut engine, after, 1 << 20, 1 << 20).unwrap().finished);
    let mut released = engine.ports().released.clone();
    released.sort();
    assert_eq!(released, [0, 1, 2, 3], "every parked vCPU released exactly once");
    assert_eq!(fault(page(12), 0), Ok(Fault::Resume));
    // After SHUT nothing more may be requested: the stream sent every page it had.
    assert_eq!(shared.state.get(), State::End);
    let sent_before = shared.with_rp(|rp| rp.port().sent.len());
    assert_eq!(fault(page(20), 0), Ok(Fault::Resume), "page 20 arrived in postcopy");
    shared.mark_discarded(shared.layout().unwrap(), 0, page(21), TARGET_PAGE_SIZE);
    assert_eq!(fault(page(21), 0), Err(FaultError::NotPostcopy { state: State::End }));
    assert_eq!(shared.with_rp(|rp| rp.port().sent.len()), sent_before, "no request after SHUT");
}

#[test]
fn a_page_that_arrives_before_the_park_resumes_without_a_release() {
    let stream = postcopy_stream(PAGES, 10..20);
    let (before, after) = split_at_run(&stream);
    let (received, requested) = (bitmap(8 << 30), bitmap(8 << 30));
    let shared = Shared::new(&received, &requested, VecReturnPath::default());
    let mut engine = Engine::new(&shared, FakePorts::default(), EngineConfig::default());
    feed_through_ring(&mut engine, before, 1 << 20, 1 << 20).unwrap();
    feed_through_ring(&mut engine, after, 1 << 20, 1 << 20).unwrap();
    assert_eq!(shared.on_guest_fault(12 * TARGET_PAGE_SIZE, Access::Execute, 0), Ok(Fault::Resume));
    assert!(engine.ports().released.is_empty());
}

#[test]
fn precopy_completion_after_advise_stays_in_advise_and_shuts_after_vmdescription() {
    let mut s = StreamBuilder::new();
    s.header().configuration(b"pc-q35-7.2").command(Command::OpenReturnPath).command(Command::Ping(1));
    s.advise(4096, 4096).ram_start(5, &[(b"pc.ram", 4 * TARGET_PAGE_SIZE)]);
    s.ram_part(5, true).page(Some(b"pc.ram"), 0, &pattern_page(1)).zero(None, 4096, 0);
    s.zero(None, 8192, 0).zero(None, 12288, 7).eos(5);
    s.device(9, b"cpu", &[0x55; 40])
        .device(10, b"apic", &[0xaa; 20])
        .eof()
        .vmdescription(b"{\"page_size\":4096}");
    let out = run_stream(&s.bytes, 1 << 16, 1 << 16);
    assert!(out.result.unwrap().finished);
    assert_eq!(out.state, State::Advise);
    assert_eq!(rp_messages(&out.rp), ["Pong(1)", "Shut(0)"]);
    assert_eq!(&out.ports.memory.blocks[0].bytes()[..4096], &pattern_page(1)[..]);
    assert!(
        out.ports.memory.blocks[0].bytes()[12288..].iter().all(|&b| b == 7),
        "ZERO's fill byte is honoured"
    );
    let mut devices = StreamBuilder::new();
    devices.device(9, b"cpu", &[0x55; 40]).device(10, b"apic", &[0xaa; 20]);
    assert_eq!(out.ports.device_state, devices.bytes);
}

#[test]
fn continue_lasts_across_sections() {
    let mut s = StreamBuilder::new();
    s.header().ram_start(2, &[(b"a", 2 * TARGET_PAGE_SIZE), (b"b", 2 * TARGET_PAGE_SIZE)]);
    s.ram_part(2, false).zero(Some(b"a"), 0, 0).zero(None, 4096, 0);
    s.page(Some(b"b"), 0, &pattern_page(9)).eos(2);
    s.ram_part(2, true).page(None, 4096, &pattern_page(10)).eos(2).eof();
    let out = run_stream(&s.bytes, 1 << 16, 1 << 16);
    out.result.unwrap();
    assert_eq!(
        &out.ports.memory.blocks[1].bytes()[4096..],
        &pattern_page(10)[..],
        "CONTINUE went to block b"
    );
    assert!(out.ports.memory.blocks[0].bytes().iter().all(|&b| b == 0));
}

#[test]
fn seed_v5_dialect_with_semi_sparse_discard() {
    let mut s = StreamBuilder { dialect: Dialect::SeedV5, ..Default::default() };
    s.header().command(Command::OpenReturnPath).advise(4096, 4096);
    s.ram_start(2, &[(b"pc.ram", 64 * TARGET_PAGE_SIZE)]).ram_part(2, false);
    for p in 0..64 {
        s.page(if p == 0 { Some(b"pc.ram") } else { None }, p * TARGET_PAGE_SIZE, &pattern_page(p));
    }
    s.eos(2);
    // first_bit_offset 0; pages 3, 4, 5 and 40 discarded.
    s.discard_v5(b"pc.ram", 0, &[(0, 0b111000), (32, 1 << 8)]);
    s.command(Command::Listen).command(Command::Run);
    let v5 = EngineConfig { dialect: Dialect::SeedV5, machine: None };
    // Up to RUN: the discarded pages are unmapped.
    let mut at_run = s.clone();
    at_run.command(Command::PostcopyEnd(0)).eof();
    let out = run_stream_with(&at_run.bytes, 1 << 20, 1 << 20, v5);
    assert_eq!(out.stats.discarded_pages, 4);
    let mapped = |p: u64| out.ports.stage2.mapped.contains_key(&(p * TARGET_PAGE_SIZE));
    assert!(mapped(2) && !mapped(3) && !mapped(5) && mapped(6) && !mapped(40) && mapped(41));
    // ... and POSTCOPY_END without them is refused: 4 pages never came back.
    let e = out.result.unwrap_err();
    assert_eq!(
        (e.field, e.defect),
        (Field::EndOfStream, Defect::PagesMissing { block: 0, missing: 4, first: 0x3000 })
    );
    // With the pages sent again in postcopy, END completes.
    s.ram_part(2, false);
    for p in [3, 4, 5, 40] {
        s.page(Some(b"pc.ram"), p * TARGET_PAGE_SIZE, &pattern_page(p ^ 0xffff));
    }
    s.eos(2).command(Command::PostcopyEnd(0)).eof();
    let out = run_stream_with(&s.bytes, 1 << 20, 1 << 20, v5);
    assert!(out.result.unwrap().finished);
    assert_eq!(out.state, State::End);
    for p in 0..64u64 {
        let want = if [3, 4, 5, 40].contains(&p) { pattern_page(p ^ 0xffff) } else { pattern_page(p) };
        let at = (p * TARGET_PAGE_SIZE) as usize;
        assert_eq!(&out.ports.memory.blocks[0].bytes()[at..at + 4096], &want[..], "page {p}");
    }
    // v5 numbers: ADVISE is 20; a 7.2 destination refuses it as an unknown command.
    let as_72 = run_stream(&s.bytes, 1 << 20, 1 << 20).result.unwrap_err();
    assert_eq!((as_72.field, as_72.defect), (Field::CommandId, Defect::Unknown { found: 20 }));
}

/// A return path whose `fail_at`-th message (counting from 0) cannot be sent.
#[derive(Default)]
struct FailingReturnPath {
    sent: Vec<Vec<u8>>,
    attempts: usize,
    fail_at: usize,
}

impl agent::ports::ReturnPath for FailingReturnPath {
    fn send(&mut self, message: &[u8]) -> Result<(), agent::ports::SendFailed> {
        self.attempts += 1;
        if self.attempts - 1 == self.fail_at {
            return Err(agent::ports::SendFailed);
        }
        self.sent.push(message.to_vec());
        Ok(())
    }
}

#[test]
fn a_request_that_cannot_be_sent_leaves_the_vcpu_waiting_for_the_stream() {
    let stream = postcopy_stream(PAGES, 10..20);
    let (before, after) = split_at_run(&stream);
    let (received, requested) = (bitmap(8 << 30), bitmap(8 << 30));
    // PONG 1-4 go out; the first page request fails.
    let shared = Shared::new(&received, &requested, FailingReturnPath { fail_at: 4, ..Default::default() });
    let mut engine = Engine::new(&shared, FakePorts::default(), EngineConfig::default());
    feed_through_ring(&mut engine, before, 1 << 20, 1 << 20).unwrap();
    let page = |p: u64| p * TARGET_PAGE_SIZE;
    let fault = |p, vcpu| shared.on_guest_fault(page(p), Access::Read, vcpu);
    assert_eq!(fault(12, 0), Ok(Fault::Wait { block: 0, offset: page(12) }), "waits, no error");
    assert_eq!(fault(13, 1), Ok(Fault::Wait { block: 0, offset: page(13) }), "not tried again");
    assert_eq!(shared.counters.unsent_requests.load(Ordering::Relaxed), 1);
    assert_eq!(shared.counters.requests.load(Ordering::Relaxed), 0);
    // The pages come in the stream anyway: both vCPUs are released, SHUT(0) goes out.
    assert!(feed_through_ring(&mut engine, after, 1 << 20, 1 << 20).unwrap().finished);
    let mut released = engine.ports().released.clone();
    released.sort();
    assert_eq!(released, [0, 1]);
    let sent = shared.with_rp(|rp| rp_messages(&rp.port().sent));
    assert_eq!(sent, ["Pong(1)", "Pong(2)", "Pong(3)", "Pong(4)", "Shut(0)"]);
}

#[test]
fn a_fault_at_the_end_resumes_and_sends_nothing() {
    // Every page arrived and SHUT went out: a vCPU whose walk still missed (its TLB, or a
    // race with the last page) re-walks; it never requests a page after SHUT.
    let stream = postcopy_stream(PAGES, 10..20);
    let (received, requested) = (bitmap(8 << 30), bitmap(8 << 30));
    let shared = Shared::new(&received, &requested, VecReturnPath::default());
    let mut engine = Engine::new(&shared, FakePorts::default(), EngineConfig::default());
    assert!(feed_through_ring(&mut engine, &stream, 1 << 20, 1 << 20).unwrap().finished);
    let sent = shared.with_rp(|rp| rp.port().sent.len());
    for p in 0..PAGES {
        assert_eq!(shared.on_guest_fault(p * TARGET_PAGE_SIZE, Access::Write, 3), Ok(Fault::Resume));
    }
    assert_eq!(shared.with_rp(|rp| rp.port().sent.len()), sent, "nothing after SHUT");
}

//! Interop with real QEMU 7.2 (TCG) as the migration source.
//!
//! The verdict of every migration: each RAMBlock `postcopy-dest` dumps equals, byte for byte,
//! what QEMU 7.2's own destination holds after loading the same (relayed) stream, with the
//! destination guest's writes applied (see `qemu_tests::oracle`). The source's final RAM is
//! compared too, for information only: under TCG the source can lose the dirty bit of a page
//! rewritten after its last send, so the stream itself may carry older contents.
//!
//! The `postcopy-dest` tests follow the binary's contract: `--listen unix:PATH`,
//! `--input FILE`, `--dump-dir DIR`, `--touch`, `--record FILE`, and a JSON summary on
//! the last stdout line, exit 0 only after a completed migration.
//!
//! Tests that start QEMU run one at a time (the machine has 2 cores and the postcopy
//! timing depends on the guest getting CPU time). A missing QEMU fails the tests.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use qemu_tests::dest::{Dest, DestOptions};
use qemu_tests::guest::build_dirty_guest;
use qemu_tests::oracle::qemu_load;
use qemu_tests::ram::{diff_pages, sha256_hex, zero_holes};
use qemu_tests::relay::{Endpoint, Relay};
use qemu_tests::scenario::{dump_file_name, run, Outcome, Scenario};
use qemu_tests::source::{Machine, SourceVm};

const DEST: &str = env!("CARGO_BIN_EXE_postcopy-dest");

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn captures() -> PathBuf {
    qemu_tests::workspace_root().join("agent/tests/captures")
}

fn run_ok(sc: &Scenario) -> Outcome {
    match run(Path::new(DEST), sc) {
        Ok(out) => out,
        Err(e) => panic!("{} migration failed: {e}", sc.machine.as_str()),
    }
}

fn assert_ram_equal(out: &Outcome, machine: Machine) {
    if let Some(diff) = &out.ram_diff {
        panic!("a RAMBlock of postcopy-dest differs from what QEMU's destination loads from the same stream: {diff}");
    }
    // pc.ram, pc.bios, pc.rom and the fw_cfg blobs at least.
    assert!(out.blocks_compared >= 4, "{} blocks compared on {}", out.blocks_compared, machine.as_str());
    if let (Some(diff), 0) = (&out.source_diff, out.guest_written_pages) {
        // Not a destination error: the TCG source can lose dirty bits (see oracle.rs).
        eprintln!("note: the dump differs from the source's final RAM: {diff}");
    }
    assert!(out.ram_bytes > 0);
    assert_eq!(out.summary.bytes, out.stream_bytes, "summary bytes vs relayed stream");
}

fn assert_postcopy(out: &Outcome, machine: Machine) {
    assert_ram_equal(out, machine);
    assert_eq!(out.source.status, "completed");
    assert!(
        out.saw_postcopy_active,
        "the source never entered postcopy-active: the test did not exercise postcopy"
    );
    let s = &out.summary;
    assert_eq!(s.state, "END", "summary: {s:?}");
    assert!(s.discarded_pages > 0, "no discarded pages: {s:?}");
    assert!(s.page_requests > 0, "no page requests: {s:?}");
    assert!(s.pages_received > 0, "no pages: {s:?}");
    assert!(s.bytes > 0, "no bytes: {s:?}");
    assert!(out.guest.pages_dirtied > 0, "the guest dirtied nothing: {:?}", out.guest);
}

/// 4 simulated vCPUs walking an EPT table (the scenario's default).
#[test]
fn postcopy_pc_ept_every_block_equals_qemus_load() {
    let _g = serial();
    let sc = Scenario::postcopy(Machine::Pc);
    assert_eq!((sc.vcpus, sc.stage2.as_deref()), (Some(4), Some("ept")));
    let out = run_ok(&sc);
    assert_postcopy(&out, Machine::Pc);
}

/// 4 simulated vCPUs walking an NPT table and writing guest memory after RUN: the words they
/// wrote survive every later page of the stream.
#[test]
fn postcopy_pc_npt_guest_writes_survive_and_every_block_equals_qemus_load() {
    let _g = serial();
    let mut sc = Scenario::postcopy(Machine::Pc);
    sc.stage2 = Some("npt".into());
    sc.guest_writes = true;
    let out = run_ok(&sc);
    assert_postcopy(&out, Machine::Pc);
    assert!(out.guest_written_pages > 0, "the destination guest wrote nothing");
}

#[test]
fn postcopy_q35_touch_seq_guest_writes_every_block_equals_qemus_load() {
    let _g = serial();
    let mut sc = Scenario::postcopy(Machine::Q35);
    sc.stage2 = Some("npt".into());
    sc.touch = Some("seq".into());
    sc.guest_writes = true;
    let out = run_ok(&sc);
    assert_postcopy(&out, Machine::Q35);
    assert!(out.guest_written_pages > 0, "the destination guest wrote nothing");
}

/// 256 MiB of non-zero RAM: most of it arrives in postcopy.
#[test]
fn postcopy_pc_256m_filled_every_block_equals_qemus_load() {
    let _g = serial();
    let out = run_ok(&Scenario::postcopy_filled(Machine::Pc, 256));
    assert_postcopy(&out, Machine::Pc);
    assert!(out.source.normal_pages > 60_000, "{:?}", out.source);
}

#[test]
fn postcopy_pc_over_tcp_every_block_equals_qemus_load() {
    let _g = serial();
    let mut sc = Scenario::postcopy(Machine::Pc);
    sc.tcp = true;
    let out = run_ok(&sc);
    assert_postcopy(&out, Machine::Pc);
}

#[test]
fn precopy_pc_every_block_equals_qemus_load() {
    let _g = serial();
    let out = run_ok(&Scenario::precopy(Machine::Pc));
    assert_ram_equal(&out, Machine::Pc);
    assert_eq!(out.source.status, "completed");
    assert!(!out.saw_postcopy_active);
    assert!(out.summary.pages_received > 0, "{:?}", out.summary);
    assert_eq!(out.summary.discarded_pages, 0, "{:?}", out.summary);
    assert_eq!(out.summary.page_requests, 0, "{:?}", out.summary);
}

/// Replays `file` with `--input` and returns the dumped main block (whole) and the summary's
/// byte count.
fn replay(file: &Path, machine: Machine) -> (Vec<u8>, u64) {
    let dump = tempfile::tempdir().expect("tempdir");
    let opts = DestOptions {
        input: Some(file.to_path_buf()),
        dump_dir: Some(dump.path().to_path_buf()),
        ..DestOptions::default()
    };
    let dest = Dest::spawn(Path::new(DEST), &opts).expect("start postcopy-dest");
    let outcome = dest.wait(Duration::from_secs(60)).expect("wait postcopy-dest");
    let summary = match outcome.expect_success() {
        Ok(s) => s.clone(),
        Err(e) => panic!("replay of {}: {e}", file.display()),
    };
    let path = dump.path().join(dump_file_name(machine.ram_block()));
    let ram = std::fs::read(&path).unwrap_or_else(|e| panic!("no dump {} after replay: {e}", path.display()));
    (ram, summary.bytes)
}

fn replay_capture(name: &str, machine: Machine) {
    let file = captures().join(format!("{name}.bin"));
    let want =
        std::fs::read_to_string(captures().join(format!("{name}.ram.sha256"))).expect("capture hash file");
    let want = want.split_whitespace().next().expect("a hash");
    let (mut ram, bytes) = replay(&file, machine);
    // The capture hashes are of main RAM as the source's pmemsave read it: holes zeroed.
    zero_holes(&mut ram, machine.ram_holes());
    assert_eq!(ram.len(), 32 << 20, "{name}: dump size");
    assert_eq!(sha256_hex(&ram), want, "{name}: RAM hash");
    let len = std::fs::metadata(&file).expect("capture").len();
    assert_eq!(bytes, len, "{name}: summary bytes vs capture size");
}

#[test]
fn replay_none_precopy_capture() {
    replay_capture("none-precopy", Machine::None);
}

#[test]
fn replay_pc_precopy_dirty_capture() {
    replay_capture("pc-precopy-dirty", Machine::Pc);
}

#[test]
fn replay_q35_precopy_capture() {
    replay_capture("q35-precopy", Machine::Q35);
}

/// Postcopy streams recorded between two real QEMUs replay to the source's RAM.
#[test]
fn replay_pc_postcopy_capture() {
    replay_capture("pc-postcopy", Machine::Pc);
}

#[test]
fn replay_q35_postcopy_capture() {
    replay_capture("q35-postcopy", Machine::Q35);
}

/// A stream cut in the middle is an error: non-zero exit, a one-line message on stderr.
#[test]
fn replay_of_truncated_capture_fails() {
    let full = std::fs::read(captures().join("pc-precopy-dirty.bin")).expect("capture");
    let dir = tempfile::tempdir().expect("tempdir");
    for cut in [5, 400_000, full.len() - 1] {
        let file = dir.path().join(format!("cut-{cut}.bin"));
        std::fs::write(&file, &full[..cut]).expect("write");
        let opts = DestOptions { input: Some(file), ..DestOptions::default() };
        let dest = Dest::spawn(Path::new(DEST), &opts).expect("start postcopy-dest");
        let out = dest.wait(Duration::from_secs(30)).expect("wait");
        assert!(!out.status.success(), "cut at {cut}: exit 0 on a truncated stream");
        let err = out.stderr.trim();
        assert!(!err.is_empty() && err.lines().count() == 1, "cut at {cut}: stderr {err:?}");
    }
}

/// A migration the source cancels is not a success for the destination.
#[test]
fn cancelled_precopy_fails() {
    let _g = serial();
    let guest = build_dirty_guest().expect("build dirty guest");
    let mut vm =
        SourceVm::builder(Machine::Pc).mem_mib(32).kernel(&guest, "rate=2048").spawn().expect("source");
    vm.wait_guest_dirtying(Duration::from_secs(30)).expect("guest runs");
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("dest.sock");
    let opts = DestOptions { listen: Some(format!("unix:{}", sock.display())), ..DestOptions::default() };
    let dest = Dest::spawn(Path::new(DEST), &opts).expect("start postcopy-dest");
    vm.set_max_bandwidth(128 << 10).expect("bw");
    vm.migrate(&format!("unix:{}", sock.display())).expect("migrate");
    std::thread::sleep(Duration::from_millis(1000));
    vm.cancel_migration().expect("migrate_cancel");
    vm.wait_status(&["cancelled"], Duration::from_secs(10)).expect("source cancels");
    let out = dest.wait(Duration::from_secs(20)).expect("postcopy-dest exits after the cancel");
    assert!(!out.status.success(), "exit 0 after a cancelled migration; stdout {}", out.stdout);
    assert!(!out.stderr.trim().is_empty(), "no error message");
}

/// `--record` during a real postcopy migration, then `--input` of the recording gives the
/// same RAM.
#[test]
fn postcopy_recording_replays_to_same_ram() {
    let _g = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let rec = dir.path().join("postcopy.bin");
    let mut sc = Scenario::postcopy(Machine::Pc);
    sc.record = Some(rec.clone());
    let out = run_ok(&sc);
    assert_postcopy(&out, Machine::Pc);
    let recording = std::fs::read(&rec).expect("recording");
    assert_eq!(recording.len() as u64, out.summary.bytes, "recording size vs summary bytes");
    assert_eq!(sha256_hex(&recording), out.stream_sha256, "recording vs relayed stream");
    let (ram, bytes) = replay(&rec, Machine::Pc);
    assert_eq!(bytes, recording.len() as u64);
    assert_eq!(sha256_hex(&ram), out.reference_ram_sha256, "replayed RAM");
}

/// Self-check of the harness, independent of postcopy-dest: the scenario's postcopy
/// choreography into QEMU's own destination (`-incoming ... -S`), through the recording
/// relay, really enters postcopy; and the oracle (loading the recorded stream into a
/// fresh QEMU) gives the same RAM as the live QEMU destination.
#[test]
fn reference_qemu_destination_postcopy() {
    let _g = serial();
    let guest = build_dirty_guest().expect("build dirty guest");
    let sc = Scenario::postcopy(Machine::Pc);
    let builder = SourceVm::builder(sc.machine).mem_mib(sc.mem_mib).kernel(&guest, &sc.guest_append);
    let mut src = builder.clone().spawn().expect("source");
    let work = tempfile::tempdir().expect("tempdir");
    let incoming = work.path().join("incoming.sock");
    let relay_sock = work.path().join("relay.sock");
    let stream = work.path().join("stream.bin");
    let mut dst =
        builder.clone().incoming(&format!("unix:{}", incoming.display())).spawn().expect("QEMU destination");
    src.wait_guest_dirtying(Duration::from_secs(30)).expect("guest runs");
    for vm in [&mut src, &mut dst] {
        vm.set_capabilities(&[("postcopy-ram", true)]).expect("caps");
    }
    src.set_max_bandwidth(sc.max_bandwidth.expect("bw")).expect("bw");
    src.set_max_postcopy_bandwidth(sc.max_postcopy_bandwidth.expect("pbw")).expect("pbw");
    let relay = Relay::start(
        &relay_sock,
        Endpoint::Unix(incoming.clone()),
        stream.clone(),
        work.path().join("rp.bin"),
        Instant::now() + sc.timeout,
    )
    .expect("relay");
    let start = Instant::now();
    src.migrate(&format!("unix:{}", relay_sock.display())).expect("migrate");
    std::thread::sleep(sc.precopy_for);
    src.start_postcopy().expect("start postcopy");
    let mut saw_postcopy = false;
    loop {
        let info = src.query_migrate().expect("query-migrate");
        saw_postcopy |= info.status == "postcopy-active";
        if info.status == "completed" {
            break;
        }
        assert!(!matches!(info.status.as_str(), "failed" | "cancelled"), "source: {}", info.raw);
        assert!(start.elapsed() < sc.timeout, "source: {}", info.raw);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(saw_postcopy, "the source never entered postcopy-active");
    dst.wait_status(&["completed"], Duration::from_secs(30)).expect("destination completes");
    let (stream_bytes, rp_bytes) = relay.finish(Duration::from_secs(10)).expect("relay");
    assert!(stream_bytes > 0 && rp_bytes >= 8, "{stream_bytes} {rp_bytes}");
    let live = dst.read_ram().expect("destination RAM");
    let loaded = qemu_load(&builder, &stream, Duration::from_secs(60)).expect("oracle");
    if let Some(diff) = diff_pages(&live, &loaded) {
        panic!("QEMU's load of the recorded stream differs from the live destination: {diff}");
    }
    if let Some(diff) = diff_pages(&src.read_ram().expect("source RAM"), &live) {
        eprintln!("note: QEMU's destination differs from the source's final RAM: {diff}");
    }
    assert!(src.guest_status().expect("status").pages_dirtied > 0);
}

#[test]
fn dirty_guest_runs_and_dirties() {
    let _g = serial();
    let guest = build_dirty_guest().expect("build dirty guest");
    let mut vm = SourceVm::builder(Machine::Pc)
        .mem_mib(128)
        .kernel(&guest, "rate=4096 span=8192")
        .spawn()
        .expect("start QEMU");
    let a = vm.wait_guest_dirtying(Duration::from_secs(30)).expect("guest runs");
    std::thread::sleep(Duration::from_millis(1000));
    let b = vm.guest_status().expect("status");
    // multiboot's mem_upper ends a little below the RAM size (QEMU keeps the top 128 KiB).
    assert!((120 << 20..=128 << 20).contains(&a.ram_end), "{a:?}");
    assert_eq!(a.region_start, 0x20_0000);
    assert_eq!(a.region_end, 0x20_0000 + (8192 << 10));
    assert_eq!(a.rate_kib, 4096);
    assert!(b.heartbeat > a.heartbeat, "{a:?} {b:?}");
    // 4 MiB/s is 1024 pages per second; the lower bound leaves room for a vCPU thread that
    // gets only part of a core on a busy 2-core host (the rate follows the virtual clock).
    let pages = b.pages_dirtied - a.pages_dirtied;
    assert!((100..=2000).contains(&pages), "{pages} pages in ~1 s");
    let ram = vm.read_ram().expect("RAM");
    let region = &ram[0x20_0000..0x20_0000 + (8192 << 10)];
    let touched = region.chunks(4096).filter(|p| p.iter().any(|&b| b != 0)).count();
    assert!(touched >= 100, "{touched} non-zero pages in the region");
}

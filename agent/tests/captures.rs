//! Real QEMU 7.2 streams (see `tests/captures/README.md`) through the engine, whole and split.

use agent::config::TARGET_PAGE_SIZE;
use agent::layout::{LEGACY_HOLE_END, LEGACY_HOLE_START};
use agent::postcopy::State;
use agent::testing::run_stream;
use sha2::{Digest, Sha256};

fn capture(name: &str) -> (Vec<u8>, String) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/captures/");
    let bytes = std::fs::read(format!("{dir}{name}.bin")).unwrap();
    let sha = std::fs::read_to_string(format!("{dir}{name}.ram.sha256")).unwrap();
    (bytes, sha.split_whitespace().next().unwrap().to_string())
}

fn check(name: &str, main_block: &str, pc_hole: bool, capacity: usize, chunk: usize) {
    let (stream, expected) = capture(name);
    let out = run_stream(&stream, capacity, chunk);
    let progress = out.result.unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(progress.finished);
    assert_eq!(out.state, State::None, "plain precopy never leaves NONE");
    assert_eq!(out.stats.bytes, stream.len() as u64, "every byte consumed");
    assert!(out.rp.is_empty(), "no return path in a plain precopy stream");
    let mut ram = out.ports.memory.block(main_block.as_bytes()).unwrap().bytes();
    if pc_hole {
        ram[LEGACY_HOLE_START as usize..LEGACY_HOLE_END as usize].fill(0);
    }
    assert_eq!(format!("{:x}", Sha256::digest(&ram)), expected, "{name}: RAM differs from the source's");
    let total_pages: u64 = out.ports.memory.blocks.iter().map(|b| b.len / TARGET_PAGE_SIZE).sum();
    assert!(out.stats.pages + out.stats.zero_pages >= total_pages, "every page arrived at least once");
    assert!(out.stats.device_state_bytes > 0);
}

#[test]
fn none_precopy_reproduces_source_ram() {
    check("none-precopy", "ram", false, 1 << 20, 1 << 20);
}

#[test]
fn pc_precopy_with_dirty_guest_reproduces_source_ram() {
    check("pc-precopy-dirty", "pc.ram", true, 1 << 20, 1 << 20);
}

#[test]
fn q35_precopy_reproduces_source_ram() {
    check("q35-precopy", "pc.ram", true, 1 << 20, 1 << 20);
}

#[test]
fn captures_decode_the_same_through_small_wrapping_rings() {
    for (capacity, chunk) in [(4096 + 13, 1000), (600, 599), (513, 7)] {
        check("pc-precopy-dirty", "pc.ram", true, capacity, chunk);
        check("none-precopy", "ram", false, capacity, chunk);
    }
}

/// A real postcopy stream (QEMU 7.2 to QEMU 7.2, recorded in between): replayed, it ends in
/// END with the source's final RAM; our return path answers every PING and ends with SHUT(0).
fn check_postcopy(name: &str) {
    let (stream, expected) = capture(name);
    let out = run_stream(&stream, 64 << 10, 60_000);
    assert!(out.result.unwrap_or_else(|e| panic!("{name}: {e}")).finished);
    assert_eq!(out.state, State::End);
    assert!(out.stats.discarded_pages > 0, "{name}: the source discarded pages");
    let rp: Vec<&[u8]> = out.rp.iter().map(Vec::as_slice).collect();
    let pong = |v: u8| [0, 2, 0, 4, 0, 0, 0, v];
    assert_eq!(rp, [&pong(1)[..], &pong(2), &pong(3), &pong(4), &[0, 1, 0, 4, 0, 0, 0, 0]]);
    let mut ram = out.ports.memory.block(b"pc.ram").unwrap().bytes();
    ram[LEGACY_HOLE_START as usize..LEGACY_HOLE_END as usize].fill(0);
    assert_eq!(format!("{:x}", Sha256::digest(&ram)), expected, "{name}: RAM differs from the source's");
}

#[test]
fn pc_postcopy_capture_reproduces_source_ram() {
    check_postcopy("pc-postcopy");
}

#[test]
fn q35_postcopy_capture_reproduces_source_ram() {
    check_postcopy("q35-postcopy");
}

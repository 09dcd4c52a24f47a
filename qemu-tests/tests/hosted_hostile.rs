//! `postcopy-dest` (as `cargo test` builds it: a debug build, where a forgotten stage-2 flush
//! token panics) replaying hostile streams: each ends with exit 1 and the documented
//! one-line error naming the field, never a panic; and the streams it must accept, it does.

use std::process::Command;

use agent::config::TARGET_PAGE_SIZE;
use agent::testing::{pattern_page, postcopy_stream, StreamBuilder};
use agent::wire::command::{Command as Cmd, Dialect};
use agent::wire::section::FullHeader;

const DEST: &str = env!("CARGO_BIN_EXE_postcopy-dest");

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn replay(stream: &[u8], extra: &[&str], dump: Option<&std::path::Path>) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stream.bin");
    std::fs::write(&path, stream).unwrap();
    let mut cmd = Command::new(DEST);
    cmd.arg("--input").arg(&path).args(["--vcpus", "2"]).args(extra);
    if let Some(d) = dump {
        cmd.arg("--dump-dir").arg(d);
    }
    let out = cmd.output().unwrap();
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Exit 1, one stderr line, starting `postcopy-dest: stream offset`, containing `expect`.
fn refused(stream: &[u8], extra: &[&str], expect: &str) {
    let run = replay(stream, extra, None);
    assert_eq!(run.code, Some(1), "stderr: {}", run.stderr);
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    assert_eq!(run.stderr.lines().count(), 1, "one line: {}", run.stderr);
    assert!(run.stderr.starts_with("postcopy-dest: stream offset "), "{}", run.stderr);
    assert!(run.stderr.contains(expect), "expected {expect:?} in {}", run.stderr);
}

fn header_setup(blocks: &[(&[u8], u64)]) -> StreamBuilder {
    let mut s = StreamBuilder::new();
    s.header().configuration(b"pc-i440fx-7.2").command(Cmd::OpenReturnPath).advise(4096, 4096);
    s.ram_start(2, blocks);
    s
}

#[test]
fn a_stream_cut_between_discard_entries_is_a_one_line_error() {
    let mut s = header_setup(&[(b"pc.ram", 16 * TARGET_PAGE_SIZE)]);
    s.ram_part(2, false);
    for p in 0..16 {
        s.page(if p == 0 { Some(b"pc.ram") } else { None }, p * TARGET_PAGE_SIZE, &pattern_page(p));
    }
    s.eos(2).discard(b"pc.ram", &[(0, 0x2000), (0x4000, 0x1000)]);
    let cut = s.bytes.len() - 8;
    refused(&s.bytes[..cut], &[], "EndOfStream: stream ends inside this field");
    refused(&s.bytes[..cut], &["--stage2", "npt"], "EndOfStream");
}

#[test]
fn pages_missing_at_the_end_are_named_with_their_block() {
    let full = postcopy_stream(8, 2..6);
    let run = [8, 0, 5, 0, 0];
    let at = full.windows(5).rposition(|w| w == run).unwrap() + 5;
    let mut s = StreamBuilder { bytes: full[..at].to_vec(), ..Default::default() };
    s.eof();
    refused(&s.bytes, &[], "4 pages of block #0 never arrived (the first at offset 0x2000) (pc.ram)");
}

#[test]
fn hostile_layouts_device_state_and_ram_instances() {
    let s = header_setup(&[(b"pc.ram", 64 << 20), (b"pc.bios", 5 << 30)]);
    refused(&s.bytes, &[], "GuestPhysicalMap: length 5368709120 over the cap 16777216");
    let mut s = header_setup(&[(b"pc.ram", TARGET_PAGE_SIZE)]);
    s.ram_part(2, true).zero(Some(b"pc.ram"), 0, 0).eos(2).device(9, b"cpu", &vec![0x55; 17 << 20]).eof();
    refused(&s.bytes, &[], "DeviceState: length");
    let mut s = StreamBuilder::new();
    s.header();
    let h = FullHeader { start: true, section_id: 2, idstr: b"ram", instance_id: 1, version_id: 4 };
    s.section_header(h);
    refused(&s.bytes, &[], "SectionInstance: found 0x1, expected 0x0");
}

#[test]
fn v5_keeps_a_page_that_arrives_again_after_postcopy_end() {
    let mut s = StreamBuilder { dialect: Dialect::SeedV5, ..Default::default() };
    s.header().advise(4096, 4096).ram_start(2, &[(b"pc.ram", 4 * TARGET_PAGE_SIZE)]).ram_part(2, false);
    for p in 0..4 {
        s.page(if p == 0 { Some(b"pc.ram") } else { None }, p * TARGET_PAGE_SIZE, &pattern_page(p));
    }
    s.eos(2).command(Cmd::Listen).command(Cmd::Run).command(Cmd::PostcopyEnd(0));
    s.ram_part(2, false).page(Some(b"pc.ram"), 0, &[0xee; 4096]).eos(2).eof();
    let dump = tempfile::tempdir().unwrap();
    let run = replay(&s.bytes, &["--dialect", "v5"], Some(dump.path()));
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(run.stdout.contains("\"duplicate_pages\":1"), "{}", run.stdout);
    let ram = std::fs::read(dump.path().join("pc.ram.bin")).unwrap();
    assert_eq!(&ram[..4096], &pattern_page(0)[..], "the page kept its first copy");
}

//! Postcopy recovery against real QEMU 7.2: a source running the dirty guest migrates into
//! `postcopy-dest` through a recording relay; in postcopy the connection breaks (QMP
//! `migrate-pause` on the source), the destination pauses and listens again, and the source
//! resumes (`migrate resume=true`) through a new relay, as many times as asked.
//!
//! The verdict is the one of the plain scenario: the source reaches `completed`, the
//! destination ends in END, and every RAMBlock it holds equals what QEMU 7.2's own destination
//! loads from the same bytes. QEMU's loader cannot resume, so those bytes are put back
//! together as one stream:
//!
//! 1. each connection's stream up to the last whole record the destination took
//!    (`postcopy-dest` reports the offset of each break);
//! 2. where the break cut a `ram` section open, that section's end (EOS, footer);
//! 3. each later connection without its leading recovery handshake (RECV_BITMAP and
//!    POSTCOPY_RESUME commands).
//!
//! The pages the break cut were not received, so the source sends them again on the next
//! connection, and the rebuilt stream has them there.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::dest::{Dest, DestOptions};
use crate::guest::build_dirty_guest;
use crate::oracle::qemu_load_blocks;
use crate::ram::diff_pages;
use crate::relay::{Endpoint, Relays};
use crate::scenario::dump_file_name;
use crate::source::{Machine, SourceVm};
use crate::{bail, Result};

/// The recovery scenario.
#[derive(Debug, Clone)]
pub struct Recovery {
    /// Source RAM, MiB.
    pub mem_mib: u64,
    /// Breaks (QMP `migrate-pause` on the source, each after `before_break` in postcopy).
    pub breaks: usize,
    /// `max-postcopy-bandwidth`, bytes/s: slow enough that postcopy lasts through the breaks.
    pub postcopy_bandwidth: u64,
    /// Time in postcopy before each `migrate-pause`.
    pub before_break: Duration,
    /// Overall limit.
    pub timeout: Duration,
}

impl Default for Recovery {
    fn default() -> Self {
        Recovery {
            mem_mib: 32,
            breaks: 1,
            postcopy_bandwidth: 4 << 20,
            before_break: Duration::from_millis(700),
            timeout: Duration::from_secs(120),
        }
    }
}

/// What happened.
#[derive(Debug)]
pub struct Outcome {
    /// `postcopy-dest`'s JSON summary (with its `breaks`).
    pub summary: Value,
    /// The source's final status.
    pub source_status: String,
    /// `None` if every block equals QEMU's load of the rebuilt stream, else what differs.
    pub ram_diff: Option<String>,
    /// Blocks compared.
    pub blocks: usize,
    /// Per break: seconds from `migrate-pause` (or the cut) until the source was
    /// `postcopy-active` again.
    pub resume_seconds: Vec<f64>,
}

/// The QMP status after `migrate-pause` or a broken resume, and after `resume=true`.
fn wait_for(vm: &mut SourceVm, wanted: &[&str], timeout: Duration) -> Result<String> {
    Ok(vm.wait_status(wanted, timeout)?.status)
}

/// Runs the scenario against `dest_bin`.
pub fn run(dest_bin: &Path, r: &Recovery) -> Result<Outcome> {
    let guest = build_dirty_guest()?;
    let builder = SourceVm::builder(Machine::Pc).mem_mib(r.mem_mib).kernel(&guest, "rate=4096 fill");
    let mut vm = builder.clone().spawn()?;
    vm.wait_guest_dirtying(Duration::from_secs(30))?;
    let work = tempfile::Builder::new().prefix("recovery-").tempdir()?;
    let dest_sock = work.path().join("dest.sock");
    let dump_dir = work.path().join("dump");
    let opts = DestOptions {
        listen: Some(format!("unix:{}", dest_sock.display())),
        dump_dir: Some(dump_dir.clone()),
        touch: Some("random".into()),
        vcpus: Some(2),
        recover_timeout: Some(60),
        ..DestOptions::default()
    };
    let dest = Dest::spawn(dest_bin, &opts)?;
    let deadline = Instant::now() + r.timeout;
    let mut relays = Relays::new(work.path(), Endpoint::Unix(dest_sock.clone()), deadline);
    vm.set_capabilities(&[("postcopy-ram", true)])?;
    vm.set_max_bandwidth(8 << 20)?;
    vm.set_max_postcopy_bandwidth(r.postcopy_bandwidth)?;
    vm.migrate(&format!("unix:{}", relays.start_next()?.display()))?;
    std::thread::sleep(Duration::from_millis(500));
    vm.start_postcopy()?;
    wait_for(&mut vm, &["postcopy-active"], Duration::from_secs(30))?;
    let mut resume_seconds = Vec::new();
    for _ in 0..r.breaks {
        std::thread::sleep(r.before_break);
        let status = vm.query_migrate()?.status;
        if status != "postcopy-active" {
            bail!(
                "the source is `{status}` before the break: make postcopy last longer (postcopy_bandwidth)"
            );
        }
        vm.execute("migrate-pause", json!({}))?;
        let paused = Instant::now();
        wait_for(&mut vm, &["postcopy-paused"], Duration::from_secs(30))?;
        let sock = relays.start_next()?;
        vm.execute("migrate", json!({ "uri": format!("unix:{}", sock.display()), "resume": true }))?;
        let status = wait_for(&mut vm, &["postcopy-active", "completed"], Duration::from_secs(30))?;
        resume_seconds.push(paused.elapsed().as_secs_f64());
        if status == "completed" {
            bail!("the migration completed right at the resume: nothing was left to recover");
        }
    }
    let source = vm.wait_status(&["completed"], r.timeout)?;
    let outcome = dest.wait(Duration::from_secs(60))?;
    let stderr = crate::process::tail(&outcome.stderr, 3000);
    let summary: Value = serde_json::from_str(outcome.stdout.lines().last().unwrap_or("null"))
        .map_err(|e| crate::Error(format!("postcopy-dest summary: {e}; stderr: {stderr}")))?;
    if !outcome.status.success() || summary["state"] != "END" {
        bail!("postcopy-dest did not complete: {summary}; stderr: {stderr}");
    }
    let streams = relays.streams().to_vec();
    for finished in relays.finish(Duration::from_secs(20)) {
        finished?;
    }
    let _ = vm.quit();

    let stream = work.path().join("rebuilt.bin");
    std::fs::write(&stream, rebuild(&streams, &summary)?)?;
    let reference = qemu_load_blocks(&builder, &stream, Duration::from_secs(120))?;
    let mut ram_diff = None;
    for (name, want) in &reference {
        let got = std::fs::read(dump_dir.join(dump_file_name(name)))?;
        if ram_diff.is_none() {
            ram_diff = diff_pages(want, &got).map(|d| format!("{name}: {d}"));
        }
    }
    Ok(Outcome { summary, source_status: source.status, ram_diff, blocks: reference.len(), resume_seconds })
}

/// The one stream QEMU's loader can read from the connections' recorded streams `pieces`, with
/// the breaks a destination reported (`summary["breaks"]`: `offset`, `open_ram_section`,
/// `eos_read`): see the module docs. One piece and no breaks: that piece.
pub fn rebuild(pieces: &[PathBuf], summary: &Value) -> Result<Vec<u8>> {
    let breaks = summary["breaks"].as_array().cloned().unwrap_or_default();
    if breaks.len() + 1 != pieces.len() {
        bail!("{} connections but {} breaks reported: {summary}", pieces.len(), breaks.len());
    }
    let mut out = Vec::new();
    let mut taken = 0u64;
    for (i, piece) in pieces.iter().enumerate() {
        let bytes = std::fs::read(piece)?;
        let body = if i == 0 { &bytes[..] } else { strip_handshake(&bytes)? };
        match breaks.get(i) {
            Some(b) => {
                let Some(offset) = b["offset"].as_u64() else { bail!("a break without its offset: {b}") };
                // Offsets count the bytes the destination took over all connections, the
                // handshakes included.
                let keep = offset.checked_sub(taken).ok_or(crate::Error(format!("offsets go back: {b}")))?;
                let handshake = (bytes.len() - body.len()) as u64;
                let keep = keep
                    .checked_sub(handshake)
                    .ok_or(crate::Error(format!("offset inside the handshake: {b}")))?;
                out.extend_from_slice(
                    body.get(..keep as usize).ok_or(crate::Error(format!("offset past the bytes: {b}")))?,
                );
                if let Some(section) = b["open_ram_section"].as_u64() {
                    if b["eos_read"] != true {
                        out.extend_from_slice(&0x10u64.to_be_bytes());
                    }
                    out.push(0x7e);
                    out.extend_from_slice(&(section as u32).to_be_bytes());
                }
                taken = offset;
            }
            None => out.extend_from_slice(body),
        }
    }
    Ok(out)
}

/// `bytes` without its leading RECV_BITMAP (command 10) and POSTCOPY_RESUME (9) records.
fn strip_handshake(mut bytes: &[u8]) -> Result<&[u8]> {
    while let [8, 0, cmd @ (9 | 10), hi, lo, ..] = bytes {
        let len = usize::from(u16::from_be_bytes([*hi, *lo]));
        let _ = cmd;
        bytes = bytes.get(5 + len..).ok_or(crate::Error("a handshake command cut short".into()))?;
    }
    Ok(bytes)
}

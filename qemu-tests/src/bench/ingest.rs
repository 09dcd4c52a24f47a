//! Ingest: a recorded QEMU stream written into a unix socket by one sender program, read by
//! `postcopy-dest --listen` or by QEMU 7.2's `-incoming`; memcpy of the same bytes as a
//! reference.

use std::hint::black_box;
use std::time::{Duration, Instant};

use crate::hosted::mem::Mapping;

/// memcpy of `stream.len()` bytes into fresh memory allocated as the guest frames are
/// (anonymous, transparent huge pages allowed: faulted in by the copy), and again into the
/// same memory, already touched.
pub fn memcpy(stream: &[u8]) -> (Duration, Duration) {
    let mut map = Mapping::anon(stream.len()).expect("mmap");
    let _ = map.madvise(0, map.len(), libc::MADV_HUGEPAGE);
    let cold = &mut map.bytes_mut()[..stream.len()];
    let t = Instant::now();
    cold.copy_from_slice(black_box(stream));
    let cold_time = t.elapsed();
    black_box(&cold);
    let t = Instant::now();
    cold.copy_from_slice(black_box(stream));
    let warm_time = t.elapsed();
    black_box(&cold);
    (cold_time, warm_time)
}

/// Touches `bytes` of fresh anonymous memory (THP allowed) once and frees it. In a VM, the
/// first touch of a guest-physical page also faults in the host, at a cost that varies a lot
/// from one run to the next; touching memory once before the measured runs makes what later
/// allocations get more like a real machine's memory, for both sides alike.
pub fn warm_memory(bytes: usize) -> Duration {
    let t = Instant::now();
    if let Ok(mut map) = Mapping::anon(bytes) {
        let _ = map.madvise(0, map.len(), libc::MADV_HUGEPAGE);
        for page in map.bytes_mut().chunks_mut(4096) {
            page[0] = 1;
        }
        black_box(map.bytes());
    }
    t.elapsed()
}

/// MB/s (10^6 bytes per second).
pub fn mb_per_s(bytes: usize, time: Duration) -> f64 {
    bytes as f64 / time.as_secs_f64() / 1e6
}

/// Wall-clock nanoseconds since the epoch (`CLOCK_REALTIME`): comparable across processes
/// and with the timestamps of QEMU's QMP events.
pub fn wall_ns() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

/// What the sender saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendReport {
    /// [`wall_ns`] when `connect` returned.
    pub connect_ns: u128,
    /// [`wall_ns`] when the last byte was written (then the sender shuts its write side).
    pub written_ns: u128,
    /// Stream bytes written.
    pub bytes: u64,
    /// Return-path bytes read (and ignored) until the destination closed the connection.
    pub rp_bytes: u64,
}

impl SendReport {
    /// The JSON line the `send` subcommand prints.
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "connect_ns": self.connect_ns.to_string(),
            "written_ns": self.written_ns.to_string(),
            "bytes": self.bytes,
            "rp_bytes": self.rp_bytes,
        })
        .to_string()
    }

    /// Parses [`SendReport::to_json`]'s line (the last line of `out`).
    pub fn from_json(out: &str) -> Option<Self> {
        let v: serde_json::Value = serde_json::from_str(out.trim().lines().last()?).ok()?;
        let ns = |k: &str| v.get(k)?.as_str()?.parse::<u128>().ok();
        Some(Self {
            connect_ns: ns("connect_ns")?,
            written_ns: ns("written_ns")?,
            bytes: v.get("bytes")?.as_u64()?,
            rp_bytes: v.get("rp_bytes")?.as_u64()?,
        })
    }

    /// The sender's clock: connect → last byte written.
    pub fn sending(&self) -> Duration {
        Duration::from_nanos(self.written_ns.saturating_sub(self.connect_ns) as u64)
    }
}

/// The sender: connects to the unix socket `path` (retrying until a destination listens
/// there, up to 30 s), writes `data` into it, shuts its write side, and reads whatever comes
/// back on the return path (ignored: every page comes in the stream anyway) until the
/// destination closes the connection. `data` is in memory before the connection is made.
pub fn send(path: &std::path::Path, data: &[u8]) -> Result<SendReport, String> {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut conn = loop {
        match UnixStream::connect(path) {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => return Err(format!("connect {}: {e}", path.display())),
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    };
    let connect_ns = wall_ns();
    let mut back = conn.try_clone().map_err(|e| format!("dup: {e}"))?;
    let drain = std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        let mut n = 0u64;
        loop {
            match back.read(&mut buf) {
                Ok(0) | Err(_) => return n,
                Ok(k) => n += k as u64,
            }
        }
    });
    let written = conn.write_all(data).map_err(|e| format!("write: {e}"));
    let written_ns = wall_ns();
    let _ = conn.shutdown(std::net::Shutdown::Write);
    let rp_bytes = drain.join().unwrap_or(0);
    written?;
    Ok(SendReport { connect_ns, written_ns, bytes: data.len() as u64, rp_bytes })
}

/// One run of a destination fed by the sender.
#[derive(Debug, Clone, Copy)]
pub struct SocketRun {
    /// The destination's own clock: `postcopy-dest`'s summary `seconds` (accepted
    /// connection → migration complete); for QEMU, connect → the `completed` event's
    /// timestamp.
    pub dest: Duration,
    /// The sender's clock, connect → last byte written.
    pub sender: Duration,
    /// Return-path bytes the destination sent.
    pub rp_bytes: u64,
}

/// `postcopy-dest --listen unix:PATH` (plus `dest_args`) fed `capture` by the sender
/// (`postcopy-bench send`, `bench_exe`). `postcopy-dest` must be next to `bench_exe`.
pub fn ours_over_socket(
    bench_exe: &std::path::Path,
    capture: &std::path::Path,
    dest_args: &[&str],
) -> Result<SocketRun, String> {
    use crate::process::ChildGuard;
    let dir = tempfile::Builder::new().prefix("ingest-").tempdir().map_err(|e| e.to_string())?;
    let sock = dir.path().join("migrate.sock");
    let mut cmd = std::process::Command::new(bench_exe.with_file_name("postcopy-dest"));
    cmd.arg("--listen").arg(format!("unix:{}", sock.display())).args(dest_args);
    let mut dest = ChildGuard::spawn("postcopy-dest", cmd, dir.path()).map_err(|e| e.to_string())?;
    let mut cmd = std::process::Command::new(bench_exe);
    cmd.arg("send").arg(&sock).arg(capture);
    let mut sender = ChildGuard::spawn("sender", cmd, dir.path()).map_err(|e| e.to_string())?;
    let timeout = Duration::from_secs(120);
    let status = dest.wait_or_kill(timeout).map_err(|e| e.to_string())?;
    let sent = sender.wait_or_kill(Duration::from_secs(30)).map_err(|e| e.to_string())?;
    // postcopy-dest exits 0 only for a completed migration.
    if !status.success() {
        return Err(format!("postcopy-dest {status}: {}", dest.stderr_tail(300)));
    }
    if !sent.success() {
        return Err(format!("sender {sent}: {}", sender.stderr_tail(300)));
    }
    let summary: serde_json::Value = serde_json::from_str(dest.stdout().trim().lines().last().unwrap_or(""))
        .map_err(|e| format!("postcopy-dest summary: {e}"))?;
    let seconds = summary["seconds"].as_f64().ok_or("no seconds in the summary")?;
    let report = SendReport::from_json(&sender.stdout()).ok_or("no sender report")?;
    if report.bytes != std::fs::metadata(capture).map_or(0, |m| m.len()) {
        return Err(format!("sender wrote {} bytes, not the whole capture", report.bytes));
    }
    Ok(SocketRun {
        dest: Duration::from_secs_f64(seconds),
        sender: report.sending(),
        rp_bytes: report.rp_bytes,
    })
}

/// QEMU 7.2's `-incoming unix:PATH` fed `capture` by the same sender (`bench_exe send`):
/// destination clock = connect → QEMU's `completed` event.
pub fn qemu_over_socket(
    bench_exe: &std::path::Path,
    capture: &std::path::Path,
    machine_args: &[String],
    postcopy: bool,
) -> Result<SocketRun, String> {
    use crate::baseline::qemu_load::{socket_load, LoadOptions};
    let opts = LoadOptions { timeout: Duration::from_secs(120), postcopy_ram: postcopy };
    let load = socket_load(machine_args, &opts, |sock| {
        let mut cmd = std::process::Command::new(bench_exe);
        cmd.arg("send").arg(sock).arg(capture);
        cmd
    })
    .map_err(|e| e.to_string())?;
    let report = SendReport::from_json(&load.sender_stdout).ok_or("no sender report")?;
    if report.bytes != std::fs::metadata(capture).map_or(0, |m| m.len()) {
        return Err(format!("sender wrote {} bytes, not the whole capture", report.bytes));
    }
    let dest = load.completed_ns.checked_sub(report.connect_ns).ok_or("completed before connect")?;
    Ok(SocketRun {
        dest: Duration::from_nanos(dest as u64),
        sender: report.sending(),
        rp_bytes: report.rp_bytes,
    })
}

/// RAM pages (PAGE and ZERO records) of a stream before and after LISTEN, per the agent's
/// decoder: how much of a postcopy capture really arrives in postcopy.
pub fn pages_around_listen(stream: &[u8]) -> (u64, u64) {
    use agent::decoder::{Decoder, Record, Step};
    use agent::wire::command::{Command, Dialect};
    use agent::wire::ram::RamRecord;
    let mut decoder = Decoder::new(Dialect::Qemu72);
    let (mut before, mut after, mut listening) = (0u64, 0u64, false);
    let mut at = 0;
    while at < stream.len() {
        let Ok(Step::Record { record, len, .. }) = decoder.next(&stream[at..], &[]) else { break };
        match record {
            Record::Command(Command::Listen) => listening = true,
            Record::Ram(RamRecord::Page { .. } | RamRecord::Zero { .. }) if listening => after += 1,
            Record::Ram(RamRecord::Page { .. } | RamRecord::Zero { .. }) => before += 1,
            _ => {}
        }
        at += len;
    }
    (before, after)
}

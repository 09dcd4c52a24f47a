//! How fast QEMU 7.2's own destination loads a recorded precopy stream.
//!
//! QEMU starts with the capture's machine arguments plus `-S -incoming defer`; events
//! are switched on (`migrate-set-capabilities events=on`); then `migrate-incoming` with
//! `exec:cat 'FILE'`. The clock starts just before the `migrate-incoming` command is
//! written and stops when the `MIGRATION` event with status `completed` is read (then
//! `query-migrate` confirms the status). Load rate = file bytes / that time.
//!
//! Why `exec:cat`: the stream reaches QEMU through a pipe from a separate `cat` that
//! reads the file from the page cache (the file is read once before the clock starts),
//! so the rate is QEMU's parse-and-place rate, not disk speed, and no thread of this
//! process competes with QEMU for the two cores while it loads; a unix socket fed by
//! this process would be the same bytes through a socket, with our copy loop added. The
//! `fork`+`exec` of `sh -c cat` (about a millisecond) is inside the measured time.
//!
//! QEMU's own timestamps of the `MIGRATION` events give a second measure
//! ([`LoadTiming::qemu_elapsed`]: first state change to `completed`), without the QMP
//! round trips.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::install;
use crate::process::ChildGuard;
use crate::qmp::Qmp;
use crate::{bail, Error, Result};

/// Default limit for one load.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// The result of [`incoming_load`].
#[derive(Debug, Clone)]
pub struct LoadTiming {
    /// Size of the capture file (all of it goes through QEMU's loader).
    pub bytes: u64,
    /// `migrate-incoming` sent → `completed` event received.
    pub wall: Duration,
    /// QEMU's own event timestamps: first `MIGRATION` event → `completed` (`None` if
    /// QEMU sent only the final event).
    pub qemu_elapsed: Option<Duration>,
    /// `bytes / wall` in MB/s (10^6 bytes per second).
    pub mb_per_s: f64,
    /// The `MIGRATION` statuses seen, in order (ends with `completed`).
    pub statuses: Vec<String>,
    /// The final `query-migrate` reply of the destination.
    pub query_migrate: Value,
}

/// Options of [`incoming_load_with`].
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Give up (and kill QEMU) after this long.
    pub timeout: Duration,
    /// Set capability `postcopy-ram` on the destination first (needed to load a
    /// postcopy stream; a precopy stream loads the same either way).
    pub postcopy_ram: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { timeout: DEFAULT_TIMEOUT, postcopy_ram: false }
    }
}

/// Times QEMU's load of `capture` with [`LoadOptions::default`].
///
/// `machine_args` are the capture source's arguments without the program, `-qmp`,
/// `-incoming` and `-S` (e.g. [`crate::source::SourceVmBuilder::args`] of the builder
/// that recorded it: same machine, memory, VGA and `-kernel`, hence the same RAM
/// blocks). `-accel tcg` is added unless present; any other accelerator is refused.
pub fn incoming_load(capture: &Path, machine_args: &[String]) -> Result<LoadTiming> {
    incoming_load_with(capture, machine_args, &LoadOptions::default())
}

/// [`incoming_load`] with options.
pub fn incoming_load_with(capture: &Path, machine_args: &[String], opts: &LoadOptions) -> Result<LoadTiming> {
    let capture = std::path::absolute(capture)?;
    let path = capture.display().to_string();
    if path.contains('\'') {
        bail!("incoming_load: the capture path must not contain a quote");
    }
    // Warm the page cache so that the measurement is not of the disk.
    let bytes = std::io::copy(&mut std::fs::File::open(&capture)?, &mut std::io::sink())?;

    let mut args: Vec<String> = machine_args.to_vec();
    match args.iter().position(|a| a == "-accel") {
        Some(i) if args.get(i + 1).map(String::as_str) == Some("tcg") => {}
        Some(i) => bail!("incoming_load: only `-accel tcg` works here, got {:?}", args.get(i + 1)),
        None => args.splice(0..0, ["-accel".to_string(), "tcg".to_string()]).for_each(drop),
    }
    for bad in ["-incoming", "-qmp", "-S"] {
        if args.iter().any(|a| a == bad) {
            bail!("incoming_load: machine_args must not contain {bad}");
        }
    }
    let dir = tempfile::Builder::new().prefix("qemu-load-").tempdir()?;
    let sock = dir.path().join("qmp.sock");
    let mut cmd = Command::new(install::qemu()?);
    cmd.args(&args)
        .args(["-S", "-incoming", "defer"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()));
    let mut child = ChildGuard::spawn("qemu-dest", cmd, dir.path())?;
    let with_stderr = |child: &mut ChildGuard, e: Error| -> Error {
        let exited = match child.try_status() {
            Ok(Some(s)) => format!("QEMU exited ({s}); "),
            _ => String::new(),
        };
        Error(format!("{e} ({exited}stderr: {})", child.stderr_tail(2000)))
    };
    let qmp = connect(&sock, &mut child).map_err(|e| with_stderr(&mut child, e));
    let mut qmp = qmp?;
    let timing = load(&mut qmp, &path, bytes, opts).map_err(|e| with_stderr(&mut child, e))?;
    let _ = qmp.execute("quit", Value::Null);
    child.wait_or_kill(Duration::from_secs(10))?;
    Ok(timing)
}

/// Waits for QEMU's QMP socket (failing early if QEMU exits) and connects.
fn connect(sock: &Path, child: &mut ChildGuard) -> Result<Qmp> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        if let Some(status) = child.try_status()? {
            bail!("QEMU exited at start ({status})");
        }
        if Instant::now() > deadline {
            bail!("QEMU did not create its QMP socket in 20 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Qmp::connect(sock, Duration::from_secs(20))
}

/// The timed part: `migrate-incoming`, then `MIGRATION` events until `completed`.
fn load(qmp: &mut Qmp, path: &str, bytes: u64, opts: &LoadOptions) -> Result<LoadTiming> {
    let mut caps = vec![json!({ "capability": "events", "state": true })];
    if opts.postcopy_ram {
        caps.push(json!({ "capability": "postcopy-ram", "state": true }));
    }
    qmp.execute("migrate-set-capabilities", json!({ "capabilities": caps }))?;
    let deadline = Instant::now() + opts.timeout;
    let t0 = Instant::now();
    qmp.execute("migrate-incoming", json!({ "uri": format!("exec:cat '{path}'") }))?;
    let mut statuses = Vec::new();
    let mut first_ts = None;
    let (wall, last_ts) = loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let event = qmp
            .wait_event("MIGRATION", remaining)
            .map_err(|e| Error(format!("waiting for the load to complete: {e}")))?;
        let now = t0.elapsed();
        let status = event["data"]["status"].as_str().unwrap_or("?").to_string();
        let ts = event_time(&event);
        first_ts = first_ts.or(ts);
        statuses.push(status.clone());
        match status.as_str() {
            "completed" => break (now, ts),
            "failed" | "cancelled" => bail!("QEMU's load {status} (statuses {statuses:?})"),
            _ => {}
        }
    };
    let query_migrate = qmp.execute("query-migrate", Value::Null)?;
    if query_migrate["status"] != "completed" {
        bail!("MIGRATION completed but query-migrate says {query_migrate}");
    }
    let qemu_elapsed = match (first_ts, last_ts) {
        (Some(a), Some(b)) if statuses.len() > 1 && b >= a => Some(b - a),
        _ => None,
    };
    Ok(LoadTiming {
        bytes,
        wall,
        qemu_elapsed,
        mb_per_s: bytes as f64 / wall.as_secs_f64() / 1e6,
        statuses,
        query_migrate,
    })
}

/// A QMP event's `timestamp` as a duration since the epoch.
fn event_time(event: &Value) -> Option<Duration> {
    let ts = &event["timestamp"];
    let secs = ts["seconds"].as_u64()?;
    let micros = ts["microseconds"].as_u64()?;
    Some(Duration::from_secs(secs) + Duration::from_micros(micros))
}

/// The result of [`socket_load`].
#[derive(Debug, Clone)]
pub struct SocketLoad {
    /// The `completed` event's own timestamp (QEMU's wall clock when it completed), in
    /// nanoseconds since the epoch: the caller subtracts its sender's connect time.
    pub completed_ns: u128,
    /// The `MIGRATION` statuses seen, in order (ends with `completed`).
    pub statuses: Vec<String>,
    /// The sender's standard output (its report).
    pub sender_stdout: String,
}

/// QEMU's destination fed over a unix socket: QEMU starts with `machine_args` plus
/// `-S -incoming defer`, events on (and `postcopy-ram` with `opts.postcopy_ram`), then
/// `migrate-incoming unix:SOCK`; `sender(SOCK)` is started and writes the stream; the load
/// ends with the `MIGRATION` event `completed`, whose timestamp is returned. QEMU then
/// quits, which closes the connection, and the sender's output is collected.
pub fn socket_load(
    machine_args: &[String],
    opts: &LoadOptions,
    sender: impl FnOnce(&Path) -> Command,
) -> Result<SocketLoad> {
    let mut args: Vec<String> = machine_args.to_vec();
    if !args.iter().any(|a| a == "-accel") {
        args.splice(0..0, ["-accel".to_string(), "tcg".to_string()]).for_each(drop);
    }
    let dir = tempfile::Builder::new().prefix("qemu-socket-load-").tempdir()?;
    let qmp_sock = dir.path().join("qmp.sock");
    let migrate_sock = dir.path().join("migrate.sock");
    let mut cmd = Command::new(install::qemu()?);
    cmd.args(&args)
        .args(["-S", "-incoming", "defer"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_sock.display()));
    let mut child = ChildGuard::spawn("qemu-dest", cmd, dir.path())?;
    let with_stderr = |child: &mut ChildGuard, e: Error| -> Error {
        Error(format!("{e} (QEMU stderr: {})", child.stderr_tail(500)))
    };
    let mut qmp = connect(&qmp_sock, &mut child).map_err(|e| with_stderr(&mut child, e))?;
    let mut caps = vec![json!({ "capability": "events", "state": true })];
    if opts.postcopy_ram {
        caps.push(json!({ "capability": "postcopy-ram", "state": true }));
    }
    qmp.execute("migrate-set-capabilities", json!({ "capabilities": caps }))?;
    qmp.execute("migrate-incoming", json!({ "uri": format!("unix:{}", migrate_sock.display()) }))?;
    let mut sending = ChildGuard::spawn("sender", sender(&migrate_sock), dir.path())?;
    let deadline = Instant::now() + opts.timeout;
    let mut statuses = Vec::new();
    let completed = loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let event = match qmp.wait_event("MIGRATION", remaining) {
            Ok(e) => e,
            Err(e) => {
                let e = Error(format!("{e}; sender: {}", sending.stderr_tail(300)));
                return Err(with_stderr(&mut child, e));
            }
        };
        let status = event["data"]["status"].as_str().unwrap_or("?").to_string();
        statuses.push(status.clone());
        match status.as_str() {
            "completed" => break event_time(&event),
            "failed" | "cancelled" => {
                let e = Error(format!("QEMU's load {status} (statuses {statuses:?})"));
                return Err(with_stderr(&mut child, e));
            }
            _ => {}
        }
    };
    let completed_ns = completed.ok_or(Error("the completed event has no timestamp".into()))?.as_nanos();
    let _ = qmp.execute("quit", Value::Null);
    child.wait_or_kill(Duration::from_secs(10))?;
    let status = sending.wait_or_kill(Duration::from_secs(30))?;
    if !status.success() {
        bail!("the sender failed ({status}): {}", sending.stderr_tail(300));
    }
    Ok(SocketLoad { completed_ns, statuses, sender_stdout: sending.stdout() })
}

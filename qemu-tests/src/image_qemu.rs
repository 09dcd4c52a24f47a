//! A real QEMU 7.2 VM migrated postcopy over virtio-vsock into the hypervisor image, where it
//! goes on running: `cargo xtask migrate --source qemu --transport vsock` and `cargo xtask
//! demo`.
//!
//! The pieces: the `vhost-device-vsock` daemon ([`crate::vsock`]); QEMU running the image with
//! `vhost-user-vsock-pci` (its memory a shared memfd, so that the daemon reaches the image's
//! queues); the source QEMU (TCG, pc) running the dirty guest, or `--source-args`; a recording
//! bridge ([`Relay`] to [`Endpoint::Vsock`]) from the source's unix-socket migration to the
//! image's port 1234. First, in the same run, the image's raw-rate sink (port 1235) measures
//! what the device carries when nothing else is done with the bytes.
//!
//! Verdicts: the source reaches `completed`; the guest's progress counter (the dirty guest's
//! heartbeat) moved on the destination past its value when the source stopped; and
//! `ram_equal`: every page of every block the image holds equals what QEMU 7.2's own
//! destination loads from the same recorded stream ([`qemu_load_blocks`]), except the pages
//! the guest wrote since RUN (the stage-2 dirty bits the image reports), which are counted.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::guest::{build_dirty_guest, STATUS_ADDR};
use crate::image::{build_image, Emulated, Machine, MACHINE_MIB};
use crate::oracle::qemu_load_blocks;
use crate::relay::{Endpoint, Relays};
use crate::source::{SourceVm, SourceVmBuilder};
use crate::vsock::{self, Daemon, MIGRATION_PORT, SINK_PORT};
use crate::{bail, Result};

/// What to migrate and how.
#[derive(Debug, Clone)]
pub struct QemuMigration {
    /// Source RAM, MiB.
    pub mem_mib: u64,
    /// Replaces the source's guest (`-kernel dirty-guest -append ...`): raw QEMU arguments.
    pub source_args: Option<Vec<String>>,
    /// The dirty guest's command line (when `source_args` is `None`).
    pub guest_append: String,
    /// With `source_args`: how long the source runs before the migration starts (its
    /// firmware boots the guest meanwhile). The dirty guest is waited for by its heartbeat.
    pub boot_wait: Duration,
    /// `max-bandwidth` for the precopy phase, bytes/s.
    pub max_bandwidth: u64,
    /// Time in precopy before `migrate-start-postcopy`.
    pub precopy_for: Duration,
    /// `max-postcopy-bandwidth`, bytes/s (0: unlimited).
    pub max_postcopy_bandwidth: u64,
    /// Bytes for the raw-rate sink (0: skip it).
    pub sink_bytes: u64,
    /// How long the guest runs in the image after the migration.
    pub after_end_ms: u64,
    /// Where to write the image's blocks.
    pub dump_dir: Option<PathBuf>,
    /// Overall limit.
    pub timeout: Duration,
    /// Send this file to the image instead of migrating (a hostile stream).
    pub stream_file: Option<PathBuf>,
    /// Postcopy recovery: break the connection this many times in postcopy (QMP
    /// `migrate-pause` on the source, each after `before_break`), resuming each time with
    /// `migrate resume=true` through a new bridge connection.
    pub breaks: usize,
    /// Time in postcopy before each break.
    pub before_break: Duration,
    /// After the last break the source does not resume (the image must give up).
    pub no_resume: bool,
    /// The image's `recover-timeout-ms=` (how long it waits for the source after a break).
    pub recover_timeout_ms: Option<u64>,
}

impl Default for QemuMigration {
    fn default() -> Self {
        QemuMigration {
            mem_mib: 64,
            source_args: None,
            // RAM filled first (so postcopy has non-zero pages to move), then 16 MiB/s of
            // random page writes: the running guest meets missing pages.
            guest_append: "rate=16384 fill".into(),
            boot_wait: Duration::from_secs(3),
            max_bandwidth: 16 << 20,
            precopy_for: Duration::from_millis(500),
            max_postcopy_bandwidth: 0,
            sink_bytes: 32 << 20,
            after_end_ms: 500,
            dump_dir: None,
            timeout: Duration::from_secs(240),
            stream_file: None,
            breaks: 0,
            before_break: Duration::from_millis(700),
            no_resume: false,
            recover_timeout_ms: None,
        }
    }
}

/// What the harness saw while the migration ran, for a live display.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// Phase, in words.
    pub phase: String,
    /// The source's migration status.
    pub source_status: String,
    /// The image's latest `PROGRESS` line.
    pub image: Value,
}

/// Splits `--source-args` like a shell would for plain words and quoted strings.
pub fn split_args(s: &str) -> Result<Vec<String>> {
    let (mut out, mut cur, mut quote, mut any) = (Vec::new(), String::new(), None, false);
    for c in s.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                any = true;
            }
            (None, c) if c.is_whitespace() => {
                if any || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                any = false;
            }
            (None, c) => cur.push(c),
        }
    }
    if quote.is_some() {
        bail!("--source-args: unclosed quote in {s:?}");
    }
    if any || !cur.is_empty() {
        out.push(cur);
    }
    Ok(out)
}

/// The image's latest `PROGRESS` line in its console log.
fn latest_progress(console: &str) -> Value {
    console
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("PROGRESS "))
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or(Value::Null)
}

/// Runs the migration; returns the JSON line and the image's log. `progress` is called about
/// five times a second.
pub fn migrate(m: &QemuMigration, progress: &mut dyn FnMut(&Progress)) -> Result<(Value, String)> {
    let started = Instant::now();
    let deadline = started + m.timeout;
    let mut shown = Progress { phase: "building the image and the guest".into(), ..Progress::default() };
    progress(&shown);
    let image = build_image()?;
    let builder = source_builder(m)?;
    shown.phase = "starting the vsock daemon and the hypervisor".into();
    progress(&shown);
    let work = tempfile::Builder::new().prefix("qemu-vsock-").tempdir()?;
    let daemon = Daemon::start(work.path())?;
    let mut append = match m.source_args {
        // The dirty guest's heartbeat is the progress counter the image reports.
        None => format!("hold probe={:#x} after-end-ms={}", STATUS_ADDR + 4, m.after_end_ms),
        Some(_) => format!("hold after-end-ms={}", m.after_end_ms),
    };
    if let Some(ms) = m.recover_timeout_ms {
        append += &format!(" recover-timeout-ms={ms}");
    }
    let mut extra = daemon.qemu_args(MACHINE_MIB);
    extra.extend(["-m".into(), format!("{MACHINE_MIB}M")]);
    let mut machine = Machine::start_with(&image, &append, &extra)?;
    machine.wait_ready(deadline)?;
    if !machine.console().contains("on vsock") {
        bail!("the image did not find the virtio-vsock device; its log:\n{}", machine.quit());
    }
    let sink = if m.sink_bytes > 0 {
        shown.phase = format!("raw vsock rate: {} MiB into the image's sink", m.sink_bytes >> 20);
        progress(&shown);
        Some(vsock::sink_rate(daemon.uds(), SINK_PORT, m.sink_bytes, deadline)?)
    } else {
        None
    };
    // One bridge connection per source connection (a postcopy recovery makes more), each
    // recording its stream.
    let dest = Endpoint::Vsock { uds: daemon.uds().to_path_buf(), port: MIGRATION_PORT };
    let mut relays = Relays::new(work.path(), dest, deadline);
    let outcome = match &m.stream_file {
        Some(file) => send_file(file, &relays.start_next()?, &mut machine, deadline, &mut shown, progress),
        None => run_source(m, &builder, &mut relays, &mut machine, deadline, &mut shown, progress),
    };
    let (source_info, heartbeat_at_stop) = match outcome {
        Ok(v) => v,
        Err(e) => {
            let log = machine.quit();
            return Ok((error_line(&e.0, started), log));
        }
    };
    shown.phase = "the guest runs on in the image".into();
    progress(&shown);
    let result = match machine.wait_result(deadline) {
        Ok(r) => r,
        Err(e) => {
            let log = machine.quit();
            return Ok((error_line(&e.0, started), log));
        }
    };
    let streams = relays.streams().to_vec();
    let (mut stream_bytes, mut rp_bytes) = (0, 0);
    // Each relay writes its recording out when it ends.
    for (s, r) in relays.finish(Duration::from_secs(20)).into_iter().map(|r| r.unwrap_or((0, 0))) {
        stream_bytes += s;
        rp_bytes += r;
    }
    // The stream QEMU's own loader reads: the connections put back together (one, unless the
    // migration recovered from breaks).
    let stream = work.path().join("stream.bin");
    std::fs::write(&stream, crate::recovery::rebuild(&streams, &result)?)?;
    let mut line = summary(&result, started, sink.as_ref());
    line["source"] = source_info;
    line["bridge"] = json!({ "stream_bytes": stream_bytes, "return_path_bytes": rp_bytes });
    if result["state"] != "error" && m.stream_file.is_none() {
        shown.phase = "checking RAM against QEMU's own load of the stream".into();
        progress(&shown);
        let check = check_ram(&mut machine, &result, &builder, &stream, m)?;
        line["ram_equal"] = json!(check.equal);
        line["ram_check"] = json!(check.note);
        line["guest_written_pages"] = result["guest_written_pages"].clone();
        if let (Some(at_stop), Some(now)) = (heartbeat_at_stop, result["probe_value"].as_u64()) {
            line["guest_progress"] = json!({
                "heartbeat_at_source_stop": at_stop,
                "heartbeat_at_destination_end": now,
                "advanced": now.wrapping_sub(at_stop) as u32 as u64,
            });
            line["guest_running"] =
                json!(now as u32 != at_stop as u32 && (now as u32).wrapping_sub(at_stop as u32) < 1 << 31);
        }
    }
    let log = machine.quit();
    drop(daemon);
    Ok((line, log))
}

fn source_builder(m: &QemuMigration) -> Result<SourceVmBuilder> {
    let builder = SourceVm::builder(crate::source::Machine::Pc).mem_mib(m.mem_mib);
    Ok(match &m.source_args {
        None => builder.kernel(&build_dirty_guest()?, &m.guest_append),
        Some(args) => args.iter().fold(builder, |b, a| b.arg(a)),
    })
}

/// The source migrates through the bridge: precopy at `max_bandwidth`, then postcopy; returns
/// its final `query-migrate` and the dirty guest's heartbeat when it stopped.
fn run_source(
    m: &QemuMigration,
    builder: &SourceVmBuilder,
    bridge: &mut Relays,
    machine: &mut Machine,
    deadline: Instant,
    shown: &mut Progress,
    progress: &mut dyn FnMut(&Progress),
) -> Result<(Value, Option<u64>)> {
    shown.phase = "starting the source VM".into();
    progress(shown);
    let mut vm = builder.clone().spawn()?;
    match m.source_args {
        None => drop(vm.wait_guest_dirtying(Duration::from_secs(30))?),
        Some(_) => std::thread::sleep(m.boot_wait),
    }
    vm.set_capabilities(&[("postcopy-ram", true)])?;
    vm.set_max_bandwidth(m.max_bandwidth)?;
    vm.set_max_postcopy_bandwidth(m.max_postcopy_bandwidth)?;
    let start = Instant::now();
    vm.migrate(&format!("unix:{}", bridge.start_next()?.display()))?;
    let mut postcopy = false;
    let mut saw_postcopy_active = false;
    let mut breaks_done = 0;
    let mut resumes = Vec::new();
    let info = loop {
        let info = vm.query_migrate()?;
        saw_postcopy_active |= info.status == "postcopy-active";
        shown.phase =
            if postcopy { "postcopy: the guest runs in the image".into() } else { "precopy".into() };
        shown.source_status = info.status.clone();
        shown.image = latest_progress(&machine.console());
        progress(shown);
        match info.status.as_str() {
            "completed" => break info,
            "failed" | "cancelled" => {
                bail!(
                    "source migration {}: {}",
                    info.status,
                    info.error.as_deref().unwrap_or("(no error-desc)")
                )
            }
            _ => {}
        }
        // QEMU takes `migrate-start-postcopy` once the migration is active (not in setup).
        if !postcopy && info.status == "active" && start.elapsed() >= m.precopy_for {
            vm.start_postcopy()?;
            postcopy = true;
        }
        if breaks_done < m.breaks && info.status == "postcopy-active" {
            std::thread::sleep(m.before_break);
            shown.phase =
                format!("postcopy recovery: breaking the connection ({} of {})", breaks_done + 1, m.breaks);
            progress(shown);
            vm.execute("migrate-pause", json!({}))?;
            let paused = Instant::now();
            vm.wait_status(&["postcopy-paused"], Duration::from_secs(30))?;
            if m.no_resume && breaks_done + 1 == m.breaks {
                // The source stays paused; the image gives up after its recover timeout.
                let _ = vm.quit();
                return Ok((
                    json!({ "status": "postcopy-paused", "breaks": breaks_done + 1, "resumed": false }),
                    None,
                ));
            }
            let sock = bridge.start_next()?;
            vm.execute("migrate", json!({ "uri": format!("unix:{}", sock.display()), "resume": true }))?;
            let status = vm.wait_status(&["postcopy-active", "completed"], Duration::from_secs(60))?.status;
            resumes.push(paused.elapsed().as_secs_f64());
            breaks_done += 1;
            if status == "completed" {
                bail!("the migration completed right at the resume: nothing was left to recover");
            }
            continue;
        }
        if machine.ended()? {
            bail!("the image ended while the source was `{}`", info.status);
        }
        if Instant::now() > deadline {
            bail!("the migration did not complete in time: source `{}`", info.status);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let heartbeat = match m.source_args {
        None => Some(u64::from(vm.guest_status()?.heartbeat)),
        Some(_) => None,
    };
    let _ = vm.quit();
    Ok((
        json!({
            "status": info.status, "saw_postcopy_active": saw_postcopy_active,
            "transferred": info.transferred, "postcopy_requests": info.postcopy_requests,
            "seconds": start.elapsed().as_secs_f64(), "breaks": breaks_done,
            "seconds_from_pause_to_postcopy_active_again": resumes,
        }),
        heartbeat,
    ))
}

/// Sends a recorded (or hostile) stream through the bridge, reading and keeping what comes
/// back.
fn send_file(
    file: &std::path::Path,
    bridge: &std::path::Path,
    machine: &mut Machine,
    deadline: Instant,
    shown: &mut Progress,
    progress: &mut dyn FnMut(&Progress),
) -> Result<(Value, Option<u64>)> {
    use std::io::{Read, Write};
    let bytes = std::fs::read(file)?;
    let mut conn = std::os::unix::net::UnixStream::connect(bridge)?;
    let mut reader = conn.try_clone()?;
    let rp = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = reader.read_to_end(&mut out);
        out
    });
    shown.phase = format!("sending {} ({} bytes)", file.display(), bytes.len());
    progress(shown);
    let sent = conn.write_all(&bytes);
    // The image answers (or refuses) and then closes the connection; wait for its report.
    let _ = machine.wait_result(deadline);
    let _ = conn.shutdown(std::net::Shutdown::Both);
    let rp = rp.join().unwrap_or_default();
    let shut = crate::image::last_shut(&rp);
    Ok((
        json!({ "bytes_sent": bytes.len(), "send_error": sent.err().map(|e| e.to_string()), "return_path_bytes": rp.len(), "shut": shut }),
        None,
    ))
}

fn error_line(error: &str, started: Instant) -> Value {
    json!({
        "state": "error", "vendor": "svm", "emulator": "qemu", "transport": "vsock",
        "ram_equal": false, "seconds": started.elapsed().as_secs_f64(), "error": error,
    })
}

/// The JSON line's fields from the image's report.
fn summary(r: &Value, started: Instant, sink: Option<&vsock::SinkRate>) -> Value {
    let mut line = json!({
        "state": r["state"], "vendor": r["vendor"], "emulator": "qemu", "transport": "vsock",
        "guest_kind": r["guest_kind"], "guest_stopped": r["guest_stopped"],
        "stage2_faults": r["stage2_faults"], "faults_served": r["faults_served"],
        "page_requests": r["page_requests"], "pages_received": r["pages_received"],
        "discarded_pages": r["discarded_pages"], "stream_bytes": r["stream_bytes"], "ram_equal": false,
        "fault_exit_to_request_cycles_p50": r["fault_exit_to_request_cycles_p50"],
        "fault_exit_to_request_cycles_p99": r["fault_exit_to_request_cycles_p99"],
        "page_to_resume_cycles_p50": r["page_to_resume_cycles_p50"],
        "page_to_resume_cycles_p99": r["page_to_resume_cycles_p99"],
        "postcopy_faults": r["postcopy_faults"],
        "postcopy_latency_ns": r["postcopy_latency_ns"],
        "postcopy_vcpu_blocktime_ns": r["postcopy_vcpu_blocktime_ns"],
        "postcopy_vcpu_latency_ns": r["postcopy_vcpu_latency_ns"],
        "postcopy_latency_dist_ns": r["postcopy_latency_dist_ns"],
        "stream_mb_per_s": r["stream_mb_per_s"],
        "breaks": r["breaks"],
        "resent_requests": r["resent_requests"],
        "postcopy_stream_bytes": r["postcopy_stream_bytes"],
        "postcopy_mb_per_s": r["postcopy_mb_per_s"],
        "sink_mb_per_s_image": r["sink"]["mb_per_s"],
        "seconds": started.elapsed().as_secs_f64(),
    });
    if let Some(s) = sink {
        line["sink"] = json!({ "bytes": s.bytes, "seconds": s.seconds, "mb_per_s": s.mb_per_s });
    }
    if r["state"] == "error" {
        line["error"] = r["error"].clone();
    }
    line
}

/// The host-physical frames the guest wrote since RUN: the image's bitmap (`guest_written_frames`,
/// little-endian u64 words in hex, bit i = the frame at `frames_base + 4096 i`).
fn written_frames(r: &Value) -> Result<std::collections::BTreeSet<u64>> {
    let (Some(hex), Some(base)) = (r["guest_written_frames"].as_str(), r["frames_base"].as_u64()) else {
        bail!("the image's report has no guest_written_frames");
    };
    let mut frames = std::collections::BTreeSet::new();
    for (i, chunk) in hex.as_bytes().chunks(16).enumerate() {
        let word = std::str::from_utf8(chunk).ok().and_then(|c| u64::from_str_radix(c, 16).ok());
        let Some(word) = word else { bail!("malformed guest_written_frames at word {i}") };
        for bit in 0..64 {
            if word >> bit & 1 != 0 {
                frames.insert(base + (i as u64 * 64 + bit) * 4096);
            }
        }
    }
    if r["guest_written_pages"].as_u64() != Some(frames.len() as u64) {
        bail!("guest_written_pages {} but {} bits set", r["guest_written_pages"], frames.len());
    }
    Ok(frames)
}

/// The RAM verdict.
struct RamCheck {
    equal: bool,
    note: String,
}

/// Every block the image holds against QEMU's own load of the recorded stream, the pages the
/// guest wrote since RUN (the frames the report names) left out.
fn check_ram(
    machine: &mut Machine,
    r: &Value,
    builder: &SourceVmBuilder,
    stream: &std::path::Path,
    m: &QemuMigration,
) -> Result<RamCheck> {
    let written = written_frames(r)?;
    let reference = qemu_load_blocks(builder, stream, Duration::from_secs(120))?;
    let blocks = r["blocks"].as_array().cloned().unwrap_or_default();
    let (mut compared, mut skipped, mut differ) = (0u64, 0u64, Vec::new());
    for b in &blocks {
        let (Some(name), Some(hpa), Some(len)) = (b["name"].as_str(), b["hpa"].as_u64(), b["len"].as_u64())
        else {
            bail!("malformed block in the image's report: {b}");
        };
        let got = machine.read_phys(hpa, len)?;
        if let Some(dir) = &m.dump_dir {
            std::fs::create_dir_all(dir)?;
            std::fs::write(dir.join(crate::scenario::dump_file_name(name)), &got)?;
        }
        let Some(want) = reference.get(name) else {
            differ.push(format!("{name}: not in QEMU's load"));
            continue;
        };
        for (page, (g, w)) in got.chunks(4096).zip(want.chunks(4096)).enumerate() {
            let offset = page as u64 * 4096;
            if written.contains(&(hpa + offset)) {
                skipped += 1;
                continue;
            }
            compared += 1;
            if g != w {
                differ.push(format!("{name}+{offset:#x}"));
            }
        }
        if got.len() != want.len() {
            differ.push(format!("{name}: {} bytes here, {} in QEMU's load", got.len(), want.len()));
        }
    }
    let equal = differ.is_empty() && !blocks.is_empty();
    let note = if equal {
        format!(
            "{compared} pages of {} blocks equal QEMU 7.2's own load of the stream; {skipped} pages the guest wrote since RUN not compared",
            blocks.len()
        )
    } else {
        format!("{} pages differ, first {:?}", differ.len(), &differ[..differ.len().min(8)])
    };
    Ok(RamCheck { equal, note })
}

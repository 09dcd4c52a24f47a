//! `migrate`: one postcopy migration into the hypervisor image (`cargo xtask migrate`).
//!
//! ```text
//! migrate [--emulator qemu|bochs [--cpu corei7_skylake_x|ryzen]] [--source own|file:PATH]
//!         [--transport serial] [--mem-mib N] [--dump-dir DIR] [--log FILE] [--timeout-s N]
//!         [--background-pause-ms N (5)]
//! migrate --source qemu --transport vsock [--source-args "QEMU ARGS"] [--mem-mib N (64)]
//!         [--guest ARGS ("rate=16384 fill")] [--sink-mib N (32)] [--after-end-ms N (500)]
//!         [--precopy-ms N (500)] [--max-bandwidth BYTES/S (16 MiB/s, precopy)]
//!         [--max-postcopy-bandwidth BYTES/S (0: unlimited)]
//!         [--boot-wait-ms N (3000, with --source-args)] [--breaks N (0)] [--before-break-ms N]
//!         [--recover-timeout-ms N (the image waits for ever after a break)]
//!         [--dump-dir DIR] [--log FILE]
//!         [--timeout-s N]
//! migrate --source file:PATH --transport vsock     (a recorded or hostile stream over vsock)
//! ```
//!
//! With `--source qemu`, a real QEMU 7.2 VM (TCG, pc; the dirty guest unless `--source-args`
//! replaces the guest part of its command line) migrates postcopy through the vsock bridge
//! into the image and goes on running there; the JSON line adds `guest_kind`,
//! `guest_progress`/`guest_running` (the dirty guest's heartbeat, at the source's stop and
//! in the image at the end), `guest_written_pages`, the fault latency (`postcopy_latency_ns`,
//! `postcopy_vcpu_blocktime_ns`, `postcopy_latency_dist_ns`: power-of-two ns buckets),
//! `stream_mb_per_s` and `sink` (the device's raw rate in the same run). Exit 0 when the
//! migration completed and `ram_equal`.
//!
//! The last stdout line is a JSON object: `state`, `vendor`, `emulator`, `transport`,
//! `stage2_faults`, `faults_served`, `page_requests`, `pages_received`, `discarded_pages`,
//! `guest_ok`, `ram_equal`, `fault_exit_to_request_cycles_p50` (and p99),
//! `page_to_resume_cycles_p50` (and p99), `seconds`, `error` when the stream was refused, and
//! the source's own report. Exit 0 only when the migration completed, the guest's result is
//! right and the RAM check passed. The image's log goes to `--log FILE` (default
//! `<target>/migrate-logs/<unix time>.log`).

use std::path::PathBuf;
use std::time::Duration;

use qemu_tests::image::{migrate, Emulator, Migration, SourceKind};
use qemu_tests::{bail, Result};

use crate::Flags;

pub(crate) fn run(args: &[String]) -> Result<()> {
    let flags = Flags::new(
        args,
        &[
            "--emulator",
            "--cpu",
            "--source",
            "--transport",
            "--mem-mib",
            "--dump-dir",
            "--log",
            "--timeout-s",
            "--background-pause-ms",
            "--source-args",
            "--guest",
            "--sink-mib",
            "--after-end-ms",
            "--precopy-ms",
            "--max-postcopy-bandwidth",
            "--boot-wait-ms",
            "--max-bandwidth",
            "--breaks",
            "--before-break-ms",
            "--recover-timeout-ms",
        ],
        &[],
    )?;
    let vsock = match flags.get("--transport").unwrap_or("serial") {
        "serial" => false,
        "vsock" => true,
        other => bail!("--transport {other}: serial or vsock"),
    };
    if vsock || flags.get("--source") == Some("qemu") {
        return run_vsock(&flags);
    }
    let emulator = match (flags.get("--emulator").unwrap_or("qemu"), flags.get("--cpu")) {
        ("qemu", None) => Emulator::Qemu,
        ("bochs", cpu) => Emulator::Bochs(cpu.unwrap_or(qemu_tests::bochs::INTEL_VMX).to_string()),
        ("qemu", Some(_)) => bail!("--cpu is for Bochs (QEMU runs -cpu max)"),
        (other, _) => bail!("--emulator {other}: qemu or bochs"),
    };
    let source = match flags.get("--source").unwrap_or("own") {
        "own" => SourceKind::Own,
        s => match s.strip_prefix("file:") {
            Some(path) => SourceKind::File(path.into()),
            None => bail!("--source {s}: own or file:PATH"),
        },
    };
    let num = |flag: &str, default: u64| -> Result<u64> {
        match flags.get(flag) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| qemu_tests::Error(format!("bad {flag} {v:?}"))),
        }
    };
    let m = Migration {
        emulator,
        source,
        mem_mib: num("--mem-mib", 2)?,
        dump_dir: flags.get("--dump-dir").map(PathBuf::from),
        timeout: Duration::from_secs(num("--timeout-s", 180)?),
        background_pause: Duration::from_millis(num("--background-pause-ms", 5)?),
    };
    let (line, log) = migrate(&m)?;
    write_log(&flags, &log)?;
    println!("{line}");
    let ok = line["state"] == "END" && line["guest_ok"] == true && line["ram_equal"] == true;
    if ok {
        Ok(())
    } else {
        bail!(
            "the migration did not pass: state {}, guest_ok {}, ram_equal {}",
            line["state"],
            line["guest_ok"],
            line["ram_equal"]
        )
    }
}

/// `--transport vsock`: a QEMU source (or a stream file) over virtio-vsock.
fn run_vsock(flags: &Flags) -> Result<()> {
    use qemu_tests::image_qemu::migrate;
    if flags.get("--emulator").is_some_and(|e| e != "qemu") {
        bail!("--transport vsock runs under QEMU (Bochs has no virtio)");
    }
    if flags.get("--transport") != Some("vsock") {
        bail!("--source qemu needs --transport vsock");
    }
    let m = vsock_options(flags)?;
    let (line, log) = migrate(&m, &mut |_| {})?;
    write_log(flags, &log)?;
    println!("{line}");
    if line["state"] == "END" && (m.stream_file.is_some() || line["ram_equal"] == true) {
        Ok(())
    } else if line["state"] == "ADVISE" {
        bail!(
            "the migration completed in precopy, before postcopy started: lower --max-bandwidth \
             (bytes/s during precopy) or --precopy-ms; ram_equal {}",
            line["ram_equal"]
        )
    } else {
        bail!("the migration did not pass: state {}, ram_equal {}", line["state"], line["ram_equal"])
    }
}

/// The options of a QEMU VM over vsock (`migrate --transport vsock` and `demo`), defaults from
/// [`QemuMigration::default`].
pub(crate) fn vsock_options(flags: &Flags) -> Result<qemu_tests::image_qemu::QemuMigration> {
    use qemu_tests::image_qemu::{split_args, QemuMigration};
    let num = |flag: &str, default: u64| -> Result<u64> {
        match flags.get(flag) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| qemu_tests::Error(format!("bad {flag} {v:?}"))),
        }
    };
    let d = QemuMigration::default();
    let stream_file = match flags.get("--source").unwrap_or("qemu") {
        "qemu" => None,
        s => match s.strip_prefix("file:") {
            Some(path) => Some(PathBuf::from(path)),
            None => bail!("--source {s}: qemu or file:PATH with --transport vsock"),
        },
    };
    let ms = |flag: &str, default: Duration| num(flag, default.as_millis() as u64).map(Duration::from_millis);
    Ok(QemuMigration {
        mem_mib: num("--mem-mib", d.mem_mib)?,
        source_args: flags.get("--source-args").map(split_args).transpose()?,
        guest_append: flags.get("--guest").map_or(d.guest_append.clone(), str::to_string),
        sink_bytes: num("--sink-mib", d.sink_bytes >> 20)? << 20,
        after_end_ms: num("--after-end-ms", d.after_end_ms)?,
        precopy_for: ms("--precopy-ms", d.precopy_for)?,
        dump_dir: flags.get("--dump-dir").map(PathBuf::from),
        timeout: Duration::from_secs(num("--timeout-s", d.timeout.as_secs())?),
        max_postcopy_bandwidth: num("--max-postcopy-bandwidth", d.max_postcopy_bandwidth)?,
        boot_wait: ms("--boot-wait-ms", d.boot_wait)?,
        max_bandwidth: num("--max-bandwidth", d.max_bandwidth)?,
        stream_file,
        breaks: num("--breaks", 0)? as usize,
        before_break: ms("--before-break-ms", d.before_break)?,
        no_resume: false,
        recover_timeout_ms: flags
            .get("--recover-timeout-ms")
            .map(|_| num("--recover-timeout-ms", 0))
            .transpose()?,
    })
}

fn write_log(flags: &Flags, log: &str) -> Result<()> {
    let log_path = match flags.get("--log") {
        Some(p) => PathBuf::from(p),
        None => {
            let dir = qemu_tests::target_dir().join("migrate-logs");
            std::fs::create_dir_all(&dir)?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            dir.join(format!("{now}.log"))
        }
    };
    std::fs::write(&log_path, log)?;
    eprintln!("image log: {}", log_path.display());
    Ok(())
}

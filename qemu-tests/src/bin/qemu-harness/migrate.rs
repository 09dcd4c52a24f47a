//! `migrate`: one postcopy migration into the hypervisor image (`cargo xtask migrate`).
//!
//! ```text
//! migrate [--emulator qemu|bochs [--cpu corei7_skylake_x|ryzen]] [--source own|file:PATH]
//!         [--transport serial] [--mem-mib N] [--dump-dir DIR] [--log FILE] [--timeout-s N]
//!         [--background-pause-ms N (5)]
//! ```
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
        ],
        &[],
    )?;
    let emulator = match (flags.get("--emulator").unwrap_or("qemu"), flags.get("--cpu")) {
        ("qemu", None) => Emulator::Qemu,
        ("bochs", cpu) => Emulator::Bochs(cpu.unwrap_or(qemu_tests::bochs::INTEL_VMX).to_string()),
        ("qemu", Some(_)) => bail!("--cpu is for Bochs (QEMU runs -cpu max)"),
        (other, _) => bail!("--emulator {other}: qemu or bochs"),
    };
    match flags.get("--transport").unwrap_or("serial") {
        "serial" => {}
        other => bail!("--transport {other}: only serial (virtio-vsock is not built yet)"),
    }
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
    std::fs::write(&log_path, &log)?;
    eprintln!("image log: {}", log_path.display());
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

//! `demo` (the default): the project's main path with its defaults. A QEMU 7.2 VM (TCG, pc,
//! 64 MiB, the dirty guest) migrates postcopy through the vsock bridge into the hypervisor
//! image (QEMU, `vhost-user-vsock-pci` with the `vhost-device-vsock` daemon) and goes on
//! running there. Live progress with indicatif (pages received, discarded, requested, faults
//! served), then a human summary and the JSON line of `migrate --source qemu --transport
//! vsock`.
//!
//! Flags: `--mem-mib N` (64), `--guest ARGS` (`rate=16384 fill`), `--source-args "QEMU ARGS"`,
//! `--sink-mib N` (32), `--after-end-ms N` (500), `--precopy-ms N` (500),
//! `--max-postcopy-bandwidth BYTES/S` (0: unlimited), `--max-bandwidth BYTES/S`,
//! `--boot-wait-ms N`, `--dump-dir DIR`, `--timeout-s N` (those of `migrate --source qemu
//! --transport vsock`). QEMU's rate limiter works in 100 ms
//! windows, so a limited postcopy shows its windows in the fault latency, not ours.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use qemu_tests::image_qemu::{migrate, Progress};
use qemu_tests::{bail, Result};
use serde_json::Value;

use crate::Flags;

pub(crate) fn run(args: &[String]) -> Result<()> {
    let flags = Flags::new(
        args,
        &[
            "--mem-mib",
            "--guest",
            "--source-args",
            "--sink-mib",
            "--after-end-ms",
            "--precopy-ms",
            "--max-postcopy-bandwidth",
            "--max-bandwidth",
            "--boot-wait-ms",
            "--dump-dir",
            "--timeout-s",
        ],
        &[],
    )?;
    let m = crate::migrate::vsock_options(&flags)?;
    println!(
        "demo: a QEMU 7.2 VM (pc, {} MiB, {}) migrates postcopy over virtio-vsock into the hypervisor \
         image, under QEMU ({}), and keeps running there",
        m.mem_mib,
        match &m.source_args {
            Some(a) => format!("guest `{}`", a.join(" ")),
            None => format!("dirty guest `{}`", m.guest_append),
        },
        qemu_tests::image::accel_description(),
    );
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}").expect("template"));
    bar.enable_steady_tick(Duration::from_millis(120));
    let mut show = |p: &Progress| bar.set_message(progress_line(p));
    let outcome = migrate(&m, &mut show);
    bar.finish_and_clear();
    let (line, log) = outcome?;
    let log_path = qemu_tests::target_dir().join("demo-image.log");
    std::fs::write(&log_path, log)?;
    print_summary(&line);
    println!("image log: {}", log_path.display());
    println!("{line}");
    if line["state"] == "END" && line["ram_equal"] == true {
        Ok(())
    } else {
        bail!("the demo migration did not pass: state {}, ram_equal {}", line["state"], line["ram_equal"])
    }
}

fn progress_line(p: &Progress) -> String {
    let i = &p.image;
    let n = |k: &str| i[k].as_u64().unwrap_or(0);
    if i.is_null() {
        return format!(
            "{} (source {})",
            p.phase,
            if p.source_status.is_empty() { "-" } else { &p.source_status }
        );
    }
    format!(
        "{} | source {} | image {}: {} pages received, {} discarded, {} requested, {} faults served",
        p.phase,
        p.source_status,
        i["state"].as_str().unwrap_or("?"),
        n("pages_received"),
        n("discarded_pages"),
        n("page_requests"),
        n("faults_served"),
    )
}

fn print_summary(l: &Value) {
    let u = |k: &str| l[k].as_u64().unwrap_or(0);
    println!("--- summary ---");
    println!(
        "migration: {} in {:.1} s; source {}; {} stream bytes at {:.1} MB/s into the image",
        l["state"].as_str().unwrap_or("?"),
        l["seconds"].as_f64().unwrap_or(0.0),
        l["source"]["status"].as_str().unwrap_or("?"),
        u("stream_bytes"),
        l["stream_mb_per_s"].as_f64().unwrap_or(0.0),
    );
    if l["sink"].is_object() {
        println!(
            "virtio-vsock raw rate (same run, bytes only counted): {:.1} MB/s ({} MiB in {:.2} s)",
            l["sink"]["mb_per_s"].as_f64().unwrap_or(0.0),
            l["sink"]["bytes"].as_u64().unwrap_or(0) >> 20,
            l["sink"]["seconds"].as_f64().unwrap_or(0.0),
        );
    }
    println!(
        "pages: {} received, {} discarded; {} page requests; {} stage-2 faults ({} served)",
        u("pages_received"),
        u("discarded_pages"),
        u("page_requests"),
        u("stage2_faults"),
        u("faults_served"),
    );
    println!(
        "fault latency ({} faults that waited for the network): mean {} ns, vCPU 0 blocked {} ns in all",
        u("postcopy_faults"),
        u("postcopy_latency_ns"),
        l["postcopy_vcpu_blocktime_ns"][0].as_u64().unwrap_or(0),
    );
    if let Some(dist) = l["postcopy_latency_dist_ns"].as_array() {
        for (i, c) in dist.iter().enumerate() {
            let c = c.as_u64().unwrap_or(0);
            if c > 0 {
                println!("  [{:>12} ns, {:>12} ns): {c}", 1u64 << i, 1u64 << (i + 1));
            }
        }
    }
    match (&l["guest_progress"], &l["guest_stopped"]) {
        (p, _) if p.is_object() => println!(
            "guest: heartbeat {} when the source stopped it, {} in the image at the end: {}",
            p["heartbeat_at_source_stop"],
            p["heartbeat_at_destination_end"],
            if l["guest_running"] == true { "it kept running" } else { "it did NOT run on" }
        ),
        (_, s) if s.is_string() => println!("guest stopped: {}", s.as_str().unwrap_or("")),
        _ => {}
    }
    println!(
        "RAM: {} ({})",
        if l["ram_equal"] == true { "equal" } else { "NOT equal" },
        l["ram_check"].as_str().unwrap_or("")
    );
}

//! `soak`: the same real-QEMU postcopy migration into `postcopy-dest` many times in a row,
//! cycling through table formats, vCPU counts, memory sizes and precopy bandwidths, because
//! races at the end of a migration show up in one run of several. Every run must pass the
//! full check (source `completed`, destination END, every RAMBlock equal to QEMU's load of
//! the same stream); each run prints one line, failures included, and the summary counts
//! them per table format.
//!
//! `soak --image [--runs 20] [--mem-mib 2,4,6] [--background-pause-ms 0,5]` does the same for
//! the hypervisor image under QEMU TCG (the project's source, `cargo xtask migrate`'s check).
//!
//! `soak --vsock [--runs 12] [--mem-mib 16,32,64] [--postcopy-bandwidth 0,4M,16M]
//! [--guest "rate=1024 fill"]` does it for the main path: a real QEMU 7.2 VM over virtio-vsock
//! into the image (`migrate --source qemu --transport vsock`'s check: source `completed`,
//! image END, the guest ran on, `ram_equal`); `--breaks N` adds N postcopy recoveries to each
//! run.
//!
//! `soak --recovery [--runs 10] [--breaks 1,2] [--dest PATH]`: postcopy recovery into
//! `postcopy-dest` against real QEMU 7.2 (`qemu_tests::recovery`: `migrate-pause`, then
//! `migrate resume=true`; source `completed`, END, RAM equal to QEMU's load of the rebuilt
//! stream); each line gives the pages missing at each break and the time to resume.
//!
//! Flags: `--runs 20`, `--stage2 ept,npt`, `--vcpus 4`, `--mem 112M`, `--max-bandwidth 12M`
//! (bytes/s during precopy; postcopy is unlimited), `--precopy-for 2000` (ms), `--machine pc`,
//! `--guest "rate=4096 fill"` (RAM filled first, so 2 s of precopy cannot finish it),
//! `--guest-writes`, `--dest PATH`. Lists (`ept,npt`, `2,4`,
//! `64M,112M`) are combined: run by run every combination comes up, the table format changing
//! fastest.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use qemu_tests::scenario::{run as run_scenario, Scenario};
use qemu_tests::source::Machine;
use qemu_tests::{bail, Result};

use crate::{parse_mib, Flags};

fn list<T>(flags: &Flags, flag: &str, default: &str, parse: impl Fn(&str) -> Result<T>) -> Result<Vec<T>> {
    flags.get(flag).unwrap_or(default).split(',').map(parse).collect()
}

fn bytes_per_s(s: &str) -> Result<u64> {
    match s.strip_suffix(['M', 'm']) {
        Some(m) => {
            m.parse::<u64>().map(|m| m << 20).map_err(|_| qemu_tests::Error(format!("bad bandwidth {s}")))
        }
        None => s.parse().map_err(|_| qemu_tests::Error(format!("bad bandwidth {s}"))),
    }
}

pub(crate) fn run(args: &[String]) -> Result<()> {
    if args.first().map(String::as_str) == Some("--image") {
        return image_runs(&args[1..]);
    }
    if args.first().map(String::as_str) == Some("--vsock") {
        return vsock_runs(&args[1..]);
    }
    if args.first().map(String::as_str) == Some("--recovery") {
        return recovery_runs(&args[1..]);
    }
    let flags = Flags::new(
        args,
        &[
            "--runs",
            "--stage2",
            "--vcpus",
            "--mem",
            "--max-bandwidth",
            "--precopy-for",
            "--machine",
            "--guest",
            "--dest",
        ],
        &["--guest-writes"],
    )?;
    let runs: usize =
        flags.get("--runs").unwrap_or("20").parse().map_err(|_| qemu_tests::Error("bad --runs".into()))?;
    let formats = list(&flags, "--stage2", "ept,npt", |s| match s {
        "ept" | "npt" => Ok(s.to_string()),
        _ => bail!("--stage2 {s}: ept or npt"),
    })?;
    let vcpus = list(&flags, "--vcpus", "4", |s| {
        s.parse::<usize>().map_err(|_| qemu_tests::Error(format!("bad --vcpus {s}")))
    })?;
    let mems = list(&flags, "--mem", "112M", parse_mib)?;
    let bandwidths = list(&flags, "--max-bandwidth", "12M", bytes_per_s)?;
    let precopy_ms: u64 = flags
        .get("--precopy-for")
        .unwrap_or("2000")
        .parse()
        .map_err(|_| qemu_tests::Error("bad --precopy-for".into()))?;
    let machine = Machine::parse(flags.get("--machine").unwrap_or("pc"))?;
    let dest = match flags.get("--dest") {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe()?.with_file_name("postcopy-dest"),
    };
    if !dest.exists() {
        bail!("{} not found: build it with `cargo build --release -p qemu-tests --bins`", dest.display());
    }
    let mut failed = Vec::new();
    let mut per_format: Vec<(String, usize, usize)> = formats.iter().map(|f| (f.clone(), 0, 0)).collect();
    for i in 0..runs {
        // Mixed radix: every combination of the lists comes up, the table format fastest.
        let (f, v, m, b) = (formats.len(), vcpus.len(), mems.len(), bandwidths.len());
        let (format, cpus) = (&formats[i % f], vcpus[i / f % v]);
        let (mem, bandwidth) = (mems[i / (f * v) % m], bandwidths[i / (f * v * m) % b]);
        let mut sc = Scenario::postcopy(machine);
        sc.stage2 = Some(format.clone());
        sc.vcpus = Some(cpus);
        sc.mem_mib = mem;
        sc.max_bandwidth = Some(bandwidth);
        sc.max_postcopy_bandwidth = Some(0);
        sc.precopy_for = Duration::from_millis(precopy_ms);
        sc.guest_append = flags.get("--guest").unwrap_or("rate=4096 fill").to_string();
        sc.guest_writes = flags.has("--guest-writes");
        sc.timeout = Duration::from_secs(180);
        let what = format!(
            "{} {mem} MiB, {cpus} vCPUs, {format}, precopy {} MiB/s for {precopy_ms} ms",
            machine.as_str(),
            bandwidth >> 20
        );
        let start = Instant::now();
        let verdict = run_scenario(&dest, &sc).and_then(|out| {
            let s = &out.summary;
            match (&out.ram_diff, out.saw_postcopy_active, s.state.as_str()) {
                (Some(d), _, _) => bail!("RAM differs: {d}"),
                (None, false, _) => bail!("the source never entered postcopy"),
                (None, true, "END") => Ok(format!(
                    "{} requests, {} faults, {} discarded, {} blocks equal",
                    s.page_requests, s.faults, s.discarded_pages, out.blocks_compared
                )),
                (None, true, state) => bail!("destination state {state}"),
            }
        });
        let slot = &mut per_format[i % f];
        slot.2 += 1;
        match verdict {
            Ok(line) => {
                slot.1 += 1;
                println!(
                    "run {:>2}/{runs} ok   {:5.1} s  {what}: {line}",
                    i + 1,
                    start.elapsed().as_secs_f64()
                );
            }
            Err(e) => {
                println!("run {:>2}/{runs} FAIL {:5.1} s  {what}: {e}", i + 1, start.elapsed().as_secs_f64());
                failed.push(i + 1);
            }
        }
    }
    let counts: Vec<String> = per_format.iter().map(|(f, ok, n)| format!("{f} {ok}/{n}")).collect();
    println!("soak: {}/{runs} passed ({})", runs - failed.len(), counts.join(", "));
    if failed.is_empty() {
        Ok(())
    } else {
        bail!("runs {failed:?} failed")
    }
}

/// The image's migration, many times: every combination of guest RAM size and background
/// pause in turn; each run must end with `state` END, `guest_ok` and `ram_equal`.
fn image_runs(args: &[String]) -> Result<()> {
    use qemu_tests::image::{migrate, Migration};
    let flags = Flags::new(args, &["--runs", "--mem-mib", "--background-pause-ms"], &[])?;
    let runs = runs(&flags, 20)?;
    let number = |s: &str| s.parse::<u64>().map_err(|_| qemu_tests::Error(format!("bad number {s}")));
    let mems = list(&flags, "--mem-mib", "2,4,6", number)?;
    let pauses = list(&flags, "--background-pause-ms", "0,5", number)?;
    repeat("soak --image", runs, |i| {
        let (mem, pause) = (mems[i % mems.len()], pauses[i / mems.len() % pauses.len()]);
        let m = Migration {
            mem_mib: mem,
            background_pause: Duration::from_millis(pause),
            ..Migration::default()
        };
        let what = format!("{mem} MiB, background pause {pause} ms");
        let verdict = migrate(&m).and_then(|(line, _log)| {
            if line["state"] == "END" && line["guest_ok"] == true && line["ram_equal"] == true {
                Ok(format!(
                    "{} #NPF exits served, {} requests ({} served first), exit→request p50 {} cycles, page→resume p50 {}",
                    line["faults_served"], line["page_requests"], line["source"]["requested_pages"],
                    line["fault_exit_to_request_cycles_p50"], line["page_to_resume_cycles_p50"]
                ))
            } else {
                bail!("{line}")
            }
        });
        (what, verdict)
    })
}

/// `--runs N` (default `default`).
fn runs(flags: &Flags, default: usize) -> Result<usize> {
    match flags.get("--runs") {
        None => Ok(default),
        Some(v) => v.parse().map_err(|_| qemu_tests::Error("bad --runs".into())),
    }
}

/// Runs `one(i)` for i in 0..runs, one line each (what it was, and its verdict), then the
/// count; an error if any run failed.
fn repeat(name: &str, runs: usize, mut one: impl FnMut(usize) -> (String, Result<String>)) -> Result<()> {
    let mut failed = Vec::new();
    for i in 0..runs {
        let start = Instant::now();
        let (what, verdict) = one(i);
        let secs = start.elapsed().as_secs_f64();
        match verdict {
            Ok(l) => println!("run {:>2}/{runs} ok   {secs:5.1} s  {what}: {l}", i + 1),
            Err(e) => {
                println!("run {:>2}/{runs} FAIL {secs:5.1} s  {what}: {e}", i + 1);
                failed.push(i + 1);
            }
        }
    }
    println!("{name}: {}/{runs} passed", runs - failed.len());
    if failed.is_empty() {
        Ok(())
    } else {
        bail!("runs {failed:?} failed")
    }
}

fn vsock_runs(args: &[String]) -> Result<()> {
    use qemu_tests::image_qemu::{migrate, QemuMigration};
    let flags =
        Flags::new(args, &["--runs", "--mem-mib", "--postcopy-bandwidth", "--guest", "--breaks"], &[])?;
    let runs = runs(&flags, 12)?;
    let breaks: usize =
        flags.get("--breaks").unwrap_or("0").parse().map_err(|_| qemu_tests::Error("bad --breaks".into()))?;
    let number = |s: &str| s.parse::<u64>().map_err(|_| qemu_tests::Error(format!("bad number {s}")));
    let mems = list(&flags, "--mem-mib", "16,32,64", number)?;
    let bandwidths = list(&flags, "--postcopy-bandwidth", "0,4M,16M", bytes_per_s)?;
    repeat("soak --vsock", runs, |i| {
        let (mem, bw) = (mems[i % mems.len()], bandwidths[i / mems.len() % bandwidths.len()]);
        let mut m = QemuMigration {
            mem_mib: mem,
            max_postcopy_bandwidth: bw,
            sink_bytes: 0,
            breaks,
            ..QemuMigration::default()
        };
        if let Some(g) = flags.get("--guest") {
            m.guest_append = g.to_string();
        }
        let bw_text = if bw == 0 { "unlimited".into() } else { format!("{} MiB/s", bw >> 20) };
        let what = format!("{mem} MiB, postcopy bandwidth {bw_text}");
        let verdict = migrate(&m, &mut |_| {}).and_then(|(line, _log)| {
            if line["state"] == "END" && line["ram_equal"] == true && line["guest_running"] == true {
                Ok(format!(
                    "{} faults, {} requests, latency mean {} ns, postcopy {} MB/s, guest +{} heartbeats, breaks {}",
                    line["postcopy_faults"],
                    line["page_requests"],
                    line["postcopy_latency_ns"],
                    line["postcopy_mb_per_s"],
                    line["guest_progress"]["advanced"],
                    line["breaks"]
                ))
            } else {
                bail!("{line}")
            }
        });
        (what, verdict)
    })
}

fn recovery_runs(args: &[String]) -> Result<()> {
    use qemu_tests::recovery::{run, Recovery};
    let flags = Flags::new(args, &["--runs", "--breaks", "--dest"], &[])?;
    let runs = runs(&flags, 10)?;
    let number = |s: &str| s.parse::<usize>().map_err(|_| qemu_tests::Error(format!("bad number {s}")));
    let breaks = list(&flags, "--breaks", "1,2", number)?;
    let dest = match flags.get("--dest") {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe()?.with_file_name("postcopy-dest"),
    };
    repeat("soak --recovery", runs, |i| {
        let n = breaks[i % breaks.len()];
        let verdict = run(&dest, &Recovery { breaks: n, ..Recovery::default() }).and_then(|out| {
            if out.source_status == "completed" && out.summary["state"] == "END" && out.ram_diff.is_none() {
                let missing: Vec<u64> = out.summary["breaks"]
                    .as_array()
                    .map(|b| b.iter().filter_map(|b| b["missing_pages"].as_u64()).collect())
                    .unwrap_or_default();
                Ok(format!(
                    "pages missing at each break {missing:?}, pause to postcopy-active again {:.3?} s, {} requests resent",
                    out.resume_seconds, out.summary["resent_requests"]
                ))
            } else {
                bail!("{} {}: {:?}", out.source_status, out.summary, out.ram_diff)
            }
        });
        (format!("{n} break(s)"), verdict)
    })
}

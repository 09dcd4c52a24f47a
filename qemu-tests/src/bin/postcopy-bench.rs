//! `postcopy-bench`: our postcopy mechanisms next to QEMU's, measured in one run on this
//! machine, printed as markdown tables (`cargo xtask bench` runs it; docs/perf.md holds a
//! copy of the output).
//!
//! ```text
//! postcopy-bench [--capture FILE] [--machine-args "ARGS"] [--skip-qemu]
//! postcopy-bench fault-loops     # the fault paths alone, for callgrind's instruction count
//! ```

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use hal::stage2::{Ept, Npt};
use qemu_tests::baseline::{madvise, qemu_load, stats::Summary, uffd};
use qemu_tests::bench::discard::{self, Mapping};
use qemu_tests::bench::{fault, ingest, ns, us};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("fault-loops") {
        let (waits, pages) = fault::run_loops();
        println!("waits {waits} pages {pages}");
        return;
    }
    let mut capture = None;
    let mut machine_args: Option<Vec<String>> = None;
    let mut skip_qemu = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--capture" => capture = it.next().map(PathBuf::from),
            "--machine-args" => {
                machine_args = it.next().map(|s| s.split_whitespace().map(String::from).collect())
            }
            "--skip-qemu" => skip_qemu = true,
            other => {
                eprintln!("postcopy-bench: unknown argument {other}");
                std::process::exit(2);
            }
        }
    }
    println!("# postcopy-bench ({} cores)\n", std::thread::available_parallelism().map_or(0, |n| n.get()));
    fault_table();
    discard_table();
    if let Some(capture) = capture {
        ingest_table(&capture, machine_args.as_deref(), skip_qemu);
    } else {
        println!("(ingest skipped: no --capture)\n");
    }
    println!("## Discard encoding: v5 semi-sparse bitmap vs 7.2 ranges, real QEMU 7.2 dirty sets\n");
    if let Err(e) = qemu_tests::discard_study::print_table() {
        println!("(encoding table failed: {e})");
    }
}

fn fault_table() {
    let samples = fault::measure();
    assert_eq!(samples.requests, fault::PAGES, "one request per first touch");
    assert_eq!(samples.releases, fault::PAGES, "one release per parked vCPU");
    let report = Summary::of(&samples.report_to_request);
    let arrival = Summary::of(&samples.arrival_to_release);
    let (report_ir, arrival_ir) = instructions_per_fault();
    let uffd = uffd::measure(4000, 64).expect("userfaultfd round trips");
    let round = Summary::of(&uffd.samples);
    let same_cpu = uffd::measure_with(&uffd::Config {
        placement: uffd::Placement::SameCpu(0),
        ..uffd::Config::new(4000)
    })
    .ok()
    .map(|r| Summary::of(&r.samples));
    println!(
        "## Fault service ({} faults on distinct pages, {} vCPUs in turn)\n",
        fault::PAGES,
        fault::VCPUS
    );
    println!("| path | p50 | p99 | mean | instructions |");
    println!("|---|---|---|---|---|");
    let ir = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.0}"));
    println!(
        "| ours: fault report → request bytes emitted | {} | {} | {} | {} |",
        ns(report.p50),
        ns(report.p99),
        ns(report.mean),
        ir(report_ir)
    );
    println!(
        "| ours: page record in → copied, mapped (EPT), vCPU released | {} | {} | {} | {} |",
        ns(arrival.p50),
        ns(arrival.p99),
        ns(arrival.mean),
        ir(arrival_ir)
    );
    let total_p50 = report.p50 + arrival.p50;
    println!("| **ours: both halves** | **{}** | {} | | |", ns(total_p50), ns(report.p99 + arrival.p99));
    println!("| userfaultfd round trip (fault → handler → UFFDIO_COPY → wake), unpinned | {} | {} | {} | n/a (no PMU here) |", us(round.p50), us(round.p99), us(round.mean));
    if let Some(s) = same_cpu {
        println!(
            "| userfaultfd round trip, both threads on one CPU | {} | {} | {} | |",
            us(s.p50),
            us(s.p99),
            us(s.mean)
        );
    }
    // Each of our two halves is timed with its own clock pair; the userfaultfd round trip with
    // one. The pair's own cost is measured the same way, on an empty interval.
    let timer = Summary::of(&fault::empty_intervals(100_000)).p50;
    println!(
        "| clock pair around nothing (`Instant::now` + `elapsed`), the timer's own cost | {} | | | |",
        ns(timer)
    );
    let corrected = total_p50.saturating_sub(timer);
    let ratio = round.p50.as_secs_f64() / total_p50.as_secs_f64();
    let ratio_corrected = round.p50.as_secs_f64() / corrected.as_secs_f64();
    println!(
        "\nuserfaultfd p50 / ours p50 = **{ratio:.1}×** as timed, **{ratio_corrected:.1}×** without the cost of our second \
         clock pair ({} for both halves) (target ≥ 20×; ours target ≤ 1 µs)\n",
        ns(corrected)
    );
}

/// Instructions per fault of each half, counted by callgrind over the `fault-loops` run.
fn instructions_per_fault() -> (Option<f64>, Option<f64>) {
    let Ok(exe) = std::env::current_exe() else { return (None, None) };
    let count = |func: &str| -> Option<f64> {
        let out = std::env::temp_dir().join(format!("callgrind.{}.{func}", std::process::id()));
        let status = Command::new("valgrind")
            .args(["--tool=callgrind", "--collect-atstart=no"])
            .arg(format!("--toggle-collect=*{func}*"))
            .arg(format!("--callgrind-out-file={}", out.display()))
            .arg(&exe)
            .arg("fault-loops")
            .output()
            .ok()?;
        if !status.status.success() {
            return None;
        }
        let text = std::fs::read_to_string(&out).ok()?;
        let _ = std::fs::remove_file(&out);
        let total: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("totals:").or(l.strip_prefix("summary:")))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some(total / fault::PAGES as f64)
    };
    (count("report_loop"), count("arrival_loop"))
}

fn discard_table() {
    println!("## Discard: unmap vs madvise(MADV_DONTNEED)\n");
    println!("| page set | pages | ours EPT 4K | ours NPT 4K | ours EPT 2M (splits) | madvise 4K | madvise THP (QEMU-like) | madvise 4K / ours EPT 4K |");
    println!("|---|---|---|---|---|---|---|---|");
    let (ranges, region) = madvise::gib_in_64k_runs();
    row("1 GiB in scattered 64 KiB runs (2 GiB region)", &ranges, region);
    for name in ["pc-postcopy", "q35-postcopy"] {
        let path = qemu_tests::workspace_root().join(format!("agent/tests/captures/{name}.bin"));
        let Ok(stream) = std::fs::read(&path) else { continue };
        for (block, ranges) in discard::discard_sets(&stream) {
            let region = ranges.iter().map(|&(s, l)| s + l).max().unwrap_or(0).next_multiple_of(2 << 20);
            row(&format!("{name} `{block}`: {} ranges", ranges.len()), &ranges, region);
        }
    }
    println!();
}

fn row(label: &str, ranges: &[(u64, u64)], region: u64) {
    let pages = madvise::total_len(ranges) / 4096;
    let per_page = |d: Duration| d.as_secs_f64() * 1e9 / pages as f64;
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let ept = median(
        discard::unmap_costs::<Ept>(ranges, region, Mapping::Small, 5).iter().map(|c| c.time).collect(),
    );
    let npt = median(
        discard::unmap_costs::<Npt>(ranges, region, Mapping::Small, 5).iter().map(|c| c.time).collect(),
    );
    let ept2m = median(
        discard::unmap_costs::<Ept>(ranges, region, Mapping::Large, 5).iter().map(|c| c.time).collect(),
    );
    let small = madvise::dontneed_costs_with(ranges, region, 5, madvise::Backing::SmallPages)
        .map(|c| median(c.costs));
    let thp =
        madvise::dontneed_costs_with(ranges, region, 5, madvise::Backing::QemuThp).map(|c| median(c.costs));
    let fmt = |d: Duration| format!("{:.1} ns/page", per_page(d));
    let (small_s, ratio) = match &small {
        Ok(d) => (fmt(*d), format!("**{:.0}×**", d.as_secs_f64() / ept.as_secs_f64())),
        Err(e) => (format!("error: {e}"), "-".into()),
    };
    let thp_s = thp.map_or_else(|e| format!("error: {e}"), fmt);
    println!(
        "| {label} | {pages} | {} | {} | {} | {small_s} | {thp_s} | {ratio} |",
        fmt(ept),
        fmt(npt),
        fmt(ept2m)
    );
}

fn ingest_table(capture: &PathBuf, machine_args: Option<&[String]>, skip_qemu: bool) {
    let stream = std::fs::read(capture).unwrap_or_else(|e| panic!("read {}: {e}", capture.display()));
    let bytes = stream.len();
    println!("## Ingest: {} ({:.0} MB)\n", capture.display(), bytes as f64 / 1e6);
    let median = |touched| {
        let mut runs: Vec<(Duration, u64)> =
            (0..3).map(|_| ingest::decode_and_place(&stream, touched)).collect();
        runs.sort();
        runs[1]
    };
    let (ours_fresh, _) = median(false);
    let (ours, pages) = median(true);
    // The runs alternate, ours, QEMU's, memcpy's: fresh guest memory costs very different
    // amounts from one moment to the next in this VM (the same page faults take 0.3 s or
    // 1.1 s of system time), so all sides sample the same moments.
    let default_args: Vec<String> = ["-machine", "pc", "-m", "320M"].map(String::from).to_vec();
    let args = machine_args.map(<[String]>::to_vec).unwrap_or(default_args);
    let mut dest: Vec<(Duration, Duration)> = Vec::new();
    let mut loads: Vec<Duration> = Vec::new();
    let mut copies: Vec<(Duration, Duration)> = Vec::new();
    let mut qemu_error = None;
    for _ in 0..RUNS {
        copies.push(ingest::memcpy(&stream));
        dest.extend(postcopy_dest_input(capture));
        if !skip_qemu {
            match qemu_load::incoming_load(capture, &args) {
                Ok(t) => loads.push(t.wall),
                Err(e) => qemu_error = Some(e),
            }
        }
    }
    dest.sort();
    loads.sort();
    let mut colds: Vec<Duration> = copies.iter().map(|c| c.0).collect();
    let mut warms: Vec<Duration> = copies.iter().map(|c| c.1).collect();
    colds.sort();
    warms.sort();
    let (cold, warm) = (colds[colds.len() / 2], warms[warms.len() / 2]);
    let dest_median = dest.get(dest.len() / 2).copied();
    let load_median = loads.get(loads.len() / 2).copied();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let range = |v: &[Duration]| match (v.first(), v.last()) {
        (Some(a), Some(b)) => format!("range {:.0}-{:.0} ms", ms(*a), ms(*b)),
        _ => "no run".into(),
    };
    let row = |label: &str, d: Duration| {
        println!("| {label} | {:.0} ms | {:.0} |", ms(d), ingest::mb_per_s(bytes, d))
    };
    println!("| path | time | MB/s |");
    println!("|---|---|---|");
    row(
        &format!("ours: decode + place in-process into touched frames, EPT (median of 3; {pages} pages)"),
        ours,
    );
    row("ours: the same into fresh frames (THP faults inside)", ours_fresh);
    if let Some((d, wall)) = dest_median {
        let seconds: Vec<Duration> = dest.iter().map(|x| x.0).collect();
        row(
            &format!(
                "ours: `postcopy-dest --input`, file opened → migration complete (its summary's `seconds`), median of {} ({})",
                dest.len(),
                range(&seconds)
            ),
            d,
        );
        row(
            "ours: `postcopy-dest --input`, whole process (with start-up and the tear-down of guest memory)",
            wall,
        );
    }
    row(
        &format!("memcpy of the same bytes into fresh memory (allocated like the guest frames: THP), median of {RUNS} ({})", range(&colds)),
        cold,
    );
    row("memcpy into the same memory, already touched", warm);
    if let Some(l) = load_median {
        row(
            &format!(
                "QEMU 7.2 `-incoming` load (exec:cat), median of {} ({}), alternating with ours",
                loads.len(),
                range(&loads)
            ),
            l,
        );
    }
    if let Some(e) = qemu_error {
        println!("| QEMU 7.2 `-incoming` load | error: {e} | |");
    }
    let ours_rate = ingest::mb_per_s(bytes, ours);
    let dest_rate = dest_median.map(|(d, _)| ingest::mb_per_s(bytes, d));
    let qemu_rate = load_median.map(|l| ingest::mb_per_s(bytes, l));
    println!(
        "\nours / memcpy = **{:.0}%** (touched frames vs touched memory), **{:.0}%** (fresh vs fresh) (target ≥ 50%)",
        100.0 * ours_rate / ingest::mb_per_s(bytes, warm),
        100.0 * ingest::mb_per_s(bytes, ours_fresh) / ingest::mb_per_s(bytes, cold)
    );
    let best = |v: &[Duration]| v.first().map(|&d| ingest::mb_per_s(bytes, d));
    let dest_seconds: Vec<Duration> = dest.iter().map(|x| x.0).collect();
    if let (Some(d), Some(d_best), Some(c_best)) = (dest_rate, best(&dest_seconds), best(&colds)) {
        println!(
            "`postcopy-dest --input` / memcpy into fresh memory = **{:.0}%** (medians), **{:.0}%** (best of {RUNS} each) (target ≥ 50%)",
            100.0 * d / ingest::mb_per_s(bytes, cold),
            100.0 * d_best / c_best
        );
    }
    if let (Some(q), Some(d), Some(q_best), Some(d_best)) =
        (qemu_rate, dest_rate, best(&loads), best(&dest_seconds))
    {
        println!(
            "`postcopy-dest --input` / QEMU load = **{:.1}×** (medians), **{:.1}×** (best of {RUNS} each) (target ≥ 2×)",
            d / q,
            d_best / q_best
        );
    }
    if let Some(q) = qemu_rate {
        println!(
            "in-process decode + place / QEMU load = **{:.1}×** (fresh frames, like QEMU's), **{:.1}×** (touched)",
            ingest::mb_per_s(bytes, ours_fresh) / q,
            ours_rate / q
        );
    }
    println!();
}

/// Runs of each whole-process measurement (the medians are reported).
const RUNS: usize = 5;

/// One `postcopy-dest --input capture`: the time it reports from opening the stream to the
/// completed migration (what QEMU's load time measures too: neither counts process start-up
/// and tear-down), and the process's wall time.
fn postcopy_dest_input(capture: &PathBuf) -> Option<(Duration, Duration)> {
    let exe = std::env::current_exe().ok()?.with_file_name("postcopy-dest");
    let t = std::time::Instant::now();
    let out = Command::new(&exe).arg("--input").arg(capture).output().ok()?;
    let wall = t.elapsed();
    let summary: serde_json::Value = serde_json::from_slice(out.stdout.trim_ascii_end()).ok()?;
    let seconds = summary.get("seconds")?.as_f64()?;
    out.status.success().then(|| (Duration::from_secs_f64(seconds), wall))
}

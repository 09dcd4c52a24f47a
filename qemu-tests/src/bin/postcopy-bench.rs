//! `postcopy-bench`: our postcopy mechanisms next to QEMU's, measured in one run on this
//! machine, printed as markdown tables (`cargo xtask bench` runs it; docs/perf.md holds a
//! copy of the output).
//!
//! ```text
//! postcopy-bench [--capture FILE --machine-args "ARGS"]
//!                [--postcopy-capture FILE --postcopy-machine-args "ARGS"] [--skip-qemu]
//! postcopy-bench send SOCKET FILE   # the ingest sender: FILE into the unix socket SOCKET
//! postcopy-bench fault-loops        # the fault paths alone, for callgrind's instruction count
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hal::stage2::{Ept, Npt};
use qemu_tests::baseline::{madvise, stats::Summary, uffd};
use qemu_tests::bench::discard::{self, DiscardSet, Mapping};
use qemu_tests::bench::ingest::{self, SocketRun};
use qemu_tests::bench::{e2e, fault, ns, us};

/// A VM exit + VM entry round trip, as stated constants (not measured here: this machine
/// runs no hypervisor of ours). See docs/perf.md for where the figures come from.
const EXIT_ENTRY_KVM: Duration = Duration::from_nanos(1000);
const EXIT_ENTRY_BARE: Duration = Duration::from_nanos(300);
/// Charged per RAM_DISCARD command for its INVEPT (single context), which cannot run on
/// the host (no VMX root mode): an assumed, deliberately generous figure.
const INVEPT_CHARGE: Duration = Duration::from_nanos(1000);
/// Whole-process ingest runs per side and stream.
const RUNS: usize = 11;
/// Fresh memory touched once before the ingest runs (see `ingest::warm_memory`).
const WARM_BYTES: usize = 6 << 30;
/// Fresh memory touched and freed just before each ingest run.
const PRE_RUN_WARM_BYTES: usize = 2 << 30;
/// Repetitions of each discard measurement (medians reported).
const DISCARD_REPEATS: usize = 5;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("fault-loops") => {
            let (waits, pages) = fault::run_loops();
            println!("waits {waits} pages {pages}");
            return;
        }
        Some("send") => {
            let (Some(sock), Some(file)) = (args.get(1), args.get(2)) else {
                eprintln!("usage: postcopy-bench send SOCKET FILE");
                std::process::exit(2);
            };
            let data = std::fs::read(file).unwrap_or_else(|e| {
                eprintln!("postcopy-bench send: read {file}: {e}");
                std::process::exit(1)
            });
            match ingest::send(Path::new(sock), &data) {
                Ok(report) => println!("{}", report.to_json()),
                Err(e) => {
                    eprintln!("postcopy-bench send: {e}");
                    std::process::exit(1);
                }
            }
            return;
        }
        _ => {}
    }
    let mut streams: Vec<Stream> = Vec::new();
    let mut skip_qemu = false;
    let mut it = args.iter();
    let split = |s: Option<&String>| s.map(|s| s.split_whitespace().map(String::from).collect::<Vec<_>>());
    while let Some(a) = it.next() {
        match a.as_str() {
            "--capture" | "--postcopy-capture" => streams.push(Stream {
                path: it.next().map(PathBuf::from).unwrap_or_default(),
                postcopy: a == "--postcopy-capture",
                machine_args: Vec::new(),
            }),
            "--machine-args" | "--postcopy-machine-args" => {
                let postcopy = a == "--postcopy-machine-args";
                if let Some(s) = streams.iter_mut().rev().find(|s| s.postcopy == postcopy) {
                    s.machine_args = split(it.next()).unwrap_or_default();
                }
            }
            "--skip-qemu" => skip_qemu = true,
            other => {
                eprintln!("postcopy-bench: unknown argument {other}");
                std::process::exit(2);
            }
        }
    }
    println!(
        "# postcopy-bench ({} cores; load average at start: {})\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg()
    );
    fault_tables();
    discard_tables();
    if streams.is_empty() {
        println!("(ingest skipped: no --capture)\n");
    }
    if !streams.is_empty() {
        let warm = ingest::warm_memory(WARM_BYTES);
        println!(
            "(Before the ingest runs, {} GiB of fresh memory was touched once and freed, in {:.1} s: see docs/perf.md.)\n",
            WARM_BYTES >> 30,
            warm.as_secs_f64()
        );
    }
    for s in &streams {
        ingest_table(s, skip_qemu);
    }
    println!("## Discard encoding: v5 semi-sparse bitmap vs 7.2 ranges, real QEMU 7.2 dirty sets\n");
    if let Err(e) = qemu_tests::discard_study::print_table() {
        println!("(encoding table failed: {e})");
    }
    println!("\nload average at the end: {}", loadavg());
}

/// The 1, 5 and 15 minute load averages: other work on the machine shows here.
fn loadavg() -> String {
    let s = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

fn fault_tables() {
    let config = e2e::Config { blocks: 32, per_block: 512, warmup: 256 };
    let r = match e2e::measure(&config) {
        Ok(r) => r,
        Err(e) => {
            println!("## Fault service end to end\n\nfailed: {e}\n");
            return;
        }
    };
    let (ours, theirs) = (Summary::of(&r.ours), Summary::of(&r.uffd));
    println!(
        "## Fault service end to end over a unix socket ({} faults per side, in {} blocks of {} alternating, after {} unreported)\n",
        r.ours.len(),
        2 * config.blocks,
        config.per_block,
        config.warmup
    );
    println!("| side | the clock runs | p50 | p99 | mean | range |");
    println!("|---|---|---|---|---|---|");
    let row = |side: &str, clock: &str, s: &Summary| {
        println!(
            "| {side} | {clock} | **{}** | {} | {} | {}-{} |",
            us(s.p50),
            us(s.p99),
            us(s.mean),
            us(s.min),
            us(s.max)
        )
    };
    row(
        "ours (hosted destination)",
        "vCPU thread: `on_guest_fault` → request on the socket → responder → stream thread: decode, copy, EPT map, release → vCPU wakes, walks the table",
        &ours,
    );
    row(
        "userfaultfd (QEMU 7.2's mechanism)",
        "touching thread: fault → handler: read uffd msg, request on the socket → responder → handler: decode into a temporary page, `UFFDIO_COPY` → load returns",
        &theirs,
    );
    println!(
        "\nuserfaultfd p50 / ours p50 = **{:.2}×**. Same responder, same page contents, same request bytes; every \
         page checked afterwards: ours {}/{}, userfaultfd {}/{} equal to the source's; requests served {} / {}.\n",
        theirs.p50.as_secs_f64() / ours.p50.as_secs_f64(),
        r.pages_matching.0,
        r.pages,
        r.pages_matching.1,
        r.pages,
        r.served.0.requests,
        r.served.1.requests
    );
    println!("| in a hypervisor (stated constants, not measured) | p50 |");
    println!("|---|---|");
    println!(
        "| ours + one VM exit/entry, KVM-class ({}) | {} |",
        ns(EXIT_ENTRY_KVM),
        us(ours.p50 + EXIT_ENTRY_KVM)
    );
    println!(
        "| ours + one VM exit/entry, bare hypervisor ({}) | {} |",
        ns(EXIT_ENTRY_BARE),
        us(ours.p50 + EXIT_ENTRY_BARE)
    );
    println!();

    // The software path alone, in process (no socket, no thread hand-over).
    let samples = fault::measure();
    assert_eq!(samples.requests, fault::PAGES, "one request per first touch");
    assert_eq!(samples.releases, fault::PAGES, "one release per parked vCPU");
    let report = Summary::of(&samples.report_to_request);
    let arrival = Summary::of(&samples.arrival_to_release);
    let (report_ir, arrival_ir) = instructions_per_fault();
    let local = uffd::measure(4000, 64).map(|r| Summary::of(&r.samples));
    let timer = Summary::of(&fault::empty_intervals(100_000)).p50;
    println!(
        "## Fault service: the software path alone, in process ({} faults on distinct pages, {} vCPUs in turn)\n",
        fault::PAGES,
        fault::VCPUS
    );
    println!("| path | p50 | p99 | mean | instructions |");
    println!("|---|---|---|---|---|");
    let ir = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.0}"));
    println!(
        "| ours: fault report → request bytes handed to the return path | {} | {} | {} | {} |",
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
    println!(
        "| **ours: both halves** | **{}** | {} | | |",
        ns(report.p50 + arrival.p50),
        ns(report.p99 + arrival.p99)
    );
    match local {
        Ok(s) => println!(
            "| userfaultfd round trip without a source (handler copies a ready page), unpinned | {} | {} | {} | n/a (no PMU) |",
            us(s.p50),
            us(s.p99),
            us(s.mean)
        ),
        Err(e) => println!("| userfaultfd round trip without a source | error: {e} | | | |"),
    }
    println!("| clock pair around nothing (`Instant::now` + `elapsed`) | {} | | | |", ns(timer));
    println!();
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

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn discard_tables() {
    let mut sets = Vec::new();
    let (ranges, region) = madvise::gib_in_64k_runs();
    sets.push(DiscardSet::from_ranges(
        "synthetic: 1 GiB in scattered 64 KiB runs of a 2 GiB region",
        &ranges,
        region,
    ));
    match qemu_tests::discard_study::load_all() {
        Ok(dirty) => sets.extend(dirty.iter().map(|d| {
            let mut s = DiscardSet::from_dirty_set(d);
            s.name = format!("recorded: `{}`", d.pattern);
            s
        })),
        Err(e) => println!("(dirty sets not loaded: {e})\n"),
    }
    println!("## Discard: our stage-2 unmap vs madvise(MADV_DONTNEED) on QEMU-like THP memory\n");
    println!(
        "| page set | pages | ranges | RAM_DISCARD cmds | THP-backed before | madvise, THP (QEMU-like) | ours: unmap + flush token per cmd (EPT) | madvise / ours | ours + {} INVEPT per cmd (charged) | madvise / (ours + INVEPT) |",
        ns(INVEPT_CHARGE)
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut other = Vec::new();
    for set in &sets {
        let flat = set.ranges();
        let pages = set.pages();
        let cmds = set.commands.len() as u64;
        // Alternate: ours, madvise, ours, madvise, ...
        let (mut ours, mut thp, mut huge) = (Vec::new(), Vec::new(), None);
        let mut error = None;
        for _ in 0..DISCARD_REPEATS {
            let c = discard::unmap_commands::<Ept>(set, Mapping::Small);
            assert_eq!(c.invalidations, cmds, "one invalidation per command");
            ours.push(c.time);
            match madvise::dontneed_costs_with(&flat, set.region_len, 1, madvise::Backing::QemuThp) {
                Ok(c) => {
                    huge.get_or_insert(c.huge_bytes_before);
                    thp.extend(c.costs);
                }
                Err(e) => error = Some(e),
            }
        }
        let ours = median(ours);
        let fmt = |d: Duration| {
            format!("{:.0} µs ({:.1} ns/page)", d.as_secs_f64() * 1e6, d.as_secs_f64() * 1e9 / pages as f64)
        };
        let charged = ours + INVEPT_CHARGE * cmds as u32;
        let huge = huge.map_or("?".into(), |h| format!("{:.0}%", 100.0 * h as f64 / set.region_len as f64));
        let (thp_s, r1, r2) = match (thp.is_empty(), &error) {
            (false, _) => {
                let m = median(thp);
                (
                    fmt(m),
                    format!("**{:.0}×**", m.as_secs_f64() / ours.as_secs_f64()),
                    format!("{:.1}×", m.as_secs_f64() / charged.as_secs_f64()),
                )
            }
            (true, e) => (format!("error: {e:?}"), "-".into(), "-".into()),
        };
        println!(
            "| {} | {pages} | {} | {cmds} | {huge} | {thp_s} | {} | {r1} | {} | {r2} |",
            set.name,
            flat.len(),
            fmt(ours),
            fmt(charged)
        );
        // The other backings, for the record.
        let npt = median(
            (0..DISCARD_REPEATS).map(|_| discard::unmap_commands::<Npt>(set, Mapping::Small).time).collect(),
        );
        let ept2m = median(
            (0..DISCARD_REPEATS).map(|_| discard::unmap_commands::<Ept>(set, Mapping::Large).time).collect(),
        );
        let small = madvise::dontneed_costs_with(
            &flat,
            set.region_len,
            DISCARD_REPEATS,
            madvise::Backing::SmallPages,
        )
        .map(|c| median(c.costs));
        other.push((set.name.clone(), pages, npt, ept2m, small));
    }
    println!(
        "\nOther backings, same sets (medians of {DISCARD_REPEATS}; ns per discarded page):\n\n\
         | page set | ours NPT, 4 KiB leaves | ours EPT, 2 MiB leaves (split by the discard) | madvise, 4 KiB pages (THP off) |\n|---|---:|---:|---:|"
    );
    for (name, pages, npt, ept2m, small) in other {
        let per = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1e9 / pages as f64);
        println!(
            "| {name} | {} | {} | {} |",
            per(npt),
            per(ept2m),
            small.map_or_else(|e| format!("error: {e}"), per)
        );
    }
    println!();
}

/// Whole-process runs of one destination, failed ones included.
type Runs = Vec<Result<SocketRun, String>>;

/// A capture to ingest, and the machine arguments QEMU's destination needs for it.
struct Stream {
    path: PathBuf,
    postcopy: bool,
    machine_args: Vec<String>,
}

fn ingest_table(stream: &Stream, skip_qemu: bool) {
    let Ok(meta) = std::fs::metadata(&stream.path) else {
        println!("(ingest of {} skipped: no such file)\n", stream.path.display());
        return;
    };
    let bytes = meta.len() as usize;
    let exe = std::env::current_exe().expect("current exe");
    let data = std::fs::read(&stream.path).expect("read the capture");
    let (before, after) = ingest::pages_around_listen(&data);
    // One unreported run of each side first (their failures are reported all the same).
    let mut warmup_failures = Vec::new();
    if let Err(e) = ingest::ours_over_socket(&exe, &stream.path, &[]) {
        warmup_failures.push(format!("ours: {e}"));
    }
    if !skip_qemu {
        if let Err(e) = ingest::qemu_over_socket(&exe, &stream.path, &stream.machine_args, stream.postcopy) {
            warmup_failures.push(format!("QEMU: {e}"));
        }
    }
    // memcpy reference, in this process, alternating with the runs.
    let mut copies = Vec::new();
    let mut ours: Runs = Vec::new();
    let mut qemu: Runs = Vec::new();
    // Conditions drift (other work on the machine, the VM's memory), so the order alternates
    // too: ours, QEMU's, memcpy; then QEMU's, ours, memcpy; ...
    // Before every run, of either side, fresh memory is touched and freed (see
    // `ingest::warm_memory`), so that each starts from the same state of this VM's memory.
    let ours_run = || {
        ingest::warm_memory(PRE_RUN_WARM_BYTES);
        ingest::ours_over_socket(&exe, &stream.path, &[])
    };
    let qemu_run = || {
        ingest::warm_memory(PRE_RUN_WARM_BYTES);
        ingest::qemu_over_socket(&exe, &stream.path, &stream.machine_args, stream.postcopy)
    };
    for i in 0..RUNS {
        if i % 2 == 0 || skip_qemu {
            ours.push(ours_run());
        }
        if !skip_qemu {
            qemu.push(qemu_run());
            if i % 2 == 1 {
                ours.push(ours_run());
            }
        }
        ingest::warm_memory(PRE_RUN_WARM_BYTES);
        copies.push(ingest::memcpy(&data).0);
    }
    drop(data);
    let kind = if stream.postcopy { "postcopy" } else { "precopy" };
    println!(
        "## Ingest over a unix socket: {} ({kind}, {:.0} MB, {} RAM pages before LISTEN, {} after)\n",
        stream.path.file_name().map_or("?".into(), |n| n.to_string_lossy().into_owned()),
        bytes as f64 / 1e6,
        before,
        after
    );
    println!("| destination (what its clock covers) | runs ok / failed | destination clock, median (range) | MB/s (median) | sender clock: connect → last byte written, median (range) | return-path bytes (median) |");
    println!("|---|---|---|---|---|---|");
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut medians = Vec::new();
    let mut sides: Vec<(&str, &str, &Runs)> = vec![(
        "ours",
        "ours: `postcopy-dest --listen unix:PATH`, default flags (1 vCPU touching random pages after RUN); its summary's `seconds`: accepted connection → migration complete",
        &ours,
    )];
    if !skip_qemu {
        sides.push((
            "QEMU",
            "QEMU 7.2: `-S -incoming defer`, `migrate-incoming unix:PATH`; sender's connect → the timestamp of QEMU's `completed` MIGRATION event",
            &qemu,
        ));
    }
    for (_, label, runs) in &sides {
        let ok: Vec<&SocketRun> = runs.iter().filter_map(|r| r.as_ref().ok()).collect();
        let failed = runs.len() - ok.len();
        if ok.is_empty() {
            println!("| {label} | 0 / {failed} | - | - | - | - |");
            medians.push(None);
            continue;
        }
        let mut dest: Vec<Duration> = ok.iter().map(|r| r.dest).collect();
        let mut send: Vec<Duration> = ok.iter().map(|r| r.sender).collect();
        let mut rp: Vec<u64> = ok.iter().map(|r| r.rp_bytes).collect();
        dest.sort();
        send.sort();
        rp.sort();
        let (d, s) = (dest[dest.len() / 2], send[send.len() / 2]);
        println!(
            "| {label} | {} / {failed} | **{:.0} ms** ({:.0}-{:.0}) | {:.0} | {:.0} ms ({:.0}-{:.0}) | {} |",
            ok.len(),
            ms(d),
            ms(dest[0]),
            ms(dest[dest.len() - 1]),
            ingest::mb_per_s(bytes, d),
            ms(s),
            ms(send[0]),
            ms(send[send.len() - 1]),
            rp[rp.len() / 2]
        );
        medians.push(Some((d, s)));
    }
    let mut sorted = copies.clone();
    sorted.sort();
    let c = sorted[sorted.len() / 2];
    println!(
        "| reference: memcpy of the same bytes into fresh memory allocated like guest RAM (THP), in process | {RUNS} / 0 | {:.0} ms ({:.0}-{:.0}) | {:.0} | - | - |",
        ms(c),
        ms(sorted[0]),
        ms(sorted[sorted.len() - 1]),
        ingest::mb_per_s(bytes, c)
    );
    if let [Some((od, os)), Some((qd, qs))] = medians[..] {
        println!(
            "\nQEMU / ours (medians): **{:.2}×** by the destinations' clocks, **{:.2}×** by the sender's clock.",
            qd.as_secs_f64() / od.as_secs_f64(),
            qs.as_secs_f64() / os.as_secs_f64()
        );
    }
    println!(
        "\nEvery run, destination clock in ms, in run order (`x` = failed; round i runs ours then QEMU's for even i, \
         QEMU's then ours for odd i, then the memcpy):\n"
    );
    for (name, _, runs) in &sides {
        let list: Vec<String> =
            runs.iter().map(|r| r.as_ref().map_or("x".into(), |r| format!("{:.0}", ms(r.dest)))).collect();
        println!("* {name}: {}", list.join(", "));
    }
    let list: Vec<String> = copies.iter().map(|&d| format!("{:.0}", ms(d))).collect();
    println!("* memcpy into fresh memory: {}", list.join(", "));
    for (name, _, runs) in &sides {
        for (i, r) in runs.iter().enumerate() {
            if let Err(e) = r {
                println!("\nFailed run {} ({name}): {e}", i + 1);
            }
        }
    }
    for e in &warmup_failures {
        println!("\nFailed warm-up run (not in the table) of {e}");
    }
    println!();
}

//! The baseline measurements run for real on small sizes; the assertions are about
//! outcomes (pages placed, pages zeroed, streams loaded), never about speed.

use std::path::PathBuf;
use std::time::Duration;

use qemu_tests::baseline::madvise::{self, AnonRegion};
use qemu_tests::baseline::{qemu_load, stats, uffd, PAGE_SIZE};
use qemu_tests::guest::build_dirty_guest;
use qemu_tests::source::{Machine, SourceVm};

#[test]
fn uffd_round_trips_place_the_prepared_page() {
    let samples = 64;
    let rt = uffd::measure(samples, 4).expect("userfaultfd round trips");
    assert_eq!(rt.samples.len(), samples);
    assert!(rt.samples.iter().all(|d| *d > Duration::ZERO), "{:?}", rt.samples);
    assert_eq!(rt.faults_handled, samples + 4, "one uffd event per touched page");
    assert_eq!(rt.pages_matching, samples, "every page equals the prepared page");
    assert!(
        rt.instructions_per_round_trip.is_some() != rt.instructions_unavailable.is_some(),
        "either a count or a reason: {rt:?}"
    );
    let page = uffd::prepared_page(0x1234_5000);
    assert_eq!(page.len(), PAGE_SIZE);
    assert_eq!(&page[..8], &0x1234_5000u64.to_ne_bytes());
    assert!(page[8..].iter().all(|&b| b != 0));

    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let mut placements = vec![uffd::Placement::SameCpu(0)];
    if cpus >= 2 {
        placements.push(uffd::Placement::CrossCpu(0, 1));
    }
    for placement in placements {
        let rt = uffd::measure_with(&uffd::Config { samples: 16, warmup: 0, placement }).unwrap();
        assert_eq!((rt.faults_handled, rt.pages_matching), (16, 16), "{placement:?}");
    }

    let plain = uffd::missing_fault_round_trips(8).expect("round trips");
    assert_eq!(plain.len(), 8);
    assert!(plain.iter().all(|d| *d > Duration::ZERO));
}

#[test]
fn dontneed_zeroes_exactly_the_ranges() {
    let region_len = 1 << 20;
    let ranges = madvise::scattered_runs(256 << 10, 64 << 10, region_len, 7).unwrap();
    let mut region = AnonRegion::new(region_len).unwrap();
    region.fill(0xAB);
    region.discard(&ranges).unwrap();
    let bytes = region.bytes();
    let mut discarded = vec![false; bytes.len()];
    for &(o, l) in &ranges {
        discarded[o as usize..(o + l) as usize].fill(true);
    }
    for (i, (&b, &d)) in bytes.iter().zip(&discarded).enumerate() {
        assert_eq!(b, if d { 0 } else { 0xAB }, "byte {i:#x}");
    }
    // Refused: unaligned and out-of-range ranges.
    assert!(region.discard(&[(1, 4096)]).is_err());
    assert!(region.discard(&[(region_len, 4096)]).is_err());

    let costs = madvise::dontneed_costs(&ranges, region_len, 3).unwrap();
    assert_eq!(costs.len(), 3);
    madvise::dontneed_cost(&ranges, region_len).unwrap();
}

#[test]
fn dontneed_splits_huge_pages_and_zeroes_the_ranges() {
    // QEMU's setup: THP on while populating, off before the discards.
    let region_len = 8 << 20;
    let ranges = madvise::scattered_runs(1 << 20, 64 << 10, region_len, 9).unwrap();
    let mut region = AnonRegion::new(region_len).unwrap();
    region.set_thp(true).unwrap();
    region.fill(0x5A);
    let huge_before = region.huge_bytes().unwrap();
    region.set_thp(false).unwrap();
    region.discard(&ranges).unwrap();
    for &(o, l) in &ranges {
        assert!(region.bytes()[o as usize..(o + l) as usize].iter().all(|&b| b == 0));
    }
    let kept = region.bytes().iter().filter(|&&b| b == 0x5A).count() as u64;
    assert_eq!(kept, region_len - madvise::total_len(&ranges));
    // Discarding inside huge pages leaves none of them whole where a range fell.
    assert!(region.huge_bytes().unwrap() <= huge_before);

    let m = madvise::dontneed_costs_with(&ranges, region_len, 2, madvise::Backing::QemuThp).unwrap();
    assert_eq!(m.costs.len(), 2);
}

#[test]
fn scattered_runs_cover_the_total_without_overlap() {
    let ranges = madvise::scattered_runs(8 << 20, 64 << 10, 32 << 20, 42).unwrap();
    assert_eq!(ranges.len(), 128);
    assert_eq!(madvise::total_len(&ranges), 8 << 20);
    for w in ranges.windows(2) {
        assert!(w[0].0 + w[0].1 <= w[1].0, "sorted, disjoint: {w:?}");
    }
    assert!(ranges.iter().all(|&(o, l)| o % (64 << 10) == 0 && l == 64 << 10 && o + l <= 32 << 20));
    assert_eq!(ranges, madvise::scattered_runs(8 << 20, 64 << 10, 32 << 20, 42).unwrap());
    assert!(madvise::scattered_runs(64 << 20, 64 << 10, 32 << 20, 42).is_err());

    let (gib, region) = madvise::gib_in_64k_runs();
    assert_eq!(region, 2 << 30);
    assert_eq!(gib.len(), 16384);
    assert_eq!(madvise::total_len(&gib), 1 << 30);
    let spread = gib.last().unwrap().0 - gib[0].0;
    assert!(spread > 3 << 29, "scattered over the region, not packed: {spread:#x}");
}

/// The arguments `pc-precopy-dirty.bin` was recorded with (agent/tests/captures/README.md).
fn pc_dirty_args() -> Vec<String> {
    let guest = build_dirty_guest().expect("dirty guest");
    SourceVm::builder(Machine::Pc).mem_mib(32).no_vga().kernel(&guest, "rate=128 span=256").args()
}

#[test]
fn qemu_loads_the_recorded_precopy_stream() {
    let capture: PathBuf = qemu_tests::workspace_root().join("agent/tests/captures/pc-precopy-dirty.bin");
    let want = std::fs::metadata(&capture).unwrap().len();
    let t = qemu_load::incoming_load(&capture, &pc_dirty_args()).expect("QEMU loads the capture");
    assert_eq!(t.bytes, want);
    assert_eq!(t.bytes, 954_167);
    assert_eq!(t.statuses.last().map(String::as_str), Some("completed"));
    assert_eq!(t.query_migrate["status"], "completed");
    assert!(t.wall > Duration::ZERO && t.mb_per_s > 0.0);

    // A stream for a different machine does not load: the failure is reported.
    let wrong = SourceVm::builder(Machine::None).mem_mib(32).args();
    let opts = qemu_load::LoadOptions { timeout: Duration::from_secs(60), ..Default::default() };
    assert!(qemu_load::incoming_load_with(&capture, &wrong, &opts).is_err());
}

#[test]
fn stats_summarise_samples() {
    let s: Vec<Duration> = (1..=1000).map(Duration::from_nanos).collect();
    let sum = stats::Summary::of(&s);
    assert_eq!(sum.p50, Duration::from_nanos(500));
    assert_eq!(sum.p99, Duration::from_nanos(990));
    assert_eq!(sum.min, Duration::from_nanos(1));
    assert_eq!(stats::mean(&s), Some(Duration::from_nanos(500)));
}

/// The reference numbers, printed (not asserted): run with
/// `cargo test --release -p qemu-tests --test baseline -- --ignored --nocapture`.
/// Also loads `<workspace>/target/captures/pc-320M-precopy.bin` (from `cargo xtask
/// capture`, recorded with `-machine pc -m 320M`, default VGA, the dirty guest with
/// `rate=2048 fill`), or `$BASELINE_BIG_CAPTURE`, if it exists.
#[test]
#[ignore = "measurement: prints the baseline numbers of this machine"]
fn measure_baseline() {
    use uffd::Placement::{CrossCpu, SameCpu, Unpinned};
    for placement in [Unpinned, SameCpu(0), CrossCpu(0, 1), Unpinned] {
        let rt = uffd::measure_with(&uffd::Config { placement, ..uffd::Config::new(20_000) }).unwrap();
        let s = stats::Summary::of(&rt.samples);
        println!(
            "uffd missing-fault round trip, {placement:?} ({} samples): p50 {:?} p99 {:?} min {:?} mean {:?} max {:?}",
            s.count, s.p50, s.p99, s.min, s.mean, s.max
        );
        match rt.instructions_per_round_trip {
            Some(n) => println!("  instructions per round trip (user+kernel, both threads): {n:.0}"),
            None => println!("  instructions: unavailable: {:?}", rt.instructions_unavailable),
        }
        assert_eq!(rt.pages_matching, s.count);
    }

    let (ranges, region_len) = madvise::gib_in_64k_runs();
    for backing in [madvise::Backing::SmallPages, madvise::Backing::QemuThp] {
        let m = madvise::dontneed_costs_with(&ranges, region_len, madvise::DEFAULT_REPEATS, backing).unwrap();
        let med = stats::Summary::of(&m.costs).p50;
        println!(
            "madvise(MADV_DONTNEED) 1 GiB in {} x 64 KiB runs of 2 GiB, {backing:?} ({} MiB THP before): \
             median {:?} ({:.0} ns per 4 KiB page; all: {:?})",
            ranges.len(),
            m.huge_bytes_before >> 20,
            med,
            madvise::ns_per_page(med, &ranges),
            m.costs
        );
    }

    let capture = qemu_tests::workspace_root().join("agent/tests/captures/pc-precopy-dirty.bin");
    print_loads(&capture, &pc_dirty_args());
    let big = std::env::var_os("BASELINE_BIG_CAPTURE")
        .map(PathBuf::from)
        .unwrap_or_else(|| qemu_tests::workspace_root().join("target/captures/pc-320M-precopy.bin"));
    if big.exists() {
        let guest = build_dirty_guest().unwrap();
        let args = SourceVm::builder(Machine::Pc).mem_mib(320).kernel(&guest, "rate=2048 fill").args();
        print_loads(&big, &args);
    }
}

/// Five loads of `capture`: each, then the median rate.
fn print_loads(capture: &std::path::Path, args: &[String]) {
    let mut walls = Vec::new();
    for _ in 0..5 {
        let t = qemu_load::incoming_load(capture, args).unwrap();
        println!(
            "QEMU load {}: {} B in {:?} = {:.1} MB/s (QEMU event timestamps: {:?})",
            capture.display(),
            t.bytes,
            t.wall,
            t.mb_per_s,
            t.qemu_elapsed
        );
        walls.push(t.wall);
    }
    let med = stats::Summary::of(&walls).p50;
    let bytes = std::fs::metadata(capture).unwrap().len();
    println!("  median {med:?} = {:.1} MB/s", bytes as f64 / med.as_secs_f64() / 1e6);
}

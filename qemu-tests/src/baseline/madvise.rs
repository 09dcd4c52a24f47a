//! The cost of a RAM discard on QEMU 7.2's destination.
//!
//! For every range of a `RAM_DISCARD` message QEMU's destination calls
//! `ram_discard_range` → `ram_block_discard_range`, which on anonymous private RAM is one
//! `madvise(MADV_DONTNEED)` over the range (the pages are freed; the next touch sees zero
//! or, under postcopy, faults to userfaultfd). [`dontneed_cost`] times exactly that: one
//! `madvise` per given range, in the given order, over a fully populated anonymous region.
//!
//! Two backings ([`Backing`]): plain 4 KiB pages (THP off on the region: the cost per
//! page of the `madvise` itself), and what QEMU 7.2's destination really has where THP
//! is available: guest RAM is `MADV_HUGEPAGE` (`ram_block_add`), precopy fills it with
//! 2 MiB pages, and `postcopy_ram_prepare_discard` only sets `MADV_NOHUGEPAGE` just
//! before the discards, so the discards split huge pages that are already there.
//!
//! [`gib_in_64k_runs`] is the standard workload: 1 GiB discarded as 16,384 runs of 64 KiB
//! at pseudo-random 64 KiB-aligned offsets of a 2 GiB region (half of its 64 KiB slots,
//! chosen by [`scattered_runs`] with [`SCATTER_SEED`], sorted by offset), so that our own
//! stage-2 unmap can be fed the identical set.

use std::time::{Duration, Instant};

use super::stats;
use super::sys::PAGE;
use crate::hosted::mem::Mapping;
use crate::{bail, Error, Result};

/// Repetitions [`dontneed_cost`] takes the median of.
pub const DEFAULT_REPEATS: usize = 5;

/// The seed of [`gib_in_64k_runs`].
pub const SCATTER_SEED: u64 = 0x5eed_d15c_a4d0_0001;

/// How the discarded region is backed before the timed discards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backing {
    /// `MADV_NOHUGEPAGE` before populating: 4 KiB pages only.
    #[default]
    SmallPages,
    /// As on QEMU 7.2's destination: `MADV_HUGEPAGE` before populating (2 MiB pages where
    /// the kernel can), then `MADV_NOHUGEPAGE` (outside the timing) before the discards.
    QemuThp,
}

/// A populated anonymous region whose ranges can be discarded and timed.
#[derive(Debug)]
pub struct AnonRegion {
    map: Mapping,
}

impl AnonRegion {
    /// Maps `len` bytes (rounded up to whole pages) of private anonymous memory; nothing
    /// is populated yet.
    pub fn new(len: u64) -> Result<Self> {
        let len = usize::try_from(len).map_err(|_| Error(format!("region too big: {len}")))?;
        let map = Mapping::anon(len).map_err(|e| Error(format!("mmap {len} bytes: {e}")))?;
        Ok(AnonRegion { map })
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    /// True if the region is empty (never: [`AnonRegion::new`] refuses that).
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// Writes `byte` to the first byte of every page of `[offset, offset+len)`, so every
    /// page is populated (a private page of its own).
    pub fn touch(&mut self, offset: u64, len: u64, byte: u8) -> Result<()> {
        let range = self.range(offset, len)?;
        for page in self.map.bytes_mut()[range].chunks_mut(PAGE) {
            page[0] = byte;
        }
        std::hint::black_box(self.map.bytes());
        Ok(())
    }

    /// Fills the whole region with `byte` (populates every page).
    pub fn fill(&mut self, byte: u8) {
        self.map.bytes_mut().fill(byte);
    }

    /// Allows (`MADV_HUGEPAGE`) or forbids (`MADV_NOHUGEPAGE`) transparent huge pages on
    /// the region; affects pages populated afterwards.
    pub fn set_thp(&mut self, allowed: bool) -> Result<()> {
        let advice = if allowed { libc::MADV_HUGEPAGE } else { libc::MADV_NOHUGEPAGE };
        let len = self.map.len();
        self.map
            .madvise(0, len, advice)
            .map_err(|e| Error(format!("madvise(MADV_{}HUGEPAGE): {e}", if allowed { "" } else { "NO" })))
    }

    /// Bytes of the region backed by transparent huge pages (`AnonHugePages` of its
    /// `/proc/self/smaps` entry).
    pub fn huge_bytes(&self) -> Result<u64> {
        let smaps = std::fs::read_to_string("/proc/self/smaps")?;
        let start = format!("{:x}-", self.map.addr());
        let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&start));
        if lines.next().is_none() {
            bail!("region {start} not found in /proc/self/smaps");
        }
        for line in lines {
            if let Some(v) = line.strip_prefix("AnonHugePages:") {
                let kb: u64 = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
                return Ok(kb * 1024);
            }
        }
        bail!("no AnonHugePages line for region {start}")
    }

    /// The contents.
    pub fn bytes(&self) -> &[u8] {
        self.map.bytes()
    }

    /// `madvise(MADV_DONTNEED)` on each of `ranges` in order; returns the time of the
    /// calls together (checks run before the clock starts).
    pub fn discard(&mut self, ranges: &[(u64, u64)]) -> Result<Duration> {
        let ranges: Vec<(usize, usize)> = ranges
            .iter()
            .map(|&(o, l)| self.range(o, l).map(|r| (r.start, r.len())))
            .collect::<Result<_>>()?;
        let t0 = Instant::now();
        for &(offset, len) in &ranges {
            self.map
                .madvise(offset, len, libc::MADV_DONTNEED)
                .map_err(|e| Error(format!("madvise(MADV_DONTNEED) at {offset:#x}: {e}")))?;
        }
        Ok(t0.elapsed())
    }

    /// Checks that `[offset, offset+len)` is page aligned and inside the region.
    fn range(&self, offset: u64, len: u64) -> Result<std::ops::Range<usize>> {
        let page = PAGE as u64;
        if !offset.is_multiple_of(page) || !len.is_multiple_of(page) || len == 0 {
            bail!("range {offset:#x}+{len:#x} is not whole 4 KiB pages");
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.len() => Ok(offset as usize..end as usize),
            _ => bail!("range {offset:#x}+{len:#x} outside the {:#x}-byte region", self.len()),
        }
    }
}

/// The median over [`DEFAULT_REPEATS`] of [`dontneed_costs`] ([`Backing::SmallPages`]).
pub fn dontneed_cost(pages: &[(u64, u64)], region_len: u64) -> Result<Duration> {
    let costs = dontneed_costs(pages, region_len, DEFAULT_REPEATS)?;
    Ok(stats::Summary::of(&costs).p50)
}

/// [`dontneed_costs_with`] on [`Backing::SmallPages`].
pub fn dontneed_costs(pages: &[(u64, u64)], region_len: u64, repeats: usize) -> Result<Vec<Duration>> {
    Ok(dontneed_costs_with(pages, region_len, repeats, Backing::SmallPages)?.costs)
}

/// What [`dontneed_costs_with`] measured.
#[derive(Debug, Clone)]
pub struct DiscardCosts {
    /// One time per repetition: all the `madvise` calls of one pass.
    pub costs: Vec<Duration>,
    /// Bytes backed by huge pages just before the first timed pass.
    pub huge_bytes_before: u64,
}

/// `repeats` times: map a fresh `region_len`-byte anonymous region, set it up per
/// `backing`, write every 4 KiB page (so all are populated), then time
/// `madvise(MADV_DONTNEED)` over exactly `pages` (`(offset, len)` ranges, 4 KiB aligned,
/// one call per range, in order). Mapping and populating are outside the timing.
pub fn dontneed_costs_with(
    pages: &[(u64, u64)],
    region_len: u64,
    repeats: usize,
    backing: Backing,
) -> Result<DiscardCosts> {
    if repeats == 0 {
        bail!("dontneed_costs: repeats must be at least 1");
    }
    let mut costs = Vec::with_capacity(repeats);
    let mut huge_bytes_before = 0;
    for r in 0..repeats {
        let mut region = AnonRegion::new(region_len)?;
        region.set_thp(backing == Backing::QemuThp)?;
        region.touch(0, region.len(), r as u8 + 1)?;
        if backing == Backing::QemuThp {
            region.set_thp(false)?;
        }
        if r == 0 {
            huge_bytes_before = region.huge_bytes().unwrap_or(0);
        }
        costs.push(region.discard(pages)?);
    }
    Ok(DiscardCosts { costs, huge_bytes_before })
}

/// Total bytes covered by `ranges`.
pub fn total_len(ranges: &[(u64, u64)]) -> u64 {
    ranges.iter().map(|&(_, l)| l).sum()
}

/// Nanoseconds per 4 KiB page for a discard of `ranges` that took `cost`.
pub fn ns_per_page(cost: Duration, ranges: &[(u64, u64)]) -> f64 {
    let pages = total_len(ranges) / PAGE as u64;
    cost.as_nanos() as f64 / pages.max(1) as f64
}

/// `total / run` distinct runs of `run` bytes at `run`-aligned offsets of
/// `[0, region_len)`, chosen pseudo-randomly (SplitMix64 from `seed`, partial
/// Fisher-Yates over the `region_len / run` slots), returned sorted by offset. Adjacent
/// chosen slots stay separate ranges (one `madvise` each), so the call count is always
/// `total / run`.
pub fn scattered_runs(total: u64, run: u64, region_len: u64, seed: u64) -> Result<Vec<(u64, u64)>> {
    if run == 0 || !run.is_multiple_of(PAGE as u64) || !total.is_multiple_of(run) {
        bail!("scattered_runs: run {run} must be whole pages and divide total {total}");
    }
    let slots = region_len / run;
    let want = total / run;
    if want > slots {
        bail!("scattered_runs: {total} bytes in {run}-byte runs do not fit in {region_len}");
    }
    let mut order: Vec<u64> = (0..slots).collect();
    let mut state = seed;
    for i in 0..want as usize {
        let j = i + (splitmix64(&mut state) % (slots - i as u64)) as usize;
        order.swap(i, j);
    }
    let mut chosen = order[..want as usize].to_vec();
    chosen.sort_unstable();
    Ok(chosen.into_iter().map(|s| (s * run, run)).collect())
}

/// The standard discard workload: 1 GiB in 64 KiB runs scattered over a 2 GiB region
/// (see the module documentation). Returns `(ranges, region_len)`.
pub fn gib_in_64k_runs() -> (Vec<(u64, u64)>, u64) {
    let region_len = 2 << 30;
    let ranges = scattered_runs(1 << 30, 64 << 10, region_len, SCATTER_SEED)
        .unwrap_or_else(|e| unreachable!("constant workload: {e}"));
    (ranges, region_len)
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

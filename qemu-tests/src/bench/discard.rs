//! Discard: unmapping a page set from a real EPT/NPT table next to `madvise(MADV_DONTNEED)`
//! of the same set (what QEMU's destination does for a RAM_DISCARD).
//!
//! A set is a list of RAM_DISCARD commands, each up to 12 ranges (QEMU 7.2's
//! `MAX_DISCARDS_PER_COMMAND`), as the source sends them. Our side unmaps every range of a
//! command from the table, merges the flush tokens the unmaps return, and flushes once per
//! command, as the engine does. The flush ends in `Invalidate::invalidate`: in the
//! hypervisor that is one INVEPT (single context) or one NPT TLB flush; on the host there is
//! no VMX root mode, so it only counts.

use std::time::{Duration, Instant};

use hal::stage2::{Format, FramePool, Gpa, Hpa, Invalidate, Perms, Scope, Stage2, TablePage};

/// How the table maps guest RAM before the discard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// Every page a 4 KiB leaf (RAM placed page by page).
    Small,
    /// 2 MiB leaves (RAM mapped whole at boot); a discard splits the leaves it cuts.
    Large,
}

struct Count(u64);

impl<F: Format> Invalidate<F> for Count {
    fn invalidate(&mut self, _scope: Scope) {
        self.0 += 1;
    }
}

/// One timed discard of `ranges` over a table mapping `[0, region_len)`.
#[derive(Debug, Clone, Copy)]
pub struct UnmapCost {
    /// The unmaps plus the one invalidation of the merged token.
    pub time: Duration,
    /// Invalidations asked for (1: one per discard command).
    pub invalidations: u64,
}

/// A discard workload: RAM_DISCARD commands over a region laid out like guest RAM.
#[derive(Debug, Clone)]
pub struct DiscardSet {
    /// What it is.
    pub name: String,
    /// Bytes of the region (every block, each 2 MiB aligned).
    pub region_len: u64,
    /// Ranges `(offset, len)` in the region, grouped by RAM_DISCARD command.
    pub commands: Vec<Vec<(u64, u64)>>,
}

impl DiscardSet {
    /// Every range, in order.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        self.commands.iter().flatten().copied().collect()
    }

    /// Discarded 4 KiB pages.
    pub fn pages(&self) -> u64 {
        self.commands.iter().flatten().map(|r| r.1).sum::<u64>() / 4096
    }

    /// A set of ranges in one block, 12 ranges a command.
    pub fn from_ranges(name: &str, ranges: &[(u64, u64)], region_len: u64) -> Self {
        let commands = ranges.chunks(crate::discard_study::ENTRIES_PER_COMMAND).map(<[_]>::to_vec).collect();
        Self { name: name.into(), region_len, commands }
    }

    /// A recorded dirty set: its blocks one after the other (2 MiB aligned), each block's
    /// ranges in commands of 12, as the 7.2 source sent them.
    pub fn from_dirty_set(set: &crate::discard_study::DirtySet) -> Self {
        let page = crate::discard_study::PAGE;
        let mut commands = Vec::new();
        let mut base = 0u64;
        for block in &set.blocks {
            let ranges: Vec<(u64, u64)> =
                block.runs.iter().map(|&(p, n)| (base + p * page, n * page)).collect();
            commands.extend(ranges.chunks(crate::discard_study::ENTRIES_PER_COMMAND).map(<[_]>::to_vec));
            base += block.len.next_multiple_of(2 << 20);
        }
        Self { name: set.pattern.clone(), region_len: base.max(2 << 20), commands }
    }
}

/// One timed discard of `set` from a freshly mapped table over its whole region: per
/// command, the unmaps, the merge of their flush tokens and the flush (see the module
/// documentation). The mapping is built outside the timed part. Checks afterwards that
/// exactly the ranges are unmapped.
pub fn unmap_commands<F: Format>(set: &DiscardSet, mapping: Mapping) -> UnmapCost {
    let region_len = set.region_len;
    let tables = (region_len >> 21) as usize + 16;
    let mut slab: Vec<TablePage> = (0..tables).map(|_| TablePage::new()).collect();
    let pool = FramePool::new(&mut slab, Hpa(1 << 40)).expect("pool");
    let mut table = Stage2::<F>::new(pool).expect("root");
    let mut count = Count(0);
    map_all(&mut table, region_len, mapping, &mut count);
    let before = count.0;
    let t = Instant::now();
    for command in &set.commands {
        let mut flush = None;
        for &(start, len) in command {
            let f = table.unmap_range(Gpa(start), len).expect("unmap");
            flush = Some(match flush {
                Some(prev) => f.merge(prev),
                None => f,
            });
        }
        if let Some(f) = flush {
            f.flush(&mut count);
        }
    }
    let time = t.elapsed();
    check_unmapped(&table, &set.ranges(), region_len);
    UnmapCost { time, invalidations: count.0 - before }
}

fn map_all<F: Format>(table: &mut Stage2<'_, F>, region_len: u64, mapping: Mapping, count: &mut Count) {
    match mapping {
        Mapping::Small => {
            for gpa in (0..region_len).step_by(4096) {
                table.map_4k(Gpa(gpa), Hpa(gpa + (1 << 32)), Perms::RWX).expect("map").flush(count);
            }
        }
        Mapping::Large => {
            for gpa in (0..region_len).step_by(2 << 20) {
                table.map_2m(Gpa(gpa), Hpa(gpa + (1 << 32)), Perms::RWX).expect("map").flush(count);
            }
        }
    }
}

/// The first and last page of each range are unmapped, the pages around them mapped.
fn check_unmapped<F: Format>(table: &Stage2<'_, F>, ranges: &[(u64, u64)], region_len: u64) {
    let mut sorted = ranges.to_vec();
    sorted.sort_unstable();
    let inside = |a: u64| {
        let i = sorted.partition_point(|r| r.0 <= a);
        i > 0 && a < sorted[i - 1].0 + sorted[i - 1].1
    };
    for &(start, len) in ranges {
        assert!(table.translate(Gpa(start)).is_none() && table.translate(Gpa(start + len - 4096)).is_none());
        for around in [start.checked_sub(4096), Some(start + len)].into_iter().flatten() {
            let inside = inside(around);
            if around < region_len && !inside {
                assert!(table.translate(Gpa(around)).is_some(), "{around:#x} stays mapped");
            }
        }
    }
}

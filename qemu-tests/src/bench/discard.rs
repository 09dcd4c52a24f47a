//! Discard: unmapping a page set from a real EPT/NPT table next to `madvise(MADV_DONTNEED)`
//! of the same set (what QEMU's destination does for a RAM_DISCARD).

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

/// Unmaps `ranges` (byte offsets, page aligned) from a freshly mapped table, `repeats`
/// times; the mapping is rebuilt outside the timed part. Checks afterwards that exactly the
/// ranges are unmapped (first and last page of each range, and the pages around it).
pub fn unmap_costs<F: Format>(
    ranges: &[(u64, u64)],
    region_len: u64,
    mapping: Mapping,
    repeats: usize,
) -> Vec<UnmapCost> {
    // 4 KiB mappings need a table per 2 MiB; 2 MiB ones need them after splits.
    let tables = (region_len >> 21) as usize + 16;
    let mut slab: Vec<TablePage> = (0..tables).map(|_| TablePage::new()).collect();
    let mut costs = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        for t in slab.iter_mut() {
            *t = TablePage::new();
        }
        let pool = FramePool::new(&mut slab, Hpa(1 << 40)).expect("pool");
        let mut table = Stage2::<F>::new(pool).expect("root");
        let mut count = Count(0);
        match mapping {
            Mapping::Small => {
                for gpa in (0..region_len).step_by(4096) {
                    table.map_4k(Gpa(gpa), Hpa(gpa + (1 << 32)), Perms::RWX).expect("map").flush(&mut count);
                }
            }
            Mapping::Large => {
                for gpa in (0..region_len).step_by(2 << 20) {
                    table.map_2m(Gpa(gpa), Hpa(gpa + (1 << 32)), Perms::RWX).expect("map").flush(&mut count);
                }
            }
        }
        let before = count.0;
        let t = Instant::now();
        let mut flush = None;
        for &(start, len) in ranges {
            let f = table.unmap_range(Gpa(start), len).expect("unmap");
            flush = Some(match flush {
                Some(prev) => f.merge(prev),
                None => f,
            });
        }
        if let Some(f) = flush {
            f.flush(&mut count);
        }
        let time = t.elapsed();
        for &(start, len) in ranges {
            assert!(
                table.translate(Gpa(start)).is_none() && table.translate(Gpa(start + len - 4096)).is_none()
            );
            for around in [start.checked_sub(4096), Some(start + len)].into_iter().flatten() {
                let inside = ranges.iter().any(|&(s, l)| around >= s && around < s + l);
                if around < region_len && !inside {
                    assert!(table.translate(Gpa(around)).is_some(), "{around:#x} stays mapped");
                }
            }
        }
        costs.push(UnmapCost { time, invalidations: count.0 - before });
    }
    costs
}

/// The discard ranges of a recorded stream, per block: `(block, [(start, len)])`.
pub fn discard_sets(stream: &[u8]) -> Vec<(String, Vec<(u64, u64)>)> {
    use agent::decoder::{Decoder, Record, Step};
    use agent::wire::command::{Command, Dialect};
    let mut decoder = Decoder::new(Dialect::Qemu72);
    let mut sets: Vec<(String, Vec<(u64, u64)>)> = Vec::new();
    let mut at = 0;
    while at < stream.len() {
        let Ok(Step::Record { record, len, .. }) = decoder.next(&stream[at..], &[]) else { break };
        match record {
            Record::Command(Command::RamDiscard(h)) => {
                let name = String::from_utf8_lossy(h.block).into_owned();
                if sets.last().is_none_or(|(n, _)| *n != name) {
                    sets.push((name, Vec::new()));
                }
            }
            Record::DiscardRange { start, len } => {
                if let Some((_, ranges)) = sets.last_mut() {
                    ranges.push((start, len));
                }
            }
            _ => {}
        }
        at += len;
    }
    sets
}

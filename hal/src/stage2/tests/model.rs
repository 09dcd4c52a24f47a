//! Random edit sequences against a reference model, for both formats.
//!
//! The model is the guest's view (`BTreeMap<guest page, (frame, perms)>`) plus the structure
//! the walker must build: which 2 MiB regions are single leaves and which tables exist. That
//! predicts every result exactly: translations and page sizes, errors (including pool
//! exhaustion, after which nothing may have changed), free tables, and whether an edit needs
//! an invalidation. Edits run in batches whose tokens are merged and flushed through a
//! counting fake: one invalidation per batch that changed a present entry, none otherwise.

use super::*;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

/// 8 MiB windows the edits land in: low memory, across a PDPT entry (1 GiB), across a PML4
/// entry (512 GiB), and the top of the 48-bit space. Each spans several tables.
const WINDOWS: [u64; 4] = [0, GIB - 4 * MIB, (1 << 39) - 4 * MIB, GPA_LIMIT - 8 * MIB];
const WINDOW_PAGES: u64 = 8 * MIB / PAGE_4K;
const WINDOW_CHUNKS: u64 = 8 * MIB / PAGE_2M;

#[derive(Debug, Clone)]
enum Op {
    Map4k { gpa: u64, hpa: u64, perms: Perms },
    Map2m { gpa: u64, hpa: u64, perms: Perms },
    Unmap { gpa: u64, len: u64 },
    Split { gpa: u64 },
    Translate { gpa: u64 },
}

fn page() -> impl Strategy<Value = u64> {
    (0..WINDOWS.len(), 0..WINDOW_PAGES).prop_map(|(w, i)| WINDOWS[w] + i * PAGE_4K)
}

fn chunk() -> impl Strategy<Value = u64> {
    (0..WINDOWS.len(), 0..WINDOW_CHUNKS).prop_map(|(w, i)| WINDOWS[w] + i * PAGE_2M)
}

fn perms() -> impl Strategy<Value = Perms> {
    prop_oneof![
        9 => (0..4u8).prop_map(|wx| Perms::READ | Perms::from_bits_truncate(wx << 1)),
        1 => Just(Perms::WRITE),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (page(), 0..1u64 << 20, perms())
            .prop_map(|(gpa, f, perms)| Op::Map4k { gpa, hpa: f * PAGE_4K, perms }),
        2 => (chunk(), 0..1u64 << 11, perms())
            .prop_map(|(gpa, f, perms)| Op::Map2m { gpa, hpa: f * PAGE_2M, perms }),
        2 => (page(), 0..8u64).prop_map(|(gpa, n)| Op::Unmap { gpa, len: n * PAGE_4K }),
        2 => (page(), 0..1100u64).prop_map(|(gpa, n)| Op::Unmap { gpa, len: n * PAGE_4K }),
        1 => Just(Op::Unmap { gpa: 0, len: GPA_LIMIT }),
        2 => page().prop_map(|gpa| Op::Split { gpa }),
        1 => page().prop_map(|gpa| Op::Translate { gpa }),
    ]
}

/// Table levels below the root, as keys of the tables the walker must have built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Table {
    Pdpt(u64),
    Pd(u64),
    Pt(u64),
}

impl Table {
    /// The tables a walk to `gpa` passes through below the root.
    fn path(gpa: u64) -> [Table; 3] {
        [Table::Pdpt(gpa >> 39), Table::Pd(gpa >> 30), Table::Pt(gpa >> 21)]
    }
}

#[derive(Debug, Default)]
struct Model {
    pages: BTreeMap<u64, (u64, Perms)>,
    leaves_2m: BTreeSet<u64>,
    tables: BTreeSet<Table>,
    capacity: usize,
}

impl Model {
    fn available(&self) -> usize {
        self.capacity - 1 - self.tables.len()
    }

    fn reserve(&self, needed: usize) -> Result<(), Error> {
        let available = self.available();
        if needed > available {
            return Err(Error::PoolExhausted { needed, available });
        }
        Ok(())
    }

    fn missing(&self, tables: &[Table]) -> usize {
        tables.iter().filter(|t| !self.tables.contains(t)).count()
    }

    fn any_mapped(&self, start: u64, end: u64) -> bool {
        self.pages.range(start..end).next().is_some()
    }

    /// The expected result of `op`: whether its token needs an invalidation, or the error.
    fn apply(&mut self, op: &Op) -> Result<bool, Error> {
        match *op {
            Op::Map4k { gpa, hpa, perms } => {
                check_perms(perms)?;
                if self.pages.contains_key(&gpa) {
                    return Err(Error::AlreadyMapped { gpa });
                }
                let path = Table::path(gpa);
                self.reserve(self.missing(&path))?;
                self.tables.extend(path);
                self.pages.insert(gpa, (hpa, perms));
                Ok(false)
            }
            Op::Map2m { gpa, hpa, perms } => {
                check_perms(perms)?;
                if self.any_mapped(gpa, gpa + PAGE_2M) {
                    return Err(Error::AlreadyMapped { gpa });
                }
                let [pdpt, pd, pt] = Table::path(gpa);
                self.reserve(self.missing(&[pdpt, pd]))?;
                self.tables.extend([pdpt, pd]);
                // A page table left linked there is filled instead of replaced.
                if !self.tables.contains(&pt) {
                    self.leaves_2m.insert(gpa);
                }
                for i in 0..PAGE_2M / PAGE_4K {
                    self.pages.insert(gpa + i * PAGE_4K, (hpa + i * PAGE_4K, perms));
                }
                Ok(false)
            }
            Op::Unmap { gpa, len } => {
                let end = gpa
                    .checked_add(len)
                    .filter(|&end| end <= GPA_LIMIT)
                    .ok_or(Error::GpaOutOfRange { gpa })?;
                if len == 0 {
                    return Ok(false);
                }
                let first = gpa & !(PAGE_2M - 1);
                let partly_covered = |chunk: u64| chunk < gpa || chunk + PAGE_2M > end;
                let leaves: Vec<u64> = self.leaves_2m.range(first..end).copied().collect();
                let splits = leaves.iter().filter(|&&c| partly_covered(c)).count();
                self.reserve(splits)?;
                for chunk in leaves {
                    self.leaves_2m.remove(&chunk);
                    if partly_covered(chunk) {
                        self.tables.insert(Table::Pt(chunk >> 21));
                    }
                }
                let gone: Vec<u64> = self.pages.range(gpa..end).map(|(&p, _)| p).collect();
                for page in &gone {
                    self.pages.remove(page);
                }
                Ok(!gone.is_empty())
            }
            Op::Split { gpa } => {
                let chunk = gpa & !(PAGE_2M - 1);
                if !self.leaves_2m.contains(&chunk) {
                    return Ok(false);
                }
                self.reserve(1)?;
                self.leaves_2m.remove(&chunk);
                self.tables.insert(Table::Pt(chunk >> 21));
                Ok(true)
            }
            Op::Translate { .. } => Ok(false),
        }
    }

    fn translate(&self, gpa: u64) -> Option<Translation> {
        let page = gpa & !(PAGE_4K - 1);
        let &(frame, perms) = self.pages.get(&page)?;
        let size = if self.leaves_2m.contains(&(gpa & !(PAGE_2M - 1))) {
            PageSize::Size2M
        } else {
            PageSize::Size4K
        };
        Some(Translation { hpa: Hpa(frame + gpa % PAGE_4K), perms, size, dirty: false })
    }
}

fn check_perms(perms: Perms) -> Result<(), Error> {
    if perms.contains(Perms::READ) {
        Ok(())
    } else {
        Err(Error::UnreadablePerms { perms })
    }
}

fn run_op<F: Format>(s2: &mut Stage2<'_, F>, op: &Op) -> Result<Flush<F>, Error> {
    match *op {
        Op::Map4k { gpa, hpa, perms } => s2.map_4k(Gpa(gpa), Hpa(hpa), perms),
        Op::Map2m { gpa, hpa, perms } => s2.map_2m(Gpa(gpa), Hpa(hpa), perms),
        Op::Unmap { gpa, len } => s2.unmap_range(Gpa(gpa), len),
        Op::Split { gpa } => s2.split_2m(Gpa(gpa)),
        // Checked with the op's neighbourhood in `check_sequence`.
        Op::Translate { .. } => Ok(Flush::nothing()),
    }
}

/// The part of the guest-physical space an op touches, bounded to what is cheap to scan.
fn touched(op: &Op) -> core::ops::Range<u64> {
    let (start, len) = match *op {
        Op::Map4k { gpa, .. } | Op::Translate { gpa } => (gpa, PAGE_4K),
        Op::Map2m { gpa, .. } => (gpa, PAGE_2M),
        Op::Unmap { gpa, len } => (gpa, len.min(8 * MIB)),
        Op::Split { gpa } => (gpa & !(PAGE_2M - 1), PAGE_2M),
    };
    let start = start.saturating_sub(PAGE_4K);
    start..(start + len + 2 * PAGE_4K).min(GPA_LIMIT)
}

fn assert_agrees<F: Format>(s2: &Stage2<'_, F>, model: &Model, range: core::ops::Range<u64>) {
    for page in range.step_by(PAGE_4K as usize) {
        let gpa = page + 0x9a8;
        assert_eq!(s2.translate(Gpa(gpa)), model.translate(gpa), "{} translation of {gpa:#x}", F::NAME);
    }
}

fn check_sequence<F: Format>(capacity: usize, batches: &[Vec<Op>]) {
    let mut slab = slab(capacity);
    let mut s2 = Stage2::<F>::new(FramePool::identity(&mut slab).unwrap()).unwrap();
    let mut model = Model { capacity, ..Model::default() };
    let root = Scope::Context { root: s2.root_pointer() };
    for batch in batches {
        let mut merged: Option<Flush<F>> = None;
        let mut batch_needs_flush = false;
        for op in batch {
            let expected = model.apply(op);
            let token = run_op(&mut s2, op);
            let outcome = token.as_ref().map(Flush::is_needed).map_err(|e| *e);
            assert_eq!(outcome, expected, "{} {op:?}", F::NAME);
            if let Ok(token) = token {
                batch_needs_flush |= token.is_needed();
                merged = Some(match merged.take() {
                    Some(merged) => merged.merge(token),
                    None => token,
                });
            }
            assert_agrees(&s2, &model, touched(op));
            assert_eq!(s2.pool().available(), model.available(), "{op:?}");
        }
        let mut invalidate = CountingInvalidate::default();
        if let Some(merged) = merged {
            merged.flush(&mut invalidate);
        }
        if batch_needs_flush {
            assert_eq!((invalidate.calls, invalidate.last), (1, Some(root)));
        } else {
            assert_eq!(invalidate.calls, 0);
        }
        for window in WINDOWS {
            assert_agrees(&s2, &model, window..window + 8 * MIB);
        }
    }
}

fn batches() -> impl Strategy<Value = Vec<Vec<Op>>> {
    prop::collection::vec(prop::collection::vec(op(), 1..5), 1..10)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Pools from nearly empty (exhaustion everywhere) to ample (never exhausted: 25 tables
    /// cover every window).
    #[test]
    fn ept_agrees_with_the_model(capacity in 1usize..30, batches in batches()) {
        check_sequence::<Ept>(capacity, &batches);
    }

    #[test]
    fn npt_agrees_with_the_model(capacity in 1usize..30, batches in batches()) {
        check_sequence::<Npt>(capacity, &batches);
    }
}

//! Walker tests on the host, for both formats: examples first, then random edit sequences
//! checked against a reference model.

use super::*;
use std::vec::Vec;

/// A zeroed slab for a pool of `pages` tables.
fn slab(pages: usize) -> Vec<TablePage> {
    (0..pages).map(|_| TablePage::new()).collect()
}

/// An `Invalidate` fake that counts invalidations and remembers the last scope.
#[derive(Debug, Default)]
struct CountingInvalidate {
    calls: usize,
    last: Option<Scope>,
}

impl<F: Format> Invalidate<F> for CountingInvalidate {
    fn invalidate(&mut self, scope: Scope) {
        self.calls += 1;
        self.last = Some(scope);
    }
}

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Runs `body` once per vendor format.
macro_rules! for_both_formats {
    ($name:ident, $body:item) => {
        mod $name {
            use super::*;
            $body
            #[test]
            fn ept() {
                run::<Ept>();
            }
            #[test]
            fn npt() {
                run::<Npt>();
            }
        }
    };
}

for_both_formats!(
    map_4k_then_translate,
    fn run<F: Format>() {
        let mut pages = slab(8);
        let mut s2 = Stage2::<F>::new(FramePool::identity(&mut pages).unwrap()).unwrap();
        let flush = s2.map_4k(Gpa(0x1234_5000), Hpa(0x9_8765_4000), Perms::READ).unwrap();
        assert!(!flush.is_needed(), "not-present → present needs no invalidation");
        flush.ignore();
        let t = s2.translate(Gpa(0x1234_5678)).unwrap();
        assert_eq!(t.hpa, Hpa(0x9_8765_4678));
        assert_eq!(t.perms, Perms::READ);
        assert_eq!(t.size, PageSize::Size4K);
        assert_eq!(s2.translate(Gpa(0x1234_6000)), None);
        assert_eq!(s2.translate(Gpa(0x1234_4fff)), None);
        // Root, PDPT, PD, PT.
        assert_eq!(s2.pool().available(), 4);
    }
);

for_both_formats!(
    map_2m_is_one_leaf,
    fn run<F: Format>() {
        let mut pages = slab(8);
        let mut s2 = Stage2::<F>::new(FramePool::identity(&mut pages).unwrap()).unwrap();
        s2.map_2m(Gpa(GIB + 2 * MIB), Hpa(64 * MIB), Perms::RWX).unwrap().ignore();
        let t = s2.translate(Gpa(GIB + 3 * MIB + 5)).unwrap();
        assert_eq!(t.hpa, Hpa(65 * MIB + 5));
        assert_eq!(t.size, PageSize::Size2M);
        assert_eq!(t.perms, Perms::RWX);
        assert_eq!(s2.pool().available(), 5, "no page table for a 2 MiB leaf");
    }
);

for_both_formats!(
    partial_unmap_splits_the_leaf,
    fn run<F: Format>() {
        let mut pages = slab(8);
        let mut s2 = Stage2::<F>::new(FramePool::identity(&mut pages).unwrap()).unwrap();
        s2.map_2m(Gpa(0), Hpa(2 * MIB), Perms::RWX).unwrap().ignore();
        let mut inv = CountingInvalidate::default();
        s2.unmap_range(Gpa(0x3000), 0x2000).unwrap().flush(&mut inv);
        assert_eq!(inv.calls, 1);
        assert_eq!(inv.last, Some(Scope::Context { root: s2.root_pointer() }));
        assert_eq!(s2.translate(Gpa(0x3000)), None);
        assert_eq!(s2.translate(Gpa(0x4fff)), None);
        for page in [0, 0x2000, 0x5000, 0x1f_f000] {
            let t = s2.translate(Gpa(page)).unwrap();
            assert_eq!(t.hpa, Hpa(2 * MIB + page));
            assert_eq!(t.size, PageSize::Size4K);
            assert_eq!(t.perms, Perms::RWX);
        }
    }
);

for_both_formats!(
    split_keeps_every_translation,
    fn run<F: Format>() {
        let mut pages = slab(8);
        let mut s2 = Stage2::<F>::new(FramePool::identity(&mut pages).unwrap()).unwrap();
        let perms = Perms::READ | Perms::EXECUTE;
        s2.map_2m(Gpa(4 * MIB), Hpa(8 * MIB), perms).unwrap().ignore();
        let flush = s2.split_2m(Gpa(5 * MIB)).unwrap();
        assert!(flush.is_needed(), "the old 2 MiB translation may be cached");
        flush.ignore();
        for page in (4 * MIB..6 * MIB).step_by(PAGE_4K as usize) {
            let t = s2.translate(Gpa(page)).unwrap();
            assert_eq!((t.hpa, t.perms), (Hpa(page + 4 * MIB), perms));
            assert_eq!(t.size, PageSize::Size4K);
        }
        let again = s2.split_2m(Gpa(4 * MIB)).unwrap();
        assert!(!again.is_needed(), "splitting twice is a no-op");
        again.ignore();
    }
);

for_both_formats!(
    unmapping_nothing_needs_no_flush,
    fn run<F: Format>() {
        let mut pages = slab(8);
        let mut s2 = Stage2::<F>::new(FramePool::identity(&mut pages).unwrap()).unwrap();
        let flush = s2.unmap_range(Gpa(0), GPA_LIMIT).unwrap();
        assert!(!flush.is_needed());
        flush.ignore();
    }
);

for_both_formats!(
    refused_edits_change_nothing,
    fn run<F: Format>() {
        // Root, PDPT, PD, PT: room for exactly one 4 KiB mapping.
        let mut pages = slab(4);
        let mut s2 = Stage2::<F>::new(FramePool::identity(&mut pages).unwrap()).unwrap();
        s2.map_2m(Gpa(0), Hpa(0), Perms::RWX).unwrap().ignore();
        let e = |r: Result<Flush<F>, Error>| r.map(Flush::ignore).unwrap_err();
        assert_eq!(
            e(s2.map_4k(Gpa(GIB), Hpa(0), Perms::RWX)),
            Error::PoolExhausted { needed: 2, available: 1 }
        );
        assert_eq!(e(s2.map_4k(Gpa(0x1000), Hpa(0), Perms::RWX)), Error::AlreadyMapped { gpa: 0x1000 });
        assert_eq!(
            e(s2.map_4k(Gpa(0x20_1000), Hpa(0), Perms::WRITE)),
            Error::UnreadablePerms { perms: Perms::WRITE }
        );
        assert_eq!(
            e(s2.map_2m(Gpa(0x10_0000), Hpa(0), Perms::RWX)),
            Error::Misaligned { addr: 0x10_0000, align: PAGE_2M }
        );
        assert_eq!(
            e(s2.map_4k(Gpa(0x20_0000), Hpa(0x800), Perms::RWX)),
            Error::Misaligned { addr: 0x800, align: PAGE_4K }
        );
        assert_eq!(e(s2.map_4k(Gpa(GPA_LIMIT), Hpa(0), Perms::RWX)), Error::GpaOutOfRange { gpa: GPA_LIMIT });
        assert_eq!(
            e(s2.map_4k(Gpa(0x20_0000), Hpa(HPA_LIMIT), Perms::RWX)),
            Error::HpaOutOfRange { hpa: HPA_LIMIT }
        );
        assert_eq!(
            e(s2.unmap_range(Gpa(GPA_LIMIT - PAGE_4K), 2 * PAGE_4K)),
            Error::GpaOutOfRange { gpa: GPA_LIMIT - PAGE_4K }
        );
        // Use the last table on a split, then a second split has nothing left.
        s2.map_2m(Gpa(2 * MIB), Hpa(2 * MIB), Perms::RWX).unwrap().ignore();
        s2.split_2m(Gpa(0)).unwrap().ignore();
        assert_eq!(
            e(s2.unmap_range(Gpa(2 * MIB), PAGE_4K)),
            Error::PoolExhausted { needed: 1, available: 0 }
        );
        let t = s2.translate(Gpa(2 * MIB)).unwrap();
        assert_eq!((t.hpa, t.size), (Hpa(2 * MIB), PageSize::Size2M));
    }
);

for_both_formats!(
    unmap_that_cannot_split_both_ends_changes_nothing,
    fn run<F: Format>() {
        // Root, PDPT, PD and one spare table: enough for one split, not the two needed.
        let mut pages = slab(4);
        let mut s2 = Stage2::<F>::new(FramePool::identity(&mut pages).unwrap()).unwrap();
        for chunk in 0..3 {
            let at = chunk * PAGE_2M;
            s2.map_2m(Gpa(at), Hpa(at), Perms::RWX).unwrap().ignore();
        }
        let refused = s2.unmap_range(Gpa(MIB), 4 * MIB).map(Flush::ignore);
        assert_eq!(refused, Err(Error::PoolExhausted { needed: 2, available: 1 }));
        for chunk in 0..3 {
            let t = s2.translate(Gpa(chunk * PAGE_2M + MIB)).unwrap();
            assert_eq!((t.hpa, t.size), (Hpa(chunk * PAGE_2M + MIB), PageSize::Size2M));
        }
    }
);

for_both_formats!(
    map_2m_over_an_emptied_table_reuses_it,
    fn run<F: Format>() {
        let mut pages = slab(8);
        let mut s2 = Stage2::<F>::new(FramePool::identity(&mut pages).unwrap()).unwrap();
        s2.map_4k(Gpa(0x5000), Hpa(0x5000), Perms::RWX).unwrap().ignore();
        s2.unmap_range(Gpa(0), PAGE_2M).unwrap().ignore();
        let available = s2.pool().available();
        s2.map_2m(Gpa(0), Hpa(4 * MIB), Perms::RWX).unwrap().ignore();
        assert_eq!(s2.pool().available(), available);
        let t = s2.translate(Gpa(0x1f_f123)).unwrap();
        assert_eq!((t.hpa, t.size), (Hpa(4 * MIB + 0x1f_f123), PageSize::Size4K));
    }
);

for_both_formats!(
    tables_to_map_is_exact_for_4k_mappings,
    fn run<F: Format>() {
        // 6 MiB straddling the 512 GiB boundary: 2 PDPTs, 2 PDs, 3 PTs, and the root.
        let (start, len) = ((1 << 39) - 2 * MIB, 6 * MIB);
        let needed = FramePool::tables_to_map(Gpa(start), len);
        assert_eq!(needed, 8);
        let mut pages = slab(needed);
        let mut s2 = Stage2::<F>::new(FramePool::identity(&mut pages).unwrap()).unwrap();
        for gpa in (start..start + len).step_by(PAGE_4K as usize) {
            s2.map_4k(Gpa(gpa), Hpa(gpa % GIB), Perms::RWX).unwrap().ignore();
        }
        assert_eq!(s2.pool().available(), 0);
        assert_eq!(FramePool::tables_to_map(Gpa(0), 0), 1);
        assert_eq!(FramePool::tables_to_map(Gpa(0), 4 * GIB), 1 + 1 + 4 + 2048);
    }
);

#[test]
fn root_pointers_point_at_the_first_pool_page() {
    let mut pages = slab(1);
    let pool = FramePool::new(&mut pages, Hpa(0x10_0000)).unwrap();
    assert_eq!(Stage2::<Ept>::new(pool).unwrap().root_pointer(), 0x10_001e);
    let mut pages = slab(1);
    let pool = FramePool::new(&mut pages, Hpa(0x10_0000)).unwrap();
    assert_eq!(Stage2::<Npt>::new(pool).unwrap().root_pointer(), 0x10_0000);
}

#[test]
fn pool_refuses_a_misaligned_base() {
    let mut pages = slab(1);
    assert!(matches!(FramePool::new(&mut pages, Hpa(0x10_0800)), Err(Error::Misaligned { .. })));
}

#[test]
fn tokens_of_different_trees_merge_to_all_contexts() {
    let a = Flush::<Ept>::context(0x1000);
    let b = Flush::<Ept>::context(0x2000);
    let mut inv = CountingInvalidate::default();
    a.merge(b).merge(Flush::nothing()).flush(&mut inv);
    assert_eq!((inv.calls, inv.last), (1, Some(Scope::AllContexts)));
}

#[test]
fn merged_tokens_flush_once() {
    let mut inv = CountingInvalidate::default();
    Flush::<Npt>::context(0x1000).merge(Flush::context(0x1000)).flush(&mut inv);
    assert_eq!(inv.calls, 1);
    assert_eq!(inv.last, Some(Scope::Context { root: 0x1000 }));
    Flush::<Npt>::nothing().flush(&mut inv);
    assert_eq!(inv.calls, 1, "a token that needs nothing invalidates nothing");
}

#[test]
#[cfg(debug_assertions)]
#[should_panic(expected = "flush token dropped")]
fn dropping_a_token_panics_in_debug_builds() {
    let mut pages = slab(4);
    let mut s2 = Stage2::<Ept>::new(FramePool::identity(&mut pages).unwrap()).unwrap();
    let _forgotten = s2.map_4k(Gpa(0), Hpa(0), Perms::RWX).unwrap();
}

/// A walker in another thread, walking while the owner maps and unmaps: every translation
/// it sees is either absent or exactly the one the owner made, never a torn or foreign one.
#[test]
fn a_walker_in_another_thread_sees_whole_entries_only() {
    let mut pages = slab(32);
    let mut table = Stage2::<Ept>::new(FramePool::new(&mut pages, Hpa(1 << 40)).unwrap()).unwrap();
    let walker = table.walker();
    let done = std::sync::atomic::AtomicBool::new(false);
    let hpa = |page: u64| Hpa((1 << 33) + page * PAGE_4K);
    std::thread::scope(|s| {
        let reader = s.spawn(|| {
            // Every translation seen mid-edit is whole; the pass that starts after the owner
            // is done must see every probed page (the last round leaves them all mapped).
            let probes = (0..4096u64).step_by(97);
            let mut passes = 0u64;
            loop {
                let finished = done.load(std::sync::atomic::Ordering::Acquire);
                let mut seen = 0;
                for page in probes.clone() {
                    if let Some(t) = walker.translate(Gpa(page * PAGE_4K + 8)) {
                        assert_eq!(t.hpa, Hpa(hpa(page).0 + 8));
                        assert_eq!(t.size, PageSize::Size4K);
                        seen += 1;
                    }
                }
                passes += 1;
                if finished {
                    assert_eq!(seen, probes.count(), "after the edits every probed page is mapped");
                    return passes;
                }
            }
        });
        let mut count = CountingInvalidate::default();
        for round in 0..4 {
            for page in 0..4096u64 {
                table.map_4k(Gpa(page * PAGE_4K), hpa(page), Perms::RWX).unwrap().flush(&mut count);
            }
            if round < 3 {
                table.unmap_range(Gpa(0), 4096 * PAGE_4K).unwrap().flush(&mut count);
            }
        }
        done.store(true, std::sync::atomic::Ordering::Release);
        assert!(reader.join().unwrap() >= 1);
    });
    assert_eq!(walker.translate(Gpa(5 * PAGE_4K)), table.translate(Gpa(5 * PAGE_4K)));
    assert!(walker.translate(Gpa(5 * PAGE_4K)).is_some());
}

mod model;

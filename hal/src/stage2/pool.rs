//! The fixed supply of table pages a [`Stage2`](super::Stage2) is built from.

use super::error::Error;
use super::{Gpa, Hpa, HPA_LIMIT, PAGE_4K};
use core::mem::{align_of, size_of};
use core::sync::atomic::{AtomicU64, Ordering};

/// Entries in one table: 4 KiB of 8-byte entries.
pub(crate) const ENTRIES: usize = 512;

/// One 4 KiB, 4 KiB-aligned table of 512 entries, as the CPU walks it.
///
/// The entries are atomics because the hardware walker reads them, and (NPT) sets
/// accessed/dirty bits in them, while the hypervisor edits them.
#[repr(C, align(4096))]
pub struct TablePage([AtomicU64; ENTRIES]);

const _: () = assert!(size_of::<AtomicU64>() == 8, "an entry is 8 bytes");
const _: () = assert!(size_of::<TablePage>() == 4096, "a table is 4 KiB");
const _: () = assert!(align_of::<TablePage>() == 4096, "a table is 4 KiB-aligned");

impl TablePage {
    /// A table of not-present entries; usable in a `static`.
    pub const fn new() -> Self {
        Self([const { AtomicU64::new(0) }; ENTRIES])
    }

    /// Loads one entry. Acquire: pairs with [`set`](Self::set), so a walker that follows a
    /// freshly linked table sees it cleared.
    pub(crate) fn get(&self, index: usize) -> u64 {
        self.0[index].load(Ordering::Acquire)
    }

    /// Stores one entry. Release: whatever was written before (a child table's entries) is
    /// visible to a walker that sees this entry.
    pub(crate) fn set(&self, index: usize, entry: u64) {
        self.0[index].store(entry, Ordering::Release);
    }

    pub(crate) fn clear_all(&self) {
        for entry in &self.0 {
            entry.store(0, Ordering::Relaxed);
        }
    }
}

impl Default for TablePage {
    fn default() -> Self {
        Self::new()
    }
}

impl core::fmt::Debug for TablePage {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("TablePage").finish_non_exhaustive()
    }
}

/// Index of a table page in its pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TableId(pub(crate) usize);

/// Table pages for one stage-2 tree, handed out in order and never returned (see the module
/// documentation for why).
///
/// The slab must be physically contiguous, starting at the base given to [`FramePool::new`]:
/// the pool turns a table's index into the physical address the CPU follows, and an entry's
/// address back into an index.
pub struct FramePool<'a> {
    /// Borrowed exclusively at construction (no other pool can hand these pages out); kept
    /// shared, because every access goes through the entries' atomics, so that read-only
    /// [`Walker`](super::Walker)s can walk the same pages while the owner edits them.
    pages: &'a [TablePage],
    base: u64,
    used: usize,
}

impl<'a> FramePool<'a> {
    /// A pool over `pages`, whose first page is at host-physical `base`.
    pub fn new(pages: &'a mut [TablePage], base: Hpa) -> Result<Self, Error> {
        if !base.0.is_multiple_of(PAGE_4K) {
            return Err(Error::Misaligned { addr: base.0, align: PAGE_4K });
        }
        let fits = (pages.len() as u64)
            .checked_mul(PAGE_4K)
            .and_then(|len| base.0.checked_add(len))
            .is_some_and(|end| end <= HPA_LIMIT);
        if !fits {
            return Err(Error::HpaOutOfRange { hpa: base.0 });
        }
        Ok(Self { pages, base: base.0, used: 0 })
    }

    /// A pool where physical address = virtual address: the image's identity map, and host
    /// tests (the hosted destination walks the tables itself, so the addresses only have to be
    /// consistent).
    pub fn identity(pages: &'a mut [TablePage]) -> Result<Self, Error> {
        let base = pages.as_ptr() as u64;
        Self::new(pages, Hpa(base))
    }

    /// Tables, root included, that mapping all of `[gpa, gpa + len)` with 4 KiB pages takes:
    /// one page table per 2 MiB, one directory per 1 GiB, one pointer table per 512 GiB.
    ///
    /// Size the slab with this for the guest's RAM ranges (summing over ranges over-counts
    /// shared tables, which is safe). Since tables are never freed and postcopy ends with all
    /// of RAM mapped, that is also all a guest ever uses.
    pub const fn tables_to_map(gpa: Gpa, len: u64) -> usize {
        if len == 0 {
            return 1;
        }
        let (first, last) = (gpa.0, gpa.0 + (len - 1));
        let mut tables = 1;
        let mut shift = 21;
        while shift <= 39 {
            tables += ((last >> shift) - (first >> shift) + 1) as usize;
            shift += 9;
        }
        tables
    }

    /// Pages in the slab.
    pub fn capacity(&self) -> usize {
        self.pages.len()
    }

    /// Pages not handed out yet.
    pub fn available(&self) -> usize {
        self.pages.len() - self.used
    }

    /// A zeroed table, not yet reachable by any walker.
    pub(crate) fn alloc(&mut self) -> Result<TableId, Error> {
        let Some(page) = self.pages.get(self.used) else {
            return Err(Error::PoolExhausted { needed: 1, available: 0 });
        };
        // The slab may hold anything (a reused buffer); a new table must be all not-present.
        page.clear_all();
        self.used += 1;
        Ok(TableId(self.used - 1))
    }

    /// Fails with [`Error::PoolExhausted`] unless `needed` tables can be allocated.
    pub(crate) fn reserve(&self, needed: usize) -> Result<(), Error> {
        let available = self.available();
        if needed > available {
            return Err(Error::PoolExhausted { needed, available });
        }
        Ok(())
    }

    pub(crate) fn page(&self, id: TableId) -> &TablePage {
        &self.pages[id.0]
    }

    /// The whole slab, for walkers (tables not handed out yet are all not-present or never
    /// reached: only published entries lead into the slab).
    pub(crate) fn slab(&self) -> &'a [TablePage] {
        self.pages
    }

    pub(crate) fn base(&self) -> u64 {
        self.base
    }

    pub(crate) fn phys(&self, id: TableId) -> u64 {
        self.base + id.0 as u64 * PAGE_4K
    }

    /// The table at physical address `pa`, which must be one this pool handed out.
    pub(crate) fn id_of(&self, pa: u64) -> Result<TableId, Error> {
        let index = pa
            .checked_sub(self.base)
            .map(|offset| offset / PAGE_4K)
            .filter(|&index| pa.is_multiple_of(PAGE_4K) && index < self.used as u64)
            .ok_or(Error::ForeignTable { pa })?;
        Ok(TableId(index as usize))
    }
}

impl core::fmt::Debug for FramePool<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("FramePool")
            .field("base", &format_args!("{:#x}", self.base))
            .field("capacity", &self.capacity())
            .field("used", &self.used)
            .finish()
    }
}

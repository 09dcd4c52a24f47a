//! The four-level walker shared by EPT and NPT.

use super::error::Error;
use super::flush::Flush;
use super::format::Format;
use super::pool::{FramePool, TableId, ENTRIES};
use super::{Gpa, Hpa, PageSize, Perms, Translation, GPA_LIMIT, HPA_LIMIT, PAGE_2M, PAGE_4K};
use core::marker::PhantomData;

/// A level of the walk, named by the table it indexes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    Pml4,
    Pdpt,
    Pd,
    Pt,
}

impl Level {
    /// Lowest guest-physical bit of this level's 9-bit index.
    const fn shift(self) -> u32 {
        match self {
            Level::Pml4 => 39,
            Level::Pdpt => 30,
            Level::Pd => 21,
            Level::Pt => 12,
        }
    }

    /// Bytes of guest-physical space one entry of this level covers.
    const fn entry_span(self) -> u64 {
        1 << self.shift()
    }

    fn index(self, gpa: u64) -> usize {
        ((gpa >> self.shift()) as usize) % ENTRIES
    }
}

/// A read-only walker over a [`Stage2`] tree, for other contexts: it follows published entries
/// with acquire loads, as the hardware walker does, and sees each entry either before or
/// after an edit, never half-written. `Copy`, `Send` and `Sync`.
pub struct Walker<'a, F: Format> {
    pages: &'a [super::pool::TablePage],
    base: u64,
    root: usize,
    _format: PhantomData<fn() -> F>,
}

impl<F: Format> Clone for Walker<'_, F> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<F: Format> Copy for Walker<'_, F> {}

impl<F: Format> core::fmt::Debug for Walker<'_, F> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Walker").field("format", &F::NAME).field("root", &self.root).finish()
    }
}

impl<F: Format> Walker<'_, F> {
    /// Where `gpa` leads (the leaf's frame plus the page offset, its permissions and size),
    /// or `None` where the walk meets a not-present entry: an EPT violation / #NPF.
    pub fn translate(&self, gpa: Gpa) -> Option<Translation> {
        if gpa.0 >= GPA_LIMIT {
            return None;
        }
        let mut table = self.root;
        for level in [Level::Pml4, Level::Pdpt, Level::Pd, Level::Pt] {
            let entry = self.pages.get(table)?.get(level.index(gpa.0));
            if !F::is_present(entry) {
                return None;
            }
            let size = match level {
                Level::Pd if F::is_large(entry) => PageSize::Size2M,
                Level::Pt => PageSize::Size4K,
                _ => {
                    table = self.table_at(F::frame_of(entry))?;
                    continue;
                }
            };
            let frame = align_down(F::frame_of(entry), size.bytes());
            return Some(Translation {
                hpa: Hpa(frame + gpa.0 % size.bytes()),
                perms: F::perms_of(entry),
                size,
                dirty: F::is_dirty(entry),
            });
        }
        None
    }

    /// The slab index of the table at physical address `pa`.
    fn table_at(&self, pa: u64) -> Option<usize> {
        let offset = pa.checked_sub(self.base)?;
        (offset.is_multiple_of(PAGE_4K) && offset / PAGE_4K < self.pages.len() as u64)
            .then_some((offset / PAGE_4K) as usize)
    }
}

/// Where the walk towards a page directory stopped.
enum PdLookup {
    Found(TableId),
    /// The entry at this level is not present: the whole span it covers is unmapped, and
    /// mapping in it needs that level's child and every one below, down to the PD.
    Missing(Level),
}

/// What a page-directory entry holds.
enum PdEntry {
    Empty,
    Leaf2M(u64),
    Table(TableId),
}

/// A stage-2 tree for one guest, in format `F`, with its tables from one [`FramePool`].
///
/// All edits keep one invariant: a guest-physical page is mapped at most once, by a 2 MiB leaf
/// or by a 4 KiB leaf, never both. Mapping over a mapping is refused ([`Error::AlreadyMapped`]):
/// in postcopy a second placement of the same page is a bug, not an update.
pub struct Stage2<'a, F: Format> {
    pool: FramePool<'a>,
    root: TableId,
    _format: PhantomData<fn() -> F>,
}

impl<'a, F: Format> Stage2<'a, F> {
    /// An empty tree; takes the root table from `pool`.
    pub fn new(mut pool: FramePool<'a>) -> Result<Self, Error> {
        let root = pool.alloc()?;
        Ok(Self { pool, root, _format: PhantomData })
    }

    /// What the CPU is given for this tree: the EPTP (Intel) or nCR3 (AMD).
    pub fn root_pointer(&self) -> u64 {
        F::root_pointer(self.pool.phys(self.root))
    }

    /// The pool the tables come from (for its capacity and what is left).
    pub fn pool(&self) -> &FramePool<'a> {
        &self.pool
    }

    /// Maps the 4 KiB page at `gpa` to the frame at `hpa`.
    ///
    /// The page must be unmapped; the returned token needs no invalidation (a not-present
    /// entry is never cached).
    pub fn map_4k(&mut self, gpa: Gpa, hpa: Hpa, perms: Perms) -> Result<Flush<F>, Error> {
        check_range(gpa, PAGE_4K, PAGE_4K)?;
        check_frame(hpa, PAGE_4K)?;
        check_perms(perms)?;
        let already = Error::AlreadyMapped { gpa: gpa.0 };
        let missing = match self.lookup_pd(gpa.0)? {
            PdLookup::Missing(level) => tables_below(level) + 1,
            PdLookup::Found(pd) => match self.pd_entry(pd, gpa.0)? {
                PdEntry::Empty => 1,
                PdEntry::Leaf2M(_) => return Err(already),
                PdEntry::Table(pt) if self.pte_present(pt, gpa.0) => return Err(already),
                PdEntry::Table(_) => 0,
            },
        };
        self.pool.reserve(missing)?;

        let pd = self.make_pd(gpa.0)?;
        let pt = match self.pd_entry(pd, gpa.0)? {
            PdEntry::Table(pt) => pt,
            _ => self.link_new_table(pd, Level::Pd.index(gpa.0))?,
        };
        let leaf = F::leaf(hpa.0, perms, PageSize::Size4K);
        self.pool.page(pt).set(Level::Pt.index(gpa.0), leaf);
        Ok(Flush::nothing())
    }

    /// Maps the 2 MiB region at `gpa` to the 2 MiB frame at `hpa`.
    ///
    /// The whole region must be unmapped. Usually one large leaf; if a page table is still
    /// linked there (tables are never freed), the region is mapped through it as 512 small
    /// leaves instead: the same translation, with no invalidation needed either way.
    pub fn map_2m(&mut self, gpa: Gpa, hpa: Hpa, perms: Perms) -> Result<Flush<F>, Error> {
        check_range(gpa, PAGE_2M, PAGE_2M)?;
        check_frame(hpa, PAGE_2M)?;
        check_perms(perms)?;
        let already = Error::AlreadyMapped { gpa: gpa.0 };
        let missing = match self.lookup_pd(gpa.0)? {
            PdLookup::Missing(level) => tables_below(level),
            PdLookup::Found(pd) => match self.pd_entry(pd, gpa.0)? {
                PdEntry::Empty => 0,
                PdEntry::Leaf2M(_) => return Err(already),
                PdEntry::Table(pt) if self.table_in_use(pt) => return Err(already),
                PdEntry::Table(_) => 0,
            },
        };
        self.pool.reserve(missing)?;

        let pd = self.make_pd(gpa.0)?;
        let slot = Level::Pd.index(gpa.0);
        match self.pd_entry(pd, gpa.0)? {
            PdEntry::Table(pt) => self.fill_4k(pt, hpa.0, perms),
            _ => self.pool.page(pd).set(slot, F::leaf(hpa.0, perms, PageSize::Size2M)),
        }
        Ok(Flush::nothing())
    }

    /// Unmaps every page in `[gpa, gpa + len)`, splitting a 2 MiB leaf the range only partly
    /// covers (its other pages stay mapped to the same frames).
    ///
    /// Needs at most two free tables (one split at each end); with fewer, nothing is changed.
    /// The token needs an invalidation if any page was mapped.
    pub fn unmap_range(&mut self, gpa: Gpa, len: u64) -> Result<Flush<F>, Error> {
        check_range(gpa, len, PAGE_4K)?;
        let (start, end) = (gpa.0, gpa.0 + len);
        if len == 0 {
            return Ok(Flush::nothing());
        }
        // Only the first and last 2 MiB regions can be partly covered.
        let (head, tail) = (align_down(start, PAGE_2M), align_down(end - 1, PAGE_2M));
        let mut splits = 0;
        for chunk in [Some(head), (tail != head).then_some(tail)].into_iter().flatten() {
            let covered = start <= chunk && chunk + PAGE_2M <= end;
            if !covered && self.leaf_2m_at(chunk)?.is_some() {
                splits += 1;
            }
        }
        self.pool.reserve(splits)?;

        let mut changed = false;
        let mut addr = start;
        while addr < end {
            let pd = match self.lookup_pd(addr)? {
                PdLookup::Found(pd) => pd,
                PdLookup::Missing(level) => {
                    addr = align_down(addr, level.entry_span()) + level.entry_span();
                    continue;
                }
            };
            let chunk = align_down(addr, PAGE_2M);
            let chunk_end = (chunk + PAGE_2M).min(end);
            let slot = Level::Pd.index(addr);
            match self.pd_entry(pd, addr)? {
                PdEntry::Empty => {}
                PdEntry::Leaf2M(_) if addr == chunk && chunk_end == chunk + PAGE_2M => {
                    self.pool.page(pd).set(slot, 0);
                    changed = true;
                }
                PdEntry::Leaf2M(entry) => {
                    let pt = self.split_leaf(pd, slot, entry)?;
                    self.clear_ptes(pt, addr, chunk_end);
                    changed = true;
                }
                PdEntry::Table(pt) => changed |= self.clear_ptes(pt, addr, chunk_end),
            }
            addr = chunk_end;
        }
        Ok(self.token(changed))
    }

    /// Replaces the 2 MiB leaf covering `gpa` by a table of 512 4 KiB leaves with the same
    /// frames and permissions, e.g. before a discard that will punch holes in it.
    ///
    /// Nothing to do (and a token that needs nothing) if no 2 MiB leaf covers `gpa`.
    pub fn split_2m(&mut self, gpa: Gpa) -> Result<Flush<F>, Error> {
        check_range(gpa, 0, 1)?;
        let chunk = align_down(gpa.0, PAGE_2M);
        let Some((pd, entry)) = self.leaf_2m_at(chunk)? else {
            return Ok(Flush::nothing());
        };
        self.pool.reserve(1)?;
        self.split_leaf(pd, Level::Pd.index(chunk), entry)?;
        Ok(self.token(true))
    }

    /// Where `gpa` leads, as the CPU would walk it (permissions of the leaf).
    pub fn translate(&self, gpa: Gpa) -> Option<Translation> {
        self.walker().translate(gpa)
    }

    /// A read-only view of this tree that other contexts can use while it is edited (a
    /// simulated vCPU walking it as the hardware would, an exit handler decoding a fault).
    pub fn walker(&self) -> Walker<'a, F> {
        Walker { pages: self.pool.slab(), base: self.pool.base(), root: self.root.0, _format: PhantomData }
    }

    fn token(&self, changed: bool) -> Flush<F> {
        if changed {
            Flush::context(self.root_pointer())
        } else {
            Flush::nothing()
        }
    }

    /// Follows present non-leaf entries from the root to the page directory covering `gpa`.
    fn lookup_pd(&self, gpa: u64) -> Result<PdLookup, Error> {
        let mut table = self.root;
        for level in [Level::Pml4, Level::Pdpt] {
            let entry = self.pool.page(table).get(level.index(gpa));
            if !F::is_present(entry) {
                return Ok(PdLookup::Missing(level));
            }
            table = self.pool.id_of(F::frame_of(entry))?;
        }
        Ok(PdLookup::Found(table))
    }

    /// Like [`lookup_pd`](Self::lookup_pd), linking new tables where entries are missing.
    /// The caller has reserved them.
    fn make_pd(&mut self, gpa: u64) -> Result<TableId, Error> {
        let mut table = self.root;
        for level in [Level::Pml4, Level::Pdpt] {
            let slot = level.index(gpa);
            let entry = self.pool.page(table).get(slot);
            table = if F::is_present(entry) {
                self.pool.id_of(F::frame_of(entry))?
            } else {
                self.link_new_table(table, slot)?
            };
        }
        Ok(table)
    }

    fn pd_entry(&self, pd: TableId, gpa: u64) -> Result<PdEntry, Error> {
        let entry = self.pool.page(pd).get(Level::Pd.index(gpa));
        Ok(if !F::is_present(entry) {
            PdEntry::Empty
        } else if F::is_large(entry) {
            PdEntry::Leaf2M(entry)
        } else {
            PdEntry::Table(self.pool.id_of(F::frame_of(entry))?)
        })
    }

    /// The PD and entry of the 2 MiB leaf at `chunk`, if there is one.
    fn leaf_2m_at(&self, chunk: u64) -> Result<Option<(TableId, u64)>, Error> {
        let PdLookup::Found(pd) = self.lookup_pd(chunk)? else {
            return Ok(None);
        };
        Ok(match self.pd_entry(pd, chunk)? {
            PdEntry::Leaf2M(entry) => Some((pd, entry)),
            _ => None,
        })
    }

    /// Allocates a zeroed table and points `parent[slot]` at it. The caller has reserved it.
    fn link_new_table(&mut self, parent: TableId, slot: usize) -> Result<TableId, Error> {
        let child = self.pool.alloc()?;
        let entry = F::table(self.pool.phys(child));
        self.pool.page(parent).set(slot, entry);
        Ok(child)
    }

    /// Builds the equivalent page table for a 2 MiB leaf, then swaps it in with one store, so
    /// a concurrent walker sees the leaf or the full table. The caller has reserved the table.
    fn split_leaf(&mut self, pd: TableId, slot: usize, leaf: u64) -> Result<TableId, Error> {
        let pt = self.pool.alloc()?;
        let frame = align_down(F::frame_of(leaf), PAGE_2M);
        self.fill_4k(pt, frame, F::perms_of(leaf));
        let entry = F::table(self.pool.phys(pt));
        self.pool.page(pd).set(slot, entry);
        Ok(pt)
    }

    /// Points all 512 entries of `pt` at consecutive 4 KiB frames from `frame`.
    fn fill_4k(&self, pt: TableId, frame: u64, perms: Perms) {
        let table = self.pool.page(pt);
        for (slot, offset) in (0..ENTRIES).zip((0..).step_by(PAGE_4K as usize)) {
            table.set(slot, F::leaf(frame + offset, perms, PageSize::Size4K));
        }
    }

    /// Clears the entries of `pt` for `[from, to)` (within one 2 MiB chunk); true if any was
    /// present.
    fn clear_ptes(&self, pt: TableId, from: u64, to: u64) -> bool {
        let table = self.pool.page(pt);
        let mut changed = false;
        for slot in Level::Pt.index(from)..=Level::Pt.index(to - 1) {
            if F::is_present(table.get(slot)) {
                table.set(slot, 0);
                changed = true;
            }
        }
        changed
    }

    fn pte_present(&self, pt: TableId, gpa: u64) -> bool {
        F::is_present(self.pool.page(pt).get(Level::Pt.index(gpa)))
    }

    fn table_in_use(&self, pt: TableId) -> bool {
        let table = self.pool.page(pt);
        (0..ENTRIES).any(|slot| F::is_present(table.get(slot)))
    }
}

impl<F: Format> core::fmt::Debug for Stage2<'_, F> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Stage2")
            .field("format", &F::NAME)
            .field("root_pointer", &format_args!("{:#x}", self.root_pointer()))
            .field("pool", &self.pool)
            .finish()
    }
}

/// Tables to create below a missing entry at `level`, down to and including the PD.
fn tables_below(level: Level) -> usize {
    match level {
        Level::Pml4 => 2,
        Level::Pdpt => 1,
        Level::Pd | Level::Pt => 0,
    }
}

const fn align_down(addr: u64, align: u64) -> u64 {
    addr & !(align - 1)
}

/// `[gpa, gpa + len)` is `align`-aligned (both ends) and inside the 48-bit space.
fn check_range(gpa: Gpa, len: u64, align: u64) -> Result<(), Error> {
    for addr in [gpa.0, len] {
        if !addr.is_multiple_of(align) {
            return Err(Error::Misaligned { addr, align });
        }
    }
    match gpa.0.checked_add(len.max(1)) {
        Some(end) if end <= GPA_LIMIT => Ok(()),
        _ => Err(Error::GpaOutOfRange { gpa: gpa.0 }),
    }
}

/// A `size`-aligned host frame that fits the entry's address field.
fn check_frame(hpa: Hpa, size: u64) -> Result<(), Error> {
    if !hpa.0.is_multiple_of(size) {
        return Err(Error::Misaligned { addr: hpa.0, align: size });
    }
    if hpa.0 >= HPA_LIMIT {
        return Err(Error::HpaOutOfRange { hpa: hpa.0 });
    }
    Ok(())
}

fn check_perms(perms: Perms) -> Result<(), Error> {
    if !perms.contains(Perms::READ) {
        return Err(Error::UnreadablePerms { perms });
    }
    Ok(())
}

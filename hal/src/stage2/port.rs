//! The agent's [`Stage2`](agent::ports::Stage2) port over a stage-2 table: the road from the
//! engine's map/unmap/flush to EPT or NPT entries, shared by the image and the hosted
//! destination.
//!
//! The engine addresses pages as (block, offset); each block's frames are contiguous from a
//! host-physical base the platform sets when it provides the block. Unmaps of one RAM_DISCARD
//! command merge their flush tokens; `flush` turns the merged token into one invalidation
//! (INVEPT, a VMCB TLB_CONTROL request, or a count in the hosted destination).

use agent::config::MAX_BLOCKS;

use super::{Flush, Format, Gpa, Hpa, Invalidate, Perms, Stage2};

/// A stage-2 table, the frames' bases per block, and where its invalidations go.
#[derive(Debug)]
pub struct TablePort<'a, F: Format, I: Invalidate<F>> {
    table: Stage2<'a, F>,
    bases: [Option<u64>; MAX_BLOCKS],
    /// Unmaps since the last flush, merged.
    pending: Option<Flush<F>>,
    invalidate: I,
}

impl<'a, F: Format, I: Invalidate<F>> TablePort<'a, F, I> {
    /// A port over `table` whose invalidations go to `invalidate`.
    pub fn new(table: Stage2<'a, F>, invalidate: I) -> Self {
        Self { table, bases: [None; MAX_BLOCKS], pending: None, invalidate }
    }

    /// Block `block`'s frames start at host-physical `base` (set when the block is provided).
    pub fn set_block_base(&mut self, block: usize, base: u64) {
        if let Some(slot) = self.bases.get_mut(block) {
            *slot = Some(base);
        }
    }

    /// The table.
    pub fn table(&self) -> &Stage2<'a, F> {
        &self.table
    }

    /// Where invalidations go.
    pub fn invalidate(&mut self) -> &mut I {
        &mut self.invalidate
    }
}

impl<F: Format, I: Invalidate<F>> agent::ports::Stage2 for TablePort<'_, F, I> {
    fn map(&mut self, gpa: u64, block: usize, offset: u64) {
        let base = self.bases.get(block).copied().flatten().expect("a mapped block has frames");
        // The pool is sized for all of guest RAM mapped with 4 KiB pages (see the platform), so
        // running out is a sizing bug, not a property of the stream.
        let flush = self.table.map_4k(Gpa(gpa), Hpa(base + offset), Perms::RWX).expect("map a received page");
        // Mapping a not-present entry needs no invalidation; the token says so.
        flush.flush(&mut self.invalidate);
    }

    fn unmap(&mut self, gpa: u64, len: u64) {
        let flush = self.table.unmap_range(Gpa(gpa), len).expect("unmap a discarded range");
        self.pending = Some(match self.pending.take() {
            Some(p) => p.merge(flush),
            None => flush,
        });
    }

    fn flush(&mut self) {
        if let Some(p) = self.pending.take() {
            p.flush(&mut self.invalidate);
        }
    }
}

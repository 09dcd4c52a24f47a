//! Stage-2 translation: the guest-physical → host-physical tables the hypervisor owns, in
//! Intel EPT and AMD NPT encodings.
//!
//! Postcopy lives on these tables: a discarded page is unmapped so the guest's next touch exits
//! (EPT violation, #NPF), and a page that arrives is copied into its frame and then mapped.
//!
//! # Shape
//! One four-level walker, [`Stage2`] (PML4 → PDPT → PD → PT, 48-bit guest-physical), generic
//! over a [`Format`] that only knows how to encode and decode one entry: [`Ept`] (Intel SDM
//! Vol. 3C §29.3.2) and [`Npt`] (AMD APM Vol. 2 §15.25, the long-mode format of §5.3). The
//! walker is monomorphized per vendor; nothing is `dyn`, and all of it is plain Rust over
//! memory that the host tests exercise exactly as the image runs it.
//!
//! ```
//! use hal::stage2::{Ept, FramePool, Gpa, Hpa, Invalidate, Perms, Scope, Stage2, TablePage};
//!
//! /// Stands in for `invalidate::Invept`, which only exists in the image.
//! #[derive(Default)]
//! struct Invept(usize);
//! impl Invalidate<Ept> for Invept {
//!     fn invalidate(&mut self, _scope: Scope) {
//!         self.0 += 1;
//!     }
//! }
//! let mut invept = Invept::default();
//!
//! let mut slab: Vec<TablePage> = (0..8).map(|_| TablePage::new()).collect();
//! let mut ept = Stage2::<Ept>::new(FramePool::identity(&mut slab)?)?;
//!
//! // A page arrived and was copied into its frame: map it. Needs no invalidation.
//! ept.map_4k(Gpa(0x7000), Hpa(0x20_0000), Perms::RWX)?.flush(&mut invept);
//! assert_eq!(invept.0, 0);
//!
//! // A discard command with two ranges: one INVEPT for both.
//! let flush = ept.unmap_range(Gpa(0x0), 0x4000)?;
//! let flush = flush.merge(ept.unmap_range(Gpa(0x6000), 0x2000)?);
//! flush.flush(&mut invept);
//! assert_eq!(invept.0, 1);
//! assert_eq!(ept.translate(Gpa(0x7000)), None);
//! # Ok::<(), hal::stage2::Error>(())
//! ```
//!
//! # Why flush tokens
//! Processors cache translations derived from present entries (TLBs and paging-structure
//! caches: SDM Vol. 3C §29.4, APM Vol. 2 §15.16). After a present entry is cleared or changed,
//! the guest may keep using the old translation until it is invalidated, so a discarded page
//! would stay readable and writable. Every edit therefore returns a `#[must_use]` [`Flush`]
//! that says which invalidation it needs; tokens [`merge`](Flush::merge) so that one discard
//! command costs one INVEPT (or one TLB_CONTROL flush), and a token must be consumed by
//! [`Flush::flush`] or [`Flush::ignore`]. Debug builds panic when one is dropped.
//!
//! Turning a not-present entry into a present one needs no invalidation: no cached
//! translation is ever built from a not-present entry (SDM Vol. 3A §4.10.4.3 "Optional
//! Invalidation", Vol. 3C §29.4.2 for EPT; AMD caches only present entries too, and KVM's NPT
//! code relies on it). The worst case is one spurious exit, which the engine resumes because
//! the page is already there. So placing a page, the postcopy hot path, returns a token that
//! needs nothing ([`Flush::is_needed`] is false).
//!
//! # Why a pool
//! Tables come from a [`FramePool`] over a caller-provided slab of [`TablePage`]s: no heap,
//! and exhaustion is [`Error::PoolExhausted`], never a panic. Every edit counts the tables it
//! needs before it writes anything, so an edit that fails leaves the tables unchanged.
//!
//! Tables are never handed back to the pool. A table unlinked from the tree can still be walked
//! through a stale paging-structure-cache entry until the next invalidation; reusing it before
//! that flush would let the guest reach someone else's frames. An emptied table stays linked
//! and is reused in place by the next mapping in its range.
//!
//! # Sharing the tables with the hardware walker
//! Other CPUs walk the tables while they are edited, and NPT hardware sets accessed/dirty bits
//! in them. Entries are therefore [`AtomicU64`](core::sync::atomic::AtomicU64)s: each store is
//! a single untorn 64-bit write, and a new table is filled completely before its pointer is
//! published with a release store, so a walker sees the old subtree or the new one, never a
//! half-built one.
//!
//! # What the image does with the root
//! [`Stage2::root_pointer`] is the value the CPU is given. Intel: the VMCS EPT pointer field
//! (encoding 0x201A; SDM Vol. 3C §25.6.11): write-back walks, 4-level, the PML4 address. AMD:
//! the VMCB's N_CR3 (offset 0xB0) with NP_ENABLE set (offset 0x90 bit 0; APM Vol. 2 §15.25.3).
//! [`invalidate`] holds what a token's flush turns into on each vendor.

mod ept;
mod error;
mod flush;
mod format;
pub mod invalidate;
mod npt;
mod pool;
pub mod port;
mod table;
#[cfg(test)]
mod tests;

pub use ept::{Ept, EptFlags};
pub use error::Error;
pub use flush::{Flush, Invalidate, Scope};
pub use format::Format;
pub use npt::{Npt, NptFlags};
pub use pool::{FramePool, TablePage};
pub use table::{Stage2, Walker};

use bitflags::bitflags;

/// Size of a small page and of one table.
pub const PAGE_4K: u64 = 1 << 12;
/// Size of a large page (one PD entry).
pub const PAGE_2M: u64 = 1 << 21;
/// Guest-physical addresses a four-level walk translates: 48 bits.
pub const GPA_LIMIT: u64 = 1 << 48;
/// Host-physical addresses an entry can hold: bits 51:12 (the architectural MAXPHYADDR bound).
pub const HPA_LIMIT: u64 = 1 << 52;

/// A guest-physical address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Gpa(pub u64);

/// A host-physical address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hpa(pub u64);

bitflags! {
    /// What the guest may do with a mapping, independent of the vendor encoding.
    ///
    /// Every mapping must be readable: EPT treats write-without-read as a misconfiguration
    /// (SDM Vol. 3C §29.3.3.1) and NPT cannot express an unreadable present page.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
    pub struct Perms: u8 {
        /// Loads.
        const READ = 1 << 0;
        /// Stores.
        const WRITE = 1 << 1;
        /// Instruction fetches.
        const EXECUTE = 1 << 2;
        /// Ordinary guest RAM.
        const RWX = Self::READ.bits() | Self::WRITE.bits() | Self::EXECUTE.bits();
    }
}

/// Size of a leaf mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageSize {
    /// A page-table entry.
    Size4K,
    /// A page-directory entry with the large-page bit.
    Size2M,
}

impl PageSize {
    /// Bytes covered by one leaf of this size.
    pub const fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => PAGE_4K,
            PageSize::Size2M => PAGE_2M,
        }
    }
}

/// Where a guest-physical address leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// The host-physical address of the very byte asked about (leaf frame plus page offset).
    pub hpa: Hpa,
    /// The leaf's permissions.
    pub perms: Perms,
    /// The leaf's size.
    pub size: PageSize,
    /// The CPU marked the leaf dirty ([`Format::is_dirty`]).
    pub dirty: bool,
}

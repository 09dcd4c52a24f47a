//! Why a stage-2 edit was refused. An edit that returns an error has changed nothing.

use super::Perms;

/// Why a stage-2 edit was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// `addr` is not a multiple of `align`.
    Misaligned {
        /// The offending address or length.
        addr: u64,
        /// The alignment it needs.
        align: u64,
    },
    /// The guest-physical range does not fit in 48 bits.
    GpaOutOfRange {
        /// First address of the offending range.
        gpa: u64,
    },
    /// The host-physical range does not fit in the 52 bits an entry can hold.
    HpaOutOfRange {
        /// First address of the offending range.
        hpa: u64,
    },
    /// A mapping must at least be readable (see [`Perms`]).
    UnreadablePerms {
        /// What was asked for.
        perms: Perms,
    },
    /// Part of the range is mapped already; unmap it first.
    AlreadyMapped {
        /// The guest-physical address the mapping was asked for.
        gpa: u64,
    },
    /// The pool has fewer free tables than the edit needs.
    PoolExhausted {
        /// Tables the edit needs.
        needed: usize,
        /// Tables left in the pool.
        available: usize,
    },
    /// A table entry points outside the pool: the tables were corrupted, or the pool was given
    /// a wrong physical base.
    ForeignTable {
        /// The physical address found in the entry.
        pa: u64,
    },
}

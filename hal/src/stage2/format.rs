//! What distinguishes EPT from NPT: the encoding of one entry. Everything else is shared.

use super::{PageSize, Perms};

/// Bits 51:12 of an entry: the physical address of the next table or of the leaf frame.
pub(crate) const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;

/// Encoding of stage-2 entries for one vendor, as pure functions on the raw 64-bit value.
///
/// The walker only ever stores what these functions produce, and decodes what it stored.
pub trait Format {
    /// Vendor name for logs.
    const NAME: &'static str;

    /// A leaf mapping `frame` (aligned to `size`, below 2^52) with `perms` (which include
    /// [`Perms::READ`]). [`PageSize::Size2M`] is only valid in a page-directory entry.
    fn leaf(frame: u64, perms: Perms, size: PageSize) -> u64;

    /// A non-leaf entry pointing at the table at physical address `frame`.
    fn table(frame: u64) -> u64;

    /// Whether the walker would use this entry at all.
    fn is_present(entry: u64) -> bool;

    /// Whether a present page-directory entry maps a 2 MiB page rather than a table. Only
    /// meaningful in a PD entry: the same bit means something else in a PT entry.
    fn is_large(entry: u64) -> bool;

    /// Whether the CPU has marked a present leaf dirty (a guest write through it). NPT
    /// leaves have the bit always; EPT leaves only with accessed/dirty flags enabled in the
    /// EPTP (the image does not enable them, so EPT reports none).
    fn is_dirty(entry: u64) -> bool;

    /// Bits 51:12 of the entry. For a 2 MiB leaf the caller aligns down to 2 MiB, since bits
    /// 20:12 are reserved there (EPT) or hold the PAT bit (NPT).
    fn frame_of(entry: u64) -> u64 {
        entry & ADDR_MASK
    }

    /// The permissions of a present leaf.
    fn perms_of(entry: u64) -> Perms;

    /// The value handed to the CPU for a PML4 at physical address `pml4`: EPTP or nCR3.
    fn root_pointer(pml4: u64) -> u64;
}

//! AMD nested page table entries: the ordinary long-mode format (APM Vol. 2 §5.3.3, Figures
//! 5-20 to 5-25), with the rules of nested paging on top (APM Vol. 2 §15.25.5).

use super::format::Format;
use super::{PageSize, Perms};
use bitflags::bitflags;

bitflags! {
    /// Bits of a long-mode page-table entry outside the address field.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct NptFlags: u64 {
        /// Present (bit 0).
        const PRESENT = 1 << 0;
        /// Writes allowed (bit 1).
        const WRITABLE = 1 << 1;
        /// User (bit 2). Nested walks are user accesses, so every level needs it.
        const USER = 1 << 2;
        /// Page-level write-through (bit 3).
        const WRITE_THROUGH = 1 << 3;
        /// Page-level cache disable (bit 4).
        const CACHE_DISABLE = 1 << 4;
        /// Set by the CPU when the entry is used (bit 5).
        const ACCESSED = 1 << 5;
        /// Set by the CPU when the page is written (bit 6, leaves).
        const DIRTY = 1 << 6;
        /// In a PD entry: maps a 2 MiB page (bit 7).
        const LARGE = 1 << 7;
        /// No execute (bit 63). Reserved unless the host runs with EFER.NXE = 1.
        const NO_EXECUTE = 1 << 63;
    }
}

/// AMD's nested page tables.
///
/// The nested walk treats every access as a user access (APM Vol. 2 §15.25.5), so U/S is set
/// at every level; without it every guest access faults. Non-executable leaves use bit 63,
/// which is reserved (and faults as such) unless the host's EFER.NXE is set when it runs
/// VMRUN: the SVM setup must set it before mapping anything without [`Perms::EXECUTE`].
/// PWT/PCD/PAT stay clear: PAT entry 0 is write-back, so the guest's PAT decides the type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Npt {}

impl Format for Npt {
    const NAME: &'static str = "NPT";

    fn leaf(frame: u64, perms: Perms, size: PageSize) -> u64 {
        let mut flags = NptFlags::PRESENT | NptFlags::USER;
        flags.set(NptFlags::WRITABLE, perms.contains(Perms::WRITE));
        flags.set(NptFlags::NO_EXECUTE, !perms.contains(Perms::EXECUTE));
        flags.set(NptFlags::LARGE, size == PageSize::Size2M);
        frame | flags.bits()
    }

    fn table(frame: u64) -> u64 {
        // Permissions are ANDed down the walk: non-leaf entries grant everything.
        frame | (NptFlags::PRESENT | NptFlags::WRITABLE | NptFlags::USER).bits()
    }

    fn is_present(entry: u64) -> bool {
        entry & NptFlags::PRESENT.bits() != 0
    }

    fn is_dirty(entry: u64) -> bool {
        entry & NptFlags::DIRTY.bits() != 0
    }

    fn is_large(entry: u64) -> bool {
        entry & NptFlags::LARGE.bits() != 0
    }

    fn perms_of(entry: u64) -> Perms {
        let flags = NptFlags::from_bits_truncate(entry);
        let mut perms = Perms::READ;
        perms.set(Perms::WRITE, flags.contains(NptFlags::WRITABLE));
        perms.set(Perms::EXECUTE, !flags.contains(NptFlags::NO_EXECUTE));
        perms
    }

    fn root_pointer(pml4: u64) -> u64 {
        // nCR3 is a plain CR3 value; PWT/PCD clear means the tables are read write-back.
        pml4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf_4k_rwx_is_frame_present_writable_user() {
        let entry = Npt::leaf(0x123_4000, Perms::RWX, PageSize::Size4K);
        assert_eq!(entry, 0x123_4000 | 0b111);
    }

    #[test]
    fn leaf_2m_read_only_no_execute() {
        let entry = Npt::leaf(0x4020_0000, Perms::READ, PageSize::Size2M);
        assert_eq!(entry, 0x4020_0000 | 0b101 | (1 << 7) | (1 << 63));
        assert!(Npt::is_large(entry));
        assert_eq!(Npt::perms_of(entry), Perms::READ);
    }

    #[test]
    fn every_entry_has_user_set() {
        assert_eq!(Npt::table(0x9000), 0x9007);
        for bits in 0..8u8 {
            let perms = Perms::from_bits_truncate(bits) | Perms::READ;
            for size in [PageSize::Size4K, PageSize::Size2M] {
                assert_ne!(Npt::leaf(0x20_0000, perms, size) & NptFlags::USER.bits(), 0);
            }
        }
    }

    #[test]
    fn frame_of_strips_no_execute() {
        let entry = Npt::leaf(0x000F_FFFF_FFFF_F000, Perms::READ, PageSize::Size4K);
        assert_eq!(Npt::frame_of(entry), 0x000F_FFFF_FFFF_F000);
    }

    #[test]
    fn ncr3_is_the_pml4_address() {
        assert_eq!(Npt::root_pointer(0x7_0000), 0x7_0000);
    }

    #[test]
    fn presence_is_bit_0() {
        assert!(!Npt::is_present(0x1000 | 0b110));
        assert!(Npt::is_present(0b1));
    }

    #[test]
    fn perms_round_trip() {
        for bits in 0..8u8 {
            let perms = Perms::from_bits_truncate(bits) | Perms::READ;
            for size in [PageSize::Size4K, PageSize::Size2M] {
                assert_eq!(Npt::perms_of(Npt::leaf(0x20_0000, perms, size)), perms);
            }
        }
    }
}

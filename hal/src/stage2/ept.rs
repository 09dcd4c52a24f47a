//! Intel EPT entries (SDM Vol. 3C §29.3.2, Figure 29-1 and Tables 29-1 to 29-6).

use super::format::Format;
use super::{PageSize, Perms};
use bitflags::bitflags;

bitflags! {
    /// Bits of an EPT paging-structure entry below the address field.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct EptFlags: u64 {
        /// Reads allowed (bit 0).
        const READ = 1 << 0;
        /// Writes allowed (bit 1).
        const WRITE = 1 << 1;
        /// Instruction fetches allowed (bit 2; supervisor fetches when mode-based execute
        /// control is on, which we leave off).
        const EXECUTE = 1 << 2;
        /// Memory type of a leaf, bits 5:3 (the field).
        const MEMORY_TYPE = 0b111 << 3;
        /// Memory type write-back (6) in bits 5:3.
        const MEMORY_TYPE_WB = 6 << 3;
        /// Ignore the guest's PAT (bit 6 of a leaf); we leave it clear (see [`Ept`]).
        const IGNORE_PAT = 1 << 6;
        /// In a PD entry: maps a 2 MiB page (bit 7).
        const LARGE = 1 << 7;
        /// Set by the CPU when EPT accessed/dirty flags are enabled in the EPTP (we do not).
        const ACCESSED = 1 << 8;
        /// Set by the CPU on writes when EPT accessed/dirty flags are enabled (we do not).
        const DIRTY = 1 << 9;
    }
}

/// EPTP bits 2:0: paging structures are accessed write-back (SDM Vol. 3C §25.6.11).
const EPTP_MEMORY_TYPE_WB: u64 = 6;
/// EPTP bits 5:3: page-walk length minus one; 3 for four levels.
const EPTP_WALK_LENGTH_4: u64 = 3 << 3;

/// Intel's extended page tables.
///
/// Leaves are write-back with ignore-PAT clear, so the guest's own PAT still decides the
/// effective type (SDM Vol. 3C §29.3.7.2), exactly as a nested NPT leaf with PAT index 0 does
/// on AMD: the guest sees the same caching on both vendors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ept {}

impl Format for Ept {
    const NAME: &'static str = "EPT";

    fn leaf(frame: u64, perms: Perms, size: PageSize) -> u64 {
        let mut flags = EptFlags::MEMORY_TYPE_WB;
        flags.set(EptFlags::READ, perms.contains(Perms::READ));
        flags.set(EptFlags::WRITE, perms.contains(Perms::WRITE));
        flags.set(EptFlags::EXECUTE, perms.contains(Perms::EXECUTE));
        flags.set(EptFlags::LARGE, size == PageSize::Size2M);
        frame | flags.bits()
    }

    fn table(frame: u64) -> u64 {
        // Non-leaf entries grant everything; the leaf decides (permissions are ANDed down the
        // walk, SDM Vol. 3C §29.3.3.2).
        frame | (EptFlags::READ | EptFlags::WRITE | EptFlags::EXECUTE).bits()
    }

    fn is_present(entry: u64) -> bool {
        // "Not present" is bits 2:0 all clear (SDM Vol. 3C §29.3.2).
        entry & (EptFlags::READ | EptFlags::WRITE | EptFlags::EXECUTE).bits() != 0
    }

    fn is_dirty(entry: u64) -> bool {
        entry & EptFlags::DIRTY.bits() != 0
    }

    fn is_large(entry: u64) -> bool {
        entry & EptFlags::LARGE.bits() != 0
    }

    fn perms_of(entry: u64) -> Perms {
        let flags = EptFlags::from_bits_truncate(entry);
        let mut perms = Perms::empty();
        perms.set(Perms::READ, flags.contains(EptFlags::READ));
        perms.set(Perms::WRITE, flags.contains(EptFlags::WRITE));
        perms.set(Perms::EXECUTE, flags.contains(EptFlags::EXECUTE));
        perms
    }

    fn root_pointer(pml4: u64) -> u64 {
        pml4 | EPTP_WALK_LENGTH_4 | EPTP_MEMORY_TYPE_WB
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf_4k_rwx_is_frame_rwx_write_back() {
        let entry = Ept::leaf(0x123_4000, Perms::RWX, PageSize::Size4K);
        assert_eq!(entry, 0x123_4000 | 0x7 | (6 << 3));
        assert_eq!(entry, 0x123_4037);
    }

    #[test]
    fn leaf_2m_read_only_sets_large_bit() {
        let entry = Ept::leaf(0x4020_0000, Perms::READ, PageSize::Size2M);
        assert_eq!(entry, 0x4020_0000 | 0x1 | (6 << 3) | (1 << 7));
        assert!(Ept::is_large(entry));
        assert_eq!(Ept::perms_of(entry), Perms::READ);
    }

    #[test]
    fn leaf_read_execute_has_no_write_bit() {
        let entry = Ept::leaf(0x5000, Perms::READ | Perms::EXECUTE, PageSize::Size4K);
        assert_eq!(entry, 0x5000 | 0b101 | (6 << 3));
    }

    #[test]
    fn table_entry_is_rwx_without_memory_type() {
        assert_eq!(Ept::table(0xABC_D000), 0xABC_D007);
        assert!(!Ept::is_large(Ept::table(0xABC_D000)));
    }

    #[test]
    fn presence_is_any_of_bits_2_0() {
        assert!(!Ept::is_present(0));
        // Address and memory type alone do not make an entry present.
        assert!(!Ept::is_present(0x1000 | (6 << 3)));
        assert!(Ept::is_present(0b100));
    }

    #[test]
    fn frame_of_masks_flags_and_high_bits() {
        let entry = Ept::leaf(0x000F_FFFF_FFFF_F000, Perms::RWX, PageSize::Size4K);
        assert_eq!(Ept::frame_of(entry), 0x000F_FFFF_FFFF_F000);
        assert_eq!(Ept::frame_of(entry | (1 << 63)), 0x000F_FFFF_FFFF_F000);
    }

    #[test]
    fn eptp_is_write_back_four_level_walk() {
        assert_eq!(Ept::root_pointer(0x7_0000), 0x7_0000 | 6 | (3 << 3));
        assert_eq!(Ept::root_pointer(0x7_0000), 0x7_001E);
    }

    #[test]
    fn perms_round_trip() {
        for bits in 0..8u8 {
            let perms = Perms::from_bits_truncate(bits) | Perms::READ;
            for size in [PageSize::Size4K, PageSize::Size2M] {
                assert_eq!(Ept::perms_of(Ept::leaf(0x20_0000, perms, size)), perms);
            }
        }
    }
}

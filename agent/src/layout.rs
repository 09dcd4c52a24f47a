//! The RAMBlocks of the stream and where they sit in guest-physical memory.
//!
//! Faults arrive as guest-physical addresses; the stream speaks in (block, offset). For
//! QEMU's pc and q35 machines, `pc.ram` is split around the PCI hole below 4 GiB, `pc.bios`
//! sits just below 4 GiB, and the `/rom@etc/...` blobs are not guest-mapped (firmware reads
//! them through fw_cfg). The legacy window 0xA0000-0xFFFFF (VGA, option ROMs, BIOS shadow) is
//! not plain RAM and is left unmapped here.

use heapless::Vec;

use crate::config::{HOST_PAGE_SIZE, MAX_BLOCKS, MAX_GPA_REGIONS, TARGET_PAGE_SIZE};

const GIB: u64 = 1 << 30;
const FOUR_GIB: u64 = 4 * GIB;
/// Top of the guest-physical space four-level EPT/NPT tables translate (48 bits).
pub const MAX_GPA: u64 = 1 << 48;
/// The firmware window just below 4 GiB that `pc.bios` must fit in (the 16 MiB BIOS range of
/// the pc/q35 chipsets; the local APIC at 0xfee0_0000 and the I/O APIC sit just below it).
pub const BIOS_WINDOW: u64 = 16 << 20;
/// Start of the legacy VGA/ROM window on pc/q35.
pub const LEGACY_HOLE_START: u64 = 0xa_0000;
/// End of the legacy VGA/ROM window on pc/q35.
pub const LEGACY_HOLE_END: u64 = 0x10_0000;

/// The machine model, from CONFIGURATION's machine type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Machine {
    /// `pc-i440fx-*`.
    Pc,
    /// `pc-q35-*`.
    Q35,
    /// Anything else (`none`, unknown): blocks are laid out one after another from 0.
    Flat,
}

impl Machine {
    /// Classifies a machine-type name.
    pub fn from_name(name: &[u8]) -> Self {
        if name.starts_with(b"pc-i440fx-") || name == b"pc" {
            Self::Pc
        } else if name.starts_with(b"pc-q35-") || name == b"q35" {
            Self::Q35
        } else {
            Self::Flat
        }
    }

    /// Bytes of `pc.ram` mapped below 4 GiB (QEMU 7.2's `below_4g_mem_size`).
    pub const fn below_4g(self, ram: u64) -> u64 {
        match self {
            // pc: 3.5 GiB and more is split at 3 GiB (gigabyte_align).
            Self::Pc if ram >= 0xe000_0000 => 0xc000_0000,
            // q35: 2.75 GiB and more is split at 2 GiB.
            Self::Q35 if ram >= 0xb000_0000 => 0x8000_0000,
            _ => ram,
        }
    }
}

/// A RAMBlock as announced in MEM_SIZE.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    /// idstr, e.g. `pc.ram`.
    pub name: Vec<u8, 255>,
    /// used_length in bytes (page aligned).
    pub len: u64,
    /// Page size of the block (always the 4 KiB host page here).
    pub page_size: u64,
    /// First word of this block's bits in the page bitmaps.
    pub first_word: usize,
}

impl Block {
    /// Target pages in the block.
    pub const fn pages(&self) -> u64 {
        self.len / TARGET_PAGE_SIZE
    }
}

/// A guest-physical range backed by a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// First guest-physical address.
    pub gpa: u64,
    /// Bytes.
    pub len: u64,
    /// Index of the block.
    pub block: usize,
    /// Offset in the block of `gpa`.
    pub block_offset: u64,
}

/// Blocks and their guest-physical map; fixed once the block list is complete.
#[derive(Clone, Debug, Default)]
pub struct Layout {
    blocks: Vec<Block, MAX_BLOCKS>,
    regions: Vec<Region, MAX_GPA_REGIONS>,
    bitmap_words: usize,
}

/// Why the blocks cannot be laid out in guest-physical memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// The region `[start, start+len)` would not end at or below `limit`.
    DoesNotFit {
        /// Its first guest-physical address.
        start: u64,
        /// Its length.
        len: u64,
        /// The top of the window it must fit in.
        limit: u64,
    },
    /// A block longer than the window it must sit in (`pc.bios`: [`BIOS_WINDOW`]).
    TooLong {
        /// Its length.
        len: u64,
        /// The window's size.
        cap: u64,
    },
    /// The region `[start, start+len)` overlaps the region at `other`.
    Overlaps {
        /// Its first guest-physical address.
        start: u64,
        /// Its length.
        len: u64,
        /// The first guest-physical address of the region it overlaps.
        other: u64,
    },
}

/// Why a block could not be added.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddBlockError {
    /// More than `MAX_BLOCKS`.
    TooMany,
    /// Length not a multiple of the page size.
    Misaligned,
    /// The same name twice.
    Duplicate,
}

impl Layout {
    /// An empty layout.
    pub const fn new() -> Self {
        Self { blocks: Vec::new(), regions: Vec::new(), bitmap_words: 0 }
    }

    /// Adds a block from the MEM_SIZE list.
    pub fn add_block(&mut self, name: &[u8], len: u64) -> Result<usize, AddBlockError> {
        if !len.is_multiple_of(HOST_PAGE_SIZE) {
            return Err(AddBlockError::Misaligned);
        }
        if self.find(name).is_some() {
            return Err(AddBlockError::Duplicate);
        }
        let name = Vec::from_slice(name).map_err(|_| AddBlockError::TooMany)?;
        let first_word = self.bitmap_words;
        let block = Block { name, len, page_size: HOST_PAGE_SIZE, first_word };
        let words = block.pages().div_ceil(64) as usize;
        self.blocks.push(block).map_err(|_| AddBlockError::TooMany)?;
        self.bitmap_words += words;
        Ok(self.blocks.len() - 1)
    }

    /// Lays the blocks out in guest-physical memory for `machine`. Every region must fit its
    /// window (`pc.bios` the [`BIOS_WINDOW`] below 4 GiB, the rest below [`MAX_GPA`]) and no
    /// two regions may overlap; otherwise nothing is laid out. (With these windows the pc/q35
    /// regions cannot overlap; the check holds the invariant whatever the map rules become.)
    pub fn map_for(&mut self, machine: Machine) -> Result<(), MapError> {
        self.regions.clear();
        let laid = match machine {
            Machine::Pc | Machine::Q35 => self.map_pc(machine),
            Machine::Flat => self.map_flat(),
        };
        let checked = laid.and_then(|()| self.check_overlaps());
        if checked.is_err() {
            self.regions.clear();
        }
        checked
    }

    fn map_pc(&mut self, machine: Machine) -> Result<(), MapError> {
        if let Some(ram) = self.find(b"pc.ram") {
            let len = self.blocks[ram].len;
            let low = machine.below_4g(len);
            // `below_4g` keeps RAM under 3.5 GiB whole below 4 GiB, and splits larger RAM.
            let below_hole = low.min(LEGACY_HOLE_START);
            self.push_region(0, below_hole, ram, 0);
            if low > LEGACY_HOLE_END {
                self.push_region(LEGACY_HOLE_END, low - LEGACY_HOLE_END, ram, LEGACY_HOLE_END);
            }
            if len > low {
                let high = len - low;
                fits(FOUR_GIB, high, MAX_GPA)?;
                self.push_region(FOUR_GIB, high, ram, low);
            }
        }
        if let Some(bios) = self.find(b"pc.bios") {
            // The firmware ends at 4 GiB, inside the firmware window.
            let len = self.blocks[bios].len;
            if len > BIOS_WINDOW {
                return Err(MapError::TooLong { len, cap: BIOS_WINDOW });
            }
            self.push_region(FOUR_GIB - len, len, bios, 0);
        }
        Ok(())
    }

    fn map_flat(&mut self) -> Result<(), MapError> {
        let mut gpa = 0;
        for i in 0..self.blocks.len() {
            let len = self.blocks[i].len;
            fits(gpa, len, MAX_GPA)?;
            self.push_region(gpa, len, i, 0);
            gpa += len;
        }
        Ok(())
    }

    fn check_overlaps(&self) -> Result<(), MapError> {
        for (i, a) in self.regions.iter().enumerate() {
            for b in &self.regions[..i] {
                // Both end at or below MAX_GPA: the sums do not overflow.
                if a.gpa < b.gpa + b.len && b.gpa < a.gpa + a.len {
                    return Err(MapError::Overlaps { start: a.gpa, len: a.len, other: b.gpa });
                }
            }
        }
        Ok(())
    }

    fn push_region(&mut self, gpa: u64, len: u64, block: usize, block_offset: u64) {
        if len > 0 {
            // At most 4 regions on pc/q35; Flat has one per block and MAX_GPA_REGIONS >=
            // MAX_BLOCKS is asserted below, so this never overflows.
            let _ = self.regions.push(Region { gpa, len, block, block_offset });
        }
    }

    /// The blocks, in stream order.
    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    /// The guest-physical regions.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Index of the block named `name`.
    pub fn find(&self, name: &[u8]) -> Option<usize> {
        self.blocks.iter().position(|b| b.name == name)
    }

    /// Words of page bitmap the blocks need.
    pub const fn bitmap_words(&self) -> usize {
        self.bitmap_words
    }

    /// The (block, offset) behind a guest-physical address.
    pub fn gpa_to_block(&self, gpa: u64) -> Option<(usize, u64)> {
        self.regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa - r.gpa < r.len)
            .map(|r| (r.block, r.block_offset + (gpa - r.gpa)))
    }

    /// Every guest-physical address where `block`'s byte `offset` is mapped.
    pub fn block_to_gpas(&self, block: usize, offset: u64) -> impl Iterator<Item = u64> + '_ {
        self.regions
            .iter()
            .filter(move |r| r.block == block && offset >= r.block_offset && offset - r.block_offset < r.len)
            .map(move |r| r.gpa + (offset - r.block_offset))
    }
}

/// `[start, start+len)` ends at or below `limit`.
fn fits(start: u64, len: u64, limit: u64) -> Result<(), MapError> {
    match start.checked_add(len) {
        Some(end) if end <= limit => Ok(()),
        _ => Err(MapError::DoesNotFit { start, len, limit }),
    }
}

const _: () = assert!(MAX_GPA_REGIONS >= MAX_BLOCKS && MAX_GPA_REGIONS >= 4);

#[cfg(test)]
mod tests {
    use super::*;

    fn q35(ram: u64) -> Layout {
        let mut l = Layout::new();
        for (name, len) in [
            (&b"pc.ram"[..], ram),
            (b"/rom@etc/acpi/tables", 0x20000),
            (b"pc.bios", 0x40000),
            (b"pc.rom", 0x20000),
        ] {
            l.add_block(name, len).unwrap();
        }
        l.map_for(Machine::Q35).unwrap();
        l
    }

    #[test]
    fn small_q35_maps_ram_at_its_offset_around_the_legacy_hole() {
        let l = q35(64 << 20);
        assert_eq!(l.gpa_to_block(0x1000), Some((0, 0x1000)));
        assert_eq!(l.gpa_to_block(0xb_8000), None);
        assert_eq!(l.gpa_to_block(0x10_0000), Some((0, 0x10_0000)));
        assert_eq!(l.gpa_to_block((64 << 20) - 1), Some((0, (64 << 20) - 1)));
        assert_eq!(l.gpa_to_block(64 << 20), None);
        assert_eq!(l.gpa_to_block(FOUR_GIB - 0x40000), Some((2, 0)));
        assert_eq!(l.block_to_gpas(2, 0x3f000).collect::<std::vec::Vec<_>>(), [FOUR_GIB - 0x1000]);
        assert_eq!(l.block_to_gpas(1, 0).count(), 0);
    }

    #[test]
    fn large_q35_splits_ram_at_2_gib() {
        let l = q35(3 * GIB);
        assert_eq!(l.gpa_to_block(2 * GIB - 1), Some((0, 2 * GIB - 1)));
        assert_eq!(l.gpa_to_block(2 * GIB), None);
        assert_eq!(l.gpa_to_block(FOUR_GIB), Some((0, 2 * GIB)));
        assert_eq!(l.gpa_to_block(FOUR_GIB + GIB - 1), Some((0, 3 * GIB - 1)));
        assert_eq!(l.block_to_gpas(0, 2 * GIB).collect::<std::vec::Vec<_>>(), [FOUR_GIB]);
    }

    #[test]
    fn overlapping_regions_are_found() {
        let mut l = Layout::new();
        l.add_block(b"a", 0x4000).unwrap();
        l.push_region(0x1000, 0x2000, 0, 0);
        l.push_region(0x3000, 0x1000, 0, 0x2000);
        assert_eq!(l.check_overlaps(), Ok(()), "adjacent is not overlapping");
        l.push_region(0x2000, 0x1000, 0, 0);
        assert_eq!(l.check_overlaps(), Err(MapError::Overlaps { start: 0x2000, len: 0x1000, other: 0x1000 }));
    }

    #[test]
    fn regions_past_their_window_are_refused() {
        let mut l = Layout::new();
        l.add_block(b"pc.ram", 64 << 20).unwrap();
        l.add_block(b"pc.bios", BIOS_WINDOW + 0x1000).unwrap();
        assert_eq!(
            l.map_for(Machine::Pc),
            Err(MapError::TooLong { len: BIOS_WINDOW + 0x1000, cap: BIOS_WINDOW })
        );
        assert!(l.regions().is_empty(), "nothing laid out");
        assert_eq!(fits(MAX_GPA - 0x1000, 0x1000, MAX_GPA), Ok(()));
        assert_eq!(
            fits(MAX_GPA, 0x1000, MAX_GPA),
            Err(MapError::DoesNotFit { start: MAX_GPA, len: 0x1000, limit: MAX_GPA })
        );
        assert!(fits(u64::MAX, 2, MAX_GPA).is_err(), "no overflow");
    }

    #[test]
    fn pc_splits_at_3_gib_from_3_5_gib() {
        assert_eq!(Machine::Pc.below_4g(0xe000_0000), 0xc000_0000);
        assert_eq!(Machine::Pc.below_4g(0xdfff_f000), 0xdfff_f000);
        assert_eq!(Machine::from_name(b"pc-i440fx-7.2"), Machine::Pc);
        assert_eq!(Machine::from_name(b"none"), Machine::Flat);
    }
}

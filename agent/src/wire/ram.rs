//! The `ram` section body (`docs/wire-format.md` §4): the 64-bit record word, its flags, block lists, pages.

use bitflags::bitflags;

use zerocopy::byteorder::big_endian::U64;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::{counted_str, view, ParseResult, Parsed, Writer};
use crate::config::{TARGET_PAGE_BITS, TARGET_PAGE_SIZE};
use crate::error::{Defect, Field};

/// The `ram` section's idstr.
pub const RAM_IDSTR: &[u8] = b"ram";
/// The only `ram` section version 7.2 accepts.
pub const RAM_VERSION: u32 = 4;

bitflags! {
    /// Low `TARGET_PAGE_BITS` bits of a RAM record word (`docs/wire-format.md` §4).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct RamFlags: u64 {
        /// Obsolete, never sent; fatal.
        const FULL = 0x001;
        /// Page filled with one byte; 1 byte follows.
        const ZERO = 0x002;
        /// Block list header.
        const MEM_SIZE = 0x004;
        /// Raw target page follows.
        const PAGE = 0x008;
        /// End of this section's RAM data.
        const EOS = 0x010;
        /// Same block as the previous page record: no idstr.
        const CONTINUE = 0x020;
        /// Delta-encoded page (precopy, xbzrle capability).
        const XBZRLE = 0x040;
        /// RDMA only.
        const HOOK = 0x080;
        /// zlib page (compress capability).
        const COMPRESS_PAGE = 0x100;
        /// 8.0+ multifd flush; not in 7.2.
        const MULTIFD_FLUSH = 0x200;
    }
}

/// What a RAM record is: `flags & !CONTINUE` must be exactly one kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RamKind {
    /// ZERO.
    Zero,
    /// MEM_SIZE.
    MemSize,
    /// PAGE.
    Page,
    /// EOS.
    Eos,
    /// XBZRLE (refused).
    Xbzrle,
    /// HOOK (refused).
    Hook,
    /// COMPRESS_PAGE (refused).
    CompressPage,
    /// Any other combination (kept raw).
    Other(u64),
}

impl RamKind {
    /// Classifies the flag bits (CONTINUE removed).
    pub fn from_flags(flags: u64) -> Self {
        match RamFlags::from_bits_retain(flags) - RamFlags::CONTINUE {
            RamFlags::ZERO => Self::Zero,
            RamFlags::MEM_SIZE => Self::MemSize,
            RamFlags::PAGE => Self::Page,
            RamFlags::EOS => Self::Eos,
            RamFlags::XBZRLE => Self::Xbzrle,
            RamFlags::HOOK => Self::Hook,
            RamFlags::COMPRESS_PAGE => Self::CompressPage,
            other => Self::Other(other.bits()),
        }
    }

    /// Whether records of this kind name a block (unless CONTINUE).
    const fn names_block(self) -> bool {
        matches!(self, Self::Zero | Self::Page | Self::Xbzrle | Self::CompressPage)
    }
}

/// A RAM record up to (not including) its page payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RamRecord<'a> {
    /// MEM_SIZE: the sum of all block lengths; block entries follow.
    MemSize(u64),
    /// ZERO: fill the page at `offset` of `block` (None = CONTINUE) with `fill`.
    Zero {
        /// Block idstr, or `None` for CONTINUE.
        block: Option<&'a [u8]>,
        /// Byte offset inside the block.
        offset: u64,
        /// The fill byte (the source always sends 0).
        fill: u8,
    },
    /// PAGE: `TARGET_PAGE_SIZE` bytes follow.
    Page {
        /// Block idstr, or `None` for CONTINUE.
        block: Option<&'a [u8]>,
        /// Byte offset inside the block.
        offset: u64,
    },
    /// EOS.
    Eos,
}

/// The 64-bit word every RAM record starts with: flags in the low `TARGET_PAGE_BITS` bits,
/// a page-aligned value (block offset, or MEM_SIZE's total) above them.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Debug)]
#[repr(C)]
pub struct RamWord {
    /// `offset | flags`.
    pub word: U64,
}

impl RamWord {
    /// The flag bits.
    pub fn flags(&self) -> u64 {
        self.word.get() & (TARGET_PAGE_SIZE - 1)
    }

    /// The page-aligned value.
    pub fn value(&self) -> u64 {
        self.word.get() & !(TARGET_PAGE_SIZE - 1)
    }
}

const WORD: usize = core::mem::size_of::<RamWord>();

impl<'a> RamRecord<'a> {
    /// Parses a record word and what belongs to it (idstr, ZERO's fill byte).
    pub fn parse(buf: &'a [u8]) -> ParseResult<Self> {
        let word: &RamWord = match view(buf) {
            Ok(w) => w,
            Err(n) => return Ok(Parsed::Need(n)),
        };
        let (flags, value) = (word.flags(), word.value());
        let kind = RamKind::from_flags(flags);
        match kind {
            RamKind::Xbzrle | RamKind::Hook | RamKind::CompressPage => {
                return Err((Field::RamFlags, Defect::Unsupported));
            }
            RamKind::Other(bits) => return Err((Field::RamFlags, Defect::Unknown { found: bits })),
            _ => {}
        }
        let continued = flags & RamFlags::CONTINUE.bits() != 0;
        let (block, at) = if kind.names_block() && !continued {
            match counted_str(buf, WORD, Field::RamBlockName)? {
                Ok((name, at)) => (Some(name), at),
                Err(n) => return Ok(Parsed::Need(n)),
            }
        } else {
            (None, WORD)
        };
        let record = match kind {
            RamKind::MemSize => Self::MemSize(value),
            RamKind::Eos => Self::Eos,
            RamKind::Page => Self::Page { block, offset: value },
            RamKind::Zero => match buf.get(at) {
                Some(&fill) => return Ok(Parsed::Done(Self::Zero { block, offset: value, fill }, at + 1)),
                None => return Ok(Parsed::Need(at + 1)),
            },
            _ => return Err((Field::RamFlags, Defect::Unsupported)),
        };
        Ok(Parsed::Done(record, at))
    }

    /// Writes the record (without a PAGE's payload).
    pub fn emit(&self, w: &mut Writer<'_>) -> Option<()> {
        let (value, flags, block) = match *self {
            Self::MemSize(total) => (total, RamFlags::MEM_SIZE, None),
            Self::Eos => (0, RamFlags::EOS, None),
            Self::Zero { block, offset, .. } => (offset, RamFlags::ZERO, block),
            Self::Page { block, offset } => (offset, RamFlags::PAGE, block),
        };
        let flags = if block.is_none() && matches!(self, Self::Zero { .. } | Self::Page { .. }) {
            flags | RamFlags::CONTINUE
        } else {
            flags
        };
        if value & (TARGET_PAGE_SIZE - 1) != 0 {
            return None;
        }
        w.put(RamWord { word: U64::new(value | flags.bits()) }.as_bytes())?;
        if let Some(name) = block {
            w.put_counted(name)?;
        }
        match self {
            Self::Zero { fill, .. } => w.put(&[*fill]),
            _ => Some(()),
        }
    }
}

/// One entry of the MEM_SIZE block list: `u8 L, L idstr, be64 used_length`. (The optional
/// `page_size` field is never present: ADVISE has already required 4 KiB pages everywhere,
/// and without postcopy-ram the source never writes it.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockEntry<'a> {
    /// RAMBlock idstr, e.g. `pc.ram`.
    pub name: &'a [u8],
    /// Bytes.
    pub used_length: u64,
}

impl<'a> BlockEntry<'a> {
    /// Parses one entry.
    pub fn parse(buf: &'a [u8]) -> ParseResult<Self> {
        let (name, at) = match counted_str(buf, 0, Field::RamBlockList)? {
            Ok(v) => v,
            Err(n) => return Ok(Parsed::Need(n)),
        };
        let Some(len) = buf.get(at..at + 8) else {
            return Ok(Parsed::Need(at + 8));
        };
        let used_length =
            u64::from_be_bytes([len[0], len[1], len[2], len[3], len[4], len[5], len[6], len[7]]);
        Ok(Parsed::Done(Self { name, used_length }, at + 8))
    }

    /// Writes one entry.
    pub fn emit(&self, w: &mut Writer<'_>) -> Option<()> {
        w.put_counted(self.name)?;
        w.put(&self.used_length.to_be_bytes())
    }
}

const _: () = assert!(TARGET_PAGE_SIZE == 1 << TARGET_PAGE_BITS);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_from_real_qemu() {
        // `-machine none -m 32` START body: MEM_SIZE 0x2000000, "ram" 32 MiB, EOS.
        let body = b"\x00\x00\x00\x00\x02\x00\x00\x04\x03ram\x00\x00\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x10";
        assert_eq!(RamRecord::parse(body), Ok(Parsed::Done(RamRecord::MemSize(0x200_0000), 8)));
        let entry = BlockEntry { name: b"ram", used_length: 0x200_0000 };
        assert_eq!(BlockEntry::parse(&body[8..]), Ok(Parsed::Done(entry, 12)));
        assert_eq!(RamRecord::parse(&body[20..]), Ok(Parsed::Done(RamRecord::Eos, 8)));
        // dirty3: the answer to a request, PAGE|CONTINUE at pc.ram 0x1c0000.
        let page = b"\x00\x00\x00\x00\x00\x1c\x00\x28";
        assert_eq!(
            RamRecord::parse(page),
            Ok(Parsed::Done(RamRecord::Page { block: None, offset: 0x1c_0000 }, 8))
        );
        // PAGE with idstr: pc.bios 0x3f000.
        let named = b"\x00\x00\x00\x00\x00\x03\xf0\x08\x07pc.bios";
        assert_eq!(
            RamRecord::parse(named),
            Ok(Parsed::Done(RamRecord::Page { block: Some(b"pc.bios"), offset: 0x3f000 }, 16))
        );
    }

    #[test]
    fn flag_combinations_are_refused() {
        let both = (RamFlags::ZERO | RamFlags::PAGE).bits().to_be_bytes();
        assert_eq!(RamRecord::parse(&both), Err((Field::RamFlags, Defect::Unknown { found: 0xa })));
        let full = RamFlags::FULL.bits().to_be_bytes();
        assert_eq!(RamRecord::parse(&full), Err((Field::RamFlags, Defect::Unknown { found: 1 })));
        let xbzrle = RamFlags::XBZRLE.bits().to_be_bytes();
        assert_eq!(RamRecord::parse(&xbzrle), Err((Field::RamFlags, Defect::Unsupported)));
    }
}

//! POSTCOPY_RAM_DISCARD payloads: QEMU 7.2 byte ranges (`docs/wire-format.md` §5) and the seed's v5
//! semi-sparse bitmap (§8).

use zerocopy::byteorder::big_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::command::Dialect;
use super::{view, ParseResult, Parsed, Writer};
use crate::error::{Defect, Field};

/// The part of a RAM_DISCARD payload before its entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiscardHeader<'a> {
    /// RAMBlock name (without the 7.2 NUL).
    pub block: &'a [u8],
    /// v5 only: subtract from every bit position (page units); `None` in 7.2.
    pub first_bit_offset: Option<u8>,
    /// Number of entries that follow: [`DiscardRange`] (7.2) or [`DiscardMask`] (v5).
    pub entries: u16,
}

impl<'a> DiscardHeader<'a> {
    /// Bytes of one entry in a dialect.
    pub const fn entry_len(dialect: Dialect) -> usize {
        match dialect {
            Dialect::Qemu72 => DiscardRange::LEN,
            Dialect::SeedV5 => DiscardMask::LEN,
        }
    }

    /// Parses the header from the command payload; `len` is the command's payload length.
    ///
    /// 7.2: `u8 version(0), u8 L, L name, u8 NUL, n x (be64 start, be64 len)`, `len >= 20`.
    /// v5: `u8 version(0), u8 first_bit_offset, u8 L, L name, n x (be64 start, be32 mask)`,
    /// `len >= 16`.
    pub fn parse(payload: &'a [u8], len: u16, dialect: Dialect) -> ParseResult<Self> {
        let (min_len, name_at) = match dialect {
            Dialect::Qemu72 => (20u16, 1),
            Dialect::SeedV5 => (16u16, 2),
        };
        if len < min_len {
            return Err((
                Field::CommandLength,
                Defect::BadValue { found: len.into(), expected: min_len.into() },
            ));
        }
        let Some(fixed) = payload.get(..name_at + 1) else {
            return Ok(Parsed::Need(name_at + 1));
        };
        if fixed[0] != 0 {
            return Err((Field::DiscardVersion, Defect::BadValue { found: fixed[0].into(), expected: 0 }));
        }
        let name_len = usize::from(fixed[name_at]);
        if name_len == 0 {
            return Err((Field::DiscardBlockName, Defect::BadValue { found: 0, expected: 1 }));
        }
        let nul = usize::from(dialect == Dialect::Qemu72);
        let header_len = name_at + 1 + name_len + nul;
        if header_len > usize::from(len) {
            return Err((
                Field::CommandLength,
                Defect::BadValue { found: len.into(), expected: header_len as u64 },
            ));
        }
        let Some(header) = payload.get(..header_len) else {
            return Ok(Parsed::Need(header_len));
        };
        if nul == 1 && header[header_len - 1] != 0 {
            let found = header[header_len - 1].into();
            return Err((Field::DiscardBlockName, Defect::BadValue { found, expected: 0 }));
        }
        let body = usize::from(len) - header_len;
        let entry = Self::entry_len(dialect);
        if body % entry != 0 || body == 0 {
            let expected = (header_len + entry * (body / entry).max(1)) as u64;
            return Err((Field::CommandLength, Defect::BadValue { found: len.into(), expected }));
        }
        let parsed = Self {
            block: &header[name_at + 1..name_at + 1 + name_len],
            first_bit_offset: (dialect == Dialect::SeedV5).then_some(fixed[1]),
            entries: (body / entry) as u16,
        };
        Ok(Parsed::Done(parsed, header_len))
    }

    /// Writes the header; returns the command payload length including the entries.
    pub fn emit(&self, dialect: Dialect, w: &mut Writer<'_>) -> Option<usize> {
        let start = w.len();
        w.put(&[0])?;
        if dialect == Dialect::SeedV5 {
            w.put(&[self.first_bit_offset.unwrap_or(0)])?;
        }
        w.put_counted(self.block)?;
        if dialect == Dialect::Qemu72 {
            w.put(&[0])?;
        }
        Some(w.len() - start + usize::from(self.entries) * Self::entry_len(dialect))
    }
}

/// A 7.2 discard entry: a byte range inside the block.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct DiscardRange {
    /// Byte offset inside the block.
    pub start: U64,
    /// Length in bytes.
    pub len: U64,
}

impl DiscardRange {
    /// Length on the wire.
    pub const LEN: usize = 16;

    /// Parses one entry.
    pub fn parse(buf: &[u8]) -> ParseResult<(u64, u64)> {
        match view::<Self>(buf) {
            Ok(r) => Ok(Parsed::Done((r.start.get(), r.len.get()), Self::LEN)),
            Err(n) => Ok(Parsed::Need(n)),
        }
    }

    /// Writes one entry.
    pub fn emit(start: u64, len: u64, w: &mut Writer<'_>) -> Option<()> {
        w.put(Self { start: U64::new(start), len: U64::new(len) }.as_bytes())
    }
}

/// A v5 discard entry: 32 pages starting at page `start`, bit i set = discard page
/// `start + i - first_bit_offset`.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct DiscardMask {
    /// First page of the mask word (target pages).
    pub start: U64,
    /// One bit per page.
    pub mask: U32,
}

impl DiscardMask {
    /// Length on the wire.
    pub const LEN: usize = 12;

    /// Parses one entry.
    pub fn parse(buf: &[u8]) -> ParseResult<(u64, u32)> {
        match view::<Self>(buf) {
            Ok(r) => Ok(Parsed::Done((r.start.get(), r.mask.get()), Self::LEN)),
            Err(n) => Ok(Parsed::Need(n)),
        }
    }

    /// Writes one entry.
    pub fn emit(start: u64, mask: u32, w: &mut Writer<'_>) -> Option<()> {
        w.put(Self { start: U64::new(start), mask: U32::new(mask) }.as_bytes())
    }
}

/// The page runs `(first_page, pages)` of one v5 mask entry, in order.
///
/// A bit set below `first_bit_offset` of the entry whose start is page 0 would name a page
/// before the block: that is the seed's "bit set prior to block" error.
#[derive(Clone, Copy, Debug)]
pub struct MaskRuns {
    start: u64,
    mask: u32,
    first_bit_offset: u8,
}

impl MaskRuns {
    /// Iterates the runs of an entry.
    pub const fn new(start: u64, mask: u32, first_bit_offset: u8) -> Self {
        Self { start, mask, first_bit_offset }
    }
}

impl Iterator for MaskRuns {
    /// `Ok((first_page, pages))`, or `Err(bit)` for a bit that lies before page 0 (or past
    /// the end of the 64-bit page space).
    type Item = Result<(u64, u64), u32>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.mask == 0 {
            return None;
        }
        let first = self.mask.trailing_zeros();
        // Bits from `first` upwards that are set, until the first clear one.
        let run = (self.mask >> first).trailing_ones();
        self.mask &= if first + run >= 32 { 0 } else { !0u32 << (first + run) };
        let page = self
            .start
            .checked_add(u64::from(first))
            .and_then(|p| p.checked_sub(u64::from(self.first_bit_offset)));
        Some(page.map(|p| (p, u64::from(run))).ok_or(first))
    }
}

/// Encodes sorted, non-overlapping page runs `(first_page, pages)` the way the v5 source
/// did: one `(start, mask)` entry per 32-page word that holds a discarded page, words aligned
/// to 32 pages of the block (so `first_bit_offset` is 0). Calls `emit` per entry, in order.
pub fn encode_masks(runs: impl IntoIterator<Item = (u64, u64)>, mut emit: impl FnMut(u64, u32)) {
    let mut word: Option<(u64, u32)> = None;
    for (first, pages) in runs {
        let mut page = first;
        let end = first.saturating_add(pages);
        while page < end {
            let base = page & !31;
            let upto = end.min(base + 32);
            let bits = (upto - page) as u32;
            let mask = if bits == 32 { u32::MAX } else { ((1u32 << bits) - 1) << (page - base) };
            word = match word {
                Some((b, m)) if b == base => Some((b, m | mask)),
                Some((b, m)) => {
                    emit(b, m);
                    Some((base, mask))
                }
                None => Some((base, mask)),
            };
            page = upto;
        }
    }
    if let Some((b, m)) = word {
        emit(b, m);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_from_real_qemu() {
        // `-machine none`: 08 0006 0016 00 03 "ram" 00 000000000044a000 0000000001bb6000.
        let payload = b"\x00\x03ram\x00\x00\x00\x00\x00\x00\x44\xa0\x00\x00\x00\x00\x00\x01\xbb\x60\x00";
        let header = DiscardHeader { block: b"ram", first_bit_offset: None, entries: 1 };
        assert_eq!(DiscardHeader::parse(payload, 0x16, Dialect::Qemu72), Ok(Parsed::Done(header, 6)));
        assert_eq!(DiscardRange::parse(&payload[6..]), Ok(Parsed::Done((0x44a000, 0x1bb6000), 16)));
    }

    #[test]
    fn missing_nul_and_bad_lengths_are_typed() {
        let payload = b"\x00\x03ramX\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x10\x00";
        assert_eq!(
            DiscardHeader::parse(payload, 22, Dialect::Qemu72),
            Err((Field::DiscardBlockName, Defect::BadValue { found: b'X'.into(), expected: 0 }))
        );
        let good = b"\x00\x03ram\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x10\x00\x00";
        // 23 = 6 + 16 + 1: one stray byte after the ranges.
        assert_eq!(
            DiscardHeader::parse(good, 23, Dialect::Qemu72),
            Err((Field::CommandLength, Defect::BadValue { found: 23, expected: 22 }))
        );
        assert!(matches!(DiscardHeader::parse(good, 19, Dialect::Qemu72), Err((Field::CommandLength, _))));
    }

    #[test]
    fn masks_encode_and_decode_to_the_same_runs() {
        let runs = [(3u64, 2u64), (7, 1), (30, 40), (200, 1)];
        let mut entries = std::vec::Vec::new();
        encode_masks(runs, |s, m| entries.push((s, m)));
        assert_eq!(entries, [(0, 0b1001_1000 | 0xc000_0000), (32, u32::MAX), (64, 0x3f), (192, 1 << 8)]);
        let mut back = std::vec::Vec::new();
        for (s, m) in entries {
            back.extend(MaskRuns::new(s, m, 0).map(Result::unwrap));
        }
        assert_eq!(back, [(3, 2), (7, 1), (30, 2), (32, 32), (64, 6), (200, 1)]);
    }

    #[test]
    fn v5_mask_runs() {
        let runs: heapless::Vec<_, 8> = MaskRuns::new(64, 0b1110_0000_1111_0001, 0).collect();
        assert_eq!(&runs[..], &[Ok((64, 1)), Ok((68, 4)), Ok((77, 3))]);
        let full: heapless::Vec<_, 2> = MaskRuns::new(0, u32::MAX, 0).collect();
        assert_eq!(&full[..], &[Ok((0, 32))]);
        // first_bit_offset 3: bit 1 of the entry at page 0 is before the block.
        let early: heapless::Vec<_, 2> = MaskRuns::new(0, 0b10, 3).collect();
        assert_eq!(&early[..], &[Err(1)]);
        // A hostile start at the top of the page space does not overflow.
        let top: heapless::Vec<_, 2> = MaskRuns::new(u64::MAX, 0b10, 0).collect();
        assert_eq!(&top[..], &[Err(1)]);
    }
}

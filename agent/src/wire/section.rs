//! Device section headers and footers (`docs/wire-format.md` §3).

use zerocopy::byteorder::big_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::{counted_str, view, ParseResult, Parsed, SectionType, Writer};
use crate::error::{Defect, Field};

/// Fields after the idstr of a full header.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Debug)]
#[repr(C)]
struct FullHeaderTail {
    instance_id: U32,
    version_id: U32,
}

/// The header of a START (`0x01`) or FULL (`0x04`) record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FullHeader<'a> {
    /// `true` for START (iterative section), `false` for FULL.
    pub start: bool,
    /// Chosen by the source; PART/END/footer refer to it. Never a constant.
    pub section_id: u32,
    /// Device id, e.g. `ram`, `cpu`, `0000:00:1f.0/ICH9LPC`.
    pub idstr: &'a [u8],
    /// Device instance.
    pub instance_id: u32,
    /// Encoding version of the body.
    pub version_id: u32,
}

impl<'a> FullHeader<'a> {
    /// Parses the header (type byte included).
    pub fn parse(buf: &'a [u8]) -> ParseResult<Self> {
        let Some(&kind) = buf.first() else {
            return Ok(Parsed::Need(1));
        };
        let start = match SectionType::from_byte(kind) {
            SectionType::Start => true,
            SectionType::Full => false,
            _ => return Err((Field::SectionType, Defect::Unknown { found: kind.into() })),
        };
        let Some(id) = buf.get(1..5) else {
            return Ok(Parsed::Need(5));
        };
        let section_id = u32::from_be_bytes([id[0], id[1], id[2], id[3]]);
        let (idstr, at) = match counted_str(buf, 5, Field::SectionIdstr)? {
            Ok(v) => v,
            Err(n) => return Ok(Parsed::Need(n)),
        };
        let tail: &FullHeaderTail = match view(buf.get(at..).unwrap_or_default()) {
            Ok(t) => t,
            Err(n) => return Ok(Parsed::Need(at + n)),
        };
        let header = Self {
            start,
            section_id,
            idstr,
            instance_id: tail.instance_id.get(),
            version_id: tail.version_id.get(),
        };
        Ok(Parsed::Done(header, at + 8))
    }

    /// Writes the header.
    pub fn emit(&self, w: &mut Writer<'_>) -> Option<()> {
        let kind = if self.start { SectionType::Start } else { SectionType::Full };
        w.put(&[kind.to_byte()])?;
        w.put(&self.section_id.to_be_bytes())?;
        w.put_counted(self.idstr)?;
        let tail =
            FullHeaderTail { instance_id: U32::new(self.instance_id), version_id: U32::new(self.version_id) };
        w.put(tail.as_bytes())
    }
}

/// A PART (`0x02`), END (`0x03`) header or a footer (`0x7e`): type byte and section id.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Debug)]
#[repr(C)]
pub struct ShortHeader {
    /// `0x02`, `0x03` or `0x7e`.
    pub kind: u8,
    /// The section id of an earlier START.
    pub section_id: U32,
}

impl ShortHeader {
    /// Length on the wire.
    pub const LEN: usize = 5;

    /// Parses a PART/END header or a footer; the caller checks `kind`.
    pub fn parse(buf: &[u8]) -> ParseResult<(u8, u32)> {
        match view::<Self>(buf) {
            Ok(h) => Ok(Parsed::Done((h.kind, h.section_id.get()), Self::LEN)),
            Err(n) => Ok(Parsed::Need(n)),
        }
    }

    /// Writes a short header or footer.
    pub fn emit(kind: SectionType, section_id: u32, w: &mut Writer<'_>) -> Option<()> {
        let h = Self { kind: kind.to_byte(), section_id: U32::new(section_id) };
        w.put(h.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_start_header_from_real_qemu() {
        // `-machine none -m 32` START record head: 01 00000002 03 "ram" 00000000 00000004.
        let cap = b"\x01\x00\x00\x00\x02\x03ram\x00\x00\x00\x00\x00\x00\x00\x04";
        let expected =
            FullHeader { start: true, section_id: 2, idstr: b"ram", instance_id: 0, version_id: 4 };
        assert_eq!(FullHeader::parse(cap), Ok(Parsed::Done(expected, 17)));
        for cut in 0..cap.len() {
            assert!(matches!(FullHeader::parse(&cap[..cut]), Ok(Parsed::Need(n)) if n > cut));
        }
        let mut out = [0u8; 17];
        expected.emit(&mut Writer::new(&mut out)).unwrap();
        assert_eq!(&out, cap);
    }
}

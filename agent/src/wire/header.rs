//! Stream header and CONFIGURATION (`docs/wire-format.md` §2).

use zerocopy::byteorder::big_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::{counted_str, view, FieldError, ParseResult, Parsed, SectionType, Writer};
use crate::config::MAX_MACHINE_NAME;
use crate::error::{Defect, Field};

/// "QEVM".
pub const MAGIC: u32 = 0x5145_564d;
/// The only stream version QEMU 7.2 accepts.
pub const VERSION: u32 = 3;

/// The 8-byte stream header.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Debug)]
#[repr(C)]
pub struct StreamHeader {
    /// Must be [`MAGIC`].
    pub magic: U32,
    /// Must be [`VERSION`].
    pub version: U32,
}

impl StreamHeader {
    /// Length on the wire.
    pub const LEN: usize = core::mem::size_of::<Self>();

    /// Checks magic and version.
    pub fn parse(buf: &[u8]) -> ParseResult<()> {
        let h: &Self = match view(buf) {
            Ok(h) => h,
            Err(n) => return Ok(Parsed::Need(n)),
        };
        if h.magic.get() != MAGIC {
            return Err(bad(Field::Magic, h.magic.get(), MAGIC));
        }
        if h.version.get() != VERSION {
            return Err(bad(Field::Version, h.version.get(), VERSION));
        }
        Ok(Parsed::Done((), Self::LEN))
    }

    /// Writes a valid header.
    pub fn emit(w: &mut Writer<'_>) -> Option<()> {
        let h = Self { magic: U32::new(MAGIC), version: U32::new(VERSION) };
        w.put(h.as_bytes())
    }
}

fn bad(field: Field, found: u32, expected: u32) -> FieldError {
    (field, Defect::BadValue { found: found.into(), expected: expected.into() })
}

/// Head of the CONFIGURATION record: type byte, then the be32 machine-name length.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Debug)]
#[repr(C)]
struct ConfigurationHead {
    kind: u8,
    name_len: U32,
}

/// `0x07 <be32 N> <N bytes machine name>`; subsections follow as separate records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Configuration<'a> {
    /// Machine type, e.g. `pc-i440fx-7.2`.
    pub machine: &'a [u8],
}

impl<'a> Configuration<'a> {
    /// Parses the record (the type byte included).
    pub fn parse(buf: &'a [u8]) -> ParseResult<Self> {
        let head: &ConfigurationHead = match view(buf) {
            Ok(h) => h,
            Err(n) => return Ok(Parsed::Need(n)),
        };
        let len = head.name_len.get();
        if len as usize > MAX_MACHINE_NAME {
            let cap = MAX_MACHINE_NAME as u64;
            return Err((Field::MachineName, Defect::TooLong { len: len.into(), cap }));
        }
        let end = 5 + len as usize;
        match buf.get(5..end) {
            Some(machine) => Ok(Parsed::Done(Self { machine }, end)),
            None => Ok(Parsed::Need(end)),
        }
    }

    /// Writes the record.
    pub fn emit(&self, w: &mut Writer<'_>) -> Option<()> {
        let len = u32::try_from(self.machine.len()).ok()?;
        let head = ConfigurationHead { kind: SectionType::Configuration.to_byte(), name_len: U32::new(len) };
        w.put(head.as_bytes())?;
        w.put(self.machine)
    }
}

/// A CONFIGURATION subsection (`0x05`, name, be32 version, fields). 7.2 sends three kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigSubsection<'a> {
    /// `configuration/target-page-bits`: `be32`.
    TargetPageBits(u32),
    /// `configuration/capabilities`: the count of validated capabilities; the names follow
    /// as counted strings, returned one by one as [`CapabilityName`].
    Capabilities(u32),
    /// `configuration/uuid`: 16 raw bytes.
    Uuid(&'a [u8; 16]),
}

/// One capability name inside `configuration/capabilities`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapabilityName<'a>(pub &'a [u8]);

impl<'a> CapabilityName<'a> {
    /// Parses one counted string.
    pub fn parse(buf: &'a [u8]) -> ParseResult<Self> {
        match counted_str(buf, 0, Field::ConfigSubsection)? {
            Ok((name, end)) => Ok(Parsed::Done(Self(name), end)),
            Err(n) => Ok(Parsed::Need(n)),
        }
    }
}

const TARGET_PAGE_BITS: &[u8] = b"configuration/target-page-bits";
const CAPABILITIES: &[u8] = b"configuration/capabilities";
const UUID: &[u8] = b"configuration/uuid";

impl<'a> ConfigSubsection<'a> {
    /// Parses a subsection record (type byte `0x05` included) with its fixed fields.
    pub fn parse(buf: &'a [u8]) -> ParseResult<Self> {
        let (name, at) = match counted_str(buf, 1, Field::ConfigSubsection)? {
            Ok(v) => v,
            Err(n) => return Ok(Parsed::Need(n)),
        };
        let Some(version) = buf.get(at..at + 4) else {
            return Ok(Parsed::Need(at + 4));
        };
        let version = u32::from_be_bytes([version[0], version[1], version[2], version[3]]);
        if version != 1 {
            return Err(bad(Field::ConfigSubsection, version, 1));
        }
        let body = at + 4;
        let field_len = match name {
            TARGET_PAGE_BITS | CAPABILITIES => 4,
            UUID => 16,
            _ => return Err((Field::ConfigSubsection, Defect::Unsupported)),
        };
        let Some(fields) = buf.get(body..body + field_len) else {
            return Ok(Parsed::Need(body + field_len));
        };
        let sub = match (name, <&[u8; 16]>::try_from(fields)) {
            (UUID, Ok(uuid)) => Self::Uuid(uuid),
            _ => {
                let v = u32::from_be_bytes([fields[0], fields[1], fields[2], fields[3]]);
                if name == TARGET_PAGE_BITS {
                    Self::TargetPageBits(v)
                } else {
                    Self::Capabilities(v)
                }
            }
        };
        Ok(Parsed::Done(sub, body + field_len))
    }

    /// Writes the subsection (for `Capabilities`, the names must follow separately).
    pub fn emit(&self, w: &mut Writer<'_>) -> Option<()> {
        w.put(&[SectionType::Subsection.to_byte()])?;
        let (name, value): (&[u8], &[u8]) = match self {
            Self::TargetPageBits(_) => (TARGET_PAGE_BITS, &[]),
            Self::Capabilities(_) => (CAPABILITIES, &[]),
            Self::Uuid(u) => (UUID, &u[..]),
        };
        w.put_counted(name)?;
        w.put(&1u32.to_be_bytes())?;
        match self {
            Self::TargetPageBits(v) | Self::Capabilities(v) => w.put(&v.to_be_bytes()),
            Self::Uuid(_) => w.put(value),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_from_real_qemu() {
        let cap = [0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3];
        assert_eq!(StreamHeader::parse(&cap), Ok(Parsed::Done((), 8)));
        assert_eq!(StreamHeader::parse(&cap[..5]), Ok(Parsed::Need(8)));
        let mut v2 = cap;
        v2[7] = 2;
        assert_eq!(
            StreamHeader::parse(&v2),
            Err((Field::Version, Defect::BadValue { found: 2, expected: 3 }))
        );
    }

    #[test]
    fn configuration_and_uuid_from_real_qemu() {
        // Observed with validate-uuid and -uuid 12345678-9abc-def0-1122-334455667788 (49 bytes).
        let mut cap = [0u8; 49];
        cap[..9].copy_from_slice(b"\x07\x00\x00\x00\x04none");
        cap[9..11].copy_from_slice(&[0x05, 0x12]);
        cap[11..29].copy_from_slice(b"configuration/uuid");
        cap[29..33].copy_from_slice(&[0, 0, 0, 1]);
        let uuid =
            [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88];
        cap[33..].copy_from_slice(&uuid);
        assert_eq!(Configuration::parse(&cap), Ok(Parsed::Done(Configuration { machine: b"none" }, 9)));
        assert_eq!(ConfigSubsection::parse(&cap[9..]), Ok(Parsed::Done(ConfigSubsection::Uuid(&uuid), 40)));
    }
}

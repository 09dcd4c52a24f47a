//! The project's own vCPU record: the architectural state a vCPU resumes from, carried as a
//! FULL device section (`idstr` [`VCPU_IDSTR`], instance = vCPU index, version
//! [`VCPU_RECORD_VERSION`]) inside the PACKAGED blob, between LISTEN and RUN, where QEMU puts
//! its own `cpu` sections. The project's source (`postcopy-source`) sends it for its test
//! guests; the hypervisor restores the vCPU from it. Big-endian, fixed size.

use zerocopy::byteorder::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::section::FullHeader;
use super::{view, ParseResult, Parsed, SectionType, Writer};
use crate::error::{Defect, Field};

/// The record's section idstr.
pub const VCPU_IDSTR: &[u8] = b"postcopy/vcpu";
/// The record's section version (and the `version` field).
pub const VCPU_RECORD_VERSION: u32 = 1;
/// `magic`: "PCVC".
pub const VCPU_MAGIC: u32 = u32::from_be_bytes(*b"PCVC");

/// A segment register as SVM's VMCB holds it (AMD APM vol. 2, 15.5.1): selector, attributes
/// (type, S, DPL, P, AVL, L, D/B, G in 12 bits), limit, base.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct Segment {
    /// Selector.
    pub selector: U16,
    /// Attributes, VMCB format.
    pub attrib: U16,
    /// Limit.
    pub limit: U32,
    /// Base.
    pub base: U64,
}

/// The record body.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct VcpuRecord {
    /// [`VCPU_MAGIC`].
    pub magic: U32,
    /// [`VCPU_RECORD_VERSION`].
    pub version: U32,
    /// RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8-R15 (the encoding order).
    pub gprs: [U64; 16],
    /// RIP.
    pub rip: U64,
    /// RFLAGS.
    pub rflags: U64,
    /// CR0.
    pub cr0: U64,
    /// CR3.
    pub cr3: U64,
    /// CR4.
    pub cr4: U64,
    /// EFER (without SVME: the hypervisor adds it).
    pub efer: U64,
    /// CS.
    pub cs: Segment,
    /// DS, ES, SS, FS and GS (one flat data segment).
    pub data: Segment,
    /// GDTR base.
    pub gdtr_base: U64,
    /// GDTR limit.
    pub gdtr_limit: U32,
    /// IDTR base.
    pub idtr_base: U64,
    /// IDTR limit.
    pub idtr_limit: U32,
}

impl VcpuRecord {
    /// Bytes of the body.
    pub const LEN: usize = core::mem::size_of::<Self>();

    /// Parses a whole FULL section holding a vCPU record (header, body, footer): the vCPU
    /// index and the record. `Ok(None)` if the section is another device's.
    pub fn parse_section(buf: &[u8]) -> ParseResult<Option<(u32, Self)>> {
        let (header, at) = match FullHeader::parse(buf)? {
            Parsed::Done(h, n) => (h, n),
            Parsed::Need(n) => return Ok(Parsed::Need(n)),
        };
        if header.start || header.idstr != VCPU_IDSTR {
            return Ok(Parsed::Done(None, at));
        }
        if header.version_id != VCPU_RECORD_VERSION {
            let (found, expected) = (header.version_id.into(), VCPU_RECORD_VERSION.into());
            return Err((Field::SectionVersion, Defect::BadValue { found, expected }));
        }
        let record: &Self = match view(buf.get(at..).unwrap_or_default()) {
            Ok(r) => r,
            Err(n) => return Ok(Parsed::Need(at + n)),
        };
        if record.magic.get() != VCPU_MAGIC || record.version.get() != VCPU_RECORD_VERSION {
            let found = u64::from(record.magic.get()) << 32 | u64::from(record.version.get());
            let expected = u64::from(VCPU_MAGIC) << 32 | u64::from(VCPU_RECORD_VERSION);
            return Err((Field::DeviceState, Defect::BadValue { found, expected }));
        }
        let end = at + Self::LEN;
        let Some(footer) = buf.get(end..end + 5) else { return Ok(Parsed::Need(end + 5)) };
        if footer[0] != SectionType::Footer.to_byte() || footer[1..5] != header.section_id.to_be_bytes() {
            return Err((Field::SectionFooter, Defect::BadValue { found: footer[0].into(), expected: 0x7e }));
        }
        Ok(Parsed::Done(Some((header.instance_id, *record)), end + 5))
    }

    /// Writes the whole FULL section for vCPU `index` with section id `section_id`.
    pub fn emit_section(&self, section_id: u32, index: u32, w: &mut Writer<'_>) -> Option<()> {
        let header = FullHeader {
            start: false,
            section_id,
            idstr: VCPU_IDSTR,
            instance_id: index,
            version_id: VCPU_RECORD_VERSION,
        };
        header.emit(w)?;
        w.put(self.as_bytes())?;
        w.put(&[SectionType::Footer.to_byte()])?;
        w.put(&section_id.to_be_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::FromZeros;

    #[test]
    fn a_record_round_trips_and_other_sections_are_skipped() {
        let mut r = VcpuRecord::new_zeroed();
        r.magic = U32::new(VCPU_MAGIC);
        r.version = U32::new(VCPU_RECORD_VERSION);
        r.rip = U64::new(0x10_0000);
        r.cs.attrib = U16::new(0x29b);
        let mut buf = [0u8; 512];
        let mut w = Writer::new(&mut buf);
        r.emit_section(7, 0, &mut w).unwrap();
        let n = w.len();
        assert_eq!(VcpuRecord::parse_section(&buf[..n]), Ok(Parsed::Done(Some((0, r)), n)));
        for cut in 0..n {
            assert!(matches!(VcpuRecord::parse_section(&buf[..cut]), Ok(Parsed::Need(_))), "cut {cut}");
        }
        buf[n - 1] ^= 1;
        assert_eq!(VcpuRecord::parse_section(&buf[..n]).unwrap_err().0, Field::SectionFooter);
        let other =
            FullHeader { start: false, section_id: 3, idstr: b"timer", instance_id: 0, version_id: 1 };
        let mut w = Writer::new(&mut buf);
        other.emit(&mut w).unwrap();
        let n = w.len();
        assert_eq!(VcpuRecord::parse_section(&buf[..n]), Ok(Parsed::Done(None, n)));
    }
}

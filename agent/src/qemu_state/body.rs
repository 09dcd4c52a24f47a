//! Reading a VMState body out of the device state: the fixed fields through a zerocopy
//! mirror, then the subsections. Errors carry the offset in the device state of the field
//! the defect is in and name that field ([`VmFieldRef`]).

use zerocopy::{FromBytes, Immutable, KnownLayout, Unaligned};

use super::layout::{VmFieldRef, VmStruct};
use crate::error::{Defect, Error, Field, Name};
use crate::wire::SectionType;

/// Takes the mirror `T` of `layout` at `at`; if the state ends first, the error names the
/// field it ends in.
pub(crate) fn mirror<'a, T>(
    state: &'a [u8],
    at: usize,
    layout: &'static VmStruct,
) -> Result<(&'a T, usize), Error>
where
    T: FromBytes + KnownLayout + Immutable + Unaligned,
{
    let rest = state.get(at..).unwrap_or_default();
    match T::ref_from_prefix(rest) {
        Ok((v, _)) => Ok((v, at + core::mem::size_of::<T>())),
        Err(_) => Err(truncated(layout, at, rest.len())),
    }
}

/// The state ends `available` bytes into the body of `layout` that starts at `at`.
fn truncated(layout: &'static VmStruct, at: usize, available: usize) -> Error {
    let index = layout.field_at(available);
    let offset = layout.fields.get(index).map_or(0, |f| f.offset);
    error(at + offset, Field::VmState(VmFieldRef::field(layout, index)), Defect::Truncated)
}

pub(crate) fn error(at: usize, field: Field, defect: Defect) -> Error {
    Error::new(at as u64, field, defect)
}

/// The body of a subsection, read through its table (subsections have no mirrors: most are
/// one MSR, and the image keeps only a few of them).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Values<'a> {
    pub(crate) layout: &'static VmStruct,
    body: &'a [u8],
}

impl Values<'_> {
    /// Element `k` of field `index`, big-endian, zero-extended (0 if there is no such
    /// element: the tables are checked against QEMU's, so that does not happen).
    pub(crate) fn elem(&self, index: usize, k: usize) -> u64 {
        let Some(f) = self.layout.fields.get(index) else { return 0 };
        let at = f.offset + k * f.size;
        match self.body.get(at..at + f.size) {
            Some(bytes) if f.size <= 8 => bytes.iter().fold(0, |v, &b| v << 8 | u64::from(b)),
            _ => 0,
        }
    }

    /// Field `index` (its first element).
    pub(crate) fn get(&self, index: usize) -> u64 {
        self.elem(index, 0)
    }
}

/// Reads the subsections that follow a body at `at`: `05`, `u8 len`, name, `be32 version`,
/// fields. Each must be in `known` (QEMU 7.2's list for `parent`), at its version, at most
/// once; `each` gets it. Returns where they end and the set seen (bit i: `known[i]`).
///
/// QEMU's loader stops at the first byte that is not `05` and then needs the footer; a name
/// it does not know is an error there too (a name without the parent's prefix ends its loop,
/// and the footer check then fails: either way the record does not load).
pub(crate) fn subsections<'a>(
    state: &'a [u8],
    mut at: usize,
    parent: &'static VmStruct,
    known: &[&'static VmStruct],
    mut each: impl FnMut(Values<'a>),
) -> Result<(usize, u64), Error> {
    let mut seen = 0u64;
    while state.get(at) == Some(&SectionType::Subsection.to_byte()) {
        let header = Field::VmState(VmFieldRef::header(parent));
        let Some(&len) = state.get(at + 1) else { return Err(error(at + 1, header, Defect::Truncated)) };
        let name_end = at + 2 + usize::from(len);
        let Some(name) = state.get(at + 2..name_end) else {
            return Err(error(at + 2, header, Defect::Truncated));
        };
        let Some(index) = known.iter().position(|s| s.name.as_bytes() == name) else {
            return Err(error(at, header, Defect::UnknownSubsection(Name::new(name))));
        };
        let sub = known[index];
        let header = Field::VmState(VmFieldRef::header(sub));
        let Some(v) = state.get(name_end..name_end + 4) else {
            return Err(error(name_end, header, Defect::Truncated));
        };
        let version = u32::from_be_bytes([v[0], v[1], v[2], v[3]]);
        if version != sub.version {
            let (found, expected) = (version.into(), sub.version.into());
            return Err(error(name_end, header, Defect::BadValue { found, expected }));
        }
        let bit = 1u64.checked_shl(index as u32).unwrap_or(0);
        if seen & bit != 0 {
            return Err(error(at, header, Defect::TooMany { cap: 1 }));
        }
        seen |= bit;
        let body_at = name_end + 4;
        let size = sub.size();
        let Some(body) = state.get(body_at..body_at + size) else {
            return Err(truncated(sub, body_at, state.len().saturating_sub(body_at)));
        };
        each(Values { layout: sub, body });
        at = body_at + size;
    }
    Ok((at, seen))
}

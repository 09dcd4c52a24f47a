//! Finding one device's FULL record in the device state.
//!
//! The device state is FULL records one after another (`04 <be32 id> <name idstr>
//! <be32 instance> <be32 version> <body> 7e <be32 id>`), and a body has no length: a record
//! can only be stepped over by decoding it, and the image decodes a few devices only. So a
//! record is found by its header bytes, at a record boundary (the state's start, or right
//! after a footer's `7e <be32>`), and proven by decoding its body with the known layout and
//! finding the footer with the header's id right after it. A header's bytes inside another
//! device's body (or in a page of RAM) fail that proof and are passed over.

use super::body::error;
use super::Device;
use crate::error::{Defect, Error, Field};
use crate::wire::SectionType;

/// A decoded record and where it was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Found<T> {
    /// The decoded body.
    pub value: T,
    /// The section id the source chose (the footer repeats it).
    pub section_id: u32,
    /// Offset of the record's type byte in the device state.
    pub offset: usize,
    /// Bytes of the whole record, header and footer included.
    pub len: usize,
}

/// A FULL header for a given idstr and instance, at a record boundary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Offset of the type byte.
    pub offset: usize,
    /// Section id.
    pub section_id: u32,
    /// Version of the body.
    pub version_id: u32,
    /// Offset of the body.
    pub body: usize,
}

/// Every header for `(idstr, instance)` at a record boundary, in order. `Err` for a header
/// whose idstr matches but which the state cuts before its version.
pub fn candidates<'a>(
    state: &'a [u8],
    idstr: &'a [u8],
    instance: u32,
) -> impl Iterator<Item = Result<Candidate, Error>> + 'a {
    (0..state.len()).filter_map(move |at| candidate(state, at, idstr, instance))
}

fn candidate(state: &[u8], at: usize, idstr: &[u8], instance: u32) -> Option<Result<Candidate, Error>> {
    let boundary = at == 0 || (at >= 5 && state[at - 5] == SectionType::Footer.to_byte());
    if state[at] != SectionType::Full.to_byte() || !boundary {
        return None;
    }
    let id = state.get(at + 1..at + 5)?;
    let name_end = at + 6 + idstr.len();
    if state.get(at + 5).copied() != u8::try_from(idstr.len()).ok() || state.get(at + 6..name_end)? != idstr {
        return None;
    }
    let be32 = |from: usize| state.get(from..from + 4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    let Some(found) = be32(name_end) else {
        return Some(Err(error(name_end, Field::SectionInstance, Defect::Truncated)));
    };
    if found != instance {
        return None;
    }
    let Some(version_id) = be32(name_end + 4) else {
        return Some(Err(error(name_end + 4, Field::SectionVersion, Defect::Truncated)));
    };
    let section_id = u32::from_be_bytes([id[0], id[1], id[2], id[3]]);
    Some(Ok(Candidate { offset: at, section_id, version_id, body: name_end + 8 }))
}

/// Decodes the record a candidate header starts: version, body, footer.
fn decode<T: Device>(state: &[u8], c: Candidate) -> Result<Found<T>, Error> {
    if c.version_id != T::LAYOUT.version {
        let (found, expected) = (c.version_id.into(), T::LAYOUT.version.into());
        return Err(error(c.body - 4, Field::SectionVersion, Defect::BadValue { found, expected }));
    }
    let (value, end) = T::decode_body(state, c.body)?;
    let Some(footer) = state.get(end..end + 5) else {
        return Err(error(end, Field::SectionFooter, Defect::Truncated));
    };
    if footer[0] != SectionType::Footer.to_byte() {
        let found = footer[0].into();
        return Err(error(end, Field::SectionFooter, Defect::BadValue { found, expected: 0x7e }));
    }
    let id = u32::from_be_bytes([footer[1], footer[2], footer[3], footer[4]]);
    if id != c.section_id {
        let (found, expected) = (id.into(), c.section_id.into());
        return Err(error(end + 1, Field::SectionFooter, Defect::BadValue { found, expected }));
    }
    Ok(Found { value, section_id: c.section_id, offset: c.offset, len: end + 5 - c.offset })
}

/// Finds and decodes the FULL record of device `T`, instance `instance`.
///
/// `Ok(None)`: no header for it. `Ok(Some)`: exactly one candidate decodes and ends with its
/// footer. Otherwise the error of the first candidate that failed (the version this
/// destination does not support, a field the state ends in, an unknown subsection, a footer
/// that is not where the layout says: the layout is not the source's), or, if two
/// candidates decode, an error at the second (`SectionIdstr`, `TooMany { cap: 1 }`).
pub fn find<T: Device>(state: &[u8], instance: u32) -> Result<Option<Found<T>>, Error> {
    let mut found: Option<Found<T>> = None;
    let mut failed = None;
    for c in candidates(state, T::IDSTR, instance) {
        match c.and_then(|c| decode::<T>(state, c)) {
            Ok(f) if found.is_some() => {
                return Err(error(f.offset, Field::SectionIdstr, Defect::TooMany { cap: 1 }));
            }
            Ok(f) => found = Some(f),
            Err(e) => {
                failed.get_or_insert(e);
            }
        }
    }
    match (found, failed) {
        (Some(f), _) => Ok(Some(f)),
        (None, Some(e)) => Err(e),
        (None, None) => Ok(None),
    }
}

//! Zero-copy views and small validated representations of every QEMU 7.2 migration record
//! (`docs/wire-format.md` §2-§6), plus the seed's v5 dialect (§8).
//!
//! Each record has a `parse` that takes the bytes available at the record's start and returns
//! either the record and its length, or how many bytes it needs to decide
//! ([`Parsed::Need`]); and an `emit` that writes the exact bytes `parse` accepts. Parsing
//! never panics: every length is checked before a view is taken, and a malformed field is a
//! `(Field, Defect)` that the decoder turns into an [`Error`](crate::Error) with the stream
//! offset.
//!
//! All multi-byte integers are big-endian (`zerocopy::byteorder::big_endian`).

pub mod command;
pub mod discard;
pub mod header;
pub mod ram;
pub mod return_path;
pub mod section;
pub mod vcpu;

use crate::error::{Defect, Field};

/// The outcome of parsing from a prefix of the available bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed<T> {
    /// The record, and how many bytes it took.
    Done(T, usize),
    /// At least this many bytes (counted from the record's start) are needed to go on.
    Need(usize),
}

/// A defect in a field, before the decoder knows the stream offset.
pub type FieldError = (Field, Defect);

/// Result of a `parse`.
pub type ParseResult<T> = Result<Parsed<T>, FieldError>;

/// Top-level record type bytes (`docs/wire-format.md` §2). Unknown bytes are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SectionType {
    /// `0x00`: end of the current loading loop.
    Eof,
    /// `0x01`: first part of an iterative section, with the full header.
    Start,
    /// `0x02`: further part of an iterative section.
    Part,
    /// `0x03`: last part of an iterative section.
    End,
    /// `0x04`: the whole state of a non-iterative device, with the full header.
    Full,
    /// `0x05`: a subsection (inside CONFIGURATION or a device body only).
    Subsection,
    /// `0x06`: JSON description after the final EOF of a precopy completion.
    VmDescription,
    /// `0x07`: CONFIGURATION, once, after the header.
    Configuration,
    /// `0x08`: a command.
    Command,
    /// `0x7e`: section footer (after a START/PART/END/FULL body only).
    Footer,
    /// Anything else.
    Unknown(u8),
}

impl SectionType {
    /// Classifies a type byte.
    pub const fn from_byte(b: u8) -> Self {
        match b {
            0x00 => Self::Eof,
            0x01 => Self::Start,
            0x02 => Self::Part,
            0x03 => Self::End,
            0x04 => Self::Full,
            0x05 => Self::Subsection,
            0x06 => Self::VmDescription,
            0x07 => Self::Configuration,
            0x08 => Self::Command,
            0x7e => Self::Footer,
            other => Self::Unknown(other),
        }
    }

    /// The type byte.
    pub const fn to_byte(self) -> u8 {
        match self {
            Self::Eof => 0x00,
            Self::Start => 0x01,
            Self::Part => 0x02,
            Self::End => 0x03,
            Self::Full => 0x04,
            Self::Subsection => 0x05,
            Self::VmDescription => 0x06,
            Self::Configuration => 0x07,
            Self::Command => 0x08,
            Self::Footer => 0x7e,
            Self::Unknown(b) => b,
        }
    }
}

/// Reads a QEMU counted string (u8 length, then that many bytes) at `at`.
///
/// Returns the string and the offset just past it, or `Need` if the buffer is too short.
/// A zero length is refused with `field` (QEMU's readers fail on it).
pub(crate) fn counted_str(
    buf: &[u8],
    at: usize,
    field: Field,
) -> Result<Result<(&[u8], usize), usize>, FieldError> {
    let Some(&len) = buf.get(at) else {
        return Ok(Err(at + 1));
    };
    if len == 0 {
        return Err((field, Defect::BadValue { found: 0, expected: 1 }));
    }
    let end = at + 1 + usize::from(len);
    match buf.get(at + 1..end) {
        Some(s) => Ok(Ok((s, end))),
        None => Ok(Err(end)),
    }
}

/// A bounds-checked writer for `emit`: every `put` fails (returns `None`) instead of
/// panicking when the output buffer is too short.
#[derive(Debug)]
pub struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Writer<'a> {
    /// Starts writing at the beginning of `buf`.
    pub fn new(buf: &'a mut [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Appends bytes.
    pub fn put(&mut self, bytes: &[u8]) -> Option<()> {
        let end = self.pos.checked_add(bytes.len())?;
        self.buf.get_mut(self.pos..end)?.copy_from_slice(bytes);
        self.pos = end;
        Some(())
    }

    /// Appends a QEMU counted string; `None` if it is empty or longer than 255 bytes.
    pub fn put_counted(&mut self, s: &[u8]) -> Option<()> {
        let len = u8::try_from(s.len()).ok().filter(|&l| l > 0)?;
        self.put(&[len])?;
        self.put(s)
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.pos
    }

    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }
}

/// Takes a fixed-size zerocopy view from the start of `buf`, or says how many bytes it needs.
pub(crate) fn view<T>(buf: &[u8]) -> Result<&T, usize>
where
    T: zerocopy::FromBytes + zerocopy::KnownLayout + zerocopy::Immutable + zerocopy::Unaligned,
{
    T::ref_from_prefix(buf).map(|(v, _)| v).map_err(|_| core::mem::size_of::<T>())
}

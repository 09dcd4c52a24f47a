//! A resumable decoder over a receive ring.
//!
//! The caller owns the ring. Its readable bytes are passed in as up to two slices (`first`,
//! then `second` after the wrap); [`Decoder::next`] returns one record and how many bytes it
//! consumed, and the caller advances the ring by that much. A record that lies wholly inside
//! `first` is parsed in place. Only a record *header* that straddles the wrap is stitched
//! together in a fixed bounce buffer ([`BOUNCE_CAPACITY`] bytes). Payloads (pages, device
//! state, VMDESCRIPTION) are never stitched: they come out as slices of the ring, in as many
//! pieces as the ring holds them, so every payload byte is copied exactly once, by the
//! consumer, into its destination. A record that has not fully arrived yields
//! [`Step::NeedMore`] and consumes nothing; the next call, with more bytes, resumes there.
//!
//! The decoder checks the stream's syntax (magic, lengths, footers, section ids, flag
//! combinations, the PACKAGED boundary); the engine checks its meaning (state, blocks,
//! bounds).

use heapless::Vec;

use crate::config::{
    BOUNCE_CAPACITY, MAX_ITERATIVE_SECTIONS, MAX_PACKAGED_LEN, MAX_VMDESCRIPTION_LEN, TARGET_PAGE_SIZE,
};
use crate::error::{Defect, Error, Field};
use crate::wire::command::{Command, CommandHeader, Dialect};
use crate::wire::discard::{DiscardMask, DiscardRange};
use crate::wire::header::{CapabilityName, ConfigSubsection, Configuration, StreamHeader};
use crate::wire::ram::{BlockEntry, RamRecord, RAM_IDSTR, RAM_VERSION};
use crate::wire::section::{FullHeader, ShortHeader};
use crate::wire::{FieldError, ParseResult, Parsed, SectionType, Writer};

/// One decoded item of the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record<'a> {
    /// Magic and version were right.
    Header,
    /// CONFIGURATION: the machine type.
    Configuration(&'a [u8]),
    /// A CONFIGURATION subsection.
    ConfigSubsection(ConfigSubsection<'a>),
    /// One name of `configuration/capabilities`.
    Capability(&'a [u8]),
    /// A command (payload decoded, except RAM_DISCARD entries and the PACKAGED blob).
    Command(Command<'a>),
    /// A 7.2 RAM_DISCARD entry: byte range.
    DiscardRange {
        /// Byte offset in the block.
        start: u64,
        /// Bytes.
        len: u64,
    },
    /// A v5 RAM_DISCARD entry: 32-page mask.
    DiscardMask {
        /// First page of the word.
        start: u64,
        /// Bit i = page `start + i - first_bit_offset`.
        mask: u32,
    },
    /// The last entry of a RAM_DISCARD command was delivered.
    DiscardEnd,
    /// Payload bytes of a command this dialect does not define.
    CommandPayload(&'a [u8]),
    /// START of the `ram` section.
    RamStart {
        /// Its section id.
        section_id: u32,
    },
    /// PART (`end == false`) or END of the `ram` section.
    RamPart {
        /// Its section id.
        section_id: u32,
        /// Whether this is the END record.
        end: bool,
    },
    /// MEM_SIZE: total bytes of the block list that follows.
    MemSize(u64),
    /// One RAMBlock of the list.
    Block(BlockEntry<'a>),
    /// ZERO, PAGE (its payload follows as [`Record::PageData`]) or EOS.
    Ram(RamRecord<'a>),
    /// A piece of the current PAGE's payload; the pieces add up to `TARGET_PAGE_SIZE`.
    PageData(&'a [u8]),
    /// A section footer (already checked against the section id).
    Footer,
    /// A device FULL record in the main stream (precopy completion). It consumes nothing:
    /// the record itself (header included) and the device records after it follow as opaque
    /// [`Record::DeviceData`].
    DeviceSection(FullHeader<'a>),
    /// Opaque device state (FULL records inside PACKAGED, or after a precopy END).
    DeviceData(&'a [u8]),
    /// EOF of the main stream.
    Eof,
    /// VMDESCRIPTION: this many JSON bytes follow as [`Record::VmDescriptionData`].
    VmDescription(u32),
    /// A piece of the VMDESCRIPTION JSON.
    VmDescriptionData(&'a [u8]),
}

/// What [`Decoder::next`] produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step<'a> {
    /// A record, the stream offset of its first byte, and the bytes it consumed.
    Record {
        /// The record.
        record: Record<'a>,
        /// Stream offset of its first byte.
        at: u64,
        /// Bytes consumed from the input (advance the ring by this much).
        len: usize,
    },
    /// The next record has not fully arrived; nothing was consumed.
    NeedMore,
}

/// What the decoder expects next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Header,
    Configuration,
    Subsections,
    Capabilities(u32),
    TopLevel,
    DiscardEntries { left: u16, v5: bool },
    SkipPayload(u16),
    RamBody { section_id: u32, setup: bool },
    BlockList { section_id: u32, left: u64 },
    PagePayload { section_id: u32, left: u16 },
    Footer { section_id: u32 },
    PackageOpaque,
    MainDeviceState,
    AfterEof,
    VmDescription(u32),
    Done,
}

/// Bytes held back at the end of a PACKAGED blob: `PING(3)` (9 bytes) + `RUN` (5 bytes).
const PACKAGE_TRAILER: usize = 14;
/// `7e <be32 id> 00 06 <be32 len> 7b`: the last footer, EOF and the VMDESCRIPTION header.
const DEVICE_END_PATTERN: usize = 12;

/// The resumable stream decoder. See the module documentation.
#[derive(Debug)]
pub struct Decoder {
    dialect: Dialect,
    expect: Expect,
    /// Stream offset of the next unconsumed byte.
    offset: u64,
    /// Bytes left in the PACKAGED blob being decoded, if any.
    package_left: Option<u32>,
    /// Ids of the START sections seen (all `ram`: other iterative sections are refused).
    ram_sections: Vec<u32, MAX_ITERATIVE_SECTIONS>,
    bounce: [u8; BOUNCE_CAPACITY],
}

impl Decoder {
    /// A decoder at the start of a stream.
    pub const fn new(dialect: Dialect) -> Self {
        Self {
            dialect,
            expect: Expect::Header,
            offset: 0,
            package_left: None,
            ram_sections: Vec::new(),
            bounce: [0; BOUNCE_CAPACITY],
        }
    }

    /// Stream offset of the next unconsumed byte.
    pub const fn offset(&self) -> u64 {
        self.offset
    }

    /// The connection broke: the next connection (postcopy recovery) starts at a top-level
    /// record, with no stream header; whatever record was cut is dropped (its pages come
    /// again). Offsets go on counting across connections.
    pub fn resume_after_break(&mut self) {
        self.expect = Expect::TopLevel;
        self.package_left = None;
    }

    /// The `ram` section a break cut open (its footer never came), if any, and whether its
    /// EOS record was read (only the footer is missing).
    pub const fn open_ram_section(&self) -> Option<(u32, bool)> {
        match self.expect {
            Expect::RamBody { section_id, .. } | Expect::PagePayload { section_id, .. } => {
                Some((section_id, false))
            }
            Expect::Footer { section_id } => Some((section_id, true)),
            _ => None,
        }
    }

    /// The dialect.
    pub const fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Whether the stream may end here: after the top-level EOF (and its VMDESCRIPTION, if
    /// one started).
    pub const fn at_end(&self) -> bool {
        matches!(self.expect, Expect::AfterEof | Expect::Done)
    }

    /// The error for a stream that ended here (the caller saw end of input).
    pub fn end_of_input(&self) -> Result<(), Error> {
        if self.at_end() {
            Ok(())
        } else {
            Err(Error::new(self.offset, Field::EndOfStream, Defect::Truncated))
        }
    }

    /// Decodes the next record from the readable bytes (`first`, then `second` after the
    /// ring's wrap).
    pub fn next<'a>(&'a mut self, first: &'a [u8], second: &'a [u8]) -> Result<Step<'a>, Error> {
        let Self { dialect, expect, offset, package_left, ram_sections, bounce } = self;
        let mut cx = Cx { at: *offset, expect, package_left, ram_sections, dialect: *dialect };
        let (first, second) = cx.clip(first, second);
        let input = Input { first, second, bounce };
        let result = cx.step(input);
        match result {
            Ok(Some((record, len))) => {
                cx.consume(len).map_err(|d| Error::new(cx.at, Field::Packaged, d))?;
                let at = cx.at;
                *offset = at + len as u64;
                Ok(Step::Record { record, at, len })
            }
            Ok(None) => {
                if cx.package_exhausted_by(first.len() + second.len()) {
                    return Err(Error::new(cx.at, Field::Packaged, Defect::Truncated));
                }
                Ok(Step::NeedMore)
            }
            Err((field, defect)) => Err(Error::new(cx.at, field, defect)),
        }
    }
}

/// The readable bytes and the bounce buffer for one step.
struct Input<'a> {
    first: &'a [u8],
    second: &'a [u8],
    bounce: &'a mut [u8; BOUNCE_CAPACITY],
}

impl<'a> Input<'a> {
    fn total(&self) -> usize {
        self.first.len() + self.second.len()
    }

    fn peek(&self) -> Option<u8> {
        self.first.first().or(self.second.first()).copied()
    }

    /// The contiguous bytes at the read position (for payload pieces).
    fn contiguous(&self) -> &'a [u8] {
        if self.first.is_empty() {
            self.second
        } else {
            self.first
        }
    }

    /// Parses one record header in place, or from the bounce buffer if it straddles the wrap.
    /// `Ok(None)`: not all of it has arrived.
    fn unit<T: 'a>(
        self,
        parse: impl Fn(&'a [u8]) -> ParseResult<T>,
    ) -> Result<Option<(T, usize)>, FieldError> {
        let need = match parse(self.first)? {
            Parsed::Done(v, n) => return Ok(Some((v, n))),
            Parsed::Need(n) => n,
        };
        // Every record header fits the bounce buffer by construction; one that claims more
        // is refused at once: waiting for it could stall a ring smaller than the claim.
        if need > BOUNCE_CAPACITY {
            let len = need as u64;
            return Err((Field::RecordHeader, Defect::TooLong { len, cap: BOUNCE_CAPACITY as u64 }));
        }
        if self.second.is_empty() || need > self.total() {
            return Ok(None);
        }
        let from_first = self.first.len();
        let n = self.total().min(BOUNCE_CAPACITY);
        self.bounce[..from_first].copy_from_slice(self.first);
        self.bounce[from_first..n].copy_from_slice(&self.second[..n - from_first]);
        let stitched: &'a [u8] = &self.bounce[..n];
        match parse(stitched)? {
            Parsed::Done(v, used) => Ok(Some((v, used))),
            Parsed::Need(_) => Ok(None),
        }
    }
}

/// The decoder's state, borrowed apart from the bounce buffer for one step.
struct Cx<'s> {
    at: u64,
    expect: &'s mut Expect,
    package_left: &'s mut Option<u32>,
    ram_sections: &'s mut Vec<u32, MAX_ITERATIVE_SECTIONS>,
    dialect: Dialect,
}

type StepResult<'a> = Result<Option<(Record<'a>, usize)>, FieldError>;

impl Cx<'_> {
    /// Inside a PACKAGED blob, the input ends at the blob's end.
    fn clip<'a>(&self, first: &'a [u8], second: &'a [u8]) -> (&'a [u8], &'a [u8]) {
        let Some(left) = *self.package_left else {
            return (first, second);
        };
        let left = left as usize;
        let f = &first[..first.len().min(left)];
        let s = &second[..second.len().min(left - f.len())];
        (f, s)
    }

    /// All the blob's remaining bytes are available, yet a record needs more.
    fn package_exhausted_by(&self, available: usize) -> bool {
        matches!(*self.package_left, Some(left) if available >= left as usize)
    }

    fn consume(&mut self, len: usize) -> Result<(), Defect> {
        if let Some(left) = self.package_left.as_mut() {
            *left = left.checked_sub(len as u32).ok_or(Defect::Truncated)?;
        }
        Ok(())
    }

    fn step<'a>(&mut self, input: Input<'a>) -> StepResult<'a> {
        match *self.expect {
            Expect::Header => {
                let r = input.unit(StreamHeader::parse)?;
                self.then(r, Expect::Configuration, |()| Record::Header)
            }
            Expect::Configuration => match input.peek() {
                None => Ok(None),
                Some(0x07) => {
                    let r = input.unit(Configuration::parse)?;
                    self.then(r, Expect::Subsections, |c| Record::Configuration(c.machine))
                }
                Some(_) => {
                    *self.expect = Expect::TopLevel;
                    self.step(input)
                }
            },
            Expect::Subsections => match input.peek() {
                None => Ok(None),
                Some(0x05) => {
                    let r = input.unit(ConfigSubsection::parse)?;
                    let next = match r {
                        Some((ConfigSubsection::Capabilities(n), _)) if n > 0 => Expect::Capabilities(n),
                        _ => Expect::Subsections,
                    };
                    self.then(r, next, Record::ConfigSubsection)
                }
                Some(_) => {
                    *self.expect = Expect::TopLevel;
                    self.step(input)
                }
            },
            Expect::Capabilities(left) => {
                let r = input.unit(CapabilityName::parse)?;
                let next = if left > 1 { Expect::Capabilities(left - 1) } else { Expect::Subsections };
                self.then(r, next, |c| Record::Capability(c.0))
            }
            Expect::TopLevel => self.top_level(input),
            Expect::DiscardEntries { left: 0, .. } => {
                *self.expect = Expect::TopLevel;
                Ok(Some((Record::DiscardEnd, 0)))
            }
            Expect::DiscardEntries { left, v5 } => {
                let next = Expect::DiscardEntries { left: left - 1, v5 };
                if v5 {
                    let r = input.unit(DiscardMask::parse)?;
                    self.then(r, next, |(start, mask)| Record::DiscardMask { start, mask })
                } else {
                    let r = input.unit(DiscardRange::parse)?;
                    self.then(r, next, |(start, len)| Record::DiscardRange { start, len })
                }
            }
            Expect::SkipPayload(left) => {
                self.payload(input, left.into(), Record::CommandPayload, |rest| match rest {
                    0 => Expect::TopLevel,
                    _ => Expect::SkipPayload(rest as u16),
                })
            }
            Expect::RamBody { section_id, setup } => self.ram_record(input, section_id, setup),
            Expect::BlockList { section_id, left } => {
                let r = input.unit(BlockEntry::parse)?;
                if let Some((entry, _)) = r {
                    if entry.used_length > left {
                        let (start, len) = (entry.used_length, entry.used_length);
                        return Err((Field::RamBlockList, Defect::OutOfRange { start, len, limit: left }));
                    }
                    let left = left - entry.used_length;
                    *self.expect = if left == 0 {
                        Expect::RamBody { section_id, setup: false }
                    } else {
                        Expect::BlockList { section_id, left }
                    };
                }
                Ok(r.map(|(e, n)| (Record::Block(e), n)))
            }
            Expect::PagePayload { section_id, left } => {
                self.payload(input, left.into(), Record::PageData, |rest| match rest {
                    0 => Expect::RamBody { section_id, setup: false },
                    _ => Expect::PagePayload { section_id, left: rest as u16 },
                })
            }
            Expect::Footer { section_id } => {
                let r = input.unit(ShortHeader::parse)?;
                if let Some(((kind, id), _)) = r {
                    if kind != SectionType::Footer.to_byte() {
                        let found = kind.into();
                        return Err((Field::SectionFooter, Defect::BadValue { found, expected: 0x7e }));
                    }
                    if id != section_id {
                        let (found, expected) = (id.into(), section_id.into());
                        return Err((Field::SectionFooter, Defect::BadValue { found, expected }));
                    }
                }
                self.then(r, Expect::TopLevel, |_| Record::Footer)
            }
            Expect::PackageOpaque => self.package_opaque(input),
            Expect::MainDeviceState => self.main_device_state(input),
            Expect::AfterEof => match input.peek() {
                None => Ok(None),
                Some(0x06) => {
                    let r = input.unit(vmdescription_header)?;
                    if let Some((len, _)) = r {
                        *self.expect = if len == 0 { Expect::Done } else { Expect::VmDescription(len) };
                    }
                    Ok(r.map(|(len, n)| (Record::VmDescription(len), n)))
                }
                Some(other) => Err((Field::EndOfStream, Defect::Unknown { found: other.into() })),
            },
            Expect::VmDescription(left) => {
                self.payload(input, left.into(), Record::VmDescriptionData, |rest| match rest {
                    0 => Expect::Done,
                    _ => Expect::VmDescription(rest as u32),
                })
            }
            Expect::Done => match input.peek() {
                None => Ok(None),
                Some(other) => Err((Field::EndOfStream, Defect::Unknown { found: other.into() })),
            },
        }
    }

    /// The next piece of a payload with `left` bytes to go: as much of it as the ring holds
    /// contiguously, handed out in place; `next(rest)` is what comes after this piece.
    fn payload<'a>(
        &mut self,
        input: Input<'a>,
        left: u64,
        record: impl FnOnce(&'a [u8]) -> Record<'a>,
        next: impl FnOnce(u64) -> Expect,
    ) -> StepResult<'a> {
        let piece = take(input.contiguous(), usize::try_from(left).unwrap_or(usize::MAX));
        if piece.is_empty() {
            return Ok(None);
        }
        *self.expect = next(left - piece.len() as u64);
        Ok(Some((record(piece), piece.len())))
    }

    /// Moves to `next` if a record was parsed, and maps it.
    fn then<'a, T>(
        &mut self,
        parsed: Option<(T, usize)>,
        next: Expect,
        map: impl FnOnce(T) -> Record<'a>,
    ) -> StepResult<'a> {
        Ok(parsed.map(|(v, n)| {
            *self.expect = next;
            (map(v), n)
        }))
    }

    fn top_level<'a>(&mut self, input: Input<'a>) -> StepResult<'a> {
        if *self.package_left == Some(0) {
            // Every record of a blob ends before its end; RUN, the last, closes the blob.
            return Err((Field::Packaged, Defect::Truncated));
        }
        let Some(kind) = input.peek() else {
            return Ok(None);
        };
        let in_package = self.package_left.is_some();
        match SectionType::from_byte(kind) {
            SectionType::Command => self.command(input),
            _ if in_package => {
                *self.expect = Expect::PackageOpaque;
                self.package_opaque(input)
            }
            SectionType::Eof => {
                *self.expect = Expect::AfterEof;
                Ok(Some((Record::Eof, 1)))
            }
            SectionType::Start | SectionType::Full => {
                let r = input.unit(FullHeader::parse)?;
                let Some((h, n)) = r else { return Ok(None) };
                match (h.start, h.idstr == RAM_IDSTR) {
                    (true, true) => {
                        // Only instance 0 of `ram` exists (QEMU refuses any other).
                        if h.instance_id != 0 {
                            let found = h.instance_id.into();
                            return Err((Field::SectionInstance, Defect::BadValue { found, expected: 0 }));
                        }
                        if h.version_id != RAM_VERSION {
                            let (found, expected) = (h.version_id.into(), RAM_VERSION.into());
                            return Err((Field::SectionVersion, Defect::BadValue { found, expected }));
                        }
                        if !self.ram_sections.contains(&h.section_id) {
                            self.ram_sections.push(h.section_id).map_err(|_| {
                                (Field::SectionId, Defect::TooMany { cap: MAX_ITERATIVE_SECTIONS as u64 })
                            })?;
                        }
                        *self.expect = Expect::RamBody { section_id: h.section_id, setup: true };
                        Ok(Some((Record::RamStart { section_id: h.section_id }, n)))
                    }
                    // Only `ram` is iterative here (no block migration, no dirty bitmaps).
                    (true, false) | (false, true) => Err((Field::SectionIdstr, Defect::Unsupported)),
                    (false, false) => {
                        // The header is announced, then handed out again with the body as
                        // opaque device state: the sink sees whole records.
                        let _ = n;
                        *self.expect = Expect::MainDeviceState;
                        Ok(Some((Record::DeviceSection(h), 0)))
                    }
                }
            }
            SectionType::Part | SectionType::End => {
                let r = input.unit(ShortHeader::parse)?;
                let Some(((kind, section_id), n)) = r else {
                    return Ok(None);
                };
                if !self.ram_sections.contains(&section_id) {
                    return Err((Field::SectionId, Defect::Unknown { found: section_id.into() }));
                }
                *self.expect = Expect::RamBody { section_id, setup: false };
                let end = kind == SectionType::End.to_byte();
                Ok(Some((Record::RamPart { section_id, end }, n)))
            }
            _ => Err((Field::SectionType, Defect::Unknown { found: kind.into() })),
        }
    }

    fn command<'a>(&mut self, input: Input<'a>) -> StepResult<'a> {
        let dialect = self.dialect;
        let r = input.unit(|b| Command::parse(b, dialect))?;
        let Some((cmd, n)) = r else { return Ok(None) };
        match cmd {
            Command::RamDiscard(h) => {
                *self.expect = Expect::DiscardEntries { left: h.entries, v5: h.first_bit_offset.is_some() };
            }
            Command::Unknown { len, .. } if len > 0 => *self.expect = Expect::SkipPayload(len),
            Command::Packaged(len) => {
                if self.package_left.is_some() {
                    return Err((Field::Packaged, Defect::Unsupported));
                }
                if len > MAX_PACKAGED_LEN {
                    let (len, cap) = (len.into(), MAX_PACKAGED_LEN.into());
                    return Err((Field::Packaged, Defect::TooLong { len, cap }));
                }
                // The blob starts after this command: account for it from the next step.
                *self.package_left = Some(len.saturating_add(n as u32));
            }
            Command::Run => {
                if let Some(left) = *self.package_left {
                    if left as usize != n {
                        // RUN must be the blob's last record.
                        let found = u64::from(left) - n as u64;
                        return Err((Field::Packaged, Defect::BadValue { found, expected: 0 }));
                    }
                    *self.package_left = None;
                    return Ok(Some((Record::Command(cmd), n)));
                }
            }
            _ => {}
        }
        Ok(Some((Record::Command(cmd), n)))
    }

    fn ram_record<'a>(&mut self, input: Input<'a>, section_id: u32, setup: bool) -> StepResult<'a> {
        let r = input.unit(RamRecord::parse)?;
        let Some((rec, n)) = r else { return Ok(None) };
        let record = match rec {
            RamRecord::MemSize(total) if setup => {
                *self.expect = if total == 0 {
                    Expect::RamBody { section_id, setup: false }
                } else {
                    Expect::BlockList { section_id, left: total }
                };
                Record::MemSize(total)
            }
            RamRecord::MemSize(_) => return Err((Field::RamFlags, Defect::Unsupported)),
            RamRecord::Page { .. } => {
                *self.expect = Expect::PagePayload { section_id, left: TARGET_PAGE_SIZE as u16 };
                Record::Ram(rec)
            }
            RamRecord::Eos => {
                *self.expect = Expect::Footer { section_id };
                Record::Ram(rec)
            }
            RamRecord::Zero { .. } => {
                *self.expect = Expect::RamBody { section_id, setup: false };
                Record::Ram(rec)
            }
        };
        Ok(Some((record, n)))
    }

    /// Device state inside a PACKAGED blob: opaque up to the trailer, which must be RUN,
    /// optionally preceded by a PING.
    fn package_opaque<'a>(&mut self, input: Input<'a>) -> StepResult<'a> {
        let left = self.package_left.unwrap_or(0) as usize;
        let hold = left.min(PACKAGE_TRAILER);
        if left > hold {
            let piece = take(input.contiguous(), left - hold);
            if piece.is_empty() {
                return Ok(None);
            }
            return Ok(Some((Record::DeviceData(piece), piece.len())));
        }
        if input.total() < hold {
            return Ok(None);
        }
        let mut tail = [0u8; PACKAGE_TRAILER];
        let from_first = input.first.len().min(hold);
        tail[..from_first].copy_from_slice(&input.first[..from_first]);
        tail[from_first..hold].copy_from_slice(&input.second[..hold - from_first]);
        let tail = &tail[..hold];
        let mut run = [0u8; CommandHeader::LEN];
        let mut ping = [0u8; 9];
        Command::Run.emit(self.dialect, &mut Writer::new(&mut run));
        Command::Ping(0).emit(self.dialect, &mut Writer::new(&mut ping));
        if !tail.ends_with(&run) {
            return Err((
                Field::Packaged,
                Defect::Unknown { found: tail.last().copied().unwrap_or(0).into() },
            ));
        }
        let trailer =
            if hold == PACKAGE_TRAILER && tail[..5] == ping[..5] { PACKAGE_TRAILER } else { run.len() };
        if hold > trailer {
            let piece = take(input.contiguous(), hold - trailer);
            return Ok(Some((Record::DeviceData(piece), piece.len())));
        }
        *self.expect = Expect::TopLevel;
        self.command(input)
    }

    /// Device state after a precopy END: opaque until the last footer, EOF and the
    /// VMDESCRIPTION header (`7e <id> 00 06 <len> 7b`).
    fn main_device_state<'a>(&mut self, input: Input<'a>) -> StepResult<'a> {
        let contiguous = input.contiguous();
        if contiguous.len() >= DEVICE_END_PATTERN {
            if let Some(i) = find_device_end(contiguous) {
                *self.expect = Expect::TopLevel;
                return Ok(Some((Record::DeviceData(&contiguous[..i + 5]), i + 5)));
            }
            let safe = contiguous.len() - (DEVICE_END_PATTERN - 1);
            return Ok(Some((Record::DeviceData(&contiguous[..safe]), safe)));
        }
        if input.total() < DEVICE_END_PATTERN {
            return Ok(None);
        }
        // Fewer than 12 bytes before the wrap: look across it.
        let first_len = input.first.len();
        let span = (first_len + DEVICE_END_PATTERN - 1).min(input.total());
        let r = input.unit(|b| match b.get(..span) {
            Some(s) => Ok(Parsed::Done(s, span)),
            None => Ok(Parsed::Need(span)),
        })?;
        let Some((joined, _)) = r else {
            return Ok(None);
        };
        match find_device_end(joined).filter(|&i| i < first_len) {
            Some(i) => {
                *self.expect = Expect::TopLevel;
                Ok(Some((Record::DeviceData(&joined[..i + 5]), i + 5)))
            }
            None => Ok(Some((Record::DeviceData(&joined[..first_len]), first_len))),
        }
    }
}

/// Position of `7e ? ? ? ? 00 06 ? ? ? ? 7b` in `b`.
fn find_device_end(b: &[u8]) -> Option<usize> {
    b.windows(DEVICE_END_PATTERN).position(|w| w[0] == 0x7e && w[5] == 0x00 && w[6] == 0x06 && w[11] == b'{')
}

fn take(b: &[u8], max: usize) -> &[u8] {
    &b[..b.len().min(max)]
}

fn vmdescription_header(b: &[u8]) -> ParseResult<u32> {
    let Some(h) = b.get(..5) else {
        return Ok(Parsed::Need(5));
    };
    let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]);
    if len > MAX_VMDESCRIPTION_LEN {
        let (len, cap) = (len.into(), MAX_VMDESCRIPTION_LEN.into());
        return Err((Field::VmDescription, Defect::TooLong { len, cap }));
    }
    Ok(Parsed::Done(len, 5))
}

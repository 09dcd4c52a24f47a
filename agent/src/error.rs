//! Typed, `Copy`, heap-free errors that name the QEMU field and the stream offset.

use core::fmt;

/// The QEMU field (or record) a defect was found in. Names follow `docs/wire-format.md`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    /// Stream header magic ("QEVM").
    Magic,
    /// Stream header version.
    Version,
    /// The top-level section type byte.
    SectionType,
    /// A record header as a whole (its announced length).
    RecordHeader,
    /// CONFIGURATION machine-type name.
    MachineName,
    /// CONFIGURATION subsection (name, version or fields).
    ConfigSubsection,
    /// Section idstr.
    SectionIdstr,
    /// Section id of a PART/END record.
    SectionId,
    /// Section version_id.
    SectionVersion,
    /// Section instance_id.
    SectionInstance,
    /// Section footer (mark or id).
    SectionFooter,
    /// Command number.
    CommandId,
    /// Command payload length.
    CommandLength,
    /// POSTCOPY_ADVISE host page-size summary.
    AdviseHostPageSize,
    /// POSTCOPY_ADVISE target page size.
    AdviseTargetPageSize,
    /// RAM_DISCARD version byte.
    DiscardVersion,
    /// RAM_DISCARD block name (length, name, NUL).
    DiscardBlockName,
    /// RAM_DISCARD range start.
    DiscardStart,
    /// RAM_DISCARD range length.
    DiscardLength,
    /// PACKAGED blob length or contents.
    Packaged,
    /// RAM record flags (low bits of the record word).
    RamFlags,
    /// RAM record offset (high bits of the record word).
    RamOffset,
    /// RAM record block idstr.
    RamBlockName,
    /// MEM_SIZE block list (total or a block's length).
    RamBlockList,
    /// VMDESCRIPTION length.
    VmDescription,
    /// Opaque device state (FULL records).
    DeviceState,
    /// The guest-physical map the block list lays out (a region past its limit, or two
    /// regions that overlap).
    GuestPhysicalMap,
    /// The stream ended.
    EndOfStream,
    /// A return-path message.
    ReturnPath,
    /// The block name of a RECV_BITMAP command (postcopy recovery).
    RecvBitmapBlock,
    /// A field of a QEMU device's VMState body that the image decodes
    /// ([`qemu_state`](crate::qemu_state)); its Debug form names the device and the field
    /// (`cpu.env.cr[0]`, `cpu/msr_smi_count (header)`).
    VmState(crate::qemu_state::VmFieldRef),
}

/// What is wrong with the field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Defect {
    /// The stream ended inside this field.
    Truncated,
    /// A value other than the one required.
    BadValue {
        /// What the stream carried.
        found: u64,
        /// What was required.
        expected: u64,
    },
    /// A value the protocol does not define (or this destination does not know).
    Unknown {
        /// What the stream carried.
        found: u64,
    },
    /// A length above this destination's cap (`config`).
    TooLong {
        /// Length the stream announced.
        len: u64,
        /// The cap.
        cap: u64,
    },
    /// More items than a fixed-capacity table holds (`config`).
    TooMany {
        /// The capacity.
        cap: u64,
    },
    /// A value that must be aligned is not.
    Misaligned {
        /// The value.
        value: u64,
        /// Required alignment.
        align: u64,
    },
    /// `[start, start+len)` does not end at or below `limit` (a block's length, or the top of
    /// the guest-physical window a region must fit in).
    OutOfRange {
        /// Start of the offending range.
        start: u64,
        /// Its length.
        len: u64,
        /// The block length (or other bound).
        limit: u64,
    },
    /// A command arrived in a postcopy state that does not allow it.
    WrongState {
        /// The state the destination was in.
        state: crate::postcopy::State,
    },
    /// Differs from this destination's own (machine type, duplicate block).
    Mismatch,
    /// A block name the destination does not have.
    UnknownBlock,
    /// A CONTINUE record with no previous block on this channel.
    NoPreviousBlock,
    /// A PING arrived before OPEN_RETURN_PATH.
    NoReturnPath,
    /// A feature of the stream this destination refuses (XBZRLE, compression, COLO, recovery...).
    Unsupported,
    /// The return path could not be written.
    ReturnPathFailed,
    /// Guest memory refused the block layout (hypervisor: a block it does not emulate).
    MemoryRefused,
    /// The guest-physical range `[start, start+len)` overlaps the one at `other`.
    Overlaps {
        /// Start of the region that does not fit.
        start: u64,
        /// Its length.
        len: u64,
        /// Start of the region it overlaps.
        other: u64,
    },
    /// The migration ended with pages of a block that never arrived (discarded and not sent
    /// again, or never sent): the guest's memory would have holes.
    PagesMissing {
        /// Index of the block in the MEM_SIZE list.
        block: usize,
        /// How many of its pages are missing.
        missing: u64,
        /// Byte offset in the block of the first missing page.
        first: u64,
    },
    /// A VMState subsection this destination does not know, named (its first bytes).
    UnknownSubsection(Name),
    /// POSTCOPY_RESUME before the source asked for the received bitmap of every block.
    BitmapsMissing {
        /// Blocks whose bitmap was not asked for on this connection.
        blocks: u64,
    },
}

/// A name from the stream kept inside an error (errors are `Copy` and heap-free): its first
/// [`Name::CAPACITY`] bytes and its length. QEMU 7.2's longest x86 CPU subsection name,
/// `cpu/msr_hyperv_reenlightenment`, has 30 bytes; a `Defect` stays 32 bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Name {
    len: u8,
    bytes: [u8; Name::CAPACITY],
}

impl Name {
    /// Bytes kept.
    pub const CAPACITY: usize = 28;

    /// Keeps the first bytes of `name` (at most 255 are counted).
    pub fn new(name: &[u8]) -> Self {
        let mut bytes = [0; Self::CAPACITY];
        let kept = name.len().min(Self::CAPACITY);
        bytes[..kept].copy_from_slice(&name[..kept]);
        Self { len: u8::try_from(name.len()).unwrap_or(u8::MAX), bytes }
    }

    /// The kept bytes (all of the name unless [`Name::is_cut`]).
    pub fn kept(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len).min(Self::CAPACITY)]
    }

    /// Whether the name was longer than what is kept.
    pub fn is_cut(&self) -> bool {
        usize::from(self.len) > Self::CAPACITY
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in self.kept() {
            if b.is_ascii_graphic() || b == b' ' {
                write!(f, "{}", char::from(b))?;
            } else {
                write!(f, "\\x{b:02x}")?;
            }
        }
        if self.is_cut() {
            write!(f, "... ({} bytes)", self.len)?;
        }
        Ok(())
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// A protocol error: where in the stream, which field, what is wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Error {
    /// Byte offset in the migration stream of the record holding the field (the first byte of
    /// the record, or of the page record for RAM).
    pub offset: u64,
    /// The field.
    pub field: Field,
    /// The defect.
    pub defect: Defect,
}

impl Error {
    /// Builds an error.
    pub const fn new(offset: u64, field: Field, defect: Defect) -> Self {
        Self { offset, field, defect }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "stream offset {}: {:?}: ", self.offset, self.field)?;
        match self.defect {
            Defect::Truncated => write!(f, "stream ends inside this field"),
            Defect::BadValue { found, expected } => {
                write!(f, "found {found:#x}, expected {expected:#x}")
            }
            Defect::Unknown { found } => write!(f, "unknown value {found:#x}"),
            Defect::TooLong { len, cap } => write!(f, "length {len} over the cap {cap}"),
            Defect::TooMany { cap } => write!(f, "more than {cap} entries"),
            Defect::Misaligned { value, align } => {
                write!(f, "{value:#x} is not aligned to {align:#x}")
            }
            Defect::OutOfRange { start, len, limit } => {
                write!(f, "range [{start:#x}, +{len:#x}) does not end at or below {limit:#x}")
            }
            Defect::WrongState { state } => write!(f, "not allowed in postcopy state {state:?}"),
            Defect::Mismatch => write!(f, "does not match this destination"),
            Defect::UnknownBlock => write!(f, "unknown RAMBlock"),
            Defect::NoPreviousBlock => write!(f, "CONTINUE with no previous block"),
            Defect::NoReturnPath => write!(f, "return path not open"),
            Defect::Unsupported => write!(f, "not supported by this destination"),
            Defect::ReturnPathFailed => write!(f, "return path write failed"),
            Defect::MemoryRefused => write!(f, "guest memory refused the block"),
            Defect::Overlaps { start, len, other } => {
                write!(f, "guest-physical range [{start:#x}, +{len:#x}) overlaps the region at {other:#x}")
            }
            Defect::PagesMissing { block, missing, first } => {
                write!(f, "{missing} pages of block #{block} never arrived (the first at offset {first:#x})")
            }
            Defect::UnknownSubsection(name) => write!(f, "unknown subsection {name}"),
            Defect::BitmapsMissing { blocks } => {
                write!(f, "resume before the received bitmaps of {blocks} blocks were asked for")
            }
        }
    }
}

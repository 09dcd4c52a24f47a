//! Commands (`0x08`, `docs/wire-format.md` §5) in the QEMU 7.2 numbering and the seed's v5
//! numbering (§8).

use zerocopy::byteorder::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::discard::DiscardHeader;
use super::{counted_str, view, FieldError, ParseResult, Parsed, SectionType, Writer};
use crate::error::{Defect, Field};

/// Which wire dialect the source speaks. The command numbers collide (6 is RAM_DISCARD in 7.2,
/// the v5 postcopy commands start at 20), so this is an explicit mode, never a guess.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Dialect {
    /// Upstream QEMU 7.2 (the default, and what real sources speak).
    #[default]
    Qemu72,
    /// The 2015 v5 postcopy series (patch 17/45): v5 command numbers, the 16-byte ADVISE of
    /// `getpagesize()`, the semi-sparse bitmap RAM_DISCARD, POSTCOPY_END.
    SeedV5,
}

/// A command number, classified for a dialect. Unknown numbers are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandId {
    /// 0: must never be sent.
    Invalid,
    /// Start using the return path on this connection.
    OpenReturnPath,
    /// Reply PONG with the same value.
    Ping,
    /// Postcopy may happen: page sizes.
    PostcopyAdvise,
    /// Start accepting pages while device state loads.
    PostcopyListen,
    /// Start the vCPUs.
    PostcopyRun,
    /// Drop pages dirtied since they were sent.
    PostcopyRamDiscard,
    /// A nested stream of known length follows.
    Packaged,
    /// COLO fault tolerance (refused).
    EnableColo,
    /// Postcopy recovery (ignored outside recovery).
    PostcopyResume,
    /// Postcopy recovery bitmap request (refused).
    RecvBitmap,
    /// v5 only: end of postcopy, with a status byte.
    PostcopyEnd,
    /// Not defined in this dialect.
    Unknown(u16),
}

impl CommandId {
    /// Classifies a wire number.
    pub const fn from_wire(dialect: Dialect, raw: u16) -> Self {
        match (dialect, raw) {
            (_, 0) => Self::Invalid,
            (_, 1) => Self::OpenReturnPath,
            (_, 2) => Self::Ping,
            (Dialect::Qemu72, 3) | (Dialect::SeedV5, 20) => Self::PostcopyAdvise,
            (Dialect::Qemu72, 4) | (Dialect::SeedV5, 21) => Self::PostcopyListen,
            (Dialect::Qemu72, 5) | (Dialect::SeedV5, 22) => Self::PostcopyRun,
            (Dialect::Qemu72, 6) | (Dialect::SeedV5, 24) => Self::PostcopyRamDiscard,
            (Dialect::Qemu72, 7) => Self::Packaged,
            (Dialect::Qemu72, 8) => Self::EnableColo,
            (Dialect::Qemu72, 9) => Self::PostcopyResume,
            (Dialect::Qemu72, 10) => Self::RecvBitmap,
            (Dialect::SeedV5, 23) => Self::PostcopyEnd,
            (_, other) => Self::Unknown(other),
        }
    }

    /// The wire number in a dialect, if the command exists there.
    pub const fn to_wire(self, dialect: Dialect) -> Option<u16> {
        let v5 = matches!(dialect, Dialect::SeedV5);
        Some(match self {
            Self::Invalid => 0,
            Self::OpenReturnPath => 1,
            Self::Ping => 2,
            Self::PostcopyAdvise => {
                if v5 {
                    20
                } else {
                    3
                }
            }
            Self::PostcopyListen => {
                if v5 {
                    21
                } else {
                    4
                }
            }
            Self::PostcopyRun => {
                if v5 {
                    22
                } else {
                    5
                }
            }
            Self::PostcopyRamDiscard => {
                if v5 {
                    24
                } else {
                    6
                }
            }
            Self::Packaged if !v5 => 7,
            Self::EnableColo if !v5 => 8,
            Self::PostcopyResume if !v5 => 9,
            Self::RecvBitmap if !v5 => 10,
            Self::PostcopyEnd if v5 => 23,
            Self::Unknown(raw) => raw,
            _ => return None,
        })
    }
}

/// `0x08 <be16 cmd> <be16 len>`.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Debug)]
#[repr(C)]
pub struct CommandHeader {
    /// Always `0x08`.
    pub kind: u8,
    /// Command number (dialect specific).
    pub cmd: U16,
    /// Payload length (PACKAGED's blob is outside it).
    pub len: U16,
}

impl CommandHeader {
    /// Length on the wire.
    pub const LEN: usize = 5;
}

/// POSTCOPY_ADVISE's 16-byte payload.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct Advise {
    /// 7.2: OR of the page sizes of all source RAMBlocks; v5: the source's `getpagesize()`.
    pub host_page_size: U64,
    /// Target page size (4096 on x86).
    pub target_page_size: U64,
}

/// A command with its payload decoded. RAM_DISCARD entries and the PACKAGED blob follow the
/// command and are decoded as separate items.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command<'a> {
    /// OPEN_RETURN_PATH.
    OpenReturnPath,
    /// PING(value).
    Ping(u32),
    /// POSTCOPY_ADVISE; `None` for the 0-byte dirty-bitmaps-only form.
    Advise(Option<Advise>),
    /// POSTCOPY_LISTEN.
    Listen,
    /// POSTCOPY_RUN.
    Run,
    /// POSTCOPY_RAM_DISCARD: the header; `entries` ranges (or v5 mask entries) follow.
    RamDiscard(DiscardHeader<'a>),
    /// PACKAGED: a nested stream of this many bytes follows.
    Packaged(u32),
    /// ENABLE_COLO.
    EnableColo,
    /// POSTCOPY_RESUME.
    Resume,
    /// RECV_BITMAP(block name).
    RecvBitmap(&'a [u8]),
    /// v5 POSTCOPY_END(status).
    PostcopyEnd(u8),
    /// A command number this dialect does not define; `len` payload bytes follow.
    Unknown {
        /// The raw number.
        cmd: u16,
        /// Its payload length.
        len: u16,
    },
}

fn bad_len(found: u16, expected: u64) -> FieldError {
    (Field::CommandLength, Defect::BadValue { found: found.into(), expected })
}

impl<'a> Command<'a> {
    /// Parses a command record from its type byte. For every command except RAM_DISCARD and
    /// `Unknown`, the length returned covers the whole payload; for RAM_DISCARD it covers the
    /// header only, for `Unknown` the 5-byte command header only.
    pub fn parse(buf: &'a [u8], dialect: Dialect) -> ParseResult<Self> {
        let h: &CommandHeader = match view(buf) {
            Ok(h) => h,
            Err(n) => return Ok(Parsed::Need(n)),
        };
        let len = h.len.get();
        let id = CommandId::from_wire(dialect, h.cmd.get());
        let fixed = |expected: u16| {
            if len == expected {
                Ok(())
            } else {
                Err(bad_len(len, expected.into()))
            }
        };
        match id {
            CommandId::Invalid => {
                return Err((Field::CommandId, Defect::Unknown { found: 0 }));
            }
            CommandId::Unknown(cmd) => {
                return Ok(Parsed::Done(Self::Unknown { cmd, len }, CommandHeader::LEN));
            }
            CommandId::PostcopyRamDiscard => {
                let body = buf.get(CommandHeader::LEN..).unwrap_or_default();
                return Ok(match DiscardHeader::parse(body, len, dialect)? {
                    Parsed::Done(d, n) => Parsed::Done(Self::RamDiscard(d), CommandHeader::LEN + n),
                    Parsed::Need(n) => Parsed::Need(CommandHeader::LEN + n),
                });
            }
            CommandId::OpenReturnPath
            | CommandId::PostcopyListen
            | CommandId::PostcopyRun
            | CommandId::EnableColo
            | CommandId::PostcopyResume => fixed(0)?,
            CommandId::Ping | CommandId::Packaged => fixed(4)?,
            CommandId::PostcopyEnd => fixed(1)?,
            CommandId::PostcopyAdvise => match (dialect, len) {
                (Dialect::Qemu72, 0) | (_, 16) => {}
                _ => return Err(bad_len(len, 16)),
            },
            // `u8 L` + L name bytes: at most 256.
            CommandId::RecvBitmap if len > 256 => return Err(bad_len(len, 256)),
            CommandId::RecvBitmap => {}
        }
        let end = CommandHeader::LEN + usize::from(len);
        let Some(payload) = buf.get(CommandHeader::LEN..end) else {
            return Ok(Parsed::Need(end));
        };
        let be32 = |p: &[u8]| u32::from_be_bytes([p[0], p[1], p[2], p[3]]);
        let cmd = match id {
            CommandId::OpenReturnPath => Self::OpenReturnPath,
            CommandId::Ping => Self::Ping(be32(payload)),
            CommandId::Packaged => Self::Packaged(be32(payload)),
            CommandId::PostcopyListen => Self::Listen,
            CommandId::PostcopyRun => Self::Run,
            CommandId::EnableColo => Self::EnableColo,
            CommandId::PostcopyResume => Self::Resume,
            CommandId::PostcopyEnd => Self::PostcopyEnd(payload[0]),
            CommandId::PostcopyAdvise => Self::Advise(Advise::read_from_bytes(payload).ok()),
            CommandId::RecvBitmap => match counted_str(payload, 0, Field::RamBlockName)? {
                Ok((name, n)) if n == payload.len() => Self::RecvBitmap(name),
                _ => return Err(bad_len(len, payload.first().map_or(1, |&l| u64::from(l) + 1))),
            },
            CommandId::Invalid | CommandId::Unknown(_) | CommandId::PostcopyRamDiscard => {
                return Err((Field::CommandId, Defect::Unsupported));
            }
        };
        Ok(Parsed::Done(cmd, end))
    }

    /// Writes the command (for RAM_DISCARD: the header, whose length field counts the
    /// `entries` that the caller writes next; for PACKAGED: the 4-byte payload, the caller
    /// writes the blob next).
    pub fn emit(&self, dialect: Dialect, w: &mut Writer<'_>) -> Option<()> {
        let mut payload = [0u8; 16 + 1 + 255];
        let mut pw = Writer::new(&mut payload);
        let (id, payload_len) = match *self {
            Self::OpenReturnPath => (CommandId::OpenReturnPath, 0),
            Self::Ping(v) => (CommandId::Ping, pw.put(&v.to_be_bytes()).map(|_| 4)?),
            Self::Advise(None) => (CommandId::PostcopyAdvise, 0),
            Self::Advise(Some(a)) => (CommandId::PostcopyAdvise, pw.put(a.as_bytes()).map(|_| 16)?),
            Self::Listen => (CommandId::PostcopyListen, 0),
            Self::Run => (CommandId::PostcopyRun, 0),
            Self::RamDiscard(d) => {
                let len = d.emit(dialect, &mut pw)?;
                (CommandId::PostcopyRamDiscard, len)
            }
            Self::Packaged(n) => (CommandId::Packaged, pw.put(&n.to_be_bytes()).map(|_| 4)?),
            Self::EnableColo => (CommandId::EnableColo, 0),
            Self::Resume => (CommandId::PostcopyResume, 0),
            Self::RecvBitmap(name) => {
                pw.put_counted(name)?;
                (CommandId::RecvBitmap, pw.len())
            }
            Self::PostcopyEnd(s) => (CommandId::PostcopyEnd, pw.put(&[s]).map(|_| 1)?),
            Self::Unknown { cmd, len } => (CommandId::Unknown(cmd), usize::from(len)),
        };
        let written = pw.len();
        let header = CommandHeader {
            kind: SectionType::Command.to_byte(),
            cmd: U16::new(id.to_wire(dialect)?),
            len: U16::new(u16::try_from(payload_len).ok()?),
        };
        w.put(header.as_bytes())?;
        w.put(&payload[..written])
    }
}

/// Convenience: the PING payload view, used by the PACKAGED tail check.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Debug)]
#[repr(C)]
pub struct PingCommand {
    /// Command header (cmd 2, len 4).
    pub header: CommandHeader,
    /// The value to echo.
    pub value: U32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_from_real_qemu() {
        let cases: [(&[u8], Command<'_>); 5] = [
            (b"\x08\x00\x01\x00\x00", Command::OpenReturnPath),
            (b"\x08\x00\x02\x00\x04\x00\x00\x00\x01", Command::Ping(1)),
            (
                b"\x08\x00\x03\x00\x10\x00\x00\x00\x00\x00\x00\x10\x00\x00\x00\x00\x00\x00\x00\x10\x00",
                Command::Advise(Some(Advise {
                    host_page_size: U64::new(0x1000),
                    target_page_size: U64::new(0x1000),
                })),
            ),
            (b"\x08\x00\x07\x00\x04\x00\x00\x00\xc9", Command::Packaged(201)),
            (b"\x08\x00\x05\x00\x00", Command::Run),
        ];
        for (bytes, expected) in cases {
            assert_eq!(Command::parse(bytes, Dialect::Qemu72), Ok(Parsed::Done(expected, bytes.len())));
            let mut out = [0u8; 64];
            let mut w = Writer::new(&mut out);
            expected.emit(Dialect::Qemu72, &mut w).unwrap();
            let n = w.len();
            assert_eq!(&out[..n], bytes);
        }
    }

    #[test]
    fn wrong_fixed_length_is_typed() {
        assert_eq!(
            Command::parse(b"\x08\x00\x02\x00\x05\x00\x00\x00\x01\x00", Dialect::Qemu72),
            Err((Field::CommandLength, Defect::BadValue { found: 5, expected: 4 }))
        );
        assert_eq!(
            Command::parse(b"\x08\x00\x03\x00\x08", Dialect::Qemu72),
            Err((Field::CommandLength, Defect::BadValue { found: 8, expected: 16 }))
        );
    }

    #[test]
    fn dialects_do_not_share_postcopy_numbers() {
        assert_eq!(CommandId::from_wire(Dialect::Qemu72, 6), CommandId::PostcopyRamDiscard);
        assert_eq!(CommandId::from_wire(Dialect::SeedV5, 6), CommandId::Unknown(6));
        assert_eq!(CommandId::from_wire(Dialect::SeedV5, 24), CommandId::PostcopyRamDiscard);
        assert_eq!(CommandId::from_wire(Dialect::Qemu72, 23), CommandId::Unknown(23));
        for raw in 0..=u16::MAX {
            for d in [Dialect::Qemu72, Dialect::SeedV5] {
                assert_eq!(CommandId::from_wire(d, raw).to_wire(d), Some(raw));
            }
        }
    }
}

//! Return-path messages, destination to source (`docs/wire-format.md` §6): `be16 type, be16 len, payload`.

use zerocopy::byteorder::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::{counted_str, view, ParseResult, Parsed, Writer};
use crate::config::MAX_RP_PAYLOAD;
use crate::error::{Defect, Field};

/// Message header.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Debug)]
#[repr(C)]
pub struct RpHeader {
    /// Message type (1..=6 in 7.2).
    pub kind: U16,
    /// Payload length (at most 512).
    pub len: U16,
}

/// REQ_PAGES payload (and the head of REQ_PAGES_ID's).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Debug)]
#[repr(C)]
pub struct PageRange {
    /// Byte offset in the block, a multiple of the source host page size.
    pub start: U64,
    /// Bytes, a multiple of the source host page size.
    pub len: U32,
}

/// A return-path message type. Unknown values are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RpType {
    /// 1: no more messages; status.
    Shut,
    /// 2: answer to PING.
    Pong,
    /// 3: page request naming the block.
    ReqPagesId,
    /// 4: page request in the block of the last REQ_PAGES_ID.
    ReqPages,
    /// 5: postcopy recovery bitmap.
    RecvBitmap,
    /// 6: postcopy recovery acknowledgement.
    ResumeAck,
    /// Anything else (kills a 7.2 source's connection).
    Unknown(u16),
}

impl RpType {
    /// Classifies a wire value.
    pub const fn from_wire(v: u16) -> Self {
        match v {
            1 => Self::Shut,
            2 => Self::Pong,
            3 => Self::ReqPagesId,
            4 => Self::ReqPages,
            5 => Self::RecvBitmap,
            6 => Self::ResumeAck,
            other => Self::Unknown(other),
        }
    }

    /// The wire value.
    pub const fn to_wire(self) -> u16 {
        match self {
            Self::Shut => 1,
            Self::Pong => 2,
            Self::ReqPagesId => 3,
            Self::ReqPages => 4,
            Self::RecvBitmap => 5,
            Self::ResumeAck => 6,
            Self::Unknown(v) => v,
        }
    }
}

/// The messages this destination sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RpMessage<'a> {
    /// SHUT(status): 0 = completed, non-zero = destination error.
    Shut(u32),
    /// PONG(value).
    Pong(u32),
    /// REQ_PAGES_ID: `len` bytes at `start` of `block`.
    ReqPagesId {
        /// Byte offset.
        start: u64,
        /// Bytes.
        len: u32,
        /// RAMBlock idstr.
        block: &'a [u8],
    },
    /// REQ_PAGES: same block as the last REQ_PAGES_ID.
    ReqPages {
        /// Byte offset.
        start: u64,
        /// Bytes.
        len: u32,
    },
    /// RECV_BITMAP: the framed part (the block name). The bitmap follows outside the frame:
    /// `be64 size`, `size` bytes (little-endian u64 words, bit i of word w = page 64w+i),
    /// `be64` [`RECV_BITMAP_END_MARK`].
    RecvBitmap {
        /// RAMBlock idstr.
        block: &'a [u8],
    },
    /// RESUME_ACK(value): ready to resume (QEMU sends 1).
    ResumeAck(u32),
}

/// The end mark after a received bitmap (`RAMBLOCK_RECV_BITMAP_ENDING`).
pub const RECV_BITMAP_END_MARK: u64 = 0x0123_4567_89ab_cdef;

impl<'a> RpMessage<'a> {
    /// Writes the message; `None` if `out` is too short or the block name is not 1..=255 bytes.
    pub fn emit(&self, out: &mut [u8]) -> Option<usize> {
        let mut w = Writer::new(out);
        let mut payload = [0u8; 13 + 255];
        let mut pw = Writer::new(&mut payload);
        let kind = match *self {
            Self::Shut(v) => pw.put(&v.to_be_bytes()).map(|_| RpType::Shut)?,
            Self::Pong(v) => pw.put(&v.to_be_bytes()).map(|_| RpType::Pong)?,
            Self::ReqPagesId { start, len, block } => {
                pw.put(PageRange { start: U64::new(start), len: U32::new(len) }.as_bytes())?;
                pw.put_counted(block)?;
                RpType::ReqPagesId
            }
            Self::ReqPages { start, len } => {
                pw.put(PageRange { start: U64::new(start), len: U32::new(len) }.as_bytes())?;
                RpType::ReqPages
            }
            Self::RecvBitmap { block } => pw.put_counted(block).map(|_| RpType::RecvBitmap)?,
            Self::ResumeAck(v) => pw.put(&v.to_be_bytes()).map(|_| RpType::ResumeAck)?,
        };
        let n = pw.len();
        let header = RpHeader { kind: U16::new(kind.to_wire()), len: U16::new(n as u16) };
        w.put(header.as_bytes())?;
        w.put(&payload[..n])?;
        Some(w.len())
    }

    /// Parses a message as the 7.2 source's return-path reader does: type 1..=6 with the
    /// exact lengths, payload at most 512 bytes (for RECV_BITMAP only its framed part: the
    /// caller reads the bitmap after it). (The source uses this; so do our tests.)
    pub fn parse(buf: &'a [u8]) -> ParseResult<Self> {
        let h: &RpHeader = match view(buf) {
            Ok(h) => h,
            Err(n) => return Ok(Parsed::Need(n)),
        };
        let len = usize::from(h.len.get());
        if len > MAX_RP_PAYLOAD {
            let cap = MAX_RP_PAYLOAD as u64;
            return Err((Field::ReturnPath, Defect::TooLong { len: len as u64, cap }));
        }
        let Some(payload) = buf.get(4..4 + len) else {
            return Ok(Parsed::Need(4 + len));
        };
        let bad = |expected: u64| (Field::ReturnPath, Defect::BadValue { found: len as u64, expected });
        let be32 = |p: &[u8]| u32::from_be_bytes([p[0], p[1], p[2], p[3]]);
        let msg = match RpType::from_wire(h.kind.get()) {
            RpType::Shut | RpType::Pong | RpType::ResumeAck if len != 4 => return Err(bad(4)),
            RpType::Shut => Self::Shut(be32(payload)),
            RpType::Pong => Self::Pong(be32(payload)),
            RpType::ResumeAck => Self::ResumeAck(be32(payload)),
            RpType::RecvBitmap => match counted_str(payload, 0, Field::ReturnPath)? {
                Ok((block, end)) if end == len => Self::RecvBitmap { block },
                _ => return Err(bad(1 + u64::from(payload.first().copied().unwrap_or(1)))),
            },
            RpType::ReqPages | RpType::ReqPagesId => {
                let range: &PageRange = view(payload).map_err(|_| bad(12))?;
                let (start, rlen) = (range.start.get(), range.len.get());
                if RpType::from_wire(h.kind.get()) == RpType::ReqPages {
                    if len != 12 {
                        return Err(bad(12));
                    }
                    Self::ReqPages { start, len: rlen }
                } else {
                    match counted_str(payload, 12, Field::ReturnPath)? {
                        Ok((block, end)) if end == len => Self::ReqPagesId { start, len: rlen, block },
                        _ => return Err(bad(13 + u64::from(payload.get(12).copied().unwrap_or(1)))),
                    }
                }
            }
            other => {
                return Err((Field::ReturnPath, Defect::Unknown { found: other.to_wire().into() }));
            }
        };
        Ok(Parsed::Done(msg, 4 + len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_as_observed_with_real_qemu() {
        let cases: [(&[u8], RpMessage<'_>); 6] = [
            (b"\x00\x05\x00\x07\x06pc.ram", RpMessage::RecvBitmap { block: b"pc.ram" }),
            (b"\x00\x06\x00\x04\x00\x00\x00\x01", RpMessage::ResumeAck(1)),
            (b"\x00\x01\x00\x04\x00\x00\x00\x00", RpMessage::Shut(0)),
            (b"\x00\x02\x00\x04\x00\x00\x00\x03", RpMessage::Pong(3)),
            (
                b"\x00\x03\x00\x13\x00\x00\x00\x00\x00\x1c\x00\x00\x00\x00\x10\x00\x06pc.ram",
                RpMessage::ReqPagesId { start: 0x1c0000, len: 0x1000, block: b"pc.ram" },
            ),
            (
                b"\x00\x04\x00\x0c\x00\x00\x00\x00\x00\x18\x00\x00\x00\x00\x20\x00",
                RpMessage::ReqPages { start: 0x180000, len: 0x2000 },
            ),
        ];
        for (bytes, msg) in cases {
            let mut out = [0u8; 64];
            let n = msg.emit(&mut out).unwrap();
            assert_eq!(&out[..n], bytes);
            assert_eq!(RpMessage::parse(bytes), Ok(Parsed::Done(msg, bytes.len())));
        }
    }
}

//! The page source both fault benchmarks ask: a thread that plays the migration source's
//! side of a postcopy page request.
//!
//! It reads return-path messages from its end of a unix socket, parses each with
//! `agent::wire::return_path` (REQ_PAGES_ID names the block, REQ_PAGES reuses the last
//! one), and answers every requested page from memory with what a QEMU 7.2 source sends in
//! postcopy after RUN: a `ram` PART section holding that one page, i.e. the PART header, a
//! PAGE record naming the block, the 4 KiB payload, EOS and the section footer. The same
//! responder, the same page contents and the same bytes serve our destination and the
//! userfaultfd baseline.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use agent::config::TARGET_PAGE_SIZE;
use agent::testing::{pattern_page, StreamBuilder};
use agent::wire::return_path::RpMessage;
use agent::wire::Parsed;

/// The `ram` section id of the benchmark streams.
pub const RAM_SECTION: u32 = 2;

/// The pages the source holds: page `i` of the block is [`pattern_page`]`(i)`.
#[derive(Debug)]
pub struct PageSource {
    pages: Vec<u8>,
}

impl PageSource {
    /// `count` pages.
    pub fn new(count: u64) -> Self {
        let mut pages = Vec::with_capacity((count * TARGET_PAGE_SIZE) as usize);
        for i in 0..count {
            pages.extend_from_slice(&pattern_page(i));
        }
        Self { pages }
    }

    /// The contents of the page at byte `offset` of the block.
    pub fn page(&self, offset: u64) -> Option<&[u8]> {
        let at = usize::try_from(offset).ok()?;
        self.pages.get(at..at + TARGET_PAGE_SIZE as usize)
    }
}

/// The source's answer to a request for the page at `offset` of `block`: one `ram` PART
/// section with that page (what the engine and QEMU's destination both accept after RUN).
pub fn page_section(block: &[u8], offset: u64, data: &[u8], out: &mut Vec<u8>) {
    let mut s = StreamBuilder { bytes: std::mem::take(out), ..StreamBuilder::default() };
    s.bytes.clear();
    s.ram_part(RAM_SECTION, false).page(Some(block), offset, data).eos(RAM_SECTION);
    *out = s.bytes;
}

/// What the responder did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Served {
    /// Requests parsed.
    pub requests: u64,
    /// Pages sent.
    pub pages: u64,
}

/// Serves page requests from `conn` until the peer closes it (or a request names a page the
/// source does not have, or does not parse: then it stops and says why).
pub fn serve(mut conn: UnixStream, source: &PageSource) -> Result<Served, String> {
    let mut served = Served::default();
    let mut buf = vec![0u8; 4096];
    let (mut start, mut end) = (0usize, 0usize);
    let mut block: Vec<u8> = Vec::new();
    let mut reply = Vec::with_capacity(2 * TARGET_PAGE_SIZE as usize);
    loop {
        match RpMessage::parse(&buf[start..end]) {
            Ok(Parsed::Done(msg, n)) => {
                start += n;
                let (offset, len) = match msg {
                    RpMessage::ReqPagesId { start, len, block: name } => {
                        block.clear();
                        block.extend_from_slice(name);
                        (start, len)
                    }
                    RpMessage::ReqPages { start, len } if !block.is_empty() => (start, len),
                    other => return Err(format!("responder: unexpected {other:?}")),
                };
                served.requests += 1;
                for page in (offset..offset + u64::from(len)).step_by(TARGET_PAGE_SIZE as usize) {
                    let data = source.page(page).ok_or(format!("responder: no page at {page:#x}"))?;
                    page_section(&block, page, data, &mut reply);
                    conn.write_all(&reply).map_err(|e| format!("responder: write: {e}"))?;
                    served.pages += 1;
                }
            }
            Ok(Parsed::Need(_)) => {
                if start > 0 {
                    buf.copy_within(start..end, 0);
                    end -= start;
                    start = 0;
                }
                match conn.read(&mut buf[end..]) {
                    Ok(0) => return Ok(served),
                    Ok(n) => end += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(format!("responder: read: {e}")),
                }
            }
            Err(e) => return Err(format!("responder: bad request: {e:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_each_requested_page_with_one_part_section() {
        let source = PageSource::new(4);
        let (mut dest, src) = UnixStream::pair().unwrap();
        let served = std::thread::scope(|s| {
            let h = s.spawn(|| serve(src, &source));
            let mut req = [0u8; 64];
            let n = RpMessage::ReqPagesId { start: 0x1000, len: 0x2000, block: b"pc.ram" }
                .emit(&mut req)
                .unwrap();
            dest.write_all(&req[..n]).unwrap();
            let n = RpMessage::ReqPages { start: 0x3000, len: 0x1000 }.emit(&mut req).unwrap();
            dest.write_all(&req[..n]).unwrap();
            let mut want = Vec::new();
            for page in [0x1000u64, 0x2000, 0x3000] {
                let mut one = Vec::new();
                page_section(b"pc.ram", page, source.page(page).unwrap(), &mut one);
                want.extend_from_slice(&one);
            }
            let mut got = vec![0u8; want.len()];
            dest.read_exact(&mut got).unwrap();
            assert_eq!(got, want);
            dest.shutdown(std::net::Shutdown::Both).unwrap();
            h.join().unwrap()
        })
        .unwrap();
        assert_eq!((served.requests, served.pages), (2, 3));
        assert!(source.page(4 * TARGET_PAGE_SIZE).is_none());
    }
}

//! The project's own postcopy migration source: it migrates the pattern guest
//! ([`crate::pattern_guest`]) in QEMU 7.2's wire format (`docs/wire-format.md`), built with
//! the agent's emitters, over one bidirectional byte stream whose other direction is the
//! return path.
//!
//! The stream, in QEMU 7.2's postcopy order:
//!
//! 1. header, CONFIGURATION (machine [`MACHINE`]: the agent lays an unknown machine out
//!    flat, so block [`BLOCK`] starts at guest-physical 0), OPEN_RETURN_PATH, PING 1,
//!    POSTCOPY_ADVISE(4096, 4096);
//! 2. `ram` START (section [`RAM_SECTION`]) with the block list `[(ram, mem_bytes)]`;
//! 3. precopy: one `ram` PART with every page (ZERO records for all-zero pages, PAGE records
//!    otherwise), the data pages in version 0;
//! 4. RAM_DISCARD commands (at most [`MAX_DISCARD_RANGES`] ranges each) for every dirty data
//!    page ([`pattern_guest::dirty`]), PING 2;
//! 5. PACKAGED { LISTEN, the vCPU record (FULL section [`VCPU_SECTION`], instance 0), PING 3,
//!    RUN }, PING 4;
//! 6. postcopy: page requests first, else the next discarded page not yet sent (after
//!    [`RunOptions::background_pause`]), each page in a `ram` PART of its own, flushed at once;
//! 7. `ram` END, EOF; then the return path is read until SHUT (or EOF, or the timeout).
//!
//! As QEMU's source does, a request for a page that is not waiting to be sent (never
//! discarded, or already sent in postcopy) is ignored, and a malformed request (unknown
//! block, misaligned, outside the block, REQ_PAGES before any REQ_PAGES_ID) fails the
//! migration.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent::wire::command::{Advise, Command, Dialect};
use agent::wire::discard::{DiscardHeader, DiscardRange};
use agent::wire::header::{Configuration, StreamHeader};
use agent::wire::ram::{BlockEntry, RamRecord, RAM_IDSTR, RAM_VERSION};
use agent::wire::return_path::RpMessage;
use agent::wire::section::{FullHeader, ShortHeader};
use agent::wire::vcpu::{Segment, VcpuRecord, VCPU_MAGIC, VCPU_RECORD_VERSION};
use agent::wire::{Parsed, SectionType, Writer};
use zerocopy::byteorder::big_endian::{U16, U32, U64};

use crate::pattern_guest::{self, PAGE};
use crate::{bail, Error, Result};

/// Machine name in CONFIGURATION.
pub const MACHINE: &[u8] = b"postcopy-test";
/// The one RAMBlock.
pub const BLOCK: &[u8] = b"ram";
/// Section id of `ram`.
pub const RAM_SECTION: u32 = 2;
/// Section id of the vCPU record.
pub const VCPU_SECTION: u32 = 3;
/// Ranges per RAM_DISCARD command (QEMU 7.2's limit).
pub const MAX_DISCARD_RANGES: usize = 12;
/// Default guest RAM: small enough for a slow transport (about 0.4 MB of stream).
pub const DEFAULT_MEM_BYTES: u64 = 2 << 20;

/// CR0: PG, WP, NE, ET, PE.
const CR0: u64 = 1 << 31 | 1 << 16 | 1 << 5 | 1 << 4 | 1;
/// CR4: PAE.
const CR4: u64 = 1 << 5;
/// EFER: LMA, LME.
const EFER: u64 = 1 << 10 | 1 << 8;
/// RFLAGS: the reserved bit 1 only (interrupts off).
const RFLAGS: u64 = 1 << 1;

/// How to run a migration.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Pause between background pages in postcopy, so that page requests race them on a
    /// fast transport (a request arriving during the pause is served at once).
    pub background_pause: Duration,
    /// The whole migration, SHUT included, must end within this.
    pub timeout: Duration,
    /// Saves every stream byte sent.
    pub record: Option<PathBuf>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions { background_pause: Duration::ZERO, timeout: Duration::from_secs(120), record: None }
    }
}

/// What a migration did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SourceReport {
    /// Page records in precopy (every page of the block).
    pub pages_precopy: u64,
    /// Of which ZERO records.
    pub zero_pages_precopy: u64,
    /// Pages named in RAM_DISCARD commands.
    pub discarded_pages: u64,
    /// Page records sent in postcopy (requested or background).
    pub postcopy_pages: u64,
    /// Page-request messages received (REQ_PAGES_ID and REQ_PAGES).
    pub requests: u64,
    /// Pages sent in postcopy because a request asked for them.
    pub requested_pages: u64,
    /// Requested pages ignored: never discarded, or already sent in postcopy.
    pub ignored_request_pages: u64,
    /// PONGs received.
    pub pongs: u64,
    /// The SHUT status the destination sent (0 = migration complete), if any.
    pub shut: Option<u32>,
    /// Stream bytes sent.
    pub bytes_sent: u64,
    /// From the start of the stream to SHUT (or the end of the run).
    pub seconds: f64,
}

impl SourceReport {
    /// The report as one JSON object.
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "pages_precopy": self.pages_precopy,
            "zero_pages_precopy": self.zero_pages_precopy,
            "discarded_pages": self.discarded_pages,
            "postcopy_pages": self.postcopy_pages,
            "requests": self.requests,
            "requested_pages": self.requested_pages,
            "ignored_request_pages": self.ignored_request_pages,
            "pongs": self.pongs,
            "shut": self.shut,
            "bytes_sent": self.bytes_sent,
            "seconds": self.seconds,
        })
        .to_string()
    }
}

/// A connection the source can send on while a thread of its own reads the return path.
pub trait Duplex: Read + Write {
    /// A second handle on the connection for the return-path thread. Its reads should time
    /// out now and then (the thread then checks whether the run is over).
    fn return_path_reader(&self) -> io::Result<Box<dyn Read + Send>>;

    /// Makes a write that blocks longer than `timeout` fail.
    fn set_send_timeout(&self, timeout: Duration) -> io::Result<()>;
}

/// How often the return-path thread wakes up without data.
const READ_POLL: Duration = Duration::from_millis(100);
/// After a send error, how long to wait for the SHUT that explains it.
const SHUT_AFTER_SEND_ERROR: Duration = Duration::from_secs(2);

/// Leaves a read timeout of 100 ms and the run's write timeout on the socket.
impl Duplex for UnixStream {
    fn return_path_reader(&self) -> io::Result<Box<dyn Read + Send>> {
        let reader = self.try_clone()?;
        reader.set_read_timeout(Some(READ_POLL))?;
        Ok(Box::new(reader))
    }

    fn set_send_timeout(&self, timeout: Duration) -> io::Result<()> {
        self.set_write_timeout(Some(timeout.max(Duration::from_millis(1))))
    }
}

/// Leaves a read timeout of 100 ms and the run's write timeout on the socket.
impl Duplex for TcpStream {
    fn return_path_reader(&self) -> io::Result<Box<dyn Read + Send>> {
        let reader = self.try_clone()?;
        reader.set_read_timeout(Some(READ_POLL))?;
        Ok(Box::new(reader))
    }

    fn set_send_timeout(&self, timeout: Duration) -> io::Result<()> {
        self.set_write_timeout(Some(timeout.max(Duration::from_millis(1))))
    }
}

/// The source: guest RAM as it serves it, and the guest's vCPU.
#[derive(Debug, Clone)]
pub struct OwnSource {
    mem_bytes: u64,
    image: Vec<u8>,
    /// Guest RAM below the data pages: page tables, GDT, the image.
    boot: Vec<u8>,
}

impl OwnSource {
    /// A source for the pattern guest `image` (flat, loaded at 0x10000) in `mem_bytes` of
    /// guest RAM (a multiple of 2 MiB, up to 1 GiB).
    pub fn new(mem_bytes: u64, image: Vec<u8>) -> Result<Self> {
        let boot = pattern_guest::boot_area(mem_bytes, &image)?;
        Ok(OwnSource { mem_bytes, image, boot })
    }

    /// Guest RAM in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.mem_bytes
    }

    /// The guest image.
    pub fn image(&self) -> &[u8] {
        &self.image
    }

    /// Pages of guest RAM.
    pub fn pages(&self) -> u64 {
        self.mem_bytes / PAGE
    }

    /// Page `page` in the version precopy sends (data pages in version 0).
    pub fn precopy_page(&self, page: u64) -> [u8; PAGE as usize] {
        self.page(page, false)
    }

    /// Page `page` as served last (after the discards: data pages in their
    /// [`pattern_guest::version`]).
    pub fn current_page(&self, page: u64) -> [u8; PAGE as usize] {
        self.page(page, true)
    }

    fn page(&self, page: u64, current: bool) -> [u8; PAGE as usize] {
        let at = (page * PAGE) as usize;
        match self.boot.get(at..at + PAGE as usize) {
            Some(bytes) => bytes.try_into().expect("a page"),
            None if current => pattern_guest::expected_page(page),
            None => pattern_guest::page_in_version(page, 0),
        }
    }

    /// Guest RAM as served last: what the destination must hold before the guest runs.
    pub fn ram(&self) -> Vec<u8> {
        (0..self.pages()).flat_map(|p| self.current_page(p)).collect()
    }

    /// The pages RAM_DISCARD names, ascending: every dirty data page.
    pub fn discarded_pages(&self) -> Vec<u64> {
        (pattern_guest::first_data_page()..self.pages()).filter(|&p| pattern_guest::dirty(p)).collect()
    }

    /// The guest's vCPU at entry (`docs/wire-format.md`; see [`pattern_guest`] for the
    /// contract).
    pub fn vcpu_record(&self) -> VcpuRecord {
        let mut gprs = [U64::ZERO; 16];
        // Encoding order: RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8-R15.
        gprs[4] = U64::new(pattern_guest::STACK_TOP);
        gprs[6] = U64::new(pattern_guest::DATA_START);
        gprs[7] = U64::new(self.mem_bytes);
        let segment = |selector: u16, attrib: u16| Segment {
            selector: U16::new(selector),
            attrib: U16::new(attrib),
            limit: U32::new(u32::MAX),
            base: U64::ZERO,
        };
        VcpuRecord {
            magic: U32::new(VCPU_MAGIC),
            version: U32::new(VCPU_RECORD_VERSION),
            gprs,
            rip: U64::new(pattern_guest::IMAGE_BASE),
            rflags: U64::new(RFLAGS),
            cr0: U64::new(CR0),
            cr3: U64::new(pattern_guest::PML4),
            cr4: U64::new(CR4),
            efer: U64::new(EFER),
            cs: segment(pattern_guest::CODE_SELECTOR, pattern_guest::CODE_ATTRIB),
            data: segment(pattern_guest::DATA_SELECTOR, pattern_guest::DATA_ATTRIB),
            gdtr_base: U64::new(pattern_guest::GDT),
            gdtr_limit: U32::new(pattern_guest::GDT_LIMIT),
            idtr_base: U64::ZERO,
            idtr_limit: U32::ZERO,
        }
    }

    /// The discard ranges (byte offsets in [`BLOCK`]), adjacent pages merged.
    fn discard_ranges(&self) -> Vec<(u64, u64)> {
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for page in self.discarded_pages() {
            match ranges.last_mut() {
                Some((start, len)) if *start + *len == page * PAGE => *len += PAGE,
                _ => ranges.push((page * PAGE, PAGE)),
            }
        }
        ranges
    }

    /// Migrates the guest over `conn`: sends the stream and serves page requests from the
    /// return path (read on a thread of its own, so sending never waits for it), then waits
    /// for SHUT. A SHUT before the end (the destination failed) ends the run early. The
    /// report says which SHUT came (none: the return path closed or the timeout passed
    /// first); errors are transport failures, malformed requests, or the timeout passing
    /// while sending.
    pub fn run<C: Duplex>(&self, conn: &mut C, opts: &RunOptions) -> Result<SourceReport> {
        let started = Instant::now();
        let deadline = started + opts.timeout;
        conn.set_send_timeout(opts.timeout)?;
        let reader = conn.return_path_reader()?;
        let record = match &opts.record {
            Some(p) => Some(BufWriter::new(
                File::create(p).map_err(|e| Error(format!("--record {}: {e}", p.display())))?,
            )),
            None => None,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let thread_stop = stop.clone();
        let rp_thread = std::thread::Builder::new()
            .name("return-path".into())
            .spawn(move || read_return_path(reader, tx, &thread_stop))?;
        let mut session = Session {
            source: self,
            out: BufWriter::with_capacity(64 << 10, Sink { conn, record, bytes: 0 }),
            rx,
            rp_open: true,
            rp_block: None,
            requested: VecDeque::new(),
            waiting: vec![false; self.pages() as usize],
            opts,
            deadline,
            report: SourceReport::default(),
        };
        let result = session.migrate();
        let mut report = std::mem::take(&mut session.report);
        report.bytes_sent = session.out.get_ref().bytes;
        report.seconds = started.elapsed().as_secs_f64();
        // Whatever is still buffered was not sent (the run failed): it is not flushed again.
        let (sink, _) = session.out.into_parts();
        let recorded = sink.record.map_or(Ok(()), |mut r| r.flush());
        stop.store(true, Ordering::Release);
        // The thread ends within one read timeout; a transport without timeouts may keep it
        // blocked in `read` until the peer closes, so it is not joined.
        drop(rp_thread);
        result?;
        recorded.map_err(|e| Error(format!("record: {e}")))?;
        Ok(report)
    }
}

/// Writes to the connection, counts, and records what was written.
struct Sink<'a, C: Write> {
    conn: &'a mut C,
    record: Option<BufWriter<File>>,
    bytes: u64,
}

impl<C: Write> Write for Sink<'_, C> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.conn.write(buf)?;
        if let Some(r) = self.record.as_mut() {
            r.write_all(&buf[..n])?;
        }
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.conn.flush()
    }
}

/// A return-path message, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Rp {
    Shut(u32),
    Pong(u32),
    Request { block: Option<Vec<u8>>, start: u64, len: u32 },
}

/// What the return-path thread reports.
#[derive(Debug)]
enum RpEvent {
    Message(Rp),
    /// End of the return path (EOF).
    Closed,
    /// A read error or a message a 7.2 source would refuse.
    Failed(String),
}

/// The return-path thread: reads and parses messages until SHUT, EOF, an error, or `stop`.
fn read_return_path(mut reader: Box<dyn Read + Send>, tx: Sender<RpEvent>, stop: &AtomicBool) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 4096];
    // Return-path bytes parsed before `buf`.
    let mut parsed = 0usize;
    loop {
        let n = match reader.read(&mut chunk) {
            Ok(0) => {
                let _ = tx.send(RpEvent::Closed);
                return;
            }
            Ok(n) => n,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                if stop.load(Ordering::Acquire) {
                    return;
                }
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = tx.send(RpEvent::Failed(format!("reading the return path: {e}")));
                return;
            }
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut at = 0;
        loop {
            let (message, len) = match RpMessage::parse(&buf[at..]) {
                Ok(Parsed::Done(m, len)) => (m, len),
                Ok(Parsed::Need(_)) => break,
                Err((field, defect)) => {
                    let _ = tx.send(RpEvent::Failed(format!(
                        "return path offset {}: {field:?}: {defect:?} (a 7.2 source drops the connection)",
                        parsed + at
                    )));
                    return;
                }
            };
            at += len;
            let rp = match message {
                RpMessage::Shut(s) => Rp::Shut(s),
                RpMessage::Pong(v) => Rp::Pong(v),
                RpMessage::ReqPagesId { start, len, block } => {
                    Rp::Request { block: Some(block.to_vec()), start, len }
                }
                RpMessage::ReqPages { start, len } => Rp::Request { block: None, start, len },
                // The project's source never breaks a connection, so never asks to resume.
                RpMessage::RecvBitmap { .. } | RpMessage::ResumeAck(_) => {
                    let _ = tx.send(RpEvent::Failed(format!(
                        "return path offset {}: {message:?} without a recovery",
                        parsed + at - len
                    )));
                    return;
                }
            };
            let shut = matches!(rp, Rp::Shut(_));
            // After SHUT the destination sends nothing more; the source stops reading.
            if tx.send(RpEvent::Message(rp)).is_err() || shut {
                return;
            }
        }
        buf.drain(..at);
        parsed += at;
    }
}

/// One migration in progress.
struct Session<'a, C: Write> {
    source: &'a OwnSource,
    out: BufWriter<Sink<'a, C>>,
    rx: Receiver<RpEvent>,
    /// The return-path thread still reports.
    rp_open: bool,
    /// Block of the last REQ_PAGES_ID.
    rp_block: Option<Vec<u8>>,
    /// Requested pages not yet looked at, in order.
    requested: VecDeque<u64>,
    /// Per page: discarded and not yet sent in postcopy.
    waiting: Vec<bool>,
    opts: &'a RunOptions,
    deadline: Instant,
    report: SourceReport,
}

/// Outcome of a step that the destination may cut short with SHUT.
enum Flow {
    Go,
    /// The destination sent SHUT: stop sending.
    Shut,
}

impl<C: Write> Session<'_, C> {
    fn migrate(&mut self) -> Result<()> {
        match self.send_stream() {
            Ok(Flow::Go) => self.wait_for_shut(),
            Ok(Flow::Shut) => Ok(()),
            Err(e) => {
                // A destination that failed sends SHUT(1) and closes: a send error then is
                // the consequence, and the SHUT (which may still be on its way through the
                // return-path thread) the outcome to report.
                let until = Instant::now() + SHUT_AFTER_SEND_ERROR;
                while self.rp_open && self.report.shut.is_none() {
                    let now = Instant::now();
                    if now >= until || self.wait_event(until - now).is_err() {
                        break;
                    }
                }
                match self.report.shut {
                    Some(_) => Ok(()),
                    None => Err(e),
                }
            }
        }
    }

    /// Writes one record built by an agent emitter.
    fn emit(&mut self, f: impl FnOnce(&mut Writer<'_>) -> Option<()>) -> Result<()> {
        let mut buf = [0u8; 1024];
        let mut w = Writer::new(&mut buf);
        if f(&mut w).is_none() {
            bail!("internal: a record did not fit its emit buffer");
        }
        let n = w.len();
        self.out.write_all(&buf[..n])?;
        Ok(())
    }

    fn command(&mut self, cmd: Command<'_>) -> Result<()> {
        self.emit(|w| cmd.emit(Dialect::Qemu72, w))
    }

    /// EOS and the `ram` footer.
    fn end_ram_section(&mut self) -> Result<()> {
        self.emit(|w| RamRecord::Eos.emit(w))?;
        self.emit(|w| ShortHeader::emit(SectionType::Footer, RAM_SECTION, w))
    }

    /// A ZERO or PAGE record for `page` (`named`: with the block name, else CONTINUE).
    /// Returns whether it was a ZERO record.
    fn page_record(&mut self, page: u64, contents: &[u8; PAGE as usize], named: bool) -> Result<bool> {
        let block = named.then_some(BLOCK);
        let offset = page * PAGE;
        if contents.iter().all(|&b| b == 0) {
            self.emit(|w| RamRecord::Zero { block, offset, fill: 0 }.emit(w))?;
            Ok(true)
        } else {
            self.emit(|w| RamRecord::Page { block, offset }.emit(w))?;
            self.out.write_all(contents)?;
            Ok(false)
        }
    }

    fn send_stream(&mut self) -> Result<Flow> {
        let source = self.source;
        let mem = source.mem_bytes;
        self.emit(StreamHeader::emit)?;
        self.emit(|w| Configuration { machine: MACHINE }.emit(w))?;
        self.command(Command::OpenReturnPath)?;
        self.command(Command::Ping(1))?;
        let advise = Advise { host_page_size: U64::new(PAGE), target_page_size: U64::new(PAGE) };
        self.command(Command::Advise(Some(advise)))?;

        let start = FullHeader {
            start: true,
            section_id: RAM_SECTION,
            idstr: RAM_IDSTR,
            instance_id: 0,
            version_id: RAM_VERSION,
        };
        self.emit(|w| start.emit(w))?;
        self.emit(|w| RamRecord::MemSize(mem).emit(w))?;
        self.emit(|w| BlockEntry { name: BLOCK, used_length: mem }.emit(w))?;
        self.end_ram_section()?;

        // Precopy: every page once.
        self.emit(|w| ShortHeader::emit(SectionType::Part, RAM_SECTION, w))?;
        for page in 0..source.pages() {
            let zero = self.page_record(page, &source.precopy_page(page), page == 0)?;
            self.report.pages_precopy += 1;
            self.report.zero_pages_precopy += u64::from(zero);
            if let Flow::Shut = self.poll()? {
                return Ok(Flow::Shut);
            }
            if Instant::now() > self.deadline {
                bail!("timed out in precopy after {:?}", self.opts.timeout);
            }
        }
        self.end_ram_section()?;

        // The dirty pages: discarded now, sent again in postcopy.
        let ranges = source.discard_ranges();
        for group in ranges.chunks(MAX_DISCARD_RANGES) {
            let header = DiscardHeader { block: BLOCK, first_bit_offset: None, entries: group.len() as u16 };
            self.command(Command::RamDiscard(header))?;
            for &(start, len) in group {
                self.emit(|w| DiscardRange::emit(start, len, w))?;
            }
        }
        for page in source.discarded_pages() {
            self.waiting[page as usize] = true;
            self.report.discarded_pages += 1;
        }
        self.command(Command::Ping(2))?;

        let blob = self.package()?;
        self.command(Command::Packaged(blob.len() as u32))?;
        self.out.write_all(&blob)?;
        self.command(Command::Ping(4))?;
        self.out.flush()?;

        if let Flow::Shut = self.postcopy()? {
            return Ok(Flow::Shut);
        }
        self.emit(|w| ShortHeader::emit(SectionType::End, RAM_SECTION, w))?;
        self.end_ram_section()?;
        self.out.write_all(&[SectionType::Eof.to_byte()])?;
        self.out.flush()?;
        Ok(Flow::Go)
    }

    /// The PACKAGED blob: LISTEN, the vCPU record, PING 3, RUN.
    fn package(&self) -> Result<Vec<u8>> {
        let mut buf = [0u8; 1024];
        let mut w = Writer::new(&mut buf);
        let record = self.source.vcpu_record();
        let built = Command::Listen
            .emit(Dialect::Qemu72, &mut w)
            .and_then(|()| record.emit_section(VCPU_SECTION, 0, &mut w))
            .and_then(|()| Command::Ping(3).emit(Dialect::Qemu72, &mut w))
            .and_then(|()| Command::Run.emit(Dialect::Qemu72, &mut w));
        if built.is_none() {
            bail!("internal: the PACKAGED blob did not fit its buffer");
        }
        let n = w.len();
        Ok(buf[..n].to_vec())
    }

    /// Sends every discarded page: requested ones first, the others in ascending order.
    fn postcopy(&mut self) -> Result<Flow> {
        let background: Vec<u64> = self.source.discarded_pages();
        let mut next = background.iter().copied().peekable();
        let mut next_send = Instant::now();
        loop {
            if let Flow::Shut = self.poll()? {
                return Ok(Flow::Shut);
            }
            if Instant::now() > self.deadline {
                bail!("timed out in postcopy after {:?}", self.opts.timeout);
            }
            if let Some(page) = self.requested.pop_front() {
                if self.waiting[page as usize] {
                    self.send_postcopy_page(page)?;
                    self.report.requested_pages += 1;
                } else {
                    self.report.ignored_request_pages += 1;
                }
                continue;
            }
            while next.next_if(|&p| !self.waiting[p as usize]).is_some() {}
            let Some(&page) = next.peek() else { return Ok(Flow::Go) };
            let now = Instant::now();
            if now < next_send {
                self.wait_event(next_send - now)?;
                continue;
            }
            self.send_postcopy_page(page)?;
            next_send = Instant::now() + self.opts.background_pause;
        }
    }

    /// One page in a `ram` PART of its own, flushed.
    fn send_postcopy_page(&mut self, page: u64) -> Result<()> {
        self.emit(|w| ShortHeader::emit(SectionType::Part, RAM_SECTION, w))?;
        self.page_record(page, &self.source.current_page(page), true)?;
        self.end_ram_section()?;
        self.out.flush()?;
        self.waiting[page as usize] = false;
        self.report.postcopy_pages += 1;
        Ok(())
    }

    /// Handles every return-path event that has arrived, without waiting.
    fn poll(&mut self) -> Result<Flow> {
        while self.rp_open {
            match self.rx.try_recv() {
                Ok(event) => self.handle(event)?,
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => self.rp_open = false,
            }
        }
        Ok(if self.report.shut.is_some() { Flow::Shut } else { Flow::Go })
    }

    /// Waits up to `timeout` for one return-path event and handles it.
    fn wait_event(&mut self, timeout: Duration) -> Result<()> {
        if !self.rp_open {
            std::thread::sleep(timeout);
            return Ok(());
        }
        match self.rx.recv_timeout(timeout) {
            Ok(event) => self.handle(event),
            Err(RecvTimeoutError::Timeout) => Ok(()),
            Err(RecvTimeoutError::Disconnected) => {
                self.rp_open = false;
                Ok(())
            }
        }
    }

    fn handle(&mut self, event: RpEvent) -> Result<()> {
        match event {
            RpEvent::Message(Rp::Pong(_)) => self.report.pongs += 1,
            RpEvent::Message(Rp::Shut(status)) => {
                self.report.shut = Some(status);
                self.rp_open = false;
            }
            RpEvent::Message(Rp::Request { block, start, len }) => {
                self.report.requests += 1;
                if let Some(name) = block {
                    if name != BLOCK {
                        bail!("page request for unknown block {:?}", String::from_utf8_lossy(&name));
                    }
                    self.rp_block = Some(name);
                }
                if self.rp_block.is_none() {
                    bail!("REQ_PAGES before any REQ_PAGES_ID (start {start:#x})");
                }
                let end = start.checked_add(u64::from(len));
                if start % PAGE != 0
                    || u64::from(len) % PAGE != 0
                    || len == 0
                    || end > Some(self.source.mem_bytes)
                {
                    bail!("page request {start:#x}+{len:#x}: not whole pages inside the block");
                }
                self.requested.extend(start / PAGE..(start + u64::from(len)) / PAGE);
            }
            RpEvent::Closed => self.rp_open = false,
            RpEvent::Failed(e) => return Err(Error(e)),
        }
        Ok(())
    }

    /// After EOF: reads the return path until SHUT, its end, or the deadline.
    fn wait_for_shut(&mut self) -> Result<()> {
        while self.rp_open && self.report.shut.is_none() {
            let now = Instant::now();
            if now >= self.deadline {
                break;
            }
            self.wait_event(self.deadline - now)?;
        }
        // Requests after the last page are for pages already sent.
        self.report.ignored_request_pages += self.requested.len() as u64;
        self.requested.clear();
        Ok(())
    }
}

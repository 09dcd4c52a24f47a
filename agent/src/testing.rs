//! Strict fakes and stream builders for host tests, fuzzing and benchmarks (feature `std`).
//!
//! The agent itself never allocates; these helpers do, and exist only on the host.
//! The fakes are strict: guest memory rejects writes outside a block, the stage-2 fake fails
//! if an unmap is left without a flush, the ring splits records wherever it is told to.

extern crate std;

use crate::sync::AtomicU64;
use std::collections::BTreeMap;
use std::vec::Vec;

use crate::config::TARGET_PAGE_SIZE;
use crate::ports::{DeviceStateSink, GuestMemory, PageWaiters, Refused, ReturnPath, SendFailed, Stage2};
use crate::postcopy::{Engine, EngineConfig, Progress, Shared};
use crate::wire::command::{Advise, Command, Dialect};
use crate::wire::discard::{DiscardHeader, DiscardMask, DiscardRange};
use crate::wire::header::{Configuration, StreamHeader};
use crate::wire::ram::{BlockEntry, RamRecord};
use crate::wire::section::{FullHeader, ShortHeader};
use crate::wire::{SectionType, Writer};
use crate::Error;

/// One block of [`PageMemory`]: only pages holding a non-zero byte are stored, so a block
/// of many GiB costs nothing until it is written (layouts above 4 GiB stay cheap to test
/// and to fuzz).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FakeBlock {
    /// The block's idstr.
    pub name: Vec<u8>,
    /// Its length in bytes.
    pub len: u64,
    /// Page number → contents, for pages that are not all zero.
    pages: BTreeMap<u64, Vec<u8>>,
}

impl FakeBlock {
    /// `len` bytes from `offset` (zeros where nothing was written).
    pub fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut out = std::vec![0u8; len];
        let mut done = 0;
        while done < len {
            let at = offset + done as u64;
            let in_page = (at % TARGET_PAGE_SIZE) as usize;
            let n = (TARGET_PAGE_SIZE as usize - in_page).min(len - done);
            if let Some(page) = self.pages.get(&(at / TARGET_PAGE_SIZE)) {
                out[done..done + n].copy_from_slice(&page[in_page..in_page + n]);
            }
            done += n;
        }
        out
    }

    /// The whole block (for small blocks).
    pub fn bytes(&self) -> Vec<u8> {
        self.read(0, self.len as usize)
    }

    /// Whether every byte is zero.
    pub fn is_zero(&self) -> bool {
        self.pages.is_empty()
    }

    fn edit(&mut self, offset: u64, len: usize, f: impl FnOnce(&mut [u8])) {
        assert!(offset + len as u64 <= self.len, "write outside block {:?}: {offset:#x}+{len}", self.name);
        let (page, at) = (offset / TARGET_PAGE_SIZE, (offset % TARGET_PAGE_SIZE) as usize);
        assert!(at + len <= TARGET_PAGE_SIZE as usize, "write crosses a page");
        let contents = self.pages.entry(page).or_insert_with(|| std::vec![0; TARGET_PAGE_SIZE as usize]);
        f(&mut contents[at..at + len]);
        if contents.iter().all(|&b| b == 0) {
            self.pages.remove(&page);
        }
    }
}

/// Guest RAM, page-sparse; a write outside a block or across a page panics (fails the test).
#[derive(Debug, Default)]
pub struct PageMemory {
    /// The blocks, in declaration order.
    pub blocks: Vec<FakeBlock>,
}

impl PageMemory {
    /// The block named `name`.
    pub fn block(&self, name: &[u8]) -> Option<&FakeBlock> {
        self.blocks.iter().find(|b| b.name == name)
    }
}

impl GuestMemory for PageMemory {
    fn declare_block(&mut self, index: usize, name: &[u8], len: u64) -> Result<(), Refused> {
        assert_eq!(index, self.blocks.len(), "blocks are declared in order");
        self.blocks.push(FakeBlock { name: name.to_vec(), len, pages: BTreeMap::new() });
        Ok(())
    }

    fn write(&mut self, block: usize, offset: u64, data: &[u8]) {
        self.blocks[block].edit(offset, data.len(), |page| page.copy_from_slice(data));
    }

    fn fill(&mut self, block: usize, offset: u64, len: u64, byte: u8) {
        self.blocks[block].edit(offset, len as usize, |page| page.fill(byte));
    }
}

/// A page-granular stage-2 map that counts flushes and refuses an unflushed unmap at the end.
#[derive(Debug, Default)]
pub struct PageMap {
    /// Mapped guest-physical pages → (block, offset).
    pub mapped: BTreeMap<u64, (usize, u64)>,
    /// Unmaps not yet flushed.
    pub unflushed: u64,
    /// Flushes done.
    pub flushes: u64,
}

impl Stage2 for PageMap {
    fn map(&mut self, gpa: u64, block: usize, offset: u64) {
        assert_eq!(gpa % TARGET_PAGE_SIZE, 0);
        self.mapped.insert(gpa, (block, offset));
    }

    fn unmap(&mut self, gpa: u64, len: u64) {
        let pages: Vec<u64> = self.mapped.range(gpa..gpa + len).map(|(&g, _)| g).collect();
        for g in pages {
            self.mapped.remove(&g);
        }
        self.unflushed += 1;
    }

    fn flush(&mut self) {
        self.unflushed = 0;
        self.flushes += 1;
    }
}

/// All stream-context ports, recording what they were asked to do.
#[derive(Debug, Default)]
pub struct FakePorts {
    /// Guest RAM.
    pub memory: PageMemory,
    /// Stage-2 map.
    pub stage2: PageMap,
    /// Device state, concatenated.
    pub device_state: Vec<u8>,
    /// vCPUs released, in order.
    pub released: Vec<usize>,
}

impl GuestMemory for FakePorts {
    fn declare_block(&mut self, index: usize, name: &[u8], len: u64) -> Result<(), Refused> {
        self.memory.declare_block(index, name, len)
    }
    fn write(&mut self, block: usize, offset: u64, data: &[u8]) {
        self.memory.write(block, offset, data);
    }
    fn fill(&mut self, block: usize, offset: u64, len: u64, byte: u8) {
        self.memory.fill(block, offset, len, byte);
    }
}

impl Stage2 for FakePorts {
    fn map(&mut self, gpa: u64, block: usize, offset: u64) {
        self.stage2.map(gpa, block, offset);
    }
    fn unmap(&mut self, gpa: u64, len: u64) {
        self.stage2.unmap(gpa, len);
    }
    fn flush(&mut self) {
        self.stage2.flush();
    }
}

impl DeviceStateSink for FakePorts {
    fn device_state(&mut self, bytes: &[u8]) {
        self.device_state.extend_from_slice(bytes);
    }
}

impl PageWaiters for FakePorts {
    fn release(&mut self, vcpu: usize) {
        self.released.push(vcpu);
    }
}

/// A return path that records every message.
#[derive(Debug, Default)]
pub struct VecReturnPath {
    /// Messages, in order.
    pub sent: Vec<Vec<u8>>,
}

impl ReturnPath for VecReturnPath {
    fn send(&mut self, message: &[u8]) -> Result<(), SendFailed> {
        self.sent.push(message.to_vec());
        Ok(())
    }
}

/// Zeroed page bitmaps for `bytes` of guest RAM.
pub fn bitmap(bytes: u64) -> Vec<AtomicU64> {
    (0..bytes.div_ceil(64 * TARGET_PAGE_SIZE)).map(|_| AtomicU64::new(0)).collect()
}

/// A receive ring for tests: bytes arrive a chunk at a time into its free space, wrapping;
/// the reader sees them as up to two slices and consumes from the front.
#[derive(Debug)]
pub struct TestRing {
    buf: Vec<u8>,
    head: usize,
    len: usize,
}

impl TestRing {
    /// An empty ring of `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        Self { buf: std::vec![0; capacity], head: 0, len: 0 }
    }

    /// Copies up to `chunk` bytes of `bytes` into the free space; returns how many.
    pub fn arrive(&mut self, bytes: &[u8], chunk: usize) -> usize {
        let capacity = self.buf.len();
        let n = chunk.min(capacity - self.len).min(bytes.len());
        for (i, &b) in bytes[..n].iter().enumerate() {
            self.buf[(self.head + self.len + i) % capacity] = b;
        }
        self.len += n;
        n
    }

    /// The readable bytes: up to the ring's end, then from its start.
    pub fn readable(&self) -> (&[u8], &[u8]) {
        let first_len = self.len.min(self.buf.len() - self.head);
        (&self.buf[self.head..self.head + first_len], &self.buf[..self.len - first_len])
    }

    /// Drops `n` bytes from the front.
    pub fn consume(&mut self, n: usize) {
        self.head = (self.head + n) % self.buf.len();
        self.len -= n;
    }

    /// Whether no byte can arrive.
    pub fn is_full(&self) -> bool {
        self.len == self.buf.len()
    }
}

/// Feeds `stream` to `engine` through a ring of `capacity` bytes, writing at most `chunk`
/// bytes per arrival, so records split at every ring wrap and partial arrival. Stops when
/// the migration finishes or the stream is used up (without signalling end of input).
pub fn feed_through_ring<R: ReturnPath>(
    engine: &mut Engine<'_, '_, '_, R, FakePorts>,
    stream: &[u8],
    capacity: usize,
    chunk: usize,
) -> Result<Progress, Error> {
    let mut ring = TestRing::new(capacity);
    let (mut written, mut consumed) = (0usize, 0usize);
    loop {
        let n = ring.arrive(&stream[written..], chunk);
        written += n;
        let (first, second) = ring.readable();
        let progress = engine.receive(first, second)?;
        ring.consume(progress.consumed);
        consumed += progress.consumed;
        if progress.finished || (written == stream.len() && progress.consumed == 0 && n == 0) {
            return Ok(Progress { consumed, finished: progress.finished });
        }
        // A full ring the engine takes nothing from would never drain: a decoder liveness
        // bug (a record that can never fit), not a property of the stream.
        assert!(
            !(ring.is_full() && progress.consumed == 0),
            "decoder stalled on a full ring of {capacity} bytes"
        );
    }
}

/// Guest RAM the page bitmaps of [`run_stream`] cover.
pub const TEST_RAM_CAPACITY: u64 = 16 << 30;

/// Runs a whole stream through a fresh engine with fakes; returns the engine's pieces.
pub fn run_stream(stream: &[u8], capacity: usize, chunk: usize) -> Outcome {
    run_stream_with(stream, capacity, chunk, EngineConfig::default())
}

/// [`run_stream`] with an engine configuration.
pub fn run_stream_with(stream: &[u8], capacity: usize, chunk: usize, config: EngineConfig<'_>) -> Outcome {
    // Bitmaps for 16 GiB of guest RAM: layouts above 4 GiB are reachable, and a larger
    // hostile block list is refused before the fake memory is asked for it.
    let received = bitmap(TEST_RAM_CAPACITY);
    let requested = bitmap(TEST_RAM_CAPACITY);
    let shared = Shared::new(&received, &requested, VecReturnPath::default());
    let mut engine = Engine::new(&shared, FakePorts::default(), config);
    let result = feed_through_ring(&mut engine, stream, capacity, chunk).and_then(|p| match p.finished {
        true => Ok(p),
        false => engine.end_of_input().map(|end| Progress { consumed: p.consumed, ..end }),
    });
    let stats = engine.stats();
    let ports = core::mem::take(engine.ports());
    assert_eq!(ports.stage2.unflushed, 0, "unmaps left without a flush ({:?})", result);
    let state = shared.state.get();
    drop(engine);
    let rp = shared.with_rp(|rp| core::mem::take(&mut rp.port().sent));
    Outcome { result, stats, ports, rp, state }
}

/// What [`run_stream`] observed.
#[derive(Debug)]
pub struct Outcome {
    /// The engine's final result.
    pub result: Result<Progress, Error>,
    /// Counters.
    pub stats: crate::postcopy::Stats,
    /// Ports with what they recorded.
    pub ports: FakePorts,
    /// Return-path messages.
    pub rp: Vec<Vec<u8>>,
    /// Final postcopy state.
    pub state: crate::postcopy::State,
}

/// Builds migration streams record by record.
#[derive(Debug, Default, Clone)]
pub struct StreamBuilder {
    /// The bytes so far.
    pub bytes: Vec<u8>,
    /// Dialect of the commands.
    pub dialect: Dialect,
}

impl StreamBuilder {
    /// An empty builder (no header: use it for a PACKAGED blob too).
    pub fn new() -> Self {
        Self::default()
    }

    fn put(&mut self, f: impl FnOnce(&mut Writer<'_>) -> Option<()>) -> &mut Self {
        let mut buf = [0u8; 1024];
        let mut w = Writer::new(&mut buf);
        f(&mut w).expect("record fits");
        let n = w.len();
        self.bytes.extend_from_slice(&buf[..n]);
        self
    }

    /// Stream header.
    pub fn header(&mut self) -> &mut Self {
        self.put(StreamHeader::emit)
    }

    /// CONFIGURATION.
    pub fn configuration(&mut self, machine: &[u8]) -> &mut Self {
        self.put(|w| Configuration { machine }.emit(w))
    }

    /// A command (for RAM_DISCARD use [`Self::discard`], for PACKAGED [`Self::packaged`]).
    pub fn command(&mut self, cmd: Command<'_>) -> &mut Self {
        let d = self.dialect;
        self.put(|w| cmd.emit(d, w))
    }

    /// POSTCOPY_ADVISE with the given page sizes.
    pub fn advise(&mut self, host: u64, target: u64) -> &mut Self {
        use zerocopy::byteorder::big_endian::U64;
        let a = Advise { host_page_size: U64::new(host), target_page_size: U64::new(target) };
        self.command(Command::Advise(Some(a)))
    }

    /// A 7.2 RAM_DISCARD of byte ranges.
    pub fn discard(&mut self, block: &[u8], ranges: &[(u64, u64)]) -> &mut Self {
        let h = DiscardHeader { block, first_bit_offset: None, entries: ranges.len() as u16 };
        self.command(Command::RamDiscard(h));
        for &(s, l) in ranges {
            self.put(|w| DiscardRange::emit(s, l, w));
        }
        self
    }

    /// A v5 RAM_DISCARD of mask entries.
    pub fn discard_v5(&mut self, block: &[u8], first_bit_offset: u8, masks: &[(u64, u32)]) -> &mut Self {
        let h =
            DiscardHeader { block, first_bit_offset: Some(first_bit_offset), entries: masks.len() as u16 };
        self.command(Command::RamDiscard(h));
        for &(s, m) in masks {
            self.put(|w| DiscardMask::emit(s, m, w));
        }
        self
    }

    /// PACKAGED with `blob` after it.
    pub fn packaged(&mut self, blob: &[u8]) -> &mut Self {
        self.command(Command::Packaged(blob.len() as u32));
        self.bytes.extend_from_slice(blob);
        self
    }

    /// `ram` START with the block list, EOS and footer.
    pub fn ram_start(&mut self, section_id: u32, blocks: &[(&[u8], u64)]) -> &mut Self {
        let total = blocks.iter().map(|b| b.1).sum();
        let h = FullHeader { start: true, section_id, idstr: b"ram", instance_id: 0, version_id: 4 };
        self.put(|w| h.emit(w));
        self.put(|w| RamRecord::MemSize(total).emit(w));
        for &(name, used_length) in blocks {
            self.put(|w| BlockEntry { name, used_length }.emit(w));
        }
        self.eos(section_id)
    }

    /// `ram` PART (or END) header.
    pub fn ram_part(&mut self, section_id: u32, end: bool) -> &mut Self {
        let kind = if end { SectionType::End } else { SectionType::Part };
        self.put(|w| ShortHeader::emit(kind, section_id, w))
    }

    /// A ZERO record (`block` None = CONTINUE).
    pub fn zero(&mut self, block: Option<&[u8]>, offset: u64, fill: u8) -> &mut Self {
        self.put(|w| RamRecord::Zero { block, offset, fill }.emit(w))
    }

    /// A PAGE record with its payload.
    pub fn page(&mut self, block: Option<&[u8]>, offset: u64, data: &[u8]) -> &mut Self {
        assert_eq!(data.len() as u64, TARGET_PAGE_SIZE);
        self.put(|w| RamRecord::Page { block, offset }.emit(w));
        self.bytes.extend_from_slice(data);
        self
    }

    /// EOS and the footer.
    pub fn eos(&mut self, section_id: u32) -> &mut Self {
        self.put(|w| RamRecord::Eos.emit(w));
        self.put(|w| ShortHeader::emit(SectionType::Footer, section_id, w))
    }

    /// A START or FULL section header as given (any idstr, instance or version).
    pub fn section_header(&mut self, header: FullHeader<'_>) -> &mut Self {
        self.put(|w| header.emit(w))
    }

    /// A device FULL record with an opaque body and its footer.
    pub fn device(&mut self, section_id: u32, idstr: &[u8], body: &[u8]) -> &mut Self {
        let h = FullHeader { start: false, section_id, idstr, instance_id: 0, version_id: 1 };
        self.put(|w| h.emit(w));
        self.bytes.extend_from_slice(body);
        self.put(|w| ShortHeader::emit(SectionType::Footer, section_id, w))
    }

    /// Top-level EOF.
    pub fn eof(&mut self) -> &mut Self {
        self.bytes.push(0);
        self
    }

    /// VMDESCRIPTION with its JSON.
    pub fn vmdescription(&mut self, json: &[u8]) -> &mut Self {
        self.bytes.push(SectionType::VmDescription.to_byte());
        self.bytes.extend_from_slice(&(json.len() as u32).to_be_bytes());
        self.bytes.extend_from_slice(json);
        self
    }

    /// Raw bytes.
    pub fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.bytes.extend_from_slice(bytes);
        self
    }
}

/// A page filled with a pattern derived from `seed`.
pub fn pattern_page(seed: u64) -> Vec<u8> {
    (0..TARGET_PAGE_SIZE).map(|i| (seed.wrapping_mul(31).wrapping_add(i * 7) % 251) as u8).collect()
}

/// A complete QEMU 7.2-shaped postcopy stream for `pages` pages of `pc.ram` (plus a 4-page
/// `pc.bios`): precopy of every page, a discard of `discarded`, a PACKAGED blob with device
/// state, then the discarded pages again in postcopy, END and EOF.
pub fn postcopy_stream(pages: u64, discarded: core::ops::Range<u64>) -> Vec<u8> {
    let mut s = StreamBuilder::new();
    let ram = pages * TARGET_PAGE_SIZE;
    s.header().configuration(b"pc-i440fx-7.2");
    s.command(Command::OpenReturnPath).command(Command::Ping(1)).advise(4096, 4096);
    s.ram_start(2, &[(b"pc.ram", ram), (b"pc.bios", 0x4000)]);
    s.ram_part(2, false);
    for p in 0..pages {
        let name: Option<&[u8]> = if p == 0 { Some(b"pc.ram") } else { None };
        if p % 3 == 0 {
            s.zero(name, p * TARGET_PAGE_SIZE, 0);
        } else {
            s.page(name, p * TARGET_PAGE_SIZE, &pattern_page(p));
        }
    }
    for p in 0..4 {
        let name: Option<&[u8]> = if p == 0 { Some(b"pc.bios") } else { None };
        s.zero(name, p * TARGET_PAGE_SIZE, 0);
    }
    s.eos(2);
    let (a, b) = (discarded.start * TARGET_PAGE_SIZE, discarded.end * TARGET_PAGE_SIZE);
    s.discard(b"pc.ram", &[(a, b - a)]).command(Command::Ping(2));
    let mut blob = StreamBuilder::new();
    blob.command(Command::Listen).device(3, b"timer", &[1, 2, 3, 4, 5, 6, 7, 8]);
    blob.device(4, b"globalstate", b"running\0").command(Command::Ping(3)).command(Command::Run);
    s.packaged(&blob.bytes).command(Command::Ping(4));
    s.ram_part(2, false);
    for p in discarded.clone() {
        let name: Option<&[u8]> = if p == discarded.start { Some(b"pc.ram") } else { None };
        s.page(name, p * TARGET_PAGE_SIZE, &pattern_page(p ^ 0xffff));
    }
    s.eos(2).ram_part(2, true).eos(2).eof();
    s.bytes
}

//! The engine: decoded records in, actions out (sans-I/O).
//!
//! It runs in the stream context. Every action goes through the ports: page contents to
//! [`GuestMemory`](crate::ports::GuestMemory), mappings to [`Stage2`](crate::ports::Stage2),
//! device state to the sink, PONG / SHUT to the return path. Any error sends SHUT(1) (when the
//! return path is open) and is returned typed; the engine then refuses further input.

use super::shared::Shared;
use super::state::State;
use crate::config::{HOST_PAGE_SIZE, MAX_DEVICE_STATE_LEN, TARGET_PAGE_BITS, TARGET_PAGE_SIZE};
use crate::decoder::{Decoder, Record, Step};
use crate::error::{Defect, Error, Field};
use crate::layout::{AddBlockError, Layout, Machine, MapError};
use crate::ports::{ReturnPath, StreamPorts};
use crate::wire::command::{Command, Dialect};
use crate::wire::discard::MaskRuns;
use crate::wire::header::ConfigSubsection;
use crate::wire::ram::RamRecord;
use crate::wire::return_path::RpMessage;

/// How the destination is set up.
#[derive(Clone, Copy, Debug, Default)]
pub struct EngineConfig<'c> {
    /// The source's dialect.
    pub dialect: Dialect,
    /// The machine type this destination emulates; `None` accepts any (hosted destination).
    pub machine: Option<&'c [u8]>,
}

/// Counters kept by the stream context.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Stream bytes consumed.
    pub bytes: u64,
    /// PAGE records placed.
    pub pages: u64,
    /// ZERO records placed.
    pub zero_pages: u64,
    /// Pages that arrived after RUN although already present (left untouched: the guest may
    /// have written them).
    pub duplicate_pages: u64,
    /// Pages dropped by RAM_DISCARD.
    pub discarded_pages: u64,
    /// Opaque device-state bytes handed to the sink.
    pub device_state_bytes: u64,
}

/// Where a broken connection left the migration ([`Engine::connection_lost`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Break {
    /// Stream offset just past the last whole record (a page cut in the middle is dropped:
    /// the source sends it again).
    pub offset: u64,
    /// The `ram` section the break cut open, if any (its footer never came).
    pub open_ram_section: Option<u32>,
    /// That section's EOS record was read: only its footer is missing.
    pub eos_read: bool,
    /// Pages of guest RAM not received yet.
    pub missing_pages: u64,
}

/// How far a call to [`Engine::receive`] got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Bytes consumed: advance the ring by this much.
    pub consumed: usize,
    /// The migration is complete (SHUT(0) was sent if the return path is open).
    pub finished: bool,
}

/// The PAGE whose payload is arriving.
#[derive(Clone, Copy, Debug)]
struct PendingPage {
    block: usize,
    offset: u64,
    filled: u64,
    /// Already present after RUN: the payload is consumed but not written.
    skip: bool,
}

/// The RAM_DISCARD whose entries are arriving.
#[derive(Clone, Copy, Debug)]
struct PendingDiscard {
    block: usize,
    first_bit_offset: u8,
}

/// The postcopy destination engine (stream context).
#[derive(Debug)]
pub struct Engine<'s, 'a, 'c, R, P> {
    decoder: Decoder,
    core: Core<'s, 'a, 'c, R, P>,
}

#[derive(Debug)]
struct Core<'s, 'a, 'c, R, P> {
    shared: &'s Shared<'a, R>,
    ports: P,
    config: EngineConfig<'c>,
    machine: Machine,
    /// The block list being read (MEM_SIZE), published to `shared` when complete.
    building: Option<(Layout, u64)>,
    /// The block of the last page record: CONTINUE refers to it, across sections.
    current_block: Option<usize>,
    page: Option<PendingPage>,
    discard: Option<PendingDiscard>,
    vmdescription_left: Option<u32>,
    /// Blocks whose received bitmap was sent on this connection (recovery), bit per block.
    bitmaps_sent: u32,
    /// Stream offset just past the last whole record.
    boundary: u64,
    finished: bool,
    failed: Option<Error>,
    stats: Stats,
}

impl<'s, 'a, 'c, R: ReturnPath, P: StreamPorts> Engine<'s, 'a, 'c, R, P> {
    /// An engine at the start of a stream.
    pub fn new(shared: &'s Shared<'a, R>, ports: P, config: EngineConfig<'c>) -> Self {
        Self {
            decoder: Decoder::new(config.dialect),
            core: Core {
                shared,
                ports,
                config,
                machine: Machine::Flat,
                building: None,
                current_block: None,
                page: None,
                discard: None,
                vmdescription_left: None,
                bitmaps_sent: 0,
                boundary: 0,
                finished: false,
                failed: None,
                stats: Stats::default(),
            },
        }
    }

    /// Decodes and acts on the readable bytes of the receive ring (`first`, then `second`
    /// after the wrap), until they run out or the migration completes.
    pub fn receive(&mut self, first: &[u8], second: &[u8]) -> Result<Progress, Error> {
        if let Some(e) = self.core.failed {
            return Err(e);
        }
        let mut consumed = 0;
        while !self.core.finished {
            let (f, s) = skip(first, second, consumed);
            let step = self.decoder.next(f, s).and_then(|step| match step {
                Step::NeedMore => Ok(None),
                Step::Record { record, at, len } => self.core.handle(record, at).map(|()| Some(len)),
            });
            match step {
                Ok(Some(len)) => {
                    consumed += len;
                    self.core.stats.bytes += len as u64;
                    if self.core.page.is_none() {
                        self.core.boundary = self.decoder.offset();
                    }
                }
                Ok(None) => break,
                Err(e) => return Err(self.core.fail(e)),
            }
        }
        Ok(Progress { consumed, finished: self.core.finished })
    }

    /// The input ended (the connection closed, or the replayed file ended).
    pub fn end_of_input(&mut self) -> Result<Progress, Error> {
        if let Some(e) = self.core.failed {
            return Err(e);
        }
        if !self.core.finished {
            // A precopy completion whose source sent no VMDESCRIPTION ends here.
            let offset = self.decoder.offset();
            if let Err(e) = self.decoder.end_of_input().and_then(|()| self.core.complete(offset)) {
                return Err(self.core.fail(e));
            }
        }
        Ok(Progress { consumed: 0, finished: true })
    }

    /// The connection broke (read error or end of file) before the migration completed.
    ///
    /// After RUN this is not the end: the state moves to PAUSED (see `shared`), the record
    /// the break cut is dropped, and the engine waits for a new connection
    /// ([`Engine::reconnected`]) that starts the recovery handshake. Before RUN, or in a
    /// migration that has already failed or completed, it is [`Engine::end_of_input`].
    pub fn connection_lost(&mut self) -> Result<Break, Error> {
        if self.core.failed.is_none() && !self.core.finished && self.core.shared.pause() {
            self.core.page = None;
            let open = self.decoder.open_ram_section();
            self.decoder.resume_after_break();
            let missing = self
                .core
                .layout()
                .map_or(0, |l| (0..l.blocks().len()).map(|b| self.core.shared.missing_pages(l, b)).sum());
            return Ok(Break {
                offset: self.core.boundary,
                open_ram_section: open.map(|(id, _)| id),
                eos_read: open.is_some_and(|(_, eos)| eos),
                missing_pages: missing,
            });
        }
        self.end_of_input().map(|_| Break {
            offset: self.core.boundary,
            open_ram_section: None,
            eos_read: false,
            missing_pages: 0,
        })
    }

    /// A new connection after [`Engine::connection_lost`] paused the migration; the caller
    /// has given its return path to [`Shared::reconnect`].
    pub fn reconnected(&mut self) {
        self.core.bitmaps_sent = 0;
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        self.core.stats
    }

    /// The ports (for the caller's own bookkeeping).
    pub fn ports(&mut self) -> &mut P {
        &mut self.core.ports
    }

    /// Whether the migration completed.
    pub fn finished(&self) -> bool {
        self.core.finished
    }
}

/// `first`/`second` without their first `n` bytes.
fn skip<'b>(first: &'b [u8], second: &'b [u8], n: usize) -> (&'b [u8], &'b [u8]) {
    if n <= first.len() {
        (&first[n..], second)
    } else {
        (&[], second.get(n - first.len()..).unwrap_or_default())
    }
}

type Handled = Result<(), Error>;

impl<R: ReturnPath, P: StreamPorts> Core<'_, '_, '_, R, P> {
    fn fail(&mut self, e: Error) -> Error {
        if self.failed.is_none() {
            self.failed = Some(e);
            // A RAM_DISCARD cut short: the unmaps made so far must still reach the vCPUs.
            if self.discard.take().is_some() {
                self.ports.flush();
            }
            // Best effort: tell the source we failed, so it reports `failed` at once.
            self.shared.with_rp(|rp| {
                if rp.is_open() {
                    let _ = rp.send(RpMessage::Shut(1));
                }
            });
        }
        e
    }

    fn handle(&mut self, record: Record<'_>, at: u64) -> Handled {
        let err = |field, defect| Err(Error::new(at, field, defect));
        match record {
            Record::Header | Record::Footer | Record::RamPart { .. } => Ok(()),
            // A block list, or device state in the main stream, belongs to the setup or to a
            // precopy completion: after LISTEN it is a wrong stream.
            Record::RamStart { .. } | Record::DeviceSection(_) => self.before_listen(at),
            Record::Configuration(machine) => {
                if self.config.machine.is_some_and(|m| m != machine) {
                    return err(Field::MachineName, Defect::Mismatch);
                }
                self.machine = Machine::from_name(machine);
                Ok(())
            }
            Record::ConfigSubsection(ConfigSubsection::TargetPageBits(bits)) => {
                if bits != TARGET_PAGE_BITS {
                    let (found, expected) = (bits.into(), TARGET_PAGE_BITS.into());
                    return err(Field::ConfigSubsection, Defect::BadValue { found, expected });
                }
                Ok(())
            }
            // The destination has no UUID of its own: QEMU only warns then.
            Record::ConfigSubsection(ConfigSubsection::Uuid(_)) => Ok(()),
            // 7.2 validates only x-ignore-shared, which this destination does not do.
            Record::ConfigSubsection(ConfigSubsection::Capabilities(0)) => Ok(()),
            Record::ConfigSubsection(ConfigSubsection::Capabilities(_)) | Record::Capability(_) => {
                err(Field::ConfigSubsection, Defect::Unsupported)
            }
            Record::Command(cmd) => self.command(cmd, at),
            Record::DiscardRange { start, len } => self.discard_range(start, len, at),
            Record::DiscardMask { start, mask } => self.discard_mask(start, mask, at),
            Record::DiscardEnd => {
                self.discard = None;
                self.ports.flush();
                Ok(())
            }
            Record::CommandPayload(_) => Ok(()),
            Record::MemSize(total) => self.mem_size(total, at),
            Record::Block(entry) => self.add_block(entry.name, entry.used_length, at),
            Record::Ram(ram) => self.ram(ram, at),
            Record::PageData(data) => {
                self.page_data(data);
                Ok(())
            }
            Record::DeviceData(bytes) => {
                let len = self.stats.device_state_bytes + bytes.len() as u64;
                if len > MAX_DEVICE_STATE_LEN {
                    return err(Field::DeviceState, Defect::TooLong { len, cap: MAX_DEVICE_STATE_LEN });
                }
                self.stats.device_state_bytes = len;
                self.ports.device_state(bytes);
                Ok(())
            }
            Record::Eof => self.eof(at),
            Record::VmDescription(len) => {
                self.vmdescription_left = Some(len);
                if len == 0 {
                    self.complete(at)?;
                }
                Ok(())
            }
            Record::VmDescriptionData(piece) => {
                let left = self.vmdescription_left.unwrap_or(0).saturating_sub(piece.len() as u32);
                self.vmdescription_left = Some(left);
                if left == 0 {
                    self.complete(at)?;
                }
                Ok(())
            }
        }
    }

    /// Refuses a section that may only come before LISTEN.
    fn before_listen(&self, at: u64) -> Handled {
        match self.shared.state.get() {
            state @ (State::Listening | State::Running) => {
                Err(Error::new(at, Field::SectionType, Defect::WrongState { state }))
            }
            _ => Ok(()),
        }
    }

    fn command(&mut self, cmd: Command<'_>, at: u64) -> Handled {
        let state = &self.shared.state;
        let wrong = |state| Error::new(at, Field::CommandId, Defect::WrongState { state });
        match cmd {
            Command::OpenReturnPath => {
                self.shared.with_rp(|rp| rp.open());
                Ok(())
            }
            Command::Ping(value) => self.shared.with_rp(|rp| {
                if !rp.is_open() {
                    return Err(Error::new(at, Field::CommandId, Defect::NoReturnPath));
                }
                rp.send(RpMessage::Pong(value))
                    .map_err(|_| Error::new(at, Field::ReturnPath, Defect::ReturnPathFailed))
            }),
            Command::Advise(sizes) => {
                if let Some(sizes) = sizes {
                    let host = sizes.host_page_size.get();
                    if host != HOST_PAGE_SIZE {
                        let d = Defect::BadValue { found: host, expected: HOST_PAGE_SIZE };
                        return Err(Error::new(at, Field::AdviseHostPageSize, d));
                    }
                    let target = sizes.target_page_size.get();
                    if target != TARGET_PAGE_SIZE {
                        let d = Defect::BadValue { found: target, expected: TARGET_PAGE_SIZE };
                        return Err(Error::new(at, Field::AdviseTargetPageSize, d));
                    }
                }
                state.transition(State::None, State::Advise).map_err(wrong)
            }
            Command::RamDiscard(h) => {
                state.transition_from_any(&[State::Advise, State::Discard], State::Discard).map_err(wrong)?;
                let block = self.block_named(h.block, at, Field::DiscardBlockName)?;
                self.discard =
                    Some(PendingDiscard { block, first_bit_offset: h.first_bit_offset.unwrap_or(0) });
                Ok(())
            }
            Command::Listen => state
                .transition_from_any(&[State::Advise, State::Discard], State::Listening)
                .map(|_| ())
                .map_err(wrong),
            Command::Run => state.transition(State::Listening, State::Running).map_err(wrong),
            Command::Packaged(_) => Ok(()),
            Command::PostcopyEnd(status) => {
                if status != 0 {
                    let d = Defect::BadValue { found: status.into(), expected: 0 };
                    return Err(Error::new(at, Field::CommandId, d));
                }
                // The end of postcopy: only with every page there.
                self.check_complete(at)?;
                let from = [State::Advise, State::Discard, State::Listening, State::Running];
                state.transition_from_any(&from, State::End).map_err(wrong)?;
                Ok(())
            }
            // Outside postcopy recovery QEMU ignores it.
            Command::Resume if state.get() != State::Paused => Ok(()),
            Command::Resume => {
                let layout = self.layout().ok_or(wrong(State::Paused))?;
                let all = (1u64 << layout.blocks().len()) - 1;
                let missing = u64::from((all & !u64::from(self.bitmaps_sent)).count_ones());
                if missing != 0 {
                    return Err(Error::new(at, Field::CommandId, Defect::BitmapsMissing { blocks: missing }));
                }
                self.shared
                    .resume(layout)
                    .map(drop)
                    .map_err(|_| Error::new(at, Field::ReturnPath, Defect::ReturnPathFailed))
            }
            Command::RecvBitmap(name) => {
                if state.get() != State::Paused {
                    return Err(wrong(state.get()));
                }
                let block = self.block_named(name, at, Field::RecvBitmapBlock)?;
                let layout = self.layout().ok_or(wrong(State::Paused))?;
                self.shared
                    .send_recv_bitmap(layout, block)
                    .map_err(|_| Error::new(at, Field::ReturnPath, Defect::ReturnPathFailed))?;
                self.bitmaps_sent |= 1 << block;
                Ok(())
            }
            Command::EnableColo => Err(Error::new(at, Field::CommandId, Defect::Unsupported)),
            Command::Unknown { cmd, .. } => {
                Err(Error::new(at, Field::CommandId, Defect::Unknown { found: cmd.into() }))
            }
        }
    }

    fn layout(&self) -> Option<&Layout> {
        self.shared.layout()
    }

    fn block_named(&self, name: &[u8], at: u64, field: Field) -> Result<usize, Error> {
        self.layout().and_then(|l| l.find(name)).ok_or(Error::new(at, field, Defect::UnknownBlock))
    }

    fn discard_range(&mut self, start: u64, len: u64, at: u64) -> Handled {
        let Some(d) = self.discard else { return Ok(()) };
        let Some(layout) = self.shared.layout() else {
            return Ok(());
        };
        let block = &layout.blocks()[d.block];
        for (field, value) in [(Field::DiscardStart, start), (Field::DiscardLength, len)] {
            if !value.is_multiple_of(block.page_size) {
                return Err(Error::new(at, field, Defect::Misaligned { value, align: block.page_size }));
            }
        }
        if start.checked_add(len).is_none_or(|end| end > block.len) {
            let d = Defect::OutOfRange { start, len, limit: block.len };
            return Err(Error::new(at, Field::DiscardLength, d));
        }
        for r in layout.regions().iter().filter(|r| r.block == d.block) {
            // The part of the discarded range that this region maps.
            let lo = start.max(r.block_offset);
            let hi = (start + len).min(r.block_offset + r.len);
            if lo < hi {
                self.ports.unmap(r.gpa + (lo - r.block_offset), hi - lo);
            }
        }
        self.shared.mark_discarded(layout, d.block, start, len);
        self.stats.discarded_pages += len / TARGET_PAGE_SIZE;
        Ok(())
    }

    fn discard_mask(&mut self, start: u64, mask: u32, at: u64) -> Handled {
        let Some(d) = self.discard else { return Ok(()) };
        for run in MaskRuns::new(start, mask, d.first_bit_offset) {
            let (page, pages) = run.map_err(|bit| {
                let found = start + u64::from(bit);
                Error::new(at, Field::DiscardStart, Defect::OutOfRange { start: found, len: 1, limit: 0 })
            })?;
            let (start, len) = (page.saturating_mul(TARGET_PAGE_SIZE), pages * TARGET_PAGE_SIZE);
            self.discard_range(start, len, at)?;
        }
        Ok(())
    }

    fn mem_size(&mut self, total: u64, at: u64) -> Handled {
        if self.layout().is_some() || self.building.is_some() {
            return Err(Error::new(at, Field::RamBlockList, Defect::TooMany { cap: 1 }));
        }
        self.building = Some((Layout::new(), total));
        if total == 0 {
            self.publish(at)?;
        }
        Ok(())
    }

    fn add_block(&mut self, name: &[u8], len: u64, at: u64) -> Handled {
        let Some((layout, left)) = self.building.as_mut() else {
            return Err(Error::new(at, Field::RamBlockList, Defect::Unsupported));
        };
        layout.add_block(name, len).map_err(|e| {
            let defect = match e {
                AddBlockError::TooMany => Defect::TooMany { cap: crate::config::MAX_BLOCKS as u64 },
                AddBlockError::Misaligned => Defect::Misaligned { value: len, align: HOST_PAGE_SIZE },
                AddBlockError::Duplicate => Defect::Mismatch,
            };
            Error::new(at, Field::RamBlockList, defect)
        })?;
        *left -= len;
        let done = *left == 0;
        // Guest RAM is bounded by the page bitmaps: refuse a block past them at once (a
        // hostile MEM_SIZE may announce petabytes). The platform is asked for memory only
        // once the whole list is laid out (`publish`).
        let capacity = self.shared.bitmap_capacity();
        if layout.bitmap_words() > capacity {
            let bytes = |words: usize| words as u64 * 64 * TARGET_PAGE_SIZE;
            let defect = Defect::TooLong { len: bytes(layout.bitmap_words()), cap: bytes(capacity) };
            return Err(Error::new(at, Field::RamBlockList, defect));
        }
        if done {
            self.publish(at)?;
        }
        Ok(())
    }

    fn publish(&mut self, at: u64) -> Handled {
        let Some((mut layout, _)) = self.building.take() else {
            return Ok(());
        };
        layout.map_for(self.machine).map_err(|e| {
            let defect = match e {
                MapError::DoesNotFit { start, len, limit } => Defect::OutOfRange { start, len, limit },
                MapError::TooLong { len, cap } => Defect::TooLong { len, cap },
                MapError::Overlaps { start, len, other } => Defect::Overlaps { start, len, other },
            };
            Error::new(at, Field::GuestPhysicalMap, defect)
        })?;
        // Only a list that fits the guest-physical map asks the platform for memory.
        for (index, block) in layout.blocks().iter().enumerate() {
            self.ports
                .declare_block(index, &block.name, block.len)
                .map_err(|_| Error::new(at, Field::RamBlockName, Defect::MemoryRefused))?;
        }
        self.shared.publish_layout(layout);
        Ok(())
    }

    /// Resolves the block of a page record (by name, or CONTINUE) and checks the offset.
    fn page_target(&mut self, name: Option<&[u8]>, offset: u64, at: u64) -> Result<(usize, bool), Error> {
        let block = match name {
            Some(name) => self.block_named(name, at, Field::RamBlockName)?,
            None => self.current_block.ok_or(Error::new(at, Field::RamBlockName, Defect::NoPreviousBlock))?,
        };
        self.current_block = Some(block);
        let Some(layout) = self.layout() else {
            return Err(Error::new(at, Field::RamBlockName, Defect::UnknownBlock));
        };
        let limit = layout.blocks()[block].len;
        if offset.checked_add(TARGET_PAGE_SIZE).is_none_or(|end| end > limit) {
            let d = Defect::OutOfRange { start: offset, len: TARGET_PAGE_SIZE, limit };
            return Err(Error::new(at, Field::RamOffset, d));
        }
        // From LISTEN on a page is placed once: one that is already there may have been
        // written by the guest since, so a second copy is dropped (also after a v5
        // POSTCOPY_END, while the guest runs on).
        let postcopy = matches!(self.shared.state.get(), State::Listening | State::Running | State::End);
        let skip = postcopy && self.shared.is_received(block, offset);
        if skip {
            self.stats.duplicate_pages += 1;
        }
        Ok((block, skip))
    }

    fn ram(&mut self, record: RamRecord<'_>, at: u64) -> Handled {
        match record {
            RamRecord::Zero { block, offset, fill } => {
                let (block, skip) = self.page_target(block, offset, at)?;
                if !skip {
                    self.ports.fill(block, offset, TARGET_PAGE_SIZE, fill);
                    self.place(block, offset);
                    self.stats.zero_pages += 1;
                }
                Ok(())
            }
            RamRecord::Page { block, offset } => {
                let (block, skip) = self.page_target(block, offset, at)?;
                self.page = Some(PendingPage { block, offset, filled: 0, skip });
                Ok(())
            }
            RamRecord::Eos => Ok(()),
            // The decoder hands MEM_SIZE out as its own record.
            RamRecord::MemSize(_) => Err(Error::new(at, Field::RamFlags, Defect::Unsupported)),
        }
    }

    fn page_data(&mut self, data: &[u8]) {
        let Some(page) = self.page.as_mut() else {
            return;
        };
        if !page.skip {
            self.ports.write(page.block, page.offset + page.filled, data);
        }
        page.filled += data.len() as u64;
        if page.filled == TARGET_PAGE_SIZE {
            let page = *page;
            self.page = None;
            if !page.skip {
                self.place(page.block, page.offset);
                self.stats.pages += 1;
            }
        }
    }

    /// The page's contents are complete: map it, mark it received, release its waiters.
    ///
    /// A page re-sent in precopy (the guest does not run yet) was rewritten in its frame,
    /// which stays mapped: it is mapped once, when it first arrives (or arrives again after a
    /// discard).
    fn place(&mut self, block: usize, offset: u64) {
        let Some(layout) = self.shared.layout() else {
            return;
        };
        if !self.shared.is_received(block, offset) {
            for gpa in layout.block_to_gpas(block, offset) {
                self.ports.map(gpa, block, offset);
            }
        }
        self.shared.page_arrived(layout, block, offset, &mut self.ports);
    }

    fn eof(&mut self, at: u64) -> Handled {
        match self.shared.state.get() {
            // v5 ends postcopy with POSTCOPY_END before the EOF.
            State::Running | State::End => self.complete(at),
            // A precopy completion: the VMDESCRIPTION (or the end of input) follows.
            State::None | State::Advise => Ok(()),
            state => Err(Error::new(at, Field::EndOfStream, Defect::WrongState { state })),
        }
    }

    /// Every page of every block has arrived; otherwise the first block with holes is named.
    fn check_complete(&self, at: u64) -> Handled {
        let Some(layout) = self.layout() else { return Ok(()) };
        match self.shared.first_incomplete_block(layout) {
            None => Ok(()),
            Some((block, missing, first)) => {
                Err(Error::new(at, Field::EndOfStream, Defect::PagesMissing { block, missing, first }))
            }
        }
    }

    /// The migration completed: every page is there, END (postcopy), SHUT(0). END comes
    /// before SHUT, and SHUT goes out under the return-path lock, so no page request can
    /// follow it (see `shared`).
    fn complete(&mut self, at: u64) -> Handled {
        if self.finished {
            return Ok(());
        }
        self.check_complete(at)?;
        self.shared.end().map_err(|_| Error::new(at, Field::ReturnPath, Defect::ReturnPathFailed))?;
        self.finished = true;
        Ok(())
    }
}

//! State shared between the stream context and the vCPU contexts, and the vCPU side of the
//! fault protocol.
//!
//! | field | written by | when | read by |
//! |---|---|---|---|
//! | `state` | stream context, compare-exchange | commands, final EOF | vCPUs on a fault |
//! | `layout` | stream context, once | end of the MEM_SIZE block list (precopy setup) | both |
//! | `received` bits | stream context: set after a page is complete and mapped; cleared by a discard (before LISTEN: no vCPU runs) | every page | vCPUs on a fault |
//! | `requested` bits | vCPUs: set by the first toucher of a missing page; cleared by a discard | faults | stream context after placing a page |
//! | `parked[v]` | vCPU `v` stores the page it waits for; whoever wins the compare-exchange back to empty clears it (the stream context releasing `v`, or `v` finding its page arrived) | faults, page arrival | both |
//! | `parkers` (bit `v`: vCPU `v` may be parked) | vCPU `v` only, its own bit: set before it parks, cleared when it resumes by itself | faults | stream context, to visit only those slots |
//! | `rp` (return path, last requested block, whether a send failed) | both, under its lock | PONG/SHUT, page requests, the recovery handshake (a new port on reconnection) | - |
//!
//! # The end of a migration
//!
//! The stream context completes a migration only when every page of every block has arrived
//! (otherwise it is a typed error), then moves to END and sends SHUT(0) under the
//! return-path lock. A vCPU sends a page request under that same lock and only after reading
//! the state there: a request therefore goes out before SHUT or not at all. A vCPU that
//! finds END instead finds its page received (it arrived before the completion check), so it
//! resumes: no vCPU waits for a page after the end. A request that cannot be sent (the
//! connection failing) is not an error either: the source sends every page in postcopy
//! anyway, so the vCPU keeps waiting for it; if the stream ends first, the migration fails
//! with the missing pages named.
//!
//! # Postcopy recovery
//!
//! When the connection breaks after RUN, the stream context moves RUNNING → PAUSED
//! ([`Shared::pause`]). vCPUs go on faulting and parking as in RUNNING, and set their
//! `requested` bits, but send nothing: [`Shared::request`] reads PAUSED under the return-path
//! lock. A new connection gets a fresh port ([`Shared::reconnect`]). The source asks for each
//! block's received bitmap, and [`Shared::send_recv_bitmap`] answers it from `received`. On
//! POSTCOPY_RESUME, [`Shared::resume`] does three things in one hold of the return-path lock:
//! it sends RESUME_ACK(1), sends a request for every page that is requested and not received,
//! and moves PAUSED → RUNNING.
//!
//! A vCPU that set its `requested` bit before the scan has its page in the scan. A vCPU that
//! takes the lock after the resume finds RUNNING and sends its own request. So no request is
//! lost across a break. A page asked twice arrives once and is counted as a duplicate the
//! second time. `tests/loom.rs` has the model.
//!
//! # Fault → wait → wake
//!
//! vCPU `v` faulting on a missing page P: sets `requested[P]` (the first setter sends the
//! request), stores P in `parked[v]`, then reads `received[P]`. If P has arrived it tries to
//! take itself back (compare-exchange `parked[v]` P → empty): success means nobody will
//! release it and it resumes at once; failure means the stream context already claimed it and
//! its release is on the way.
//!
//! The stream context placing P: copies, maps, sets `received[P]`, then, if P was requested,
//! claims every vCPU parked on P (compare-exchange `parked[v]` P → empty) and releases each
//! one it claimed.
//!
//! The stream context visits only the slots whose bit is set in `parkers`: vCPU `v` sets its
//! bit before its fence, so whenever its slot is visible, so is its bit. A released vCPU's bit
//! stays set (harmless: its slot is empty) until it next resumes by itself.
//!
//! The vCPU's store to `parked[v]` and the stream context's store to `received[P]` are each
//! followed by a `SeqCst` fence and then a read of the other's variable, so at least one side
//! sees the other (the store-buffering pattern: on x86 the fence is the `mfence` that stops a
//! load from passing an earlier store): a parked vCPU is never forgotten. The compare-exchange on `parked[v]` has exactly one winner, so each
//! wait ends in exactly one release or one self-resume, never both and never neither. The
//! platform's park must accept a release that comes before the vCPU actually sleeps (a token,
//! not a bare wake-up). `tests/loom.rs` checks these claims over every interleaving.

use spin::Once;

use super::state::{State, StateCell};
use crate::config::{MAX_VCPUS, RP_MESSAGE_CAPACITY, TARGET_PAGE_SIZE};
use crate::layout::Layout;
use crate::ports::{PageWaiters, ReturnPath, SendFailed};
use crate::sync::{fence, AtomicU64, Mutex, Ordering};
use crate::wire::return_path::{RpMessage, RECV_BITMAP_END_MARK};

/// What a vCPU does after a stage-2 fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The page is there (it arrived meanwhile): re-execute the access.
    Resume,
    /// The vCPU is parked on the page: run it again when [`PageWaiters::release`] names it
    /// (exactly once; possibly before it gets to sleep).
    Wait {
        /// Its block.
        block: usize,
        /// Page-aligned offset in the block.
        offset: u64,
    },
}

/// A fault that is not a page request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultError {
    /// The address is not guest RAM: an MMIO access or a guest bug, not a missing page.
    OutsideGuestRam {
        /// The faulting guest-physical address.
        gpa: u64,
    },
    /// No page can be requested in this state (before LISTEN, after a plain precopy, or after
    /// the migration ended).
    NotPostcopy {
        /// The state.
        state: State,
    },
    /// The vCPU index is not below [`MAX_VCPUS`].
    NoSuchVcpu {
        /// The index given.
        vcpu: usize,
    },
}

/// The kind of guest access that faulted (EPT exit qualification bits 0-2; #NPF error code
/// bits 1 and 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// A data read.
    Read,
    /// A data write.
    Write,
    /// An instruction fetch.
    Execute,
}

/// The return path and what requests need to remember.
#[derive(Debug)]
pub struct RpSender<R> {
    port: R,
    open: bool,
    /// Block of the last REQ_PAGES_ID (REQ_PAGES without an id refers to it).
    last_block: Option<usize>,
    /// A page request could not be sent: later ones are not tried (the pages still come in
    /// the stream).
    broken: bool,
}

impl<R: ReturnPath> RpSender<R> {
    /// Sends a message; `Err` if the port fails or the message does not fit.
    pub fn send(&mut self, msg: RpMessage<'_>) -> Result<(), SendFailed> {
        let mut buf = [0u8; RP_MESSAGE_CAPACITY];
        let n = msg.emit(&mut buf).ok_or(SendFailed)?;
        self.port.send(&buf[..n])
    }

    /// Whether OPEN_RETURN_PATH was received.
    pub const fn is_open(&self) -> bool {
        self.open
    }

    /// Marks the return path open.
    pub fn open(&mut self) {
        self.open = true;
    }

    /// The port.
    pub fn port(&mut self) -> &mut R {
        &mut self.port
    }
}

/// Counters kept by vCPU contexts.
#[derive(Debug)]
pub struct FaultCounters {
    /// Stage-2 faults on missing pages handled.
    pub faults: AtomicU64,
    /// Faults by writes (the rest are reads and fetches).
    pub write_faults: AtomicU64,
    /// Page requests sent.
    pub requests: AtomicU64,
    /// Page requests that could not be sent (the return path failed); their vCPUs waited for
    /// the pages to come in the stream.
    pub unsent_requests: AtomicU64,
    /// Requests sent again at a postcopy resume (included in `requests`).
    pub resent_requests: AtomicU64,
}

impl Default for FaultCounters {
    fn default() -> Self {
        let zero = || AtomicU64::new(0);
        Self {
            faults: zero(),
            write_faults: zero(),
            requests: zero(),
            unsent_requests: zero(),
            resent_requests: zero(),
        }
    }
}

/// `parked[v]` when vCPU `v` waits for nothing.
const NOT_PARKED: u64 = u64::MAX;

/// The key of a page in `parked`: block and page number.
fn page_key(block: usize, offset: u64) -> u64 {
    ((block as u64) << 52) | (offset / TARGET_PAGE_SIZE)
}

/// Word and bit of a page in the bitmaps.
fn bit(layout: &Layout, block: usize, offset: u64) -> (usize, u64) {
    let first_word = layout.blocks().get(block).map_or(usize::MAX, |b| b.first_word);
    let page = offset / TARGET_PAGE_SIZE;
    (first_word.saturating_add((page / 64) as usize), 1u64 << (page % 64))
}

/// The state shared between the stream context and the vCPUs. See the module docs.
#[derive(Debug)]
pub struct Shared<'a, R> {
    /// The postcopy state.
    pub state: StateCell,
    layout: Once<Layout>,
    received: &'a [AtomicU64],
    requested: &'a [AtomicU64],
    rp: Mutex<RpSender<R>>,
    parked: [AtomicU64; MAX_VCPUS],
    parkers: AtomicU64,
    /// Fault counters.
    pub counters: FaultCounters,
}

impl<'a, R: ReturnPath> Shared<'a, R> {
    /// `received` and `requested` hold one bit per guest page (caller-owned storage: a
    /// static in the hypervisor, a `Vec` on the host); their length bounds the guest RAM
    /// this destination accepts.
    pub fn new(received: &'a [AtomicU64], requested: &'a [AtomicU64], rp: R) -> Self {
        Self {
            state: StateCell::new(),
            layout: Once::new(),
            received,
            requested,
            rp: Mutex::new(RpSender { port: rp, open: false, last_block: None, broken: false }),
            parked: core::array::from_fn(|_| AtomicU64::new(NOT_PARKED)),
            parkers: AtomicU64::new(0),
            counters: FaultCounters::default(),
        }
    }

    /// Words available per bitmap.
    pub fn bitmap_capacity(&self) -> usize {
        self.received.len().min(self.requested.len())
    }

    /// The block layout, once the block list is complete.
    pub fn layout(&self) -> Option<&Layout> {
        self.layout.get()
    }

    /// Publishes the block layout (stream context, once). Returns `false` if one was
    /// already published.
    pub fn publish_layout(&self, layout: Layout) -> bool {
        let mut fresh = false;
        self.layout.call_once(|| {
            fresh = true;
            layout
        });
        fresh
    }

    /// Runs `f` with the return path locked.
    pub fn with_rp<T>(&self, f: impl FnOnce(&mut RpSender<R>) -> T) -> T {
        self.rp.with(f)
    }

    /// The received and requested words holding a page's bit, and the bit.
    fn bits(&self, layout: &Layout, block: usize, offset: u64) -> Option<(&AtomicU64, &AtomicU64, u64)> {
        let (word, mask) = bit(layout, block, offset);
        Some((self.received.get(word)?, self.requested.get(word)?, mask))
    }

    /// Whether the page holding `offset` of `block` has arrived (and is mapped).
    pub fn is_received(&self, block: usize, offset: u64) -> bool {
        let Some(layout) = self.layout() else { return false };
        self.bits(layout, block, offset)
            .is_some_and(|(received, _, mask)| received.load(Ordering::SeqCst) & mask != 0)
    }

    /// Stream context: the page is complete and mapped. Releases every vCPU parked on it,
    /// each exactly once.
    pub fn page_arrived(&self, layout: &Layout, block: usize, offset: u64, waiters: &mut impl PageWaiters) {
        let Some((received, requested, mask)) = self.bits(layout, block, offset) else { return };
        received.fetch_or(mask, Ordering::SeqCst);
        // Pairs with the fence in `on_guest_fault`: either we see the vCPU's request and
        // parking, or it sees the page received.
        fence(Ordering::SeqCst);
        if requested.load(Ordering::SeqCst) & mask == 0 {
            // Nobody asked: a vCPU that faults from now on finds the page received.
            return;
        }
        let key = page_key(block, offset);
        // Only the slots of vCPUs that may be parked (their bit was set before they parked,
        // so the fence above makes it visible whenever their slot is).
        let mut parkers = self.parkers.load(Ordering::SeqCst);
        while parkers != 0 {
            let vcpu = parkers.trailing_zeros() as usize;
            parkers &= parkers - 1;
            let Some(slot) = self.parked.get(vcpu) else { break };
            if slot.load(Ordering::SeqCst) == key
                && slot.compare_exchange(key, NOT_PARKED, Ordering::SeqCst, Ordering::SeqCst).is_ok()
            {
                waiters.release(vcpu);
            }
        }
    }

    /// The first block with pages that have not arrived: (block, pages missing, offset of the
    /// first). `None` when every page of every block is there.
    pub fn first_incomplete_block(&self, layout: &Layout) -> Option<(usize, u64, u64)> {
        layout.blocks().iter().enumerate().find_map(|(index, block)| {
            let (mut missing, mut first) = (0, None);
            for (i, (received, valid)) in self.received_words(block).enumerate() {
                let holes = !received & valid;
                if holes != 0 {
                    missing += u64::from(holes.count_ones());
                    first.get_or_insert(
                        (64 * i as u64 + u64::from(holes.trailing_zeros())) * TARGET_PAGE_SIZE,
                    );
                }
            }
            first.map(|first| (index, missing, first))
        })
    }

    /// Stream context, before LISTEN: forget that the pages of `[offset, offset+len)` arrived.
    pub fn mark_discarded(&self, layout: &Layout, block: usize, offset: u64, len: u64) {
        let word_span = 64 * TARGET_PAGE_SIZE;
        let mut page = offset;
        while page < offset + len {
            // A whole aligned word at once where the range covers it.
            let whole = page.is_multiple_of(word_span) && offset + len - page >= word_span;
            if let Some((received, requested, mask)) = self.bits(layout, block, page) {
                let mask = if whole { u64::MAX } else { mask };
                received.fetch_and(!mask, Ordering::SeqCst);
                requested.fetch_and(!mask, Ordering::SeqCst);
            }
            page += if whole { word_span } else { TARGET_PAGE_SIZE };
        }
    }

    /// vCPU context: vCPU `vcpu` (below [`MAX_VCPUS`]) took a stage-2 fault on `gpa` (the
    /// page is not mapped for the guest).
    ///
    /// The first vCPU to touch a missing page sends the request (REQ_PAGES_ID when the block
    /// differs from the last request's, else REQ_PAGES), for the whole host page; later
    /// touches of a requested page only park. Without a return path (a replayed stream) the
    /// vCPU parks until the page comes in the stream. See the module docs for the protocol.
    pub fn on_guest_fault(&self, gpa: u64, access: Access, vcpu: usize) -> Result<Fault, FaultError> {
        let slot = self.parked.get(vcpu).ok_or(FaultError::NoSuchVcpu { vcpu })?;
        let state = self.state.get();
        if !matches!(state, State::Listening | State::Running | State::Paused | State::End) {
            return Err(FaultError::NotPostcopy { state });
        }
        let outside = FaultError::OutsideGuestRam { gpa };
        let layout = self.layout().ok_or(outside)?;
        let (block, offset) = layout.gpa_to_block(gpa).ok_or(outside)?;
        self.counters.faults.fetch_add(1, Ordering::Relaxed);
        if access == Access::Write {
            self.counters.write_faults.fetch_add(1, Ordering::Relaxed);
        }
        let page_size = layout.blocks()[block].page_size;
        let offset = offset & !(page_size - 1);
        let (received, requested, mask) = self.bits(layout, block, offset).ok_or(outside)?;
        let ended = |state| match received.load(Ordering::SeqCst) & mask {
            // The migration completed, so every page arrived before END: re-walk.
            0 => Err(FaultError::NotPostcopy { state }),
            _ => Ok(Fault::Resume),
        };
        if received.load(Ordering::SeqCst) & mask != 0 {
            return Ok(Fault::Resume);
        }
        if state == State::End {
            return ended(state);
        }
        if requested.fetch_or(mask, Ordering::SeqCst) & mask == 0
            && !self.request(layout, block, offset, page_size)
        {
            return ended(State::End);
        }
        let key = page_key(block, offset);
        slot.store(key, Ordering::SeqCst);
        // Only this vCPU changes its bit, so the stream context can never lose it.
        let bit = 1u64 << vcpu;
        self.parkers.fetch_or(bit, Ordering::SeqCst);
        // Pairs with the fence in `page_arrived`.
        fence(Ordering::SeqCst);
        if received.load(Ordering::SeqCst) & mask != 0
            && slot.compare_exchange(key, NOT_PARKED, Ordering::SeqCst, Ordering::SeqCst).is_ok()
        {
            // The page arrived meanwhile and nobody claimed us: no release will come.
            self.parkers.fetch_and(!bit, Ordering::SeqCst);
            return Ok(Fault::Resume);
        }
        Ok(Fault::Wait { block, offset })
    }

    /// Stream context, the migration complete (every page arrived): RUNNING → END (a precopy
    /// completion keeps its state), then SHUT(0) under the return-path lock, so no page
    /// request can follow it.
    pub fn end(&self) -> Result<(), SendFailed> {
        let _ = self.state.transition(State::Running, State::End);
        self.rp.with(|rp| if rp.open { rp.send(RpMessage::Shut(0)) } else { Ok(()) })
    }

    /// Stream context: the connection broke after RUN. RUNNING → PAUSED (a break during the
    /// recovery handshake finds PAUSED already); `false` in any other state (the migration
    /// then fails as before).
    pub fn pause(&self) -> bool {
        self.rp
            .with(|_| self.state.transition_from_any(&[State::Running, State::Paused], State::Paused).is_ok())
    }

    /// Stream context: a new connection after a break; `port` is its return path. The source
    /// forgets the last block of its requests, so the next request names its block.
    pub fn reconnect(&self, port: R) {
        self.rp.with(|rp| {
            rp.port = port;
            rp.last_block = None;
            rp.broken = false;
        });
    }

    /// Stream context, PAUSED: answers RECV_BITMAP for `block` with its received bitmap in
    /// QEMU's encoding (the framed message, then `be64 size`, the little-endian words up to a
    /// multiple of 8 bytes, `be64` end mark).
    pub fn send_recv_bitmap(&self, layout: &Layout, block: usize) -> Result<(), SendFailed> {
        let b = layout.blocks().get(block).ok_or(SendFailed)?;
        let words = b.pages().div_ceil(64) as usize;
        // The size announced must be what follows: every word must be in the bitmap.
        self.received.get(b.first_word..b.first_word + words).ok_or(SendFailed)?;
        self.rp.with(|rp| {
            rp.send(RpMessage::RecvBitmap { block: &b.name })?;
            rp.port.send(&(words as u64 * 8).to_be_bytes())?;
            let mut chunk = [0u8; 512];
            let mut n = 0;
            for (received, valid) in self.received_words(b) {
                chunk[n..n + 8].copy_from_slice(&(received & valid).to_le_bytes());
                n += 8;
                if n == chunk.len() {
                    rp.port.send(&chunk)?;
                    n = 0;
                }
            }
            if n > 0 {
                rp.port.send(&chunk[..n])?;
            }
            rp.port.send(&RECV_BITMAP_END_MARK.to_be_bytes())
        })
    }

    /// Stream context, PAUSED, on POSTCOPY_RESUME: RESUME_ACK(1), a request for every page
    /// requested and not received, and PAUSED → RUNNING, in one hold of the return-path lock
    /// (see the module docs). Returns how many requests went out again.
    pub fn resume(&self, layout: &Layout) -> Result<u64, SendFailed> {
        self.rp.with(|rp| {
            rp.send(RpMessage::ResumeAck(1))?;
            let mut sent = 0;
            for (index, b) in layout.blocks().iter().enumerate() {
                let words = b.pages().div_ceil(64) as usize;
                let (Some(received), Some(requested)) = (
                    self.received.get(b.first_word..b.first_word + words),
                    self.requested.get(b.first_word..b.first_word + words),
                ) else {
                    continue;
                };
                for (w, (rec, req)) in received.iter().zip(requested).enumerate() {
                    let mut outstanding = req.load(Ordering::SeqCst) & !rec.load(Ordering::SeqCst);
                    while outstanding != 0 {
                        let bit = u64::from(outstanding.trailing_zeros());
                        outstanding &= outstanding - 1;
                        let start = (w as u64 * 64 + bit) * TARGET_PAGE_SIZE;
                        if start >= b.len {
                            continue;
                        }
                        let len = TARGET_PAGE_SIZE as u32;
                        let msg = if rp.last_block == Some(index) {
                            RpMessage::ReqPages { start, len }
                        } else {
                            RpMessage::ReqPagesId { start, len, block: &b.name }
                        };
                        rp.send(msg)?;
                        rp.last_block = Some(index);
                        sent += 1;
                    }
                }
            }
            self.counters.requests.fetch_add(sent, Ordering::Relaxed);
            self.counters.resent_requests.fetch_add(sent, Ordering::Relaxed);
            let _ = self.state.transition(State::Paused, State::Running);
            Ok(sent)
        })
    }

    /// Pages of `block` that have not arrived.
    pub fn missing_pages(&self, layout: &Layout, block: usize) -> u64 {
        let Some(b) = layout.blocks().get(block) else { return 0 };
        self.received_words(b).map(|(received, valid)| u64::from((!received & valid).count_ones())).sum()
    }

    /// The `received` words of block `b`, each with the mask of the bits that are its pages
    /// (all of them but in its last word).
    fn received_words<'s>(&'s self, b: &crate::layout::Block) -> impl Iterator<Item = (u64, u64)> + 's {
        let pages = b.pages();
        let words = self.received.get(b.first_word..).into_iter().flatten().take(pages.div_ceil(64) as usize);
        words.enumerate().map(move |(i, w)| {
            let in_block = pages - 64 * i as u64;
            let valid = if in_block >= 64 { u64::MAX } else { (1u64 << in_block) - 1 };
            (w.load(Ordering::SeqCst), valid)
        })
    }

    /// Pages requested and not received (what a resume would ask for again).
    pub fn outstanding_requests(&self) -> u64 {
        self.received
            .iter()
            .zip(self.requested)
            .map(|(rec, req)| {
                u64::from((req.load(Ordering::SeqCst) & !rec.load(Ordering::SeqCst)).count_ones())
            })
            .sum()
    }

    /// Asks the source for a page; `false` if the migration has ended (SHUT has gone out or
    /// is about to: nothing may follow it, and the page has arrived).
    fn request(&self, layout: &Layout, block: usize, start: u64, len: u64) -> bool {
        self.rp.with(|rp| {
            // Read under the lock: the stream context moves to END before it sends SHUT under
            // this lock, so a request either precedes SHUT or sees END.
            match self.state.get() {
                State::End => return false,
                // The connection is down: the resume sends every outstanding request.
                State::Paused => return true,
                _ => {}
            }
            if !rp.open || rp.broken {
                // No source to ask (a replay), or the connection failed: the page comes in
                // the stream, or the stream ends and the migration fails.
                return true;
            }
            let len = len as u32;
            let msg = if rp.last_block == Some(block) {
                RpMessage::ReqPages { start, len }
            } else {
                RpMessage::ReqPagesId { start, len, block: &layout.blocks()[block].name }
            };
            match rp.send(msg) {
                Ok(()) => {
                    rp.last_block = Some(block);
                    self.counters.requests.fetch_add(1, Ordering::Relaxed);
                }
                Err(SendFailed) => {
                    rp.broken = true;
                    self.counters.unsent_requests.fetch_add(1, Ordering::Relaxed);
                }
            }
            true
        })
    }
}

//! State shared between the stream context and the vCPU contexts, and the vCPU side of the
//! fault protocol.
//!
//! | field | written by | when | read by |
//! |---|---|---|---|
//! | `state` | stream context, compare-exchange | commands, final EOF | vCPUs on a fault |
//! | `layout` | stream context, once | end of the MEM_SIZE block list (precopy setup) | both |
//! | `received` bits | stream context: set after a page is complete and mapped; cleared by a discard (before LISTEN: no vCPU runs) | every page | vCPUs on a fault |
//! | `requested` bits | vCPUs: set by the first toucher of a missing page; cleared by a discard | faults | stream context after placing a page |
//! | `rp` (return path + last requested block) | both, under its lock | PONG/SHUT, page requests | - |
//!
//! # Fault → wait → wake
//!
//! A vCPU that faults on page P sets `requested[P]` and then reads `received[P]`. The stream
//! context places P, sets `received[P]`, then reads `requested[P]`. Both pairs are `SeqCst`,
//! so at least one side sees the other's write: either the vCPU sees P received (it resumes)
//! or the stream context sees P requested (it releases P's waiters). A waiter must re-check
//! `received[P]` under its own wait primitive before sleeping, so a release that comes
//! between the vCPU's check and its sleep is not lost.

use core::sync::atomic::{AtomicU64, Ordering};

use spin::{Mutex, Once};

use super::state::{State, StateCell};
use crate::config::{RP_MESSAGE_CAPACITY, TARGET_PAGE_SIZE};
use crate::layout::Layout;
use crate::ports::{ReturnPath, SendFailed};
use crate::wire::return_path::RpMessage;

/// What a vCPU does after a stage-2 fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The page is there (it arrived meanwhile): re-execute the access.
    Resume,
    /// The page is requested: park until it is released.
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
    /// No page can be missing in this state (before RUN, or after a plain precopy).
    NotPostcopy {
        /// The state.
        state: State,
    },
    /// The page request could not be sent.
    ReturnPath,
}

/// The return path and what requests need to remember.
#[derive(Debug)]
pub struct RpSender<R> {
    port: R,
    open: bool,
    /// Block of the last REQ_PAGES_ID (REQ_PAGES without an id refers to it).
    last_block: Option<usize>,
    sent: u64,
}

impl<R: ReturnPath> RpSender<R> {
    /// Sends a message; `Err` if the port fails or the message does not fit.
    pub fn send(&mut self, msg: RpMessage<'_>) -> Result<(), SendFailed> {
        let mut buf = [0u8; RP_MESSAGE_CAPACITY];
        let n = msg.emit(&mut buf).ok_or(SendFailed)?;
        self.port.send(&buf[..n])?;
        self.sent += 1;
        Ok(())
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
#[derive(Debug, Default)]
pub struct FaultCounters {
    /// Stage-2 faults on missing pages handled.
    pub faults: AtomicU64,
    /// Page requests sent.
    pub requests: AtomicU64,
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
    /// Fault counters.
    pub counters: FaultCounters,
}

/// Bit position of a page in the bitmaps.
fn bit(layout: &Layout, block: usize, offset: u64) -> (usize, u64) {
    let b = &layout.blocks()[block];
    let page = offset / TARGET_PAGE_SIZE;
    (b.first_word + (page / 64) as usize, 1u64 << (page % 64))
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
            rp: Mutex::new(RpSender {
                port: rp,
                open: false,
                last_block: None,
                sent: 0,
            }),
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
    pub(crate) fn publish_layout(&self, layout: Layout) -> bool {
        let mut fresh = false;
        self.layout.call_once(|| {
            fresh = true;
            layout
        });
        fresh
    }

    /// Runs `f` with the return path locked.
    pub fn with_rp<T>(&self, f: impl FnOnce(&mut RpSender<R>) -> T) -> T {
        f(&mut self.rp.lock())
    }

    /// Whether the page holding `offset` of `block` has arrived (and is mapped).
    pub fn is_received(&self, block: usize, offset: u64) -> bool {
        let Some(layout) = self.layout() else {
            return false;
        };
        let (word, mask) = bit(layout, block, offset);
        self.received
            .get(word)
            .is_some_and(|w| w.load(Ordering::SeqCst) & mask != 0)
    }

    /// Stream context: the page is complete and mapped. Returns whether a vCPU had requested
    /// it (then its waiters must be released).
    pub(crate) fn mark_received(&self, layout: &Layout, block: usize, offset: u64) -> bool {
        let (word, mask) = bit(layout, block, offset);
        self.received[word].fetch_or(mask, Ordering::SeqCst);
        self.requested[word].load(Ordering::SeqCst) & mask != 0
    }

    /// Stream context, before LISTEN: forget that the pages of `[offset, offset+len)` arrived.
    pub(crate) fn mark_discarded(&self, layout: &Layout, block: usize, offset: u64, len: u64) {
        let mut page = offset;
        while page < offset + len {
            let (word, mask) = bit(layout, block, page);
            // A whole aligned word at once where possible.
            let whole = page.is_multiple_of(64 * TARGET_PAGE_SIZE)
                && offset + len - page >= 64 * TARGET_PAGE_SIZE;
            let mask = if whole { u64::MAX } else { mask };
            self.received[word].fetch_and(!mask, Ordering::SeqCst);
            self.requested[word].fetch_and(!mask, Ordering::SeqCst);
            page += if whole {
                64 * TARGET_PAGE_SIZE
            } else {
                TARGET_PAGE_SIZE
            };
        }
    }

    /// vCPU context: a stage-2 fault on `gpa` (the page is not mapped for the guest).
    ///
    /// The first vCPU to touch a missing page sends the request (REQ_PAGES_ID when the block
    /// differs from the last request's, else REQ_PAGES), for the whole host page; later
    /// touches of a requested page only wait. Without a return path (a replayed stream) the
    /// vCPU waits for the page to come in the stream.
    pub fn on_guest_fault(&self, gpa: u64) -> Result<Fault, FaultError> {
        let state = self.state.get();
        if !matches!(state, State::Listening | State::Running | State::End) {
            return Err(FaultError::NotPostcopy { state });
        }
        let layout = self.layout().ok_or(FaultError::OutsideGuestRam { gpa })?;
        let (block, offset) = layout
            .gpa_to_block(gpa)
            .ok_or(FaultError::OutsideGuestRam { gpa })?;
        self.counters.faults.fetch_add(1, Ordering::Relaxed);
        let page_size = layout.blocks()[block].page_size;
        let offset = offset & !(page_size - 1);
        let (word, mask) = bit(layout, block, offset);
        if self.received[word].load(Ordering::SeqCst) & mask != 0 {
            return Ok(Fault::Resume);
        }
        let first = self.requested[word].fetch_or(mask, Ordering::SeqCst) & mask == 0;
        if first {
            self.request(layout, block, offset, page_size)?;
        }
        if self.received[word].load(Ordering::SeqCst) & mask != 0 {
            return Ok(Fault::Resume);
        }
        Ok(Fault::Wait { block, offset })
    }

    fn request(
        &self,
        layout: &Layout,
        block: usize,
        start: u64,
        len: u64,
    ) -> Result<(), FaultError> {
        let mut rp = self.rp.lock();
        if !rp.open {
            return Ok(());
        }
        let len = len as u32;
        let msg = if rp.last_block == Some(block) {
            RpMessage::ReqPages { start, len }
        } else {
            RpMessage::ReqPagesId {
                start,
                len,
                block: &layout.blocks()[block].name,
            }
        };
        rp.send(msg).map_err(|SendFailed| FaultError::ReturnPath)?;
        rp.last_block = Some(block);
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

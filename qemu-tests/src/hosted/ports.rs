//! The agent's ports over host memory: guest RAM frames in host memory, behind a real EPT or
//! NPT table (`hal::stage2`, the code the hypervisor runs) whose leaves hold the frames' host
//! addresses. The stream context edits the table in place while the simulated vCPUs walk it
//! on every access, lock-free, as the hardware would, and read or write the frame the walk
//! ends in; and a wake-up token per vCPU.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use crate::hosted::mem::Mapping;
use agent::ports::{DeviceStateSink, GuestMemory, PageWaiters, Refused, ReturnPath, SendFailed, Stage2};
use hal::stage2::port::TablePort;
use hal::stage2::{Format, FramePool, Gpa, Hpa, Invalidate, Scope, TablePage, Translation, Walker};

/// Host "physical" address of the table pages: apart from the frames (host addresses below
/// 2^47), never dereferenced (the walker reads table pages from the slab).
const TABLES_BASE: u64 = 1 << 50;
const TWO_MIB: u64 = 2 << 20;

/// What the vCPUs share of the stage-2 table: a lock-free walker (the stream context owns
/// the table itself and edits it in place, through the entries' atomics, as the hypervisor
/// does while the hardware walks), the guest frames the table's leaves point at, and
/// counters.
#[derive(Debug)]
pub struct SharedTable<F: Format> {
    walker: OnceLock<Walker<'static, F>>,
    /// Every block's frames, fixed when the table is built (all blocks are declared by then).
    frames: OnceLock<Vec<Arc<Mapping>>>,
    /// Bytes of guest frames declared so far (sizes the table pool).
    frame_bytes: AtomicU64,
    invalidations: AtomicU64,
}

impl<F: Format> Default for SharedTable<F> {
    fn default() -> Self {
        Self {
            walker: OnceLock::new(),
            frames: OnceLock::new(),
            frame_bytes: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
        }
    }
}

impl<F: Format> SharedTable<F> {
    /// A vCPU's access: walk the table. `None` is an EPT violation / #NPF.
    pub fn translate(&self, gpa: u64) -> Option<Translation> {
        self.walker.get()?.translate(Gpa(gpa))
    }

    /// A vCPU reads the 8-byte word at `gpa` (8-byte aligned) through the table: the walk,
    /// then a load from the frame the leaf names. `None` is an EPT violation / #NPF.
    pub fn read(&self, gpa: u64) -> Option<u64> {
        let (frame, offset) = self.frame(gpa)?;
        // SAFETY: the page is mapped, so the stream context no longer writes it (it writes a
        // frame only before its `map` publishes it, and never again after LISTEN); vCPU
        // accesses are atomic; the dump reads frames after every vCPU has stopped.
        Some(unsafe { frame.load_u64(offset) })
    }

    /// A vCPU writes `value` to the 8-byte word at `gpa` through the table; `false` is an
    /// EPT violation / #NPF (nothing written).
    pub fn write(&self, gpa: u64, value: u64) -> bool {
        let Some((frame, offset)) = self.frame(gpa) else { return false };
        // SAFETY: as in `read`.
        unsafe { frame.store_u64(offset, value) };
        true
    }

    /// The frame and offset a walk of `gpa` ends in.
    fn frame(&self, gpa: u64) -> Option<(&Mapping, usize)> {
        let hpa = self.translate(gpa)?.hpa.0;
        let frames = self.frames.get()?;
        let frame = frames.iter().find(|m| (m.addr()..m.addr() + m.len() as u64).contains(&hpa));
        // The table maps nothing but these frames: anything else is a table bug.
        let frame =
            frame.unwrap_or_else(|| panic!("stage-2 leaf for {gpa:#x} points outside guest RAM: {hpa:#x}"));
        Some((frame, (hpa - frame.addr()) as usize))
    }

    /// Invalidations the edits asked for (one per discard command that unmapped something).
    pub fn invalidations(&self) -> u64 {
        self.invalidations.load(Ordering::Relaxed)
    }

    /// A new table over `frames`, sized for them all mapped with 4 KiB pages, its walker
    /// published for the vCPUs.
    fn build(&self, frames: Vec<Arc<Mapping>>) -> hal::stage2::Stage2<'static, F> {
        let _ = self.frames.set(frames);
        let ram = self.frame_bytes.load(Ordering::Acquire);
        // One page table per 2 MiB, plus the upper levels of up to 8 regions.
        let tables = (ram / TWO_MIB) as usize + 64;
        // One process, one table: the slab lives as long as the process.
        let slab: &'static mut [TablePage] = Vec::from_iter((0..tables).map(|_| TablePage::new())).leak();
        let pool = FramePool::new(slab, Hpa(TABLES_BASE)).expect("table pool");
        let table = hal::stage2::Stage2::new(pool).expect("stage-2 root");
        let _ = self.walker.set(table.walker());
        table
    }
}

/// Counts the invalidations tokens ask for. The simulated vCPUs keep no TLB (they walk the
/// table on every access), so counting is all a flush has to do here.
#[derive(Debug)]
pub struct CountInvalidations<'a>(&'a AtomicU64);

impl<F: Format> Invalidate<F> for CountInvalidations<'_> {
    fn invalidate(&mut self, _scope: Scope) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// One wake-up token per vCPU (the agent may release a vCPU before it sleeps). A release
/// that finds its vCPU awake only sets the token; the lock and the condition variable are for
/// vCPUs that actually sleep.
#[derive(Debug)]
pub struct Wakeups {
    /// (token, sleeping) per vCPU.
    slots: Vec<(AtomicBool, AtomicBool)>,
    lock: Mutex<()>,
    woken: Condvar,
}

impl Wakeups {
    /// Tokens for `vcpus` vCPUs.
    pub fn new(vcpus: usize) -> Self {
        let slots = (0..vcpus).map(|_| (AtomicBool::new(false), AtomicBool::new(false))).collect();
        Self { slots, lock: Mutex::new(()), woken: Condvar::new() }
    }

    /// Parks vCPU `v` until its token is set (consuming it), or `give_up()`.
    ///
    /// The vCPU announces that it sleeps, then checks the token, both `SeqCst`; a release sets
    /// the token, then checks whether the vCPU sleeps. One of the two sees the other, and the
    /// vCPU holds the lock from its announcement until it waits, so a notify cannot slip in
    /// between. (The wait also times out, so `give_up` is polled.)
    pub fn park(&self, v: usize, give_up: impl Fn() -> bool) -> bool {
        let Some((token, sleeping)) = self.slots.get(v) else { return false };
        loop {
            if token.swap(false, Ordering::SeqCst) {
                return true;
            }
            if give_up() {
                return false;
            }
            let guard = self.lock.lock().expect("wake lock");
            sleeping.store(true, Ordering::SeqCst);
            if !token.load(Ordering::SeqCst) {
                let timeout = std::time::Duration::from_millis(50);
                drop(self.woken.wait_timeout(guard, timeout).expect("wake lock"));
            }
            sleeping.store(false, Ordering::SeqCst);
        }
    }

    fn release(&self, v: usize) {
        let Some((token, sleeping)) = self.slots.get(v) else { return };
        token.store(true, Ordering::SeqCst);
        if sleeping.load(Ordering::SeqCst) {
            drop(self.lock.lock().expect("wake lock"));
            self.woken.notify_all();
        }
    }
}

/// A RAMBlock's frames: anonymous memory with transparent huge pages allowed, as a VMM
/// backs guest RAM (QEMU does the same), so the first touch of each 2 MiB faults once. The
/// vCPUs reach the same memory through the stage-2 table.
#[derive(Debug)]
pub struct GuestRam {
    /// The block's idstr.
    pub name: Vec<u8>,
    ram: Arc<Mapping>,
    len: usize,
}

impl GuestRam {
    /// The block's contents. Read them only while no vCPU runs (after the vCPU threads
    /// have stopped): a vCPU may be writing guest memory.
    pub fn bytes(&self) -> &[u8] {
        &self.ram.bytes()[..self.len]
    }

    /// `len` bytes at `offset`, for the stream context to fill.
    fn page_mut(&mut self, offset: u64, len: usize) -> &mut [u8] {
        let at = offset as usize;
        assert!(at + len <= self.len, "write outside the block");
        // SAFETY: the agent writes only pages that no vCPU can reach: not mapped for the
        // guest (or before RUN, when no vCPU runs); see `GuestMemory::write`.
        unsafe { self.ram.slice_mut(at, len) }
    }
}

/// The stream context's ports.
#[derive(Debug)]
pub struct HostPorts<'s, F: Format> {
    /// The guest frames, per RAMBlock.
    pub blocks: Vec<GuestRam>,
    /// Device state, kept for `--dump-dir`.
    pub device_state: Vec<u8>,
    shared: &'s SharedTable<F>,
    /// The table and the stage-2 port over it, built at the first edit (by then every block
    /// is declared).
    table: Option<TablePort<'static, F, CountInvalidations<'s>>>,
    wakeups: &'s Wakeups,
}

impl<'s, F: Format> HostPorts<'s, F> {
    /// Ports over `table` and `wakeups`.
    pub fn new(table: &'s SharedTable<F>, wakeups: &'s Wakeups) -> Self {
        Self { blocks: Vec::new(), device_state: Vec::new(), shared: table, table: None, wakeups }
    }

    /// Touches every frame, so later copies into them take no page fault (the hypervisor's
    /// guest RAM is physical memory: it never faults).
    pub fn prefault(&mut self) {
        for block in &mut self.blocks {
            for page in block.page_mut(0, block.len).chunks_mut(4096) {
                page[0] = 0;
            }
        }
    }
}

impl<F: Format> GuestMemory for HostPorts<'_, F> {
    fn declare_block(&mut self, _index: usize, name: &[u8], len: u64) -> Result<(), Refused> {
        // Host RAM bounds what we accept: refuse blocks over 64 GiB rather than abort.
        let bytes = usize::try_from(len).ok().filter(|&l| l <= 64 << 30).ok_or(Refused)?;
        let mut ram =
            if bytes == 0 { Mapping::anon(4096) } else { Mapping::anon(bytes) }.map_err(|_| Refused)?;
        // Best effort: without THP the frames are still correct, only slower to fault in.
        let _ = ram.madvise(0, ram.len(), libc::MADV_HUGEPAGE);
        self.blocks.push(GuestRam { name: name.to_vec(), ram: Arc::new(ram), len: bytes });
        self.shared.frame_bytes.fetch_add(len.next_multiple_of(TWO_MIB), Ordering::AcqRel);
        Ok(())
    }

    fn write(&mut self, block: usize, offset: u64, data: &[u8]) {
        // The hypervisor's page placement: non-temporal stores, then a fence, so the page is
        // complete in memory before `map` publishes it.
        hal::mem::copy_nontemporal(self.blocks[block].page_mut(offset, data.len()), data);
    }

    fn fill(&mut self, block: usize, offset: u64, len: u64, byte: u8) {
        self.blocks[block].page_mut(offset, len as usize).fill(byte);
    }
}

impl<'s, F: Format> HostPorts<'s, F> {
    fn port(&mut self) -> &mut TablePort<'static, F, CountInvalidations<'s>> {
        let shared = self.shared;
        let blocks = &self.blocks;
        self.table.get_or_insert_with(|| {
            let table = shared.build(blocks.iter().map(|b| b.ram.clone()).collect());
            let mut port = TablePort::new(table, CountInvalidations(&shared.invalidations));
            for (i, b) in blocks.iter().enumerate() {
                // The leaves hold the frames' real (host) addresses: the vCPUs load and store
                // through them.
                port.set_block_base(i, b.ram.addr());
            }
            port
        })
    }
}

impl<F: Format> Stage2 for HostPorts<'_, F> {
    fn map(&mut self, gpa: u64, block: usize, offset: u64) {
        self.port().map(gpa, block, offset);
    }

    fn unmap(&mut self, gpa: u64, len: u64) {
        self.port().unmap(gpa, len);
    }

    fn flush(&mut self) {
        self.port().flush();
    }
}

impl<F: Format> DeviceStateSink for HostPorts<'_, F> {
    fn device_state(&mut self, bytes: &[u8]) {
        self.device_state.extend_from_slice(bytes);
    }
}

impl<F: Format> PageWaiters for HostPorts<'_, F> {
    fn release(&mut self, vcpu: usize) {
        self.wakeups.release(vcpu);
    }
}

/// The return path: the migration connection, written back.
#[derive(Debug)]
pub struct SocketReturnPath<W>(pub Option<W>);

impl<W: Write> ReturnPath for SocketReturnPath<W> {
    fn send(&mut self, message: &[u8]) -> Result<(), SendFailed> {
        match &mut self.0 {
            Some(w) => w.write_all(message).and_then(|()| w.flush()).map_err(|_| SendFailed),
            // A replayed stream has no source to answer.
            None => Ok(()),
        }
    }
}

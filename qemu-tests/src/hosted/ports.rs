//! The agent's ports over host memory: guest RAM frames in host `Vec`s, behind a real EPT or
//! NPT table (`hal::stage2`, the code the hypervisor runs) that the simulated vCPUs walk on
//! every access, and a wake-up token per vCPU.

use std::io::Write;
use std::sync::{Condvar, Mutex, OnceLock, RwLock};

use crate::baseline::sys::Mapping;
use agent::ports::{DeviceStateSink, GuestMemory, PageWaiters, Refused, ReturnPath, SendFailed, Stage2};
use hal::stage2::{Flush, Format, FramePool, Gpa, Hpa, Invalidate, Perms, Scope, TablePage, Translation};

/// Host "physical" address of the first guest frame; blocks follow, each 2 MiB aligned.
const FRAMES_BASE: u64 = 1 << 30;
/// Host "physical" address of the table pages (apart from the frames).
const TABLES_BASE: u64 = 1 << 40;
const TWO_MIB: u64 = 2 << 20;

/// The stage-2 table shared by the stream context (edits) and the vCPUs (walks).
#[derive(Debug)]
pub struct SharedTable<F: Format> {
    table: OnceLock<RwLock<hal::stage2::Stage2<'static, F>>>,
    /// Bytes of guest frames declared so far (sizes the table pool).
    frames: std::sync::atomic::AtomicU64,
    invalidations: Mutex<u64>,
}

impl<F: Format> Default for SharedTable<F> {
    fn default() -> Self {
        Self { table: OnceLock::new(), frames: Default::default(), invalidations: Mutex::new(0) }
    }
}

impl<F: Format> SharedTable<F> {
    /// A vCPU's access: walk the table. `None` is an EPT violation / #NPF.
    pub fn translate(&self, gpa: u64) -> Option<Translation> {
        self.table.get()?.read().expect("stage-2 lock").translate(Gpa(gpa))
    }

    /// Invalidations the edits asked for (one per discard command that unmapped something).
    pub fn invalidations(&self) -> u64 {
        *self.invalidations.lock().expect("invalidation count")
    }

    /// The table, built on first use: by then every block is declared, so the pool is sized
    /// for all of guest RAM mapped with 4 KiB pages.
    fn table(&self) -> &RwLock<hal::stage2::Stage2<'static, F>> {
        self.table.get_or_init(|| {
            let ram = self.frames.load(std::sync::atomic::Ordering::Acquire);
            // One page table per 2 MiB, plus the upper levels of up to 8 regions.
            let tables = (ram / TWO_MIB) as usize + 64;
            // One process, one table: the slab lives as long as the process.
            let slab: &'static mut [TablePage] = Vec::from_iter((0..tables).map(|_| TablePage::new())).leak();
            let pool = FramePool::new(slab, Hpa(TABLES_BASE)).expect("table pool");
            RwLock::new(hal::stage2::Stage2::new(pool).expect("stage-2 root"))
        })
    }
}

/// Counts the invalidations tokens ask for. The simulated vCPUs keep no TLB (they walk the
/// table on every access), so counting is all a flush has to do here.
struct CountInvalidations<'a>(&'a Mutex<u64>);

impl<F: Format> Invalidate<F> for CountInvalidations<'_> {
    fn invalidate(&mut self, _scope: Scope) {
        *self.0.lock().expect("invalidation count") += 1;
    }
}

/// One wake-up token per vCPU (the agent may release a vCPU before it sleeps).
#[derive(Debug)]
pub struct Wakeups {
    /// (token, sleeping) per vCPU.
    state: Mutex<Vec<(bool, bool)>>,
    woken: Condvar,
}

impl Wakeups {
    /// Tokens for `vcpus` vCPUs.
    pub fn new(vcpus: usize) -> Self {
        Self { state: Mutex::new(vec![(false, false); vcpus]), woken: Condvar::new() }
    }

    /// Parks vCPU `v` until its token is set (consuming it), or `give_up()`.
    pub fn park(&self, v: usize, give_up: impl Fn() -> bool) -> bool {
        let mut state = self.state.lock().expect("wake tokens");
        loop {
            if std::mem::take(&mut state[v].0) {
                state[v].1 = false;
                return true;
            }
            if give_up() {
                state[v].1 = false;
                return false;
            }
            state[v].1 = true;
            let timeout = std::time::Duration::from_millis(50);
            state = self.woken.wait_timeout(state, timeout).expect("wake tokens").0;
        }
    }

    fn release(&self, v: usize) {
        let mut state = self.state.lock().expect("wake tokens");
        let Some(slot) = state.get_mut(v) else { return };
        slot.0 = true;
        // Wake sleepers only: a vCPU that has not gone to sleep finds its token.
        if slot.1 {
            drop(state);
            self.woken.notify_all();
        }
    }
}

/// A RAMBlock's frames: anonymous memory with transparent huge pages allowed, as a VMM
/// backs guest RAM (QEMU does the same), so the first touch of each 2 MiB faults once.
#[derive(Debug)]
pub struct GuestRam {
    /// The block's idstr.
    pub name: Vec<u8>,
    ram: Mapping,
    len: usize,
}

impl GuestRam {
    /// The block's contents.
    pub fn bytes(&self) -> &[u8] {
        &self.ram.bytes()[..self.len]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.ram.bytes_mut()[..self.len]
    }
}

/// The stream context's ports.
#[derive(Debug)]
pub struct HostPorts<'s, F: Format> {
    /// The guest frames, per RAMBlock.
    pub blocks: Vec<GuestRam>,
    /// Device state, kept for `--dump-dir`.
    pub device_state: Vec<u8>,
    table: &'s SharedTable<F>,
    wakeups: &'s Wakeups,
    /// Unmaps of the current discard command, flushed together.
    pending: Option<Flush<F>>,
    /// Host-physical base of each block's frames.
    bases: Vec<u64>,
}

impl<'s, F: Format> HostPorts<'s, F> {
    /// Ports over `table` and `wakeups`.
    pub fn new(table: &'s SharedTable<F>, wakeups: &'s Wakeups) -> Self {
        Self {
            blocks: Vec::new(),
            device_state: Vec::new(),
            table,
            wakeups,
            pending: None,
            bases: Vec::new(),
        }
    }

    /// Touches every frame, so later copies into them take no page fault (the hypervisor's
    /// guest RAM is physical memory: it never faults).
    pub fn prefault(&mut self) {
        for block in &mut self.blocks {
            for page in block.bytes_mut().chunks_mut(4096) {
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
        self.blocks.push(GuestRam { name: name.to_vec(), ram, len: bytes });
        let base = FRAMES_BASE + self.table.frames.load(std::sync::atomic::Ordering::Acquire);
        self.bases.push(base);
        self.table.frames.fetch_add(len.next_multiple_of(TWO_MIB), std::sync::atomic::Ordering::AcqRel);
        Ok(())
    }

    fn write(&mut self, block: usize, offset: u64, data: &[u8]) {
        let at = offset as usize;
        // The hypervisor's page placement: non-temporal stores, then a fence, so the page is
        // complete in memory before `map` publishes it.
        hal::mem::copy_nontemporal(&mut self.blocks[block].bytes_mut()[at..at + data.len()], data);
    }

    fn fill(&mut self, block: usize, offset: u64, len: u64, byte: u8) {
        let (at, len) = (offset as usize, len as usize);
        self.blocks[block].bytes_mut()[at..at + len].fill(byte);
    }
}

impl<F: Format> Stage2 for HostPorts<'_, F> {
    fn map(&mut self, gpa: u64, block: usize, offset: u64) {
        let table = self.table.table();
        let base = self.bases[block];
        let flush = table.write().expect("stage-2 lock").map_4k(Gpa(gpa), Hpa(base + offset), Perms::RWX);
        // Mapping a not-present entry needs no invalidation; the token says so.
        flush.expect("map a received page").flush(&mut CountInvalidations(&self.table.invalidations));
    }

    fn unmap(&mut self, gpa: u64, len: u64) {
        let flush = self.table.table().write().expect("stage-2 lock").unmap_range(Gpa(gpa), len);
        let flush = flush.expect("unmap a discarded range");
        self.pending = Some(match self.pending.take() {
            Some(p) => p.merge(flush),
            None => flush,
        });
    }

    fn flush(&mut self) {
        if let Some(p) = self.pending.take() {
            p.flush(&mut CountInvalidations(&self.table.invalidations));
        }
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

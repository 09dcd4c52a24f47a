//! The agent's ports over host memory: guest RAM frames in host memory, behind a real EPT or
//! NPT table (`hal::stage2`, the code the hypervisor runs) that the stream context edits in
//! place while the simulated vCPUs walk it on every access, lock-free, as the hardware
//! would; and a wake-up token per vCPU.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};

use crate::hosted::mem::Mapping;
use agent::ports::{DeviceStateSink, GuestMemory, PageWaiters, Refused, ReturnPath, SendFailed, Stage2};
use hal::stage2::{
    Flush, Format, FramePool, Gpa, Hpa, Invalidate, Perms, Scope, TablePage, Translation, Walker,
};

/// Host "physical" address of the first guest frame; blocks follow, each 2 MiB aligned.
const FRAMES_BASE: u64 = 1 << 30;
/// Host "physical" address of the table pages (apart from the frames).
const TABLES_BASE: u64 = 1 << 40;
const TWO_MIB: u64 = 2 << 20;

/// What the vCPUs share of the stage-2 table: a lock-free walker (the stream context owns
/// the table itself and edits it in place, through the entries' atomics, as the hypervisor
/// does while the hardware walks), and counters.
#[derive(Debug)]
pub struct SharedTable<F: Format> {
    walker: OnceLock<Walker<'static, F>>,
    /// Bytes of guest frames declared so far (sizes the table pool).
    frames: AtomicU64,
    invalidations: AtomicU64,
}

impl<F: Format> Default for SharedTable<F> {
    fn default() -> Self {
        Self { walker: OnceLock::new(), frames: AtomicU64::new(0), invalidations: AtomicU64::new(0) }
    }
}

impl<F: Format> SharedTable<F> {
    /// A vCPU's access: walk the table. `None` is an EPT violation / #NPF.
    pub fn translate(&self, gpa: u64) -> Option<Translation> {
        self.walker.get()?.translate(Gpa(gpa))
    }

    /// Invalidations the edits asked for (one per discard command that unmapped something).
    pub fn invalidations(&self) -> u64 {
        self.invalidations.load(Ordering::Relaxed)
    }

    /// A new table, sized for all the guest RAM declared so far mapped with 4 KiB pages, its
    /// walker published for the vCPUs.
    fn build(&self) -> hal::stage2::Stage2<'static, F> {
        let ram = self.frames.load(Ordering::Acquire);
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
struct CountInvalidations<'a>(&'a AtomicU64);

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
    shared: &'s SharedTable<F>,
    /// The table, built at the first edit (by then every block is declared).
    table: Option<hal::stage2::Stage2<'static, F>>,
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
            shared: table,
            table: None,
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
        let base = FRAMES_BASE + self.shared.frames.load(Ordering::Acquire);
        self.bases.push(base);
        self.shared.frames.fetch_add(len.next_multiple_of(TWO_MIB), Ordering::AcqRel);
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

impl<F: Format> HostPorts<'_, F> {
    fn table(&mut self) -> &mut hal::stage2::Stage2<'static, F> {
        let shared = self.shared;
        self.table.get_or_insert_with(|| shared.build())
    }
}

impl<F: Format> Stage2 for HostPorts<'_, F> {
    fn map(&mut self, gpa: u64, block: usize, offset: u64) {
        let hpa = Hpa(self.bases[block] + offset);
        let flush = self.table().map_4k(Gpa(gpa), hpa, Perms::RWX);
        // Mapping a not-present entry needs no invalidation; the token says so.
        flush.expect("map a received page").flush(&mut CountInvalidations(&self.shared.invalidations));
    }

    fn unmap(&mut self, gpa: u64, len: u64) {
        let flush = self.table().unmap_range(Gpa(gpa), len).expect("unmap a discarded range");
        self.pending = Some(match self.pending.take() {
            Some(p) => p.merge(flush),
            None => flush,
        });
    }

    fn flush(&mut self) {
        if let Some(p) = self.pending.take() {
            p.flush(&mut CountInvalidations(&self.shared.invalidations));
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

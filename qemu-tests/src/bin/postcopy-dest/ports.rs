//! The agent's ports over host memory: guest RAM in `Vec`s, a software stage-2 map that the
//! simulated vCPUs consult on every access, and a condition variable for parked vCPUs.

use std::collections::HashSet;
use std::io::Write;
use std::sync::{Condvar, Mutex, RwLock};

use agent::ports::{
    DeviceStateSink, GuestMemory, PageWaiters, Refused, ReturnPath, SendFailed, Stage2,
};

/// Guest-physical pages mapped for the guest, and the wait/wake point of parked vCPUs.
#[derive(Debug, Default)]
pub struct SoftStage2 {
    mapped: RwLock<HashSet<u64>>,
    /// Bumped on every release; vCPUs wait on it.
    generation: Mutex<u64>,
    released: Condvar,
}

impl SoftStage2 {
    /// Whether `gpa`'s page is mapped (a vCPU access would not fault).
    pub fn is_mapped(&self, gpa: u64) -> bool {
        self.mapped
            .read()
            .expect("stage-2 lock")
            .contains(&(gpa & !0xfff))
    }

    /// Parks until `gpa` is mapped or `give_up()` says to stop. Re-checks the mapping under
    /// the wait lock, so a release between the fault and the wait is not lost.
    pub fn wait_mapped(&self, gpa: u64, give_up: impl Fn() -> bool) -> bool {
        let mut generation = self.generation.lock().expect("wait lock");
        loop {
            if self.is_mapped(gpa) {
                return true;
            }
            if give_up() {
                return false;
            }
            let timeout = std::time::Duration::from_millis(50);
            generation = self
                .released
                .wait_timeout(generation, timeout)
                .expect("wait lock")
                .0;
        }
    }

    fn release_all(&self) {
        *self.generation.lock().expect("wait lock") += 1;
        self.released.notify_all();
    }
}

/// The stream context's ports.
#[derive(Debug)]
pub struct HostPorts<'s> {
    /// (name, contents) per RAMBlock.
    pub blocks: Vec<(Vec<u8>, Vec<u8>)>,
    /// Device state, kept for `--dump-dir`.
    pub device_state: Vec<u8>,
    stage2: &'s SoftStage2,
}

impl<'s> HostPorts<'s> {
    pub fn new(stage2: &'s SoftStage2) -> Self {
        Self {
            blocks: Vec::new(),
            device_state: Vec::new(),
            stage2,
        }
    }
}

impl GuestMemory for HostPorts<'_> {
    fn declare_block(&mut self, _index: usize, name: &[u8], len: u64) -> Result<(), Refused> {
        // Host RAM bounds what we accept: refuse blocks over 64 GiB rather than abort.
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= 64 << 30)
            .ok_or(Refused)?;
        self.blocks.push((name.to_vec(), vec![0; len]));
        Ok(())
    }

    fn write(&mut self, block: usize, offset: u64, data: &[u8]) {
        let at = offset as usize;
        self.blocks[block].1[at..at + data.len()].copy_from_slice(data);
    }

    fn fill(&mut self, block: usize, offset: u64, len: u64, byte: u8) {
        let (at, len) = (offset as usize, len as usize);
        self.blocks[block].1[at..at + len].fill(byte);
    }
}

impl Stage2 for HostPorts<'_> {
    fn map(&mut self, gpa: u64, _block: usize, _offset: u64) {
        self.stage2
            .mapped
            .write()
            .expect("stage-2 lock")
            .insert(gpa);
    }

    fn unmap(&mut self, gpa: u64, len: u64) {
        let mut mapped = self.stage2.mapped.write().expect("stage-2 lock");
        for page in (gpa..gpa + len).step_by(4096) {
            mapped.remove(&page);
        }
    }

    fn flush(&mut self) {
        // The map is consulted on every access: an unmap is visible at once.
    }
}

impl DeviceStateSink for HostPorts<'_> {
    fn device_state(&mut self, bytes: &[u8]) {
        self.device_state.extend_from_slice(bytes);
    }
}

impl PageWaiters for HostPorts<'_> {
    fn release(&mut self, _block: usize, _offset: u64) {
        self.stage2.release_all();
    }
}

/// The return path: the migration connection, written back.
#[derive(Debug)]
pub struct SocketReturnPath<W>(pub Option<W>);

impl<W: Write> ReturnPath for SocketReturnPath<W> {
    fn send(&mut self, message: &[u8]) -> Result<(), SendFailed> {
        match &mut self.0 {
            Some(w) => w
                .write_all(message)
                .and_then(|()| w.flush())
                .map_err(|_| SendFailed),
            // A replayed stream has no source to answer.
            None => Ok(()),
        }
    }
}

//! The agent's stream-context ports in the image: guest RAM in the frames region, the nested
//! page table (through `hal::stage2::port`), device state kept for the vCPU restore, and the
//! parked vCPU's wake-up.

use agent::config::MAX_BLOCKS;
use agent::ports::{DeviceStateSink, GuestMemory, PageWaiters, Refused, Stage2};
use hal::stage2::port::TablePort;
use hal::stage2::{Format, Invalidate};

use crate::memory::{frames_mut, FRAMES_BASE, FRAMES_LEN};

/// Device state the image keeps (the project's vCPU record is 380 bytes).
pub const DEVICE_STATE_BYTES: usize = 64 * 1024;
const TWO_MIB: u64 = 2 << 20;

/// The ports, over a stage-2 table of format `F` whose flushes go to `I`.
pub struct ImagePorts<F: Format, I: Invalidate<F>> {
    /// The stage-2 table (NPT or EPT) and where its flushes go.
    pub stage2: TablePort<'static, F, I>,
    /// (host-physical base, length) of each block's frames.
    pub blocks: heapless::Vec<(u64, u64), MAX_BLOCKS>,
    next_frame: u64,
    device_state: &'static mut [u8; DEVICE_STATE_BYTES],
    device_len: usize,
    /// Device state past [`DEVICE_STATE_BYTES`] was dropped.
    pub device_overflow: bool,
    /// The parked vCPU was released (its page is mapped), and the TSC then.
    pub released: Option<u64>,
}

impl<F: Format, I: Invalidate<F>> ImagePorts<F, I> {
    /// Ports over `stage2`, keeping device state in `device_state`.
    pub fn new(
        stage2: TablePort<'static, F, I>,
        device_state: &'static mut [u8; DEVICE_STATE_BYTES],
    ) -> Self {
        Self {
            stage2,
            blocks: heapless::Vec::new(),
            next_frame: FRAMES_BASE,
            device_state,
            device_len: 0,
            device_overflow: false,
            released: None,
        }
    }

    /// The device state received so far.
    pub fn device_state(&self) -> &[u8] {
        &self.device_state[..self.device_len]
    }

    fn frame(&self, block: usize, offset: u64) -> u64 {
        self.blocks[block].0 + offset
    }
}

impl<F: Format, I: Invalidate<F>> GuestMemory for ImagePorts<F, I> {
    fn declare_block(&mut self, index: usize, _name: &[u8], len: u64) -> Result<(), Refused> {
        let base = self.next_frame.next_multiple_of(TWO_MIB);
        let end = base.checked_add(len).filter(|&end| end <= FRAMES_BASE + FRAMES_LEN).ok_or(Refused)?;
        self.blocks.push((base, len)).map_err(|_| Refused)?;
        self.stage2.set_block_base(index, base);
        self.next_frame = end;
        Ok(())
    }

    fn write(&mut self, block: usize, offset: u64, data: &[u8]) {
        // SAFETY: the engine writes only pages the guest cannot reach (not mapped, or before
        // RUN), inside the block (checked against the block list), which lies in the frames.
        let frame = unsafe { frames_mut(self.frame(block, offset), data.len()) };
        hal::mem::copy_nontemporal(frame, data);
    }

    fn fill(&mut self, block: usize, offset: u64, len: u64, byte: u8) {
        // SAFETY: as in `write`.
        unsafe { frames_mut(self.frame(block, offset), len as usize) }.fill(byte);
    }
}

impl<F: Format, I: Invalidate<F>> Stage2 for ImagePorts<F, I> {
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

impl<F: Format, I: Invalidate<F>> DeviceStateSink for ImagePorts<F, I> {
    fn device_state(&mut self, bytes: &[u8]) {
        let room = DEVICE_STATE_BYTES - self.device_len;
        let n = bytes.len().min(room);
        self.device_state[self.device_len..self.device_len + n].copy_from_slice(&bytes[..n]);
        self.device_len += n;
        self.device_overflow |= n < bytes.len();
    }
}

impl<F: Format, I: Invalidate<F>> PageWaiters for ImagePorts<F, I> {
    fn release(&mut self, _vcpu: usize) {
        self.released = Some(hal::cpu::rdtsc());
    }
}

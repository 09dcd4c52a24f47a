//! The seams between the agent and what runs it: the hypervisor (`hal`) or the hosted
//! destination (`postcopy-dest`). The agent does no I/O of its own; it calls these.
//!
//! Contexts: [`GuestMemory`], [`Stage2`], [`DeviceStateSink`] and [`PageWaiters`] are called
//! from the stream context only (through the engine). [`ReturnPath`] is called from the
//! stream context (PONG, SHUT) and from vCPU contexts (page requests), always under the
//! shared return-path lock, so implementations need no locking of their own.

/// Guest memory does not have the block the stream announced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused;

/// The return path could not take the message (the connection is gone).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendFailed;

/// Guest RAM, addressed as the stream addresses it: (block index, byte offset).
///
/// The engine checks every block index and range against the block list before calling, so
/// implementations may treat an out-of-range call as a bug in the agent.
pub trait GuestMemory {
    /// A block of the MEM_SIZE list, in order (`index` counts from 0). The hypervisor checks
    /// it against the machine it emulates and refuses blocks it does not have; the hosted
    /// destination allocates it.
    fn declare_block(&mut self, index: usize, name: &[u8], len: u64) -> Result<(), Refused>;

    /// Copies `data` to `offset` in the block. `data` lies inside one target page that is not
    /// mapped for the guest (or not yet received).
    fn write(&mut self, block: usize, offset: u64, data: &[u8]);

    /// Fills `len` bytes at `offset` with `byte` (a ZERO record).
    fn fill(&mut self, block: usize, offset: u64, len: u64, byte: u8);
}

/// The guest's stage-2 translation (EPT / NPT), at page granularity.
pub trait Stage2 {
    /// Maps the guest-physical page `gpa` to the frame holding `block`'s page at `offset`.
    /// Called only after the page's contents are complete.
    fn map(&mut self, gpa: u64, block: usize, offset: u64);

    /// Unmaps `[gpa, gpa + len)`; the next guest access faults.
    fn unmap(&mut self, gpa: u64, len: u64);

    /// Makes every unmap since the last flush visible to all vCPUs (one INVEPT / one NPT TLB
    /// flush per RAM_DISCARD command).
    fn flush(&mut self);
}

/// Where device state goes. It is opaque to the agent: the FULL records of the PACKAGED blob
/// (postcopy) or those after the final RAM section (precopy).
pub trait DeviceStateSink {
    /// The next piece of device-state bytes, in stream order.
    fn device_state(&mut self, bytes: &[u8]);
}

/// vCPUs parked on missing pages.
pub trait PageWaiters {
    /// vCPU `vcpu` was parked on a page that is now mapped: make it runnable. Called exactly
    /// once per [`Fault::Wait`](crate::postcopy::Fault::Wait), possibly before the vCPU has
    /// gone to sleep, so the wake must be remembered (a token, not a bare signal).
    fn release(&mut self, vcpu: usize);
}

/// The return path to the source (the same connection as the stream).
pub trait ReturnPath {
    /// Sends one complete message. An error ends the migration.
    fn send(&mut self, message: &[u8]) -> Result<(), SendFailed>;
}

/// Everything the stream context drives, as one type parameter.
pub trait StreamPorts: GuestMemory + Stage2 + DeviceStateSink + PageWaiters {}

impl<T: GuestMemory + Stage2 + DeviceStateSink + PageWaiters> StreamPorts for T {}

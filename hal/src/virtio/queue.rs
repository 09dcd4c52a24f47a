//! A split virtqueue (virtio 1.x, "Split Virtqueues"): the descriptor table, the driver's
//! available ring and the device's used ring, in one page-aligned block of memory that the
//! device reads and writes while the driver runs.
//!
//! Every chain here is one descriptor, and descriptor `i` is owned by buffer `i` for the
//! queue's life: the driver sets its address and length, publishes `i` in the available ring,
//! and gets `i` back from the used ring with the byte count the device wrote. That is all a
//! vsock driver needs (a header and its payload in one buffer), and it makes the free list the
//! caller's business: a buffer is either published or owned by the driver.
//!
//! The device is another agent (a vhost-user daemon in another process, or hardware), so every
//! access to memory it shares goes through volatile reads and writes, and the available index
//! is written only after the ring entry it covers (a release fence between them; the used
//! index is read before the entries it covers, with an acquire fence after).

use core::ptr::{addr_of, addr_of_mut, NonNull};
use core::sync::atomic::{fence, Ordering};

/// `VIRTQ_DESC_F_WRITE`: the device writes this buffer (RX); otherwise it reads it (TX).
const DESC_F_WRITE: u16 = 2;
/// `VIRTQ_USED_F_NO_NOTIFY`: the device does not need a notification for new buffers now.
const USED_F_NO_NOTIFY: u16 = 1;
/// `VIRTQ_AVAIL_F_NO_INTERRUPT`: the driver polls the used ring; no interrupt wanted.
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// One descriptor.
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug, Default)]
struct Descriptor {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// The driver area.
#[repr(C, align(2))]
#[derive(Debug)]
struct Avail<const N: usize> {
    flags: u16,
    idx: u16,
    ring: [u16; N],
    used_event: u16,
}

/// One used-ring entry: which chain the device finished, and how many bytes it wrote.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsedElem {
    /// The chain's head descriptor (the buffer's id here).
    pub id: u32,
    /// Bytes the device wrote into the chain (0 for a buffer it only read).
    pub len: u32,
}

/// The device area.
#[repr(C, align(4))]
#[derive(Debug)]
struct Used<const N: usize> {
    flags: u16,
    idx: u16,
    ring: [UsedElem; N],
    avail_event: u16,
}

/// The memory of a queue of `N` entries. It must stay where it is while the device may use
/// it (a `static`), and the device must be able to reach it at the address the driver gives:
/// in the image, physical = virtual.
#[repr(C, align(4096))]
#[derive(Debug)]
pub struct QueueMemory<const N: usize> {
    desc: [Descriptor; N],
    avail: Avail<N>,
    used: Used<N>,
}

impl<const N: usize> QueueMemory<N> {
    /// Zeroed memory, for a `static`.
    pub const fn new() -> Self {
        Self {
            desc: [Descriptor { addr: 0, len: 0, flags: 0, next: 0 }; N],
            avail: Avail { flags: 0, idx: 0, ring: [0; N], used_event: 0 },
            used: Used { flags: 0, idx: 0, ring: [UsedElem { id: 0, len: 0 }; N], avail_event: 0 },
        }
    }
}

impl<const N: usize> Default for QueueMemory<N> {
    fn default() -> Self {
        Self::new()
    }
}

/// The driver's side of a split virtqueue of `N` (a power of two) entries.
#[derive(Debug)]
pub struct SplitQueue<const N: usize> {
    mem: NonNull<QueueMemory<N>>,
    /// The available index the driver publishes next (free-running, wraps at 2^16).
    next_avail: u16,
    /// The used index up to which the driver has taken entries (free-running).
    last_used: u16,
}

// SAFETY: the queue owns its memory exclusively on the CPU side (it was handed a `&'static
// mut`); moving the handle to another thread moves that ownership with it.
unsafe impl<const N: usize> Send for SplitQueue<N> {}

impl<const N: usize> SplitQueue<N> {
    const SIZE_OK: () = assert!(N.is_power_of_two() && N <= 32768, "a split queue has 2^k <= 32768 entries");

    /// A queue over `mem`, which it zeroes; its entries all belong to the driver.
    pub fn new(mem: &'static mut QueueMemory<N>) -> Self {
        let () = Self::SIZE_OK;
        *mem = QueueMemory::new();
        mem.avail.flags = AVAIL_F_NO_INTERRUPT;
        Self { mem: NonNull::from(mem), next_avail: 0, last_used: 0 }
    }

    /// Entries in the queue (what the driver writes into `queue_size`).
    pub const fn size(&self) -> u16 {
        N as u16
    }

    /// Addresses of the descriptor table, the driver area and the device area.
    pub fn areas(&self) -> (u64, u64, u64) {
        let base = self.mem.as_ptr();
        // SAFETY: only addresses are computed, inside the queue's own allocation.
        unsafe {
            (addr_of!((*base).desc) as u64, addr_of!((*base).avail) as u64, addr_of!((*base).used) as u64)
        }
    }

    /// Points descriptor `id` at `len` bytes at `addr`, which the device writes if
    /// `device_writes` (else reads). The descriptor must belong to the driver (not published,
    /// or returned through the used ring).
    pub fn set_buffer(&mut self, id: u16, addr: u64, len: u32, device_writes: bool) {
        let flags = if device_writes { DESC_F_WRITE } else { 0 };
        let d = Descriptor { addr, len, flags, next: 0 };
        let i = usize::from(id) % N;
        // SAFETY: in bounds; the device does not read a descriptor the driver owns.
        unsafe { addr_of_mut!((*self.mem.as_ptr()).desc[i]).write_volatile(d) };
    }

    /// Hands descriptor `id` to the device.
    pub fn publish(&mut self, id: u16) {
        let slot = usize::from(self.next_avail) % N;
        let mem = self.mem.as_ptr();
        // SAFETY: in bounds. The ring entry is written before the index that covers it, with a
        // release fence between them, so the device never sees an index past a stale entry.
        unsafe {
            addr_of_mut!((*mem).avail.ring[slot]).write_volatile(id);
            fence(Ordering::Release);
            self.next_avail = self.next_avail.wrapping_add(1);
            addr_of_mut!((*mem).avail.idx).write_volatile(self.next_avail);
        }
        fence(Ordering::SeqCst);
    }

    /// The next chain the device has finished with, if any.
    pub fn pop_used(&mut self) -> Option<UsedElem> {
        let mem = self.mem.as_ptr();
        // SAFETY: in bounds. The index is read before the entries it covers (acquire fence).
        let idx = unsafe { addr_of!((*mem).used.idx).read_volatile() };
        if idx == self.last_used {
            return None;
        }
        fence(Ordering::Acquire);
        let slot = usize::from(self.last_used) % N;
        // SAFETY: in bounds; the device wrote this entry before it moved the index past it.
        let elem = unsafe { addr_of!((*mem).used.ring[slot]).read_volatile() };
        self.last_used = self.last_used.wrapping_add(1);
        Some(elem)
    }

    /// Whether the device asks not to be notified of new buffers now (it is polling or busy).
    pub fn notification_suppressed(&self) -> bool {
        fence(Ordering::SeqCst);
        // SAFETY: in bounds; a plain read of a flag the device writes.
        let flags = unsafe { addr_of!((*self.mem.as_ptr()).used.flags).read_volatile() };
        flags & USED_F_NO_NOTIFY != 0
    }

    /// Published chains the device has not returned yet.
    pub fn in_flight(&self) -> u16 {
        self.next_avail.wrapping_sub(self.last_used)
    }
}

/// The device's side of a queue, for host tests: takes what the driver published, writes into
/// it and returns it through the used ring, as a vhost-user daemon would.
#[cfg(test)]
pub mod device {
    use super::*;

    /// A simulated device over the driver's queue memory.
    #[derive(Debug)]
    pub struct Device<const N: usize> {
        mem: NonNull<QueueMemory<N>>,
        last_avail: u16,
        used_idx: u16,
    }

    impl<const N: usize> Device<N> {
        /// The device side of `queue`.
        pub fn of(queue: &SplitQueue<N>) -> Self {
            Self { mem: queue.mem, last_avail: 0, used_idx: 0 }
        }

        /// The next published buffer: (id, address, length, device writes).
        pub fn take(&mut self) -> Option<(u16, u64, u32, bool)> {
            let mem = self.mem.as_ptr();
            // SAFETY: test-only; the memory outlives the test (leaked) and indices are in bounds.
            unsafe {
                let idx = addr_of!((*mem).avail.idx).read_volatile();
                if idx == self.last_avail {
                    return None;
                }
                let id = addr_of!((*mem).avail.ring[usize::from(self.last_avail) % N]).read_volatile();
                self.last_avail = self.last_avail.wrapping_add(1);
                let d = addr_of!((*mem).desc[usize::from(id) % N]).read_volatile();
                Some((id, d.addr, d.len, d.flags & DESC_F_WRITE != 0))
            }
        }

        /// Returns buffer `id` with `len` bytes written.
        pub fn give_back(&mut self, id: u16, len: u32) {
            let mem = self.mem.as_ptr();
            // SAFETY: as in `take`.
            unsafe {
                addr_of_mut!((*mem).used.ring[usize::from(self.used_idx) % N])
                    .write_volatile(UsedElem { id: u32::from(id), len });
                self.used_idx = self.used_idx.wrapping_add(1);
                addr_of_mut!((*mem).used.idx).write_volatile(self.used_idx);
            }
        }

        /// Sets or clears `VIRTQ_USED_F_NO_NOTIFY`.
        pub fn suppress_notifications(&mut self, on: bool) {
            // SAFETY: as in `take`.
            unsafe { addr_of_mut!((*self.mem.as_ptr()).used.flags).write_volatile(u16::from(on)) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::device::Device;
    use super::*;
    use std::boxed::Box;

    fn queue<const N: usize>() -> SplitQueue<N> {
        SplitQueue::new(Box::leak(Box::new(QueueMemory::<N>::new())))
    }

    #[test]
    fn the_areas_follow_the_spec_layout_and_alignment() {
        let q = queue::<8>();
        let (desc, avail, used) = q.areas();
        assert_eq!(desc % 4096, 0);
        assert_eq!(avail, desc + 16 * 8);
        assert_eq!(used % 4, 0);
        assert!(used >= avail + 2 + 2 + 2 * 8 + 2);
        assert_eq!(q.size(), 8);
    }

    #[test]
    fn published_buffers_reach_the_device_in_order_and_come_back_with_their_length() {
        let mut q = queue::<4>();
        let mut dev = Device::of(&q);
        for id in 0..4u16 {
            q.set_buffer(id, 0x1000 * u64::from(id + 1), 100 + u32::from(id), id % 2 == 0);
            q.publish(id);
        }
        assert_eq!(q.in_flight(), 4);
        for id in 0..4u16 {
            assert_eq!(dev.take(), Some((id, 0x1000 * u64::from(id + 1), 100 + u32::from(id), id % 2 == 0)));
        }
        assert_eq!(dev.take(), None);
        assert_eq!(q.pop_used(), None);
        dev.give_back(2, 7);
        dev.give_back(0, 9);
        assert_eq!(q.pop_used(), Some(UsedElem { id: 2, len: 7 }));
        assert_eq!(q.pop_used(), Some(UsedElem { id: 0, len: 9 }));
        assert_eq!(q.pop_used(), None);
        assert_eq!(q.in_flight(), 2);
    }

    #[test]
    fn indices_wrap_past_2_16_without_losing_an_entry() {
        let mut q = queue::<2>();
        let mut dev = Device::of(&q);
        for round in 0..70_000u32 {
            let id = (round % 2) as u16;
            q.set_buffer(id, u64::from(round), 1, true);
            q.publish(id);
            let (got, addr, _, _) = dev.take().expect("published");
            assert_eq!((got, addr), (id, u64::from(round)));
            dev.give_back(got, round % 13);
            assert_eq!(q.pop_used(), Some(UsedElem { id: u32::from(id), len: round % 13 }));
        }
        assert_eq!(q.in_flight(), 0);
    }

    #[test]
    fn the_device_can_ask_for_no_notifications() {
        let q = queue::<2>();
        let mut dev = Device::of(&q);
        assert!(!q.notification_suppressed());
        dev.suppress_notifications(true);
        assert!(q.notification_suppressed());
    }
}

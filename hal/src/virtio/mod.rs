//! virtio 1.x over PCI ("modern" only) and the virtio-vsock driver the image receives its
//! migration stream through.
//!
//! - [`pci`]: finding the device and its register regions in configuration space;
//! - [`queue`]: the split virtqueue;
//! - [`vsock`]: the socket device's receive side (its RX buffers are the agent's receive
//!   ring), transmit side and credit;
//! - this module: the common configuration registers and the device's bring-up.
//!
//! The driver polls: no interrupt is configured (the image polls COM1 the same way, and the
//! local APIC timer bounds how long a running guest keeps the loop away).

pub mod pci;
pub mod queue;
pub mod vsock;

use core::ptr::{addr_of, addr_of_mut};

use pci::{ConfigSpace, PciError};
use queue::{QueueMemory, SplitQueue};
use vsock::{Notify, Rx, RxBuffer, Tx, TxBuffer, RX_QUEUE_LEN, TX_QUEUE_LEN};

/// PCI vendor id of virtio devices.
pub const VENDOR: u16 = 0x1af4;
/// PCI device id of a modern (1.x) socket device: 0x1040 + device type 19.
pub const VSOCK_DEVICE: u16 = 0x1053;
/// Feature bit: virtio 1.x (`VIRTIO_F_VERSION_1`). The only one the driver takes.
const F_VERSION_1: u64 = 1 << 32;

/// Device status bits.
const ACKNOWLEDGE: u8 = 1;
const DRIVER: u8 = 2;
const DRIVER_OK: u8 = 4;
const FEATURES_OK: u8 = 8;
const FAILED: u8 = 128;

/// `struct virtio_pci_common_cfg`.
#[repr(C)]
#[derive(Debug)]
struct CommonCfg {
    device_feature_select: u32,
    device_feature: u32,
    driver_feature_select: u32,
    driver_feature: u32,
    msix_config: u16,
    num_queues: u16,
    device_status: u8,
    config_generation: u8,
    queue_select: u16,
    queue_size: u16,
    queue_msix_vector: u16,
    queue_enable: u16,
    queue_notify_off: u16,
    queue_desc: u64,
    queue_driver: u64,
    queue_device: u64,
}

const _: () = {
    use core::mem::offset_of;
    assert!(offset_of!(CommonCfg, device_status) == 20 && offset_of!(CommonCfg, queue_select) == 22);
    assert!(offset_of!(CommonCfg, queue_notify_off) == 30 && offset_of!(CommonCfg, queue_desc) == 32);
    assert!(offset_of!(CommonCfg, queue_device) == 48);
};

/// Volatile reads and writes of one register of the common configuration.
macro_rules! reg {
    ($self:ident . $field:ident) => {
        // SAFETY: `Common::new`'s caller guarantees the registers are mapped at this address.
        unsafe { addr_of!((*$self.0).$field).read_volatile() }
    };
    ($self:ident . $field:ident = $value:expr) => {
        // SAFETY: as above; the field is a device register, writing it has no effect on
        // memory but what the driver set up for the device.
        unsafe { addr_of_mut!((*$self.0).$field).write_volatile($value) }
    };
}

/// The common configuration registers.
#[derive(Debug)]
struct Common(*mut CommonCfg);

impl Common {
    fn status(&self) -> u8 {
        reg!(self.device_status)
    }

    fn set_status(&self, s: u8) {
        reg!(self.device_status = s);
    }

    fn device_features(&self) -> u64 {
        reg!(self.device_feature_select = 0);
        let low = u64::from(reg!(self.device_feature));
        reg!(self.device_feature_select = 1);
        low | u64::from(reg!(self.device_feature)) << 32
    }

    fn set_driver_features(&self, f: u64) {
        reg!(self.driver_feature_select = 0);
        reg!(self.driver_feature = f as u32);
        reg!(self.driver_feature_select = 1);
        reg!(self.driver_feature = (f >> 32) as u32);
    }

    /// Sets queue `index` up over `queue`; returns its `queue_notify_off`.
    fn queue<const N: usize>(&self, index: u16, queue: &SplitQueue<N>) -> Result<u16, BringUpError> {
        reg!(self.queue_select = index);
        let max = reg!(self.queue_size);
        if max < queue.size() {
            return Err(BringUpError::QueueTooSmall { queue: index, max });
        }
        let (desc, driver, device) = queue.areas();
        reg!(self.queue_size = queue.size());
        reg!(self.queue_msix_vector = 0xffff);
        reg!(self.queue_desc = desc);
        reg!(self.queue_driver = driver);
        reg!(self.queue_device = device);
        reg!(self.queue_enable = 1);
        Ok(reg!(self.queue_notify_off))
    }
}

/// Notifications by a 16-bit write of the queue index to its notification address.
#[derive(Clone, Copy, Debug)]
pub struct MmioNotify {
    /// Notification address of queues 0, 1, 2.
    addr: [u64; 3],
}

impl Notify for MmioNotify {
    fn notify(&mut self, queue: u16) {
        if let Some(&a) = self.addr.get(usize::from(queue)) {
            // SAFETY: `bring_up` computed the address inside the device's notification region,
            // which its caller guaranteed is mapped; the write only kicks the device.
            unsafe { (a as *mut u16).write_volatile(queue) };
        }
    }
}

/// Why the device could not be brought up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BringUpError {
    /// No function 1af4:1053.
    NotFound,
    /// Its configuration space is not what a virtio 1.x device has.
    Pci(PciError),
    /// The device lacks `VIRTIO_F_VERSION_1` (a legacy device).
    NotModern,
    /// The device did not accept the features.
    FeaturesRefused,
    /// A queue is smaller than the driver's.
    QueueTooSmall {
        /// Which.
        queue: u16,
        /// Its maximum size.
        max: u16,
    },
}

/// The memory the driver needs, all of it `'static` and reachable by the device at its
/// address (identity-mapped RAM).
#[derive(Debug)]
pub struct VsockMemory {
    /// RX queue.
    pub rx_queue: &'static mut QueueMemory<RX_QUEUE_LEN>,
    /// RX buffers.
    pub rx_buffers: &'static mut [RxBuffer; RX_QUEUE_LEN],
    /// TX queue.
    pub tx_queue: &'static mut QueueMemory<TX_QUEUE_LEN>,
    /// TX buffers.
    pub tx_buffers: &'static mut [TxBuffer; TX_QUEUE_LEN],
    /// Event queue (4 entries) and its buffers.
    pub event_queue: &'static mut QueueMemory<4>,
    /// Event buffers (`struct virtio_vsock_event`, 4 bytes each; 8 for alignment).
    pub event_buffers: &'static mut [u64; 4],
}

/// The live device.
#[derive(Debug)]
pub struct VsockDevice {
    /// Receive side.
    pub rx: Rx<MmioNotify>,
    /// Transmit side and the connection.
    pub tx: Tx<MmioNotify>,
    /// Where the device is.
    pub bdf: pci::Bdf,
    /// The common configuration's address (for the log).
    pub common: u64,
    /// Our CID, from the device configuration.
    pub guest_cid: u64,
}

/// Finds the virtio-vsock device, negotiates `VIRTIO_F_VERSION_1`, sets the three queues up
/// over `mem`, and sets DRIVER_OK; connections are then accepted on `listen`. Register
/// regions must lie below `mapped` (what the caller maps 1:1).
///
/// # Safety
///
/// Physical addresses below `mapped` are mapped at the same virtual addresses (uncached or
/// emulated where the device's BARs are), and nothing else drives the device.
pub unsafe fn bring_up(
    cfg: &mut impl ConfigSpace,
    mem: VsockMemory,
    listen: &'static [u32],
    mapped: u64,
) -> Result<VsockDevice, BringUpError> {
    let bdf = pci::find(cfg, VENDOR, VSOCK_DEVICE).ok_or(BringUpError::NotFound)?;
    let regions = pci::virtio_regions(cfg, bdf).map_err(BringUpError::Pci)?;
    let mut base = |r: pci::Region| {
        let at = pci::bar_address(cfg, bdf, r.bar)? + u64::from(r.offset);
        if at + u64::from(r.len) > mapped {
            return Err(PciError::BadBar(r.bar));
        }
        Ok(at)
    };
    let common_addr = base(regions.common).map_err(BringUpError::Pci)?;
    let notify_base = base(regions.notify).map_err(BringUpError::Pci)?;
    let device_cfg = base(regions.device).map_err(BringUpError::Pci)?;
    pci::enable(cfg, bdf);
    let common = Common(common_addr as *mut CommonCfg);
    common.set_status(0);
    while common.status() != 0 {
        core::hint::spin_loop();
    }
    common.set_status(ACKNOWLEDGE);
    common.set_status(ACKNOWLEDGE | DRIVER);
    if common.device_features() & F_VERSION_1 == 0 {
        common.set_status(FAILED);
        return Err(BringUpError::NotModern);
    }
    common.set_driver_features(F_VERSION_1);
    common.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
    if common.status() & FEATURES_OK == 0 {
        common.set_status(FAILED);
        return Err(BringUpError::FeaturesRefused);
    }
    // SAFETY: the device configuration of a socket device starts with its le64 guest_cid.
    let guest_cid = unsafe { (device_cfg as *const u64).read_volatile() };
    let mut addr = [0u64; 3];
    let notify_at = |off: u16| notify_base + u64::from(off) * u64::from(regions.notify_multiplier);
    // Both sides need the addresses before the queues exist: they are filled below, before
    // the first notification (`rx.kick`, after DRIVER_OK).
    let mut rx = Rx::new(mem.rx_queue, mem.rx_buffers, listen, MmioNotify { addr });
    let tx_queue = mem.tx_queue;
    let event = SplitQueue::new(mem.event_queue);
    addr[0] = notify_at(common.queue(vsock::RX_QUEUE, rx.queue())?);
    let mut tx = Tx::new(tx_queue, mem.tx_buffers, MmioNotify { addr }, guest_cid);
    addr[1] = notify_at(common.queue(vsock::TX_QUEUE, tx.queue())?);
    let mut event = event;
    for (i, b) in mem.event_buffers.iter_mut().enumerate() {
        event.set_buffer(i as u16, b as *mut u64 as u64, 8, true);
        event.publish(i as u16);
    }
    // Events (a transport reset after a live migration of *this* machine) are not read: the
    // image is not migrated itself. The buffers are there because the device expects some.
    addr[2] = notify_at(common.queue(vsock::EVENT_QUEUE, &event)?);
    rx.set_notify(MmioNotify { addr });
    tx.set_notify(MmioNotify { addr });
    common.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    MmioNotify { addr }.notify(vsock::EVENT_QUEUE);
    rx.kick();
    Ok(VsockDevice { rx, tx, bdf, common: common_addr, guest_cid })
}

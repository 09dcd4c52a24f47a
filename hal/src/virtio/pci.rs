//! Finding a virtio 1.x PCI device and its register regions (virtio 1.x, "Virtio Over PCI
//! Bus"): the vendor-specific capabilities (id 0x09) name, for the common configuration, the
//! notification area, the ISR and the device configuration, a BAR and an offset in it.
//!
//! Configuration space is read through [`ConfigSpace`] so that the parsing runs in host tests
//! over a fake configuration space; the image uses [`PortIo`] (mechanism #1, ports
//! 0xCF8/0xCFC).

/// A PCI function's address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bdf {
    /// Bus.
    pub bus: u8,
    /// Device (0..32).
    pub device: u8,
    /// Function (0..8).
    pub function: u8,
}

/// Reads and writes of PCI configuration space, 32 bits at a time (`offset` 4-aligned).
pub trait ConfigSpace {
    /// Reads the dword at `offset`.
    fn read32(&mut self, at: Bdf, offset: u8) -> u32;
    /// Writes the dword at `offset`.
    fn write32(&mut self, at: Bdf, offset: u8, value: u32);
}

/// What can be wrong with the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PciError {
    /// A capability the driver needs is missing (its `cfg_type`).
    MissingCapability(u8),
    /// A capability names a BAR that is not a memory BAR or is not assigned.
    BadBar(u8),
    /// The capability list loops or leaves the header.
    BadCapabilityList,
}

/// A register region: BAR index and offset into it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Region {
    /// The BAR (0..6).
    pub bar: u8,
    /// Offset in the BAR.
    pub offset: u32,
    /// Length.
    pub len: u32,
}

/// The regions of a virtio 1.x PCI device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioRegions {
    /// `VIRTIO_PCI_CAP_COMMON_CFG`.
    pub common: Region,
    /// `VIRTIO_PCI_CAP_NOTIFY_CFG`.
    pub notify: Region,
    /// Bytes between two queues' notification addresses per unit of `queue_notify_off`.
    pub notify_multiplier: u32,
    /// `VIRTIO_PCI_CAP_DEVICE_CFG`.
    pub device: Region,
}

const CAP_VENDOR: u8 = 0x09;
const COMMON_CFG: u8 = 1;
const NOTIFY_CFG: u8 = 2;
const DEVICE_CFG: u8 = 4;
/// Status register bit 4: the function has a capability list.
const STATUS_CAP_LIST: u32 = 1 << 20;
/// Command register: memory space, bus master.
const COMMAND_MEMORY: u32 = 1 << 1;
const COMMAND_BUS_MASTER: u32 = 1 << 2;

fn byte(cfg: &mut impl ConfigSpace, at: Bdf, offset: u8) -> u8 {
    (cfg.read32(at, offset & !3) >> (8 * (offset & 3))) as u8
}

/// The first function with this vendor and device id.
pub fn find(cfg: &mut impl ConfigSpace, vendor: u16, device: u16) -> Option<Bdf> {
    for bus in 0..=255u8 {
        for dev in 0..32u8 {
            for function in 0..8u8 {
                let at = Bdf { bus, device: dev, function };
                let id = cfg.read32(at, 0);
                if id & 0xffff == 0xffff {
                    if function == 0 {
                        break;
                    }
                    continue;
                }
                if id == u32::from(vendor) | u32::from(device) << 16 {
                    return Some(at);
                }
                // Functions 1-7 exist only on a multi-function device (header type bit 7).
                if function == 0 && byte(cfg, at, 0x0e) & 0x80 == 0 {
                    break;
                }
            }
        }
    }
    None
}

/// Reads the virtio capabilities of `at`.
pub fn virtio_regions(cfg: &mut impl ConfigSpace, at: Bdf) -> Result<VirtioRegions, PciError> {
    if cfg.read32(at, 0x04) & STATUS_CAP_LIST == 0 {
        return Err(PciError::MissingCapability(COMMON_CFG));
    }
    let (mut common, mut notify, mut device) = (None, None, None);
    let mut multiplier = 0;
    let mut next = byte(cfg, at, 0x34) & !3;
    let mut seen = 0;
    while next != 0 {
        seen += 1;
        if next < 0x40 || seen > 48 {
            return Err(PciError::BadCapabilityList);
        }
        let head = cfg.read32(at, next);
        let (id, link, kind) = (head as u8, (head >> 8) as u8, (head >> 24) as u8);
        if id == CAP_VENDOR {
            let region = Region {
                bar: cfg.read32(at, next + 4) as u8,
                offset: cfg.read32(at, next + 8),
                len: cfg.read32(at, next + 12),
            };
            match kind {
                COMMON_CFG if common.is_none() => common = Some(region),
                NOTIFY_CFG if notify.is_none() => {
                    notify = Some(region);
                    multiplier = cfg.read32(at, next + 16);
                }
                DEVICE_CFG if device.is_none() => device = Some(region),
                _ => {}
            }
        }
        next = link & !3;
    }
    Ok(VirtioRegions {
        common: common.ok_or(PciError::MissingCapability(COMMON_CFG))?,
        notify: notify.ok_or(PciError::MissingCapability(NOTIFY_CFG))?,
        notify_multiplier: multiplier,
        device: device.ok_or(PciError::MissingCapability(DEVICE_CFG))?,
    })
}

/// The address a memory BAR was assigned (32 or 64 bits wide).
pub fn bar_address(cfg: &mut impl ConfigSpace, at: Bdf, bar: u8) -> Result<u64, PciError> {
    if bar > 5 {
        return Err(PciError::BadBar(bar));
    }
    let offset = 0x10 + 4 * bar;
    let low = cfg.read32(at, offset);
    if low & 1 != 0 {
        return Err(PciError::BadBar(bar));
    }
    let base = u64::from(low & !0xf);
    let addr = match (low >> 1) & 3 {
        0 => base,
        2 if bar < 5 => base | u64::from(cfg.read32(at, offset + 4)) << 32,
        _ => return Err(PciError::BadBar(bar)),
    };
    if addr == 0 {
        return Err(PciError::BadBar(bar));
    }
    Ok(addr)
}

/// Turns on memory decoding and bus mastering (the device reads and writes our queues).
pub fn enable(cfg: &mut impl ConfigSpace, at: Bdf) {
    let command = cfg.read32(at, 0x04) & 0xffff;
    cfg.write32(at, 0x04, command | COMMAND_MEMORY | COMMAND_BUS_MASTER);
}

/// Configuration mechanism #1: address to port 0xCF8, data at 0xCFC.
#[cfg(all(target_arch = "x86_64", target_os = "none"))]
#[derive(Debug)]
pub struct PortIo(());

#[cfg(all(target_arch = "x86_64", target_os = "none"))]
impl PortIo {
    /// The configuration ports.
    ///
    /// # Safety
    ///
    /// Nothing else uses ports 0xCF8/0xCFC meanwhile (the address/data pair is not atomic),
    /// and the caller runs at CPL 0.
    pub unsafe fn new() -> Self {
        PortIo(())
    }

    fn address(at: Bdf, offset: u8) -> u32 {
        1 << 31
            | u32::from(at.bus) << 16
            | u32::from(at.device & 31) << 11
            | u32::from(at.function & 7) << 8
            | u32::from(offset & !3)
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "none"))]
impl ConfigSpace for PortIo {
    fn read32(&mut self, at: Bdf, offset: u8) -> u32 {
        // SAFETY: `new`'s caller owns the two ports; reading configuration space has no
        // effect on memory.
        unsafe {
            crate::cpu::outl(0xcf8, Self::address(at, offset));
            crate::cpu::inl(0xcfc)
        }
    }

    fn write32(&mut self, at: Bdf, offset: u8, value: u32) {
        // SAFETY: as in `read32`; the writes the drivers make (command register) enable the
        // device's own memory decoding and DMA into buffers the driver set up.
        unsafe {
            crate::cpu::outl(0xcf8, Self::address(at, offset));
            crate::cpu::outl(0xcfc, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Configuration space of some functions; absent functions read all ones.
    #[derive(Default)]
    struct Fake(BTreeMap<(u8, u8, u8), [u8; 256]>);

    impl Fake {
        fn put(&mut self, at: Bdf, offset: usize, bytes: &[u8]) {
            let space = self.0.entry((at.bus, at.device, at.function)).or_insert([0; 256]);
            space[offset..offset + bytes.len()].copy_from_slice(bytes);
        }
    }

    impl ConfigSpace for Fake {
        fn read32(&mut self, at: Bdf, offset: u8) -> u32 {
            match self.0.get(&(at.bus, at.device, at.function)) {
                Some(s) => {
                    let o = usize::from(offset & !3);
                    u32::from_le_bytes([s[o], s[o + 1], s[o + 2], s[o + 3]])
                }
                None => u32::MAX,
            }
        }
        fn write32(&mut self, at: Bdf, offset: u8, value: u32) {
            self.put(at, usize::from(offset), &value.to_le_bytes());
        }
    }

    const VSOCK: Bdf = Bdf { bus: 0, device: 4, function: 0 };

    /// A virtio-vsock function as QEMU lays it out: BAR 4 (64-bit) at 0xfebf_0000 and the
    /// capabilities chained from 0x40 (an MSI-X one first).
    fn qemu_like() -> Fake {
        let mut f = Fake::default();
        f.put(Bdf { bus: 0, device: 0, function: 0 }, 0, &[0x86, 0x80, 0x37, 0x12]);
        f.put(VSOCK, 0, &[0xf4, 0x1a, 0x53, 0x10]);
        f.put(VSOCK, 0x04, &[0x00, 0x00, 0x10, 0x00]);
        f.put(VSOCK, 0x20, &(0xfebf_0000u32 | 0b1100).to_le_bytes());
        f.put(VSOCK, 0x24, &0u32.to_le_bytes());
        f.put(VSOCK, 0x34, &[0x98]);
        let cap = |kind: u8, next: u8, offset: u32, len: u32| {
            let mut c = [0u8; 20];
            c[..4].copy_from_slice(&[0x09, next, 16, kind]);
            c[4] = 4;
            c[8..12].copy_from_slice(&offset.to_le_bytes());
            c[12..16].copy_from_slice(&len.to_le_bytes());
            c
        };
        f.put(VSOCK, 0x98, &[0x11, 0x80, 0, 0]);
        f.put(VSOCK, 0x80, &cap(1, 0x68, 0x0000, 0x1000));
        f.put(VSOCK, 0x68, &cap(3, 0x50, 0x1000, 0x1000));
        f.put(VSOCK, 0x50, &cap(4, 0xa0, 0x2000, 0x1000));
        let mut notify = cap(2, 0x00, 0x3000, 0x1000);
        notify[16..20].copy_from_slice(&4u32.to_le_bytes());
        f.put(VSOCK, 0xa0, &notify);
        f
    }

    #[test]
    fn the_device_is_found_past_other_functions() {
        let mut f = qemu_like();
        assert_eq!(find(&mut f, 0x1af4, 0x1053), Some(VSOCK));
        assert_eq!(find(&mut f, 0x1af4, 0x1041), None);
    }

    #[test]
    fn the_capabilities_give_each_region_and_the_notify_multiplier() {
        let mut f = qemu_like();
        let r = virtio_regions(&mut f, VSOCK).expect("regions");
        assert_eq!(r.common, Region { bar: 4, offset: 0, len: 0x1000 });
        assert_eq!(r.device, Region { bar: 4, offset: 0x2000, len: 0x1000 });
        assert_eq!(r.notify, Region { bar: 4, offset: 0x3000, len: 0x1000 });
        assert_eq!(r.notify_multiplier, 4);
        assert_eq!(bar_address(&mut f, VSOCK, 4), Ok(0xfebf_0000));
    }

    #[test]
    fn a_missing_capability_or_a_looping_list_is_an_error() {
        let mut f = qemu_like();
        f.put(VSOCK, 0x50, &[0x09, 0xa0, 16, 9]);
        assert_eq!(virtio_regions(&mut f, VSOCK), Err(PciError::MissingCapability(DEVICE_CFG)));
        let mut f = qemu_like();
        f.put(VSOCK, 0xa0, &[0x09, 0x80, 16, 2]);
        assert_eq!(virtio_regions(&mut f, VSOCK), Err(PciError::BadCapabilityList));
    }

    #[test]
    fn io_and_unassigned_bars_are_refused() {
        let mut f = qemu_like();
        f.put(VSOCK, 0x10, &1u32.to_le_bytes());
        assert_eq!(bar_address(&mut f, VSOCK, 0), Err(PciError::BadBar(0)));
        assert_eq!(bar_address(&mut f, VSOCK, 1), Err(PciError::BadBar(1)));
    }

    #[test]
    fn enabling_sets_memory_and_bus_master() {
        let mut f = qemu_like();
        enable(&mut f, VSOCK);
        assert_eq!(f.read32(VSOCK, 4) & 0x6, 0x6);
    }
}

//! Physical memory of the image (physical = virtual: the boot code maps 4 GiB 1:1).
//!
//! | range | what |
//! |---|---|
//! | 1 MiB .. `__image_end` | the image: code, data, stacks, boot page tables, the nested page table slab, the SVM pages |
//! | [`FRAMES_BASE`] .. + [`FRAMES_LEN`] | guest RAM frames, block after block, each 2 MiB aligned |
//!
//! The emulator must give the machine at least `FRAMES_BASE + FRAMES_LEN` of RAM.

use hal::stage2::TablePage;

/// Host-physical start of the guest frames.
pub const FRAMES_BASE: u64 = 64 << 20;
/// Bytes of guest frames.
pub const FRAMES_LEN: u64 = 128 << 20;
/// Nested page table pages: enough to map all of [`FRAMES_LEN`] with 4 KiB pages, wherever it
/// sits below 4 GiB (one table per 2 MiB, plus the upper levels).
pub const TABLE_PAGES: usize = (FRAMES_LEN / (2 << 20)) as usize + 16;

/// The nested page table slab.
pub static mut TABLE_SLAB: [TablePage; TABLE_PAGES] = [const { TablePage::new() }; TABLE_PAGES];

/// The bytes of guest frames at host-physical `hpa`, `len` long.
///
/// # Safety
///
/// `[hpa, hpa + len)` lies inside the guest frames, and nothing else (no vCPU: the page is not
/// mapped for the guest, or the guest does not run) accesses it while the slice lives.
pub unsafe fn frames_mut(hpa: u64, len: usize) -> &'static mut [u8] {
    assert!(hpa >= FRAMES_BASE && hpa + len as u64 <= FRAMES_BASE + FRAMES_LEN, "outside the guest frames");
    // SAFETY: inside the frames (checked), which the image maps 1:1 and uses for nothing else;
    // the caller guarantees exclusive access.
    unsafe { core::slice::from_raw_parts_mut(hpa as *mut u8, len) }
}

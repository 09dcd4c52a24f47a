//! Host memory for guest frames: anonymous mappings, as a VMM backs guest RAM.
//!
//! The hosted destination's frames live here, and the baselines allocate the same way, so
//! both sides pay the same memory costs. Every `unsafe` of this module is one system call
//! or one access to a mapping this module owns.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

/// The page size of host mappings (x86-64 base pages).
pub const PAGE: usize = 4096;

/// Converts a `-1`-on-error return value into an [`io::Result`].
fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A private anonymous read-write mapping, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a `Mapping` is plain memory it owns (no thread affinity). Its safe `&self` methods
// only read (`bytes`, `touch_read`); every `&self` method that writes is `unsafe`, and its
// caller excludes the races.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// `mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS |
    /// MAP_NORESERVE)`; `len` is rounded up to whole pages.
    pub fn anon(len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::other("empty mapping"));
        }
        let len = len.div_ceil(PAGE) * PAGE;
        // SAFETY: a fresh anonymous mapping at an address the kernel picks aliases no
        // existing memory.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { ptr: ptr.cast(), len })
    }

    /// The start address.
    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }

    /// The length in bytes (whole pages).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true: [`Mapping::anon`] refuses an empty mapping.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The contents. On a userfaultfd-registered mapping, call this only once every page
    /// is populated (a missing page would block until someone resolves it).
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr..ptr+len` is our live read-write mapping; the kernel changes it
        // only through `&mut self` methods (madvise) or by filling missing pages, which
        // no reference covers before they exist.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The contents, writable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// `len` bytes at `offset`, writable, through a shared reference (the hosted
    /// destination's frames are shared with the vCPU threads).
    ///
    /// # Safety
    ///
    /// Nothing else reads or writes `offset..offset + len` while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, offset: usize, len: usize) -> &mut [u8] {
        assert!(offset.checked_add(len).is_some_and(|end| end <= self.len), "slice out of range");
        // SAFETY: the range lies inside our live mapping; the caller guarantees it is not
        // accessed otherwise while the slice lives.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(offset), len) }
    }

    /// The `u64` at `offset` (8-byte aligned), as a vCPU reads guest memory.
    ///
    /// # Safety
    ///
    /// No non-atomic write to these 8 bytes (a [`Self::slice_mut`] slice, `bytes_mut`) runs
    /// concurrently.
    pub unsafe fn load_u64(&self, offset: usize) -> u64 {
        // SAFETY: `word` checks range and alignment; the caller excludes non-atomic races.
        unsafe { AtomicU64::from_ptr(self.word(offset)) }.load(Ordering::Relaxed)
    }

    /// Stores `value` at `offset` (8-byte aligned), as a vCPU writes guest memory.
    ///
    /// # Safety
    ///
    /// No other non-atomic access to these 8 bytes (a slice from [`Self::bytes`],
    /// [`Self::slice_mut`], `bytes_mut`) runs concurrently.
    pub unsafe fn store_u64(&self, offset: usize, value: u64) {
        // SAFETY: as in `load_u64`.
        unsafe { AtomicU64::from_ptr(self.word(offset)) }.store(value, Ordering::Relaxed)
    }

    /// The aligned word at `offset`, checked to lie inside the mapping.
    fn word(&self, offset: usize) -> *mut u64 {
        assert!(offset.is_multiple_of(8) && offset + 8 <= self.len, "word out of range");
        // SAFETY: in bounds (checked above) of our live mapping.
        unsafe { self.ptr.add(offset).cast() }
    }

    /// Reads the `u64` at `offset` with a volatile load: the "touch" of a page.
    pub fn touch_read(&self, offset: usize) -> u64 {
        assert!(offset.is_multiple_of(8) && offset + 8 <= self.len, "touch out of range");
        // SAFETY: the address is inside our mapping and 8-byte aligned (the mapping is
        // page aligned); a volatile load is exactly one access the compiler keeps.
        unsafe { std::ptr::read_volatile(self.ptr.add(offset).cast::<u64>()) }
    }

    /// `madvise(addr + offset, len, advice)` for `MADV_DONTNEED` / `MADV_NOHUGEPAGE`
    /// (anything that may change contents needs `&mut self`).
    pub fn madvise(&mut self, offset: usize, len: usize, advice: libc::c_int) -> io::Result<()> {
        if !offset.is_multiple_of(PAGE) || offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(io::Error::other(format!(
                "madvise range {offset:#x}+{len:#x} not page aligned or outside the mapping"
            )));
        }
        // SAFETY: the range lies inside our mapping and `&mut self` guarantees no
        // reference to its contents is alive, so zeroing (DONTNEED) is unobservable.
        let ret = unsafe { libc::madvise(self.ptr.add(offset).cast(), len, advice) };
        check(ret.into()).map(drop)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we own the mapping and no reference to it outlives `self`.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

//! Host memory for guest frames: anonymous mappings, as a VMM backs guest RAM.
//!
//! The hosted destination's frames live here, and the baselines allocate the same way, so
//! both sides pay the same memory costs. Every `unsafe` of this module is one system call
//! or one access to a mapping this module owns.

use std::io;

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

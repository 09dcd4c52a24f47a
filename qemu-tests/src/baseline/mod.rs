//! Baseline measurements: what QEMU 7.2's own postcopy destination pays for the
//! operations our hypervisor-native destination replaces, measured on this machine, so
//! that benchmarks can compare against numbers rather than folklore.
//!
//! * [`uffd`]: a userfaultfd missing-page round trip (register MISSING, fault, handler
//!   thread `poll` + `read` + `UFFDIO_COPY` + wake), i.e. the cost of one postcopy page
//!   fault on QEMU's destination minus the network.
//! * [`madvise`]: `madvise(MADV_DONTNEED)` over a set of ranges, i.e. what a `RAM_DISCARD`
//!   costs QEMU's destination, with the standard "1 GiB in scattered 64 KiB runs" set.
//! * [`qemu_load`]: wall time and MB/s of QEMU 7.2 loading a recorded precopy stream with
//!   `-incoming defer` + `migrate-incoming exec:cat FILE`.
//! * [`stats`]: p50/p99/min/mean over [`std::time::Duration`] samples.
//!
//! Std + `libc` only; every `unsafe` is in the private `sys` module, one system call per
//! wrapper. Nothing here asserts timing: benchmarks decide what is fast enough.

pub mod madvise;
pub mod qemu_load;
pub mod stats;
pub mod sys;
pub mod uffd;

/// The page size the measurements use.
pub const PAGE_SIZE: usize = sys::PAGE;

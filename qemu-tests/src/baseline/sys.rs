//! The system calls behind the baseline measurements, each in a tiny wrapper.
//!
//! Every `unsafe` of [`crate::baseline`] lives in this file (their memory is
//! [`crate::hosted::mem::Mapping`], the hosted destination's). The wrappers keep the
//! invariants local: the
//! ioctl wrappers take the exact `#[repr(C)]` struct their request number encodes, and
//! the caller only ever passes addresses of mappings it owns.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The page size every measurement uses (x86-64 base pages).
pub const PAGE: usize = 4096;

/// `_IOWR(type, nr, size)` of `<asm-generic/ioctl.h>`.
const fn iowr(ty: u64, nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (ty << 8) | nr
}

/// `_IO(type, nr)`.
const fn io(ty: u64, nr: u64) -> u64 {
    (ty << 8) | nr
}

/// `UFFDIO` (the userfaultfd ioctl type, 0xAA).
const UFFDIO: u64 = 0xAA;
/// `UFFD_API`.
pub const UFFD_API: u64 = 0xAA;
/// `UFFDIO_REGISTER_MODE_MISSING`.
pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
/// `UFFD_EVENT_PAGEFAULT`.
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// `_UFFDIO_COPY` bit in the `ioctls` mask returned by UFFDIO_REGISTER.
pub const UFFDIO_COPY_BIT: u64 = 1 << 0x03;
/// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd`.
const USERFAULTFD_IOC_NEW: u64 = io(UFFDIO, 0x00);

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioApi {
    /// `UFFD_API` in, the API version out.
    pub api: u64,
    /// Requested features in, supported features out.
    pub features: u64,
    /// Out: the ioctls the uffd supports.
    pub ioctls: u64,
}

/// `struct uffdio_register` (its `struct uffdio_range` inlined).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioRegister {
    /// Range start (page aligned).
    pub start: u64,
    /// Range length (page multiple).
    pub len: u64,
    /// `UFFDIO_REGISTER_MODE_*`.
    pub mode: u64,
    /// Out: the ioctls available on the range.
    pub ioctls: u64,
}

/// `struct uffdio_copy`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioCopy {
    /// Destination (page aligned, inside a registered range).
    pub dst: u64,
    /// Source (page aligned).
    pub src: u64,
    /// Length (page multiple).
    pub len: u64,
    /// `UFFDIO_COPY_MODE_*` (0: copy and wake).
    pub mode: u64,
    /// Out: bytes copied, or a negative errno.
    pub copy: i64,
}

/// `struct uffd_msg` as read from the uffd, for a page-fault event.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdMsg {
    /// `UFFD_EVENT_*`.
    pub event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    /// `pagefault.flags`.
    pub flags: u64,
    /// `pagefault.address`.
    pub address: u64,
    /// `pagefault.feat` (thread id when requested).
    pub feat: u64,
}

const UFFDIO_API: u64 = iowr(UFFDIO, 0x3F, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = iowr(UFFDIO, 0x00, std::mem::size_of::<UffdioRegister>());
const UFFDIO_COPY: u64 = iowr(UFFDIO, 0x03, std::mem::size_of::<UffdioCopy>());

/// Converts a `-1`-on-error return value into an [`io::Result`].
fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Wraps a file descriptor number the kernel just returned.
fn owned(fd: libc::c_long) -> io::Result<OwnedFd> {
    let fd = check(fd)?;
    let fd = libc::c_int::try_from(fd).map_err(|_| io::Error::other("fd out of range"))?;
    // SAFETY: `fd` was just returned by the kernel as a new descriptor of this process
    // and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A new userfaultfd (`O_CLOEXEC | O_NONBLOCK`, as QEMU opens it): the `userfaultfd`
/// system call, or `/dev/userfaultfd` + `USERFAULTFD_IOC_NEW` if the system call is
/// refused (unprivileged use with `vm.unprivileged_userfaultfd = 0`).
pub fn userfaultfd() -> io::Result<OwnedFd> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: userfaultfd(2) takes one integer argument and touches no memory of ours.
    let ret = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    match owned(ret) {
        Ok(fd) => Ok(fd),
        Err(first) => {
            let dev =
                std::fs::OpenOptions::new().read(true).write(true).open("/dev/userfaultfd").map_err(|e| {
                    io::Error::other(format!("userfaultfd(2) failed ({first}) and /dev/userfaultfd: {e}"))
                })?;
            // SAFETY: USERFAULTFD_IOC_NEW takes the new uffd's flags as an integer
            // argument and touches no memory of ours.
            let ret = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
            owned(ret.into())
        }
    }
}

/// `ioctl(fd, UFFDIO_API, arg)`.
pub fn uffdio_api(fd: &OwnedFd, arg: &mut UffdioApi) -> io::Result<()> {
    // SAFETY: UFFDIO_API reads and writes exactly one `struct uffdio_api`, which
    // `UffdioApi` mirrors (`#[repr(C)]`, same size as encoded in the request number).
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, arg as *mut UffdioApi) };
    check(ret.into()).map(drop)
}

/// `ioctl(fd, UFFDIO_REGISTER, arg)`.
pub fn uffdio_register(fd: &OwnedFd, arg: &mut UffdioRegister) -> io::Result<()> {
    // SAFETY: UFFDIO_REGISTER reads and writes exactly one `struct uffdio_register`,
    // which `UffdioRegister` mirrors. Registering only changes how future faults on the
    // range are served; the kernel checks the range is a mapping of this process.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_REGISTER as _, arg as *mut UffdioRegister) };
    check(ret.into()).map(drop)
}

/// `ioctl(fd, UFFDIO_COPY, arg)`: fills the *missing* pages at `arg.dst` with a copy of
/// `arg.src` and wakes the threads waiting on them.
pub fn uffdio_copy(fd: &OwnedFd, arg: &mut UffdioCopy) -> io::Result<()> {
    // SAFETY: UFFDIO_COPY reads and writes one `struct uffdio_copy`, which `UffdioCopy`
    // mirrors. The kernel only reads `src` (checking it is mapped) and only fills pages
    // of `dst` that are missing in a range registered on this uffd, so no memory that
    // Rust code can already see changes.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_COPY as _, arg as *mut UffdioCopy) };
    check(ret.into()).map(drop)
}

/// Waits up to `timeout_ms` for `fd` to become readable (`poll`, as QEMU's fault
/// thread does). True if it is readable.
pub fn poll_readable(fd: &OwnedFd, timeout_ms: i32) -> io::Result<bool> {
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: poll(2) reads and writes the one `pollfd` we pass, which lives on our
    // stack for the whole call.
    let ret = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    match check(ret.into()) {
        Ok(n) => Ok(n > 0 && pfd.revents & libc::POLLIN != 0),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(false),
        Err(e) => Err(e),
    }
}

/// Reads one `uffd_msg` from a non-blocking uffd; `None` if there is none.
pub fn read_uffd_msg(fd: &OwnedFd) -> io::Result<Option<UffdMsg>> {
    let mut msg = UffdMsg::default();
    let size = std::mem::size_of::<UffdMsg>();
    // SAFETY: read(2) writes at most `size` bytes into `msg`, which is exactly `size`
    // bytes long, and every bit pattern is a valid `UffdMsg` (integers only).
    let ret = unsafe { libc::read(fd.as_raw_fd(), (&mut msg as *mut UffdMsg).cast(), size) };
    match check(ret as libc::c_long) {
        Ok(n) if n as usize == size => Ok(Some(msg)),
        Ok(n) => Err(io::Error::other(format!("short uffd_msg read: {n} bytes"))),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
        Err(e) => Err(e),
    }
}

/// Restricts the calling thread to CPU `cpu` (`cpu` < 1024).
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    set_current_thread_cpus(&[cpu])
}

/// Restricts the calling thread to `cpus` (`sched_setaffinity(0, ...)`; each < 1024).
pub fn set_current_thread_cpus(cpus: &[usize]) -> io::Result<()> {
    let mut mask = [0u64; 16];
    for &cpu in cpus {
        *mask.get_mut(cpu / 64).ok_or_else(|| io::Error::other("cpu index too large"))? |= 1 << (cpu % 64);
    }
    // SAFETY: sched_setaffinity(2) reads `size_of_val(&mask)` bytes of `mask`, which lives
    // across the call; pid 0 is the calling thread.
    let ret =
        unsafe { libc::syscall(libc::SYS_sched_setaffinity, 0, std::mem::size_of_val(&mask), mask.as_ptr()) };
    check(ret).map(drop)
}

/// `struct perf_event_attr`, first version (`PERF_ATTR_SIZE_VER0`, 64 bytes).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct PerfEventAttr {
    ty: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
}

const PERF_TYPE_HARDWARE: u32 = 0;
const PERF_COUNT_HW_INSTRUCTIONS: u64 = 1;
const PERF_FLAG_DISABLED: u64 = 1 << 0;
const PERF_FLAG_EXCLUDE_HV: u64 = 1 << 6;
const PERF_EVENT_IOC_ENABLE: u64 = io(b'$' as u64, 0);
const PERF_EVENT_IOC_DISABLE: u64 = io(b'$' as u64, 1);

/// A hardware instruction counter for the calling thread, user + kernel, created
/// disabled (`perf_event_open(PERF_COUNT_HW_INSTRUCTIONS, pid 0, cpu -1)`).
#[derive(Debug)]
pub struct InstructionCounter {
    file: File,
}

impl InstructionCounter {
    /// Opens the counter; fails where the machine exposes no PMU (many VMs).
    pub fn new() -> io::Result<Self> {
        let attr = PerfEventAttr {
            ty: PERF_TYPE_HARDWARE,
            size: std::mem::size_of::<PerfEventAttr>() as u32,
            config: PERF_COUNT_HW_INSTRUCTIONS,
            flags: PERF_FLAG_DISABLED | PERF_FLAG_EXCLUDE_HV,
            ..Default::default()
        };
        // SAFETY: perf_event_open(2) reads `attr.size` bytes of `attr`, which is that
        // long and lives across the call; pid 0 / cpu -1 / group -1 / flags 0.
        let ret =
            unsafe { libc::syscall(libc::SYS_perf_event_open, &attr as *const PerfEventAttr, 0, -1, -1, 0) };
        Ok(InstructionCounter { file: File::from(owned(ret)?) })
    }

    fn ioctl0(&self, req: u64) -> io::Result<()> {
        // SAFETY: the perf ENABLE/DISABLE ioctls take an integer flag argument (0: this
        // event only) and touch no memory of ours.
        let ret = unsafe { libc::ioctl(self.file.as_raw_fd(), req as _, 0) };
        check(ret.into()).map(drop)
    }

    /// Starts counting.
    pub fn enable(&self) -> io::Result<()> {
        self.ioctl0(PERF_EVENT_IOC_ENABLE)
    }

    /// Stops counting.
    pub fn disable(&self) -> io::Result<()> {
        self.ioctl0(PERF_EVENT_IOC_DISABLE)
    }

    /// The count so far.
    pub fn read(&mut self) -> io::Result<u64> {
        let mut buf = [0u8; 8];
        self.file.read_exact(&mut buf)?;
        Ok(u64::from_ne_bytes(buf))
    }
}

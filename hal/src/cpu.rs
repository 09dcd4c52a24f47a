//! Privileged x86-64 instructions, one small wrapper each. Only built for the image
//! (`target_os = "none"`): on the host these would fault.
//!
//! Each `unsafe fn` says in `# Safety` what its caller guarantees; the wrappers that are safe
//! say why no caller can break memory safety with them.

use core::arch::asm;

/// Reads a byte from I/O port `port`.
///
/// # Safety
///
/// The port is one whose read has no side effect on memory the program relies on (a device
/// register of the UART, the debug console...), and the caller runs at CPL 0.
#[inline]
pub unsafe fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: the caller guarantees the port is harmless to read at CPL 0.
    unsafe { asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack, preserves_flags)) };
    value
}

/// Writes a byte to I/O port `port`.
///
/// # Safety
///
/// As [`inb`]: the write changes no memory the program relies on (no DMA set-up).
#[inline]
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: the caller guarantees the port is harmless to write at CPL 0.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags)) };
}

/// Writes a 32-bit value to I/O port `port`.
///
/// # Safety
///
/// As [`outb`].
#[inline]
pub unsafe fn outl(port: u16, value: u32) {
    // SAFETY: as in `outb`.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags)) };
}

/// Reads a 32-bit value from I/O port `port`.
///
/// # Safety
///
/// As [`inb`].
#[inline]
pub unsafe fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as in `inb`.
    unsafe { asm!("in eax, dx", out("eax") value, in("dx") port, options(nomem, nostack, preserves_flags)) };
    value
}

/// Reads model-specific register `msr`.
///
/// # Safety
///
/// The MSR exists on this CPU (else #GP) and the caller runs at CPL 0.
#[inline]
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: the caller guarantees the MSR exists; RDMSR only reads it.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    u64::from(hi) << 32 | u64::from(lo)
}

/// Writes model-specific register `msr`.
///
/// # Safety
///
/// The MSR exists and the value is valid for it, and changing it breaks no assumption of the
/// running code (EFER.LME, the syscall MSRs... are the caller's responsibility).
#[inline]
pub unsafe fn wrmsr(msr: u32, value: u64) {
    let (lo, hi) = (value as u32, (value >> 32) as u32);
    // SAFETY: the caller guarantees the write is valid and harmless.
    unsafe { asm!("wrmsr", in("ecx") msr, in("eax") lo, in("edx") hi, options(nostack, preserves_flags)) };
}

/// The time-stamp counter. Safe: RDTSC reads a counter and touches no memory.
#[inline]
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no memory effect; CR4.TSD is clear in this image, so it does not fault.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// CPUID leaf `leaf`, subleaf `sub`: (eax, ebx, ecx, edx). Safe: CPUID only reads.
#[inline]
pub fn cpuid(leaf: u32, sub: u32) -> (u32, u32, u32, u32) {
    let r = core::arch::x86_64::__cpuid_count(leaf, sub);
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// Stops the CPU until the next interrupt (forever with interrupts off).
#[inline]
pub fn hlt() {
    // SAFETY: HLT waits; it touches no memory and the image runs at CPL 0.
    unsafe { asm!("hlt", options(nomem, nostack, preserves_flags)) };
}

/// Opens a window for one pending interrupt: `sti; nop; cli`. The interrupt's handler runs
/// inside the window; interrupts are off again after it.
///
/// # Safety
///
/// The IDT has a handler for every vector that can be pending.
#[inline]
pub unsafe fn interrupt_window() {
    // SAFETY: the caller guarantees every deliverable vector has a handler.
    unsafe { asm!("sti", "nop", "cli", options(nomem, nostack)) };
}

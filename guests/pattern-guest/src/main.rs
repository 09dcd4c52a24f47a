//! pattern-guest: a 64-bit guest whose code, data and page tables all arrive by postcopy
//! migration (from `postcopy-source`), run by the hypervisor on the destination.
//!
//! Entry (set by the source's vCPU record): long mode, paging on with an identity map of
//! all guest RAM, RIP = 0x10000 (the first byte of this image), RSP = 0x80000, interrupts
//! off, no IDT, RDI = guest RAM size in bytes, RSI = guest-physical address of the first
//! data page (0x100000).
//!
//! It visits every data page exactly once in a scattered order (visit `i` is page
//! `(i * STRIDE) mod n` of the `n` data pages, STRIDE a prime that does not divide `n`), so
//! most visits touch a page that has not arrived yet. For each page it reads all 512 words,
//! adds them to a checksum and counts the words that differ from the pattern rules; in the
//! pages the rules mark as written, it then writes word 0 and reads it back. At the end it
//! reports with a hypercall and halts forever:
//!
//! | register | value |
//! |---|---|
//! | RAX | `0x5047_5253` ("PGRS": result) |
//! | RBX | checksum: wrapping sum of every word read |
//! | RCX | mismatches: words that differ from the rules, plus read-backs that differ |
//! | RDX | pages written |
//!
//! The hypercall is the CPU vendor's, from CPUID: VMCALL on Intel (VMX), VMMCALL otherwise (AMD
//! SVM). Both fault (#UD) without a hypervisor that intercepts them.
//!
//! The rules are duplicated from `qemu-tests/src/pattern_guest.rs` (the host side, which
//! the source and the checks use); keep both in step.
#![no_std]
#![no_main]

use core::arch::{asm, global_asm};
use core::panic::PanicInfo;
use core::ptr::{read_volatile, with_exposed_provenance_mut, write_volatile};

/// Bytes per page.
const PAGE: u64 = 4096;
/// 64-bit words per page.
const WORDS: u64 = PAGE / 8;
/// RAX of the result hypercall: "PGRS".
const RESULT: u64 = 0x5047_5253;
/// Word 0 of a written page becomes `WRITE_MARK ^ page number`.
const WRITE_MARK: u64 = 0x5752_4954_0000_0000;
/// Visit stride; [`STRIDE_ALT`] when it divides the number of data pages.
const STRIDE: u64 = 7919;
/// The next prime.
const STRIDE_ALT: u64 = 7927;

/// CPUID leaf 0's EBX on Intel CPUs: "Genu".
const GENUINE_INTEL_EBX: u32 = 0x756e_6547;

/// The result hypercall (`$insn`: `vmmcall` or `vmcall`), then halt forever.
macro_rules! report_with {
    ($insn:literal, $checksum:expr, $mismatches:expr, $written:expr) => {
        // SAFETY: RBX cannot be an operand (LLVM reserves it), so the checksum is moved there
        // inside the block; the block never returns, so clobbering RBX breaks nothing. It
        // touches no memory.
        unsafe {
            asm!(
                "mov rbx, {checksum}",
                $insn,
                "2:",
                "hlt",
                "jmp 2b",
                checksum = in(reg) $checksum,
                in("rax") RESULT,
                in("rcx") $mismatches,
                in("rdx") $written,
                options(noreturn, nostack),
            )
        }
    };
}

global_asm!(
    ".section .text.entry, \"ax\"",
    ".global _start",
    "_start:",
    "    cld",
    // RDI and RSI are the first two arguments of the C ABI; RSP (0x80000) is 16-byte
    // aligned before the call, as the ABI wants.
    "    call {main}",
    "2:  hlt",
    "    jmp 2b",
    main = sym pattern_main,
);

/// The standard splitmix64 finalizer of `x + golden gamma`.
const fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Page `page` (absolute page number) holds the pattern (others are zero).
const fn patterned(page: u64) -> bool {
    page.is_multiple_of(4)
}

/// Version of the page the source serves last: the dirty ones are discarded and re-sent.
const fn version(page: u64) -> u64 {
    if page % 3 == 1 {
        1
    } else {
        0
    }
}

/// Word `w` of page `page` as the source serves it last.
const fn expected_word(page: u64, w: u64) -> u64 {
    if patterned(page) {
        splitmix64(page * WORDS + w + version(page) * 0x1_0000_0000)
    } else {
        0
    }
}

/// The guest writes word 0 of this page.
const fn written(page: u64) -> bool {
    page % 16 == 2
}

extern "C" fn pattern_main(ram_bytes: u64, data_start: u64) -> ! {
    let first = data_start / PAGE;
    let n = ram_bytes.saturating_sub(data_start) / PAGE;
    let (mut checksum, mut mismatches, mut pages_written) = (0u64, 0u64, 0u64);
    if n > 0 {
        let stride = if n.is_multiple_of(STRIDE) { STRIDE_ALT } else { STRIDE } % n;
        let mut p = 0u64;
        for _ in 0..n {
            let page = first + p;
            let base = with_exposed_provenance_mut::<u64>((page * PAGE) as usize);
            for w in 0..WORDS {
                // SAFETY: every data page is guest RAM, identity-mapped and writable, and
                // nothing else in this guest refers to it (no Rust object lives there).
                let value = unsafe { read_volatile(base.add(w as usize)) };
                checksum = checksum.wrapping_add(value);
                mismatches += u64::from(value != expected_word(page, w));
            }
            if written(page) {
                let mark = WRITE_MARK ^ page;
                // SAFETY: as above.
                let back = unsafe {
                    write_volatile(base, mark);
                    read_volatile(base)
                };
                mismatches += u64::from(back != mark);
                pages_written += 1;
            }
            p += stride;
            if p >= n {
                p -= n;
            }
        }
    }
    report(checksum, mismatches, pages_written)
}

/// The result hypercall; halts forever if the hypervisor resumes the guest after it. The
/// instruction is the vendor's: VMCALL on Intel (VMX), VMMCALL elsewhere (AMD SVM); each is
/// #UD on the other's CPUs. The vendor comes from CPUID, which the hypervisor answers.
fn report(checksum: u64, mismatches: u64, pages_written: u64) -> ! {
    if core::arch::x86_64::__cpuid(0).ebx == GENUINE_INTEL_EBX {
        report_with!("vmcall", checksum, mismatches, pages_written)
    } else {
        report_with!("vmmcall", checksum, mismatches, pages_written)
    }
}

#[panic_handler]
fn panic(_: &PanicInfo) -> ! {
    loop {
        // SAFETY: halting has no memory effect; interrupts are off, so this stops the vCPU.
        unsafe { asm!("hlt", options(nomem, nostack)) };
    }
}

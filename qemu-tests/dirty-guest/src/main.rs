//! dirty-guest: a multiboot1 kernel for the QEMU *source* VM of the migration tests.
//!
//! It runs in 32-bit protected mode (no paging, interrupts off) and keeps writing
//! guest RAM at a fixed rate, so precopy does not converge by itself and the final
//! RAM differs from zeros in a checkable way.
//!
//! Command line (`-append`, space separated, each key after a space):
//! * `rate=N`  dirty N KiB per second (default 2048; 0 = only the heartbeat runs)
//! * `span=N`  size of the dirtied region in KiB, from 2 MiB up (default 63488,
//!   i.e. up to 64 MiB), clamped to the end of RAM
//! * `fill`    first write a non-zero pattern to every page from 2 MiB to the end
//!   of RAM (`dword 0` of each page = its address | 0xA5, the rest 0xA5A5A5A5)
//!
//! Each dirtied page is filled with a running sequence number `seq` (>= 1), then
//! `dword 0` = the page's address and `dword 1` = `seq`. Pages are picked by a
//! xorshift32 generator over the region. Time comes from polling PIT channel 0
//! (1.193182 MHz), so the rate follows QEMU's virtual clock.
//!
//! The status page is at guest-physical `0x1FF000` (little-endian u32s):
//!
//! | offset | field |
//! |---|---|
//! | 0x00 | magic `0x54534744` ("DGST") |
//! | 0x04 | heartbeat: +1 per main-loop iteration |
//! | 0x08 | pages dirtied so far (= last `seq`) |
//! | 0x0C | end of RAM in bytes (from multiboot `mem_upper`) |
//! | 0x10 | region start (0x200000) |
//! | 0x14 | region end |
//! | 0x18 | rate in KiB/s |
//! | 0x1C | pages written by `fill` |
//! | 0x20 | flags: bit 0 fill requested, bit 1 fill done, bit 2 dirty loop running |
//! | 0x24..0x38 | private state (rng, PIT, credit, ticks per page, span, page count) |
//!
//! The stack top is at `0x1FE000`; the image itself is loaded at `0x100000`.
#![no_std]
#![no_main]

use core::arch::global_asm;
use core::panic::PanicInfo;

global_asm!(
    r#"
    .set DG_STATUS, 0x1FF000
    .set DG_STACK_TOP, 0x1FE000
    .set DG_REGION_START, 0x200000
    .set DG_MAGIC, 0x00
    .set DG_HEARTBEAT, 0x04
    .set DG_PAGES, 0x08
    .set DG_RAM_END, 0x0C
    .set DG_RSTART, 0x10
    .set DG_REND, 0x14
    .set DG_RATE, 0x18
    .set DG_FILLED, 0x1C
    .set DG_FLAGS, 0x20
    .set DG_RNG, 0x24
    .set DG_LAST, 0x28
    .set DG_CREDIT, 0x2C
    .set DG_TPP, 0x30
    .set DG_SPAN, 0x34
    .set DG_NPAGES, 0x38

    .section .multiboot, "a"
    .balign 4
    .long 0x1BADB002
    .long 0x00000002
    .long -(0x1BADB002 + 0x00000002)

    .section .text._start, "ax"
    .code32
    .global _start
_start:
    cli
    cld
    mov esp, DG_STACK_TOP
    cmp eax, 0x2BADB002
    je 1f
    xor ebx, ebx
1:
    mov edi, DG_STATUS
    xor eax, eax
    mov ecx, 1024
    rep stosd
    mov dword ptr [DG_STATUS + DG_RATE], 2048
    mov dword ptr [DG_STATUS + DG_SPAN], 63488
    mov dword ptr [DG_STATUS + DG_RNG], 0x2545F491

    /* end of RAM: multiboot mem_upper (KiB above 1 MiB), else assume 32 MiB */
    mov eax, 0x2000000
    test ebx, ebx
    jz 1f
    test dword ptr [ebx], 1
    jz 1f
    mov eax, [ebx + 8]
    shl eax, 10
    add eax, 0x100000
1:
    and eax, 0xFFFFF000
    mov [DG_STATUS + DG_RAM_END], eax

    /* command line: " rate=N", " span=N", " fill" */
    test ebx, ebx
    jz dg_args_done
    test dword ptr [ebx], 4
    jz dg_args_done
    mov esi, [ebx + 16]
dg_scan:
    mov al, [esi]
    test al, al
    jz dg_args_done
    cmp al, 0x20
    jne dg_next
    cmp dword ptr [esi + 1], 0x65746172
    jne 2f
    cmp byte ptr [esi + 5], 0x3D
    jne 2f
    lea edx, [esi + 6]
    call dg_parse_dec
    mov [DG_STATUS + DG_RATE], eax
    jmp dg_next
2:
    cmp dword ptr [esi + 1], 0x6E617073
    jne 3f
    cmp byte ptr [esi + 5], 0x3D
    jne 3f
    lea edx, [esi + 6]
    call dg_parse_dec
    mov [DG_STATUS + DG_SPAN], eax
    jmp dg_next
3:
    cmp dword ptr [esi + 1], 0x6C6C6966
    jne dg_next
    or dword ptr [DG_STATUS + DG_FLAGS], 1
dg_next:
    inc esi
    jmp dg_scan
dg_args_done:

    /* region = [2 MiB, min(2 MiB + span, end of RAM)) */
    mov eax, [DG_STATUS + DG_SPAN]
    cmp eax, 0x300000
    jbe 1f
    mov eax, 0x300000
1:
    shl eax, 10
    add eax, DG_REGION_START
    and eax, 0xFFFFF000
    cmp eax, [DG_STATUS + DG_RAM_END]
    jbe 1f
    mov eax, [DG_STATUS + DG_RAM_END]
1:
    cmp eax, DG_REGION_START
    jae 1f
    mov eax, DG_REGION_START
1:
    mov dword ptr [DG_STATUS + DG_RSTART], DG_REGION_START
    mov [DG_STATUS + DG_REND], eax
    sub eax, DG_REGION_START
    shr eax, 12
    mov [DG_STATUS + DG_NPAGES], eax

    /* ticks of the 1.193182 MHz PIT per dirtied page: 4 * 1193182 / rate */
    xor ecx, ecx
    mov ebx, [DG_STATUS + DG_RATE]
    test ebx, ebx
    jz 1f
    mov eax, 4772728
    xor edx, edx
    div ebx
    mov ecx, eax
    test ecx, ecx
    jnz 1f
    inc ecx
1:
    mov [DG_STATUS + DG_TPP], ecx
    mov dword ptr [DG_STATUS + DG_MAGIC], 0x54534744

    /* fill mode: every page from 2 MiB to the end of RAM */
    test dword ptr [DG_STATUS + DG_FLAGS], 1
    jz dg_fill_done
    mov edx, DG_REGION_START
dg_fill:
    cmp edx, [DG_STATUS + DG_RAM_END]
    jae 1f
    mov edi, edx
    mov eax, 0xA5A5A5A5
    mov ecx, 1024
    rep stosd
    mov eax, edx
    or eax, 0xA5
    mov [edx], eax
    inc dword ptr [DG_STATUS + DG_FILLED]
    inc dword ptr [DG_STATUS + DG_HEARTBEAT]
    add edx, 4096
    jmp dg_fill
1:
    or dword ptr [DG_STATUS + DG_FLAGS], 2
dg_fill_done:

    /* PIT channel 0: mode 2, binary, reload 65536 */
    mov al, 0x34
    out 0x43, al
    xor al, al
    out 0x40, al
    out 0x40, al
    call dg_pit_read
    mov [DG_STATUS + DG_LAST], eax
    or dword ptr [DG_STATUS + DG_FLAGS], 4

dg_loop:
    inc dword ptr [DG_STATUS + DG_HEARTBEAT]
    mov ecx, [DG_STATUS + DG_TPP]
    test ecx, ecx
    jz dg_loop
    call dg_pit_read
    mov edx, [DG_STATUS + DG_LAST]
    mov [DG_STATUS + DG_LAST], eax
    sub edx, eax
    and edx, 0xFFFF
    add edx, [DG_STATUS + DG_CREDIT]
    mov eax, ecx
    shl eax, 6
    cmp edx, eax
    jbe 1f
    mov edx, eax
1:
    mov [DG_STATUS + DG_CREDIT], edx
dg_burst:
    mov ecx, [DG_STATUS + DG_TPP]
    mov edx, [DG_STATUS + DG_CREDIT]
    cmp edx, ecx
    jb dg_loop
    sub edx, ecx
    mov [DG_STATUS + DG_CREDIT], edx
    mov ecx, [DG_STATUS + DG_NPAGES]
    test ecx, ecx
    jz dg_loop
    mov eax, [DG_STATUS + DG_RNG]
    mov edx, eax
    shl edx, 13
    xor eax, edx
    mov edx, eax
    shr edx, 17
    xor eax, edx
    mov edx, eax
    shl edx, 5
    xor eax, edx
    mov [DG_STATUS + DG_RNG], eax
    xor edx, edx
    div ecx
    shl edx, 12
    add edx, [DG_STATUS + DG_RSTART]
    mov edi, edx
    mov eax, [DG_STATUS + DG_PAGES]
    inc eax
    mov [DG_STATUS + DG_PAGES], eax
    mov ecx, 1024
    rep stosd
    mov [edx], edx
    mov [edx + 4], eax
    jmp dg_burst

    /* edx -> decimal digits; returns the value in eax (clobbers ecx, edx) */
dg_parse_dec:
    xor eax, eax
1:
    movzx ecx, byte ptr [edx]
    sub ecx, 0x30
    cmp ecx, 9
    ja 2f
    imul eax, eax, 10
    add eax, ecx
    inc edx
    jmp 1b
2:
    ret

    /* PIT channel 0 current count in eax (clobbers ecx) */
dg_pit_read:
    xor eax, eax
    out 0x43, al
    in al, 0x40
    mov cl, al
    in al, 0x40
    mov ah, al
    mov al, cl
    movzx eax, ax
    ret

    .code64
"#
);

#[panic_handler]
fn panic(_info: &PanicInfo) -> ! {
    loop {
        core::hint::spin_loop();
    }
}

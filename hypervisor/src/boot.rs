//! From the PVH entry (32-bit protected mode, paging off) to long mode and `kmain`.
//!
//! The boot code maps the first 4 GiB 1:1 with 2 MiB pages (PML4 → PDPT → 4 page
//! directories), turns on PAE, EFER.LME and paging, loads a temporary GDT with a 64-bit code
//! segment and jumps to 64-bit code, which sets the data segments and the stack and calls
//! `kmain(info, magic)`: the PVH start_info (QEMU) or the multiboot2 information (GRUB, in
//! Bochs) and EAX at entry (0x36d76289 for multiboot2). The Rust side then loads its own GDT,
//! TSS, IDT and page tables.

core::arch::global_asm!(
    r#"
    .section .note.Xen, "a"
    .p2align 2
    .long 4, 4, 18
    .asciz "Xen"
    .p2align 2
    .long _start32
    .p2align 2

    /* Multiboot2 header (magic, architecture 0 = i386, length, checksum; the end tag). */
    .section .multiboot2, "a"
    .p2align 3
mb2_start:
    .long 0xe85250d6
    .long 0
    .long mb2_end - mb2_start
    .long -(0xe85250d6 + (mb2_end - mb2_start))
    .word 0, 0
    .long 8
mb2_end:

    .section .bss.pagetables, "aw", @nobits
    .p2align 12
boot_pml4: .skip 4096
boot_pdpt: .skip 4096
boot_pd:   .skip 4 * 4096

    .section .bss.stack, "aw", @nobits
    .p2align 12
    .skip 1024 * 1024

    .section .rodata
    .p2align 3
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
boot_gdt_end:
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .quad boot_gdt
boot_far:
    .long start64
    .word 0x08

    .section .text.boot, "ax"
    .code32
    .global _start32
_start32:
    cli
    mov esp, offset __stack_top
    mov esi, ebx
    mov ebp, eax
    /* 2048 2 MiB pages: present, writable, large. */
    mov edi, offset boot_pd
    xor ecx, ecx
1:  mov eax, ecx
    shl eax, 21
    or eax, 0x83
    mov edx, ecx
    shr edx, 11
    mov [edi + ecx * 8], eax
    mov [edi + ecx * 8 + 4], edx
    inc ecx
    cmp ecx, 2048
    jne 1b
    /* PDPT: the four page directories; PML4: the PDPT. */
    mov edi, offset boot_pdpt
    mov eax, offset boot_pd
    or eax, 3
    mov [edi], eax
    add eax, 4096
    mov [edi + 8], eax
    add eax, 4096
    mov [edi + 16], eax
    add eax, 4096
    mov [edi + 24], eax
    mov eax, offset boot_pdpt
    or eax, 3
    mov [boot_pml4], eax
    mov eax, offset boot_pml4
    mov cr3, eax
    mov eax, cr4
    or eax, 1 << 5
    mov cr4, eax
    mov ecx, 0xc0000080
    rdmsr
    or eax, 1 << 8
    wrmsr
    mov eax, cr0
    or eax, (1 << 31) | 1
    mov cr0, eax
    lgdt [boot_gdt_ptr]
    jmp fword ptr [boot_far]

    .code64
start64:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    mov rsp, offset __stack_top
    mov edi, esi
    mov esi, ebp
    call kmain
2:  cli
    hlt
    jmp 2b
"#
);

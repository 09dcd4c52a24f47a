//! The image's own page tables, built with the `x86_64` crate once in long mode: the first
//! 4 GiB mapped 1:1 (2 MiB pages, as the boot tables), except the page under the boot stack,
//! which stays unmapped: a stack overflow is a page fault (reported through the double-fault
//! stack), not silent corruption of what lies below.

use x86_64::registers::control::{Cr3, Cr3Flags};
use x86_64::structures::paging::page_table::PageTableEntry;
use x86_64::structures::paging::{PageTable, PageTableFlags, PhysFrame};
use x86_64::PhysAddr;

const TWO_MIB: u64 = 2 << 20;
const FOUR_K: u64 = 4096;

#[repr(C, align(4096))]
struct Tables {
    pml4: PageTable,
    pdpt: PageTable,
    pds: [PageTable; 4],
    /// The 4 KiB table of the 2 MiB region that holds the guard page.
    guard_pt: PageTable,
}

static mut TABLES: Tables = Tables {
    pml4: PageTable::new(),
    pdpt: PageTable::new(),
    pds: [const { PageTable::new() }; 4],
    guard_pt: PageTable::new(),
};

extern "C" {
    /// The page under the boot stack (linker script).
    static __stack_guard: u8;
}

fn set(entry: &mut PageTableEntry, addr: u64, flags: PageTableFlags) {
    entry.set_addr(PhysAddr::new(addr), flags);
}

/// Builds the tables and switches CR3 to them. Called once, early in `kmain`.
pub fn init() {
    let guard = core::ptr::addr_of!(__stack_guard) as u64;
    let rw = PageTableFlags::PRESENT | PageTableFlags::WRITABLE;
    // SAFETY: called once, before anything else uses TABLES; physical = virtual.
    let t = unsafe { &mut *core::ptr::addr_of_mut!(TABLES) };
    for (i, pd) in t.pds.iter_mut().enumerate() {
        for (j, entry) in pd.iter_mut().enumerate() {
            let base = (i as u64 * 512 + j as u64) * TWO_MIB;
            if (base..base + TWO_MIB).contains(&guard) {
                set(entry, core::ptr::addr_of!(t.guard_pt) as u64, rw);
            } else {
                set(entry, base, rw | PageTableFlags::HUGE_PAGE);
            }
        }
    }
    let region = guard & !(TWO_MIB - 1);
    for (k, entry) in t.guard_pt.iter_mut().enumerate() {
        let addr = region + k as u64 * FOUR_K;
        if addr != guard {
            set(entry, addr, rw);
        }
    }
    for (i, entry) in t.pdpt.iter_mut().take(4).enumerate() {
        set(entry, core::ptr::addr_of!(t.pds[i]) as u64, rw);
    }
    set(&mut t.pml4[0], core::ptr::addr_of!(t.pdpt) as u64, rw);
    let root = PhysFrame::containing_address(PhysAddr::new(core::ptr::addr_of!(t.pml4) as u64));
    // SAFETY: the new tables map everything the boot tables did (the first 4 GiB 1:1) but the
    // guard page, which nothing uses; they live in a static for the rest of the run.
    unsafe { Cr3::write(root, Cr3Flags::empty()) };
}

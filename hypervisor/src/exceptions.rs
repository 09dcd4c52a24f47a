//! GDT, TSS and IDT (through the `x86_64` crate), the interrupt entry stubs, and what each
//! vector does: the local APIC timer (the periodic exit that keeps the stream flowing while a
//! guest runs) is acknowledged; every exception is reported with its vector, RIP and error
//! code, and ends the run with a failure code.

use core::fmt::Write;

use spin::Once;
use x86_64::instructions::segmentation::{Segment, CS, DS, ES, SS};
use x86_64::instructions::tables::load_tss;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::idt::InterruptDescriptorTable;
use x86_64::structures::tss::TaskStateSegment;
use x86_64::VirtAddr;

use crate::console::Console;
use crate::exit::{exit, Code};

/// The local APIC timer's vector.
pub const TIMER_VECTOR: u8 = 0x20;
/// The local APIC's spurious-interrupt vector.
pub const SPURIOUS_VECTOR: u8 = 0xff;
/// The IST slot of the double-fault handler (a stack of its own).
const DOUBLE_FAULT_IST: u16 = 0;

/// Registers saved by the entry stub, lowest address first.
#[repr(C)]
#[derive(Debug)]
pub struct Frame {
    r15: u64,
    r14: u64,
    r13: u64,
    r12: u64,
    r11: u64,
    r10: u64,
    r9: u64,
    r8: u64,
    rbp: u64,
    rdi: u64,
    rsi: u64,
    rdx: u64,
    rcx: u64,
    rbx: u64,
    rax: u64,
    vector: u64,
    error: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

macro_rules! stub {
    ($n:literal) => {
        concat!("isr_", $n, ":\n push 0\n push ", $n, "\n jmp isr_common\n")
    };
    ($n:literal, error) => {
        concat!("isr_", $n, ":\n push ", $n, "\n jmp isr_common\n")
    };
}

// Entry stubs: the CPU pushes SS, RSP, RFLAGS, CS, RIP (and an error code for some
// exceptions); the stub pushes a 0 where there is none, then the vector; `isr_common` saves
// the general registers, calls `isr_dispatch(&mut Frame)` and returns with IRETQ. 22 quadwords
// in all, with the CPU's 16-byte alignment of RSP: `isr_dispatch` is called on an aligned stack.
core::arch::global_asm!(concat!(
    ".section .text\n",
    ".global isr_common\n",
    stub!(0),
    stub!(1),
    stub!(2),
    stub!(3),
    stub!(4),
    stub!(5),
    stub!(6),
    stub!(7),
    stub!(8, error),
    stub!(9),
    stub!(10, error),
    stub!(11, error),
    stub!(12, error),
    stub!(13, error),
    stub!(14, error),
    stub!(15),
    stub!(16),
    stub!(17, error),
    stub!(18),
    stub!(19),
    stub!(20),
    stub!(21, error),
    stub!(22),
    stub!(23),
    stub!(24),
    stub!(25),
    stub!(26),
    stub!(27),
    stub!(28),
    stub!(29, error),
    stub!(30, error),
    stub!(31),
    stub!(32),
    stub!(255),
    "isr_common:\n",
    " push rax\n push rbx\n push rcx\n push rdx\n push rsi\n push rdi\n push rbp\n",
    " push r8\n push r9\n push r10\n push r11\n push r12\n push r13\n push r14\n push r15\n",
    " mov rdi, rsp\n",
    " cld\n",
    " call isr_dispatch\n",
    " pop r15\n pop r14\n pop r13\n pop r12\n pop r11\n pop r10\n pop r9\n pop r8\n",
    " pop rbp\n pop rdi\n pop rsi\n pop rdx\n pop rcx\n pop rbx\n pop rax\n",
    " add rsp, 16\n",
    " iretq\n",
    ".section .rodata\n",
    ".p2align 3\n",
    ".global isr_table\n",
    "isr_table:\n",
    " .quad isr_0, isr_1, isr_2, isr_3, isr_4, isr_5, isr_6, isr_7, isr_8, isr_9, isr_10\n",
    " .quad isr_11, isr_12, isr_13, isr_14, isr_15, isr_16, isr_17, isr_18, isr_19, isr_20\n",
    " .quad isr_21, isr_22, isr_23, isr_24, isr_25, isr_26, isr_27, isr_28, isr_29, isr_30\n",
    " .quad isr_31, isr_32, isr_255\n",
));

extern "C" {
    /// The stubs' addresses: vectors 0-31, then [`TIMER_VECTOR`] and [`SPURIOUS_VECTOR`].
    static isr_table: [u64; 34];
}

const EXCEPTION_NAMES: [&str; 32] = [
    "#DE divide error",
    "#DB debug",
    "NMI",
    "#BP breakpoint",
    "#OF overflow",
    "#BR bound range",
    "#UD invalid opcode",
    "#NM device not available",
    "#DF double fault",
    "coprocessor segment overrun",
    "#TS invalid TSS",
    "#NP segment not present",
    "#SS stack fault",
    "#GP general protection",
    "#PF page fault",
    "reserved 15",
    "#MF x87 error",
    "#AC alignment check",
    "#MC machine check",
    "#XM SIMD error",
    "#VE virtualization",
    "#CP control protection",
    "reserved 22",
    "reserved 23",
    "reserved 24",
    "reserved 25",
    "reserved 26",
    "reserved 27",
    "#HV hypervisor injection",
    "#VC VMM communication",
    "#SX security",
    "reserved 31",
];

#[no_mangle]
extern "C" fn isr_dispatch(frame: &mut Frame) {
    match frame.vector as u8 {
        TIMER_VECTOR => crate::apic::end_of_interrupt(),
        SPURIOUS_VECTOR => {}
        vector => {
            let name = EXCEPTION_NAMES.get(usize::from(vector)).copied().unwrap_or("unexpected interrupt");
            let cr2 = x86_64::registers::control::Cr2::read_raw();
            let _ = writeln!(
                Console,
                "EXCEPTION vector {vector} ({name}) at RIP {:#x}, error code {:#x}, CR2 {cr2:#x}, RSP {:#x}\n{frame:x?}",
                frame.rip, frame.error, frame.rsp
            );
            exit(Code::Failure);
        }
    }
}

struct Tables {
    gdt: GlobalDescriptorTable,
    code: SegmentSelector,
    data: SegmentSelector,
    tss: SegmentSelector,
}

static TSS: Once<TaskStateSegment> = Once::new();
static TABLES: Once<Tables> = Once::new();
static IDT: Once<InterruptDescriptorTable> = Once::new();

/// The double-fault handler's own stack.
static mut DOUBLE_FAULT_STACK: [u8; 16 * 1024] = [0; 16 * 1024];

/// Loads the GDT (kernel code and data, the TSS with a double-fault stack) and the IDT.
pub fn init() {
    let tss = TSS.call_once(|| {
        let mut tss = TaskStateSegment::new();
        let stack = core::ptr::addr_of!(DOUBLE_FAULT_STACK) as u64 + 16 * 1024;
        tss.interrupt_stack_table[usize::from(DOUBLE_FAULT_IST)] = VirtAddr::new(stack);
        tss
    });
    let tables = TABLES.call_once(|| {
        let mut gdt = GlobalDescriptorTable::new();
        let code = gdt.append(Descriptor::kernel_code_segment());
        let data = gdt.append(Descriptor::kernel_data_segment());
        let tss = gdt.append(Descriptor::tss_segment(tss));
        Tables { gdt, code, data, tss }
    });
    tables.gdt.load();
    // SAFETY: the selectors name the code, data and TSS descriptors of the GDT just loaded,
    // which lives in a static.
    unsafe {
        CS::set_reg(tables.code);
        for set in [DS::set_reg, ES::set_reg, SS::set_reg] {
            set(tables.data);
        }
        load_tss(tables.tss);
    }
    let idt = IDT.call_once(|| {
        let mut idt = InterruptDescriptorTable::new();
        // SAFETY: `isr_table` is the stubs' addresses, a static array filled by the linker.
        let stubs = unsafe { &*core::ptr::addr_of!(isr_table) };
        let at = |i: usize| VirtAddr::new(stubs[i]);
        // SAFETY: each address given to `set_handler_addr` is an entry stub above, which
        // saves every register, handles the vector and returns with IRETQ.
        unsafe {
            idt.divide_error.set_handler_addr(at(0));
            idt.debug.set_handler_addr(at(1));
            idt.non_maskable_interrupt.set_handler_addr(at(2));
            idt.breakpoint.set_handler_addr(at(3));
            idt.overflow.set_handler_addr(at(4));
            idt.bound_range_exceeded.set_handler_addr(at(5));
            idt.invalid_opcode.set_handler_addr(at(6));
            idt.device_not_available.set_handler_addr(at(7));
            idt.double_fault.set_handler_addr(at(8)).set_stack_index(DOUBLE_FAULT_IST);
            idt.invalid_tss.set_handler_addr(at(10));
            idt.segment_not_present.set_handler_addr(at(11));
            idt.stack_segment_fault.set_handler_addr(at(12));
            idt.general_protection_fault.set_handler_addr(at(13));
            idt.page_fault.set_handler_addr(at(14));
            idt.x87_floating_point.set_handler_addr(at(16));
            idt.alignment_check.set_handler_addr(at(17));
            idt.machine_check.set_handler_addr(at(18));
            idt.simd_floating_point.set_handler_addr(at(19));
            idt.virtualization.set_handler_addr(at(20));
            idt.cp_protection_exception.set_handler_addr(at(21));
            idt.hv_injection_exception.set_handler_addr(at(28));
            idt.vmm_communication_exception.set_handler_addr(at(29));
            idt.security_exception.set_handler_addr(at(30));
            idt[TIMER_VECTOR].set_handler_addr(at(32));
            idt[SPURIOUS_VECTOR].set_handler_addr(at(33));
        }
        idt
    });
    idt.load();
}

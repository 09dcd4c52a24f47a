//! The local APIC (xAPIC, memory-mapped): its timer gives the image periodic exits from a
//! running guest (SVM intercepts physical interrupts), so the stream keeps flowing.
//!
//! Registers (Intel SDM Vol. 3A §11.4.1, AMD APM Vol. 2 §16.3): 0x0b0 EOI, 0x0f0 spurious
//! vector (bit 8: APIC enabled), 0x320 LVT timer (bit 17: periodic), 0x380 initial count,
//! 0x3e0 divide configuration (0b1011: divide by 1).

use crate::cpu::{outb, rdmsr};

const IA32_APIC_BASE: u32 = 0x1b;
const EOI: usize = 0x0b0;
const SPURIOUS: usize = 0x0f0;
const LVT_TIMER: usize = 0x320;
const INITIAL_COUNT: usize = 0x380;
const DIVIDE: usize = 0x3e0;
const PERIODIC: u32 = 1 << 17;
const ENABLE: u32 = 1 << 8;

/// This CPU's local APIC.
#[derive(Debug)]
pub struct LocalApic {
    base: usize,
}

impl LocalApic {
    /// The local APIC at the address IA32_APIC_BASE names.
    ///
    /// # Safety
    ///
    /// That address is mapped (uncached or emulated MMIO) at the same virtual address, and
    /// nothing else programs the APIC.
    pub unsafe fn new() -> Self {
        // SAFETY: IA32_APIC_BASE exists on every x86-64 CPU.
        let msr = unsafe { rdmsr(IA32_APIC_BASE) };
        Self { base: (msr & 0x000f_ffff_ffff_f000) as usize }
    }

    fn write(&self, reg: usize, value: u32) {
        // SAFETY: `new`'s caller guarantees the APIC page is mapped at `base`; `reg` is one of
        // the register offsets above, 16-byte aligned inside it.
        unsafe { core::ptr::write_volatile((self.base + reg) as *mut u32, value) };
    }

    /// Enables the APIC with `spurious` as its spurious-interrupt vector.
    pub fn enable(&self, spurious: u8) {
        self.write(SPURIOUS, ENABLE | u32::from(spurious));
    }

    /// Starts the timer: `vector` every `count` ticks of the bus clock (divide by 1).
    pub fn start_periodic(&self, vector: u8, count: u32) {
        self.write(DIVIDE, 0b1011);
        self.write(LVT_TIMER, PERIODIC | u32::from(vector));
        self.write(INITIAL_COUNT, count);
    }

    /// Signals the end of the interrupt being handled.
    pub fn end_of_interrupt(&self) {
        self.write(EOI, 0);
    }
}

/// Masks every line of the two legacy 8259 interrupt controllers. Their power-on vectors
/// (0x08-0x0f for the master) collide with CPU exceptions: the PIT's IRQ 0 would arrive as
/// vector 8, a double fault.
///
/// # Safety
///
/// Ports 0x21 and 0xa1 are the PICs' mask registers (as on every pc/q35 machine and Bochs).
pub unsafe fn mask_legacy_pic() {
    // SAFETY: the caller guarantees the PICs are at their usual ports; masking touches no
    // memory.
    unsafe {
        outb(0x21, 0xff);
        outb(0xa1, 0xff);
    }
}

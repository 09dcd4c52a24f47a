//! The hypervisor image: boots (PVH), receives a guest by postcopy migration over COM1 and runs
//! it under AMD SVM with nested paging, serving its missing pages from real #NPF exits.
//!
//! It wires `agent` (the protocol) to `hal` (the hardware) and holds no protocol logic. It is
//! built for `x86_64-unknown-none` only; on the host it is an empty program that says so (so
//! that workspace-wide host builds and tests pass over it).
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

#[cfg(target_os = "none")]
mod apic;
#[cfg(target_os = "none")]
mod boot;
#[cfg(target_os = "none")]
mod console;
#[cfg(target_os = "none")]
mod exceptions;
#[cfg(target_os = "none")]
mod exit;

/// The Rust entry, called by the boot code in long mode with the PVH start_info address.
#[cfg(target_os = "none")]
#[no_mangle]
extern "C" fn kmain(_start_info: u32) -> ! {
    console::print("postcopy hypervisor: long mode\n");
    exceptions::init();
    apic::init();
    // Take a few timer interrupts.
    for _ in 0..3 {
        // SAFETY: the IDT handles the timer and spurious vectors.
        unsafe { core::arch::asm!("sti", "hlt", "cli") };
    }
    console::print("timer interrupts taken\n");
    exit::exit(exit::Code::Success)
}

#[cfg(target_os = "none")]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    use core::fmt::Write;
    let _ = writeln!(console::Console, "PANIC: {info}");
    exit::exit(exit::Code::Failure)
}

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!(
        "the hypervisor image runs on bare metal: cargo build -p hypervisor --target x86_64-unknown-none"
    );
    std::process::exit(2);
}

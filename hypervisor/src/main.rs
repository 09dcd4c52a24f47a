//! The hypervisor image: boots (PVH or multiboot2), receives a guest by postcopy migration over
//! virtio-vsock (or COM1 on a machine without the device) and runs it under AMD SVM with nested
//! paging or Intel VMX with EPT, serving its missing pages from real stage-2 fault exits.
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
mod cycles;
#[cfg(target_os = "none")]
mod devices;
#[cfg(target_os = "none")]
mod exceptions;
#[cfg(target_os = "none")]
mod exit;
#[cfg(target_os = "none")]
mod guest;
#[cfg(target_os = "none")]
mod latency;
#[cfg(target_os = "none")]
mod log;
#[cfg(target_os = "none")]
mod memory;
#[cfg(target_os = "none")]
mod paging;
#[cfg(target_os = "none")]
mod platform;
#[cfg(target_os = "none")]
mod run;
#[cfg(target_os = "none")]
mod selftest;
#[cfg(target_os = "none")]
mod transport;
#[cfg(target_os = "none")]
mod vsock;

/// The Rust entry, called by the boot code in long mode with the PVH start_info address.
#[cfg(target_os = "none")]
#[no_mangle]
extern "C" fn kmain(info: u32, magic: u32) -> ! {
    use core::fmt::Write;
    use hal::stage2::invalidate::NextVmrunFlush;
    console::print("postcopy hypervisor: long mode\n");
    log::init();
    defmt::info!("postcopy hypervisor: long mode");
    exceptions::init();
    paging::init();
    apic::init();
    let words = || cmdline(info, magic).split(' ');
    // Checks of the failure reports: an invalid opcode, and a stack overflow into the guard.
    if words().any(|w| w == "selftest-ud2") {
        // SAFETY: UD2 raises #UD, which the IDT reports before ending the run.
        unsafe { core::arch::asm!("ud2") };
    }
    if words().any(|w| w == "selftest-overflow") {
        selftest::overflow(0);
    }
    if words().any(|w| w == "selftest") {
        match selftest::run() {
            Ok(()) => console::print("SVM self-test passed\n"),
            Err(e) => {
                let _ = writeln!(console::Console, "SVM self-test FAILED: {e}");
                exit::exit(exit::Code::Failure)
            }
        }
        exit::exit(exit::Code::Success)
    }
    let (_, b, c, d) = hal::cpu::cpuid(0, 0);
    let vendor = [b.to_le_bytes(), d.to_le_bytes(), c.to_le_bytes()];
    defmt::info!("CPU vendor {=[u8]:a}", vendor.as_flattened());
    let at_end = if words().any(|w| w == "hold") { run::AtEnd::Hold } else { run::AtEnd::Exit };
    let value = |key: &str| words().find_map(|w| w.strip_prefix(key));
    let number = |v: &str| match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    };
    let opts = run::Options {
        at_end,
        probe: value("probe=").and_then(number),
        run_after_end_ms: value("after-end-ms=").and_then(number).unwrap_or(1000),
        recover_timeout_ms: value("recover-timeout-ms=").and_then(number),
    };
    let per_us = latency::calibrate();
    defmt::info!("TSC: {=u64} cycles per microsecond (against PIT channel 2)", per_us);
    // The vendor from CPUID: SVM with nested paging, else VMX with EPT.
    use hal::virt::svm::vcpu::SvmVcpu;
    use hal::virt::vmx::vcpu::VmxVcpu;
    let svm = hal::virt::svm::vcpu::features();
    if let Ok(features) = svm {
        defmt::info!("SVM: {}", defmt::Debug2Format(&features));
        start(
            |n_cr3| {
                // SAFETY: the nested table maps guest frames only; nothing else uses SVM.
                let vcpu = unsafe { SvmVcpu::new(svm_pages(), features, n_cr3) };
                (vcpu, NextVmrunFlush::new(features.flush_by_asid))
            },
            opts,
        )
    }
    let vmx = hal::virt::vmx::vcpu::available();
    if vmx.is_ok() {
        defmt::info!("VMX with EPT");
        start(
            |eptp| {
                // SAFETY: the EPT table maps guest frames only; nothing else uses VMX; the GDT,
                // IDT and TSS loaded at boot stay.
                match unsafe { VmxVcpu::new(vmx_pages(), eptp) } {
                    // SAFETY: the vCPU keeps this CPU in VMX root operation for the rest of the
                    // run, and `available` checked single- and all-context INVEPT.
                    Ok(vcpu) => (vcpu, unsafe { hal::stage2::invalidate::Invept::new() }),
                    Err(e) => {
                        let _ = writeln!(
                            console::Console,
                            "RESULT {{\"state\":\"error\",\"vendor\":\"vmx\",\"error\":\"VMX set-up failed: {e:?}\"}}"
                        );
                        exit::exit(exit::Code::Failure)
                    }
                }
            },
            opts,
        )
    }
    let _ = writeln!(
        console::Console,
        "RESULT {{\"state\":\"error\",\"error\":\"no SVM with nested paging ({svm:?}), no VMX with EPT ({vmx:?})\"}}"
    );
    exit::exit(exit::Code::Failure)
}

/// Runs the migration over virtio-vsock if the machine has the device, else over COM1.
#[cfg(target_os = "none")]
fn start<V: hal::virt::Vcpu>(make: impl FnOnce(u64) -> (V, V::Invalidate), opts: run::Options) -> ! {
    use core::fmt::Write;
    match vsock::probe() {
        Ok(Some((stream, rp))) => run::migrate(make, stream, move || rp, "vsock", opts),
        Ok(None) => {
            // SAFETY: COM1 is the stream's 16550; this is its only set-up.
            let uart = unsafe { hal::serial::Uart::init(hal::serial::COM1) };
            static mut RING_BUF: [u8; transport::RING_BYTES] = [0; transport::RING_BYTES];
            // SAFETY: borrowed here once, for the rest of the run.
            let ring = transport::Ring::new(unsafe { &mut *core::ptr::addr_of_mut!(RING_BUF) });
            // COM1's transmitter, for the return path. COM1 has no connections to lose, so
            // this is called once (the engine asks for a new return path only on a reconnection).
            // SAFETY: the UART was set up above; the handle is used from the main loop only.
            let rp = || transport::SerialReturnPath(unsafe { hal::serial::Uart::attach(hal::serial::COM1) });
            run::migrate(make, transport::Serial { ring, uart }, rp, "COM1", opts)
        }
        Err(e) => {
            let _ = writeln!(
                console::Console,
                "RESULT {{\"state\":\"error\",\"vendor\":\"{}\",\"error\":\"virtio-vsock bring-up failed: {e:?}\"}}",
                V::VENDOR
            );
            exit::exit(exit::Code::Failure)
        }
    }
}

/// The kernel command line, or "": from the PVH start_info (`cmdline_paddr` at offset 24,
/// after the magic 0x336ec578) or from the multiboot2 information (EAX = 0x36d76289 at entry;
/// the tag of type 1, a NUL-terminated string).
#[cfg(target_os = "none")]
fn cmdline(info: u32, magic: u32) -> &'static str {
    const PVH_MAGIC: u32 = 0x336e_c578;
    const MULTIBOOT2_MAGIC: u32 = 0x36d7_6289;
    if info == 0 {
        return "";
    }
    let base = info as usize;
    // SAFETY: the loader passes the physical address of its structure (mapped 1:1), and which
    // loader it was is known before anything is read: PVH by the structure's magic, multiboot2
    // by EAX. PVH: cmdline_paddr names a NUL-terminated string (or 0). Multiboot2: a total
    // size, then 8-byte aligned tags (type, size) up to the end tag (type 0), each inside the
    // total size.
    let line = unsafe {
        if magic == MULTIBOOT2_MAGIC {
            let total = (base as *const u32).read() as usize;
            let mut at = 8;
            let mut found = 0;
            while at + 8 <= total {
                let kind = ((base + at) as *const u32).read();
                let size = ((base + at + 4) as *const u32).read() as usize;
                if kind == 0 || size < 8 {
                    break;
                }
                if kind == 1 {
                    found = base + at + 8;
                    break;
                }
                at += size.next_multiple_of(8);
            }
            found
        } else if (base as *const u32).read() == PVH_MAGIC {
            ((base + 24) as *const u64).read_unaligned() as usize
        } else {
            0
        }
    };
    if line == 0 {
        return "";
    }
    // SAFETY: as above: a NUL-terminated string the loader placed, which stays.
    let bytes = unsafe { core::ffi::CStr::from_ptr(line as *const core::ffi::c_char) }.to_bytes();
    core::str::from_utf8(bytes).unwrap_or("")
}

/// The VMX pages (VMXON region, VMCS), handed out once.
#[cfg(target_os = "none")]
fn vmx_pages() -> hal::virt::vmx::vcpu::VmxPages {
    use hal::virt::svm::vcpu::Page;
    static mut VMXON: Page = Page::zeroed();
    static mut VMCS: Page = Page::zeroed();
    static TAKEN: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);
    assert!(!TAKEN.swap(true, core::sync::atomic::Ordering::SeqCst), "VMX pages taken twice");
    // SAFETY: the flag above hands the statics out once, so these are the only references.
    unsafe {
        hal::virt::vmx::vcpu::VmxPages {
            vmxon: &mut *core::ptr::addr_of_mut!(VMXON),
            vmcs: &mut *core::ptr::addr_of_mut!(VMCS),
        }
    }
}

/// The SVM pages (VMCB, host save areas, permission maps), handed out once.
#[cfg(target_os = "none")]
fn svm_pages() -> hal::virt::svm::vcpu::SvmPages {
    use hal::virt::svm::vcpu::{Page, SvmPages};
    use hal::virt::svm::vmcb::Vmcb;
    static mut VMCB: Vmcb = Vmcb::zeroed();
    static mut HOST_VMSAVE: Vmcb = Vmcb::zeroed();
    static mut HOST_SAVE: Page = Page::zeroed();
    static mut IOPM: [Page; 3] = [const { Page::zeroed() }; 3];
    static mut MSRPM: [Page; 2] = [const { Page::zeroed() }; 2];
    static TAKEN: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);
    assert!(!TAKEN.swap(true, core::sync::atomic::Ordering::SeqCst), "SVM pages taken twice");
    // SAFETY: the flag above hands the statics out once, so these are the only references.
    unsafe {
        SvmPages {
            vmcb: &mut *core::ptr::addr_of_mut!(VMCB),
            host_save: &mut *core::ptr::addr_of_mut!(HOST_SAVE),
            host_vmsave: &mut *core::ptr::addr_of_mut!(HOST_VMSAVE),
            iopm: &mut *core::ptr::addr_of_mut!(IOPM),
            msrpm: &mut *core::ptr::addr_of_mut!(MSRPM),
        }
    }
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

//! The hypervisor side of the project. Every `unsafe` of the hypervisor lives in this crate.
#![no_std]

#[cfg(test)]
extern crate std;

#[cfg(all(target_arch = "x86_64", target_os = "none"))]
pub mod apic;
#[cfg(all(target_arch = "x86_64", target_os = "none"))]
pub mod cpu;
pub mod mem;
pub mod pit;
#[cfg(all(target_arch = "x86_64", target_os = "none"))]
pub mod serial;
pub mod stage2;
pub mod virt;
pub mod virtio;

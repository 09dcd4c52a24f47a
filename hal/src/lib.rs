//! The hypervisor side of the project. Every `unsafe` of the hypervisor lives in this crate.
#![no_std]

#[cfg(test)]
extern crate std;

pub mod mem;
pub mod stage2;

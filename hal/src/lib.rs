//! The hypervisor side of the project. Every `unsafe` of the project lives in this crate.
#![no_std]

#[cfg(test)]
extern crate std;

pub mod stage2;

//! The postcopy destination's core: QEMU migration stream decoding, the postcopy state, the
//! engine that turns records into actions, and page tracking.
//!
//! `no_std`, no heap, safe Rust only (`forbid(unsafe_code)`), no panics on any input. It does no I/O: bytes come in from
//! the caller's receive ring, actions go out through the traits in [`ports`].
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(any(test, loom))]
extern crate std;

pub mod config;
pub mod decoder;
pub mod error;
pub mod layout;
pub mod ports;
pub mod postcopy;
pub mod qemu_state;
pub mod sync;
#[cfg(any(test, feature = "std"))]
pub mod testing;
pub mod wire;

pub use error::{Defect, Error, Field};

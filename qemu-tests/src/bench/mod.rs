//! Benchmarks run by `cargo xtask bench` (binary `postcopy-bench`): each measures our code
//! and the mechanism QEMU's destination uses for the same job, side by side, in one run.

pub mod discard;
pub mod e2e;
pub mod fault;
pub mod ingest;
pub mod responder;

use std::time::Duration;

/// Microseconds with two decimals.
pub fn us(d: Duration) -> String {
    format!("{:.2} µs", d.as_secs_f64() * 1e6)
}

/// Nanoseconds, no decimals.
pub fn ns(d: Duration) -> String {
    format!("{:.0} ns", d.as_secs_f64() * 1e9)
}

//! The hosted destination's machinery, shared by `postcopy-dest` and the benchmarks: the
//! agent's ports over host memory behind a real EPT/NPT table, and simulated vCPUs.

pub mod mem;
pub mod ports;
pub mod vcpu;

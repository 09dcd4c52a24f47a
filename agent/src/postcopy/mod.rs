//! The postcopy state machine, the state shared with the vCPUs, and the engine.

mod engine;
mod shared;
mod state;

pub use engine::{Break, Engine, EngineConfig, Progress, Stats};
pub use shared::{Access, Fault, FaultCounters, FaultError, RpSender, Shared};
pub use state::{State, StateCell};

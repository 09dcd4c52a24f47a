//! The postcopy state machine and the engine that drives it.

mod state;

pub use state::{State, StateCell};

//! The destination's postcopy state (`docs/wire-format.md` §7), shared between the stream context and the
//! vCPU contexts.
//!
//! # Who writes it, who reads it, and why compare-exchange is enough
//!
//! The seed's reviewers asked what the atomicity requirements of this variable are. Here they
//! are, per context:
//!
//! * **The stream context** (the one that decodes the migration stream; in the hypervisor,
//!   the vsock receive path; in `postcopy-dest`, the main thread) is the **only writer**. It
//!   changes the state only through [`StateCell::transition`], a compare-exchange from the
//!   state the command requires: NONE→ADVISE (ADVISE), ADVISE→DISCARD and DISCARD→DISCARD
//!   (RAM_DISCARD), ADVISE|DISCARD→LISTENING (LISTEN), LISTENING→RUNNING (RUN),
//!   RUNNING→END (final EOF; v5: POSTCOPY_END from any state but NONE), and for postcopy
//!   recovery RUNNING→PAUSED (the connection broke after RUN; a break during the recovery
//!   handshake leaves PAUSED as it is) and PAUSED→RUNNING (POSTCOPY_RESUME, under the
//!   return-path lock, see `shared`). The check and the
//!   change are one atomic step, so there is no window between "is the state right?" and
//!   "set it" (the race the review found in the v5 `postcopy_state_get` + `_set` pair). A
//!   failed exchange returns the actual state, which becomes the typed `WrongState` error.
//! * **vCPU contexts** (exit handlers; in `postcopy-dest`, the simulated vCPU threads) only
//!   **read** it, on a stage-2 fault, to decide whether a missing page may be requested
//!   (LISTENING or RUNNING) or is a guest error (NONE: nothing was advised, no page can be
//!   missing). They start running only after RUN, so the transitions they can observe are
//!   RUNNING→END and RUNNING⇄PAUSED; in PAUSED a fault parks as in RUNNING, but its request
//!   waits for the resume (it is sent then, with every other outstanding one).
//! * **Ordering**: transitions use `AcqRel` and reads `Acquire`. Everything the stream context
//!   did before RUN (the discards that cleared `received` bits, the block table) happens
//!   before the RUNNING store; a vCPU that reads RUNNING therefore sees all of it. Pages that
//!   arrive later are published by their own `received` bit (see `pages`), not by this state.
//! * A single writer means compare-exchange never fails between two *valid* transitions; it
//!   fails only when the stream is wrong (a command in the wrong state). That is the point:
//!   the atomic makes the invariant checkable, the single writer makes it simple.

use crate::sync::{AtomicU8, Ordering};

/// The postcopy states of QEMU 7.2 (`docs/wire-format.md` §7). The values are QEMU's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    /// No postcopy advised (plain precopy).
    None = 0,
    /// POSTCOPY_ADVISE received: postcopy may happen.
    Advise = 1,
    /// At least one RAM_DISCARD received.
    Discard = 2,
    /// POSTCOPY_LISTEN received: pages may arrive while device state loads.
    Listening = 3,
    /// POSTCOPY_RUN received: the vCPUs run; missing pages are requested.
    Running = 4,
    /// The final EOF (or v5 POSTCOPY_END) was received.
    End = 5,
    /// The connection broke after RUN: the vCPUs run and wait for missing pages until a new
    /// connection completes the recovery handshake (QEMU's `postcopy-paused`).
    Paused = 6,
}

impl State {
    /// The state with QEMU's number `v` (unknown numbers read as NONE).
    pub const fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Advise,
            2 => Self::Discard,
            3 => Self::Listening,
            4 => Self::Running,
            5 => Self::End,
            6 => Self::Paused,
            _ => Self::None,
        }
    }

    /// The name used in summaries and logs (`"RUNNING"`...).
    pub const fn name(self) -> &'static str {
        match self {
            Self::None => "NONE",
            Self::Advise => "ADVISE",
            Self::Discard => "DISCARD",
            Self::Listening => "LISTENING",
            Self::Running => "RUNNING",
            Self::End => "END",
            Self::Paused => "PAUSED",
        }
    }
}

/// The shared postcopy state: written by the stream context only, by compare-exchange.
#[derive(Debug)]
pub struct StateCell(AtomicU8);

impl Default for StateCell {
    fn default() -> Self {
        Self::new()
    }
}

impl StateCell {
    /// Starts in NONE.
    pub fn new() -> Self {
        Self(AtomicU8::new(State::None as u8))
    }

    /// The current state (any context).
    pub fn get(&self) -> State {
        State::from_u8(self.0.load(Ordering::Acquire))
    }

    /// Moves from `from` to `to` if the state is `from`; otherwise returns the actual state.
    /// Stream context only.
    pub fn transition(&self, from: State, to: State) -> Result<(), State> {
        self.0
            .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
            .map(|_| ())
            .map_err(State::from_u8)
    }

    /// Moves to `to` from the first of `from` that matches; otherwise returns the actual state.
    pub fn transition_from_any(&self, from: &[State], to: State) -> Result<State, State> {
        let mut actual = self.get();
        for &f in from {
            match self.transition(f, to) {
                Ok(()) => return Ok(f),
                Err(now) => actual = now,
            }
        }
        Err(actual)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_check_the_expected_state() {
        let s = StateCell::new();
        assert_eq!(s.transition(State::Advise, State::Listening), Err(State::None));
        assert_eq!(s.transition(State::None, State::Advise), Ok(()));
        assert_eq!(s.transition(State::None, State::Advise), Err(State::Advise));
        assert_eq!(
            s.transition_from_any(&[State::Advise, State::Discard], State::Listening),
            Ok(State::Advise)
        );
        assert_eq!(s.get(), State::Listening);
        assert_eq!(s.transition(State::Listening, State::Running), Ok(()));
        assert_eq!(s.transition(State::Running, State::Paused), Ok(()));
        assert_eq!(s.transition(State::Running, State::End), Err(State::Paused));
        assert_eq!(s.transition(State::Paused, State::Running), Ok(()));
        assert_eq!(s.transition(State::Running, State::End), Ok(()));
        assert_eq!(s.get().name(), "END");
    }
}

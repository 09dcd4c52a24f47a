//! The atomics and the lock the shared state uses: `core`/`spin` normally, `loom`'s when the
//! crate is model-checked (`RUSTFLAGS="--cfg loom"`, see `tests/loom.rs`).

#[cfg(loom)]
pub use loom::sync::atomic::{fence, AtomicU64, AtomicU8, Ordering};

#[cfg(not(loom))]
pub use core::sync::atomic::{fence, AtomicU64, AtomicU8, Ordering};

/// A mutual-exclusion lock (a spin lock in the hypervisor: critical sections are a few
/// hundred instructions and never sleep).
#[derive(Debug)]
pub struct Mutex<T> {
    #[cfg(not(loom))]
    inner: spin::Mutex<T>,
    #[cfg(loom)]
    inner: loom::sync::Mutex<T>,
}

impl<T> Mutex<T> {
    /// A new lock around `value`.
    pub fn new(value: T) -> Self {
        Self {
            #[cfg(not(loom))]
            inner: spin::Mutex::new(value),
            #[cfg(loom)]
            inner: loom::sync::Mutex::new(value),
        }
    }

    /// Runs `f` with the lock held.
    pub fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        #[cfg(not(loom))]
        let mut guard = self.inner.lock();
        #[cfg(loom)]
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }
}

//! Flush tokens: the invalidation a stage-2 edit still owes the CPU.

use super::format::Format;
use core::marker::PhantomData;

/// Which cached translations must go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Everything derived from one tree, named by its root pointer (EPTP or nCR3).
    Context {
        /// [`Stage2::root_pointer`](super::Stage2::root_pointer) of the edited tree.
        root: u64,
    },
    /// Everything, for every tree: what merging tokens of different trees asks for.
    AllContexts,
}

impl Scope {
    fn union(self, other: Scope) -> Scope {
        if self == other {
            self
        } else {
            Scope::AllContexts
        }
    }
}

/// Performs invalidations for tables of format `F`: INVEPT on Intel, a TLB_CONTROL request for
/// the next VMRUN on AMD (see [`invalidate`](super::invalidate)), a counter in tests.
pub trait Invalidate<F: Format> {
    /// Makes sure no CPU that runs the guest keeps a translation in `scope` that was cached
    /// before this call, by the time it next runs guest code.
    fn invalidate(&mut self, scope: Scope);
}

/// The invalidation a stage-2 edit needs before the guest can rely on it.
///
/// Must be consumed: [`flush`](Flush::flush) it, [`merge`](Flush::merge) it into another
/// token, or [`ignore`](Flush::ignore) it with a comment saying why that is sound. Dropping
/// one is a bug, and debug builds panic on it.
#[must_use = "the guest may keep using the old translation until this flush is performed"]
pub struct Flush<F: Format> {
    scope: Option<Scope>,
    _format: PhantomData<fn() -> F>,
}

impl<F: Format> Flush<F> {
    /// The edit changed nothing the CPU may have cached.
    pub(crate) fn nothing() -> Self {
        Self { scope: None, _format: PhantomData }
    }

    /// The edit changed or removed a present entry of the tree whose root pointer is `root`.
    pub(crate) fn context(root: u64) -> Self {
        Self { scope: Some(Scope::Context { root }), _format: PhantomData }
    }

    /// Whether flushing will invalidate anything.
    pub fn is_needed(&self) -> bool {
        self.scope.is_some()
    }

    /// What flushing will invalidate, if anything.
    pub fn scope(&self) -> Option<Scope> {
        self.scope
    }

    /// One token covering both edits, so a batch costs one invalidation.
    pub fn merge(self, other: Self) -> Self {
        let scope = match (self.take(), other.take()) {
            (Some(a), Some(b)) => Some(a.union(b)),
            (a, b) => a.or(b),
        };
        Self { scope, _format: PhantomData }
    }

    /// Performs the invalidation, if one is needed.
    pub fn flush<I: Invalidate<F> + ?Sized>(self, invalidate: &mut I) {
        if let Some(scope) = self.take() {
            invalidate.invalidate(scope);
        }
    }

    /// Drops the token without invalidating. Sound only when nothing can have cached the old
    /// entries, e.g. the tree has never been loaded on any CPU, or a full flush of the context
    /// already follows; say which at the call site.
    pub fn ignore(self) {
        let _ = self.take();
    }

    /// Disarms the drop check and hands out the scope.
    fn take(self) -> Option<Scope> {
        let scope = self.scope;
        core::mem::forget(self);
        scope
    }
}

impl<F: Format> Drop for Flush<F> {
    fn drop(&mut self) {
        // A panic that is already unwinding (a failed assertion holding a token) must not turn
        // into an abort that hides the real failure.
        #[cfg(test)]
        if std::thread::panicking() {
            return;
        }
        if cfg!(debug_assertions) {
            panic!(
                "stage-2 flush token dropped without flush() or ignore() ({} scope {:?})",
                F::NAME,
                self.scope
            );
        }
    }
}

impl<F: Format> core::fmt::Debug for Flush<F> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Flush").field("format", &F::NAME).field("scope", &self.scope).finish()
    }
}

//! What a [`Flush`](super::Flush) turns into on each vendor.
//!
//! - AMD: [`NextVmrunFlush`] records a TLB_CONTROL request that the VMRUN path writes into the
//!   VMCB (APM Vol. 2 §15.16.1). Plain Rust: the flush happens as part of VMRUN.
//! - Intel: `Invept` executes INVEPT (SDM Vol. 3C §29.4.3.1; instruction reference in Vol. 2)
//!   on the current logical processor. Only built for the image (`target_os = "none"`).
//!
//! Both act on one CPU. A guest with several vCPUs needs one per vCPU and an `Invalidate`
//! that reaches all of them (an IPI to each CPU running a vCPU) before the edit counts as done.

use super::flush::{Invalidate, Scope};
use super::npt::Npt;

/// VMCB TLB_CONTROL values (offset 0x58, bits 39:32; APM Vol. 2 §15.16.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum TlbControl {
    /// Keep the TLB.
    DoNothing = 0,
    /// Flush every entry, of every ASID: the only flush QEMU TCG implements.
    FlushAll = 1,
    /// Flush this guest's ASID only (needs the FlushByAsid feature, CPUID 0x8000000A EDX bit 6).
    FlushGuest = 3,
}

/// The TLB flush one vCPU's next VMRUN must request, accumulated from NPT flush tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NextVmrunFlush {
    pending: Option<Scope>,
    flush_by_asid: bool,
}

impl NextVmrunFlush {
    /// Nothing pending; `flush_by_asid` says whether the CPU has FlushByAsid.
    pub const fn new(flush_by_asid: bool) -> Self {
        Self { pending: None, flush_by_asid }
    }

    /// The TLB_CONTROL value for the VMRUN about to happen; clears the request. The VMRUN path
    /// writes it into the VMCB, and writes [`TlbControl::DoNothing`] back after the exit.
    pub fn take(&mut self) -> TlbControl {
        match self.pending.take() {
            None => TlbControl::DoNothing,
            Some(Scope::Context { .. }) if self.flush_by_asid => TlbControl::FlushGuest,
            Some(_) => TlbControl::FlushAll,
        }
    }
}

impl Invalidate<Npt> for NextVmrunFlush {
    fn invalidate(&mut self, scope: Scope) {
        self.pending = Some(match self.pending {
            Some(pending) if pending != scope => Scope::AllContexts,
            _ => scope,
        });
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "none"))]
pub use vmx::{invept, Invept, InveptFailed, InveptType};

#[cfg(all(target_arch = "x86_64", target_os = "none"))]
mod vmx {
    use super::super::ept::Ept;
    use super::{Invalidate, Scope};
    use core::arch::asm;
    use core::marker::PhantomData;

    /// What INVEPT invalidates (SDM Vol. 3C §29.4.3.1).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    #[repr(u64)]
    pub enum InveptType {
        /// Mappings derived from the EPTP in the descriptor.
        SingleContext = 1,
        /// Mappings derived from any EPTP.
        AllContexts = 2,
    }

    /// INVEPT reported VMfailInvalid or VMfailValid (CF or ZF set): an unsupported type or a
    /// malformed EPTP.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct InveptFailed;

    /// Invalidates cached EPT translations on this logical processor.
    ///
    /// # Safety
    /// The logical processor is in VMX root operation (after VMXON) at CPL 0, and supports
    /// INVEPT and `kind` (IA32_VMX_EPT_VPID_CAP bits 20, 25, 26). Otherwise the instruction
    /// raises #UD or #GP, which the hypervisor does not handle.
    pub unsafe fn invept(kind: InveptType, eptp: u64) -> Result<(), InveptFailed> {
        // The 128-bit INVEPT descriptor: EPTP, then 64 reserved bits that must be zero.
        let descriptor: [u64; 2] = [eptp, 0];
        let failed: u8;
        // SAFETY: the caller guarantees VMX root operation and support for `kind`; the
        // descriptor is a live, readable 16-byte local; INVEPT writes no memory and only
        // changes RFLAGS, which `setbe` reads.
        unsafe {
            asm!(
                "invept {kind}, [{descriptor}]",
                "setbe {failed}",
                kind = in(reg) kind as u64,
                descriptor = in(reg) &descriptor,
                failed = out(reg_byte) failed,
                options(nostack, readonly),
            );
        }
        if failed != 0 {
            Err(InveptFailed)
        } else {
            Ok(())
        }
    }

    /// Performs EPT flush tokens with INVEPT on the current logical processor.
    ///
    /// Not `Send`: VMX root operation belongs to one CPU.
    #[derive(Debug)]
    pub struct Invept {
        _this_cpu: PhantomData<*const ()>,
    }

    impl Invept {
        /// # Safety
        /// For as long as the value lives, the current logical processor stays in VMX root
        /// operation and supports single-context and all-context INVEPT.
        pub unsafe fn new() -> Self {
            Self { _this_cpu: PhantomData }
        }
    }

    impl Invalidate<Ept> for Invept {
        /// # Panics
        /// If INVEPT fails: the EPTP is malformed or the CPU lacks the type, a setup bug. Going
        /// on would leave the guest translations to pages it no longer owns.
        fn invalidate(&mut self, scope: Scope) {
            let (kind, eptp) = match scope {
                Scope::Context { root } => (InveptType::SingleContext, root),
                Scope::AllContexts => (InveptType::AllContexts, 0),
            };
            // SAFETY: `Invept::new`'s caller promised VMX root operation on this CPU with both
            // INVEPT types for the life of `self`, and `self` cannot move to another CPU.
            let result = unsafe { invept(kind, eptp) };
            if result.is_err() {
                panic!("INVEPT {kind:?} failed for EPTP {eptp:#x}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_pending_means_do_nothing() {
        assert_eq!(NextVmrunFlush::new(true).take(), TlbControl::DoNothing);
    }

    #[test]
    fn context_flush_uses_asid_flush_when_available() {
        let mut with_asid = NextVmrunFlush::new(true);
        with_asid.invalidate(Scope::Context { root: 0x1000 });
        assert_eq!(with_asid.take(), TlbControl::FlushGuest);
        assert_eq!(with_asid.take(), TlbControl::DoNothing);

        let mut tcg = NextVmrunFlush::new(false);
        tcg.invalidate(Scope::Context { root: 0x1000 });
        assert_eq!(tcg.take(), TlbControl::FlushAll);
    }

    #[test]
    fn two_different_contexts_flush_everything() {
        let mut flush = NextVmrunFlush::new(true);
        flush.invalidate(Scope::Context { root: 0x1000 });
        flush.invalidate(Scope::Context { root: 0x2000 });
        assert_eq!(flush.take(), TlbControl::FlushAll);
    }
}

//! CPU virtualization behind one vendor-neutral interface: a vCPU that runs until the next
//! exit, and the exit reasons the image handles. The AMD SVM backend is in [`svm`]; the Intel
//! VMX backend mirrors it file for file.

pub mod svm;

pub use agent::postcopy::Access;

/// The guest's general registers that the CPU does not keep in the vendor's control block
/// (SVM keeps RAX and RSP in the VMCB; the exit stub saves and restores the rest).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GuestRegs {
    /// RBX.
    pub rbx: u64,
    /// RCX.
    pub rcx: u64,
    /// RDX.
    pub rdx: u64,
    /// RSI.
    pub rsi: u64,
    /// RDI.
    pub rdi: u64,
    /// RBP.
    pub rbp: u64,
    /// R8.
    pub r8: u64,
    /// R9.
    pub r9: u64,
    /// R10.
    pub r10: u64,
    /// R11.
    pub r11: u64,
    /// R12.
    pub r12: u64,
    /// R13.
    pub r13: u64,
    /// R14.
    pub r14: u64,
    /// R15.
    pub r15: u64,
}

/// Why the guest stopped running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// A guest access found no stage-2 mapping (AMD #NPF, Intel EPT violation).
    NestedPageFault {
        /// The guest-physical address.
        gpa: u64,
        /// The kind of access.
        access: Access,
    },
    /// VMMCALL / VMCALL: a call from the guest to the hypervisor.
    Hypercall,
    /// CPUID.
    Cpuid,
    /// HLT.
    Hlt,
    /// IN or OUT.
    Io {
        /// The port.
        port: u16,
        /// OUT (true) or IN.
        write: bool,
        /// Bytes: 1, 2 or 4.
        size: u8,
        /// A string instruction (INS/OUTS), possibly REP.
        string: bool,
    },
    /// A physical interrupt arrived (the host's timer): nothing for the guest.
    Interrupt,
    /// The guest triple-faulted (SVM SHUTDOWN).
    Shutdown,
    /// An exception the guest took that the hypervisor intercepts (vector, error code).
    Exception {
        /// The vector.
        vector: u8,
        /// The error code, if the exception has one (0 otherwise).
        error: u64,
    },
    /// The CPU refused to enter the guest (SVM VMEXIT_INVALID: inconsistent guest state).
    InvalidState,
    /// Anything else, undecoded: the vendor's exit code and its two information fields.
    Other {
        /// The exit code.
        code: u64,
        /// First information field.
        info1: u64,
        /// Second information field.
        info2: u64,
    },
}

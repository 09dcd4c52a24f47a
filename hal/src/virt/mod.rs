//! CPU virtualization behind one vendor-neutral interface ([`Vcpu`]): a vCPU loaded with an
//! architectural state, run until its next exit, and the exit reasons the image handles. The
//! AMD SVM backend is in [`svm`], the Intel VMX backend in [`vmx`]; they mirror each other
//! file for file (`vmcb`/`vmcs`, `exit`, `vcpu`). The image picks one at boot from CPUID and
//! is monomorphized over it.

pub mod svm;
pub mod vmx;

pub use agent::postcopy::Access;

use crate::stage2::{Format, Invalidate};

/// The guest's general registers, RSP aside (both vendors keep it in their control block).
/// The exit stubs save and restore them; SVM's keeps RAX in the VMCB and copies it here.
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
    /// RAX.
    pub rax: u64,
}

// The exit stubs address `GuestRegs` by these offsets.
const _: () = {
    use core::mem::offset_of;
    assert!(offset_of!(GuestRegs, rbx) == 0 && offset_of!(GuestRegs, rcx) == 8);
    assert!(offset_of!(GuestRegs, rdx) == 16 && offset_of!(GuestRegs, rsi) == 24);
    assert!(offset_of!(GuestRegs, rdi) == 32 && offset_of!(GuestRegs, rbp) == 40);
    assert!(offset_of!(GuestRegs, r8) == 48 && offset_of!(GuestRegs, r15) == 104);
    assert!(offset_of!(GuestRegs, rax) == 112);
};

/// Exit-stub assembly: loads the guest's RBX, RCX, RDX, RSI, RBP and R8-R15 from the
/// [`GuestRegs`] that RDI points at (RDI itself last, by the stub; RAX and RSP are the
/// vendor's business).
#[cfg(all(target_arch = "x86_64", target_os = "none"))]
macro_rules! load_guest_regs {
    () => {
        "mov rbx, [rdi + 0]\n mov rcx, [rdi + 8]\n mov rdx, [rdi + 16]\n mov rsi, [rdi + 24]\n \
         mov rbp, [rdi + 40]\n mov r8, [rdi + 48]\n mov r9, [rdi + 56]\n mov r10, [rdi + 64]\n \
         mov r11, [rdi + 72]\n mov r12, [rdi + 80]\n mov r13, [rdi + 88]\n mov r14, [rdi + 96]\n \
         mov r15, [rdi + 104]\n"
    };
}

/// Exit-stub assembly: stores the same registers into the [`GuestRegs`] at RDI.
#[cfg(all(target_arch = "x86_64", target_os = "none"))]
macro_rules! store_guest_regs {
    () => {
        "mov [rdi + 0], rbx\n mov [rdi + 8], rcx\n mov [rdi + 16], rdx\n mov [rdi + 24], rsi\n \
         mov [rdi + 40], rbp\n mov [rdi + 48], r8\n mov [rdi + 56], r9\n mov [rdi + 64], r10\n \
         mov [rdi + 72], r11\n mov [rdi + 80], r12\n mov [rdi + 88], r13\n mov [rdi + 96], r14\n \
         mov [rdi + 104], r15\n"
    };
}

/// Exit-stub assembly: saves the host's callee-saved registers (System V) on its stack.
#[cfg(all(target_arch = "x86_64", target_os = "none"))]
macro_rules! push_host_regs {
    () => {
        "push rbx\n push rbp\n push r12\n push r13\n push r14\n push r15\n"
    };
}

/// Exit-stub assembly: restores what [`push_host_regs`] saved.
#[cfg(all(target_arch = "x86_64", target_os = "none"))]
macro_rules! pop_host_regs {
    () => {
        "pop r15\n pop r14\n pop r13\n pop r12\n pop rbp\n pop rbx\n"
    };
}

#[cfg(all(target_arch = "x86_64", target_os = "none"))]
pub(crate) use {load_guest_regs, pop_host_regs, push_host_regs, store_guest_regs};

/// A segment register, with SVM's compact attributes (type, S, DPL, P in bits 0-7; AVL, L,
/// D/B, G in bits 8-11): the form the project's vCPU record carries.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SegmentState {
    /// Selector.
    pub selector: u16,
    /// Attributes.
    pub attrib: u16,
    /// Limit.
    pub limit: u32,
    /// Base.
    pub base: u64,
}

/// Index of each segment in [`ArchState::segs`].
pub mod seg {
    /// ES.
    pub const ES: usize = 0;
    /// CS.
    pub const CS: usize = 1;
    /// SS.
    pub const SS: usize = 2;
    /// DS.
    pub const DS: usize = 3;
    /// FS.
    pub const FS: usize = 4;
    /// GS.
    pub const GS: usize = 5;
}

/// The architectural state a vCPU resumes from (what the migrated vCPU record holds).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ArchState {
    /// General registers.
    pub regs: GuestRegs,
    /// RSP.
    pub rsp: u64,
    /// RIP.
    pub rip: u64,
    /// RFLAGS.
    pub rflags: u64,
    /// CR0.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// EFER.
    pub efer: u64,
    /// CR2.
    pub cr2: u64,
    /// ES, CS, SS, DS, FS, GS (in that order, the order of their encodings in both vendors'
    /// manuals and in QEMU's `segs[]`).
    pub segs: [SegmentState; 6],
    /// LDTR.
    pub ldtr: SegmentState,
    /// TR; `None` gives the guest a busy 64-bit TSS at 0 (a guest that never loaded TR).
    pub tr: Option<SegmentState>,
    /// GDTR base and limit.
    pub gdtr: (u64, u32),
    /// IDTR base and limit.
    pub idtr: (u64, u32),
}

/// A vCPU of one vendor: loaded with a state, run until its next exit.
pub trait Vcpu {
    /// "svm" or "vmx".
    const VENDOR: &'static str;
    /// The stage-2 table format the vendor walks (NPT or EPT).
    type Format: Format;
    /// Where the table's flush tokens go: a request for the next VMRUN (SVM) or INVEPT at
    /// once (VMX).
    type Invalidate: Invalidate<Self::Format>;

    /// Loads the state the guest resumes from.
    fn load(&mut self, state: &ArchState);
    /// Runs the guest until its next exit, after the flush `pending` owes.
    fn run(&mut self, pending: &mut Self::Invalidate) -> ExitReason;
    /// The general registers.
    fn regs(&mut self) -> &mut GuestRegs;
    /// The guest's RIP.
    fn rip(&mut self) -> u64;
    /// Moves RIP past the instruction that caused the exit `reason` (VMMCALL/VMCALL, CPUID,
    /// HLT, IN/OUT).
    fn skip_instruction(&mut self, reason: &ExitReason);
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
    /// The CPU refused to enter the guest (SVM VMEXIT_INVALID, VMX exit reason 33 with the
    /// entry-failure bit: inconsistent guest state).
    InvalidState,
    /// VMLAUNCH/VMRESUME failed before entering (VMX VMfailValid / VMfailInvalid), with the
    /// VM-instruction error number (0 for VMfailInvalid).
    EntryFailed {
        /// The VM-instruction error (SDM Vol. 3C §31.4).
        error: u64,
    },
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

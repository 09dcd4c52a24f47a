//! Decoding VMX exits (SDM Vol. 3C appendix C, basic exit reasons; §28.2.1 exit
//! qualifications) into the vendor-neutral [`ExitReason`].

use crate::virt::{Access, ExitReason};

/// Exception or NMI.
pub const EXCEPTION_OR_NMI: u32 = 0;
/// External interrupt.
pub const EXTERNAL_INTERRUPT: u32 = 1;
/// Triple fault.
pub const TRIPLE_FAULT: u32 = 2;
/// CPUID.
pub const CPUID: u32 = 10;
/// HLT.
pub const HLT: u32 = 12;
/// VMCALL.
pub const VMCALL: u32 = 18;
/// I/O instruction.
pub const IO_INSTRUCTION: u32 = 30;
/// VM entry failed: invalid guest state.
pub const INVALID_GUEST_STATE: u32 = 33;
/// EPT violation.
pub const EPT_VIOLATION: u32 = 48;
/// EPT misconfiguration.
pub const EPT_MISCONFIG: u32 = 49;
/// Bit 31 of the exit reason: the VM entry failed.
pub const ENTRY_FAILURE: u32 = 1 << 31;

/// The exit reason of an exit with this basic reason field, qualification, guest-physical
/// address (EPT violations) and interruption information (exceptions).
pub fn decode(reason: u32, qualification: u64, gpa: u64, interruption: u32, error: u32) -> ExitReason {
    if reason & ENTRY_FAILURE != 0 {
        return ExitReason::InvalidState;
    }
    match reason & 0xffff {
        EPT_VIOLATION => {
            // Qualification bits 0, 1, 2: the access was a read, a write, a fetch.
            let access = if qualification & 0b100 != 0 {
                Access::Execute
            } else if qualification & 0b010 != 0 {
                Access::Write
            } else {
                Access::Read
            };
            ExitReason::NestedPageFault { gpa, access }
        }
        VMCALL => ExitReason::Hypercall,
        CPUID => ExitReason::Cpuid,
        HLT => ExitReason::Hlt,
        IO_INSTRUCTION => ExitReason::Io {
            port: (qualification >> 16) as u16,
            write: qualification & (1 << 3) == 0,
            size: (qualification & 0b111) as u8 + 1,
            string: qualification & (1 << 4) != 0,
        },
        EXTERNAL_INTERRUPT => ExitReason::Interrupt,
        TRIPLE_FAULT => ExitReason::Shutdown,
        INVALID_GUEST_STATE => ExitReason::InvalidState,
        // Interruption information: vector in bits 7:0, bit 11 an error code is valid.
        EXCEPTION_OR_NMI => ExitReason::Exception {
            vector: interruption as u8,
            error: if interruption & (1 << 11) != 0 { u64::from(error) } else { 0 },
        },
        basic => ExitReason::Other { code: u64::from(basic), info1: qualification, info2: gpa },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ept_violations_name_the_address_and_the_access() {
        // What Bochs reported for a read of an unmapped page (qualification 0x181: a read,
        // the linear address valid, a translation of it).
        assert_eq!(
            decode(48, 0x181, 0x20_3000, 0, 0),
            ExitReason::NestedPageFault { gpa: 0x20_3000, access: Access::Read }
        );
        assert_eq!(
            decode(48, 0x182, 0x1000, 0, 0),
            ExitReason::NestedPageFault { gpa: 0x1000, access: Access::Write }
        );
        assert_eq!(
            decode(48, 0x184, 0x10000, 0, 0),
            ExitReason::NestedPageFault { gpa: 0x10000, access: Access::Execute }
        );
    }

    #[test]
    fn io_exits_decode_port_direction_and_size() {
        // OUT 0xe9, al: size 1 (bits 2:0 = 0), direction out; IN eax, dx from 0x40.
        assert_eq!(
            decode(30, 0x00e9_0000, 0, 0, 0),
            ExitReason::Io { port: 0xe9, write: true, size: 1, string: false }
        );
        assert_eq!(
            decode(30, 0x0040_000b, 0, 0, 0),
            ExitReason::Io { port: 0x40, write: false, size: 4, string: false }
        );
        assert_eq!(
            decode(30, 0x03f8_0010, 0, 0, 0),
            ExitReason::Io { port: 0x3f8, write: true, size: 1, string: true }
        );
    }

    #[test]
    fn other_exits() {
        assert_eq!(decode(18, 0, 0, 0, 0), ExitReason::Hypercall);
        assert_eq!(decode(10, 0, 0, 0, 0), ExitReason::Cpuid);
        assert_eq!(decode(12, 0, 0, 0, 0), ExitReason::Hlt);
        assert_eq!(decode(1, 0, 0, 0, 0), ExitReason::Interrupt);
        assert_eq!(decode(2, 0, 0, 0, 0), ExitReason::Shutdown);
        assert_eq!(decode(33 | ENTRY_FAILURE, 0, 0, 0, 0), ExitReason::InvalidState);
        assert_eq!(decode(0, 0, 0, 0x80000b0e, 2), ExitReason::Exception { vector: 14, error: 2 });
        assert_eq!(decode(0, 0, 0, 0x80000306, 0), ExitReason::Exception { vector: 6, error: 0 });
        assert_eq!(decode(49, 0, 0x5000, 0, 0), ExitReason::Other { code: 49, info1: 0, info2: 0x5000 });
    }
}

//! Decoding SVM exits (APM Vol. 2 appendix C, exit codes; §15.25.6 #NPF information; §15.10.2
//! IOIO information) into the vendor-neutral [`ExitReason`].

use crate::virt::{Access, ExitReason};

/// First exception exit code: `0x40 + vector`.
const EXCEPTION_BASE: u64 = 0x40;
/// Physical interrupt.
pub const VMEXIT_INTR: u64 = 0x60;
/// CPUID.
pub const VMEXIT_CPUID: u64 = 0x72;
/// HLT.
pub const VMEXIT_HLT: u64 = 0x78;
/// IN/OUT.
pub const VMEXIT_IOIO: u64 = 0x7b;
/// Triple fault.
pub const VMEXIT_SHUTDOWN: u64 = 0x7f;
/// VMMCALL.
pub const VMEXIT_VMMCALL: u64 = 0x81;
/// Nested page fault.
pub const VMEXIT_NPF: u64 = 0x400;
/// VMRUN found the guest state invalid (-1).
pub const VMEXIT_INVALID: u64 = u64::MAX;

/// Exceptions that push an error code (their exits carry it in EXITINFO1).
const WITH_ERROR_CODE: u32 = 1 << 8 | 1 << 10 | 1 << 11 | 1 << 12 | 1 << 13 | 1 << 14 | 1 << 17 | 1 << 21;

/// The exit reason of an exit with this code and information fields.
pub fn decode(code: u64, info1: u64, info2: u64) -> ExitReason {
    match code {
        VMEXIT_NPF => {
            // Error code bits: 1 the access was a write, 4 an instruction fetch.
            let access = if info1 & (1 << 4) != 0 {
                Access::Execute
            } else if info1 & (1 << 1) != 0 {
                Access::Write
            } else {
                Access::Read
            };
            ExitReason::NestedPageFault { gpa: info2, access }
        }
        VMEXIT_VMMCALL => ExitReason::Hypercall,
        VMEXIT_CPUID => ExitReason::Cpuid,
        VMEXIT_HLT => ExitReason::Hlt,
        VMEXIT_IOIO => ExitReason::Io {
            port: (info1 >> 16) as u16,
            write: info1 & 1 == 0,
            size: ((info1 >> 4) & 0b111) as u8,
            string: info1 & (1 << 2) != 0,
        },
        VMEXIT_INTR => ExitReason::Interrupt,
        VMEXIT_SHUTDOWN => ExitReason::Shutdown,
        VMEXIT_INVALID => ExitReason::InvalidState,
        c if (EXCEPTION_BASE..EXCEPTION_BASE + 32).contains(&c) => {
            let vector = (c - EXCEPTION_BASE) as u8;
            let error = if WITH_ERROR_CODE & (1 << vector) != 0 { info1 } else { 0 };
            ExitReason::Exception { vector, error }
        }
        _ => ExitReason::Other { code, info1, info2 },
    }
}

/// Length of the intercepted instruction, for the exits whose next RIP the hypervisor must
/// compute itself (no NRIP save under QEMU TCG): VMMCALL `0f 01 d9` and CPUID `0f a2`; HLT
/// `f4`. IN/OUT give the next RIP in EXITINFO2.
pub const fn instruction_len(reason: &ExitReason) -> Option<u64> {
    match reason {
        ExitReason::Hypercall => Some(3),
        ExitReason::Cpuid => Some(2),
        ExitReason::Hlt => Some(1),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_page_faults_name_the_address_and_the_access() {
        // What QEMU TCG reported for a read of an unmapped page (design notes): 0x100000004.
        assert_eq!(
            decode(0x400, 0x1_0000_0004, 0x20_3000),
            ExitReason::NestedPageFault { gpa: 0x20_3000, access: Access::Read }
        );
        assert_eq!(
            decode(0x400, 0x1_0000_0006, 0x1000),
            ExitReason::NestedPageFault { gpa: 0x1000, access: Access::Write }
        );
        assert_eq!(
            decode(0x400, 0x2_0000_0014, 0x10000),
            ExitReason::NestedPageFault { gpa: 0x10000, access: Access::Execute }
        );
    }

    #[test]
    fn io_exits_decode_port_direction_and_size() {
        // OUT dx, al to 0x3f8; IN eax, dx from 0x40 (string: no).
        assert_eq!(
            decode(0x7b, 0x03f8_0010, 0),
            ExitReason::Io { port: 0x3f8, write: true, size: 1, string: false }
        );
        assert_eq!(
            decode(0x7b, 0x0040_0041, 0),
            ExitReason::Io { port: 0x40, write: false, size: 4, string: false }
        );
        assert_eq!(
            decode(0x7b, 0x0060_0015, 0),
            ExitReason::Io { port: 0x60, write: false, size: 1, string: true }
        );
    }

    #[test]
    fn other_exits() {
        assert_eq!(decode(0x81, 0, 0), ExitReason::Hypercall);
        assert_eq!(instruction_len(&decode(0x81, 0, 0)), Some(3));
        assert_eq!(decode(0x72, 0, 0), ExitReason::Cpuid);
        assert_eq!(decode(0x78, 0, 0), ExitReason::Hlt);
        assert_eq!(decode(0x60, 0, 0), ExitReason::Interrupt);
        assert_eq!(decode(0x7f, 0, 0), ExitReason::Shutdown);
        assert_eq!(decode(u64::MAX, 0, 0), ExitReason::InvalidState);
        assert_eq!(decode(0x40 + 14, 0x2, 0xdead), ExitReason::Exception { vector: 14, error: 2 });
        assert_eq!(decode(0x40 + 6, 0x2, 0), ExitReason::Exception { vector: 6, error: 0 });
        assert_eq!(decode(0x7c, 1, 2), ExitReason::Other { code: 0x7c, info1: 1, info2: 2 });
        assert_eq!(instruction_len(&decode(0x7c, 1, 2)), None);
    }
}

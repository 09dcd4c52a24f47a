//! AMD SVM: the VMCB ([`vmcb`]), exit decoding ([`exit`]) and, in the image, the vCPU that
//! runs a guest with nested paging ([`vcpu`]). References are to the AMD64 Architecture
//! Programmer's Manual, Volume 2 (APM), chapter 15 and appendix B.

pub mod exit;
#[cfg(all(target_arch = "x86_64", target_os = "none"))]
pub mod vcpu;
pub mod vmcb;

//! Intel VMX: VMCS field encodings ([`vmcs`]), exit decoding ([`exit`]) and, in the image, the
//! vCPU that runs a guest with EPT ([`vcpu`]). References are to the Intel SDM, Volume 3C
//! (chapters 24-29 and appendices A-C).

pub mod exit;
#[cfg(all(target_arch = "x86_64", target_os = "none"))]
pub mod vcpu;
pub mod vmcs;

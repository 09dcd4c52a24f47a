//! Host-side support for driving real QEMU 7.2: finding/installing QEMU, building the
//! dirty test guest, a QMP client, the source VM, stream captures, and running the
//! hosted destination `postcopy-dest`.
//!
//! `bochs` runs the hypervisor image (any multiboot kernel) under Bochs, from a GRUB ISO.
//!
//! Every QEMU runs with `-accel tcg` (KVM guests make no progress on this machine),
//! and every child process is killed when its handle is dropped.

pub mod baseline;
pub mod bench;
pub mod bochs;
pub mod capture;
pub mod dest;
pub mod discard_study;
pub mod guest;
pub mod hosted;
pub mod image;
pub mod image_qemu;
pub mod install;
pub mod oracle;
pub mod own_source;
pub mod pattern_guest;
pub mod process;
pub mod qmp;
pub mod ram;
pub mod recovery;
pub mod relay;
pub mod scenario;
pub mod source;
pub mod vsock;

use std::fmt;
use std::path::PathBuf;

/// An error from the harness, with a message meant for a human.
#[derive(Debug)]
pub struct Error(pub String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error(format!("I/O error: {e}"))
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error(format!("JSON error: {e}"))
    }
}

/// The harness's result type.
pub type Result<T> = std::result::Result<T, Error>;

/// Returns early with an [`Error`] built from a format string.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::Error(format!($($arg)*)))
    };
}

/// The workspace root (the parent of the `qemu-tests` crate).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` or `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        _ => workspace_root().join("target"),
    }
}

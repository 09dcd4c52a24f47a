//! Prerequisites: QEMU 7.2, objcopy, the bare-metal Rust target. Installed with apt-get /
//! rustup when missing (apt only as root); otherwise a clear message.

use std::process::Command;

/// The QEMU version the tests and captures were made with.
const QEMU_VERSION: &str = "version 7.2.";

fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_root() -> bool {
    output("id", &["-u"]).is_some_and(|u| u.trim() == "0")
}

fn apt_install(package: &str) -> bool {
    if !is_root() {
        eprintln!(
            "xtask: missing {package}; not root, so not installing it. Run: \
             apt-get install -y --no-install-recommends {package}"
        );
        return false;
    }
    let mut update = Command::new("apt-get");
    update.arg("update");
    let mut install = Command::new("apt-get");
    install
        .args(["install", "-y", "--no-install-recommends", package])
        .env("DEBIAN_FRONTEND", "noninteractive");
    crate::run(update) && crate::run(install)
}

/// `qemu-system-x86_64` 7.2 is installed (installs `qemu-system-x86` if missing).
pub fn qemu() -> bool {
    let version = || output("qemu-system-x86_64", &["--version"]);
    let v = match version() {
        Some(v) => v,
        None => {
            if !apt_install("qemu-system-x86") {
                return false;
            }
            match version() {
                Some(v) => v,
                None => {
                    eprintln!("xtask: qemu-system-x86_64 still missing after apt-get");
                    return false;
                }
            }
        }
    };
    let first = v.lines().next().unwrap_or_default();
    if !first.contains(QEMU_VERSION) {
        eprintln!("xtask: need QEMU 7.2 (Debian 12 qemu-system-x86), found `{first}`");
        return false;
    }
    println!("xtask: {first}");
    true
}

/// `objcopy` (binutils) or `rust-objcopy` exists (installs binutils if missing).
pub fn objcopy() -> bool {
    let found = |p: &str| output(p, &["--version"]).is_some();
    found("objcopy") || found("rust-objcopy") || apt_install("binutils")
}

/// The `x86_64-unknown-none` target is installed for the pinned toolchain.
pub fn bare_metal_target() -> bool {
    let mut list = Command::new("rustup");
    list.current_dir(crate::root()).args(["target", "list", "--installed"]);
    let installed = list
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("x86_64-unknown-none"))
        .unwrap_or(false);
    if installed {
        return true;
    }
    let mut add = Command::new("rustup");
    add.current_dir(crate::root()).args(["target", "add", "x86_64-unknown-none"]);
    crate::run(add)
}

/// `cargo-fuzz`, installed into `<target>/tools` when missing (a registry crate, built
/// here); returns the directory holding the binary.
pub fn cargo_fuzz() -> Option<std::path::PathBuf> {
    let root = crate::target_dir().join("tools");
    let bin = root.join("bin");
    if bin.join("cargo-fuzz").exists() {
        return Some(bin);
    }
    let mut install = crate::cargo();
    install.args(["install", "cargo-fuzz", "--locked", "--root"]).arg(&root);
    if crate::run(install) {
        Some(bin)
    } else {
        eprintln!("xtask: could not install cargo-fuzz (cargo install cargo-fuzz) into {}", root.display());
        None
    }
}

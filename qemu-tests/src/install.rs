//! Finding QEMU 7.2 (`qemu-system-x86_64`), installing it with apt when running as root.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use crate::process::run;
use crate::{bail, Error, Result};

/// The QEMU binary the harness drives.
pub const QEMU: &str = "qemu-system-x86_64";

/// The version every capture and test was made with.
pub const QEMU_VERSION: &str = "7.2";

/// Finds `name` in `$PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// True when the process runs as root (uid 0).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|uid| uid == "0"))
        })
        .unwrap_or(false)
}

/// The first line of `qemu-system-x86_64 --version`.
pub fn qemu_version(qemu: &Path) -> Result<String> {
    let mut cmd = Command::new(qemu);
    cmd.arg("--version");
    let out = run(cmd, Duration::from_secs(20))?;
    Ok(out.lines().next().unwrap_or_default().to_string())
}

/// Installs QEMU with apt-get (Debian 12 ships 7.2). Needs root.
pub fn apt_install_qemu() -> Result<()> {
    if !is_root() {
        bail!(
            "{QEMU} is not installed and this process is not root: install it with \
             `apt-get install -y --no-install-recommends qemu-system-x86` (QEMU {QEMU_VERSION}, Debian 12)"
        );
    }
    let mut update = Command::new("apt-get");
    update.arg("update");
    run(update, Duration::from_secs(600))?;
    let mut install = Command::new("apt-get");
    install
        .args(["install", "-y", "--no-install-recommends", "qemu-system-x86"])
        .env("DEBIAN_FRONTEND", "noninteractive");
    run(install, Duration::from_secs(1200))?;
    Ok(())
}

/// The path of a QEMU 7.2 `qemu-system-x86_64`, installing it first if it is missing and
/// we are root. Fails if it is missing (not root) or is not version 7.2.
pub fn qemu() -> Result<PathBuf> {
    static FOUND: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    FOUND.get_or_init(|| find_or_install().map_err(|e| e.0)).clone().map_err(Error)
}

fn find_or_install() -> Result<PathBuf> {
    let qemu = match which(QEMU) {
        Some(p) => p,
        None => {
            apt_install_qemu()?;
            match which(QEMU) {
                Some(p) => p,
                None => bail!("apt-get installed qemu-system-x86 but {QEMU} is not in PATH"),
            }
        }
    };
    let version = qemu_version(&qemu)?;
    if !version.contains(&format!("version {QEMU_VERSION}.")) {
        bail!(
            "{} is `{version}`, but the tests need QEMU {QEMU_VERSION} (Debian 12's qemu-system-x86)",
            qemu.display()
        );
    }
    Ok(qemu)
}

/// Finds `objcopy` (binutils) or `rust-objcopy`.
pub fn objcopy() -> Result<PathBuf> {
    if let Some(p) = which("objcopy").or_else(|| which("rust-objcopy")) {
        return Ok(p);
    }
    if is_root() {
        let mut install = Command::new("apt-get");
        install
            .args(["install", "-y", "--no-install-recommends", "binutils"])
            .env("DEBIAN_FRONTEND", "noninteractive");
        run(install, Duration::from_secs(600))?;
        if let Some(p) = which("objcopy") {
            return Ok(p);
        }
    }
    bail!("objcopy not found: install binutils (`apt-get install binutils`) or cargo-binutils")
}

/// Installs Debian `packages` with `apt-get install -y --no-install-recommends` (no
/// questions asked); if that fails, runs `apt-get update` and tries once more (a fresh
/// machine may have no package lists yet). Needs root.
pub fn apt_install(packages: &[&str]) -> Result<()> {
    if !is_root() {
        bail!("installing {} needs root (apt-get)", packages.join(" "));
    }
    let install = || {
        let mut cmd = Command::new("apt-get");
        cmd.args(["install", "-y", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive");
        run(cmd, Duration::from_secs(1200))
    };
    if install().is_ok() {
        return Ok(());
    }
    let mut update = Command::new("apt-get");
    update.arg("update").env("DEBIAN_FRONTEND", "noninteractive");
    run(update, Duration::from_secs(600))?;
    install().map(|_| ())
}

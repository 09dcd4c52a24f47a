//! Links the image with `linker/hypervisor.ld` (PVH note, loaded at 1 MiB), statically, and
//! defmt's `defmt.x` (the `.defmt` section the host decoder reads).
use std::path::PathBuf;

fn main() {
    // The host build (workspace-wide `cargo build`/`test`) is an empty program: no script.
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("none") {
        return;
    }
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let script = dir.join("../linker/hypervisor.ld");
    let script = script.canonicalize().unwrap_or(script);
    println!("cargo:rerun-if-changed={}", script.display());
    println!("cargo:rustc-link-arg-bins=-T{}", script.display());
    println!("cargo:rustc-link-arg-bins=--no-pie");
    // defmt's table of interned strings (its crate puts defmt.x on the search path).
    println!("cargo:rustc-link-arg-bins=-Tdefmt.x");
}

//! The reference for what a stream means: load a recorded stream into QEMU 7.2's own
//! destination (paused, `-incoming defer -S`) and read its RAM.
//!
//! Why not compare with the source's RAM: under TCG the 7.2 source can lose dirty bits of
//! pages that the guest rewrote after their last send, so the stream (and any correct
//! destination) may hold older contents of a few pages than the source's RAM at the end.

use std::path::Path;
use std::time::Duration;

use serde_json::json;

use crate::source::{SourceVm, SourceVmBuilder};
use crate::{bail, Result};

/// Loads `stream` into a QEMU started like `source` (same machine, memory, devices and
/// kernel, so the same RAM blocks) plus `-incoming defer -S`, with `postcopy-ram` on (so
/// that postcopy streams load too; the return path goes nowhere). Returns main RAM as
/// [`crate::source::SourceVm::read_ram`] reads it (holes zeroed).
pub fn qemu_load(source: &SourceVmBuilder, stream: &Path, timeout: Duration) -> Result<Vec<u8>> {
    let mut vm = loaded_destination(source, stream, timeout)?;
    let ram = vm.read_ram()?;
    vm.quit()?;
    Ok(ram)
}

/// A paused QEMU destination started like `source` that has loaded `stream`.
fn loaded_destination(source: &SourceVmBuilder, stream: &Path, timeout: Duration) -> Result<SourceVm> {
    let path = std::path::absolute(stream)?.display().to_string();
    if path.contains('\'') {
        bail!("the stream path must not contain a quote: {path}");
    }
    let mut vm = source.clone().incoming("defer").spawn()?;
    vm.set_capabilities(&[("postcopy-ram", true)])?;
    vm.execute("migrate-incoming", json!({ "uri": format!("exec:cat '{path}'") }))?;
    vm.wait_status(&["completed"], timeout)
        .map_err(|e| crate::Error(format!("QEMU could not load {path}: {e}; {}", vm.stderr())))?;
    Ok(vm)
}

/// Every RAMBlock of a stream as QEMU 7.2 holds it after loading the stream: QEMU's
/// destination (as in [`qemu_load`]) loads `stream`, then migrates itself, paused, to a file
/// in precopy; that second stream carries every page of every block (`pc.ram`, `pc.bios`,
/// the option ROMs, the fw_cfg blobs, video RAM), and is decoded here by the agent (whose
/// precopy decoding the captures' hashes check independently). Block idstr → contents.
pub fn qemu_load_blocks(
    source: &SourceVmBuilder,
    stream: &Path,
    timeout: Duration,
) -> Result<std::collections::BTreeMap<String, Vec<u8>>> {
    let dir = tempfile::Builder::new().prefix("oracle-").tempdir()?;
    let out = dir.path().join("reference.bin");
    let output = out.display().to_string();
    if output.contains('\'') {
        bail!("the output path must not contain a quote: {output}");
    }
    let mut vm = loaded_destination(source, stream, timeout)?;
    // An exec: migration has no return path, which postcopy-ram would require.
    vm.set_capabilities(&[("postcopy-ram", false)])?;
    vm.execute("migrate", json!({ "uri": format!("exec:cat > '{output}'") }))?;
    vm.wait_status(&["completed"], timeout)
        .map_err(|e| crate::Error(format!("QEMU could not save its RAM: {e}; {}", vm.stderr())))?;
    vm.quit()?;
    let bytes = std::fs::read(&out)?;
    let decoded = agent::testing::run_stream(&bytes, 1 << 20, 1 << 20);
    if let Err(e) = decoded.result {
        bail!("decoding QEMU's own stream of its loaded RAM: {e}");
    }
    Ok(decoded
        .ports
        .memory
        .blocks
        .iter()
        .map(|b| (String::from_utf8_lossy(&b.name).into_owned(), b.bytes()))
        .collect())
}

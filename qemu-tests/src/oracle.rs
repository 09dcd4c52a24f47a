//! The reference for what a stream means: load a recorded stream into QEMU 7.2's own
//! destination (paused, `-incoming defer -S`) and read its RAM.
//!
//! Why not compare with the source's RAM: under TCG the 7.2 source can lose dirty bits of
//! pages that the guest rewrote after their last send, so the stream (and any correct
//! destination) may hold older contents of a few pages than the source's RAM at the end.

use std::path::Path;
use std::time::Duration;

use serde_json::json;

use crate::source::SourceVmBuilder;
use crate::{bail, Result};

/// Loads `stream` into a QEMU started like `source` (same machine, memory, devices and
/// kernel, so the same RAM blocks) plus `-incoming defer -S`, with `postcopy-ram` on (so
/// that postcopy streams load too; the return path goes nowhere). Returns main RAM as
/// [`crate::source::SourceVm::read_ram`] reads it (holes zeroed).
pub fn qemu_load(source: &SourceVmBuilder, stream: &Path, timeout: Duration) -> Result<Vec<u8>> {
    let stream = std::path::absolute(stream)?;
    let path = stream.display().to_string();
    if path.contains('\'') {
        bail!("qemu_load: the stream path must not contain a quote");
    }
    let mut vm = source.clone().incoming("defer").spawn()?;
    vm.set_capabilities(&[("postcopy-ram", true)])?;
    vm.execute("migrate-incoming", json!({ "uri": format!("exec:cat '{path}'") }))?;
    vm.wait_status(&["completed"], timeout)
        .map_err(|e| crate::Error(format!("QEMU could not load {path}: {e}; {}", vm.stderr())))?;
    let ram = vm.read_ram()?;
    vm.quit()?;
    Ok(ram)
}

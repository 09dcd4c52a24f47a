//! Building the dirty guest (`qemu-tests/dirty-guest`) into a 32-bit multiboot ELF.
//!
//! The guest's status page is at guest-physical [`STATUS_ADDR`]; see
//! `qemu-tests/dirty-guest/src/main.rs` for its layout and the command line.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use crate::install::objcopy;
use crate::process::run;
use crate::{target_dir, workspace_root, Result};

/// Guest-physical address of the dirty guest's status page.
pub const STATUS_ADDR: u64 = 0x1F_F000;
/// `"DGST"`: the first u32 of the status page once the guest has started.
pub const STATUS_MAGIC: u32 = 0x5453_4744;
/// The dirtied region starts here (guest-physical).
pub const REGION_START: u64 = 0x20_0000;

/// The dirty guest's status page, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestStatus {
    /// [`STATUS_MAGIC`] once the guest runs.
    pub magic: u32,
    /// +1 per main-loop iteration.
    pub heartbeat: u32,
    /// Pages dirtied so far.
    pub pages_dirtied: u32,
    /// End of RAM in bytes, as the guest saw it in multiboot.
    pub ram_end: u32,
    /// Start of the dirtied region.
    pub region_start: u32,
    /// End of the dirtied region.
    pub region_end: u32,
    /// Dirty rate in KiB/s.
    pub rate_kib: u32,
    /// Pages written by `fill`.
    pub filled_pages: u32,
    /// bit 0 fill requested, bit 1 fill done, bit 2 dirty loop running.
    pub flags: u32,
}

impl GuestStatus {
    /// Decodes the first bytes of the status page.
    pub fn parse(page: &[u8]) -> Option<Self> {
        let word = |i: usize| -> Option<u32> {
            Some(u32::from_le_bytes(page.get(i * 4..i * 4 + 4)?.try_into().ok()?))
        };
        Some(GuestStatus {
            magic: word(0)?,
            heartbeat: word(1)?,
            pages_dirtied: word(2)?,
            ram_end: word(3)?,
            region_start: word(4)?,
            region_end: word(5)?,
            rate_kib: word(6)?,
            filled_pages: word(7)?,
            flags: word(8)?,
        })
    }

    /// The guest has started and set up its status page.
    pub fn started(&self) -> bool {
        self.magic == STATUS_MAGIC
    }

    /// The dirtying loop runs (after `fill`, if requested).
    pub fn dirtying(&self) -> bool {
        self.started() && self.flags & 4 != 0
    }
}

/// Builds the guest (release, `x86_64-unknown-none`) and converts it with
/// `objcopy -O elf32-i386` for QEMU's multiboot loader. Returns the ELF32 path.
///
/// It builds in `<target>/dirty-guest`, a directory of its own, so that it does not wait
/// for the lock of an outer `cargo test`.
pub fn build_dirty_guest() -> Result<PathBuf> {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let root = workspace_root();
    let target = target_dir().join("dirty-guest");
    let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cargo
        .current_dir(&root)
        .args(["build", "--release", "--target", "x86_64-unknown-none", "--manifest-path"])
        .arg(root.join("qemu-tests/dirty-guest/Cargo.toml"))
        .arg("--target-dir")
        .arg(&target)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET");
    run(cargo, Duration::from_secs(600))?;
    let elf64 = target.join("x86_64-unknown-none/release/dirty-guest");
    let elf32 = target.join("dirty-guest.elf32");
    let tmp = target.join(format!("dirty-guest.elf32.{}", std::process::id()));
    let mut copy = Command::new(objcopy()?);
    copy.args(["-O", "elf32-i386"]).arg(&elf64).arg(&tmp);
    run(copy, Duration::from_secs(60))?;
    std::fs::rename(&tmp, &elf32)?;
    Ok(elf32)
}

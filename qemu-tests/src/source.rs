//! The migration source: a QEMU 7.2 VM under TCG, driven over QMP.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::guest::{GuestStatus, STATUS_ADDR};
use crate::install;
use crate::process::ChildGuard;
use crate::qmp::Qmp;
use crate::{bail, Result};

/// The QEMU machine type of the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Machine {
    /// `-machine none`: RAM only, no devices.
    None,
    /// `-machine pc` (i440FX).
    Pc,
    /// `-machine q35`.
    Q35,
}

impl Machine {
    /// The `-machine` argument.
    pub fn as_str(self) -> &'static str {
        match self {
            Machine::None => "none",
            Machine::Pc => "pc",
            Machine::Q35 => "q35",
        }
    }

    /// Parses `none`, `pc` or `q35`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Machine::None),
            "pc" => Ok(Machine::Pc),
            "q35" => Ok(Machine::Q35),
            _ => bail!("unknown machine {s:?} (expected none, pc or q35)"),
        }
    }

    /// The main RAM block's id in the migration stream.
    pub fn ram_block(self) -> &'static str {
        match self {
            Machine::None => "ram",
            Machine::Pc | Machine::Q35 => "pc.ram",
        }
    }

    /// Guest-physical ranges that are not main RAM when read with `pmemsave`
    /// (the VGA window and ROM shadow on pc/q35).
    pub fn ram_holes(self) -> &'static [(u64, u64)] {
        match self {
            Machine::None => &[],
            Machine::Pc | Machine::Q35 => &[(0xA_0000, 0x10_0000)],
        }
    }
}

/// Builds a [`SourceVm`].
#[derive(Debug, Clone)]
pub struct SourceVmBuilder {
    machine: Machine,
    mem_mib: u64,
    kernel: Option<PathBuf>,
    append: Option<String>,
    vga: bool,
    extra: Vec<String>,
}

impl SourceVmBuilder {
    /// Memory size in MiB (default 32). Keep it at most 2048 so that the main RAM block
    /// offset equals the guest-physical address.
    pub fn mem_mib(mut self, mib: u64) -> Self {
        self.mem_mib = mib;
        self
    }

    /// Boots `kernel` (a multiboot ELF32, e.g. the dirty guest) with command line `append`.
    pub fn kernel(mut self, kernel: &Path, append: &str) -> Self {
        self.kernel = Some(kernel.to_path_buf());
        self.append = Some(append.to_string());
        self
    }

    /// Leaves out the default VGA device (`-vga none`).
    pub fn no_vga(mut self) -> Self {
        self.vga = false;
        self
    }

    /// Makes this VM a migration *destination*: `-incoming URI -S` (it stays paused when
    /// the migration ends, also after postcopy, so its RAM can be compared).
    pub fn incoming(self, uri: &str) -> Self {
        self.arg("-incoming").arg(uri).arg("-S")
    }

    /// Like [`SourceVmBuilder::incoming`] but without `-S`: the guest runs on the
    /// destination as soon as postcopy starts (so it faults and requests pages).
    pub fn incoming_running(self, uri: &str) -> Self {
        self.arg("-incoming").arg(uri)
    }

    /// Adds a raw QEMU argument.
    pub fn arg(mut self, arg: &str) -> Self {
        self.extra.push(arg.to_string());
        self
    }

    /// The QEMU arguments (without the program and the QMP socket).
    pub fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = [
            "-accel",
            "tcg",
            "-machine",
            self.machine.as_str(),
            "-m",
            &format!("{}M", self.mem_mib),
            "-display",
            "none",
            "-serial",
            "none",
            "-monitor",
            "none",
            "-parallel",
            "none",
            "-nic",
            "none",
            "-no-user-config",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if !self.vga && self.machine != Machine::None {
            args.extend(["-vga".into(), "none".into()]);
        }
        if let Some(kernel) = &self.kernel {
            args.extend(["-kernel".into(), kernel.display().to_string()]);
            if let Some(append) = &self.append {
                args.extend(["-append".into(), append.clone()]);
            }
        }
        args.extend(self.extra.iter().cloned());
        args
    }

    /// Starts QEMU and connects QMP.
    pub fn spawn(self) -> Result<SourceVm> {
        let qemu = install::qemu()?;
        let dir = tempfile::Builder::new().prefix("qemu-src-").tempdir()?;
        let sock = dir.path().join("qmp.sock");
        let args = self.args();
        let mut cmd = Command::new(&qemu);
        cmd.args(&args).arg("-qmp").arg(format!("unix:{},server=on,wait=off", sock.display()));
        let mut child = ChildGuard::spawn("qemu", cmd, dir.path())?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sock.exists() {
            if let Some(status) = child.try_status()? {
                bail!("QEMU exited at start ({status}): {}", child.stderr_tail(2000));
            }
            if Instant::now() > deadline {
                bail!("QEMU did not create its QMP socket in 20 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let qmp = Qmp::connect(&sock, Duration::from_secs(20))?;
        let mut command_line = vec![qemu.display().to_string()];
        command_line.extend(args);
        Ok(SourceVm { machine: self.machine, mem_mib: self.mem_mib, command_line, qmp, child, dir })
    }
}

/// A running source VM. QEMU is killed when this is dropped.
#[derive(Debug)]
pub struct SourceVm {
    machine: Machine,
    mem_mib: u64,
    command_line: Vec<String>,
    qmp: Qmp,
    child: ChildGuard,
    dir: tempfile::TempDir,
}

/// `query-migrate`, the fields the tests use, plus the raw reply.
#[derive(Debug, Clone, Default)]
pub struct MigrationInfo {
    /// `setup`, `active`, `postcopy-active`, `completed`, `failed`, ...
    pub status: String,
    /// Bytes sent so far (`ram.transferred`).
    pub transferred: u64,
    /// `ram.remaining`.
    pub remaining: u64,
    /// `ram.total`.
    pub total: u64,
    /// Normal (non-zero) pages sent.
    pub normal_pages: u64,
    /// Zero pages sent (`ram.duplicate`).
    pub zero_pages: u64,
    /// Pages sent on request of the destination.
    pub postcopy_requests: u64,
    /// Dirty-bitmap syncs (precopy iterations).
    pub dirty_sync_count: u64,
    /// `error-desc` when failed.
    pub error: Option<String>,
    /// The whole reply.
    pub raw: Value,
}

impl MigrationInfo {
    fn parse(raw: Value) -> Self {
        let ram = |k: &str| raw["ram"][k].as_u64().unwrap_or(0);
        MigrationInfo {
            status: raw["status"].as_str().unwrap_or("none").to_string(),
            transferred: ram("transferred"),
            remaining: ram("remaining"),
            total: ram("total"),
            normal_pages: ram("normal"),
            zero_pages: ram("duplicate"),
            postcopy_requests: ram("postcopy-requests"),
            dirty_sync_count: ram("dirty-sync-count"),
            error: raw["error-desc"].as_str().map(str::to_string),
            raw,
        }
    }
}

impl SourceVm {
    /// A builder for `machine` with 32 MiB, VGA on, no kernel.
    pub fn builder(machine: Machine) -> SourceVmBuilder {
        SourceVmBuilder { machine, mem_mib: 32, kernel: None, append: None, vga: true, extra: Vec::new() }
    }

    /// The machine type.
    pub fn machine(&self) -> Machine {
        self.machine
    }

    /// RAM size in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.mem_mib << 20
    }

    /// The full QEMU command line (QMP socket left out).
    pub fn command_line(&self) -> &[String] {
        &self.command_line
    }

    /// A scratch directory that lives as long as the VM.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The QMP connection, for commands without a helper.
    pub fn qmp(&mut self) -> &mut Qmp {
        &mut self.qmp
    }

    /// Runs a QMP command, adding QEMU's stderr to the error if QEMU has died.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value> {
        self.qmp.execute(cmd, args).map_err(|e| {
            if let Ok(Some(status)) = self.child.try_status() {
                crate::Error(format!("{e} (QEMU exited: {status}; stderr: {})", self.child.stderr_tail(2000)))
            } else {
                e
            }
        })
    }

    /// `migrate-set-capabilities` with `(name, state)` pairs.
    pub fn set_capabilities(&mut self, caps: &[(&str, bool)]) -> Result<()> {
        let caps: Vec<Value> =
            caps.iter().map(|(name, state)| json!({ "capability": name, "state": state })).collect();
        self.execute("migrate-set-capabilities", json!({ "capabilities": caps }))?;
        Ok(())
    }

    /// `migrate-set-parameters` with a JSON object, e.g. `{"max-bandwidth": 100000}`.
    pub fn set_parameters(&mut self, params: Value) -> Result<()> {
        self.execute("migrate-set-parameters", params)?;
        Ok(())
    }

    /// Precopy bandwidth limit in bytes per second.
    pub fn set_max_bandwidth(&mut self, bytes_per_s: u64) -> Result<()> {
        self.set_parameters(json!({ "max-bandwidth": bytes_per_s }))
    }

    /// Postcopy background bandwidth limit in bytes per second (0 = unlimited).
    pub fn set_max_postcopy_bandwidth(&mut self, bytes_per_s: u64) -> Result<()> {
        self.set_parameters(json!({ "max-postcopy-bandwidth": bytes_per_s }))
    }

    /// `migrate` to `uri` (e.g. `unix:/path`, `exec:cat > file`).
    pub fn migrate(&mut self, uri: &str) -> Result<()> {
        self.execute("migrate", json!({ "uri": uri }))?;
        Ok(())
    }

    /// `migrate-start-postcopy`.
    pub fn start_postcopy(&mut self) -> Result<()> {
        self.execute("migrate-start-postcopy", Value::Null)?;
        Ok(())
    }

    /// `migrate_cancel`.
    pub fn cancel_migration(&mut self) -> Result<()> {
        self.execute("migrate_cancel", Value::Null)?;
        Ok(())
    }

    /// `query-migrate`.
    pub fn query_migrate(&mut self) -> Result<MigrationInfo> {
        let raw = self.execute("query-migrate", Value::Null)?;
        Ok(MigrationInfo::parse(raw))
    }

    /// Polls `query-migrate` until the status is one of `wanted`. Fails at once on
    /// `failed`/`cancelled` (unless wanted) and after `timeout`.
    pub fn wait_status(&mut self, wanted: &[&str], timeout: Duration) -> Result<MigrationInfo> {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.query_migrate()?;
            if wanted.contains(&info.status.as_str()) {
                return Ok(info);
            }
            if matches!(info.status.as_str(), "failed" | "cancelled") {
                bail!(
                    "source migration {}: {}",
                    info.status,
                    info.error.as_deref().unwrap_or("(no error-desc)")
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "source migration still `{}` after {timeout:?} (waiting for {wanted:?}); {}",
                    info.status,
                    info.raw
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `pmemsave`: writes `size` bytes of guest-physical memory at `addr` to `path`.
    pub fn pmemsave(&mut self, addr: u64, size: u64, path: &Path) -> Result<()> {
        let path = std::path::absolute(path)?;
        self.execute(
            "pmemsave",
            json!({ "val": addr, "size": size, "filename": path.display().to_string() }),
        )?;
        Ok(())
    }

    /// Reads guest-physical memory (through a `pmemsave` file).
    pub fn read_phys(&mut self, addr: u64, size: u64) -> Result<Vec<u8>> {
        let path = self.dir.path().join("pmem.bin");
        self.pmemsave(addr, size, &path)?;
        let data = std::fs::read(&path)?;
        let _ = std::fs::remove_file(&path);
        if data.len() as u64 != size {
            bail!("pmemsave wrote {} bytes, expected {size}", data.len());
        }
        Ok(data)
    }

    /// All of RAM as the guest sees it: `[0, mem_bytes)`, with the holes of
    /// [`Machine::ram_holes`] replaced by zeros.
    pub fn read_ram(&mut self) -> Result<Vec<u8>> {
        let mut ram = self.read_phys(0, self.mem_bytes())?;
        crate::ram::zero_holes(&mut ram, self.machine.ram_holes());
        Ok(ram)
    }

    /// The dirty guest's status page.
    pub fn guest_status(&mut self) -> Result<GuestStatus> {
        let page = self.read_phys(STATUS_ADDR, 64)?;
        match GuestStatus::parse(&page) {
            Some(s) => Ok(s),
            None => bail!("cannot decode the guest status page"),
        }
    }

    /// Waits until the dirty guest is in its dirtying loop and its heartbeat moves.
    pub fn wait_guest_dirtying(&mut self, timeout: Duration) -> Result<GuestStatus> {
        let deadline = Instant::now() + timeout;
        let mut last: Option<GuestStatus> = None;
        loop {
            let st = self.guest_status()?;
            if let Some(prev) = last {
                if st.dirtying() && prev.dirtying() && st.heartbeat != prev.heartbeat {
                    return Ok(st);
                }
            }
            if Instant::now() > deadline {
                bail!("the dirty guest did not start dirtying within {timeout:?}: {st:?}");
            }
            last = Some(st);
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `stop` (pause the vCPUs).
    pub fn stop(&mut self) -> Result<()> {
        self.execute("stop", Value::Null)?;
        Ok(())
    }

    /// `cont`.
    pub fn cont(&mut self) -> Result<()> {
        self.execute("cont", Value::Null)?;
        Ok(())
    }

    /// `quit`, then waits for QEMU to exit (killing it after 10 s).
    pub fn quit(mut self) -> Result<()> {
        let _ = self.qmp.execute("quit", Value::Null);
        self.child.wait_or_kill(Duration::from_secs(10))?;
        Ok(())
    }

    /// QEMU's stderr so far.
    pub fn stderr(&self) -> String {
        self.child.stderr()
    }
}

//! Child processes that are killed when dropped, and waits with a deadline.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use wait_timeout::ChildExt;

use crate::{bail, Result};

/// A running child process; killed (SIGKILL) and reaped on drop, and killed by the kernel
/// if the thread that spawned it dies first (`PR_SET_PDEATHSIG`).
#[derive(Debug)]
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
    status: Option<ExitStatus>,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl ChildGuard {
    /// Starts `cmd` with stdin closed and stdout/stderr written to `<log_dir>/<name>.out`
    /// and `<log_dir>/<name>.err`.
    pub fn spawn(name: &str, mut cmd: Command, log_dir: &Path) -> Result<Self> {
        let stdout = log_dir.join(format!("{name}.out"));
        let stderr = log_dir.join(format!("{name}.err"));
        cmd.stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout)?)
            .stderr(std::fs::File::create(&stderr)?);
        // SAFETY: the closure runs in the child between fork and exec and only makes
        // prctl(2), an async-signal-safe system call; it touches no memory of the parent.
        // PR_SET_PDEATHSIG makes the kernel SIGKILL the child when the spawning thread
        // dies, so no QEMU outlives a test process that is killed before Drop runs.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => bail!("cannot start {name} ({:?}): {e}", cmd.get_program()),
        };
        Ok(ChildGuard { name: name.to_string(), child: Some(child), status: None, stdout, stderr })
    }

    /// The process id.
    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The exit status if the process has ended, without waiting.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            if let Some(child) = self.child.as_mut() {
                self.status = child.try_wait()?;
            }
        }
        Ok(self.status)
    }

    /// Waits up to `timeout` for the process to end; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            if let Some(child) = self.child.as_mut() {
                self.status = child.wait_timeout(timeout)?;
            }
        }
        Ok(self.status)
    }

    /// Waits up to `timeout`; kills the process and fails if it has not ended by then.
    pub fn wait_or_kill(&mut self, timeout: Duration) -> Result<ExitStatus> {
        match self.wait_timeout(timeout)? {
            Some(s) => Ok(s),
            None => {
                self.kill();
                bail!(
                    "{} did not exit within {:?}; killed it. stderr: {}",
                    self.name,
                    timeout,
                    self.stderr_tail(2000)
                )
            }
        }
    }

    /// Kills and reaps the process (no-op if it already ended).
    pub fn kill(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if self.status.is_none() {
                let _ = child.kill();
                self.status = child.wait().ok();
            }
        }
    }

    /// Everything the process wrote to stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The last `max` bytes of stderr (whole characters).
    pub fn stderr_tail(&self, max: usize) -> String {
        tail(&self.stderr(), max)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `max` bytes of `s`, cut at a character boundary.
pub fn tail(s: &str, max: usize) -> String {
    let mut start = s.len().saturating_sub(max);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].trim().to_string()
}

/// Runs `cmd` to completion within `timeout`, failing on a non-zero exit; returns stdout.
pub fn run(cmd: Command, timeout: Duration) -> Result<String> {
    let dir = tempfile::tempdir()?;
    let program = cmd.get_program().to_string_lossy().into_owned();
    let name = Path::new(&program)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "cmd".into());
    let mut child = ChildGuard::spawn(&name, cmd, dir.path())?;
    let status = child.wait_or_kill(timeout)?;
    if !status.success() {
        bail!("{program} failed ({status}): {}", child.stderr_tail(4000));
    }
    Ok(child.stdout())
}

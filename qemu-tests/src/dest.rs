//! Running the hosted destination `postcopy-dest` and reading its JSON summary.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::process::ChildGuard;
use crate::{bail, Result};

/// The last stdout line of `postcopy-dest`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    /// Final postcopy state (`END` after a completed migration).
    pub state: String,
    /// Pages placed.
    pub pages_received: u64,
    /// Zero pages placed.
    pub zero_pages: u64,
    /// Pages discarded by RAM_DISCARD.
    pub discarded_pages: u64,
    /// Page requests sent on the return path.
    pub page_requests: u64,
    /// Faults taken by the simulated vCPU.
    pub faults: u64,
    /// Stream bytes received.
    pub bytes: u64,
    /// Wall time.
    pub seconds: f64,
}

impl Summary {
    /// Parses the summary JSON object.
    pub fn parse(line: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(line.trim())?;
        let num = |k: &str| -> Result<u64> {
            match v[k].as_u64() {
                Some(n) => Ok(n),
                None => bail!("summary has no integer {k:?}: {line}"),
            }
        };
        Ok(Summary {
            state: match v["state"].as_str() {
                Some(s) => s.to_string(),
                None => bail!("summary has no \"state\": {line}"),
            },
            pages_received: num("pages_received")?,
            zero_pages: num("zero_pages")?,
            discarded_pages: num("discarded_pages")?,
            page_requests: num("page_requests")?,
            faults: num("faults")?,
            bytes: num("bytes")?,
            seconds: v["seconds"].as_f64().unwrap_or(0.0),
        })
    }
}

/// How to run `postcopy-dest`.
#[derive(Debug, Clone, Default)]
pub struct DestOptions {
    /// `--listen unix:PATH` or `tcp:HOST:PORT`.
    pub listen: Option<String>,
    /// `--input FILE`: replay a recorded stream.
    pub input: Option<PathBuf>,
    /// `--dump-dir DIR`: write each RAMBlock there after a completed migration.
    pub dump_dir: Option<PathBuf>,
    /// `--touch random|seq`.
    pub touch: Option<String>,
    /// `--record FILE`: save every stream byte received.
    pub record: Option<PathBuf>,
    /// `--vcpus N`: simulated vCPUs faulting concurrently after RUN.
    pub vcpus: Option<usize>,
    /// `--stage2 ept|npt`: the table format the vCPUs walk.
    pub stage2: Option<String>,
    /// `--guest-writes`: the vCPUs also write guest memory.
    pub guest_writes: bool,
    /// `--recover-timeout SECS`: how long to wait for the source after a break.
    pub recover_timeout: Option<u64>,
}

impl DestOptions {
    /// The command-line arguments.
    pub fn args(&self) -> Vec<String> {
        let mut args = Vec::new();
        let mut push = |flag: &str, v: String| {
            args.push(flag.to_string());
            args.push(v);
        };
        if let Some(l) = &self.listen {
            push("--listen", l.clone());
        }
        if let Some(i) = &self.input {
            push("--input", i.display().to_string());
        }
        if let Some(d) = &self.dump_dir {
            push("--dump-dir", d.display().to_string());
        }
        if let Some(t) = &self.touch {
            push("--touch", t.clone());
        }
        if let Some(r) = &self.record {
            push("--record", r.display().to_string());
        }
        if let Some(n) = self.vcpus {
            push("--vcpus", n.to_string());
        }
        if let Some(s) = &self.stage2 {
            push("--stage2", s.clone());
        }
        if self.guest_writes {
            args.push("--guest-writes".to_string());
        }
        if let Some(t) = self.recover_timeout {
            args.push("--recover-timeout".to_string());
            args.push(t.to_string());
        }
        args
    }
}

/// A running `postcopy-dest`; killed on drop.
#[derive(Debug)]
pub struct Dest {
    child: ChildGuard,
    _logs: tempfile::TempDir,
}

/// How `postcopy-dest` ended.
#[derive(Debug)]
pub struct DestOutcome {
    /// Exit status.
    pub status: ExitStatus,
    /// All of stdout.
    pub stdout: String,
    /// All of stderr.
    pub stderr: String,
    /// The parsed last stdout line, if it is a summary.
    pub summary: Option<Summary>,
}

impl DestOutcome {
    /// The summary of a successful run; fails with stderr if the run failed.
    pub fn expect_success(&self) -> Result<&Summary> {
        if !self.status.success() {
            bail!(
                "postcopy-dest failed ({}); stderr: {}; stdout tail: {}",
                self.status,
                crate::process::tail(&self.stderr, 3000),
                crate::process::tail(&self.stdout, 1000)
            );
        }
        match &self.summary {
            Some(s) => Ok(s),
            None => bail!(
                "postcopy-dest exited 0 without a JSON summary line; stdout: {}",
                crate::process::tail(&self.stdout, 1000)
            ),
        }
    }
}

impl Dest {
    /// Starts `bin` with `opts`. With `--listen unix:PATH`, waits until PATH exists.
    pub fn spawn(bin: &Path, opts: &DestOptions) -> Result<Self> {
        let logs = tempfile::Builder::new().prefix("postcopy-dest-").tempdir()?;
        let mut cmd = Command::new(bin);
        cmd.args(opts.args());
        let mut child = ChildGuard::spawn("postcopy-dest", cmd, logs.path())?;
        if let Some(port) = opts.listen.as_deref().and_then(tcp_port) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !tcp_listening(port) {
                if let Some(status) = child.try_status()? {
                    bail!("postcopy-dest exited before listening ({status}): {}", child.stderr_tail(2000));
                }
                if Instant::now() > deadline {
                    bail!("postcopy-dest did not listen on TCP port {port} within 10 s");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        if let Some(path) = opts.listen.as_deref().and_then(|l| l.strip_prefix("unix:")) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !Path::new(path).exists() {
                if let Some(status) = child.try_status()? {
                    bail!("postcopy-dest exited before listening ({status}): {}", child.stderr_tail(2000));
                }
                if Instant::now() > deadline {
                    bail!("postcopy-dest did not create {path} within 10 s");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(Dest { child, _logs: logs })
    }

    /// The exit status if it has ended.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        self.child.try_status()
    }

    /// Stderr so far.
    pub fn stderr(&self) -> String {
        self.child.stderr()
    }

    /// Waits up to `timeout` for the exit (killing it after that) and collects the output.
    pub fn wait(mut self, timeout: Duration) -> Result<DestOutcome> {
        let status = self.child.wait_or_kill(timeout)?;
        let stdout = self.child.stdout();
        let stderr = self.child.stderr();
        let summary =
            stdout.lines().rev().find(|l| !l.trim().is_empty()).and_then(|l| Summary::parse(l).ok());
        Ok(DestOutcome { status, stdout, stderr, summary })
    }
}

/// The port of a `tcp:HOST:PORT` listen address.
fn tcp_port(listen: &str) -> Option<u16> {
    listen.strip_prefix("tcp:")?.rsplit(':').next()?.parse().ok()
}

/// A socket listens on `port` (any address), per `/proc/net/tcp{,6}`. Checking this way
/// does not use up the destination's single accept.
pub fn tcp_listening(port: u16) -> bool {
    let want = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
        std::fs::read_to_string(f).is_ok_and(|table| {
            table.lines().skip(1).any(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.len() > 3 && cols[1].ends_with(&want) && cols[3] == "0A"
            })
        })
    })
}

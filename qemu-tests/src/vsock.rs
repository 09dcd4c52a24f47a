//! The host side of the image's virtio-vsock transport, as it runs on this machine.
//!
//! There is no `/dev/vhost-vsock` here, so the machine's device is QEMU's
//! `vhost-user-vsock-pci` served by the `vhost-device-vsock` daemon (rust-vmm, 0.3.0). Host
//! programs reach the guest through the daemon's *hybrid* unix socket: connect, write
//! `CONNECT <port>\n`, read `OK <n>\n`, then the socket is the vsock stream. See
//! `docs/vsock.md` for the ports, the sink protocol, the gotchas and the production path
//! (kernel vhost-vsock, no daemon and no bridge).
//!
//! * [`ensure_daemon`] finds or installs the daemon (`cargo install`: Debian 12 has no
//!   package for it);
//! * [`Daemon`] runs one daemon for one QEMU machine and gives its QEMU arguments;
//! * [`connect`] does the hybrid handshake, retrying while the guest's driver is not up;
//! * [`sink_rate`] measures the raw host-to-guest rate against the image's sink (port 1235).

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::install::which;
use crate::process::{run, ChildGuard};
use crate::{bail, Result};

/// The daemon's binary name.
pub const DAEMON: &str = "vhost-device-vsock";

/// The version whose behaviour `docs/vsock.md` describes (and `cargo install` pins).
pub const DAEMON_VERSION: &str = "0.3.0";

/// The guest CID the daemon gives the machine (QEMU's `vhost-user-vsock-pci` has no
/// `guest-cid` property: the daemon supplies it).
pub const GUEST_CID: u32 = 3;

/// The image's vsock port for the migration stream (the return path uses the same
/// connection).
pub const MIGRATION_PORT: u32 = 1234;

/// The image's vsock port for the raw-rate sink ([`sink_rate`]).
pub const SINK_PORT: u32 = 1235;

/// How long one handshake attempt waits for `OK`. The daemon holds a `CONNECT` unanswered
/// while the guest has not taken the request off its RX queue (see [`connect`]); 1000 times
/// the p99 round trip measured under TCG (~1.5 ms), so a slow but live guest still answers
/// within one attempt and a silent one costs a few seconds at most.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// The longest pause between two handshake attempts (the first pauses are shorter).
const MAX_RETRY_PAUSE: Duration = Duration::from_millis(100);

/// The longest `OK <n>\n` line accepted (`OK 4294967295\n` is 14 bytes).
const MAX_REPLY: usize = 32;

/// The path of a `vhost-device-vsock` binary: the one in `$PATH`, else
/// `<target>/tools/bin/vhost-device-vsock`, else installs 0.3.0 there with
/// `cargo install --locked` (Debian 12 has no package for it; the build takes a few
/// minutes and needs the crates.io registry). Concurrent callers (parallel test threads, and
/// other processes sharing the target directory) wait for one install.
pub fn ensure_daemon() -> Result<PathBuf> {
    // Threads of one process: the Mutex. Other processes (two test binaries, xtask): the
    // flock below, and the re-check after taking it.
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(found) = find_daemon() {
        return Ok(found);
    }
    let root = tools_root();
    std::fs::create_dir_all(&root)?;
    let lock_path = root.join(".vhost-device-vsock.lock");
    let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path)?;
    // SAFETY: flock(2) on a descriptor this function owns for the whole call; no memory is
    // passed to the kernel. The lock is released when `lock` is closed on return.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        bail!("cannot lock {}: {}", lock_path.display(), std::io::Error::last_os_error());
    }
    if let Some(found) = find_daemon() {
        return Ok(found);
    }
    install_daemon(&root)?;
    match find_daemon() {
        Some(found) => Ok(found),
        None => bail!("cargo install reported success but {} is missing", installed_path().display()),
    }
}

/// `<target>/tools`, the `--root` of the tools the harness installs.
fn tools_root() -> PathBuf {
    crate::target_dir().join("tools")
}

fn installed_path() -> PathBuf {
    tools_root().join("bin").join(DAEMON)
}

fn find_daemon() -> Option<PathBuf> {
    which(DAEMON).or_else(|| {
        let p = installed_path();
        p.is_file().then_some(p)
    })
}

fn install_daemon(root: &Path) -> Result<()> {
    // `$CARGO` is the cargo running the tests (set by `cargo test`/`cargo run`); else PATH.
    let cargo = match std::env::var_os("CARGO").map(PathBuf::from).filter(|p| p.is_file()) {
        Some(c) => c,
        None => match which("cargo") {
            Some(c) => c,
            None => bail!(
                "{DAEMON} is missing and there is no cargo to install it: run \
                 `cargo install --locked {DAEMON} --version {DAEMON_VERSION} --root {}`",
                root.display()
            ),
        },
    };
    eprintln!(
        "qemu-tests: {DAEMON} not found in PATH or {}: installing {DAEMON} {DAEMON_VERSION} with \
         `cargo install --locked` (Debian 12 has no package for it; the image's virtio-vsock \
         device is served by it; this takes a few minutes)",
        installed_path().display()
    );
    let mut cmd = Command::new(&cargo);
    cmd.args(["install", "--locked", DAEMON, "--version", DAEMON_VERSION, "--root"])
        .arg(root)
        // Run from the workspace so that its rust-toolchain.toml picks the toolchain, but
        // build in cargo's own temporary directory: the test run's CARGO_TARGET_DIR may be
        // locked by the cargo that is running us.
        .current_dir(crate::workspace_root())
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET");
    if let Err(e) = run(cmd, Duration::from_secs(30 * 60)) {
        // One line: cargo's `error:` lines (its progress output is of no use here).
        let errors: Vec<&str> = e.0.lines().map(str::trim).filter(|l| l.starts_with("error")).collect();
        let why = if errors.is_empty() {
            e.0.lines().map(str::trim).rfind(|l| !l.is_empty()).unwrap_or_default().to_string()
        } else {
            errors.join("; ")
        };
        bail!(
            "`{} install --locked {DAEMON} --version {DAEMON_VERSION} --root {}` failed (no network \
             to crates.io?): {why}",
            cargo.display(),
            root.display(),
        );
    }
    Ok(())
}

/// One `vhost-device-vsock` serving one QEMU machine at a time (it serves QEMU runs one after
/// another, but never two at once: parallel machines need a daemon each). Killed on drop.
#[derive(Debug)]
pub struct Daemon {
    child: ChildGuard,
    socket: PathBuf,
    uds: PathBuf,
}

impl Daemon {
    /// Starts the daemon with `--guest-cid 3 --socket <dir>/vhost-user.sock --uds-path
    /// <dir>/vsock.sock` (its logs go to `<dir>/vhost-device-vsock.{out,err}`) and waits
    /// until its vhost-user socket exists: QEMU fails at start if it is not there yet.
    pub fn start(dir: &Path) -> Result<Daemon> {
        let bin = ensure_daemon()?;
        let socket = dir.join("vhost-user.sock");
        let uds = dir.join("vsock.sock");
        // A stale socket file from an earlier run would pass the wait below.
        for stale in [&socket, &uds] {
            match std::fs::remove_file(stale) {
                Err(e) if e.kind() != ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
        }
        let mut cmd = Command::new(&bin);
        cmd.arg("--guest-cid")
            .arg(GUEST_CID.to_string())
            .arg("--socket")
            .arg(&socket)
            .arg("--uds-path")
            .arg(&uds);
        let mut child = ChildGuard::spawn(DAEMON, cmd, dir)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        // The daemon binds the hybrid socket before the vhost-user one, so both exist once
        // this one does.
        while !socket.exists() {
            if let Some(status) = child.try_status()? {
                bail!("{DAEMON} exited at start ({status}): {}", child.stderr_tail(2000));
            }
            if Instant::now() > deadline {
                bail!("{DAEMON} did not create {} within 10 s", socket.display());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(Daemon { child, socket, uds })
    }

    /// The vhost-user socket QEMU's chardev connects to. The daemon removes the file while a
    /// QEMU is attached and creates it again when that QEMU has gone.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The hybrid socket host programs connect to ([`connect`]).
    pub fn uds(&self) -> &Path {
        &self.uds
    }

    /// The QEMU arguments that give a machine of `machine_mib` MiB the vsock device. The
    /// daemon maps the guest's RAM, so RAM must be a shared memfd. The machine's `-m` must be
    /// exactly `machine_mib` M: QEMU 7.2 refuses to start otherwise ("total memory for NUMA
    /// nodes (0x8000000) should equal RAM size (0x10000000)", tried here), so pass the same
    /// number to both.
    pub fn qemu_args(&self, machine_mib: u64) -> Vec<String> {
        vec![
            "-object".into(),
            format!("memory-backend-memfd,id=mem,size={machine_mib}M,share=on"),
            "-numa".into(),
            "node,memdev=mem".into(),
            "-chardev".into(),
            format!("socket,id=vsock,path={}", self.socket.display()),
            "-device".into(),
            "vhost-user-vsock-pci,chardev=vsock".into(),
        ]
    }

    /// The daemon's process id.
    pub fn id(&self) -> Option<u32> {
        self.child.id()
    }

    /// True while the daemon runs.
    pub fn running(&mut self) -> Result<bool> {
        Ok(self.child.try_status()?.is_none())
    }

    /// Everything the daemon wrote to stderr so far (it logs nothing per connection).
    pub fn stderr(&self) -> String {
        self.child.stderr()
    }

    /// Stops the daemon with SIGTERM (it has no handler: SIGTERM is how it is meant to end)
    /// and reaps it; kills it if it is still there after `timeout`.
    pub fn stop(mut self, timeout: Duration) -> Result<()> {
        if self.child.try_status()?.is_none() {
            if let Some(pid) = self.child.id().and_then(|p| i32::try_from(p).ok()) {
                // SAFETY: kill(2) with the pid of our own unreaped child (it cannot have been
                // recycled while it is unreaped); no memory is involved.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        self.child.wait_or_kill(timeout)?;
        Ok(())
    }
}

/// Connects to the guest's `port` through the daemon's hybrid socket `uds`: writes
/// `CONNECT <port>\n` and reads `OK <n>\n`, retrying until `deadline`. Returns the stream
/// positioned on the first payload byte (the reply is read byte by byte, so a guest that
/// writes right after accepting loses nothing), blocking, with no timeouts set.
///
/// What vhost-device-vsock 0.3.0 does when nobody is listening yet (seen here and in its
/// source): before the guest's driver is up (no QEMU attached, or QEMU has not started the
/// device, e.g. `-S`) it accepts the connection and closes it at once; once the driver is up,
/// it forwards the request and keeps the connection open with no answer until the guest
/// takes the request off its RX queue, then closes it if the guest resets (no listener) or
/// answers `OK` if it accepts. A closed attempt is retried after a short pause; a silent one
/// after [`ATTEMPT_TIMEOUT`]. A silent attempt that is given up on still reaches the guest
/// later as a request followed by a reset (the daemon sends RST when the host side closes
/// before the guest answered).
pub fn connect(uds: &Path, port: u32, deadline: Instant) -> Result<UnixStream> {
    connect_with(uds, port, deadline, ATTEMPT_TIMEOUT)
}

/// [`connect`] with a chosen per-attempt timeout (the tests use short ones).
pub fn connect_with(
    uds: &Path,
    port: u32,
    deadline: Instant,
    attempt_timeout: Duration,
) -> Result<UnixStream> {
    let mut attempts = 0u32;
    let mut last = None;
    let mut pause = Duration::from_millis(5);
    loop {
        let timeout = attempt_timeout.min(deadline.saturating_duration_since(Instant::now()));
        if !timeout.is_zero() {
            attempts += 1;
            match attempt(uds, port, timeout) {
                Ok(stream) => return Ok(stream),
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Retry(why)) => last = Some(why),
            }
        }
        let now = Instant::now();
        if now >= deadline {
            bail!(
                "vsock: no `OK` for `CONNECT {port}` on {} after {attempts} attempt(s) (last: {}); \
                 is the guest's driver up and listening on port {port}?",
                uds.display(),
                last.unwrap_or_else(|| "none".into())
            );
        }
        // The daemon answers "not yet" by closing at once: pause rather than spin on it.
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(MAX_RETRY_PAUSE);
    }
}

enum Attempt {
    /// The guest is not listening (yet), or the daemon is not there (yet).
    Retry(String),
    /// Something that retrying will not fix.
    Fatal(crate::Error),
}

fn attempt(uds: &Path, port: u32, timeout: Duration) -> std::result::Result<UnixStream, Attempt> {
    let retry_io = |what: &str, e: std::io::Error| -> Attempt {
        match e.kind() {
            // The daemon is not running, or is between two QEMU sessions.
            ErrorKind::NotFound | ErrorKind::ConnectionRefused => Attempt::Retry(format!("{what}: {e}")),
            // The daemon closed: no driver yet, or the guest reset the request.
            ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted => {
                Attempt::Retry(format!("{what}: the daemon closed the connection ({e})"))
            }
            // No answer within the attempt's timeout.
            ErrorKind::WouldBlock | ErrorKind::TimedOut => {
                Attempt::Retry(format!("{what}: no answer within {timeout:?}"))
            }
            _ => Attempt::Fatal(crate::Error(format!("vsock: {what} on {}: {e}", uds.display()))),
        }
    };
    let mut stream = UnixStream::connect(uds).map_err(|e| retry_io("connect", e))?;
    let io = |e: std::io::Error| Attempt::Fatal(e.into());
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    // One write of the whole line: the daemon reads it with a buffered reader and would
    // swallow anything sent after the newline, so nothing else goes out before `OK`.
    stream.write_all(format!("CONNECT {port}\n").as_bytes()).map_err(|e| retry_io("CONNECT", e))?;
    let mut line = Vec::with_capacity(MAX_REPLY);
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => {
                return Err(Attempt::Retry(if line.is_empty() {
                    "the daemon closed the connection without an answer".into()
                } else {
                    format!("the daemon closed the connection after {:?}", String::from_utf8_lossy(&line))
                }))
            }
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => {
                line.push(byte[0]);
                if line.len() > MAX_REPLY {
                    return Err(Attempt::Fatal(crate::Error(format!(
                        "vsock: the answer to `CONNECT {port}` on {} is not `OK <n>`: {:?}...",
                        uds.display(),
                        String::from_utf8_lossy(&line)
                    ))));
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(retry_io("reading the answer", e)),
        }
    }
    let text = String::from_utf8_lossy(&line);
    // 0.3.0 answers with the guest's port; other hybrid-vsock servers (Firecracker) answer
    // with the host side's port: any number will do.
    let ok = text.strip_prefix("OK ").is_some_and(|n| n.trim().parse::<u32>().is_ok());
    if !ok {
        return Err(Attempt::Fatal(crate::Error(format!(
            "vsock: the answer to `CONNECT {port}` on {} is not `OK <n>`: {text:?}",
            uds.display()
        ))));
    }
    stream.set_read_timeout(None).map_err(io)?;
    stream.set_write_timeout(None).map_err(io)?;
    Ok(stream)
}

/// One raw-rate measurement against the image's sink.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SinkRate {
    /// Payload bytes sent (and acknowledged by the guest).
    pub bytes: u64,
    /// From the first byte written (the length) to the guest's reply.
    pub seconds: f64,
    /// `bytes / seconds / 1e6` (MB = 10^6 bytes).
    pub mb_per_s: f64,
}

/// Measures the raw host-to-guest rate: connects to the sink on `port` (1235 in the image),
/// sends `be64 N` and then N bytes of a non-zero pattern, and reads the guest's `be64 count`,
/// which it sends once it has received all N; the count must equal N. The connection is not
/// shut down before the reply: through the daemon a host `shutdown(SHUT_WR)` closes both ways,
/// so the reply would never come.
pub fn sink_rate(uds: &Path, port: u32, bytes: u64, deadline: Instant) -> Result<SinkRate> {
    let mut stream = connect(uds, port, deadline)?;
    let remaining = |what: &str| -> Result<Duration> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("vsock sink: the deadline passed {what}");
        }
        Ok(left)
    };
    let mut chunk = vec![0u8; 64 << 10];
    for (i, b) in chunk.iter_mut().enumerate() {
        // 1..=251: never zero, and a period that is not a power of two.
        *b = (i % 251) as u8 + 1;
    }
    let start = Instant::now();
    stream.set_write_timeout(Some(remaining("before the first byte")?))?;
    stream.write_all(&bytes.to_be_bytes())?;
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(chunk.len() as u64) as usize;
        stream.set_write_timeout(Some(remaining(&format!("after {sent} of {bytes} bytes"))?))?;
        if let Err(e) = stream.write_all(&chunk[..n]) {
            bail!("vsock sink: writing stopped after {sent} of {bytes} bytes: {e}");
        }
        sent += n as u64;
    }
    stream.set_read_timeout(Some(remaining("before the reply")?))?;
    let mut reply = [0u8; 8];
    if let Err(e) = stream.read_exact(&mut reply) {
        bail!("vsock sink: no `be64 count` reply after {bytes} bytes: {e}");
    }
    let seconds = start.elapsed().as_secs_f64();
    let count = u64::from_be_bytes(reply);
    if count != bytes {
        bail!("vsock sink: the guest counted {count} bytes, {bytes} were sent");
    }
    Ok(SinkRate { bytes, seconds, mb_per_s: bytes as f64 / seconds / 1e6 })
}

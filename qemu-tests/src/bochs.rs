//! The hypervisor image (or any multiboot kernel) under Bochs 2.7, the way [`crate::image`]
//! runs it under QEMU: Bochs emulates Intel VMX with EPT (`cpu: model=corei7_skylake_x`)
//! and AMD SVM with nested paging (`cpu: model=ryzen`).
//!
//! Bochs boots a GRUB ISO ([`iso`]) whose `grub.cfg` loads the kernel with `multiboot2` or
//! `multiboot`, after the header the kernel carries ([`multiboot_kind`]). The
//! machine ([`Bochs::start`]) has COM1 on a TCP socket that Bochs listens on, the debug
//! console (port 0xE9) on Bochs' stdout, a display that nobody watches (Debian's Bochs has
//! no `nogui`: `rfb` or `term`, see [`Display`]) and the built-in debugger on a pipe to its
//! stdin, which reads the machine's memory for [`Bochs::read_phys`].
//!
//! What this module relies on (Debian 12's Bochs 2.7, tried here):
//! * Bochs waits for the COM1 client before it runs the BIOS: nothing boots until
//!   [`Bochs::connect_com1`] (or a connection to [`Bochs::com1_addr`]) is made.
//! * stdout carries both port 0xE9's bytes and the debugger's output. The debugger speaks
//!   only while the simulation is stopped, so the console is what stdout received between a
//!   continue (`c`) and the next stop (`Next at t=...`, then the prompt).
//! * SIGINT stops the simulation, a halted CPU included, and the debugger prompts
//!   `<bochs:N> ` (readline, which echoes the command when stdin is a pipe). EOF on stdin at
//!   the prompt quits.
//! * `writemem "FILE" ADDR LEN` writes `LEN` bytes from the *linear* address `ADDR`,
//!   translated through the stopped CPU's current paging (and EPT inside a VMX guest);
//!   `xp /Nbx ADDR` prints physical memory. [`Bochs::read_phys`] uses `writemem` where `page`
//!   shows the range mapped 1:1 (paging off, or the image's identity map) and `xp` otherwise.
//! * COM1 moves at most one byte per character time of the emulated 16550 (115200 baud
//!   8N1: 86.8 µs) in *emulated* time, each way. With `clock: sync=none`, emulated time is
//!   instructions / `ips` (while the CPU executes; a halted CPU skips ahead), so wall-clock
//!   throughput scales with host speed / `ips`: here, at `ips=50000000`, 16-20 KB/s one way
//!   and 9-10 KB/s each way for an echo (ips=5000000: about 70 KB/s echoed; 200000000:
//!   2.6 KB/s). Bochs takes the next byte from the socket only when the receive FIFO is
//!   empty at its poll, so a slow guest loses nothing, but a byte still unread at a poll
//!   puts the next poll four character times later: read COM1 promptly. With the FIFOs off,
//!   an idle port is polled only every 100 ms of emulated time, so enable them.
//! * "Shutdown" written to port 0x8900 ends Bochs, as does any failure; its exit status says
//!   nothing (1 after "Shutdown", 0 after the debugger's `q`): judge a run by its output.
//! * GRUB passes the arguments after the kernel's path as the command line (`ARGS`, without
//!   the path).

use std::cell::RefCell;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::install::{apt_install, is_root, which};
use crate::process::{run, tail};
use crate::{bail, target_dir, Error, Result};

/// Bochs' own BIOS (package `bochsbios`).
pub const BIOS: &str = "/usr/share/bochs/BIOS-bochs-latest";
/// The VGA BIOS (package `vgabios`).
pub const VGA_BIOS: &str = "/usr/share/vgabios/vgabios.bin";
/// The rfb display (VNC server) plugin, part of package `bochs` itself.
const RFB_PLUGIN: &str = "/usr/lib/x86_64-linux-gnu/bochs/plugins/libbx_rfb_gui.so";
/// The term display (ncurses) plugin, package `bochs-term`.
const TERM_PLUGIN: &str = "/usr/lib/x86_64-linux-gnu/bochs/plugins/libbx_term_gui.so";
/// GRUB's BIOS platform files that `grub-mkrescue` puts on the ISO (package `grub-pc-bin`).
const GRUB_PC: &str = "/usr/lib/grub/i386-pc";

/// What [`ensure_bochs`] installs. `bochs` depends on a display plugin package
/// (`bochs-wx | bochs-gui`): `bochs-term` (ncurses, [`Display::Term`]) satisfies it without
/// apt picking wxWidgets; the rfb display ([`Display::Rfb`]) is in `bochs` itself.
pub const PACKAGES: [&str; 8] =
    ["bochs", "bochs-term", "bochsbios", "vgabios", "grub-pc-bin", "grub-common", "xorriso", "mtools"];

/// Bochs' default emulated instructions per second of emulated time.
pub const DEFAULT_IPS: u64 = 50_000_000;

/// The CPU model with Intel VMX and EPT.
pub const INTEL_VMX: &str = "corei7_skylake_x";
/// The CPU model with AMD SVM and nested paging.
pub const AMD_SVM: &str = "ryzen";

/// How long a debugger command may take.
const DEBUGGER_TIMEOUT: Duration = Duration::from_secs(30);
/// Files in a machine's directory.
const BOCHSRC: &str = "bochsrc";
const CONTINUE: &str = "continue.rc";
const STDOUT: &str = "bochs.out";
const STDERR: &str = "bochs.err";
const LOG: &str = "bochs.log";

/// Makes sure Bochs, its BIOSes, GRUB's BIOS files, `grub-mkrescue` and `xorriso` are
/// there; installs [`PACKAGES`] with apt-get when something is missing and this process is
/// root; otherwise fails naming what is missing. Checked once per process.
pub fn ensure_bochs() -> Result<()> {
    static DONE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| find_or_install().map_err(|e| e.0)).clone().map_err(Error)
}

fn missing() -> Vec<&'static str> {
    let tools = ["bochs", "grub-mkrescue", "xorriso", "mformat"].into_iter().filter(|t| which(t).is_none());
    let files =
        [BIOS, VGA_BIOS, RFB_PLUGIN, TERM_PLUGIN, GRUB_PC].into_iter().filter(|f| !Path::new(f).exists());
    tools.chain(files).collect()
}

fn find_or_install() -> Result<()> {
    let absent = missing();
    if absent.is_empty() {
        return Ok(());
    }
    let install = format!("apt-get install -y --no-install-recommends {}", PACKAGES.join(" "));
    if !is_root() {
        bail!("Bochs cannot run here: {} missing; install with `{install}` (as root)", absent.join(", "));
    }
    apt_install(&PACKAGES).map_err(|e| Error(format!("`{install}` failed: {e}")))?;
    let still = missing();
    if !still.is_empty() {
        bail!("`{install}` ran, but {} still missing", still.join(", "));
    }
    Ok(())
}

/// The multiboot protocol a kernel asks for with its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Multiboot {
    /// Multiboot1: magic 0x1BADB002, 4-byte aligned in the first 8 KiB (GRUB's `multiboot`).
    V1,
    /// Multiboot2: magic 0xE85250D6, 8-byte aligned in the first 32 KiB (GRUB's `multiboot2`).
    V2,
}

/// The multiboot header of `kernel` (a valid checksum included): multiboot2 if it has one,
/// else multiboot1, else `None`.
pub fn multiboot_kind(kernel: &[u8]) -> Option<Multiboot> {
    let word = |at: usize| kernel.get(at..at + 4).map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
    let sum = |at: usize, n: usize| (0..n).try_fold(0u32, |s, i| Some(s.wrapping_add(word(at + 4 * i)?)));
    let v2 = (0..32 * 1024).step_by(8).any(|at| word(at) == Some(0xE852_50D6) && sum(at, 4) == Some(0));
    let v1 = (0..8 * 1024).step_by(4).any(|at| word(at) == Some(0x1BAD_B002) && sum(at, 3) == Some(0));
    match (v2, v1) {
        (true, _) => Some(Multiboot::V2),
        (false, true) => Some(Multiboot::V1),
        (false, false) => None,
    }
}

/// The GRUB modules on the ISO.
const GRUB_MODULES: &str = "multiboot multiboot2 normal configfile iso9660 biosdisk";

/// The `grub.cfg` of [`iso`]: boot the kernel at once with `cmdline`.
pub fn grub_cfg(kind: Multiboot, cmdline: &str) -> String {
    let command = match kind {
        Multiboot::V1 => "multiboot",
        Multiboot::V2 => "multiboot2",
    };
    format!("set timeout=0\nmenuentry \"image\" {{\n    {command} /boot/image.elf {cmdline}\n    boot\n}}\n")
}

/// A GRUB rescue ISO (BIOS, El Torito) that boots `kernel_elf` as `/boot/image.elf` with
/// `cmdline`, through multiboot2 or multiboot1 after its header ([`multiboot_kind`]): an ELF
/// (32- or 64-bit, segments below 4 GiB) or a flat image with the a.out kludge. ISOs live in
/// `<target>/bochs/`, named after the kernel's file name and a hash of its bytes and the
/// `grub.cfg`, and are reused.
pub fn iso(kernel_elf: &Path, cmdline: &str) -> Result<PathBuf> {
    ensure_bochs()?;
    if let Some(c) = cmdline.chars().find(|c| !(c.is_ascii_alphanumeric() || " _-.,:=/+".contains(*c))) {
        bail!("kernel command line {cmdline:?}: {c:?} would need quoting in grub.cfg; use letters, digits, spaces and _-.,:=/+");
    }
    let kernel = match std::fs::read(kernel_elf) {
        Ok(k) => k,
        Err(e) => bail!("reading the kernel {}: {e}", kernel_elf.display()),
    };
    let Some(kind) = multiboot_kind(&kernel) else {
        bail!("{} has no multiboot2 or multiboot1 header", kernel_elf.display());
    };
    let cfg = grub_cfg(kind, cmdline);
    let mut hash = Sha256::new();
    hash.update(&kernel);
    hash.update(GRUB_MODULES);
    hash.update(&cfg);
    let id: String = hash.finalize()[..8].iter().map(|b| format!("{b:02x}")).collect();
    let stem = kernel_elf.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let dir = target_dir().join("bochs");
    std::fs::create_dir_all(&dir)?;
    let out = dir.join(format!("{stem}-{id}.iso"));
    if out.is_file() {
        return Ok(out);
    }
    let work = tempfile::Builder::new().prefix("iso-").tempdir_in(&dir)?;
    let root = work.path().join("root");
    std::fs::create_dir_all(root.join("boot/grub"))?;
    std::fs::write(root.join("boot/image.elf"), &kernel)?;
    std::fs::write(root.join("boot/grub/grub.cfg"), &cfg)?;
    let built = work.path().join("image.iso");
    let mut cmd = Command::new("grub-mkrescue");
    cmd.arg(format!("--install-modules={GRUB_MODULES}"))
        .args(["--locales=", "--fonts=", "--themes=", "--compress=xz", "-o"])
        .arg(&built)
        .arg(&root);
    run(cmd, Duration::from_secs(120)).map_err(|e| Error(format!("grub-mkrescue: {e}")))?;
    // A rename within one directory: another process building the same ISO is harmless.
    std::fs::rename(&built, &out)?;
    Ok(out)
}

/// Bochs' display. Debian's Bochs 2.7 has no `nogui`; both of these run without a screen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Display {
    /// `rfb, options="timeout=0"`: a VNC server on the first free port of 5900-5949 (on every
    /// interface, no password), no client awaited. Bochs 2.7 searches that range badly: while
    /// another Bochs listens on 5900, binding 5900 succeeds but listening fails and every
    /// later port then fails to bind, so a second Bochs ends with "RFB could not bind any port
    /// between 5900 and 5949". The harness therefore runs one rfb Bochs at a time on the
    /// machine (a lock file in the temporary directory, held by the handle until it quits, is
    /// dropped or sees Bochs end) and retries while a Bochs started elsewhere holds the port.
    /// So quit one rfb Bochs before starting the next in the same thread.
    #[default]
    Rfb,
    /// `term` (package `bochs-term`): Bochs draws the screen with ncurses into a pty of its own
    /// that nobody reads; no port, so any number of them run at once. A guest that keeps
    /// rewriting the VGA text screen could fill that pty (some 64 KiB) and stall Bochs; the
    /// BIOS, GRUB and a serial/port-0xE9 kernel write far less.
    Term,
}

/// The machine: CPU model, RAM, emulation speed and display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Bochs' `cpu: model=`, e.g. [`INTEL_VMX`] or [`AMD_SVM`] (`bochs --help cpu` lists them).
    pub cpu_model: String,
    /// Guest RAM, MiB.
    pub mem_mib: u64,
    /// Emulated instructions per emulated second (`cpu: ips=`). Lower is faster in wall
    /// time for everything timed in emulated time (COM1, timers).
    pub ips: u64,
    /// The display nobody watches.
    pub display: Display,
    /// COM2 into this file (the image's defmt log), if any.
    pub com2_file: Option<PathBuf>,
}

impl Config {
    /// `cpu_model` with `mem_mib` MiB at [`DEFAULT_IPS`], on [`Display::Rfb`].
    pub fn new(cpu_model: &str, mem_mib: u64) -> Self {
        Config {
            cpu_model: cpu_model.to_string(),
            mem_mib,
            ips: DEFAULT_IPS,
            display: Display::default(),
            com2_file: None,
        }
    }

    /// The `bochsrc` for a machine that boots `iso` with COM1 on TCP `com1_port` and the
    /// Bochs log in `log`.
    pub fn bochsrc(&self, iso: &Path, com1_port: u16, log: &Path) -> String {
        let com2 = match &self.com2_file {
            Some(f) => format!("com2: enabled=1, mode=file, dev={}\n", f.display()),
            None => String::new(),
        };
        com2 + &format!(
            "megs: {mem}\n\
             romimage: file={BIOS}\n\
             vgaromimage: file={VGA_BIOS}\n\
             ata0-master: type=cdrom, path={iso}, status=inserted\n\
             boot: cdrom\n\
             cpu: model={model}, ips={ips}\n\
             clock: sync=none\n\
             com1: enabled=1, mode=socket-server, dev=localhost:{com1_port}\n\
             port_e9_hack: enabled=1\n\
             display_library: {display}\n\
             speaker: enabled=0\n\
             log: {log}\n\
             panic: action=fatal\n\
             error: action=report\n",
            mem = self.mem_mib,
            iso = iso.display(),
            model = self.cpu_model,
            ips = self.ips,
            display = match self.display {
                Display::Rfb => "rfb, options=\"timeout=0\"",
                Display::Term => "term",
            },
            log = log.display(),
        )
    }
}

/// Where the simulation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    /// Bochs has not yet passed its first stop at the reset vector (it waits for COM1).
    Starting,
    /// Running; the current console segment starts at this offset of stdout.
    Running(usize),
    /// In the debugger; its last prompt ends at this offset of stdout.
    Stopped(usize),
}

/// A running Bochs; killed when dropped.
#[derive(Debug)]
pub struct Bochs {
    child: Child,
    stdin: Option<ChildStdin>,
    com1: SocketAddr,
    dir: tempfile::TempDir,
    /// The console text of the finished run segments.
    console: String,
    run: Run,
    /// The number of the debugger's last prompt on stdin.
    prompts: u32,
    /// Files written by `writemem`, numbered.
    reads: u32,
    /// Bochs' stdout so far (it only grows).
    out: RefCell<Vec<u8>>,
    /// With [`Display::Rfb`]: the machine-wide lock, held until this Bochs is seen to end.
    display_lock: Option<File>,
}

/// How a start went.
enum Listening {
    Yes,
    /// COM1's port could not be bound.
    Com1Busy(String),
    /// No rfb port could be had.
    RfbBusy(String),
}

impl Bochs {
    /// Starts Bochs on `iso` with `cpu_model` and `mem_mib` MiB at [`DEFAULT_IPS`]; see
    /// [`Bochs::start_with`].
    pub fn start(iso: &Path, cpu_model: &str, mem_mib: u64) -> Result<Bochs> {
        Bochs::start_with(iso, &Config::new(cpu_model, mem_mib))
    }

    /// Starts Bochs (`bochs -q -f bochsrc -rc FILE_WITH_c`, the debugger on a stdin pipe)
    /// and returns once it listens on COM1 (and, with [`Display::Rfb`], on its VNC port).
    /// It boots when COM1 is connected ([`Bochs::connect_com1`]). A COM1 port that Bochs
    /// cannot bind (it does not reuse an address in TIME_WAIT) is retried with another port;
    /// an rfb port held by a Bochs started elsewhere is waited for (up to a minute). Bochs is
    /// killed if the thread that started it ends.
    pub fn start_with(iso: &Path, config: &Config) -> Result<Bochs> {
        ensure_bochs()?;
        if config.cpu_model.is_empty()
            || !config.cpu_model.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            bail!("bad Bochs CPU model {:?}", config.cpu_model);
        }
        let iso = match iso.canonicalize() {
            Ok(p) => p,
            Err(e) => bail!("the ISO {}: {e}", iso.display()),
        };
        let display_lock = match config.display {
            Display::Rfb => Some(rfb_lock(Duration::from_secs(300))?),
            Display::Term => None,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let (mut tries, mut last) = (0, String::new());
        while tries < 5 && (tries == 0 || Instant::now() < deadline) {
            tries += 1;
            let dir = tempfile::Builder::new().prefix("bochs-").tempdir()?;
            let port = free_port()?;
            std::fs::write(dir.path().join(BOCHSRC), config.bochsrc(&iso, port, &dir.path().join(LOG)))?;
            std::fs::write(dir.path().join(CONTINUE), "c\n")?;
            let mut child = spawn(dir.path())?;
            let stdin = child.stdin.take();
            let mut bochs = Bochs {
                child,
                stdin,
                com1: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)),
                dir,
                console: String::new(),
                run: Run::Starting,
                prompts: 0,
                reads: 0,
                out: RefCell::new(Vec::new()),
                display_lock: None,
            };
            match bochs.wait_listening(config.display, Duration::from_secs(30))? {
                Listening::Yes => {
                    bochs.display_lock = display_lock;
                    return Ok(bochs);
                }
                Listening::Com1Busy(why) => last = why,
                Listening::RfbBusy(why) => {
                    // Another Bochs holds 5900; not one of ours (they take the lock).
                    tries = tries.min(1);
                    last = why;
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
        bail!("Bochs could not bind its ports: {last}")
    }

    /// Waits until Bochs listens on COM1 (and on its rfb port), or ends because it could
    /// not bind one of them (worth a retry).
    fn wait_listening(&mut self, display: Display, timeout: Duration) -> Result<Listening> {
        let deadline = Instant::now() + timeout;
        loop {
            let com1 = self.stderr().contains("waiting for client to connect");
            if com1 && (display != Display::Rfb || self.rfb_port().is_some()) {
                return Ok(Listening::Yes);
            }
            if let Some(status) = self.exited()? {
                let why = self.exit_message().unwrap_or_else(|| tail(&self.stderr(), 1500));
                if why.contains("RFB could not bind") {
                    return Ok(Listening::RfbBusy(why));
                }
                if why.contains("bind() or listen() failed") {
                    return Ok(Listening::Com1Busy(why));
                }
                bail!("Bochs ended at start ({status}): {why}\n{}", tail(&self.log(), 3000));
            }
            if Instant::now() > deadline {
                bail!("Bochs did not listen on COM1 in {timeout:?}: {}", self.report());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The TCP address of COM1 (Bochs listens there and accepts one client).
    pub fn com1_addr(&self) -> SocketAddr {
        self.com1
    }

    /// Connects to COM1, retrying until `timeout`. The machine boots once this succeeds.
    pub fn connect_com1(&self, timeout: Duration) -> Result<TcpStream> {
        let deadline = Instant::now() + timeout;
        loop {
            match TcpStream::connect(self.com1) {
                Ok(s) => {
                    s.set_nodelay(true)?;
                    return Ok(s);
                }
                Err(e) if Instant::now() > deadline => bail!("connect to Bochs' COM1 at {}: {e}", self.com1),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// The rfb (VNC) port Bochs bound, once its log says so. Bochs tries 5900-5949 itself
    /// and listens on every interface, without a password.
    pub fn rfb_port(&self) -> Option<u16> {
        let log = self.log();
        let rest = log.rsplit("listening for connections on port ").next()?;
        if rest.len() == log.len() {
            return None;
        }
        rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    }

    /// The directory with the bochsrc, Bochs' stdout/stderr and its log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Bochs' log (`log:` in the bochsrc).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(LOG)).unwrap_or_default()
    }

    /// Bochs' stderr (start-up messages, the exit message).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(STDERR)).unwrap_or_default()
    }

    /// The message Bochs ended with, e.g. `[UNMP  ] Shutdown port: shutdown requested`.
    pub fn exit_message(&self) -> Option<String> {
        const HEAD: &str = "Bochs is exiting with the following message:";
        let stderr = self.stderr();
        let (_, rest) = stderr.split_once(HEAD)?;
        let message = rest.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with("====="))?;
        Some(message.to_string())
    }

    /// Reads what Bochs appended to its stdout since the last call.
    fn refresh(&self) {
        let mut out = self.out.borrow_mut();
        if let Ok(mut file) = File::open(self.dir.path().join(STDOUT)) {
            let at = out.len() as u64;
            if file.seek(SeekFrom::Start(at)).is_ok() {
                let _ = file.read_to_end(&mut out);
            }
        }
    }

    /// Everything the machine wrote to port 0xE9 so far (without the debugger's output).
    pub fn console(&self) -> String {
        let mut text = self.console.clone();
        self.refresh();
        let out = self.out.borrow();
        let start = match self.run {
            Run::Starting => boot_run_start(&out),
            Run::Running(s) => Some(s),
            Run::Stopped(_) => None,
        };
        if let Some(s) = start {
            text.push_str(&String::from_utf8_lossy(without_exit_line(&out[s.min(out.len())..])));
        }
        text
    }

    /// Waits until the console contains `marker`; returns the console. Fails if Bochs ends
    /// first or at `deadline`, with the console, stderr and the log's end.
    pub fn wait_for(&mut self, marker: &str, deadline: Instant) -> Result<String> {
        loop {
            let console = self.console();
            if console.contains(marker) {
                return Ok(console);
            }
            if let Some(status) = self.exited()? {
                bail!("Bochs ended ({status}) before {marker:?} appeared: {}", self.report());
            }
            if Instant::now() > deadline {
                bail!("{marker:?} did not appear in time: {}", self.report());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The exit status once Bochs has ended, without waiting.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        self.exited()
    }

    /// The exit status once Bochs has ended, without waiting; an ended Bochs lets the rfb
    /// lock go.
    fn exited(&mut self) -> Result<Option<ExitStatus>> {
        let status = self.child.try_wait()?;
        if status.is_some() {
            self.display_lock = None;
        }
        Ok(status)
    }

    /// Waits until Bochs ends by itself (e.g. "Shutdown" on port 0x8900); returns its exit
    /// message. Fails at `deadline`.
    pub fn wait_exit(&mut self, deadline: Instant) -> Result<String> {
        loop {
            if self.exited()?.is_some() {
                return Ok(self.exit_message().unwrap_or_else(|| tail(&self.stderr(), 1000)));
            }
            if Instant::now() > deadline {
                bail!("Bochs did not end in time: {}", self.report());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The console, stderr and log ends, for error messages.
    fn report(&self) -> String {
        format!(
            "\n--- console ---\n{}\n--- stderr ---\n{}\n--- log ---\n{}",
            tail(&self.console(), 3000),
            tail(&self.stderr(), 1500),
            tail(&self.log(), 3000)
        )
    }

    fn alive(&mut self) -> Result<()> {
        if let Some(status) = self.exited()? {
            bail!("Bochs has ended ({status}): {}", self.report());
        }
        Ok(())
    }

    /// Waits until `find` finds something in stdout; returns what it found.
    fn wait_stdout<T>(&mut self, what: &str, mut find: impl FnMut(&[u8]) -> Option<T>) -> Result<T> {
        let deadline = Instant::now() + DEBUGGER_TIMEOUT;
        loop {
            self.refresh();
            if let Some(found) = find(&self.out.borrow()) {
                return Ok(found);
            }
            self.alive().map_err(|e| Error(format!("waiting for {what}: {e}")))?;
            if Instant::now() > deadline {
                bail!("no {what} from Bochs' debugger in {DEBUGGER_TIMEOUT:?}: {}", self.report());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Stops the simulation (SIGINT) and waits for the debugger's prompt. A no-op when
    /// stopped already. The machine must have been booted (COM1 connected).
    pub fn stop(&mut self) -> Result<()> {
        let run_start = match self.run {
            Run::Stopped(_) => return Ok(()),
            Run::Running(s) => s,
            Run::Starting => {
                self.wait_stdout("first stop at the reset vector (is COM1 connected?)", boot_run_start)?
            }
        };
        self.alive()?;
        let pid = self.child.id();
        let mut kill = Command::new("sh");
        kill.args(["-c", &format!("kill -INT {pid}")]);
        run(kill, Duration::from_secs(10))?;
        let (prompt, at) = self.wait_prompt(run_start)?;
        // The stop prints `Next at t=...` and the next instruction before the prompt.
        let out = self.out.borrow();
        let end = rfind(&out[run_start..at], b"Next at t=").map_or(at, |i| run_start + i);
        self.console.push_str(&String::from_utf8_lossy(&out[run_start..end]));
        drop(out);
        self.prompts += 1;
        self.run = Run::Stopped(at + prompt.len());
        Ok(())
    }

    /// Waits for the debugger's next prompt after offset `from` of stdout; returns the
    /// prompt and its offset.
    fn wait_prompt(&mut self, from: usize) -> Result<(String, usize)> {
        let prompt = format!("<bochs:{}> ", self.prompts + 1);
        // Only the new part of stdout is searched on each poll (`xp` prints megabytes).
        let mut scanned = from;
        let at = self.wait_stdout("prompt", |out| {
            let start = scanned.saturating_sub(prompt.len()).max(from);
            scanned = out.len();
            find(out.get(start..)?, prompt.as_bytes()).map(|i| start + i)
        })?;
        Ok((prompt, at))
    }

    fn send(&mut self, line: &str) -> Result<()> {
        let Some(stdin) = self.stdin.as_mut() else { bail!("Bochs' stdin is closed") };
        stdin.write_all(format!("{line}\n").as_bytes())?;
        stdin.flush()?;
        Ok(())
    }

    /// Runs one debugger command (stopping the simulation first) and returns what it
    /// printed. The simulation stays stopped: [`Bochs::resume`] continues it. `c` and `q`
    /// are refused: use [`Bochs::resume`] and [`Bochs::quit`].
    pub fn command(&mut self, command: &str) -> Result<String> {
        let word = command.split_whitespace().next().unwrap_or_default();
        if command.contains('\n') || ["c", "cont", "continue", "q", "quit", "exit"].contains(&word) {
            bail!("debugger command {command:?} refused: one line, not continue or quit");
        }
        self.stop()?;
        let Run::Stopped(from) = self.run else { bail!("the debugger is not at its prompt") };
        self.send(command)?;
        let (prompt, at) = self.wait_prompt(from)?;
        self.prompts += 1;
        self.run = Run::Stopped(at + prompt.len());
        let text = String::from_utf8_lossy(&self.out.borrow()[from..at]).into_owned();
        // readline echoes the command first.
        let text = text.strip_prefix(command).map(|t| t.strip_prefix('\n').unwrap_or(t)).unwrap_or(&text);
        Ok(text.to_string())
    }

    /// Continues the simulation after [`Bochs::stop`] or [`Bochs::command`].
    pub fn resume(&mut self) -> Result<()> {
        let Run::Stopped(from) = self.run else { return Ok(()) };
        self.send("c")?;
        // The echo of `c` comes before anything the machine prints.
        self.wait_stdout("echo of `c`", |out| {
            (out.get(from..from + 2) == Some(b"c\n".as_slice())).then_some(())
        })?;
        self.run = Run::Running(from + 2);
        Ok(())
    }

    /// True while the simulation is stopped in the debugger.
    pub fn is_stopped(&self) -> bool {
        matches!(self.run, Run::Stopped(_))
    }

    /// `len` bytes of the machine's physical memory at `addr`, from a running, halted or
    /// stopped machine (a running one is stopped for the read and continued after).
    ///
    /// `writemem` (fast: 64 MiB in 0.2 s) reads from where the debugger's `page` shows the
    /// first and the last page of what is left mapped 1:1 by the CPU's current translation
    /// (paging off, or the image's identity map while the CPU is stopped in the image), up to
    /// a page it cannot translate; the debugger's `xp` (physical, about 1 MB/s) reads such a
    /// page, and all of a range whose ends are not mapped 1:1 (the CPU stopped inside a
    /// guest, say). A page inside the range mapped elsewhere, with both ends 1:1, would be
    /// read through that mapping.
    pub fn read_phys(&mut self, addr: u64, len: usize) -> Result<Vec<u8>> {
        let Some(end) = addr.checked_add(len as u64) else { bail!("{addr:#x}+{len} overflows") };
        self.while_stopped(|b| {
            let mut bytes = Vec::with_capacity(len);
            let mut at = addr;
            while at < end {
                if b.identity_mapped(at)? && b.identity_mapped(end - 1)? {
                    let read = b.writemem_upto(at, (end - at) as usize)?;
                    at += read.len() as u64;
                    bytes.extend_from_slice(&read);
                    if at == end {
                        break;
                    }
                }
                // The page at `at` is not mapped 1:1, or not at all.
                let page_end = ((at | 0xfff) + 1).min(end);
                bytes.extend_from_slice(&b.xp(at, (page_end - at) as usize)?);
                at = page_end;
            }
            Ok(bytes)
        })
    }

    /// `len` bytes of physical memory at `addr` with the debugger's `xp` (always physical,
    /// whatever the CPU's paging; about 1 MB/s).
    pub fn read_phys_xp(&mut self, addr: u64, len: usize) -> Result<Vec<u8>> {
        self.while_stopped(|b| b.xp(addr, len))
    }

    /// `len` bytes at the *linear* address `addr` of the stopped CPU's current context, with
    /// the debugger's `writemem`.
    pub fn read_linear(&mut self, addr: u64, len: usize) -> Result<Vec<u8>> {
        self.while_stopped(|b| b.writemem(addr, len))
    }

    /// Runs `f` with the simulation stopped; continues it after if it was running.
    fn while_stopped<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let was_running = !self.is_stopped();
        self.stop()?;
        let result = f(self);
        if was_running && self.exited()?.is_none() {
            self.resume()?;
        }
        result
    }

    /// True when `page` maps the page of the linear address `addr` to the same physical page.
    fn identity_mapped(&mut self, addr: u64) -> Result<bool> {
        let page = addr & !0xfff;
        let out = self.command(&format!("page {page:#x}"))?;
        // "linear page 0x0000000000100000 maps to physical page 0x000000100000"
        let physical = out
            .split_once("maps to physical page ")
            .and_then(|(_, p)| p.split_whitespace().next())
            .and_then(|p| u64::from_str_radix(p.trim_start_matches("0x"), 16).ok());
        Ok(physical == Some(page))
    }

    fn writemem(&mut self, addr: u64, len: usize) -> Result<Vec<u8>> {
        let bytes = self.writemem_upto(addr, len)?;
        if bytes.len() != len {
            bail!(
                "writemem {addr:#x} {len}: the linear address {:#x} has no translation",
                addr + bytes.len() as u64
            );
        }
        Ok(bytes)
    }

    /// `writemem` of `len` bytes at the linear address `addr`: all of them, or those before
    /// the 4 KiB block (counted from `addr`) with a page it could not translate.
    fn writemem_upto(&mut self, addr: u64, len: usize) -> Result<Vec<u8>> {
        if u32::try_from(len).is_err() {
            bail!("writemem reads at most 4 GiB - 1 at once, not {len}");
        }
        self.reads += 1;
        let file = self.dir.path().join(format!("mem-{}.bin", self.reads));
        let out = self.command(&format!("writemem \"{}\" {addr:#x} {len}", file.display()))?;
        let bytes = std::fs::read(&file);
        let _ = std::fs::remove_file(&file);
        match bytes {
            Ok(b) if b.len() == len || out.contains("physical address not available") => Ok(b),
            Ok(b) => bail!("writemem {addr:#x} {len} gave {} bytes: {}", b.len(), out.trim()),
            Err(e) => bail!("writemem {addr:#x} {len}: {e}: {}", out.trim()),
        }
    }

    fn xp(&mut self, addr: u64, len: usize) -> Result<Vec<u8>> {
        let out = self.command(&format!("xp /{len}bx {addr:#x}"))?;
        // "0x0000000000100000 <bogus+       0>:\t0x02\t0xb0\t..." per 8 bytes.
        let bytes: Vec<u8> = out
            .lines()
            .filter_map(|l| l.split_once(">:").map(|(_, b)| b))
            .flat_map(|b| b.split_whitespace().map(|v| u8::from_str_radix(v.trim_start_matches("0x"), 16)))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| Error(format!("xp {addr:#x} {len}: {e} in {}", tail(&out, 500))))?;
        if bytes.len() != len {
            bail!("xp {addr:#x} {len} gave {} bytes: {}", bytes.len(), tail(&out, 500));
        }
        Ok(bytes)
    }

    /// Ends Bochs (debugger `q`, then SIGKILL after 10 s) and returns the console.
    pub fn quit(mut self) -> String {
        self.end();
        self.console()
    }

    fn end(&mut self) {
        if matches!(self.exited(), Ok(Some(_))) {
            return;
        }
        self.refresh();
        let booted = self.run != Run::Starting || boot_run_start(&self.out.borrow()).is_some();
        // Before COM1 is connected the debugger is not there yet: no `q` to wait for.
        if booted && self.stop().is_ok() {
            let _ = self.send("q");
        }
        // EOF on stdin at the prompt quits as well.
        self.stdin = None;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if !matches!(self.exited(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.display_lock = None;
    }
}

impl Drop for Bochs {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts `bochs -q -f bochsrc -rc continue.rc` in `dir`, stdin a pipe, stdout and stderr
/// into files; under `setpriv --pdeathsig KILL` (util-linux) when there is one, so Bochs
/// dies with the thread that started it.
fn spawn(dir: &Path) -> Result<Child> {
    let mut cmd = match which("setpriv") {
        Some(setpriv) => {
            let mut c = Command::new(setpriv);
            c.args(["--pdeathsig", "KILL", "--", "bochs"]);
            c
        }
        None => Command::new("bochs"),
    };
    cmd.args(["-q", "-f", BOCHSRC, "-rc", CONTINUE])
        .current_dir(dir)
        // readline: no terminal control, no user key bindings.
        .env("TERM", "dumb")
        .env("INPUTRC", "/dev/null")
        .stdin(Stdio::piped())
        .stdout(File::create(dir.join(STDOUT))?)
        .stderr(File::create(dir.join(STDERR))?);
    match cmd.spawn() {
        Ok(c) => Ok(c),
        Err(e) => bail!("cannot start bochs: {e}"),
    }
}

/// Takes the machine-wide lock that lets one rfb Bochs start at a time (see
/// [`Display::Rfb`]), waiting up to `timeout`.
fn rfb_lock(timeout: Duration) -> Result<File> {
    let path = std::env::temp_dir().join("qemu-tests-bochs-rfb.lock");
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path)?;
    let deadline = Instant::now() + timeout;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => bail!(
                "the lock {} (one rfb Bochs at a time on the machine; a Bochs handle of this process \
                 that still runs holds it too: quit it first, or use Display::Term): {e}",
                path.display()
            ),
        }
    }
}

/// A TCP port on 127.0.0.1 that nothing listens on now.
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// Where the first run starts in stdout: after Bochs' stop at the reset vector
/// (`Next at t=0` and the instruction there), which comes before the `-rc` file's `c`.
fn boot_run_start(out: &[u8]) -> Option<usize> {
    const STOP: &[u8] = b"Next at t=0\n";
    let line = find(out, STOP)? + STOP.len();
    let end = out[line..].iter().position(|&b| b == b'\n')?;
    Some(line + end + 1)
}

/// `segment` without the line Bochs' debugger prints when the simulation ends (Shutdown,
/// a fatal error, `q`): `(0).[394528605] [0x0000001000b5] 0010:...: rep outsb ... ; f36e`.
fn without_exit_line(segment: &[u8]) -> &[u8] {
    let Some(body) = segment.strip_suffix(b"\n") else { return segment };
    let start = body.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    // The line may follow console text that did not end in a newline.
    let Some(at) = rfind(&body[start..], b").[").map(|i| start + i) else { return segment };
    let cpu = body[start..at].iter().rposition(|&b| b == b'(').map(|i| start + i);
    let Some(open) = cpu else { return segment };
    let digits = |s: &[u8]| !s.is_empty() && s.iter().all(u8::is_ascii_digit);
    let ticks = body[at + 3..].split(|&b| b == b']').next().unwrap_or_default();
    if digits(&body[open + 1..at]) && digits(ticks) && body[at + 3 + ticks.len()..].starts_with(b"] [0x") {
        &segment[..open]
    } else {
        segment
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn rfind(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).rposition(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_console_ends_before_the_exit_line() {
        let line = b"(0).[394528605] [0x0000001000b5] 0010:00000000001000b5 (unk. ctxt): rep outsb ; f36e\n";
        assert_eq!(without_exit_line(&[b"HELLO\n".as_slice(), line].concat()), b"HELLO\n");
        assert_eq!(without_exit_line(&[b"no newline".as_slice(), line].concat()), b"no newline");
        assert_eq!(without_exit_line(b"HELLO\n"), b"HELLO\n");
        assert_eq!(without_exit_line(b"(1).[x] [0x1]\n"), b"(1).[x] [0x1]\n");
        assert_eq!(without_exit_line(b""), b"");
    }

    #[test]
    fn the_first_run_starts_after_the_stop_at_the_reset_vector() {
        let out = b"=====\nNext at t=0\n(0) [0x0000fffffff0] f000:fff0 (unk. ctxt): jmpf 0xf000:e05b ; ea5be000f0\nHELLO\n";
        let start = boot_run_start(out).unwrap();
        assert_eq!(&out[start..], b"HELLO\n");
        assert_eq!(boot_run_start(b"=====\nNext at t=0\n(0) [0x0000fff"), None);
    }

    #[test]
    fn the_bochsrc_has_the_machine() {
        let rc = Config::new(INTEL_VMX, 64).bochsrc(Path::new("/t/a.iso"), 4321, Path::new("/t/log"));
        for line in [
            "megs: 64\n",
            "cpu: model=corei7_skylake_x, ips=50000000\n",
            "ata0-master: type=cdrom, path=/t/a.iso, status=inserted\n",
            "com1: enabled=1, mode=socket-server, dev=localhost:4321\n",
            "display_library: rfb, options=\"timeout=0\"\n",
            "log: /t/log\n",
        ] {
            assert!(rc.contains(line), "{line:?} not in\n{rc}");
        }
    }
}

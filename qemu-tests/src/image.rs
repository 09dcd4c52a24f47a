//! One postcopy migration into the hypervisor image, the way `cargo xtask migrate` runs it.
//!
//! The image boots in QEMU (TCG, `-cpu max`: AMD SVM with nested paging) with COM1 on a unix
//! socket, its debug console into a log file and QMP; the source (the project's own, or a
//! recorded stream file sent without answering) connects to COM1. The image ends with a
//! `RESULT {json}` line and, started with `hold`, halts so that the harness can read the
//! guest's RAM from the machine's memory (QMP `pmemsave` of the guest frames) before it ends
//! QEMU. Verdicts: `guest_ok` (the pattern guest's result is what its rules predict) and
//! `ram_equal` (every page of guest RAM equals the source's, except the pages the guest
//! writes by its rules, which must hold what the rules say, and its stack pages).

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::own_source::{OwnSource, RunOptions};
use crate::pattern_guest::{self, build_pattern_guest, IMAGE_LIMIT, STACK_TOP};
use crate::process::{run, ChildGuard};
use crate::qmp::Qmp;
use crate::{bail, install, target_dir, workspace_root, Result};

/// Machine RAM for the image: the image, its tables and 128 MiB of guest frames at 64 MiB.
pub(crate) const MACHINE_MIB: u64 = 256;
/// What the image logs once its transport is set up and the stream may come ("... on COM1"
/// or "... on vsock").
const READY: &str = "waiting for the migration stream on";

/// Where the stream comes from.
#[derive(Debug, Clone)]
pub enum SourceKind {
    /// `postcopy-source`'s engine, in process: the pattern guest.
    Own,
    /// A recorded stream sent as it is; nothing on the return path is answered.
    File(PathBuf),
}

/// The machine the image runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Emulator {
    /// QEMU 7.2, TCG, `-cpu max`: AMD SVM with nested paging.
    Qemu,
    /// Bochs 2.7 with this CPU model: `corei7_skylake_x` (Intel VMX with EPT) or `ryzen` (AMD
    /// SVM with nested paging).
    Bochs(String),
}

impl Emulator {
    /// The name in the JSON line.
    pub fn name(&self) -> &'static str {
        match self {
            Emulator::Qemu => "qemu",
            Emulator::Bochs(_) => "bochs",
        }
    }
}

/// A migration into the image.
#[derive(Debug, Clone)]
pub struct Migration {
    /// The machine.
    pub emulator: Emulator,
    /// The stream's source.
    pub source: SourceKind,
    /// Guest RAM of the own source, MiB.
    pub mem_mib: u64,
    /// Write the destination guest's RAM per block here (read from the machine).
    pub dump_dir: Option<PathBuf>,
    /// Overall limit.
    pub timeout: Duration,
    /// The own source's pause between background pages, so that page requests race them.
    pub background_pause: Duration,
}

impl Default for Migration {
    fn default() -> Self {
        Migration {
            emulator: Emulator::Qemu,
            source: SourceKind::Own,
            mem_mib: 2,
            dump_dir: None,
            timeout: Duration::from_secs(180),
            background_pause: Duration::from_millis(5),
        }
    }
}

/// The status of the last SHUT (`00 01 00 04`, be32) in the return-path bytes `rp`, if any
/// (its low byte: the destination sends 0 or 1).
pub fn last_shut(rp: &[u8]) -> Option<u8> {
    rp.windows(8).rev().find(|w| w[..4] == [0, 1, 0, 4]).map(|w| w[7])
}

/// A stream the image must refuse, for the hostile-input tests over COM1 and over vsock: a
/// valid start, then a RAM_DISCARD range past the end of its block.
pub fn discard_past_the_block_stream() -> Vec<u8> {
    let mut s = agent::testing::StreamBuilder::new();
    s.header().configuration(b"postcopy-test").command(agent::wire::command::Command::OpenReturnPath);
    s.advise(4096, 4096).ram_start(2, &[(b"ram", 2 << 20)]).discard(b"ram", &[(0x1f_f000, 0x2000)]);
    s.bytes
}

/// How QEMU runs the image: `-accel kvm -cpu host` when the host offers nested virtualization
/// (`/dev/kvm` opens and the `kvm_amd` or `kvm_intel` module's `nested` parameter is on, so the
/// image sees SVM or VMX), else TCG with `-cpu max` (AMD SVM with nested paging, emulated).
/// A `/dev/kvm` without nesting is not enough: the image needs the virtualization extensions.
pub fn accel() -> [&'static str; 4] {
    let nested = ["/sys/module/kvm_amd/parameters/nested", "/sys/module/kvm_intel/parameters/nested"]
        .iter()
        .any(|p| std::fs::read_to_string(p).is_ok_and(|v| matches!(v.trim(), "1" | "Y" | "y")));
    let kvm = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    if nested && kvm {
        ["-accel", "kvm", "-cpu", "host"]
    } else {
        ["-accel", "tcg", "-cpu", "max"]
    }
}

/// [`accel`] in words.
pub fn accel_description() -> String {
    match accel() {
        [_, "kvm", ..] => "KVM: this host offers nested virtualization".into(),
        _ => "TCG: this host offers no nested virtualization to KVM guests".into(),
    }
}

/// Builds the image (release, `x86_64-unknown-none`) into `<target>/image`; returns its ELF.
pub fn build_image() -> Result<PathBuf> {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let root = workspace_root();
    let target = target_dir().join("image");
    let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cargo
        .current_dir(&root)
        .args(["build", "--release", "-p", "hypervisor", "--target", "x86_64-unknown-none", "--target-dir"])
        .arg(&target)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET");
    run(cargo, Duration::from_secs(900))?;
    Ok(target.join("x86_64-unknown-none/release/hypervisor"))
}

/// What the harness needs of a machine running the image.
pub(crate) trait Emulated {
    /// Waits until the image has set COM1 up (its FIFO reset would drop earlier bytes).
    fn wait_ready(&mut self, deadline: Instant) -> Result<()>;
    /// The debug console so far.
    fn console(&self) -> String;
    /// Whether the machine has ended.
    fn ended(&mut self) -> Result<bool>;
    /// `len` bytes of the machine's physical memory at `addr`.
    fn read_phys(&mut self, addr: u64, len: u64) -> Result<Vec<u8>>;
    /// Ends the machine; returns the run's log.
    fn quit(self) -> String;

    /// The image's `RESULT {json}` line, once it is there (or the machine ended without it).
    fn wait_result(&mut self, deadline: Instant) -> Result<Value> {
        loop {
            let log = self.console();
            // Only a whole line: the image may be writing it while it is read.
            let whole = log.split_inclusive('\n').filter_map(|l| l.strip_suffix('\n'));
            if let Some(line) = whole.filter_map(|l| l.strip_prefix("RESULT ")).next() {
                return Ok(serde_json::from_str(line)?);
            }
            if self.ended()? {
                bail!("the image ended without a result; its log:\n{}", crate::process::tail(&log, 4000));
            }
            if Instant::now() > deadline {
                bail!("no result from the image in time; its log:\n{}", crate::process::tail(&log, 4000));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The image running in QEMU.
pub(crate) struct Machine {
    pub(crate) child: ChildGuard,
    qmp: Qmp,
    com1: PathBuf,
    log: PathBuf,
    defmt: PathBuf,
    image: PathBuf,
    _dir: tempfile::TempDir,
}

impl Machine {
    fn start(image: &Path) -> Result<Self> {
        Self::start_with(image, "hold", &["-m".into(), format!("{MACHINE_MIB}M")])
    }

    /// QEMU with the image, its command line `append`, and `extra` arguments (the memory and
    /// its devices: `-m`, or a memfd backend and the vsock device).
    pub(crate) fn start_with(image: &Path, append: &str, extra: &[String]) -> Result<Self> {
        let qemu = install::qemu()?;
        let dir = tempfile::Builder::new().prefix("image-").tempdir()?;
        let (com1, qmp, log) =
            (dir.path().join("com1.sock"), dir.path().join("qmp.sock"), dir.path().join("debugcon.log"));
        let defmt = dir.path().join("com2.defmt");
        let mut cmd = Command::new(qemu);
        cmd.args(accel())
            .args(["-display", "none"])
            .args(extra)
            .args(["-monitor", "none", "-parallel", "none", "-nic", "none", "-no-user-config", "-no-reboot"])
            .arg("-kernel")
            .arg(image)
            .args(["-append", append])
            .arg("-chardev")
            .arg(format!("socket,id=com1,path={},server=on,wait=off", com1.display()))
            .args(["-serial", "chardev:com1"])
            .arg("-serial")
            .arg(format!("file:{}", defmt.display()))
            .arg("-debugcon")
            .arg(format!("file:{}", log.display()))
            .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        let mut child = ChildGuard::spawn("qemu-image", cmd, dir.path())?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(qmp.exists() && com1.exists()) {
            if let Some(status) = child.try_status()? {
                bail!("QEMU exited at start ({status}): {}", child.stderr_tail(2000));
            }
            if Instant::now() > deadline {
                bail!("QEMU did not create its sockets in 20 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let qmp = Qmp::connect(&qmp, Duration::from_secs(20))?;
        Ok(Machine { child, qmp, com1, log, defmt, image: image.to_path_buf(), _dir: dir })
    }
}

impl Emulated for Machine {
    fn wait_ready(&mut self, deadline: Instant) -> Result<()> {
        loop {
            let log = self.console();
            if log.contains(READY) {
                return Ok(());
            }
            if let Some(status) = self.child.try_status()? {
                bail!(
                    "the image ended ({status}) before COM1 was ready; its log:\n{}",
                    crate::process::tail(&log, 4000)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the image did not get COM1 ready in time; its log:\n{}",
                    crate::process::tail(&log, 4000)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn console(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn ended(&mut self) -> Result<bool> {
        Ok(self.child.try_status()?.is_some())
    }

    fn read_phys(&mut self, addr: u64, len: u64) -> Result<Vec<u8>> {
        let file = self._dir.path().join(format!("pmem-{addr:x}.bin"));
        self.qmp.execute(
            "pmemsave",
            json!({ "val": addr, "size": len, "filename": file.display().to_string() }),
        )?;
        Ok(std::fs::read(&file)?)
    }

    /// The debug console, then the defmt log (COM2) decoded with the image's `.defmt` table.
    fn quit(mut self) -> String {
        let _ = self.qmp.execute("quit", json!({}));
        let _ = self.child.wait_or_kill(Duration::from_secs(10));
        let decoded = match (std::fs::read(&self.image), std::fs::read(&self.defmt)) {
            (Ok(elf), Ok(frames)) => decode_defmt(&elf, &frames),
            (Err(e), _) | (_, Err(e)) => format!("(no defmt log: {e})"),
        };
        format!("{}\n--- defmt log (COM2), decoded ---\n{decoded}", self.console())
    }
}

/// The image running in Bochs, its ELF and its COM2 (defmt) file.
struct BochsMachine(crate::bochs::Bochs, PathBuf, PathBuf);

impl Emulated for BochsMachine {
    fn wait_ready(&mut self, deadline: Instant) -> Result<()> {
        self.0.wait_for(READY, deadline).map(drop)
    }

    fn console(&self) -> String {
        self.0.console()
    }

    fn ended(&mut self) -> Result<bool> {
        Ok(self.0.try_status()?.is_some())
    }

    fn read_phys(&mut self, addr: u64, len: u64) -> Result<Vec<u8>> {
        self.0.read_phys(addr, len as usize)
    }

    /// The debug console, then the defmt log (COM2) decoded with the image's `.defmt` table.
    fn quit(self) -> String {
        let console = self.0.console();
        let _ = self.0.quit();
        let decoded = match (std::fs::read(&self.1), std::fs::read(&self.2)) {
            (Ok(elf), Ok(frames)) => decode_defmt(&elf, &frames),
            (Err(e), _) | (_, Err(e)) => format!("(no defmt log: {e})"),
        };
        format!("{console}\n--- defmt log (COM2), decoded ---\n{decoded}")
    }
}

/// COM1's connection: a unix socket (QEMU) or TCP (Bochs).
trait Com1: crate::own_source::Duplex + Send + Sized + 'static {
    /// A second handle on the connection.
    fn twin(&self) -> std::io::Result<Self>;
    /// Closes both directions.
    fn close(&self);
}

impl Com1 for UnixStream {
    fn twin(&self) -> std::io::Result<Self> {
        self.try_clone()
    }
    fn close(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

impl Com1 for std::net::TcpStream {
    fn twin(&self) -> std::io::Result<Self> {
        self.try_clone()
    }
    fn close(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

/// Runs the migration; returns the JSON line of `cargo xtask migrate` and the image's log.
pub fn migrate(m: &Migration) -> Result<(Value, String)> {
    let image = build_image()?;
    let source = match &m.source {
        SourceKind::Own => {
            let guest = std::fs::read(build_pattern_guest()?)?;
            Some(OwnSource::new(m.mem_mib << 20, guest)?)
        }
        SourceKind::File(_) => None,
    };
    match &m.emulator {
        Emulator::Qemu => {
            let mut machine = Machine::start(&image)?;
            let started = Instant::now();
            machine.wait_ready(started + m.timeout)?;
            let conn = connect(&machine.com1)?;
            drive(machine, conn, started, source, m)
        }
        Emulator::Bochs(cpu) => {
            let iso = crate::bochs::iso(&image, "hold")?;
            let logs = tempfile::Builder::new().prefix("bochs-defmt-").tempdir()?;
            let com2 = logs.path().join("com2.defmt");
            let mut config = crate::bochs::Config::new(cpu, MACHINE_MIB);
            config.display = crate::bochs::Display::Term;
            config.com2_file = Some(com2.clone());
            let bochs = crate::bochs::Bochs::start_with(&iso, &config)?;
            // Bochs boots only once COM1 is connected.
            let conn = bochs.connect_com1(Duration::from_secs(30))?;
            let started = Instant::now();
            let mut machine = BochsMachine(bochs, image.clone(), com2);
            machine.wait_ready(started + m.timeout)?;
            let outcome = drive(machine, conn, started, source, m);
            drop(logs);
            outcome
        }
    }
}

/// Runs the source over `conn` while the image in `machine` receives, then checks.
fn drive<E: Emulated, C: Com1>(
    mut machine: E,
    conn: C,
    started: Instant,
    source: Option<OwnSource>,
    m: &Migration,
) -> Result<(Value, String)> {
    let deadline = started + m.timeout;
    // The source runs beside the wait for the result: a refused stream ends the image early.
    let sender = {
        let mut conn = conn.twin()?;
        let opts =
            RunOptions { timeout: m.timeout, background_pause: m.background_pause, ..RunOptions::default() };
        let source = source.clone();
        let file = match &m.source {
            SourceKind::File(p) => Some(std::fs::read(p)?),
            SourceKind::Own => None,
        };
        std::thread::spawn(move || -> std::result::Result<Value, String> {
            match (source, file) {
                (Some(source), _) => source
                    .run(&mut conn, &opts)
                    .map(|r| serde_json::from_str(&r.to_json()).unwrap_or(Value::Null))
                    .map_err(|e| e.0),
                (None, Some(bytes)) => {
                    // Nothing is answered, but the return path is read (so the image's writes
                    // never block) and reported: a refused stream ends with SHUT(1).
                    let mut reader = conn.twin().map_err(|e| e.to_string())?;
                    let rp = std::thread::spawn(move || {
                        let mut out = Vec::new();
                        let _ = reader.read_to_end(&mut out);
                        out
                    });
                    let sent = conn.write_all(&bytes).map_err(|e| e.to_string());
                    let rp = rp.join().unwrap_or_default();
                    let shut = last_shut(&rp);
                    Ok(
                        json!({ "bytes_sent": bytes.len(), "send": sent.err(), "return_path_bytes": rp.len(), "shut": shut }),
                    )
                }
                (None, None) => Err("no source".into()),
            }
        })
    };
    let result = machine.wait_result(deadline);
    let seconds = started.elapsed().as_secs_f64();
    // The image has reported: whatever the source still waits for will not come.
    std::thread::sleep(Duration::from_millis(200));
    conn.close();
    let source_report = match sender.join() {
        Ok(r) => r,
        Err(_) => Err("the source thread panicked".into()),
    };
    let result = match result {
        Ok(r) => r,
        Err(e) => {
            let log = machine.quit();
            return Ok((error_line(&e.0, seconds, &m.emulator), log));
        }
    };
    let mut line = summary(&result, seconds, &m.emulator);
    if result["state"] != "error" {
        let (guest_ok, ram_equal, note) = check(&mut machine, &result, source.as_ref(), m)?;
        line["guest_ok"] = json!(guest_ok);
        line["ram_equal"] = json!(ram_equal);
        line["ram_check"] = json!(note);
    }
    line["source"] = match source_report {
        Ok(r) => r,
        Err(e) => json!({ "error": e }),
    };
    let log = machine.quit();
    Ok((line, log))
}

fn connect(path: &Path) -> Result<UnixStream> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > deadline => bail!("connect to COM1 at {}: {e}", path.display()),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn error_line(error: &str, seconds: f64, emulator: &Emulator) -> Value {
    let vendor = match emulator {
        Emulator::Bochs(cpu) if cpu == crate::bochs::INTEL_VMX => "vmx",
        _ => "svm",
    };
    json!({
        "state": "error", "vendor": vendor, "emulator": emulator.name(), "transport": "serial",
        "guest_ok": false, "ram_equal": false, "seconds": seconds, "error": error,
    })
}

/// The JSON line's fields from the image's report.
fn summary(r: &Value, seconds: f64, emulator: &Emulator) -> Value {
    let mut line = json!({
        "state": r["state"], "vendor": r["vendor"], "emulator": emulator.name(), "transport": "serial",
        "stage2_faults": r["stage2_faults"], "faults_served": r["faults_served"],
        "page_requests": r["page_requests"], "pages_received": r["pages_received"],
        "discarded_pages": r["discarded_pages"], "guest_ok": false, "ram_equal": false,
        "fault_exit_to_request_cycles_p50": r["fault_exit_to_request_cycles_p50"],
        "fault_exit_to_request_cycles_p99": r["fault_exit_to_request_cycles_p99"],
        "page_to_resume_cycles_p50": r["page_to_resume_cycles_p50"],
        "page_to_resume_cycles_p99": r["page_to_resume_cycles_p99"],
        "guest_result": r["guest_result"], "seconds": seconds,
    });
    if r["state"] == "error" {
        line["error"] = r["error"].clone();
    }
    line
}

/// `guest_ok`, `ram_equal` and a note on what was compared.
fn check(
    machine: &mut impl Emulated,
    r: &Value,
    source: Option<&OwnSource>,
    m: &Migration,
) -> Result<(bool, bool, String)> {
    let blocks = r["blocks"].as_array().cloned().unwrap_or_default();
    let mut dumped = Vec::new();
    for b in &blocks {
        let (Some(name), Some(hpa), Some(len)) = (b["name"].as_str(), b["hpa"].as_u64(), b["len"].as_u64())
        else {
            bail!("malformed block in the image's report: {b}");
        };
        let bytes = machine.read_phys(hpa, len)?;
        if let Some(dir) = &m.dump_dir {
            std::fs::create_dir_all(dir)?;
            std::fs::write(dir.join(crate::scenario::dump_file_name(name)), &bytes)?;
        }
        dumped.push((name.to_string(), bytes));
    }
    let Some(source) = source else {
        return Ok((false, false, "a replayed stream: no guest rules to check against".into()));
    };
    let mem = source.mem_bytes();
    let expected = pattern_guest::GuestResult::expected(mem);
    let got = &r["guest_result"];
    let guest_ok = got["checksum"].as_u64() == Some(expected.checksum)
        && got["mismatches"].as_u64() == Some(0)
        && got["written"].as_u64() == Some(expected.pages_written);
    let Some((_, ram)) = dumped.iter().find(|(n, _)| n.as_bytes() == crate::own_source::BLOCK) else {
        return Ok((guest_ok, false, "the image reported no `ram` block".into()));
    };
    let before = pattern_guest::expected_ram(mem, source.image())?;
    let (mut differ, mut stack) = (Vec::new(), 0);
    for (page, (got, want)) in ram.chunks(4096).zip(before.chunks(4096)).enumerate() {
        let (p, addr) = (page as u64, page as u64 * 4096);
        let want: Vec<u8> = if pattern_guest::is_data_page(p, mem) {
            pattern_guest::page_after_guest(p).to_vec()
        } else {
            want.to_vec()
        };
        if (IMAGE_LIMIT..STACK_TOP).contains(&addr) {
            // The guest's stack: written by its own code, no rule says with what.
            stack += 1;
            continue;
        }
        if got != want.as_slice() {
            differ.push(addr);
        }
    }
    let ram_equal = differ.is_empty() && ram.len() as u64 == mem;
    let note = if ram_equal {
        format!("{} pages equal (data pages the guest wrote by its rule included); {stack} stack pages not compared", mem / 4096 - stack)
    } else {
        format!("{} pages differ, first at {:#x?}", differ.len(), &differ[..differ.len().min(8)])
    };
    Ok((guest_ok, ram_equal, note))
}

/// The defmt frames of `frames`, decoded with the `.defmt` table of the ELF `elf`, one line
/// each.
pub fn decode_defmt(elf: &[u8], frames: &[u8]) -> String {
    let table = match defmt_decoder::Table::parse(elf) {
        Ok(Some(t)) => t,
        Ok(None) => return "(the image has no .defmt section)".into(),
        Err(e) => return format!("(the image's .defmt table does not parse: {e})"),
    };
    let mut decoder = table.new_stream_decoder();
    decoder.received(frames);
    let mut out = String::new();
    loop {
        match decoder.decode() {
            Ok(frame) => {
                out.push_str(&frame.display(false).to_string());
                out.push('\n');
            }
            Err(defmt_decoder::DecodeError::UnexpectedEof) => break,
            Err(defmt_decoder::DecodeError::Malformed) => {
                out.push_str("(a malformed frame)\n");
                if table.encoding().can_recover() {
                    continue;
                }
                break;
            }
        }
    }
    out
}

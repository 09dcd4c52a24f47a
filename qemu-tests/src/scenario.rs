//! One end-to-end migration: a QEMU source running the dirty guest migrates into
//! `postcopy-dest` through a recording [`Relay`]. Afterwards the destination's dump of every
//! RAMBlock is compared, byte for byte, with what QEMU 7.2's own destination holds after
//! loading the same recorded stream ([`crate::oracle::qemu_load_blocks`]), with the
//! destination's guest writes (`--guest-writes`) applied to that reference; and, for
//! information, its main RAM with the (paused) source's.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::dest::{Dest, DestOptions, Summary};
use crate::guest::{build_dirty_guest, GuestStatus};
use crate::oracle::qemu_load_blocks;
use crate::ram::{diff_pages, sha256_hex, zero_holes};
use crate::relay::{Endpoint, Relay};
use crate::source::{Machine, MigrationInfo, SourceVm};
use crate::{bail, Result};

/// What to migrate and how.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Source machine type.
    pub machine: Machine,
    /// RAM in MiB (at most 2048).
    pub mem_mib: u64,
    /// Dirty guest command line.
    pub guest_append: String,
    /// Enable `postcopy-ram` and switch to postcopy after [`Scenario::precopy_for`].
    pub postcopy: bool,
    /// `max-bandwidth` in bytes/s (`None`: QEMU's default, 32 MiB/s).
    pub max_bandwidth: Option<u64>,
    /// `max-postcopy-bandwidth` in bytes/s (`None`: unlimited).
    pub max_postcopy_bandwidth: Option<u64>,
    /// Time in precopy before `migrate-start-postcopy`.
    pub precopy_for: Duration,
    /// `--touch` for the destination.
    pub touch: Option<String>,
    /// `--record FILE` for the destination.
    pub record: Option<PathBuf>,
    /// `--vcpus N` for the destination.
    pub vcpus: Option<usize>,
    /// `--stage2 ept|npt` for the destination.
    pub stage2: Option<String>,
    /// Overall limit for the migration.
    pub timeout: Duration,
    /// Print the source's progress once per second.
    pub progress: bool,
    /// The destination listens on `tcp:127.0.0.1:PORT` instead of a unix socket.
    pub tcp: bool,
    /// `--guest-writes`: the destination's vCPUs write guest memory after RUN.
    pub guest_writes: bool,
}

impl Scenario {
    /// A postcopy migration of `machine` with 32 MiB, the guest dirtying 2 MiB/s, limited
    /// precopy bandwidth so that postcopy really starts, `--touch random`.
    pub fn postcopy(machine: Machine) -> Self {
        Scenario {
            machine,
            mem_mib: 32,
            guest_append: "rate=2048".into(),
            postcopy: true,
            max_bandwidth: Some(256 << 10),
            max_postcopy_bandwidth: Some(1 << 20),
            precopy_for: Duration::from_millis(1000),
            touch: Some("random".into()),
            record: None,
            vcpus: Some(4),
            stage2: Some("ept".into()),
            timeout: Duration::from_secs(60),
            progress: false,
            tcp: false,
            guest_writes: false,
        }
    }

    /// A postcopy migration of `mem_mib` MiB whose guest first fills all RAM with non-zero
    /// data (`fill`), then dirties 4 MiB/s; precopy at 32 MiB/s for 1 s, then postcopy at
    /// full speed.
    pub fn postcopy_filled(machine: Machine, mem_mib: u64) -> Self {
        Scenario {
            mem_mib,
            guest_append: "rate=4096 fill".into(),
            max_bandwidth: Some(32 << 20),
            max_postcopy_bandwidth: Some(0),
            ..Scenario::postcopy(machine)
        }
    }

    /// A pure precopy migration (no `postcopy-ram`) at QEMU's default bandwidth.
    pub fn precopy(machine: Machine) -> Self {
        Scenario {
            postcopy: false,
            max_bandwidth: None,
            max_postcopy_bandwidth: None,
            touch: None,
            ..Scenario::postcopy(machine)
        }
    }
}

/// What happened.
#[derive(Debug)]
pub struct Outcome {
    /// The destination's summary.
    pub summary: Summary,
    /// The source's final `query-migrate`.
    pub source: MigrationInfo,
    /// The source was seen in `postcopy-active` at least once.
    pub saw_postcopy_active: bool,
    /// The guest's status page on the source at the end.
    pub guest: GuestStatus,
    /// `None` if every RAMBlock dumped equals what QEMU's destination holds after loading
    /// the same stream (with the guest's writes applied), else the first block that differs
    /// and how. This is the verdict.
    pub ram_diff: Option<String>,
    /// RAMBlocks compared.
    pub blocks_compared: usize,
    /// Pages the destination's vCPUs wrote: their writes were applied to the reference, so
    /// those words must hold the guest's values and the rest of each page the stream's.
    pub guest_written_pages: usize,
    /// `None` if the dump equals the source's RAM at the end, else what differs (for
    /// information: the TCG source can lose dirty bits, see [`crate::oracle`]).
    pub source_diff: Option<String>,
    /// Bytes compared, all blocks.
    pub ram_bytes: usize,
    /// SHA-256 of the reference main RAM block (QEMU's load of the stream, whole block).
    pub reference_ram_sha256: String,
    /// The stream as the relay saw it: length and SHA-256.
    pub stream_bytes: u64,
    /// SHA-256 of the stream as the relay saw it.
    pub stream_sha256: String,
    /// The return path as the relay saw it.
    pub return_path_bytes: u64,
    /// The destination's stdout.
    pub dest_stdout: String,
}

/// The dump file name of a RAMBlock id (`/` replaced by `_`).
pub fn dump_file_name(block: &str) -> String {
    format!("{}.bin", block.replace('/', "_"))
}

/// Runs the scenario against the destination binary `dest_bin`.
pub fn run(dest_bin: &Path, sc: &Scenario) -> Result<Outcome> {
    let guest = build_dirty_guest()?;
    let builder = SourceVm::builder(sc.machine).mem_mib(sc.mem_mib).kernel(&guest, &sc.guest_append);
    let mut vm = builder.clone().spawn()?;
    vm.wait_guest_dirtying(Duration::from_secs(30))?;

    let work = tempfile::Builder::new().prefix("scenario-").tempdir()?;
    let dest_sock = work.path().join("dest.sock");
    let relay_sock = work.path().join("relay.sock");
    let stream = work.path().join("stream.bin");
    let dump_dir = work.path().join("dump");
    std::fs::create_dir(&dump_dir)?;
    let (listen, endpoint) = if sc.tcp {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        (format!("tcp:{addr}"), Endpoint::Tcp(addr))
    } else {
        (format!("unix:{}", dest_sock.display()), Endpoint::Unix(dest_sock.clone()))
    };
    let opts = DestOptions {
        listen: Some(listen),
        dump_dir: Some(dump_dir.clone()),
        touch: sc.touch.clone(),
        record: sc.record.clone(),
        vcpus: sc.vcpus,
        stage2: sc.stage2.clone(),
        guest_writes: sc.guest_writes,
        ..DestOptions::default()
    };
    let mut dest = Dest::spawn(dest_bin, &opts)?;
    let relay = Relay::start(
        &relay_sock,
        endpoint,
        stream.clone(),
        work.path().join("return-path.bin"),
        Instant::now() + sc.timeout,
    )?;

    if sc.postcopy {
        vm.set_capabilities(&[("postcopy-ram", true)])?;
    }
    if let Some(bw) = sc.max_bandwidth {
        vm.set_max_bandwidth(bw)?;
    }
    if let Some(bw) = sc.max_postcopy_bandwidth {
        vm.set_max_postcopy_bandwidth(bw)?;
    }
    let start = Instant::now();
    vm.migrate(&format!("unix:{}", relay_sock.display()))?;

    let mut postcopy_requested = !sc.postcopy;
    let mut saw_postcopy_active = false;
    let mut next_report = start;
    let source = loop {
        let info = vm.query_migrate()?;
        saw_postcopy_active |= info.status == "postcopy-active";
        if sc.progress && Instant::now() >= next_report {
            println!(
                "[{:5.1}s] source {:<16} transferred {:>10} B  remaining {:>10} B  requests {}",
                start.elapsed().as_secs_f64(),
                info.status,
                info.transferred,
                info.remaining,
                info.postcopy_requests
            );
            next_report += Duration::from_secs(1);
        }
        match info.status.as_str() {
            "completed" => break info,
            "failed" | "cancelled" => bail!(
                "source migration {}: {}; destination stderr: {}",
                info.status,
                info.error.as_deref().unwrap_or("(no error-desc)"),
                crate::process::tail(&dest.stderr(), 2000)
            ),
            _ => {}
        }
        if !postcopy_requested && start.elapsed() >= sc.precopy_for {
            vm.start_postcopy()?;
            postcopy_requested = true;
        }
        if let Some(status) = dest.try_status()? {
            if !status.success() {
                bail!(
                    "postcopy-dest exited early ({status}) while the source is `{}`: {}",
                    info.status,
                    crate::process::tail(&dest.stderr(), 2000)
                );
            }
        }
        if start.elapsed() > sc.timeout {
            bail!(
                "migration not completed after {:?}: source `{}` ({}); destination stderr: {}",
                sc.timeout,
                info.status,
                info.raw,
                crate::process::tail(&dest.stderr(), 2000)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };

    let outcome = dest.wait(Duration::from_secs(30))?;
    let summary = outcome.expect_success()?.clone();
    if sc.progress {
        println!("{}", outcome.stdout.lines().last().unwrap_or_default());
    }
    let (stream_bytes, return_path_bytes) = relay.finish(Duration::from_secs(10))?;

    let guest_status = vm.guest_status()?;
    let source_ram = vm.read_ram()?;
    let _ = vm.quit();

    let block = sc.machine.ram_block();
    let mut reference = qemu_load_blocks(&builder, &stream, Duration::from_secs(60))?;
    let Some(main) = reference.get(block) else { bail!("QEMU's load has no {block} block") };
    let reference_ram_sha256 = sha256_hex(main);
    let guest_written_pages = apply_guest_writes(&dump_dir, &mut reference)?;
    let mut ram_diff = None;
    let mut ram_bytes = 0;
    for (name, want) in &reference {
        let path = dump_dir.join(dump_file_name(name));
        let got = match std::fs::read(&path) {
            Ok(d) => d,
            Err(e) => bail!("postcopy-dest did not dump {name} to {}: {e}", path.display()),
        };
        ram_bytes += want.len();
        if ram_diff.is_none() {
            ram_diff = diff_pages(want, &got).map(|d| format!("{name}: {d}"));
        }
    }
    let mut got = std::fs::read(dump_dir.join(dump_file_name(block)))?;
    zero_holes(&mut got, sc.machine.ram_holes());
    Ok(Outcome {
        summary,
        source,
        saw_postcopy_active,
        guest: guest_status,
        ram_diff,
        blocks_compared: reference.len(),
        guest_written_pages,
        source_diff: diff_pages(&source_ram, &got),
        ram_bytes,
        reference_ram_sha256,
        stream_bytes,
        stream_sha256: sha256_hex(&std::fs::read(&stream)?),
        return_path_bytes,
        dest_stdout: outcome.stdout,
    })
}

/// Applies the destination's `guest-writes.txt` (`<block> <offset> <value>`, hex) to the
/// reference blocks; returns how many distinct pages the guest wrote.
fn apply_guest_writes(
    dump_dir: &Path,
    reference: &mut std::collections::BTreeMap<String, Vec<u8>>,
) -> Result<usize> {
    let Ok(text) = std::fs::read_to_string(dump_dir.join("guest-writes.txt")) else { return Ok(0) };
    let mut pages = std::collections::BTreeSet::new();
    for line in text.lines() {
        let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
        let (name, offset, value) = match line.split_whitespace().collect::<Vec<_>>()[..] {
            [n, o, v] => (n, hex(o), hex(v)),
            _ => bail!("guest-writes.txt: bad line {line:?}"),
        };
        let (Some(offset), Some(value)) = (offset, value) else {
            bail!("guest-writes.txt: bad line {line:?}")
        };
        let Some(block) = reference.get_mut(name) else { bail!("guest write to unknown block {name}") };
        let Some(word) = block.get_mut(offset as usize..offset as usize + 8) else {
            bail!("guest write outside {name}: {offset:#x}")
        };
        word.copy_from_slice(&value.to_le_bytes());
        pages.insert((name.to_string(), offset / 4096));
    }
    Ok(pages.len())
}

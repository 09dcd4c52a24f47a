//! Recording real QEMU 7.2 precopy streams.
//!
//! The source migrates (no `postcopy-ram`, so no return path) either to a unix socket that
//! a thread of this process accepts and copies to the output file until EOF (the default:
//! the file is complete when the thread sees EOF), or with `exec:cat > FILE`
//! ([`CaptureSpec::exec_cat`]). Both give the same bytes; every capture is checked with
//! [`check_precopy_stream`].

use std::io::{BufWriter, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::guest::{build_dirty_guest, GuestStatus};
use crate::oracle::qemu_load;
use crate::ram::sha256_hex;
use crate::source::{Machine, MigrationInfo, SourceVm};
use crate::{bail, Result};

/// What to record.
#[derive(Debug, Clone)]
pub struct CaptureSpec {
    /// Source machine type.
    pub machine: Machine,
    /// RAM in MiB.
    pub mem_mib: u64,
    /// Boot the dirty guest with this command line (`None`: no kernel).
    pub guest_append: Option<String>,
    /// Keep the default VGA device.
    pub vga: bool,
    /// `max-bandwidth` in bytes/s (`None`: QEMU's default, 32 MiB/s).
    pub max_bandwidth: Option<u64>,
    /// With a guest: let precopy run this long with the guest dirtying, then `stop` the
    /// guest so that precopy converges.
    pub dirty_for: Duration,
    /// Give up after this long.
    pub timeout: Duration,
    /// Migrate to `exec:cat > FILE` instead of the recording socket.
    pub exec_cat: bool,
}

impl CaptureSpec {
    /// A capture of `machine` with `mem_mib` MiB, no guest, default bandwidth.
    pub fn new(machine: Machine, mem_mib: u64) -> Self {
        CaptureSpec {
            machine,
            mem_mib,
            guest_append: None,
            vga: true,
            max_bandwidth: None,
            dirty_for: Duration::from_secs(2),
            timeout: Duration::from_secs(120),
            exec_cat: false,
        }
    }
}

/// A finished capture.
#[derive(Debug, Clone)]
pub struct Capture {
    /// The stream file.
    pub path: PathBuf,
    /// Its size.
    pub bytes: u64,
    /// SHA-256 of main RAM as QEMU's own destination loads the capture
    /// ([`crate::oracle::qemu_load`]: guest-physical `[0, mem)` read with `pmemsave`,
    /// holes zeroed; see [`Machine::ram_holes`]).
    pub ram_sha256: String,
    /// The same for the source's RAM after the migration completed (may differ: the TCG
    /// source can lose dirty bits).
    pub source_ram_sha256: String,
    /// The source's final `query-migrate`.
    pub info: MigrationInfo,
    /// QEMU's command line.
    pub command_line: Vec<String>,
    /// The dirty guest's status when the migration completed.
    pub guest: Option<GuestStatus>,
}

/// Accepts one connection on `listener` and copies it to `out` until EOF.
fn record(listener: UnixListener, out: PathBuf, deadline: Instant) -> JoinHandle<Result<u64>> {
    std::thread::spawn(move || {
        listener.set_nonblocking(true)?;
        let mut stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        bail!("no migration connection arrived");
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e.into()),
            }
        };
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(deadline.saturating_duration_since(Instant::now())))?;
        let mut file = BufWriter::new(std::fs::File::create(&out)?);
        let n = std::io::copy(&mut stream, &mut file)?;
        file.flush()?;
        Ok(n)
    })
}

/// Records a precopy migration of the source described by `spec` into `out`.
pub fn capture_precopy(spec: &CaptureSpec, out: &Path) -> Result<Capture> {
    let deadline = Instant::now() + spec.timeout;
    let mut builder = SourceVm::builder(spec.machine).mem_mib(spec.mem_mib);
    if !spec.vga {
        builder = builder.no_vga();
    }
    if let Some(append) = &spec.guest_append {
        let guest = build_dirty_guest()?;
        builder = builder.kernel(&guest, append);
    }
    let mut vm = builder.clone().spawn()?;
    if spec.guest_append.is_some() {
        vm.wait_guest_dirtying(spec.timeout)?;
    }
    if let Some(bw) = spec.max_bandwidth {
        vm.set_max_bandwidth(bw)?;
    }
    let out = std::path::absolute(out)?;
    let recorder = if spec.exec_cat {
        let path = out.display().to_string();
        if path.contains('\'') {
            bail!("exec:cat capture: the output path must not contain a quote");
        }
        vm.migrate(&format!("exec:cat > '{path}'"))?;
        None
    } else {
        let sock = vm.dir().join("capture.sock");
        let listener = UnixListener::bind(&sock)?;
        let recorder = record(listener, out.clone(), deadline);
        vm.migrate(&format!("unix:{}", sock.display()))?;
        Some(recorder)
    };
    if spec.guest_append.is_some() {
        std::thread::sleep(spec.dirty_for);
        vm.stop()?;
    }
    let remaining = deadline.saturating_duration_since(Instant::now());
    let info = vm.wait_status(&["completed"], remaining)?;
    let bytes = match recorder {
        Some(recorder) => {
            while !recorder.is_finished() {
                if Instant::now() > deadline {
                    bail!("the source completed but did not close the migration socket");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            match recorder.join() {
                Ok(r) => r?,
                Err(_) => bail!("the recorder thread panicked"),
            }
        }
        None => std::fs::metadata(&out)?.len(),
    };
    let guest = match spec.guest_append {
        Some(_) => Some(vm.guest_status()?),
        None => None,
    };
    let source_ram_sha256 = sha256_hex(&vm.read_ram()?);
    let command_line = vm.command_line().to_vec();
    vm.quit()?;
    check_precopy_stream(&std::fs::read(&out)?)?;
    let ram_sha256 = sha256_hex(&qemu_load(&builder, &out, spec.timeout)?);
    Ok(Capture { path: out, bytes, ram_sha256, source_ram_sha256, info, command_line, guest })
}

/// Checks that `stream` is a complete precopy stream: QEMU magic and version 3 at the
/// start, and at the end an EOF byte followed by a VMDESCRIPTION record whose length
/// matches the end of the data.
pub fn check_precopy_stream(stream: &[u8]) -> Result<()> {
    if stream.len() < 16 || stream[..8] != [0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3] {
        bail!("not a QEMU v3 migration stream");
    }
    // The JSON is short relative to the stream, but search only a bounded tail.
    let lo = stream.len().saturating_sub(4 << 20);
    for p in (lo..stream.len().saturating_sub(5)).rev() {
        if stream[p] == 0x06 && p > 0 && stream[p - 1] == 0x00 {
            let len = u32::from_be_bytes([stream[p + 1], stream[p + 2], stream[p + 3], stream[p + 4]]);
            if p + 5 + len as usize == stream.len() && stream[p + 5] == b'{' {
                return Ok(());
            }
        }
    }
    bail!("stream does not end with EOF + VMDESCRIPTION: truncated?")
}

/// A finished postcopy capture.
#[derive(Debug, Clone)]
pub struct PostcopyCapture {
    /// The source-to-destination stream.
    pub stream: PathBuf,
    /// The destination's return-path bytes (from QEMU's own destination).
    pub return_path: PathBuf,
    /// Stream bytes.
    pub stream_bytes: u64,
    /// Return-path bytes.
    pub return_path_bytes: u64,
    /// SHA-256 of main RAM as a fresh QEMU destination loads the stream, as in
    /// [`Capture::ram_sha256`] (and checked equal to the live QEMU destination's RAM when
    /// that one stayed paused).
    pub ram_sha256: String,
    /// The same for the source's RAM after completion (may differ, see [`Capture`]).
    pub source_ram_sha256: String,
    /// The source's final `query-migrate`.
    pub info: MigrationInfo,
    /// The source's QEMU command line (the destination adds `-incoming URI -S`).
    pub command_line: Vec<String>,
}

/// Records a real postcopy migration between two QEMUs through a [`crate::relay::Relay`]:
/// the source (with the dirty guest of `spec.guest_append`, or none) migrates with
/// `postcopy-ram`, `max-bandwidth` and `max-postcopy-bandwidth`, switches to postcopy
/// after `spec.dirty_for`; QEMU's destination (`-incoming`) answers. With `dest_paused`
/// it gets `-S` (the guest does not run there, so it requests no pages, and its RAM is
/// checked equal to the source's); otherwise the guest runs there and faults, so the
/// return path carries page requests. The stream goes to `out`, the return path to `out`
/// with extension `rp.bin`.
pub fn capture_postcopy(
    spec: &CaptureSpec,
    max_postcopy_bandwidth: Option<u64>,
    dest_paused: bool,
    out: &Path,
) -> Result<PostcopyCapture> {
    let deadline = Instant::now() + spec.timeout;
    let mut builder = SourceVm::builder(spec.machine).mem_mib(spec.mem_mib);
    if !spec.vga {
        builder = builder.no_vga();
    }
    if let Some(append) = &spec.guest_append {
        builder = builder.kernel(&build_dirty_guest()?, append);
    }
    let mut src = builder.clone().spawn()?;
    let incoming = src.dir().join("incoming.sock");
    let relay_sock = src.dir().join("relay.sock");
    let uri = format!("unix:{}", incoming.display());
    let mut dst = if dest_paused {
        builder.clone().incoming(&uri).spawn()?
    } else {
        builder.clone().incoming_running(&uri).spawn()?
    };
    if spec.guest_append.is_some() {
        src.wait_guest_dirtying(spec.timeout)?;
    }
    for vm in [&mut src, &mut dst] {
        vm.set_capabilities(&[("postcopy-ram", true)])?;
    }
    if let Some(bw) = spec.max_bandwidth {
        src.set_max_bandwidth(bw)?;
    }
    if let Some(bw) = max_postcopy_bandwidth {
        src.set_max_postcopy_bandwidth(bw)?;
    }
    let out = std::path::absolute(out)?;
    let rp = out.with_extension("rp.bin");
    let relay = crate::relay::Relay::start(
        &relay_sock,
        crate::relay::Endpoint::Unix(incoming.clone()),
        out.clone(),
        rp.clone(),
        deadline,
    )?;
    src.migrate(&format!("unix:{}", relay_sock.display()))?;
    std::thread::sleep(spec.dirty_for);
    src.start_postcopy()?;
    let mut saw_postcopy = false;
    let info = loop {
        let info = src.query_migrate()?;
        saw_postcopy |= info.status == "postcopy-active";
        match info.status.as_str() {
            "completed" => break info,
            "failed" | "cancelled" => bail!("source migration {}: {:?}", info.status, info.error),
            _ if Instant::now() > deadline => bail!("source still `{}`", info.status),
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    if !saw_postcopy {
        bail!("the source completed without entering postcopy: lower max-bandwidth");
    }
    dst.wait_status(&["completed"], deadline.saturating_duration_since(Instant::now()))?;
    let (stream_bytes, return_path_bytes) = relay.finish(Duration::from_secs(30))?;
    let want = src.read_ram()?;
    let loaded = qemu_load(&builder, &out, spec.timeout)?;
    if dest_paused {
        if let Some(diff) = crate::ram::diff_pages(&loaded, &dst.read_ram()?) {
            bail!("the live QEMU destination differs from QEMU's load of the recording: {diff}");
        }
    }
    let command_line = src.command_line().to_vec();
    src.quit()?;
    dst.quit()?;
    Ok(PostcopyCapture {
        stream: out,
        return_path: rp,
        stream_bytes,
        return_path_bytes,
        ram_sha256: sha256_hex(&loaded),
        source_ram_sha256: sha256_hex(&want),
        info,
        command_line,
    })
}

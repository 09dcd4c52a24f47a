//! Command-line front end of the harness, run by `cargo xtask capture|demo`.
//!
//! ```text
//! qemu-harness capture --machine pc --mem 320M --out FILE [--guest ARGS] [--fill]
//!                      [--no-vga] [--no-guest] [--exec-cat] [--max-bandwidth BYTES_PER_S]
//!                      [--dirty-for SECS] [--timeout SECS]
//!                      [--postcopy [--max-postcopy-bandwidth B] [--dest-paused]]  (via QEMU's own destination)
//! qemu-harness demo [--machine pc|q35] [--mem 64M] [--dest PATH]
//! qemu-harness migrate [--emulator qemu] [--source own|file:PATH] [--transport serial] [--mem-mib N]
//!                      [--dump-dir DIR]   (one postcopy migration into the hypervisor image)
//! qemu-harness soak [--runs 20] [--stage2 ept,npt] [--vcpus 4] [--mem 112M] [--max-bandwidth 12M]
//!                   [--precopy-for MS] [--guest-writes]   (the same migration many times)
//! qemu-harness load --machine pc --mem 32M [--no-vga] [--guest ARGS] --stream FILE
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use qemu_tests::capture::{capture_postcopy, capture_precopy, check_precopy_stream, CaptureSpec};
use qemu_tests::source::{Machine, SourceVm};
use qemu_tests::{bail, Result};

mod demo;
mod demo_image;
mod migrate;
mod soak;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("capture") => capture(&args[1..]),
        Some("demo") => demo::run(&args[1..]),
        Some("soak") => soak::run(&args[1..]),
        Some("migrate") => migrate::run(&args[1..]),
        Some("load") => load(&args[1..]),
        _ => Err(qemu_tests::Error(
            "usage: qemu-harness capture --machine pc --mem 320M --out FILE [--guest ARGS] [--fill] \
             [--no-vga] [--no-guest] [--exec-cat] [--max-bandwidth B] [--dirty-for S] [--timeout S] \
             [--postcopy [--max-postcopy-bandwidth B] [--dest-paused]] \
             | demo [--machine pc|q35] [--mem 64M] [--dest PATH] [--precopy] [--touch T] [--record F] \
             | soak [--runs 20] [--stage2 ept,npt] [--vcpus 4] [--mem 112M] [--max-bandwidth 12M] \
             [--precopy-for MS] [--guest-writes] \
             | migrate [--emulator qemu] [--source own|file:PATH] [--transport serial] [--mem-mib N] [--dump-dir DIR] \
             | load --machine pc --mem 32M [--no-vga] [--guest ARGS] --stream FILE"
                .into(),
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Parses `--flag value` pairs and bare `--flag`s.
pub(crate) struct Flags(Vec<String>);

impl Flags {
    pub(crate) fn new(args: &[String], known: &[&str], switches: &[&str]) -> Result<Self> {
        let mut i = 0;
        while i < args.len() {
            let a = args[i].as_str();
            if switches.contains(&a) {
                i += 1;
            } else if known.contains(&a) && i + 1 < args.len() {
                i += 2;
            } else {
                bail!("unexpected argument {a:?}");
            }
        }
        Ok(Flags(args.to_vec()))
    }

    pub(crate) fn get(&self, flag: &str) -> Option<&str> {
        let i = self.0.iter().position(|a| a == flag)?;
        self.0.get(i + 1).map(String::as_str)
    }

    pub(crate) fn has(&self, flag: &str) -> bool {
        self.0.iter().any(|a| a == flag)
    }
}

/// `320M`, `1G`, `64` (MiB) to MiB.
pub(crate) fn parse_mib(s: &str) -> Result<u64> {
    let (num, mult) = match s.strip_suffix(['G', 'g']) {
        Some(n) => (n, 1024),
        None => (s.trim_end_matches(['M', 'm']), 1),
    };
    match num.parse::<u64>() {
        Ok(n) if n > 0 => Ok(n * mult),
        _ => bail!("bad memory size {s:?}"),
    }
}

fn capture(args: &[String]) -> Result<()> {
    let flags = Flags::new(
        args,
        &[
            "--machine",
            "--mem",
            "--out",
            "--guest",
            "--max-bandwidth",
            "--max-postcopy-bandwidth",
            "--dirty-for",
            "--timeout",
        ],
        &["--fill", "--no-vga", "--no-guest", "--exec-cat", "--postcopy", "--dest-paused"],
    )?;
    let machine = Machine::parse(flags.get("--machine").unwrap_or("pc"))?;
    let mem = parse_mib(flags.get("--mem").unwrap_or("320M"))?;
    let Some(out) = flags.get("--out").map(PathBuf::from) else {
        bail!("capture needs --out FILE");
    };
    let mut spec = CaptureSpec::new(machine, mem);
    spec.vga = !flags.has("--no-vga");
    spec.exec_cat = flags.has("--exec-cat");
    if machine != Machine::None && !flags.has("--no-guest") {
        let mut append = flags.get("--guest").unwrap_or("rate=2048").to_string();
        if flags.has("--fill") {
            append.push_str(" fill");
        }
        spec.guest_append = Some(append);
    }
    if let Some(bw) = flags.get("--max-bandwidth") {
        spec.max_bandwidth =
            Some(bw.parse().map_err(|_| qemu_tests::Error(format!("bad --max-bandwidth {bw}")))?);
    }
    if let Some(s) = flags.get("--dirty-for") {
        let secs: f64 = s.parse().map_err(|_| qemu_tests::Error(format!("bad --dirty-for {s}")))?;
        spec.dirty_for = Duration::from_secs_f64(secs);
    }
    if let Some(s) = flags.get("--timeout") {
        let secs: u64 = s.parse().map_err(|_| qemu_tests::Error(format!("bad --timeout {s}")))?;
        spec.timeout = Duration::from_secs(secs);
    }
    if flags.has("--postcopy") {
        let pbw = match flags.get("--max-postcopy-bandwidth") {
            Some(b) => Some(b.parse().map_err(|_| qemu_tests::Error(format!("bad bandwidth {b}")))?),
            None => None,
        };
        let cap = capture_postcopy(&spec, pbw, flags.has("--dest-paused"), &out)?;
        std::fs::write(out.with_extension("ram.sha256"), format!("{}\n", cap.ram_sha256))?;
        println!("stream:       {} ({} bytes)", cap.stream.display(), cap.stream_bytes);
        println!("return path:  {} ({} bytes)", cap.return_path.display(), cap.return_path_bytes);
        println!("ram sha256:   {} (QEMU's load of the stream)", cap.ram_sha256);
        println!("source ram:   {}", cap.source_ram_sha256);
        println!("command line: {}", cap.command_line.join(" "));
        println!(
            "source:       status {} transferred {} normal pages {} zero pages {} requests {} syncs {}",
            cap.info.status,
            cap.info.transferred,
            cap.info.normal_pages,
            cap.info.zero_pages,
            cap.info.postcopy_requests,
            cap.info.dirty_sync_count
        );
        return Ok(());
    }
    let cap = capture_precopy(&spec, &out)?;
    check_precopy_stream(&std::fs::read(&cap.path)?)?;
    let hash_file = cap.path.with_extension("ram.sha256");
    std::fs::write(&hash_file, format!("{}\n", cap.ram_sha256))?;
    println!("capture:      {}", cap.path.display());
    println!("ram hash in:  {}", hash_file.display());
    println!("bytes:        {}", cap.bytes);
    println!("ram sha256:   {} (QEMU's load of the stream)", cap.ram_sha256);
    println!("source ram:   {}", cap.source_ram_sha256);
    println!("command line: {}", cap.command_line.join(" "));
    println!(
        "source:       status {} transferred {} normal pages {} zero pages {} syncs {}",
        cap.info.status,
        cap.info.transferred,
        cap.info.normal_pages,
        cap.info.zero_pages,
        cap.info.dirty_sync_count
    );
    if let Some(g) = cap.guest {
        println!("guest:        {g:?}");
    }
    Ok(())
}

/// `load --machine pc --mem 32M [--no-vga] [--guest ARGS] --stream FILE`: loads a recorded
/// stream into QEMU's own destination and prints the SHA-256 of its main RAM (holes
/// zeroed), the reference value for a capture.
fn load(args: &[String]) -> Result<()> {
    let flags = Flags::new(args, &["--machine", "--mem", "--guest", "--stream"], &["--no-vga"])?;
    let machine = Machine::parse(flags.get("--machine").unwrap_or("pc"))?;
    let Some(stream) = flags.get("--stream") else {
        bail!("load needs --stream FILE");
    };
    let mut builder = SourceVm::builder(machine).mem_mib(parse_mib(flags.get("--mem").unwrap_or("32M"))?);
    if flags.has("--no-vga") {
        builder = builder.no_vga();
    }
    if let Some(g) = flags.get("--guest") {
        builder = builder.kernel(&qemu_tests::guest::build_dirty_guest()?, g);
    }
    let ram =
        qemu_tests::oracle::qemu_load(&builder, std::path::Path::new(stream), Duration::from_secs(120))?;
    println!("{}  {stream}", qemu_tests::ram::sha256_hex(&ram));
    Ok(())
}

//! `postcopy-source`: the project's own postcopy migration source for the pattern guest.
//!
//! ```text
//! postcopy-source (--connect unix:PATH | --listen unix:PATH) [--mem-mib N] [--guest FILE]
//!                 [--background-pause-ms N] [--timeout-s N] [--record FILE]
//! ```
//!
//! It sends guest RAM (page tables, the guest image, the data pages) in QEMU 7.2's wire
//! format, discards the dirty data pages, starts the guest with its vCPU record inside
//! PACKAGED, and serves page requests from the return path (the same connection) while it
//! sends the discarded pages in the background. `--connect` retries for up to 10 s while
//! the socket is missing or not yet listening. `--mem-mib` is the guest RAM (default 2, a
//! multiple of 2 up to 1024); `--guest` a flat pattern-guest image (default: build it);
//! `--background-pause-ms` the pause between background pages; `--timeout-s` the limit of
//! the whole migration (default 120); `--record` saves every stream byte sent. The last
//! stdout line is a JSON report; the exit status is 0 only if the destination sent SHUT(0).

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qemu_tests::own_source::{OwnSource, RunOptions, DEFAULT_MEM_BYTES};
use qemu_tests::pattern_guest::build_pattern_guest;

const USAGE: &str = "usage: postcopy-source (--connect unix:PATH | --listen unix:PATH) [--mem-mib N] \
[--guest FILE] [--background-pause-ms N] [--timeout-s N] [--record FILE]";

#[derive(Debug)]
enum Endpoint {
    Connect(PathBuf),
    Listen(PathBuf),
}

#[derive(Debug)]
struct Args {
    endpoint: Endpoint,
    mem_bytes: u64,
    guest: Option<PathBuf>,
    opts: RunOptions,
}

fn unix_path(flag: &str, v: &str) -> Result<PathBuf, String> {
    v.strip_prefix("unix:").map(PathBuf::from).ok_or(format!("{flag} {v}: expected unix:PATH"))
}

fn number(flag: &str, v: &str) -> Result<u64, String> {
    v.parse().map_err(|_| format!("{flag} {v}: expected a number"))
}

fn parse_args() -> Result<Args, String> {
    let mut endpoint = None;
    let mut args = Args {
        endpoint: Endpoint::Connect(PathBuf::new()),
        mem_bytes: DEFAULT_MEM_BYTES,
        guest: None,
        opts: RunOptions::default(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--connect" => endpoint = Some(Endpoint::Connect(unix_path(&flag, &value()?)?)),
            "--listen" => endpoint = Some(Endpoint::Listen(unix_path(&flag, &value()?)?)),
            "--mem-mib" => args.mem_bytes = number(&flag, &value()?)?.saturating_mul(1 << 20),
            "--guest" => args.guest = Some(value()?.into()),
            "--background-pause-ms" => {
                args.opts.background_pause = Duration::from_millis(number(&flag, &value()?)?)
            }
            "--timeout-s" => args.opts.timeout = Duration::from_secs(number(&flag, &value()?)?),
            "--record" => args.opts.record = Some(value()?.into()),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    args.endpoint = endpoint.ok_or(format!("one of --connect or --listen is required\n{USAGE}"))?;
    Ok(args)
}

/// How long `--connect` retries while the socket does not exist or does not listen yet.
const CONNECT_WAIT: Duration = Duration::from_secs(10);

fn connect(path: &Path) -> Result<UnixStream, String> {
    let deadline = Instant::now() + CONNECT_WAIT;
    loop {
        match UnixStream::connect(path) {
            Ok(conn) => return Ok(conn),
            Err(e)
                if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused)
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => return Err(format!("connect {}: {e}", path.display())),
        }
    }
}

fn run(args: &Args) -> Result<qemu_tests::own_source::SourceReport, String> {
    let guest = match &args.guest {
        Some(p) => p.clone(),
        None => build_pattern_guest().map_err(|e| format!("building the pattern guest: {e}"))?,
    };
    let image = std::fs::read(&guest).map_err(|e| format!("read {}: {e}", guest.display()))?;
    let source = OwnSource::new(args.mem_bytes, image).map_err(|e| e.to_string())?;
    let mut conn = match &args.endpoint {
        Endpoint::Connect(path) => connect(path)?,
        Endpoint::Listen(path) => {
            let _ = std::fs::remove_file(path);
            let listener = UnixListener::bind(path).map_err(|e| format!("bind {}: {e}", path.display()))?;
            let (stream, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
            stream
        }
    };
    source.run(&mut conn, &args.opts).map_err(|e| e.to_string())
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("postcopy-source: {e}");
            std::process::exit(2);
        }
    };
    match run(&args) {
        Ok(report) => {
            println!("{}", report.to_json());
            match report.shut {
                Some(0) => {}
                Some(status) => {
                    eprintln!("postcopy-source: the destination failed (SHUT({status}))");
                    std::process::exit(1);
                }
                None => {
                    eprintln!("postcopy-source: no SHUT from the destination");
                    std::process::exit(1);
                }
            }
        }
        Err(e) => {
            eprintln!("postcopy-source: {e}");
            std::process::exit(1);
        }
    }
}

//! `postcopy-dest`: the agent as a hosted postcopy migration destination.
//!
//! ```text
//! postcopy-dest (--listen unix:PATH | --listen tcp:HOST:PORT | --input FILE)
//!               [--dump-dir DIR] [--touch random|seq] [--vcpus N] [--stage2 ept|npt]
//!               [--record FILE] [--dialect qemu72|v5] [--machine NAME] [--seed N]
//!               [--guest-writes] [--recover-timeout SECS]
//! ```
//!
//! Postcopy recovery: when the connection breaks after RUN, the migration pauses (the pages
//! that arrived stay, vCPUs that need a missing page wait), `postcopy-dest` prints on stderr
//! that it is paused, at which stream offset and with how many pages missing, and listens
//! again on the same `--listen` address. The source resumes with QMP `migrate uri=...
//! resume=true`. It gives up after `--recover-timeout SECS` (default: it waits) with a one-line
//! error. A break before RUN ends the migration as a failure, as a replayed file's end does.
//!
//! It accepts one connection from a QEMU source (the return path is the same connection) or
//! replays a recorded stream, runs the agent's engine over host memory behind a real EPT (or
//! NPT) table built by `hal::stage2`, and after RUN lets simulated vCPUs read (and with
//! `--guest-writes` write) guest memory: each access walks the table to the frame it maps,
//! and a missing entry is an exit into the agent, so page requests really happen. At the end
//! every value a vCPU read must be what its page holds, and every guest write must still be
//! there (no late page overwrote it). The
//! last stdout line is a JSON summary; the exit status is 0 only for a completed migration.

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use agent::postcopy::{Engine, EngineConfig, Shared, Stats};
use agent::wire::command::Dialect;

use hal::stage2::{Ept, Format, Npt};
use qemu_tests::hosted::ports::{GuestRam, HostPorts, SharedTable, SocketReturnPath, Wakeups};
use qemu_tests::hosted::vcpu::{self, Behaviour, Touch, VcpuReport};

/// Guest RAM the page bitmaps cover.
const MAX_GUEST_RAM: u64 = 64 << 30;

#[derive(Debug)]
enum Source {
    Unix(PathBuf),
    Tcp(String),
    File(PathBuf),
}

#[derive(Debug)]
struct Args {
    source: Source,
    dump_dir: Option<PathBuf>,
    record: Option<PathBuf>,
    touch: Touch,
    vcpus: usize,
    dialect: Dialect,
    machine: Option<String>,
    seed: u64,
    npt: bool,
    guest_writes: bool,
    /// How long to wait for the source to come back after a break; `None`: for ever.
    recover_timeout: Option<std::time::Duration>,
}

fn parse_args() -> Result<Args, String> {
    let mut source = None;
    let mut args = Args {
        source: Source::File(PathBuf::new()),
        dump_dir: None,
        record: None,
        touch: Touch::Random,
        vcpus: 1,
        dialect: Dialect::Qemu72,
        machine: None,
        seed: 1,
        npt: false,
        guest_writes: false,
        recover_timeout: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => {
                let v = value()?;
                source = Some(if let Some(p) = v.strip_prefix("unix:") {
                    Source::Unix(p.into())
                } else if let Some(a) = v.strip_prefix("tcp:") {
                    Source::Tcp(a.to_string())
                } else {
                    return Err(format!("--listen {v}: expected unix:PATH or tcp:HOST:PORT"));
                });
            }
            "--input" => source = Some(Source::File(value()?.into())),
            "--dump-dir" => args.dump_dir = Some(value()?.into()),
            "--record" => args.record = Some(value()?.into()),
            "--touch" => {
                args.touch = match value()?.as_str() {
                    "random" => Touch::Random,
                    "seq" => Touch::Seq,
                    other => return Err(format!("--touch {other}: expected random or seq")),
                }
            }
            "--vcpus" => {
                args.vcpus =
                    value()?.parse().ok().filter(|&n| (1..=64).contains(&n)).ok_or("--vcpus: 1..=64")?
            }
            "--dialect" => {
                args.dialect = match value()?.as_str() {
                    "qemu72" => Dialect::Qemu72,
                    "v5" => Dialect::SeedV5,
                    other => return Err(format!("--dialect {other}: expected qemu72 or v5")),
                }
            }
            "--machine" => args.machine = Some(value()?),
            "--stage2" => {
                args.npt = match value()?.as_str() {
                    "ept" => false,
                    "npt" => true,
                    other => return Err(format!("--stage2 {other}: expected ept or npt")),
                }
            }
            "--seed" => args.seed = value()?.parse().map_err(|_| "--seed: a number")?,
            "--guest-writes" => args.guest_writes = true,
            "--recover-timeout" => {
                let secs: f64 = value()?.parse().map_err(|_| "--recover-timeout: seconds")?;
                args.recover_timeout = Some(std::time::Duration::from_secs_f64(secs.max(0.0)));
            }
            "-h" | "--help" => {
                println!("{}", USAGE);
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    args.source = source.ok_or(format!("one of --listen or --input is required\n{USAGE}"))?;
    Ok(args)
}

const USAGE: &str = "usage: postcopy-dest (--listen unix:PATH | --listen tcp:HOST:PORT | --input FILE) \
[--dump-dir DIR] [--touch random|seq] [--vcpus N] [--stage2 ept|npt] [--record FILE] [--dialect qemu72|v5] \
[--machine NAME] [--seed N] [--guest-writes] [--recover-timeout SECS]";

/// The byte source and, for a connection, its write half for the return path.
type Connection = (Box<dyn Read + Send>, Option<Box<dyn Write + Send>>);

/// Where connections come from: a listening socket (kept for the reconnections of a
/// postcopy recovery) or a replayed file.
enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
    File(PathBuf),
}

impl Listener {
    fn bind(source: &Source) -> Result<Self, String> {
        Ok(match source {
            Source::Unix(path) => {
                // Bound (and listening) under a temporary name, then renamed: the socket
                // appears at PATH only once a connect there succeeds, so a caller may wait
                // for the file.
                let _ = std::fs::remove_file(path);
                let mut tmp = path.as_os_str().to_owned();
                tmp.push(format!(".{}", std::process::id()));
                let _ = std::fs::remove_file(&tmp);
                let listener =
                    UnixListener::bind(&tmp).map_err(|e| format!("bind {}: {e}", path.display()))?;
                std::fs::rename(&tmp, path).map_err(|e| format!("rename to {}: {e}", path.display()))?;
                Listener::Unix(listener)
            }
            Source::Tcp(addr) => {
                Listener::Tcp(TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?)
            }
            Source::File(path) => Listener::File(path.clone()),
        })
    }

    /// The next connection; `Ok(None)` when none came before `deadline`.
    fn accept(&self, deadline: Option<Instant>) -> Result<Option<Connection>, String> {
        let wait = |nonblocking: &dyn Fn(bool) -> std::io::Result<()>| {
            nonblocking(deadline.is_some()).map_err(|e| format!("listen: {e}"))
        };
        loop {
            let accepted = match self {
                Listener::Unix(l) => {
                    wait(&|b| l.set_nonblocking(b))?;
                    l.accept().and_then(|(s, _)| {
                        s.set_nonblocking(false)?;
                        let rp = s.try_clone()?;
                        Ok((Box::new(s) as Box<dyn Read + Send>, Some(Box::new(rp) as Box<dyn Write + Send>)))
                    })
                }
                Listener::Tcp(l) => {
                    wait(&|b| l.set_nonblocking(b))?;
                    l.accept().and_then(|(s, _)| {
                        s.set_nonblocking(false)?;
                        s.set_nodelay(true)?;
                        let rp = s.try_clone()?;
                        Ok((Box::new(s) as Box<dyn Read + Send>, Some(Box::new(rp) as Box<dyn Write + Send>)))
                    })
                }
                Listener::File(path) => {
                    // Read straight into the ring: one copy, like the transport's receive
                    // buffers.
                    let file = File::open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
                    return Ok(Some((Box::new(file), None)));
                }
            };
            match accepted {
                Ok(c) => return Ok(Some(c)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Ok(None);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => return Err(format!("accept: {e}")),
            }
        }
    }

    /// Whether a broken connection can be followed by another (not a replayed file).
    fn can_reconnect(&self) -> bool {
        !matches!(self, Listener::File(_))
    }
}

/// A break the migration recovered from.
struct Recovered {
    brk: agent::postcopy::Break,
    paused_seconds: f64,
}

struct Outcome {
    /// From the connection (or the opened file) to the completed migration.
    seconds: f64,
    stats: Stats,
    state: &'static str,
    faults: u64,
    requests: u64,
    unsent_requests: u64,
    resent_requests: u64,
    invalidations: u64,
    vcpus: Vec<VcpuReport>,
    breaks: Vec<Recovered>,
}

fn run(args: &Args) -> Result<Outcome, String> {
    if args.npt {
        run_on::<Npt>(args)
    } else {
        run_on::<Ept>(args)
    }
}

fn run_on<F: Format>(args: &Args) -> Result<Outcome, String> {
    let listener = Listener::bind(&args.source)?;
    let (input, rp) = listener.accept(None)?.ok_or("no connection")?;
    let started = Instant::now();
    let received = page_bitmap(MAX_GUEST_RAM);
    let requested = page_bitmap(MAX_GUEST_RAM);
    let shared = Shared::new(&received, &requested, SocketReturnPath(None));
    let table = SharedTable::<F>::default();
    let wakeups = Wakeups::new(args.vcpus);
    let config = EngineConfig { dialect: args.dialect, machine: args.machine.as_deref().map(str::as_bytes) };
    let mut engine = Engine::new(&shared, HostPorts::new(&table, &wakeups), config);
    let stop = AtomicBool::new(false);

    let (result, vcpus) = std::thread::scope(|s| {
        let handles: Vec<_> = (0..args.vcpus)
            .map(|i| {
                let (shared, table, wakeups, stop) = (&shared, &table, &wakeups, &stop);
                let seed = args.seed.wrapping_add(i as u64 * 0x9e37_79b9);
                let behaviour = Behaviour { touch: args.touch, seed, writes: args.guest_writes };
                s.spawn(move || vcpu::run(i, shared, table, wakeups, behaviour, stop))
            })
            .collect();
        let describe = |e: agent::Error| describe(e, &shared);
        let result = receive_all(&mut engine, &shared, &listener, (input, rp), args, &describe);
        stop.store(true, Ordering::Release);
        let vcpus: Result<Vec<_>, String> = handles
            .into_iter()
            .map(|h| h.join().map_err(|_| "a vCPU thread panicked".to_string())?)
            .collect();
        (result, vcpus)
    });
    let breaks = result?;
    let seconds = started.elapsed().as_secs_f64();
    let vcpus = vcpus?;
    // Every vCPU has stopped: guest memory is still. (Without a block list no vCPU ran.)
    if let Some(layout) = shared.layout() {
        check_guest_view(layout, &engine.ports().blocks, &vcpus)?;
    }
    if let Some(dir) = &args.dump_dir {
        let ports = engine.ports();
        dump(dir, &ports.blocks, &ports.device_state)?;
        if let (true, Some(layout)) = (args.guest_writes, shared.layout()) {
            dump_guest_writes(dir, layout, &vcpus)?;
        }
    }
    Ok(Outcome {
        seconds,
        stats: engine.stats(),
        state: shared.state.get().name(),
        faults: shared.counters.faults.load(Ordering::Relaxed),
        requests: shared.counters.requests.load(Ordering::Relaxed),
        unsent_requests: shared.counters.unsent_requests.load(Ordering::Relaxed),
        resent_requests: shared.counters.resent_requests.load(Ordering::Relaxed),
        invalidations: table.invalidations(),
        vcpus,
        breaks,
    })
}

/// `--record FILE` for connection `n`: FILE for the first, FILE.resumeN after the N-th break.
fn record_file(args: &Args, n: usize) -> Result<Option<File>, String> {
    let Some(p) = &args.record else { return Ok(None) };
    let path = if n == 0 { p.clone() } else { PathBuf::from(format!("{}.resume{n}", p.display())) };
    File::create(&path).map(Some).map_err(|e| format!("create {}: {e}", path.display()))
}

/// Feeds the engine from connection after connection until the migration completes: a break
/// after RUN pauses it and the next connection resumes it (postcopy recovery).
fn receive_all<F: Format>(
    engine: &mut Engine<'_, '_, '_, SocketReturnPath<Box<dyn Write + Send>>, HostPorts<'_, F>>,
    shared: &Shared<'_, SocketReturnPath<Box<dyn Write + Send>>>,
    listener: &Listener,
    first: Connection,
    args: &Args,
    describe: &dyn Fn(agent::Error) -> String,
) -> Result<Vec<Recovered>, String> {
    let mut breaks = Vec::new();
    let (mut input, rp) = first;
    shared.reconnect(SocketReturnPath(rp));
    loop {
        let cut = match receive(engine, input, record_file(args, breaks.len())?, describe)? {
            Ended::Complete => return Ok(breaks),
            Ended::Cut(why) => why,
        };
        if !listener.can_reconnect() {
            return engine.end_of_input().map(|_| breaks).map_err(describe);
        }
        let brk = engine.connection_lost().map_err(describe)?;
        let paused = Instant::now();
        let until = match args.recover_timeout {
            Some(t) => format!("for {:.0} s (--recover-timeout)", t.as_secs_f64()),
            None => "until it does (no --recover-timeout)".into(),
        };
        eprintln!(
            "postcopy-dest: connection lost after RUN ({cut}): PAUSED at stream offset {} with {} pages missing; \
             listening again for the source's resume (QMP: migrate uri=... resume=true) {until}",
            brk.offset, brk.missing_pages
        );
        let Some((next, rp)) = listener.accept(args.recover_timeout.map(|t| paused + t))? else {
            let missing = brk.missing_pages;
            return Err(format!(
                "the source did not come back within {:.0} s of the break: the migration is PAUSED with {missing} pages missing",
                args.recover_timeout.unwrap_or_default().as_secs_f64()
            ));
        };
        eprintln!(
            "postcopy-dest: the source reconnected after {:.3} s: resuming",
            paused.elapsed().as_secs_f64()
        );
        shared.reconnect(SocketReturnPath(rp));
        engine.reconnected();
        breaks.push(Recovered { brk, paused_seconds: paused.elapsed().as_secs_f64() });
        input = next;
    }
}

/// How one connection's input ended.
enum Ended {
    /// The migration completed.
    Complete,
    /// The connection ended (end of file or a read error) before that.
    Cut(String),
}

/// The one-line error for a stream error, with the block's name where it names a block.
fn describe<R: agent::ports::ReturnPath>(e: agent::Error, shared: &Shared<'_, R>) -> String {
    match (e.defect, shared.layout()) {
        (agent::Defect::PagesMissing { block, .. }, Some(layout)) => {
            let name = layout.blocks().get(block).map(|b| String::from_utf8_lossy(&b.name).into_owned());
            format!("{e} ({})", name.unwrap_or_default())
        }
        _ => e.to_string(),
    }
}

/// The 8-byte word of guest RAM at `gpa`, as the blocks hold it now.
fn word_at(layout: &agent::layout::Layout, blocks: &[GuestRam], gpa: u64) -> Option<u64> {
    let (block, offset) = layout.gpa_to_block(gpa)?;
    let bytes = blocks.get(block)?.bytes().get(offset as usize..offset as usize + 8)?;
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

/// Every value a vCPU read is what its page holds at the end (a page is placed once and
/// mapped only when complete, and reads never touch the words the guest writes), and every
/// guest write is still there (no late arrival overwrote it).
fn check_guest_view(
    layout: &agent::layout::Layout,
    blocks: &[GuestRam],
    vcpus: &[VcpuReport],
) -> Result<(), String> {
    for (v, report) in vcpus.iter().enumerate() {
        for (kind, accesses) in [("read", &report.reads), ("wrote", &report.writes)] {
            for &(gpa, value) in accesses {
                let now = word_at(layout, blocks, gpa);
                if now != Some(value) {
                    return Err(format!(
                        "vCPU {v} {kind} {value:#x} at {gpa:#x}, but guest RAM holds {now:x?} there at the end"
                    ));
                }
            }
        }
    }
    Ok(())
}

/// `DIR/guest-writes.txt`: one line per guest write, `<block> <offset> <value>` (hex), for
/// comparing the rest of guest RAM with a reference.
fn dump_guest_writes(
    dir: &std::path::Path,
    layout: &agent::layout::Layout,
    vcpus: &[VcpuReport],
) -> Result<(), String> {
    let mut lines = String::new();
    for &(gpa, value) in vcpus.iter().flat_map(|r| &r.writes) {
        let (block, offset) =
            layout.gpa_to_block(gpa).ok_or(format!("guest write outside RAM at {gpa:#x}"))?;
        let name = String::from_utf8_lossy(&layout.blocks()[block].name).into_owned();
        lines += &format!("{name} {offset:#x} {value:#x}\n");
    }
    let path = dir.join("guest-writes.txt");
    std::fs::write(&path, lines).map_err(|e| format!("write {}: {e}", path.display()))
}

/// One bit per 4 KiB page of `bytes` of guest RAM.
fn page_bitmap(bytes: u64) -> Vec<AtomicU64> {
    (0..bytes / (64 * 4096)).map(|_| AtomicU64::new(0)).collect()
}

/// Reads the stream on a thread of its own (the transport's receive side, which in the
/// hypervisor is the device filling the vsock RX buffers in parallel with the CPU) and feeds
/// the engine until the migration completes. Buffers are recycled; each carries whatever one
/// `read` returned, so a page request's answer is decoded as soon as it arrives.
fn receive<R: agent::ports::ReturnPath, F: Format>(
    engine: &mut Engine<'_, '_, '_, R, HostPorts<'_, F>>,
    input: Box<dyn Read + Send>,
    record: Option<File>,
    describe: &dyn Fn(agent::Error) -> String,
) -> Result<Ended, String> {
    let (full, recycled) = spawn_reader(input, record);
    // The unconsumed end of the previous buffer: at most a record header (payload bytes are
    // always consumed as they come).
    let mut carry: Vec<u8> = Vec::new();
    for chunk in full.iter() {
        let chunk = match chunk {
            Ok(c) => c,
            // The stream is cut: the caller pauses the migration or ends it.
            Err(e) => return Ok(Ended::Cut(e)),
        };
        if chunk.is_empty() {
            break;
        }
        let mut at = 0;
        while at < chunk.len() {
            let p = if carry.is_empty() {
                engine.receive(&chunk[at..], &[])
            } else {
                engine.receive(&carry, &chunk[at..])
            }
            .map_err(describe)?;
            if p.finished {
                return Ok(Ended::Complete);
            }
            let from_carry = p.consumed.min(carry.len());
            carry.drain(..from_carry);
            at += p.consumed - from_carry;
            if p.consumed == 0 {
                carry.extend_from_slice(&chunk[at..]);
                break;
            }
        }
        // The reader may already be gone (end of input): then the buffer is just dropped.
        let _ = recycled.send(chunk);
    }
    loop {
        let p = engine.receive(&carry, &[]).map_err(describe)?;
        if p.finished {
            return Ok(Ended::Complete);
        }
        if p.consumed == 0 {
            // The end of input with a record cut (or none): the caller decides.
            return Ok(Ended::Cut("end of file".into()));
        }
        carry.drain(..p.consumed);
    }
}

/// Bytes one `read` may return; buffers in flight between the reader and the engine.
const CHUNK: usize = 256 << 10;
const BUFFERS: usize = 8;

type Chunk = Result<Vec<u8>, String>;

/// The reader thread: `read`s into recycled buffers, writes them to `--record`, and sends
/// them on; an empty buffer marks the end of input. It is detached: if the migration ends
/// while it blocks in `read`, the process exit ends it.
fn spawn_reader(
    mut input: Box<dyn Read + Send>,
    mut record: Option<File>,
) -> (std::sync::mpsc::Receiver<Chunk>, std::sync::mpsc::SyncSender<Vec<u8>>) {
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<Chunk>(BUFFERS);
    let (empty_tx, empty_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(BUFFERS);
    std::thread::spawn(move || {
        let mut allocated = 0;
        loop {
            let mut buf = match empty_rx.try_recv() {
                Ok(b) => b,
                Err(_) if allocated < BUFFERS => {
                    allocated += 1;
                    Vec::with_capacity(CHUNK)
                }
                Err(_) => match empty_rx.recv() {
                    Ok(b) => b,
                    Err(_) => return,
                },
            };
            buf.resize(CHUNK, 0);
            let read = loop {
                match input.read(&mut buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    other => break other,
                }
            };
            let sent = match read {
                Ok(n) => {
                    buf.truncate(n);
                    let recorded = match record.as_mut() {
                        Some(f) => f.write_all(&buf).map_err(|e| format!("--record: {e}")),
                        None => Ok(()),
                    };
                    let go_on = n > 0 && recorded.is_ok();
                    full_tx.send(recorded.map(|()| buf)).is_ok() && go_on
                }
                Err(e) => {
                    let _ = full_tx.send(Err(format!("reading the stream: {e}")));
                    false
                }
            };
            if !sent {
                return;
            }
        }
    });
    (full_rx, empty_tx)
}

fn dump(dir: &PathBuf, blocks: &[GuestRam], device_state: &[u8]) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    for block in blocks {
        let file = String::from_utf8_lossy(&block.name).replace('/', "_") + ".bin";
        let path = dir.join(file);
        std::fs::write(&path, block.bytes()).map_err(|e| format!("write {}: {e}", path.display()))?;
    }
    let path = dir.join("device-state.bin");
    std::fs::write(&path, device_state).map_err(|e| format!("write {}: {e}", path.display()))
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("postcopy-dest: {e}");
            std::process::exit(2);
        }
    };
    match run(&args) {
        Ok(o) => {
            let s = o.stats;
            let waits: u64 = o.vcpus.iter().map(|v| v.waits).sum();
            let summary = serde_json::json!({
                "state": o.state,
                "pages_received": s.pages + s.zero_pages,
                "zero_pages": s.zero_pages,
                "discarded_pages": s.discarded_pages,
                "duplicate_pages": s.duplicate_pages,
                "page_requests": o.requests,
                "unsent_requests": o.unsent_requests,
                "resent_requests": o.resent_requests,
                "breaks": o.breaks.iter().map(|b| serde_json::json!({
                    "offset": b.brk.offset,
                    "open_ram_section": b.brk.open_ram_section,
                    "eos_read": b.brk.eos_read,
                    "missing_pages": b.brk.missing_pages,
                    "paused_seconds": b.paused_seconds,
                })).collect::<Vec<_>>(),
                "faults": o.faults,
                "vcpu_waits": waits,
                "guest_reads_checked": o.vcpus.iter().map(|v| v.reads.len()).sum::<usize>(),
                "guest_writes": o.vcpus.iter().map(|v| v.writes.len()).sum::<usize>(),
                "stage2_invalidations": o.invalidations,
                "device_state_bytes": s.device_state_bytes,
                "bytes": s.bytes,
                "seconds": o.seconds,
            });
            println!("{summary}");
        }
        Err(e) => {
            eprintln!("postcopy-dest: {e}");
            std::process::exit(1);
        }
    }
}

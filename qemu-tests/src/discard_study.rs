//! The RAM_DISCARD encoding study: QEMU 7.2 byte ranges (`docs/wire-format.md` §5) against the 2015 v5
//! semi-sparse bitmap (§8), measured on dirty sets recorded from real QEMU 7.2
//! postcopy migrations of the dirty guest.
//!
//! * [`record`] runs one real postcopy migration (source and QEMU's own paused destination,
//!   through a recording [`Relay`]) and [`extract`]s the discard commands the source sent.
//! * A [`DirtySet`] is saved as a small text file under `qemu-tests/data/dirty-sets/`
//!   ([`DirtySet::to_text`], [`DirtySet::parse`]).
//! * [`compare`] computes, for one set, both wire sizes (one command per 12 entries per
//!   block, as both sources did) and the decode time of both encodings through the agent's
//!   engine, and checks that both discard exactly the same pages.
//! * [`markdown_table`] / [`print_table`] render the results for `docs/perf.md`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use agent::decoder::{Decoder, Record, Step};
use agent::postcopy::{Engine, EngineConfig, Shared};
use agent::testing::{bitmap, FakePorts, StreamBuilder, VecReturnPath};
use agent::wire::command::{Command, Dialect};
use agent::wire::discard::encode_masks;
use serde_json::json;

use crate::guest::build_dirty_guest;
use crate::relay::{Endpoint, Relay};
use crate::source::{Machine, SourceVm};
use crate::{bail, workspace_root, Result};

/// Target (and, here, host) page size.
pub const PAGE: u64 = 4096;
/// Entries per RAM_DISCARD command: `MAX_DISCARDS_PER_COMMAND` is 12 in QEMU 7.2 and was 12
/// (address + mask pairs) in the 2015 mask-based `postcopy-ram.c` as well.
pub const ENTRIES_PER_COMMAND: usize = 12;
/// Bytes of a command header: `08 <be16 cmd> <be16 len>`.
const COMMAND_HEADER: u64 = 5;
/// Timed decodes per encoding; the median is reported.
const RUNS: usize = 21;

/// One RAMBlock of a dirty set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockSet {
    /// RAMBlock id.
    pub name: String,
    /// used_length in bytes.
    pub len: u64,
    /// Discarded runs `(first_page, pages)` in target pages, sorted, as the source sent them.
    pub runs: Vec<(u64, u64)>,
}

/// The pages a source discarded when it switched to postcopy, per block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtySet {
    /// Short name of the dirtying pattern.
    pub pattern: String,
    /// All blocks of the `ram` START list, in stream order (also those without discards).
    pub blocks: Vec<BlockSet>,
    /// RAM_DISCARD commands in the recorded stream.
    pub observed_commands: u64,
    /// Their bytes in the recorded stream (command headers included).
    pub observed_bytes: u64,
}

impl DirtySet {
    /// Discarded pages.
    pub fn pages(&self) -> u64 {
        self.blocks.iter().flat_map(|b| &b.runs).map(|r| r.1).sum()
    }

    /// Discarded ranges (7.2 entries).
    pub fn ranges(&self) -> u64 {
        self.blocks.iter().map(|b| b.runs.len() as u64).sum()
    }

    /// The text form: `#` comment lines, `pattern P`, `observed COMMANDS BYTES`, then per
    /// block `block NAME LEN` followed by one `FIRST_PAGE PAGES` line per range.
    pub fn to_text(&self, comment: &str) -> String {
        let mut s = String::new();
        for line in comment.lines() {
            let _ = writeln!(s, "# {line}");
        }
        let _ = writeln!(s, "pattern {}", self.pattern);
        let _ = writeln!(s, "observed {} {}", self.observed_commands, self.observed_bytes);
        for b in &self.blocks {
            let _ = writeln!(s, "block {} {}", b.name, b.len);
            for (first, pages) in &b.runs {
                let _ = writeln!(s, "{first} {pages}");
            }
        }
        s
    }

    /// Parses [`DirtySet::to_text`].
    pub fn parse(text: &str) -> Result<Self> {
        let mut set =
            DirtySet { pattern: String::new(), blocks: Vec::new(), observed_commands: 0, observed_bytes: 0 };
        for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.is_empty() && !l.starts_with('#')) {
            let bad = || crate::Error(format!("dirty set line {}: {line:?}", n + 1));
            let num = |w: Option<&str>| w.and_then(|w| w.parse::<u64>().ok()).ok_or_else(bad);
            let mut words = line.split(' ');
            match words.next() {
                Some("pattern") => set.pattern = words.next().ok_or_else(bad)?.to_string(),
                Some("observed") => {
                    set.observed_commands = num(words.next())?;
                    set.observed_bytes = num(words.next())?;
                }
                Some("block") => {
                    let name = words.next().ok_or_else(bad)?.to_string();
                    set.blocks.push(BlockSet { name, len: num(words.next())?, runs: Vec::new() });
                }
                first => {
                    let run = (num(first)?, num(words.next())?);
                    let block = set.blocks.last_mut().ok_or_else(bad)?;
                    if run.1 == 0 || (run.0 + run.1) * PAGE > block.len {
                        return Err(bad());
                    }
                    block.runs.push(run);
                }
            }
        }
        Ok(set)
    }

    /// The commands in `dialect` as the source would send them, without anything around them.
    pub fn discard_commands(&self, dialect: Dialect) -> Vec<u8> {
        let mut s = StreamBuilder { bytes: Vec::new(), dialect };
        for b in &self.blocks {
            let name = b.name.as_bytes();
            match dialect {
                Dialect::Qemu72 => {
                    let ranges: Vec<_> = b.runs.iter().map(|&(p, n)| (p * PAGE, n * PAGE)).collect();
                    for chunk in ranges.chunks(ENTRIES_PER_COMMAND) {
                        s.discard(name, chunk);
                    }
                }
                Dialect::SeedV5 => {
                    for chunk in masks(&b.runs).chunks(ENTRIES_PER_COMMAND) {
                        s.discard_v5(name, 0, chunk);
                    }
                }
            }
        }
        s.bytes
    }

    /// Header, OPEN_RETURN_PATH, ADVISE and the `ram` START with the block list: what comes
    /// before the discards.
    pub fn prefix(&self, dialect: Dialect) -> Vec<u8> {
        let blocks: Vec<(&[u8], u64)> = self.blocks.iter().map(|b| (b.name.as_bytes(), b.len)).collect();
        let mut s = StreamBuilder { bytes: Vec::new(), dialect };
        s.header().command(Command::OpenReturnPath).advise(PAGE, PAGE).ram_start(2, &blocks);
        s.bytes
    }
}

/// The v5 entries `(first_page, mask)` of one block's runs ([`encode_masks`]).
pub fn masks(runs: &[(u64, u64)]) -> Vec<(u64, u32)> {
    let mut entries = Vec::new();
    encode_masks(runs.iter().copied(), |start, mask| entries.push((start, mask)));
    entries
}

/// Wire bytes of one block's commands: `n` entries of `entry` bytes, at most 12 a command,
/// each command `5 + header + entries`, where the payload header is version, (v5:
/// first_bit_offset,) name length, name, (7.2: NUL) — 3 + name bytes in both dialects.
fn wire_bytes(name: &str, entries: u64, entry: u64) -> (u64, u64) {
    let commands = entries.div_ceil(ENTRIES_PER_COMMAND as u64);
    (commands, commands * (COMMAND_HEADER + 3 + name.len() as u64) + entries * entry)
}

/// One row of the comparison.
#[derive(Clone, Debug, PartialEq)]
pub struct EncodingRow {
    /// Pattern name.
    pub pattern: String,
    /// Discarded pages.
    pub pages: u64,
    /// 7.2 ranges.
    pub ranges: u64,
    /// 7.2 commands and wire bytes.
    pub commands_72: u64,
    /// 7.2 wire bytes.
    pub bytes_72: u64,
    /// v5 mask entries.
    pub entries_v5: u64,
    /// v5 commands.
    pub commands_v5: u64,
    /// v5 wire bytes.
    pub bytes_v5: u64,
    /// Median decode time of the 7.2 commands through the engine.
    pub decode_72: Duration,
    /// Median decode time of the v5 commands through the engine.
    pub decode_v5: Duration,
    /// Both decodings cleared exactly the same pages (and as many as the set holds).
    pub same_pages: bool,
}

impl EncodingRow {
    /// Decode nanoseconds per discarded page, (7.2, v5).
    pub fn ns_per_page(&self) -> (f64, f64) {
        let per = |d: Duration| d.as_nanos() as f64 / self.pages.max(1) as f64;
        (per(self.decode_72), per(self.decode_v5))
    }

    /// Decode nanoseconds per command, (7.2, v5).
    pub fn ns_per_command(&self) -> (f64, f64) {
        let per = |d: Duration, n: u64| d.as_nanos() as f64 / n.max(1) as f64;
        (per(self.decode_72, self.commands_72), per(self.decode_v5, self.commands_v5))
    }
}

/// Decodes `prefix` (untimed) then `discards` (timed) through a fresh engine in `dialect`,
/// with every page marked received beforehand. Returns the time and the received bitmap
/// afterwards (a cleared bit = a discarded page).
pub fn decode(
    set: &DirtySet,
    dialect: Dialect,
    prefix: &[u8],
    discards: &[u8],
) -> Result<(Duration, Vec<u64>)> {
    let total: u64 = set.blocks.iter().map(|b| b.len).sum();
    // Blocks start on 64-page words of the bitmap: leave room for their rounding.
    let received = bitmap(total + set.blocks.len() as u64 * 64 * PAGE);
    let requested = bitmap(total + set.blocks.len() as u64 * 64 * PAGE);
    for w in &received {
        w.store(u64::MAX, Ordering::Relaxed);
    }
    let shared = Shared::new(&received, &requested, VecReturnPath::default());
    let mut engine = Engine::new(&shared, FakePorts::default(), EngineConfig { dialect, machine: None });
    let fed = engine.receive(prefix, &[]).map_err(|e| crate::Error(format!("prefix: {e:?}")))?;
    if fed.consumed != prefix.len() {
        bail!("prefix: {} of {} bytes consumed", fed.consumed, prefix.len());
    }
    let t = Instant::now();
    let fed = engine.receive(discards, &[]);
    let elapsed = t.elapsed();
    let fed = fed.map_err(|e| crate::Error(format!("{dialect:?} discards: {e:?}")))?;
    if fed.consumed != discards.len() {
        bail!("{dialect:?} discards: {} of {} bytes consumed", fed.consumed, discards.len());
    }
    drop(engine);
    Ok((elapsed, received.iter().map(|w| w.load(Ordering::Relaxed)).collect()))
}

/// Median decode time over [`RUNS`] runs, and the bitmap of the last run.
fn timed(set: &DirtySet, dialect: Dialect) -> Result<(Duration, Vec<u64>)> {
    let (prefix, discards) = (set.prefix(dialect), set.discard_commands(dialect));
    let mut times = Vec::with_capacity(RUNS);
    let mut bits = Vec::new();
    for _ in 0..RUNS {
        let (t, b) = decode(set, dialect, &prefix, &discards)?;
        times.push(t);
        bits = b;
    }
    times.sort();
    Ok((times[RUNS / 2], bits))
}

/// Compares both encodings on one dirty set (sizes as the sources would send them; decode
/// time through the agent's engine; equality of the discarded pages).
pub fn compare(set: &DirtySet) -> Result<EncodingRow> {
    let (mut commands_72, mut bytes_72, mut entries_v5, mut commands_v5, mut bytes_v5) = (0, 0, 0, 0, 0);
    for b in set.blocks.iter().filter(|b| !b.runs.is_empty()) {
        let (c, n) = wire_bytes(&b.name, b.runs.len() as u64, 16);
        (commands_72, bytes_72) = (commands_72 + c, bytes_72 + n);
        let entries = masks(&b.runs).len() as u64;
        let (c, n) = wire_bytes(&b.name, entries, 12);
        (entries_v5, commands_v5, bytes_v5) = (entries_v5 + entries, commands_v5 + c, bytes_v5 + n);
    }
    let (decode_72, bits_72) = timed(set, Dialect::Qemu72)?;
    let (decode_v5, bits_v5) = timed(set, Dialect::SeedV5)?;
    let cleared = bits_72.iter().map(|w| u64::from(w.count_zeros())).sum::<u64>();
    Ok(EncodingRow {
        pattern: set.pattern.clone(),
        pages: set.pages(),
        ranges: set.ranges(),
        commands_72,
        bytes_72,
        entries_v5,
        commands_v5,
        bytes_v5,
        decode_72,
        decode_v5,
        same_pages: bits_72 == bits_v5 && cleared == set.pages(),
    })
}

/// Reads the RAM_DISCARD commands of a recorded 7.2 stream (up to PACKAGED) with the
/// agent's decoder.
pub fn extract(stream: &[u8], pattern: &str) -> Result<DirtySet> {
    let mut set =
        DirtySet { pattern: pattern.into(), blocks: Vec::new(), observed_commands: 0, observed_bytes: 0 };
    let mut decoder = Decoder::new(Dialect::Qemu72);
    let (mut off, mut current, mut command_at) = (0usize, None, 0u64);
    loop {
        let step = decoder.next(&stream[off..], &[]).map_err(|e| crate::Error(format!("decode: {e:?}")))?;
        let Step::Record { record, at, len } = step else { bail!("stream ended before PACKAGED") };
        off += len;
        match record {
            Record::Block(b) => set.blocks.push(BlockSet {
                name: String::from_utf8_lossy(b.name).into_owned(),
                len: b.used_length,
                runs: Vec::new(),
            }),
            Record::Command(Command::RamDiscard(h)) => {
                current = set.blocks.iter().position(|b| b.name.as_bytes() == h.block);
                command_at = at;
                set.observed_commands += 1;
            }
            Record::DiscardRange { start, len } => {
                let Some(b) = current else { bail!("discard range for an unknown block") };
                if start % PAGE != 0 || len % PAGE != 0 {
                    bail!("unaligned discard range {start:#x}+{len:#x}");
                }
                set.blocks[b].runs.push((start / PAGE, len / PAGE));
            }
            Record::DiscardEnd => set.observed_bytes += at + len as u64 - command_at,
            Record::Command(Command::Packaged(_)) => return Ok(set),
            _ => {}
        }
    }
}

/// How to record one dirty set.
#[derive(Clone, Debug)]
pub struct RecordSpec {
    /// Pattern name (file name without `.txt`).
    pub pattern: &'static str,
    /// What it is, for the README and the file's comment.
    pub description: &'static str,
    /// Source RAM in MiB (`-machine pc -vga none`).
    pub mem_mib: u64,
    /// Dirty guest command line.
    pub guest: &'static str,
    /// Precopy `max-bandwidth`, bytes/s.
    pub max_bandwidth: u64,
    /// Switch to postcopy once `dirty-sync-count` reaches this (2 = the first pass is
    /// complete), or at once if 0 ...
    pub min_syncs: u64,
    /// ... and this long after `migrate` at the earliest.
    pub precopy_for: Duration,
}

/// The recorded patterns. `downtime-limit` is 1 ms for all, so that precopy does not
/// converge and complete before postcopy is started.
pub const PATTERNS: &[RecordSpec] = &[
    RecordSpec {
        pattern: "idle",
        description: "no dirtying (only the guest's status page); postcopy 1 s into the first \
                      pass at 256 KiB/s (with a complete pass, precopy converges: see README)",
        mem_mib: 256,
        guest: "rate=0",
        max_bandwidth: 256 << 10,
        min_syncs: 0,
        precopy_for: Duration::from_secs(1),
    },
    RecordSpec {
        pattern: "dense",
        description: "16 MiB/s rewriting an 8 MiB span, 8 MiB/s precopy, after 3 passes",
        mem_mib: 256,
        guest: "rate=16384 span=8192",
        max_bandwidth: 8 << 20,
        min_syncs: 3,
        precopy_for: Duration::from_secs(4),
    },
    RecordSpec {
        pattern: "sparse",
        description: "4 MiB/s random pages over 240 MiB, 2 MiB/s precopy, after 3 passes",
        mem_mib: 256,
        guest: "rate=4096 span=245760",
        max_bandwidth: 2 << 20,
        min_syncs: 3,
        precopy_for: Duration::from_secs(8),
    },
    RecordSpec {
        pattern: "random",
        description: "16 MiB/s random pages over 240 MiB, 2 MiB/s precopy, after 3 syncs: saturated, \
                      nearly every page of the span is dirty",
        mem_mib: 256,
        guest: "rate=16384 span=245760",
        max_bandwidth: 2 << 20,
        min_syncs: 3,
        precopy_for: Duration::from_secs(8),
    },
    RecordSpec {
        pattern: "tail",
        description: "fill, then 4 MiB/s random over 240 MiB; postcopy 5 s into the first pass \
                      at 16 MiB/s (never-sent tail plus re-dirtied pages)",
        mem_mib: 256,
        guest: "rate=4096 span=245760 fill",
        max_bandwidth: 16 << 20,
        min_syncs: 0,
        precopy_for: Duration::from_secs(5),
    },
];

/// Directory of the saved sets.
pub fn data_dir() -> PathBuf {
    workspace_root().join("qemu-tests/data/dirty-sets")
}

/// Runs one real QEMU 7.2 postcopy migration (pc, `-vga none`, `-accel tcg`; destination
/// QEMU with `-incoming -S`) through a recording relay into `dir` and extracts its dirty set.
/// Returns the set and the source's QEMU command line.
pub fn record(spec: &RecordSpec, dir: &Path, timeout: Duration) -> Result<(DirtySet, Vec<String>)> {
    let deadline = Instant::now() + timeout;
    let builder = SourceVm::builder(Machine::Pc).mem_mib(spec.mem_mib).no_vga();
    let builder = builder.kernel(&build_dirty_guest()?, spec.guest);
    let mut src = builder.clone().spawn()?;
    let incoming = src.dir().join("incoming.sock");
    let mut dst = builder.clone().incoming(&format!("unix:{}", incoming.display())).spawn()?;
    src.wait_guest_dirtying(timeout)?;
    for vm in [&mut src, &mut dst] {
        vm.set_capabilities(&[("postcopy-ram", true)])?;
    }
    src.set_parameters(json!({ "max-bandwidth": spec.max_bandwidth, "downtime-limit": 1 }))?;
    let stream = dir.join(format!("{}.bin", spec.pattern));
    let relay_sock = src.dir().join("relay.sock");
    let rp = stream.with_extension("rp.bin");
    let relay = Relay::start(&relay_sock, Endpoint::Unix(incoming), stream.clone(), rp, deadline)?;
    let started = Instant::now();
    src.migrate(&format!("unix:{}", relay_sock.display()))?;
    loop {
        let info = src.query_migrate()?;
        if !matches!(info.status.as_str(), "setup" | "active") {
            bail!(
                "{}: source `{}` before postcopy: {:?} {}",
                spec.pattern,
                info.status,
                info.error,
                info.raw
            );
        }
        if info.dirty_sync_count >= spec.min_syncs && started.elapsed() >= spec.precopy_for {
            break;
        }
        if Instant::now() > deadline {
            bail!("{}: still {} syncs", spec.pattern, info.dirty_sync_count);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    src.start_postcopy()?;
    let info = src.wait_status(&["completed"], deadline.saturating_duration_since(Instant::now()))?;
    if info.dirty_sync_count == 0 {
        bail!("{}: no syncs reported", spec.pattern);
    }
    dst.wait_status(&["completed"], deadline.saturating_duration_since(Instant::now()))?;
    relay.finish(Duration::from_secs(30))?;
    let command_line = src.command_line().to_vec();
    src.quit()?;
    dst.quit()?;
    let set = extract(&std::fs::read(&stream)?, spec.pattern)?;
    if set.observed_commands == 0 {
        bail!("{}: the stream has no RAM_DISCARD (precopy converged?)", spec.pattern);
    }
    Ok((set, command_line))
}

/// Loads every `*.txt` set in [`data_dir`], sorted by file name.
pub fn load_all() -> Result<Vec<DirtySet>> {
    let mut files: Vec<_> = std::fs::read_dir(data_dir())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    files.sort();
    files.iter().map(|f| DirtySet::parse(&std::fs::read_to_string(f)?)).collect()
}

/// The comparison as a markdown table.
pub fn markdown_table(rows: &[EncodingRow]) -> String {
    let mut s = String::from(
        "| pattern | pages | 7.2 ranges | 7.2 cmds | 7.2 bytes | v5 entries | v5 cmds | v5 bytes \
         | v5/7.2 bytes | 7.2 ns/page | v5 ns/page | 7.2 ns/cmd | v5 ns/cmd | same pages |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in rows {
        let ((p72, pv5), (c72, cv5)) = (r.ns_per_page(), r.ns_per_command());
        let ratio = r.bytes_v5 as f64 / r.bytes_72.max(1) as f64;
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {ratio:.2} | {p72:.1} | {pv5:.1} | {c72:.0} | {cv5:.0} | {} |",
            r.pattern,
            r.pages,
            r.ranges,
            r.commands_72,
            r.bytes_72,
            r.entries_v5,
            r.commands_v5,
            r.bytes_v5,
            if r.same_pages { "yes" } else { "NO" },
        );
    }
    s
}

/// Compares every saved set and prints the markdown table (for `cargo xtask bench`; build
/// with `--release` for meaningful times).
pub fn print_table() -> Result<()> {
    let rows = load_all()?.iter().map(compare).collect::<Result<Vec<_>>>()?;
    print!("{}", markdown_table(&rows));
    Ok(())
}

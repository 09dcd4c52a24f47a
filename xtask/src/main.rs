//! The project's task runner: `cargo xtask <command>`.
//!
//! * `test`: install prerequisites, then fmt, clippy, the bare-metal agent build and the
//!   workspace tests (including the QEMU interop tests); prints a pass/fail summary.
//! * `demo [ARGS]`: the main path: a QEMU 7.2 VM migrated postcopy over virtio-vsock into the
//!   hypervisor image, where it keeps running; live progress, a summary and the JSON line.
//!   `demo --hosted [ARGS]`: the hosted destination `postcopy-dest` instead.
//! * `migrate [--emulator qemu|bochs [--cpu ...]] [--source own|file:PATH] [--transport serial] [--mem-mib N]
//!   [--dump-dir DIR]`: one postcopy migration into the hypervisor image; its last stdout line
//!   is the JSON summary scripts read. `migrate --source qemu --transport vsock [--source-args
//!   "..."]`: a real QEMU VM over virtio-vsock.
//! * `soak [--runs 20] [--stage2 ept,npt] [--vcpus 4] [--mem 112M] ...` (or `soak --image
//!   [--runs 20] [--mem-mib 2,4,6]` for the hypervisor image): the same real
//!   postcopy migration many times in a row (races at the end of a migration hide in one
//!   run of several); one line per run, failures counted.
//! * `capture [--machine pc] [--mem 320M] [--out FILE] [ARGS]`: record a large precopy
//!   stream of a guest whose RAM is filled with non-zero data (for benchmarks).
//! * `bench [--mem 1100M]`: record the two captures if they are missing (a 1.1 GiB precopy
//!   stream and a 512 MiB postcopy stream of filled guest RAM), then run
//!   `postcopy-bench` (release build): fault service, discard, ingest, discard encoding.
//!
//! Std only. Every child inherits `CARGO_TARGET_DIR`.

mod prereq;
mod steps;

use std::path::PathBuf;
use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rest = args.get(1..).unwrap_or(&[]);
    let ok = match args.first().map(String::as_str) {
        Some("test") => steps::test(),
        Some("demo") => harness("demo", rest.to_vec()),
        Some("soak") => harness("soak", rest.to_vec()),
        Some("migrate") => harness("migrate", rest.to_vec()),
        Some("capture") => harness("capture", capture_args(rest)),
        Some("bench") => bench(rest),
        _ => {
            eprintln!(
                "usage: cargo xtask test | demo [--mem-mib 64] [--source-args \"QEMU ARGS\"] \
                 | demo --hosted [--machine pc|q35] [--mem 64M] [--precopy] \
                 [--touch random|seq] [--record FILE] | soak [--runs 20] [--stage2 ept,npt] [--vcpus 4] [--mem 112M] \
                 [--max-bandwidth 12M] [--guest-writes] | migrate [--emulator qemu|bochs] [--source own|file:PATH] [--mem-mib N] [--dump-dir DIR] \
                 | migrate --source qemu --transport vsock [--source-args \"QEMU ARGS\"] \
                 | capture [--machine pc] [--mem 320M] [--out FILE] \
                 | bench [--mem 1100M]"
            );
            false
        }
    };
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The workspace root.
pub fn root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// Cargo's target directory.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => root().join(d),
        _ => root().join("target"),
    }
}

/// `cargo` (the one running us, if known).
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

/// Runs `cmd`, echoing it; true on exit status 0.
pub fn run(mut cmd: Command) -> bool {
    let shown: Vec<String> = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    println!("$ {}", shown.join(" "));
    match cmd.status() {
        Ok(s) if s.success() => true,
        Ok(s) => {
            eprintln!("xtask: `{}` failed: {s}", shown.join(" "));
            false
        }
        Err(e) => {
            eprintln!("xtask: cannot run `{}`: {e}", shown.join(" "));
            false
        }
    }
}

/// Builds `qemu-harness` (and `postcopy-dest` for the demo), then runs
/// `qemu-harness <sub> ARGS`.
pub fn harness(sub: &str, args: Vec<String>) -> bool {
    if !prereq::qemu() || !prereq::objcopy() {
        return false;
    }
    let mut build = cargo();
    build.args(["build", "-p", "qemu-tests", "--bin", "qemu-harness"]);
    if sub == "demo" || sub == "soak" {
        build.args(["--bin", "postcopy-dest"]);
    }
    if !run(build) {
        return false;
    }
    let mut cmd = Command::new(target_dir().join("debug/qemu-harness"));
    cmd.current_dir(root()).arg(sub).args(args);
    run(cmd)
}

/// `capture` defaults: pc, 320 MiB, the guest fills RAM first, no bandwidth limit,
/// output in `<target>/captures/`.
fn capture_args(user: &[String]) -> Vec<String> {
    let has = |flag: &str| user.iter().any(|a| a == flag);
    let get = |flag: &str| user.iter().position(|a| a == flag).and_then(|i| user.get(i + 1)).cloned();
    let mut args = user.to_vec();
    let machine = get("--machine").unwrap_or_else(|| "pc".into());
    let mem = get("--mem").unwrap_or_else(|| "320M".into());
    if !has("--machine") {
        args.extend(["--machine".into(), machine.clone()]);
    }
    if !has("--mem") {
        args.extend(["--mem".into(), mem.clone()]);
    }
    if !has("--out") {
        let dir = target_dir().join("captures");
        let _ = std::fs::create_dir_all(&dir);
        let out = dir.join(format!("{machine}-{mem}-precopy.bin"));
        args.extend(["--out".into(), out.display().to_string()]);
    }
    if !has("--fill") && !has("--no-guest") {
        args.push("--fill".into());
    }
    if !has("--max-bandwidth") {
        args.extend(["--max-bandwidth".into(), (4u64 << 30).to_string()]);
    }
    if !has("--dirty-for") {
        args.extend(["--dirty-for".into(), "1".into()]);
    }
    if !has("--timeout") {
        args.extend(["--timeout".into(), "600".into()]);
    }
    args
}

/// `cargo xtask bench`: two captures of pc guests with filled RAM, each recorded once into
/// `<target>/captures/`: a precopy one of `--mem` (default 1100M: a stream over 1 GiB) and a
/// postcopy one of 512M (64 MiB/s of precopy for 1 s, then postcopy without a bandwidth
/// limit, QEMU's destination paused so that it requests nothing); then `postcopy-bench`.
fn bench(user: &[String]) -> bool {
    let mem = user.iter().position(|a| a == "--mem").and_then(|i| user.get(i + 1)).cloned();
    let mem = mem.unwrap_or_else(|| "1100M".into());
    let dir = target_dir().join("captures");
    let capture = dir.join(format!("pc-{mem}-precopy.bin"));
    if !capture.exists() && !harness("capture", capture_args(&["--mem".into(), mem.clone()])) {
        return false;
    }
    let post_mem = "512M";
    let postcopy = dir.join(format!("pc-{post_mem}-postcopy.bin"));
    let post_args: Vec<String> = [
        "--postcopy",
        "--dest-paused",
        "--mem",
        post_mem,
        "--max-bandwidth",
        "67108864",
        "--max-postcopy-bandwidth",
        "4294967296",
        "--out",
    ]
    .map(String::from)
    .into_iter()
    .chain([postcopy.display().to_string()])
    .collect();
    if !postcopy.exists() && !harness("capture", capture_args(&post_args)) {
        return false;
    }
    let mut build = cargo();
    build.args([
        "build",
        "--release",
        "-p",
        "qemu-tests",
        "--bin",
        "postcopy-bench",
        "--bin",
        "postcopy-dest",
    ]);
    if !run(build) {
        return false;
    }
    let mut cmd = Command::new(target_dir().join("release/postcopy-bench"));
    cmd.current_dir(root()).arg("--capture").arg(&capture);
    cmd.arg("--machine-args").arg(format!("-machine pc -m {mem}"));
    cmd.arg("--postcopy-capture").arg(&postcopy);
    cmd.arg("--postcopy-machine-args").arg(format!("-machine pc -m {post_mem}"));
    run(cmd)
}

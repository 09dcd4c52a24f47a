//! `cargo xtask test`: the checks, in order, with a summary. Every step runs even if an
//! earlier one failed, so one report shows everything; the exit status is non-zero if
//! any step failed.
//!
//! To add a step, add a line to [`steps`].

use std::process::Command;
use std::time::Instant;

use crate::{cargo, harness, prereq, root, run, target_dir};

/// One check.
enum Step {
    /// A function returning pass/fail.
    Check(fn() -> bool),
    /// A cargo command (arguments after `cargo`) with extra environment variables.
    Cargo(&'static [&'static str], &'static [(&'static str, &'static str)]),
}

/// The steps: (name, step, run only if this path exists in the workspace).
fn steps() -> Vec<(&'static str, Step, Option<&'static str>)> {
    vec![
        ("prerequisite: QEMU 7.2", Step::Check(prereq::qemu), None),
        ("prerequisite: objcopy", Step::Check(prereq::objcopy), None),
        ("prerequisite: x86_64-unknown-none", Step::Check(prereq::bare_metal_target), None),
        ("fmt", Step::Cargo(&["fmt", "--all", "--check"], &[]), None),
        (
            "fmt dirty-guest",
            Step::Cargo(&["fmt", "--manifest-path", "qemu-tests/dirty-guest/Cargo.toml", "--check"], &[]),
            None,
        ),
        (
            "fmt pattern-guest",
            Step::Cargo(&["fmt", "--manifest-path", "guests/pattern-guest/Cargo.toml", "--check"], &[]),
            None,
        ),
        ("clippy test guests (bare metal)", Step::Check(clippy_guests), None),
        (
            "clippy",
            Step::Cargo(&["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"], &[]),
            None,
        ),
        (
            "agent, hal and the hypervisor image for x86_64-unknown-none (build)",
            Step::Cargo(
                &["build", "-p", "agent", "-p", "hal", "-p", "hypervisor", "--target", "x86_64-unknown-none"],
                &[],
            ),
            None,
        ),
        (
            // The bare-metal-only code (the image, SVM, INVEPT, MOVNTI placement) is linted
            // only here.
            "agent, hal and the hypervisor image for x86_64-unknown-none (clippy)",
            Step::Cargo(
                &[
                    "clippy",
                    "-p",
                    "agent",
                    "-p",
                    "hal",
                    "-p",
                    "hypervisor",
                    "--target",
                    "x86_64-unknown-none",
                    "--",
                    "-D",
                    "warnings",
                ],
                &[],
            ),
            None,
        ),
        (
            "tests (workspace, with QEMU interop)",
            Step::Cargo(&["test", "--workspace", "--no-fail-fast"], &[]),
            None,
        ),
        // The interface scripts use, end to end: exit 0 only for a checked migration.
        ("cargo xtask migrate (the image under QEMU, SVM)", Step::Check(migrate), None),
        (
            "cargo xtask migrate --source qemu --transport vsock (a QEMU VM into the image)",
            Step::Check(migrate_vsock),
            None,
        ),
        ("cargo xtask demo (the main path, with its defaults)", Step::Check(demo), None),
        ("loom models (agent shared state)", Step::Check(loom), Some("agent/tests/loom.rs")),
        ("fuzz target: build and run on the captures", Step::Check(fuzz), Some("fuzz/Cargo.toml")),
    ]
}

/// Runs every step and prints the summary; true if all passed.
pub fn test() -> bool {
    let mut results = Vec::new();
    for (name, step, needs) in steps() {
        if needs.is_some_and(|p| !root().join(p).exists()) {
            results.push((name, None, 0.0));
            continue;
        }
        println!("\n=== {name}");
        let start = Instant::now();
        let ok = match step {
            Step::Check(f) => f(),
            Step::Cargo(args, env) => {
                let mut cmd: Command = cargo();
                cmd.args(args).envs(env.iter().copied());
                run(cmd)
            }
        };
        results.push((name, Some(ok), start.elapsed().as_secs_f64()));
    }
    println!("\n=== summary");
    let mut all = true;
    for (name, ok, secs) in &results {
        let verdict = match ok {
            Some(true) => "PASS",
            Some(false) => {
                all = false;
                "FAIL"
            }
            None => "skip (not present)",
        };
        println!("{verdict:<20} {name} ({secs:.1} s)");
    }
    println!("{}", if all { "all steps passed" } else { "SOME STEPS FAILED" });
    all
}

/// `cargo xtask migrate --mem-mib 4`: one postcopy migration into the image, checked.
fn migrate() -> bool {
    harness("migrate", vec!["--mem-mib".into(), "4".into()])
}

/// `cargo xtask migrate --source qemu --transport vsock`: a real QEMU VM over virtio-vsock.
fn migrate_vsock() -> bool {
    harness("migrate", ["--source", "qemu", "--transport", "vsock"].map(String::from).to_vec())
}

/// `cargo xtask demo`, as a user runs it.
fn demo() -> bool {
    harness("demo", Vec::new())
}

/// `cargo clippy -D warnings` on the two test guests, each from its own directory (its
/// `.cargo/config.toml`, where it has one, sets the target and code model), bare metal.
fn clippy_guests() -> bool {
    ["qemu-tests/dirty-guest", "guests/pattern-guest"].iter().all(|dir| {
        let mut cmd = cargo();
        cmd.current_dir(root().join(dir))
            .args(["clippy", "--release", "--target", "x86_64-unknown-none", "--target-dir"])
            .arg(target_dir().join("guests-clippy"))
            .args(["--", "-D", "warnings"]);
        run(cmd)
    })
}

/// `RUSTFLAGS="--cfg loom" cargo test -p agent --test loom --release`, in a target directory
/// of its own so that the changed RUSTFLAGS do not invalidate the normal build.
fn loom() -> bool {
    let mut cmd = cargo();
    cmd.args(["test", "-p", "agent", "--test", "loom", "--release", "--target-dir"])
        .arg(target_dir().join("loom"))
        .env("RUSTFLAGS", "--cfg loom");
    run(cmd)
}

/// Builds the cargo-fuzz target (libFuzzer, coverage instrumentation, no sanitizer: that
/// needs a nightly compiler) and runs it for 45 seconds, seeded from the real
/// QEMU captures and `fuzz/seeds` (a q35 layout above 4 GiB); new inputs go to
/// `<target>/fuzz-corpus`, never into the seeds.
fn fuzz() -> bool {
    let Some(tools) = prereq::cargo_fuzz() else { return false };
    let path = std::env::join_paths(
        std::iter::once(tools).chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())),
    );
    let Ok(path) = path else { return false };
    let corpus = target_dir().join("fuzz-corpus");
    let _ = std::fs::create_dir_all(&corpus);
    let fuzz_cmd = |args: &[&str]| {
        let mut cmd = cargo();
        cmd.current_dir(root().join("fuzz")).env("PATH", &path).arg("fuzz").args(args);
        cmd
    };
    run(fuzz_cmd(&["build", "-s", "none", "stream"]))
        && run({
            let mut cmd = fuzz_cmd(&["run", "-s", "none", "stream"]);
            cmd.arg(&corpus).arg(root().join("agent/tests/captures")).arg(root().join("fuzz/seeds"));
            // An input that runs for 10 s is a hang: reported as a failure, not waited for.
            cmd.args(["--", "-max_total_time=45", "-max_len=65536", "-timeout=10"]);
            cmd
        })
}

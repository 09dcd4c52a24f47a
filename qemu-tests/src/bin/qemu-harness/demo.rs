//! `demo`: by default, the main path: a real QEMU 7.2 VM migrated postcopy over virtio-vsock
//! into the hypervisor image, where it goes on running ([`crate::demo_image`]).
//!
//! `demo --hosted`: a postcopy migration of a pc source running the dirty guest into
//! `postcopy-dest`, with progress once per second and a RAM check at the end.
//!
//! Flags of `--hosted`: `--machine pc|q35`, `--mem 64M`, `--guest "rate=2048 fill"`, `--precopy`,
//! `--tcp`, `--touch random|seq`, `--record FILE`, `--max-bandwidth B/s`,
//! `--max-postcopy-bandwidth B/s` (0 = unlimited), `--precopy-for MS`, `--dest PATH`.

use std::path::PathBuf;
use std::time::Duration;

use qemu_tests::scenario::{run as run_scenario, Scenario};
use qemu_tests::source::Machine;
use qemu_tests::{bail, Result};

use crate::{parse_mib, Flags};

pub(crate) fn run(args: &[String]) -> Result<()> {
    if !args.iter().any(|a| a == "--hosted") {
        return crate::demo_image::run(args);
    }
    let args: Vec<String> = args.iter().filter(|a| *a != "--hosted").cloned().collect();
    let args = &args[..];
    let flags = Flags::new(
        args,
        &[
            "--machine",
            "--mem",
            "--dest",
            "--guest",
            "--record",
            "--touch",
            "--max-bandwidth",
            "--max-postcopy-bandwidth",
            "--precopy-for",
        ],
        &["--precopy", "--tcp"],
    )?;
    let machine = Machine::parse(flags.get("--machine").unwrap_or("pc"))?;
    let dest = match flags.get("--dest") {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe()?.with_file_name("postcopy-dest"),
    };
    if !dest.exists() {
        bail!("{} not found: build it with `cargo build -p qemu-tests --bins`", dest.display());
    }
    let mut sc =
        if flags.has("--precopy") { Scenario::precopy(machine) } else { Scenario::postcopy(machine) };
    sc.mem_mib = parse_mib(flags.get("--mem").unwrap_or("64M"))?;
    if let Some(g) = flags.get("--guest") {
        sc.guest_append = g.to_string();
    }
    if let Some(t) = flags.get("--touch") {
        sc.touch = Some(t.to_string());
    }
    sc.record = flags.get("--record").map(PathBuf::from);
    sc.tcp = flags.has("--tcp");
    let num = |flag: &str| -> Result<Option<u64>> {
        match flags.get(flag) {
            None => Ok(None),
            Some(v) => match v.parse::<u64>() {
                Ok(n) => Ok(Some(n)),
                Err(_) => bail!("bad {flag} {v:?}"),
            },
        }
    };
    if let Some(bw) = num("--max-bandwidth")? {
        sc.max_bandwidth = Some(bw);
    }
    if let Some(bw) = num("--max-postcopy-bandwidth")? {
        sc.max_postcopy_bandwidth = Some(bw);
    }
    if let Some(ms) = num("--precopy-for")? {
        sc.precopy_for = Duration::from_millis(ms);
    }
    sc.progress = true;
    sc.timeout = Duration::from_secs(120);
    println!(
        "demo: {} source, {} MiB, guest `{}`, {} into {}",
        machine.as_str(),
        sc.mem_mib,
        sc.guest_append,
        if sc.postcopy { "postcopy" } else { "precopy" },
        dest.display()
    );
    let out = run_scenario(&dest, &sc)?;
    println!(
        "source: {} after {} B ({} normal, {} zero pages, {} postcopy requests); postcopy-active seen: {}",
        out.source.status,
        out.source.transferred,
        out.source.normal_pages,
        out.source.zero_pages,
        out.source.postcopy_requests,
        out.saw_postcopy_active
    );
    println!("guest: heartbeat {} pages dirtied {}", out.guest.heartbeat, out.guest.pages_dirtied);
    match &out.source_diff {
        None => println!("source check: destination equals the source's final RAM"),
        Some(d) => println!(
            "source check: destination differs from the source's final RAM ({d}); \
             the TCG source can lose dirty bits, the verdict is the check below"
        ),
    }
    match out.ram_diff {
        None => {
            println!(
                "RAM check: every RAMBlock of the destination ({} blocks, {} bytes) equals what \
                 QEMU 7.2's own destination holds after loading the same stream ({} bytes)",
                out.blocks_compared, out.ram_bytes, out.stream_bytes
            );
            Ok(())
        }
        Some(diff) => bail!("RAM check FAILED: {diff}"),
    }
}

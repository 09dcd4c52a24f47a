//! A simulated vCPU: after RUN it reads (and, when asked, writes) guest memory, each access
//! walking the stage-2 table to the frame it maps; a not-present entry is an exit into the
//! agent (the EPT violation / #NPF of the hypervisor). What it read and wrote is kept, so the
//! destination can check at the end that every value a vCPU saw is what the page holds.

use std::sync::atomic::{AtomicBool, Ordering};

use agent::layout::Region;
use agent::ports::ReturnPath;
use agent::postcopy::{Access, Fault, Shared, State};
use hal::stage2::Format;

use super::ports::{SharedTable, Wakeups};

/// Which pages the vCPU touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Touch {
    /// Random pages.
    Random,
    /// Pages in ascending guest-physical order.
    Seq,
}

/// How a vCPU behaves.
#[derive(Clone, Copy, Debug)]
pub struct Behaviour {
    /// Which pages it touches.
    pub touch: Touch,
    /// Seed of its access order and offsets.
    pub seed: u64,
    /// Whether one access in three writes (off: every access reads, so guest RAM at the end
    /// is exactly what the stream carried).
    pub writes: bool,
}

/// What a vCPU saw and did.
#[derive(Debug, Default, Clone)]
pub struct VcpuReport {
    /// Accesses that found their page mapped.
    pub hits: u64,
    /// Accesses that faulted.
    pub faults: u64,
    /// Faults that had to wait for the page.
    pub waits: u64,
    /// (guest-physical address, value) of every 8-byte read.
    pub reads: Vec<(u64, u64)>,
    /// (guest-physical address, value) of every 8-byte write.
    pub writes: Vec<(u64, u64)>,
}

/// Bytes at the start of each page where vCPU `v` writes (at `8 * v`); reads stay above them
/// when writes are on, so a read never races another vCPU's write.
const WRITE_AREA: u64 = 8 * agent::config::MAX_VCPUS as u64;

/// Runs vCPU `index` until every guest page was touched or `stop` is set. Every access
/// walks the stage-2 table and loads from (or stores to) the frame it ends in; a missing
/// entry is an exit into the agent. Returns an error string for a fault the agent refused,
/// or a page still unmapped after its release.
pub fn run<R: ReturnPath + Send, F: Format>(
    index: usize,
    shared: &Shared<'_, R>,
    table: &SharedTable<F>,
    wakeups: &Wakeups,
    behaviour: Behaviour,
    stop: &AtomicBool,
) -> Result<VcpuReport, String> {
    let mut report = VcpuReport::default();
    // The vCPU starts at RUN, like the guest's.
    while shared.state.get() != State::Running {
        if stop.load(Ordering::Acquire) || shared.state.get() == State::End {
            return Ok(report);
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let Some(layout) = shared.layout() else { return Ok(report) };
    let pages: Vec<u64> = layout.regions().iter().flat_map(region_pages).collect();
    let mut order: Vec<usize> = (0..pages.len()).collect();
    let mut rng = behaviour.seed | 1;
    if behaviour.touch == Touch::Random {
        shuffle(&mut order, &mut rng);
    }
    let tag = 0xc0de_0000_0000_0000 | (index as u64) << 40;
    for i in order {
        if stop.load(Ordering::Acquire) {
            break;
        }
        let write = behaviour.writes && next(&mut rng).is_multiple_of(3);
        let (gpa, access) = if write {
            (pages[i] + 8 * index as u64, Access::Write)
        } else {
            let low = if behaviour.writes { WRITE_AREA } else { 0 };
            (pages[i] + low + (next(&mut rng) % ((4096 - low) / 8)) * 8, Access::Read)
        };
        loop {
            let done = if write {
                let value = tag | (gpa >> 12);
                table.write(gpa, value).then(|| report.writes.push((gpa, value)))
            } else {
                table.read(gpa).map(|value| report.reads.push((gpa, value)))
            };
            if done.is_some() {
                report.hits += 1;
                break;
            }
            report.faults += 1;
            match shared.on_guest_fault(gpa, access, index) {
                Ok(Fault::Resume) => continue,
                Ok(Fault::Wait { .. }) => {
                    report.waits += 1;
                    if !wakeups.park(index, || stop.load(Ordering::Acquire)) {
                        return Ok(report);
                    }
                    if table.translate(gpa).is_none() {
                        return Err(format!("vCPU {index}: released but {gpa:#x} is not mapped"));
                    }
                }
                Err(e) => return Err(format!("vCPU {index}: fault at {gpa:#x}: {e:?}")),
            }
        }
    }
    Ok(report)
}

fn region_pages(r: &Region) -> impl Iterator<Item = u64> {
    (r.gpa..r.gpa + r.len).step_by(4096)
}

/// xorshift64*: deterministic per seed, no dependency.
fn next(x: &mut u64) -> u64 {
    *x ^= *x >> 12;
    *x ^= *x << 25;
    *x ^= *x >> 27;
    x.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

fn shuffle(v: &mut [usize], rng: &mut u64) {
    for i in (1..v.len()).rev() {
        v.swap(i, (next(rng) % (i as u64 + 1)) as usize);
    }
}

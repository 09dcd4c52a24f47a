//! A simulated vCPU: after RUN it touches guest pages, each access walking the stage-2
//! table, and a not-present entry is an exit into the agent (the EPT violation / #NPF of
//! the hypervisor).

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

/// What a vCPU saw.
#[derive(Debug, Default, Clone, Copy)]
pub struct VcpuReport {
    /// Accesses that found their page mapped.
    pub hits: u64,
    /// Accesses that faulted.
    pub faults: u64,
    /// Faults that had to wait for the page.
    pub waits: u64,
}

/// Runs vCPU `index` until every guest page was touched or `stop` is set. Every access
/// walks the stage-2 table; a missing entry is an exit into the agent. Returns an error
/// string for a fault the agent refused, or a page still unmapped after its release.
pub fn run<R: ReturnPath + Send, F: Format>(
    index: usize,
    shared: &Shared<'_, R>,
    table: &SharedTable<F>,
    wakeups: &Wakeups,
    touch: Touch,
    seed: u64,
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
    let mut rng = seed | 1;
    if touch == Touch::Random {
        shuffle(&mut order, &mut rng);
    }
    for i in order {
        if stop.load(Ordering::Acquire) {
            break;
        }
        let gpa = pages[i] + (next(&mut rng) & 0xff8);
        let access = if next(&mut rng).is_multiple_of(3) { Access::Write } else { Access::Read };
        loop {
            if table.translate(gpa).is_some() {
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

//! A simulated vCPU: after RUN it touches guest pages that have not arrived, each access
//! checked against the stage-2 map, and a missing page is an exit into the agent.

use std::sync::atomic::{AtomicBool, Ordering};

use agent::layout::Region;
use agent::ports::ReturnPath;
use agent::postcopy::{Fault, Shared, State};

use crate::ports::SoftStage2;

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

/// Runs until every guest page was touched or `stop` is set. Returns an error string for a
/// fault the agent refused.
pub fn run<R: ReturnPath + Send>(
    shared: &Shared<'_, R>,
    stage2: &SoftStage2,
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
    let Some(layout) = shared.layout() else {
        return Ok(report);
    };
    let pages: Vec<u64> = layout.regions().iter().flat_map(region_pages).collect();
    let mut order: Vec<usize> = (0..pages.len()).collect();
    if touch == Touch::Random {
        shuffle(&mut order, seed);
    }
    for i in order {
        if stop.load(Ordering::Acquire) {
            break;
        }
        let gpa = pages[i];
        if stage2.is_mapped(gpa) {
            report.hits += 1;
            continue;
        }
        report.faults += 1;
        match shared.on_guest_fault(gpa) {
            Ok(Fault::Resume) => {}
            Ok(Fault::Wait { .. }) => {
                report.waits += 1;
                if !stage2.wait_mapped(gpa, || stop.load(Ordering::Acquire)) {
                    break;
                }
            }
            Err(e) => return Err(format!("vCPU fault at {gpa:#x}: {e:?}")),
        }
    }
    Ok(report)
}

fn region_pages(r: &Region) -> impl Iterator<Item = u64> {
    (r.gpa..r.gpa + r.len).step_by(4096)
}

/// Fisher-Yates with xorshift64*: deterministic per seed, no dependency.
fn shuffle(v: &mut [usize], seed: u64) {
    let mut x = seed | 1;
    for i in (1..v.len()).rev() {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let r = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
        v.swap(i, (r % (i as u64 + 1)) as usize);
    }
}

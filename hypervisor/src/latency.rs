//! Postcopy fault latency the way QEMU 10.1 reports it (`postcopy-latency`,
//! `postcopy-vcpu-latency`, `postcopy-latency-dist`), in nanoseconds from the TSC: the time a
//! vCPU was blocked on each missing page, from the stage-2 fault exit to the entry that resumed
//! it, in power-of-two buckets.

use core::fmt::Write;

/// Buckets: bucket `i` counts latencies in `[2^i, 2^(i+1))` ns; the last also everything above.
pub const BUCKETS: usize = 40;

/// TSC cycles per microsecond, measured at boot ([`calibrate`]).
static CYCLES_PER_US: spin::Once<u64> = spin::Once::new();

/// Measures the TSC against PIT channel 2 (10 ms one-shot, its output read at port 0x61):
/// the emulators' TSC and PIT both follow their virtual clock.
pub fn calibrate() -> u64 {
    *CYCLES_PER_US.call_once(|| {
        const TICKS: u16 = 11_932; // 10 ms at 1.193182 MHz
                                   // SAFETY: ports 0x61 (gate and speaker) and 0x42/0x43 (PIT channel 2) are the PC's;
                                   // the speaker stays off (bit 1 clear) and nothing else uses channel 2.
        let cycles = unsafe {
            let gate = hal::cpu::inb(0x61);
            hal::cpu::outb(0x61, (gate & !0x02) | 0x01);
            hal::cpu::outb(0x43, 0xb0);
            hal::cpu::outb(0x42, TICKS as u8);
            hal::cpu::outb(0x42, (TICKS >> 8) as u8);
            let start = hal::cpu::rdtsc();
            let mut end = start;
            for _ in 0..50_000_000u32 {
                end = hal::cpu::rdtsc();
                if hal::cpu::inb(0x61) & 0x20 != 0 {
                    break;
                }
            }
            hal::cpu::outb(0x61, gate);
            end - start
        };
        (cycles / 10_000).max(1)
    })
}

/// Nanoseconds in `cycles` TSC cycles.
pub fn ns(cycles: u64) -> u64 {
    let per_us = CYCLES_PER_US.get().copied().unwrap_or(1000);
    (u128::from(cycles) * 1000 / u128::from(per_us)) as u64
}

/// One vCPU's blocked time and the latency distribution of its faults.
#[derive(Debug)]
pub struct Latency {
    buckets: [u64; BUCKETS],
    total_ns: u64,
    count: u64,
}

impl Latency {
    /// Nothing measured.
    pub const fn new() -> Self {
        Self { buckets: [0; BUCKETS], total_ns: 0, count: 0 }
    }

    /// A fault that blocked the vCPU for `cycles`.
    pub fn add(&mut self, cycles: u64) {
        let ns = ns(cycles);
        let bucket = (63 - ns.max(1).leading_zeros() as usize).min(BUCKETS - 1);
        self.buckets[bucket] += 1;
        self.total_ns += ns;
        self.count += 1;
    }

    /// Writes the JSON members (no braces): `"postcopy_latency_ns"` (mean),
    /// `"postcopy_vcpu_blocktime_ns"` (per vCPU), `"postcopy_vcpu_latency_ns"` (mean per vCPU),
    /// `"postcopy_latency_dist_ns"` (bucket counts up to the last non-empty one).
    pub fn json(&self, w: &mut impl Write) -> core::fmt::Result {
        let mean = self.total_ns.checked_div(self.count).unwrap_or(0);
        write!(
            w,
            "\"postcopy_faults\":{},\"postcopy_latency_ns\":{mean},\"postcopy_vcpu_blocktime_ns\":[{}],\
             \"postcopy_vcpu_latency_ns\":[{mean}],\"postcopy_latency_dist_ns\":[",
            self.count, self.total_ns
        )?;
        let last = self.buckets.iter().rposition(|&c| c != 0).map_or(0, |i| i + 1);
        for (i, c) in self.buckets[..last].iter().enumerate() {
            write!(w, "{}{c}", if i == 0 { "" } else { "," })?;
        }
        write!(w, "]")
    }
}

//! TSC cycle samples of the fault path, with their p50/p99.

/// Samples kept per measurement (later ones are counted, not kept).
const KEPT: usize = 4096;

/// One measurement's samples.
pub struct Samples {
    kept: heapless::Vec<u32, KEPT>,
    count: u64,
}

impl Samples {
    /// No samples.
    pub const fn new() -> Self {
        Self { kept: heapless::Vec::new(), count: 0 }
    }

    /// Adds the cycles from `start` to `end`.
    pub fn add(&mut self, start: u64, end: u64) {
        self.count += 1;
        let _ = self.kept.push(end.saturating_sub(start).min(u64::from(u32::MAX)) as u32);
    }

    /// Samples taken.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The `p`-th percentile (0-100) of the kept samples, 0 if none.
    pub fn percentile(&mut self, p: usize) -> u32 {
        if self.kept.is_empty() {
            return 0;
        }
        self.kept.sort_unstable();
        let i = (self.kept.len() - 1) * p / 100;
        self.kept[i]
    }
}

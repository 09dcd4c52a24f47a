//! Order statistics over [`Duration`] samples.

use std::time::Duration;

/// Summary of a set of samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Summary {
    /// Number of samples.
    pub count: usize,
    /// Smallest sample.
    pub min: Duration,
    /// Median (nearest rank).
    pub p50: Duration,
    /// 99th percentile (nearest rank).
    pub p99: Duration,
    /// Largest sample.
    pub max: Duration,
    /// Arithmetic mean.
    pub mean: Duration,
}

impl Summary {
    /// Summarises `samples` (all zero if empty).
    pub fn of(samples: &[Duration]) -> Self {
        if samples.is_empty() {
            return Summary::default();
        }
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        let total: u128 = sorted.iter().map(Duration::as_nanos).sum();
        let mean = total / sorted.len() as u128;
        Summary {
            count: sorted.len(),
            min: sorted[0],
            p50: percentile_sorted(&sorted, 50.0),
            p99: percentile_sorted(&sorted, 99.0),
            max: sorted[sorted.len() - 1],
            mean: Duration::from_nanos(u64::try_from(mean).unwrap_or(u64::MAX)),
        }
    }
}

/// The `p`-th percentile (0 < p <= 100) of `samples`, nearest-rank method: the smallest
/// sample such that at least `p`% of the samples are <= it. `None` if empty.
pub fn percentile(samples: &[Duration], p: f64) -> Option<Duration> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    Some(percentile_sorted(&sorted, p))
}

/// Median (nearest rank). `None` if empty.
pub fn p50(samples: &[Duration]) -> Option<Duration> {
    percentile(samples, 50.0)
}

/// 99th percentile (nearest rank). `None` if empty.
pub fn p99(samples: &[Duration]) -> Option<Duration> {
    percentile(samples, 99.0)
}

/// Smallest sample. `None` if empty.
pub fn min(samples: &[Duration]) -> Option<Duration> {
    samples.iter().min().copied()
}

/// Arithmetic mean. `None` if empty.
pub fn mean(samples: &[Duration]) -> Option<Duration> {
    (!samples.is_empty()).then(|| Summary::of(samples).mean)
}

fn percentile_sorted(sorted: &[Duration], p: f64) -> Duration {
    let p = p.clamp(0.0, 100.0);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&x| Duration::from_micros(x)).collect()
    }

    #[test]
    fn nearest_rank() {
        let s = us(&[5, 1, 4, 2, 3]);
        assert_eq!(p50(&s), Some(Duration::from_micros(3)));
        assert_eq!(p99(&s), Some(Duration::from_micros(5)));
        assert_eq!(min(&s), Some(Duration::from_micros(1)));
        assert_eq!(mean(&s), Some(Duration::from_micros(3)));
        let hundred: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        assert_eq!(p99(&hundred), Some(Duration::from_micros(99)));
        assert_eq!(p50(&hundred), Some(Duration::from_micros(50)));
        let sum = Summary::of(&hundred);
        assert_eq!((sum.count, sum.max), (100, Duration::from_micros(100)));
    }

    #[test]
    fn empty() {
        assert_eq!(p50(&[]), None);
        assert_eq!(mean(&[]), None);
        assert_eq!(Summary::of(&[]).count, 0);
    }
}

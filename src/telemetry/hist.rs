//! Log2 histograms of microseconds, as the telemetry programs keep them:
//! bucket i counts values in [2^i, 2^(i+1)) µs (bucket 0 also counts 0),
//! the last bucket is open-ended. The sum is exact (the programs add
//! every sample), so Prometheus' `_sum` and the mean are too.

use serde_json::{Value, json};

use crate::datapath::TELEMETRY_BUCKETS;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Log2Histogram {
    pub buckets: [u64; TELEMETRY_BUCKETS],
    pub sum_us: u64,
    /// The samples counted; the buckets add up to it unless a reader
    /// caught the program between its two adds.
    pub count: u64,
}

impl Log2Histogram {
    pub fn new(buckets: [u64; TELEMETRY_BUCKETS], sum_us: u64, count: u64) -> Self {
        Log2Histogram { buckets, sum_us, count }
    }

    /// The upper bound of bucket `i` in seconds; None for the last
    /// (open-ended) one.
    pub fn upper_bound_seconds(i: usize) -> Option<f64> {
        (i + 1 < TELEMETRY_BUCKETS).then(|| 2f64.powi(i as i32 + 1) / 1e6)
    }

    fn total(&self) -> u64 {
        self.buckets.iter().fold(0u64, |a, b| a.saturating_add(*b))
    }

    /// The `q` quantile (0..=1) in seconds, interpolated linearly inside
    /// its bucket as Prometheus' `histogram_quantile` does; None without
    /// samples. The open-ended bucket answers with its lower bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.total();
        if total == 0 || !(0.0..=1.0).contains(&q) {
            return None;
        }
        let rank = q * total as f64;
        let mut below = 0u64;
        for (i, &n) in self.buckets.iter().enumerate() {
            if n == 0 {
                continue;
            }
            if (below + n) as f64 >= rank {
                let lower = if i == 0 { 0.0 } else { 2f64.powi(i as i32) };
                let Some(upper) = Self::upper_bound_seconds(i).map(|s| s * 1e6) else { return Some(lower / 1e6) };
                let within = (rank - below as f64) / n as f64;
                return Some((lower + (upper - lower) * within) / 1e6);
            }
            below += n;
        }
        None
    }

    pub fn mean_seconds(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum_us as f64 / self.count as f64 / 1e6)
    }

    /// Per-bucket counts (not cumulative) with their upper bounds, as the
    /// prometheus-client encoder takes them.
    pub fn per_bucket(&self) -> Vec<(f64, u64)> {
        self.buckets.iter().enumerate().map(|(i, n)| (Self::upper_bound_seconds(i).unwrap_or(f64::MAX), *n)).collect()
    }

    pub fn to_json(&self) -> Value {
        let ms = |s: Option<f64>| s.map(|s| (s * 1e6).round() / 1e3);
        json!({
            "samples": self.total(),
            "mean_ms": ms(self.mean_seconds()),
            "p50_ms": ms(self.quantile(0.5)),
            "p90_ms": ms(self.quantile(0.9)),
            "p99_ms": ms(self.quantile(0.99)),
            "buckets_log2_us": self.buckets.iter().enumerate().filter(|(_, n)| **n > 0)
                .map(|(i, n)| json!([i, n])).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(pairs: &[(usize, u64)]) -> Log2Histogram {
        let mut b = [0u64; TELEMETRY_BUCKETS];
        for (i, n) in pairs {
            b[*i] = *n;
        }
        Log2Histogram::new(b, 0, pairs.iter().map(|p| p.1).sum())
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        // 100 samples in [1024, 2048) µs: the median is half way.
        let h = hist(&[(10, 100)]);
        assert!((h.quantile(0.5).unwrap() - 1536e-6).abs() < 1e-9);
        assert!((h.quantile(1.0).unwrap() - 2048e-6).abs() < 1e-9);
        // 90 fast, 10 slow: p99 is in the slow bucket, p50 in the fast one.
        let h = hist(&[(3, 90), (20, 10)]);
        assert!(h.quantile(0.5).unwrap() < 16e-6);
        assert!(h.quantile(0.99).unwrap() >= 2f64.powi(20) / 1e6);
        assert_eq!(hist(&[]).quantile(0.5), None);
        assert_eq!(h.quantile(1.5), None);
    }

    #[test]
    fn the_open_ended_bucket_answers_with_its_lower_bound() {
        let h = hist(&[(TELEMETRY_BUCKETS - 1, 5)]);
        assert_eq!(h.quantile(0.99), Some(2f64.powi(TELEMETRY_BUCKETS as i32 - 1) / 1e6));
        assert_eq!(h.per_bucket().last(), Some(&(f64::MAX, 5)));
    }

    #[test]
    fn buckets_are_bounded_by_doubling_microseconds() {
        let b = hist(&[(0, 1), (2, 3), (5, 6)]).per_bucket();
        assert_eq!(b.len(), TELEMETRY_BUCKETS);
        assert_eq!(b[0], (2e-6, 1));
        assert_eq!(b[2], (8e-6, 3));
        assert_eq!(b[5], (64e-6, 6));
        assert_eq!(b.iter().map(|(_, n)| n).sum::<u64>(), 10);
    }
}

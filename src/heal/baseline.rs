//! The baseline detector: for routes without a declared threshold, a hop
//! is anomalous when its recent loss or RTT departs from its own history.
//! Plain statistics, as production alerting uses: the median and the
//! median absolute deviation (MAD) of the long window are the baseline;
//! the short window's median must lie beyond it by `K` robust deviations
//! (and a minimum width, so a flat series does not alarm on noise), and a
//! second view must agree — the short window's EWMA for RTT, the window
//! before for loss — like short and long burn-rate windows. Too few samples in either window is
//! no data, and no data is no finding.
//!
//! Findings become proposals for review only: dynamic thresholds are
//! expected to be noisy; declared ones are what automation acts on.

use std::time::Duration;

use super::health::HopHealth;

/// Robust deviations beyond the median that count as anomalous.
pub const K: f64 = 5.0;
/// The long window is this many short windows.
pub const LONG_FACTOR: u32 = 30;
/// RTT changes below this are never anomalous (ms).
const MIN_RTT_WIDTH_MS: f64 = 1.0;
/// Loss changes up to this are never anomalous: at 0.5 % random loss, a
/// window of 10 probes loses 3 once in ~8,000 windows.
const MIN_LOSS_WIDTH: f64 = 0.2;
/// Samples the long window needs before it is a baseline.
const MIN_LONG_FACTOR: usize = 6;

#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub signal: &'static str,
    pub recent: f64,
    pub baseline: f64,
    pub spread: f64,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {:.3} against a baseline of {:.3} (robust spread {:.3})",
            self.signal, self.recent, self.baseline, self.spread
        )
    }
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    Some(if v.len().is_multiple_of(2) { (v[m - 1] + v[m]) / 2.0 } else { v[m] })
}

/// Median and MAD (scaled by 1.4826 to estimate a standard deviation).
fn median_mad(values: &[f64]) -> Option<(f64, f64)> {
    let mut v = values.to_vec();
    let med = median(&mut v)?;
    let mut dev: Vec<f64> = values.iter().map(|x| (x - med).abs()).collect();
    Some((med, 1.4826 * median(&mut dev)?))
}

fn ewma(values: &[f64], alpha: f64) -> Option<f64> {
    let mut it = values.iter();
    let first = *it.next()?;
    Some(it.fold(first, |acc, x| alpha * x + (1.0 - alpha) * acc))
}

/// Loss per short-window-sized bucket of the long window, oldest first.
fn loss_buckets(h: &HopHealth, now: Duration, short: Duration) -> Vec<f64> {
    (1..=LONG_FACTOR)
        .rev()
        .filter_map(|i| {
            let end = now.checked_sub(short * (i - 1))?;
            let (mut n, mut lost) = (0usize, 0usize);
            for s in h.samples(end, short) {
                n += 1;
                lost += s.is_none() as usize;
            }
            (n > 0).then(|| lost as f64 / n as f64)
        })
        .collect()
}

/// A hop's own history: median and robust spread of RTT and of loss per
/// window, over the long window. Costly (sorts a few hundred samples), so
/// the caller keeps it for a window and checks new samples against it.
#[derive(Debug, Clone, PartialEq)]
pub struct History {
    pub at: Duration,
    rtt: Option<(f64, f64)>,
    loss: Option<(f64, f64)>,
}

pub fn history(h: &HopHealth, now: Duration, short: Duration, min_samples: usize) -> History {
    let long = short * LONG_FACTOR;
    // RTT: answered probes only, before the short window.
    let rtt: Vec<f64> =
        h.samples(now.saturating_sub(short), long - short).flatten().map(|d| d.as_secs_f64() * 1e3).collect();
    let rtt = (rtt.len() >= min_samples * MIN_LONG_FACTOR).then(|| median_mad(&rtt)).flatten();
    let buckets = loss_buckets(h, now, short);
    // The last two windows are what is judged, not history.
    let loss = (buckets.len() >= MIN_LONG_FACTOR).then(|| median_mad(&buckets[..buckets.len() - 2])).flatten();
    History { at: now, rtt, loss }
}

/// Whether `h`'s recent samples depart from `hist`.
pub fn check(h: &HopHealth, now: Duration, short: Duration, min_samples: usize, hist: &History) -> Option<Finding> {
    let rtt_short: Vec<f64> = h.samples(now, short).flatten().map(|d| d.as_secs_f64() * 1e3).collect();
    if let Some((base, spread)) = hist.rtt
        && rtt_short.len() >= min_samples
        && let (Some(recent), Some(smooth)) = (median(&mut rtt_short.clone()), ewma(&rtt_short, 0.3))
    {
        let limit = base + (K * spread).max(MIN_RTT_WIDTH_MS);
        if recent > limit && smooth > limit {
            return Some(Finding { signal: "probe RTT (ms)", recent, baseline: base, spread });
        }
    }
    let (base, spread) = hist.loss?;
    if h.samples(now, short).count() < min_samples {
        return None;
    }
    // The last two windows must both be beyond the history before them.
    let window_loss = |end: Duration| {
        let (mut n, mut lost) = (0usize, 0usize);
        for s in h.samples(end, short) {
            n += 1;
            lost += s.is_none() as usize;
        }
        (n > 0).then(|| lost as f64 / n as f64)
    };
    let (last, before) = (window_loss(now)?, window_loss(now.checked_sub(short)?)?);
    let limit = base + (K * spread).max(MIN_LOSS_WIDTH);
    (last > limit && before > limit).then_some(Finding { signal: "probe loss", recent: last, baseline: base, spread })
}

/// Whether `h` departs from its own history at `now` ([`history`] and
/// [`check`] in one go).
pub fn assess(h: &HopHealth, now: Duration, short: Duration, min_samples: usize) -> Option<Finding> {
    check(h, now, short, min_samples, &history(h, now, short, min_samples))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const S: Duration = Duration::from_secs(1);

    /// A deterministic jittery RTT: 2 ms ± 0.3 ms.
    fn rtt(i: u32) -> Duration {
        MS * 2 + Duration::from_micros(((i * 7919) % 600) as u64) - Duration::from_micros(300)
    }

    #[test]
    fn clean_jittery_series_never_alarm() {
        let mut h = HopHealth::default();
        for i in 1..=3600 {
            h.record_probe(S * i, Some(rtt(i)));
            assert_eq!(assess(&h, S * i, S * 10, 5), None, "at {i}");
        }
    }

    #[test]
    fn a_latency_step_and_a_loss_burst_are_found_and_too_little_data_is_not() {
        let mut h = HopHealth::default();
        for i in 1..=400 {
            h.record_probe(S * i, Some(rtt(i)));
        }
        for i in 401..=420 {
            h.record_probe(S * i, Some(MS * 20));
        }
        let f = assess(&h, S * 420, S * 10, 5).expect("a 10x RTT step");
        assert_eq!(f.signal, "probe RTT (ms)");
        let mut h = HopHealth::default();
        for i in 1..=400 {
            h.record_probe(S * i, (i <= 380 || i % 2 == 0).then(|| rtt(i)));
        }
        assert_eq!(assess(&h, S * 400, S * 10, 5).map(|f| f.signal), Some("probe loss"));
        let mut young = HopHealth::default();
        for i in 1..=20 {
            young.record_probe(S * i, (i < 10).then(|| rtt(i)));
        }
        assert_eq!(assess(&young, S * 20, S * 10, 5), None, "no history is no baseline");
    }
}

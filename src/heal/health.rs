//! The health of one next hop, from what the prober and rtnetlink report:
//! probe results in a sliding window (loss ratio, RTT percentiles),
//! consecutive misses, link and neighbour state. Pure and bounded: the
//! caller passes the time, and the window keeps at most
//! [`MAX_SAMPLES`] results.

use std::collections::VecDeque;
use std::time::Duration;

/// Most probe results one hop keeps (an hour at one a second).
pub const MAX_SAMPLES: usize = 3600;

/// One probe's result at a time (time since an arbitrary origin).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Probe {
    at: Duration,
    /// The round-trip time, None for a probe that timed out.
    rtt: Option<Duration>,
}

/// Why a hop is down at once, without waiting for a rule's `for`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HardFailure {
    LinkDown,
    NeighborUnreachable,
    /// This many probes in a row went unanswered.
    Misses(u32),
}

impl std::fmt::Display for HardFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HardFailure::LinkDown => write!(f, "link down"),
            HardFailure::NeighborUnreachable => write!(f, "neighbour unreachable"),
            HardFailure::Misses(n) => write!(f, "{n} probes in a row unanswered"),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct HopHealth {
    probes: VecDeque<Probe>,
    consecutive_misses: u32,
    /// Answered probes ever (a switch is verified by new answers).
    answered: u64,
    /// Smoothed RTT (RFC 6298's 1/8 gain), None before the first answer.
    srtt: Option<Duration>,
    /// None until rtnetlink said (no data is not a fault).
    link_up: Option<bool>,
    neighbor_reachable: Option<bool>,
}

impl HopHealth {
    pub fn record_probe(&mut self, at: Duration, rtt: Option<Duration>) {
        if self.probes.len() == MAX_SAMPLES {
            self.probes.pop_front();
        }
        self.probes.push_back(Probe { at, rtt });
        self.consecutive_misses = if rtt.is_some() { 0 } else { self.consecutive_misses.saturating_add(1) };
        self.answered += rtt.is_some() as u64;
        if let Some(r) = rtt {
            self.srtt = Some(match self.srtt {
                None => r,
                Some(s) => s.saturating_sub(s / 8) + r / 8,
            });
        }
    }

    pub fn smoothed_rtt(&self) -> Option<Duration> {
        self.srtt
    }

    pub fn link_up(&self) -> Option<bool> {
        self.link_up
    }

    pub fn neighbor_reachable(&self) -> Option<bool> {
        self.neighbor_reachable
    }

    pub fn answers(&self) -> u64 {
        self.answered
    }

    pub fn consecutive_misses(&self) -> u32 {
        self.consecutive_misses
    }

    /// Whether the neighbour entry is usable (Some(true)), FAILED
    /// (Some(false)) or unknown (None: resolving, deleted, never seen).
    pub fn set_neighbor_state(&mut self, reachable: Option<bool>) {
        self.neighbor_reachable = reachable;
    }

    pub fn set_link(&mut self, up: bool) {
        self.link_up = Some(up);
    }

    pub fn set_neighbor(&mut self, reachable: bool) {
        self.neighbor_reachable = Some(reachable);
    }

    /// The probes within `window` before `now`.
    fn recent(&self, now: Duration, window: Duration) -> impl Iterator<Item = &Probe> {
        let from = now.saturating_sub(window);
        // Probes are recorded in time order: find the window by bisection,
        // not by walking an hour of history at every evaluation.
        let start = self.probes.partition_point(|p| p.at <= from);
        let end = self.probes.partition_point(|p| p.at <= now);
        self.probes.range(start..end.max(start))
    }

    /// The results within `window` before `now`, oldest first: the RTT, or
    /// None for a lost probe.
    pub fn samples(&self, now: Duration, window: Duration) -> impl Iterator<Item = Option<Duration>> + '_ {
        self.recent(now, window).map(|p| p.rtt)
    }

    /// Lost probes / probes sent within `window`; None with fewer than
    /// `min_samples` probes (too little data to judge).
    pub fn loss(&self, now: Duration, window: Duration, min_samples: usize) -> Option<f64> {
        let (mut sent, mut lost) = (0usize, 0usize);
        for p in self.recent(now, window) {
            sent += 1;
            lost += p.rtt.is_none() as usize;
        }
        (sent >= min_samples.max(1)).then(|| lost as f64 / sent as f64)
    }

    /// The `q`-quantile (0..=1) of answered probes' RTT within `window`, in
    /// milliseconds; None with fewer than `min_samples` answers.
    pub fn rtt_quantile_ms(&self, now: Duration, window: Duration, q: f64, min_samples: usize) -> Option<f64> {
        let [v] = self.rtt_quantiles_ms(now, window, [q], min_samples);
        v
    }

    /// Several quantiles at once (one sort): what [`HopHealth::rtt_quantile_ms`]
    /// gives for each of `qs`.
    pub fn rtt_quantiles_ms<const N: usize>(
        &self,
        now: Duration,
        window: Duration,
        qs: [f64; N],
        min_samples: usize,
    ) -> [Option<f64>; N] {
        let mut rtts: Vec<Duration> = self.recent(now, window).filter_map(|p| p.rtt).collect();
        if rtts.len() < min_samples.max(1) {
            return [None; N];
        }
        rtts.sort_unstable();
        qs.map(|q| {
            let i = ((rtts.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
            Some(rtts[i].as_secs_f64() * 1e3)
        })
    }

    /// A failure that needs no `for`: the link is down, the neighbour is
    /// unreachable, or `down_after` probes in a row went unanswered.
    pub fn hard_failure(&self, down_after: u32) -> Option<HardFailure> {
        if self.link_up == Some(false) {
            Some(HardFailure::LinkDown)
        } else if self.neighbor_reachable == Some(false) {
            Some(HardFailure::NeighborUnreachable)
        } else if down_after > 0 && self.consecutive_misses >= down_after {
            Some(HardFailure::Misses(self.consecutive_misses))
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn loss_is_judged_over_the_window_and_only_with_enough_samples() {
        let mut h = HopHealth::default();
        for i in 1..=10u32 {
            h.record_probe(S * i, (i % 5 != 0).then_some(Duration::from_millis(2)));
        }
        assert_eq!(h.loss(S * 10, S * 10, 5), Some(0.2));
        assert_eq!(h.loss(S * 10, S * 3, 5), None, "three probes are too few");
        assert_eq!(h.loss(S * 10, S * 3, 3), Some(1.0 / 3.0));
        assert_eq!(h.rtt_quantile_ms(S * 10, S * 10, 0.99, 5), Some(2.0));
    }

    #[test]
    fn hard_failures_come_from_misses_in_a_row_link_and_neighbour_state() {
        let mut h = HopHealth::default();
        for i in 1..=3 {
            h.record_probe(S * i, None);
        }
        assert_eq!(h.hard_failure(3), Some(HardFailure::Misses(3)));
        h.record_probe(S * 4, Some(Duration::from_millis(1)));
        assert_eq!(h.hard_failure(3), None, "one answer resets the count");
        h.set_neighbor(false);
        assert_eq!(h.hard_failure(3), Some(HardFailure::NeighborUnreachable));
        h.set_link(false);
        assert_eq!(h.hard_failure(3), Some(HardFailure::LinkDown));
    }

    #[test]
    fn the_window_is_bounded() {
        let mut h = HopHealth::default();
        for i in 0..(MAX_SAMPLES as u32 * 2) {
            h.record_probe(S * i, None);
        }
        assert_eq!(h.probes.len(), MAX_SAMPLES);
    }
}

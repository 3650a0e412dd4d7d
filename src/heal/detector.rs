//! The decision for one route with fallback hops: stay, switch to a
//! fallback, go back to the primary, or lock on the fallback and ask a
//! person. Pure: the caller passes the time and the hops' health; the
//! decision carries its evidence.
//!
//! - A hard failure of the primary (link down, neighbour unreachable,
//!   `down-after` probes in a row unanswered) switches at once; a soft one
//!   (the rule's metric above its threshold) only once it held for the
//!   rule's `for` — every evaluation in between must agree (Prometheus's
//!   `for`).
//! - No data is not a fault: with too few samples nothing starts, advances
//!   or ends a timer.
//! - The target must be healthy itself (no hard failure, its metric known
//!   and under the threshold).
//! - Back to the primary once `recover` held for its `for`, times a hold
//!   that doubles with every revert (up to [`MAX_HOLD_FACTOR`]): fast to
//!   safety, slow back (HPA's stabilisation windows).
//! - [`FLAP_CYCLES`] switch-and-revert cycles within [`FLAP_WINDOW`] lock the
//!   route on its fallback: a person decides what happens next.

use std::collections::VecDeque;
use std::time::Duration;

use super::health::HopHealth;

/// Revert holds double up to this factor.
pub const MAX_HOLD_FACTOR: u32 = 8;
/// Cycles within [`FLAP_WINDOW`] that lock a route.
pub const FLAP_CYCLES: usize = 3;
pub const FLAP_WINDOW: Duration = Duration::from_secs(30 * 60);

/// What a rule watches on a hop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Metric {
    /// Probe loss ratio (0..=1).
    Loss,
    /// p99 of probe RTT, milliseconds.
    LatencyP99Ms,
    /// What the route loses (0..=1): probe loss, or — while the route runs
    /// on its primary and carries traffic — the share of its packets the
    /// datapath failed to deliver (failed redirects), whichever is higher.
    /// An idle path is judged by its probes alone.
    DropRate,
}

/// A route's rule, with the defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub metric: Metric,
    /// Switch when the metric is above this for `trigger_for`.
    pub above: f64,
    pub trigger_for: Duration,
    /// Go back when the primary's metric is below this for `recover_for`.
    pub below: f64,
    pub recover_for: Duration,
    /// Consecutive unanswered probes that make a hard failure.
    pub down_after: u32,
    /// The window metrics are computed over, and the samples they need.
    pub window: Duration,
    pub min_samples: usize,
}

/// Where the route's traffic goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Active {
    Primary,
    /// The index into the route's fallback hops.
    Fallback(usize),
}

/// Why a decision was made: the values and the window, for people.
#[derive(Debug, Clone, PartialEq)]
pub struct Evidence {
    pub reason: String,
    /// The metric's value on the primary, when known.
    pub value: Option<f64>,
    /// How long the condition held.
    pub held: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Stay,
    Switch {
        to: usize,
        evidence: Evidence,
    },
    Revert {
        evidence: Evidence,
    },
    /// Flapping: stay on the fallback, no more automatic switches.
    Lock {
        evidence: Evidence,
    },
}

/// A route's flap history, as saved in the state directory (times are
/// milliseconds on the detector's clock: the agent uses Unix time).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FlapMemory {
    pub reverts: u32,
    pub cycles: Vec<u64>,
}

#[derive(Debug, Clone)]
pub struct RouteDetector {
    pub rule: Rule,
    pub active: Active,
    pub locked: bool,
    /// Since when the primary has been above the threshold (soft breach).
    breach_since: Option<Duration>,
    /// Since when the primary has been below the recover threshold.
    recover_since: Option<Duration>,
    /// Reverts so far, for the doubling hold.
    reverts: u32,
    /// The share of the route's packets the datapath failed to deliver
    /// over the rule's window, None without enough traffic (set by the
    /// controller before each evaluation; [`Metric::DropRate`] only).
    pub delivery_failures: Option<f64>,
    /// When each switch-and-revert cycle ended.
    cycles: VecDeque<Duration>,
}

impl RouteDetector {
    pub fn new(rule: Rule) -> Self {
        RouteDetector {
            rule,
            active: Active::Primary,
            locked: false,
            breach_since: None,
            recover_since: None,
            reverts: 0,
            cycles: VecDeque::new(),
            delivery_failures: None,
        }
    }

    /// The rule's metric on `hop` now (None: too little data).
    pub fn value(&self, hop: &HopHealth, now: Duration) -> Option<f64> {
        let r = &self.rule;
        match r.metric {
            Metric::Loss | Metric::DropRate => hop.loss(now, r.window, r.min_samples),
            Metric::LatencyP99Ms => hop.rtt_quantile_ms(now, r.window, 0.99, r.min_samples),
        }
    }

    /// The primary's value while it carries the route's traffic: the
    /// datapath's failed deliveries count too ([`Metric::DropRate`]).
    fn primary_value(&self, primary: &HopHealth, now: Duration) -> Option<f64> {
        let probed = self.value(primary, now);
        match (self.rule.metric, self.active, self.delivery_failures) {
            (Metric::DropRate, Active::Primary, Some(d)) => Some(probed.map_or(d, |p| p.max(d))),
            _ => probed,
        }
    }

    /// A hop fit to take traffic: no hard failure, its metric known and
    /// under the threshold.
    pub fn healthy(&self, hop: &HopHealth, now: Duration) -> bool {
        hop.hard_failure(self.rule.down_after).is_none() && self.value(hop, now).is_some_and(|v| v <= self.rule.above)
    }

    /// Whether `primary` is failing or above the threshold right now (for
    /// the node-wide count that tells a local fault from a path's).
    pub fn degraded(&self, primary: &HopHealth, now: Duration) -> bool {
        primary.hard_failure(self.rule.down_after).is_some()
            || self.primary_value(primary, now).is_some_and(|v| v > self.rule.above)
    }

    /// Whether a timer runs (a breach or a recovery being held).
    pub fn timing(&self) -> bool {
        self.breach_since.is_some() || self.recover_since.is_some()
    }

    /// When a running timer ends (a breach held `for`, a recovery held its
    /// hold): the route must be looked at then, news or not.
    pub fn deadline(&self) -> Option<Duration> {
        let breach = self.breach_since.map(|t| t + self.rule.trigger_for);
        let recover = self.recover_since.map(|t| t + self.hold());
        breach.into_iter().chain(recover).min()
    }

    /// What must survive a restart: reverts (the doubling hold), the end
    /// of each recent cycle, and the lock.
    pub fn memory(&self) -> FlapMemory {
        FlapMemory { reverts: self.reverts, cycles: self.cycles.iter().map(|d| d.as_millis() as u64).collect() }
    }

    pub fn restore(&mut self, m: &FlapMemory) {
        self.reverts = m.reverts.min(64);
        self.cycles = m.cycles.iter().rev().take(FLAP_CYCLES * 4).rev().map(|ms| Duration::from_millis(*ms)).collect();
    }

    /// A person decided: automatic switching resumes, the flap history
    /// starts over.
    pub fn unlock(&mut self) {
        self.locked = false;
        self.reverts = 0;
        self.cycles.clear();
        self.breach_since = None;
        self.recover_since = None;
    }

    /// The route runs where the overlay says (an approval or a revert by a
    /// person moved it): timers of the other state are dropped.
    pub fn set_active(&mut self, active: Active) {
        if self.active != active {
            self.active = active;
            self.breach_since = None;
            self.recover_since = None;
        }
    }

    /// The hold before going back: `recover_for`, doubled per revert so far.
    pub fn hold(&self) -> Duration {
        self.rule.recover_for * (1u32 << self.reverts.min(MAX_HOLD_FACTOR.trailing_zeros()))
    }

    pub fn evaluate(&mut self, now: Duration, primary: &HopHealth, fallbacks: &[&HopHealth]) -> Decision {
        if self.locked {
            return Decision::Stay;
        }
        match self.active {
            Active::Primary => self.while_on_primary(now, primary, fallbacks),
            Active::Fallback(_) => self.while_on_fallback(now, primary),
        }
    }

    fn while_on_primary(&mut self, now: Duration, primary: &HopHealth, fallbacks: &[&HopHealth]) -> Decision {
        let value = self.primary_value(primary, now);
        let hard = primary.hard_failure(self.rule.down_after);
        let evidence = match (&hard, value) {
            (Some(h), _) => Some(Evidence { reason: format!("primary: {h}"), value, held: Duration::ZERO }),
            // No data: hold the timer as it is.
            (None, None) => None,
            (None, Some(v)) if v > self.rule.above => {
                let since = *self.breach_since.get_or_insert(now);
                let held = now.saturating_sub(since);
                // Say when the datapath, not the probes, saw it.
                let datapath = match (self.rule.metric, self.delivery_failures) {
                    (Metric::DropRate, Some(d)) if self.value(primary, now).is_none_or(|p| d > p) => {
                        format!(" (the datapath failed to deliver {:.0} % of the route's packets)", d * 100.0)
                    }
                    _ => String::new(),
                };
                (held >= self.rule.trigger_for).then(|| Evidence {
                    reason: format!("primary above {} for {:?}{datapath}", self.rule.above, held),
                    value,
                    held,
                })
            }
            (None, Some(_)) => {
                self.breach_since = None;
                None
            }
        };
        let Some(evidence) = evidence else { return Decision::Stay };
        match fallbacks.iter().position(|f| self.healthy(f, now)) {
            Some(to) => {
                self.active = Active::Fallback(to);
                self.breach_since = None;
                self.recover_since = None;
                Decision::Switch { to, evidence }
            }
            // Nowhere better to go: stay (and say so at the next call).
            None => Decision::Stay,
        }
    }

    fn while_on_fallback(&mut self, now: Duration, primary: &HopHealth) -> Decision {
        let value = self.value(primary, now);
        match (primary.hard_failure(self.rule.down_after), value) {
            (Some(_), _) => {
                self.recover_since = None;
                return Decision::Stay;
            }
            (None, None) => return Decision::Stay,
            (None, Some(v)) if v >= self.rule.below => {
                self.recover_since = None;
                return Decision::Stay;
            }
            (None, Some(_)) => {}
        }
        let since = *self.recover_since.get_or_insert(now);
        let held = now.saturating_sub(since);
        if held < self.hold() {
            return Decision::Stay;
        }
        let was = self.active;
        self.active = Active::Primary;
        self.recover_since = None;
        self.reverts += 1;
        self.cycles.push_back(now);
        while self.cycles.front().is_some_and(|t| now.saturating_sub(*t) > FLAP_WINDOW) {
            self.cycles.pop_front();
        }
        let evidence = Evidence { reason: format!("primary below {} for {:?}", self.rule.below, held), value, held };
        if self.cycles.len() >= FLAP_CYCLES {
            // Three round trips in half an hour: stay on the fallback.
            self.active = was;
            self.locked = true;
            let reason =
                format!("{} switch-and-revert cycles within {:?}: locked on the fallback", FLAP_CYCLES, FLAP_WINDOW);
            return Decision::Lock { evidence: Evidence { reason, ..evidence } };
        }
        Decision::Revert { evidence }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);
    const RTT: Option<Duration> = Some(Duration::from_millis(2));

    fn rule() -> Rule {
        Rule {
            metric: Metric::Loss,
            above: 0.2,
            trigger_for: S * 10,
            below: 0.05,
            recover_for: S * 20,
            down_after: 3,
            window: S * 10,
            min_samples: 5,
        }
    }

    /// Drives one detector second by second: the primary loses a probe when
    /// `lose(t)` says so; one healthy fallback. Returns the decisions that
    /// were not `Stay`, with their time.
    fn run(seconds: u32, lose: impl Fn(u32) -> bool, d: &mut RouteDetector) -> Vec<(u32, Decision)> {
        let (mut primary, mut fallback) = (HopHealth::default(), HopHealth::default());
        let mut out = Vec::new();
        for t in 1..=seconds {
            primary.record_probe(S * t, if lose(t) { None } else { RTT });
            fallback.record_probe(S * t, RTT);
            let dec = d.evaluate(S * t, &primary, &[&fallback]);
            if dec != Decision::Stay {
                out.push((t, dec));
            }
        }
        out
    }

    #[test]
    fn clean_traffic_never_switches() {
        let mut d = RouteDetector::new(rule());
        assert!(run(3600, |_| false, &mut d).is_empty());
    }

    #[test]
    fn soft_loss_switches_only_after_for_and_reverts_after_recovery() {
        let mut d = RouteDetector::new(rule());
        // Every other probe lost from t=100 to t=200 (50 % loss).
        let got = run(300, |t| (100..200).contains(&t) && t % 2 == 0, &mut d);
        let (t_switch, _) = &got[0];
        assert!(matches!(got[0].1, Decision::Switch { to: 0, .. }), "{got:?}");
        // The window needs 5 samples above 20 % first, then `for` (10 s).
        assert!((110..=120).contains(t_switch), "switched at {t_switch}");
        let (t_back, dec) = &got[1];
        assert!(matches!(dec, Decision::Revert { .. }), "{got:?}");
        assert!(*t_back >= 200 + 20, "not before recover.for: {t_back}");
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn a_hard_failure_switches_at_once() {
        let mut d = RouteDetector::new(rule());
        let got = run(60, |t| t > 30, &mut d);
        assert_eq!(got[0].0, 33, "three misses in a row: {got:?}");
        assert!(matches!(&got[0].1, Decision::Switch { evidence, .. } if evidence.reason.contains("3 probes")));
    }

    #[test]
    fn no_data_holds() {
        let mut d = RouteDetector::new(rule());
        let (primary, fallback) = (HopHealth::default(), HopHealth::default());
        for t in 1..100 {
            assert_eq!(d.evaluate(S * t, &primary, &[&fallback]), Decision::Stay);
        }
    }

    #[test]
    fn an_unhealthy_fallback_is_not_a_target() {
        let mut d = RouteDetector::new(rule());
        let (mut primary, mut fallback) = (HopHealth::default(), HopHealth::default());
        for t in 1..=60 {
            primary.record_probe(S * t, None);
            fallback.record_probe(S * t, None);
            assert_eq!(d.evaluate(S * t, &primary, &[&fallback]), Decision::Stay);
        }
    }

    #[test]
    fn the_flap_history_survives_a_restart() {
        let mut d = RouteDetector::new(rule());
        run(500, |t| t % 230 < 30, &mut d); // two cycles done
        let saved: FlapMemory = serde_json::from_str(&serde_json::to_string(&d.memory()).unwrap()).unwrap();
        let mut restarted = RouteDetector::new(rule());
        restarted.restore(&saved);
        assert_eq!(restarted.hold(), d.hold(), "the doubled hold is kept");
        assert_eq!(restarted.memory(), d.memory());
    }

    #[test]
    fn flapping_doubles_the_hold_and_locks_after_three_cycles() {
        let mut d = RouteDetector::new(rule());
        // Loss on for 30 s, off for 200 s, repeatedly.
        let got = run(1500, |t| t % 230 < 30, &mut d);
        let kinds: Vec<&str> = got
            .iter()
            .map(|(_, d)| match d {
                Decision::Switch { .. } => "switch",
                Decision::Revert { .. } => "revert",
                Decision::Lock { .. } => "lock",
                Decision::Stay => "stay",
            })
            .collect();
        assert_eq!(kinds, ["switch", "revert", "switch", "revert", "switch", "lock"], "{got:?}");
        assert!(d.locked);
        assert_eq!(d.active, Active::Fallback(0));
        // The holds doubled: 20 s, then 40 s, then 80 s after each clear.
        let reverts: Vec<u32> =
            got.iter().filter(|(_, d)| !matches!(d, Decision::Switch { .. })).map(|(t, _)| *t).collect();
        let clears = [30, 260, 490];
        let waits: Vec<u32> = reverts.iter().zip(clears).map(|(r, c)| r - c).collect();
        assert!(waits[0] >= 20 && waits[1] >= 40 && waits[2] >= 80, "{waits:?}");
    }
}

//! The heal loop's decisions for every watched route, pure: given the time,
//! each hop's health and what the proposal store holds, it says which
//! proposals to create (applied at once, or queued for a person) and which
//! applied ones to revert. The agent's [`super::runner`] carries them out.
//!
//! Auto-apply needs all of: the rule says `auto-apply: true`; the change
//! moves the route between its own declared hops (every proposal does);
//! the target hop is healthy (the detector picks only such); the route is
//! not flap-locked; and at most a quarter of the watched routes (or one)
//! degrade at once — more looks like a fault of this node, not of a path.
//! After an automatic switch the target must answer within
//! [`VERIFY_INTERVALS`] probe intervals, or the route goes back.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use super::detector::{Active, Decision, Evidence, FlapMemory, Metric, RouteDetector, Rule};
use super::health::HopHealth;
use super::proposal::{self, Action, HopFigures, HopId, Proposal, Status, Transition};
use crate::spec::{
    DEFAULT_MIN_SAMPLES, DEFAULT_PROBE_INTERVAL, FallbackMetric, FallbackRule, HealthSpec, LoadedSpec, RouteSpec,
};

/// How long a rejection silences a route whose primary stays degraded.
pub const SILENCE_AFTER_REJECT: Duration = Duration::from_secs(30 * 60);

/// Probe intervals within which a switched-to hop must answer.
pub const VERIFY_INTERVALS: u32 = 3;
/// Default `probe-timeout`: half the interval.
const DEFAULT_DOWN_AFTER: u32 = 3;
/// Default `window`: this many probe intervals.
const DEFAULT_WINDOW_INTERVALS: u32 = 10;

/// How one route's hops are probed and judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeSettings {
    pub interval: Duration,
    pub timeout: Duration,
    pub down_after: u32,
    pub window: Duration,
    pub min_samples: usize,
}

impl ProbeSettings {
    /// The route's own settings over the global ones over the defaults.
    pub fn resolve(route: Option<&HealthSpec>, global: Option<&HealthSpec>) -> ProbeSettings {
        let dur = |f: fn(&HealthSpec) -> Option<&crate::spec::DurationSpec>| {
            route.and_then(f).or_else(|| global.and_then(f)).and_then(|d| d.to_duration())
        };
        let interval = dur(|h| h.probe_interval.as_ref()).unwrap_or(DEFAULT_PROBE_INTERVAL);
        ProbeSettings {
            interval,
            timeout: dur(|h| h.probe_timeout.as_ref()).unwrap_or(interval / 2),
            down_after: route
                .and_then(|h| h.down_after)
                .or(global.and_then(|h| h.down_after))
                .unwrap_or(DEFAULT_DOWN_AFTER),
            window: dur(|h| h.window.as_ref()).unwrap_or(interval * DEFAULT_WINDOW_INTERVALS),
            min_samples: route
                .and_then(|h| h.min_samples)
                .or(global.and_then(|h| h.min_samples))
                .unwrap_or(DEFAULT_MIN_SAMPLES) as usize,
        }
    }
}

/// A declared `fallback` rule bound to its route.
#[derive(Debug, Clone, PartialEq)]
pub struct BoundRule {
    pub name: String,
    pub metric: FallbackMetric,
    pub rule: Rule,
    pub auto_apply: bool,
}

/// A route with fallback hops, as the spec file declares it.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchedRoute {
    /// Its index in the file's `routes` (what patches point at).
    pub index: usize,
    pub route: RouteSpec,
    pub settings: ProbeSettings,
    /// None: no declared rule; hard failures are proposed for review only.
    pub rule: Option<BoundRule>,
}

impl WatchedRoute {
    pub fn primary(&self) -> HopId {
        proposal::hop_id(&self.route.via)
    }

    pub fn fallbacks(&self) -> Vec<HopId> {
        self.route.fallback.iter().map(proposal::hop_id).collect()
    }
}

fn metric_name(m: FallbackMetric) -> &'static str {
    match m {
        FallbackMetric::DropRate => "drop-rate",
        FallbackMetric::ProbeLoss => "probe-loss",
        FallbackMetric::LatencyP99Ms => "latency-p99-ms",
        FallbackMetric::LinkDown => "link-down",
        FallbackMetric::NeighborUnreachable => "neighbor-unreachable",
    }
}

/// A rule's thresholds with the defaults filled in. `link-down` and
/// `neighbor-unreachable` act on hard failures only (a loss above 1 never
/// happens).
fn bind_rule(f: &FallbackRule, s: &ProbeSettings) -> Rule {
    let (metric, above) = match f.when.metric {
        FallbackMetric::DropRate => (Metric::DropRate, f.when.above.unwrap_or(1.0)),
        FallbackMetric::ProbeLoss => (Metric::Loss, f.when.above.unwrap_or(1.0)),
        FallbackMetric::LatencyP99Ms => (Metric::LatencyP99Ms, f.when.above.unwrap_or(f64::INFINITY)),
        FallbackMetric::LinkDown | FallbackMetric::NeighborUnreachable => (Metric::Loss, 1.0),
    };
    let default_below = match metric {
        Metric::Loss | Metric::DropRate if above >= 1.0 => 0.05,
        _ => above / 2.0,
    };
    let recover = f.recover.as_ref();
    Rule {
        metric,
        above,
        trigger_for: f.when.for_duration.as_ref().and_then(|d| d.to_duration()).unwrap_or(Duration::ZERO),
        below: recover.and_then(|r| r.below).unwrap_or(default_below),
        recover_for: recover.and_then(|r| r.for_duration.as_ref()).and_then(|d| d.to_duration()).unwrap_or(s.window),
        down_after: s.down_after,
        window: s.window,
        min_samples: s.min_samples,
    }
}

/// The routes the heal loop watches: every route with `fallback` hops, as
/// the file declares them, with its rule (the first naming it) and probe
/// settings.
pub fn watched_routes(loaded: &LoadedSpec) -> Vec<WatchedRoute> {
    let spec = &loaded.spec;
    let same_prefix = |a: &str, b: &str| {
        a == b || matches!((a.parse::<crate::net::Cidr>(), b.parse::<crate::net::Cidr>()), (Ok(x), Ok(y)) if x == y)
    };
    loaded
        .file_routes()
        .iter()
        .enumerate()
        .filter(|(_, r)| !r.fallback.is_empty())
        .map(|(index, r)| {
            let settings = ProbeSettings::resolve(r.health.as_ref(), spec.health.as_ref());
            let rule = spec.fallback.iter().find(|f| same_prefix(&f.route, &r.prefix)).map(|f| BoundRule {
                name: f.name.clone(),
                metric: f.when.metric,
                rule: bind_rule(f, &settings),
                auto_apply: f.auto_apply,
            });
            WatchedRoute { index, route: r.clone(), settings, rule }
        })
        .collect()
}

/// A route without a declared rule: hard failures only, proposed for review.
fn review_only_rule(s: &ProbeSettings) -> Rule {
    Rule {
        metric: Metric::Loss,
        above: 1.0,
        trigger_for: Duration::ZERO,
        below: 0.05,
        recover_for: s.window,
        down_after: s.down_after,
        window: s.window,
        min_samples: s.min_samples,
    }
}

/// Where the controller reads a hop's health.
pub trait Healths {
    fn health(&self, hop: &HopId) -> Option<&HopHealth>;

    /// The health of `hop`, the one at `at` in [`Controller::hops`]' order:
    /// healths kept in that order answer without a lookup.
    fn health_at(&self, at: usize, hop: &HopId) -> Option<&HopHealth> {
        let _ = at;
        self.health(hop)
    }
}

impl Healths for HashMap<HopId, HopHealth> {
    fn health(&self, hop: &HopId) -> Option<&HopHealth> {
        self.get(hop)
    }
}

/// What the store holds for one route.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteView {
    /// The applied proposal (switch or lock) and the fallback it runs on.
    pub applied: Option<(String, usize)>,
    /// A proposal waiting for a person.
    pub pending: bool,
    /// A flap lock, pending or applied.
    pub locked: bool,
    /// The last proposal a person rejected (a stale one refused is not a
    /// "no": a fresh proposal against the edited spec may follow).
    pub rejected: Option<String>,
}

/// The store's proposals, per route prefix.
pub fn view(proposals: &[Proposal]) -> HashMap<String, RouteView> {
    let mut out: HashMap<String, RouteView> = HashMap::new();
    for p in proposals {
        let v = out.entry(p.route.clone()).or_default();
        let lock = matches!(p.action, Action::Lock { .. });
        match p.status {
            Status::Applied => {
                v.applied = Some((p.id.clone(), p.fallback_index()));
                v.locked |= lock;
            }
            Status::Pending => {
                v.pending = true;
                v.locked |= lock;
            }
            Status::Rejected => v.rejected = Some(p.id.clone()),
            _ => {}
        }
    }
    out
}

/// What the runner does.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Write `proposal` (its status says applied or pending).
    Create(Box<Proposal>),
    /// Take applied proposal `id` out of the overlay.
    Revert { id: String, route: String, reason: String },
}

#[derive(Debug, Clone)]
struct Verify {
    deadline: Duration,
    since: Duration,
    hop: HopId,
    hop_at: usize,
    answers_before: u64,
}

#[derive(Debug, Clone)]
struct RouteState {
    /// The route's prefix.
    key: String,
    watch: WatchedRoute,
    /// The hops' ids, made once (ticks look them up thousands of times),
    /// and their places in [`Controller::hops`].
    primary: HopId,
    fallbacks: Vec<HopId>,
    primary_at: usize,
    fallbacks_at: Vec<usize>,
    detector: RouteDetector,
    verify: Option<Verify>,
    /// No new baseline finding before this (one question per long window).
    baseline_quiet_until: Duration,
    /// The primary's history for the baseline detector, kept a window.
    baseline: Option<super::baseline::History>,
    /// Whether the primary was failing or above its threshold when last
    /// evaluated (counted for the local-fault guard).
    degraded: bool,
    /// The last rejection seen, and whether it still silences the route: a
    /// person said no, so the same condition is not asked about again
    /// until the primary was healthy once (or [`SILENCE_AFTER_REJECT`]).
    rejection_seen: Option<String>,
    silenced_since: Option<Duration>,
    /// The datapath's delivery counters of the route (drop-rate rules),
    /// and the id they are kept under (None: the prefix does not parse).
    delivery: DeliverySeries,
    route_id: Option<u32>,
}

/// Readings of a route's datapath counters: packets forwarded and packets
/// whose redirect failed, totals since the counters were made.
#[derive(Debug, Clone, Default)]
struct DeliverySeries {
    readings: std::collections::VecDeque<(Duration, u64, u64)>,
}

impl DeliverySeries {
    fn record(&mut self, at: Duration, forwarded: u64, failed: u64, keep: Duration) {
        // Counters that went back were made again (the map was replaced):
        // what came before says nothing about the new ones.
        if self.readings.back().is_some_and(|&(_, f, e)| forwarded < f || failed < e) {
            self.readings.clear();
        }
        self.readings.push_back((at, forwarded, failed));
        while self.readings.len() > super::health::MAX_SAMPLES
            || self.readings.front().is_some_and(|&(t, _, _)| at.saturating_sub(t) > keep)
        {
            self.readings.pop_front();
        }
    }

    /// Failed / forwarded over the `window` before `now` (from the last
    /// reading at or before its start, else the oldest); None with fewer
    /// than `min_packets` forwarded (an idle route is no data).
    fn failure_ratio(&self, now: Duration, window: Duration, min_packets: u64) -> Option<f64> {
        let &(_, f1, e1) = self.readings.back()?;
        let from = now.saturating_sub(window);
        let start = self.readings.partition_point(|&(t, _, _)| t <= from).saturating_sub(1);
        let &(_, f0, e0) = self.readings.get(start)?;
        let (forwarded, failed) = (f1 - f0, e1 - e0);
        (forwarded >= min_packets.max(1)).then(|| (failed as f64 / forwarded as f64).min(1.0))
    }
}

/// Why a route runs where it runs, for `status`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RouteReport {
    pub route: String,
    pub active: HopId,
    pub on_fallback: bool,
    pub locked: bool,
    pub rule: Option<String>,
    pub why: String,
}

/// Routes and hops are named by their places in [`Controller::routes`] and
/// [`Controller::hops`] inside a tick: a thousand hops' results a second
/// are too many to look up by strings.
#[derive(Debug, Default)]
pub struct Controller {
    /// Every route, in prefix order.
    routes: Vec<RouteState>,
    /// Every hop the routes name, in [`HopId`] order, with the settings it
    /// is probed with.
    hops: Vec<(HopId, ProbeSettings)>,
    /// Hop place → the routes it serves (and whether as their primary), to
    /// find the routes with news without looking at every route.
    routes_of_hop: Vec<Vec<(usize, bool)>>,
    /// Routes to which a fallback's news matters too
    /// ([`RouteState::watches_fallbacks`]); updated after every evaluation.
    watching_fallbacks: Vec<bool>,
    /// When a route must be evaluated, news or not ([`RouteState::deadline`]).
    deadlines: BTreeMap<usize, Duration>,
    /// Routes whose primary was degraded when last evaluated.
    degraded: usize,
    /// Routes with new datapath readings since the last tick.
    delivery_news: BTreeSet<usize>,
    /// Last decision reason per route, for `status`.
    why: HashMap<String, String>,
}

impl Controller {
    /// Takes the routes of a (new) spec. A route whose hops and rule did
    /// not change keeps its detector (timers, flap history).
    pub fn set_routes(&mut self, routes: Vec<WatchedRoute>, memory: &HashMap<String, FlapMemory>) {
        let mut old: HashMap<String, RouteState> = self.routes.drain(..).map(|s| (s.key.clone(), s)).collect();
        let mut next = BTreeMap::new();
        for w in routes {
            let key = w.route.prefix.clone();
            let rule = w.rule.as_ref().map(|r| r.rule.clone()).unwrap_or_else(|| review_only_rule(&w.settings));
            let state = match old.remove(&key) {
                Some(old) if old.watch == w => old,
                _ => {
                    let mut detector = RouteDetector::new(rule);
                    if let Some(m) = memory.get(&key) {
                        detector.restore(m);
                    }
                    let route_id = w.route.prefix.parse().ok().map(|p| crate::mesh::route_id(&p));
                    RouteState {
                        key: key.clone(),
                        primary: w.primary(),
                        fallbacks: w.fallbacks(),
                        primary_at: 0,
                        fallbacks_at: Vec::new(),
                        watch: w,
                        detector,
                        verify: None,
                        baseline_quiet_until: Duration::ZERO,
                        baseline: None,
                        degraded: false,
                        rejection_seen: None,
                        silenced_since: None,
                        delivery: DeliverySeries::default(),
                        route_id,
                    }
                }
            };
            next.insert(key, state);
        }
        self.routes = next.into_values().collect();
        // Every hop, with the settings of the route that probes it most often.
        let mut hops: BTreeMap<HopId, ProbeSettings> = BTreeMap::new();
        for s in &self.routes {
            for hop in std::iter::once(&s.primary).chain(&s.fallbacks) {
                hops.entry(hop.clone())
                    .and_modify(|cur| {
                        if s.watch.settings.interval < cur.interval {
                            *cur = s.watch.settings;
                        }
                    })
                    .or_insert(s.watch.settings);
            }
        }
        self.hops = hops.into_iter().collect();
        let place =
            |hop: &HopId, hops: &[(HopId, ProbeSettings)]| hops.binary_search_by(|(h, _)| h.cmp(hop)).unwrap_or(0);
        self.routes_of_hop = vec![Vec::new(); self.hops.len()];
        for (r, s) in self.routes.iter_mut().enumerate() {
            s.primary_at = place(&s.primary, &self.hops);
            s.fallbacks_at = s.fallbacks.iter().map(|h| place(h, &self.hops)).collect();
            self.routes_of_hop[s.primary_at].push((r, true));
            for &f in &s.fallbacks_at {
                self.routes_of_hop[f].push((r, false));
            }
        }
        self.watching_fallbacks = vec![false; self.routes.len()];
        self.delivery_news.clear();
        self.deadlines = BTreeMap::new();
        let all: Vec<usize> = (0..self.routes.len()).collect();
        self.note_evaluated(&all, Duration::ZERO);
        self.degraded = self.routes.iter().filter(|s| s.degraded).count();
    }

    /// Every hop to probe, in [`HopId`] order, with the settings of the
    /// route that probes it most often. A hop's place in this list is how
    /// [`Controller::tick`] names it in `changed` and in
    /// [`Healths::health_at`].
    pub fn hops(&self) -> &[(HopId, ProbeSettings)] {
        &self.hops
    }

    /// The routes whose rule reads the datapath's delivery counters
    /// (`drop-rate`): their places, their datapath route ids
    /// ([`crate::mesh::route_id`]), and how often to read them.
    pub fn delivery_routes(&self) -> Vec<(usize, u32, Duration)> {
        self.routes
            .iter()
            .enumerate()
            .filter(|(_, s)| s.detector.rule.metric == Metric::DropRate)
            .filter_map(|(i, s)| Some((i, s.route_id?, s.watch.settings.interval)))
            .collect()
    }

    /// One reading of route `route`'s delivery counters at `now`: totals
    /// of packets forwarded and of packets whose redirect failed.
    pub fn record_delivery(&mut self, now: Duration, route: usize, forwarded: u64, failed: u64) {
        let Some(s) = self.routes.get_mut(route) else { return };
        let keep = s.detector.rule.window * 2;
        s.delivery.record(now, forwarded, failed, keep);
        self.delivery_news.insert(route);
    }

    /// Flap history per route, to save.
    pub fn memory(&self) -> HashMap<String, FlapMemory> {
        self.routes.iter().map(|s| (s.key.clone(), s.detector.memory())).collect()
    }

    pub fn reports(&self, views: &HashMap<String, RouteView>) -> Vec<RouteReport> {
        self.routes
            .iter()
            .map(|s| {
                let k = &s.key;
                let view = views.get(k).cloned().unwrap_or_default();
                let active = match view.applied {
                    Some((_, i)) => s.watch.fallbacks().get(i).cloned().unwrap_or_else(|| s.watch.primary()),
                    None => s.watch.primary(),
                };
                RouteReport {
                    route: k.clone(),
                    active,
                    on_fallback: view.applied.is_some(),
                    locked: view.locked,
                    rule: s.watch.rule.as_ref().map(|r| r.name.clone()),
                    why: self.why.get(k).cloned().unwrap_or_else(|| {
                        if view.applied.is_some() { "overlay".into() } else { "primary healthy".into() }
                    }),
                }
            })
            .collect()
    }

    /// One evaluation at `now` of the routes with news in `changed` (new
    /// probe results, link or neighbour events) and the busy ones, or of
    /// every route when `changed` is None. Metrics only move with new
    /// results, so the runner passes the hops that changed, and a full pass
    /// when a person's decision changed the store.
    ///
    /// A route at rest (on its primary, not degraded, no timer) depends on
    /// its primary alone: a fallback's news is news to it only when busy.
    pub fn tick(
        &mut self,
        now: Duration,
        now_unix_ms: u64,
        health: &dyn Healths,
        views: &HashMap<String, RouteView>,
        changed: Option<&[usize]>,
    ) -> Vec<Command> {
        let empty = HopHealth::default();
        let hop = |at: usize, h: &HopId| health.health_at(at, h).unwrap_or(&empty);
        // The routes with news (a hop of theirs changed, or a deadline
        // passed), or all of them.
        let keys: Vec<usize> = match changed {
            None => (0..self.routes.len()).collect(),
            Some(c) => {
                let mut keys: BTreeSet<usize> =
                    self.deadlines.iter().filter(|(_, d)| **d <= now).map(|(r, _)| *r).collect();
                for &(r, primary) in c.iter().filter_map(|&h| self.routes_of_hop.get(h)).flatten() {
                    if primary || self.watching_fallbacks[r] {
                        keys.insert(r);
                    }
                }
                keys.extend(self.delivery_news.iter().copied());
                keys.into_iter().collect()
            }
        };
        self.delivery_news.clear();
        // Routes without news keep their flag: their health did not move.
        for &r in &keys {
            if let Some(s) = self.routes.get_mut(r) {
                if s.detector.rule.metric == Metric::DropRate {
                    let rule = &s.detector.rule;
                    s.detector.delivery_failures = s.delivery.failure_ratio(now, rule.window, rule.min_samples as u64);
                }
                let was = s.degraded;
                s.degraded = s.detector.degraded(hop(s.primary_at, &s.primary), now);
                if s.degraded != was {
                    self.degraded = if s.degraded { self.degraded + 1 } else { self.degraded.saturating_sub(1) };
                }
            }
        }
        let degraded = self.degraded;
        // A quarter of the routes, or one: more at once is likely this node.
        let watched = self.routes.len();
        let local_fault = degraded > (watched / 4).max(1);
        let mut out = Vec::new();
        for &r in &keys {
            let Some(s) = self.routes.get_mut(r) else { continue };
            let key = &s.key;
            let view = views.get(key).cloned().unwrap_or_default();
            // The store is the truth: a person may have approved, reverted
            // or rejected since the last tick.
            s.detector.set_active(match view.applied {
                Some((_, i)) => Active::Fallback(i),
                None => Active::Primary,
            });
            if s.detector.locked && !view.locked {
                s.detector.unlock();
                self.why.insert(key.clone(), "flap lock lifted by a person".into());
            }
            if view.applied.is_none() {
                s.verify = None;
            }
            let primary = hop(s.primary_at, &s.primary);
            let fallbacks: Vec<&HopHealth> =
                s.fallbacks_at.iter().zip(&s.fallbacks).map(|(&at, h)| hop(at, h)).collect();

            if let (Some(v), Some((id, _))) = (&s.verify, &view.applied) {
                let target = hop(v.hop_at, &v.hop);
                let failed = target.hard_failure(s.watch.settings.down_after);
                if target.answers() > v.answers_before && failed.is_none() {
                    s.verify = None;
                } else if failed.is_some() || now >= v.deadline {
                    let reason = format!(
                        "verification failed: {} did not answer within {:?} of the switch{}",
                        v.hop,
                        now.saturating_sub(v.since),
                        failed.map(|f| format!(" ({f})")).unwrap_or_default()
                    );
                    out.push(Command::Revert { id: id.clone(), route: key.clone(), reason: reason.clone() });
                    self.why.insert(key.clone(), reason);
                    s.verify = None;
                    continue;
                }
            }
            if view.pending && view.applied.is_none() {
                continue; // one question to a person at a time
            }
            if view.rejected.is_some() && view.rejected != s.rejection_seen {
                s.rejection_seen = view.rejected.clone();
                s.silenced_since = s.rejection_seen.as_ref().map(|_| now);
            }
            if let Some(since) = s.silenced_since {
                if !s.degraded || now.saturating_sub(since) >= SILENCE_AFTER_REJECT {
                    s.silenced_since = None;
                } else if view.applied.is_none() {
                    self.why.insert(
                        key.clone(),
                        "a person rejected the last proposal; asking again once the primary recovered".into(),
                    );
                    continue;
                }
            }
            if view.applied.is_some() && s.watch.rule.is_none() {
                // A person moved a route no rule watches: a person moves it
                // back (no `recover` was declared to judge by).
                self.why.insert(key.clone(), "approved by a person; `bpfsync proposals revert` moves it back".into());
                continue;
            }
            match s.detector.evaluate(now, primary, &fallbacks) {
                Decision::Stay if s.watch.rule.is_none() && view.applied.is_none() && now >= s.baseline_quiet_until => {
                    let w = s.watch.settings;
                    if s.baseline.as_ref().is_none_or(|b| now.saturating_sub(b.at) >= w.window) {
                        s.baseline = Some(super::baseline::history(primary, now, w.window, w.min_samples));
                    }
                    let Some(hist) = &s.baseline else { continue };
                    let Some(finding) = super::baseline::check(primary, now, w.window, w.min_samples, hist) else {
                        continue;
                    };
                    let Some(to) = fallbacks.iter().position(|f| s.detector.healthy(f, now)) else { continue };
                    s.baseline_quiet_until = now + w.window * super::baseline::LONG_FACTOR;
                    let evidence =
                        Evidence { reason: format!("primary: {finding}"), value: Some(finding.recent), held: w.window };
                    let why = Some("found by the baseline detector: review only".to_string());
                    let p = new_switch(s, to, &evidence, "baseline detector", why, now_unix_ms, primary, &fallbacks);
                    self.why.insert(key.clone(), format!("{} (baseline detector)", evidence.reason));
                    out.push(Command::Create(Box::new(p)));
                }
                Decision::Stay => {}
                Decision::Switch { to, evidence } => {
                    let rule = s.watch.rule.as_ref();
                    let queued_because = match rule {
                        None => Some("no fallback rule names this route: review only".to_string()),
                        Some(r) if !r.auto_apply => Some(format!("rule `{}` does not set `auto-apply`", r.name)),
                        Some(_) if local_fault => Some(format!(
                            "{degraded} of {watched} watched routes degrade at once: more likely a fault of this node"
                        )),
                        Some(_) => None,
                    };
                    let source = rule.map(|r| format!("rule {}", r.name)).unwrap_or_else(|| "detector".into());
                    let auto = queued_because.is_none();
                    let p = new_switch(s, to, &evidence, &source, queued_because, now_unix_ms, primary, &fallbacks);
                    self.why.insert(key.clone(), format!("{} ({source})", evidence.reason));
                    if auto {
                        s.verify = Some(Verify {
                            deadline: now + s.watch.settings.interval * VERIFY_INTERVALS,
                            since: now,
                            hop: s.fallbacks[to].clone(),
                            hop_at: s.fallbacks_at[to],
                            answers_before: fallbacks[to].answers(),
                        });
                    } else {
                        // Not applied: the route stays where the store says.
                        s.detector.set_active(Active::Primary);
                    }
                    out.push(Command::Create(Box::new(p)));
                }
                Decision::Revert { evidence } => {
                    if let Some((id, _)) = &view.applied {
                        out.push(Command::Revert {
                            id: id.clone(),
                            route: key.clone(),
                            reason: evidence.reason.clone(),
                        });
                        self.why.insert(key.clone(), format!("back on the primary: {}", evidence.reason));
                    }
                }
                Decision::Lock { evidence } => {
                    let Some((_, on)) = view.applied else { continue };
                    let rule = s.watch.rule.as_ref().map(|r| r.name.as_str()).unwrap_or("none");
                    let mut p = new_switch(
                        s,
                        on,
                        &evidence,
                        &format!("flap lock (rule {rule})"),
                        None,
                        now_unix_ms,
                        primary,
                        &fallbacks,
                    );
                    p.action = Action::Lock { on: s.fallbacks[on].clone(), fallback_index: on };
                    p.status = Status::Pending;
                    p.auto_apply = false;
                    p.queued_because = Some("the route flapped: a person decides".into());
                    p.history[0].status = Status::Pending;
                    self.why.insert(key.clone(), evidence.reason.clone());
                    out.push(Command::Create(Box::new(p)));
                }
            }
        }
        self.note_evaluated(&keys, now);
        out
    }

    /// Files what the routes in `keys`, evaluated at `now`, wait for: their
    /// deadline, and whether their fallbacks' news matters. A deadline
    /// already past did its work in this evaluation; what changes the route
    /// next is news.
    fn note_evaluated(&mut self, routes: &[usize], now: Duration) {
        for &r in routes {
            let Some(s) = self.routes.get(r) else { continue };
            self.watching_fallbacks[r] = s.watches_fallbacks();
            match s.deadline().filter(|d| *d > now) {
                Some(d) => self.deadlines.insert(r, d),
                None => self.deadlines.remove(&r),
            };
        }
    }
}

impl RouteState {
    /// Whether a fallback's health may change what the route does: it is
    /// degraded (a fallback may become healthy to switch to), a switch is
    /// being verified, a timer runs, or it runs on a fallback. A route at
    /// rest on its primary depends on the primary alone.
    fn watches_fallbacks(&self) -> bool {
        self.degraded || self.verify.is_some() || self.detector.timing() || self.detector.active != Active::Primary
    }

    /// When time alone may change what the route needs: a timer of its
    /// detector ends, a switch's verification is due, a rejection's
    /// silence ends.
    fn deadline(&self) -> Option<Duration> {
        let verify = self.verify.as_ref().map(|v| v.deadline);
        let silence = self.silenced_since.map(|t| t + SILENCE_AFTER_REJECT);
        self.detector.deadline().into_iter().chain(verify).chain(silence).min()
    }
}

fn figures(hop: HopId, role: &str, h: &HopHealth, d: &RouteDetector, now: Duration) -> HopFigures {
    let r = &d.rule;
    HopFigures {
        hop,
        role: role.into(),
        loss: h.loss(now, r.window, r.min_samples),
        rtt_p99_ms: h.rtt_quantile_ms(now, r.window, 0.99, r.min_samples),
        consecutive_misses: h.consecutive_misses(),
        hard_failure: h.hard_failure(r.down_after).map(|f| f.to_string()),
    }
}

#[allow(clippy::too_many_arguments, reason = "one proposal's facts, gathered in one place")]
fn new_switch(
    s: &RouteState,
    to: usize,
    evidence: &Evidence,
    source: &str,
    queued_because: Option<String>,
    now_unix_ms: u64,
    primary: &HopHealth,
    fallbacks: &[&HopHealth],
) -> Proposal {
    let w = &s.watch;
    let now = Duration::from_millis(now_unix_ms);
    let target = w.fallbacks()[to].clone();
    let mut hops = vec![figures(w.primary(), "primary", primary, &s.detector, now)];
    for (i, (id, h)) in w.fallbacks().into_iter().zip(fallbacks).enumerate() {
        hops.push(figures(id, &format!("fallback[{i}]"), h, &s.detector, now));
    }
    let auto = queued_because.is_none();
    let status = if auto { Status::Applied } else { Status::Pending };
    let metric = w.rule.as_ref().map(|r| metric_name(r.metric)).unwrap_or("hard-failure").to_string();
    Proposal {
        id: super::store::new_id(now_unix_ms, &format!("{}\0{target}", w.route.prefix)),
        created_unix_ms: now_unix_ms,
        source: source.to_string(),
        route: w.route.prefix.clone(),
        action: Action::Switch { from: w.primary(), to: target.clone(), fallback_index: to },
        auto_apply: w.rule.as_ref().is_some_and(|r| r.auto_apply),
        queued_because,
        evidence: proposal::Evidence {
            reason: evidence.reason.clone(),
            metric,
            value: evidence.value,
            threshold: w
                .rule
                .as_ref()
                .filter(|r| !matches!(r.metric, FallbackMetric::LinkDown | FallbackMetric::NeighborUnreachable))
                .map(|r| r.rule.above),
            window_ms: s.detector.rule.window.as_millis() as u64,
            held_ms: evidence.held.as_millis() as u64,
            hops,
        },
        patch: proposal::switch_patch(w.index, &w.route, to).unwrap_or_default(),
        diff: proposal::switch_diff(w.index, &w.route, to),
        plan: format!(
            "~ route {}: next hop {} → {} (one entry of `mesh_routes` updated in place)",
            w.route.prefix,
            w.primary(),
            target
        ),
        status,
        history: vec![Transition {
            status,
            by: if auto { source.to_string() } else { "agent".into() },
            at_unix_ms: now_unix_ms,
            note: evidence.reason.clone(),
        }],
    }
}

#[cfg(test)]
mod tests {
    //! The controller against a fake store, on a controlled clock: every
    //! series is synthetic and every run deterministic.

    use super::*;
    use crate::spec::NextHopSpec;

    const S: Duration = Duration::from_secs(1);
    const T0: u64 = 1_796_000_000_000;

    fn route(n: u8) -> RouteSpec {
        let hop = |i: &str, a: &str| NextHopSpec { interface: i.into(), neighbor: a.into(), mac: None };
        RouteSpec {
            prefix: format!("10.{n}.0.0/16"),
            via: hop(&format!("p{n}"), &format!("10.0.{n}.2")),
            fallback: vec![hop(&format!("f{n}"), &format!("10.1.{n}.2"))],
            health: None,
        }
    }

    fn settings() -> ProbeSettings {
        ProbeSettings { interval: S, timeout: S / 2, down_after: 3, window: S * 10, min_samples: 5 }
    }

    fn watched(n: u8, auto: Option<bool>) -> WatchedRoute {
        let rule = auto.map(|auto_apply| BoundRule {
            name: format!("r{n}"),
            metric: FallbackMetric::ProbeLoss,
            rule: Rule {
                metric: Metric::Loss,
                above: 0.2,
                trigger_for: S * 5,
                below: 0.05,
                recover_for: S * 10,
                down_after: 3,
                window: S * 10,
                min_samples: 5,
            },
            auto_apply,
        });
        WatchedRoute { index: n as usize, route: route(n), settings: settings(), rule }
    }

    /// The controller, its routes' hop health, and a store in memory.
    struct Sim {
        c: Controller,
        health: HashMap<HopId, HopHealth>,
        store: Vec<Proposal>,
        t: u32,
        commands: Vec<(u32, Command)>,
    }

    impl Sim {
        fn new(routes: Vec<WatchedRoute>) -> Sim {
            let mut c = Controller::default();
            c.set_routes(routes, &HashMap::new());
            Sim { c, health: HashMap::new(), store: Vec::new(), t: 0, commands: Vec::new() }
        }

        /// One second: every hop probed (`rtt(hop)`), then one tick whose
        /// commands are carried out on the fake store.
        fn step(&mut self, rtt: impl Fn(&HopId, u32) -> Option<Duration>) {
            self.t += 1;
            let now = S * self.t;
            let hops: Vec<HopId> = self.c.hops().iter().map(|(h, _)| h.clone()).collect();
            for h in hops {
                let r = rtt(&h, self.t);
                self.health.entry(h.clone()).or_default().record_probe(now, r);
            }
            let views = view(&self.store);
            let out = self.c.tick(now, T0 + now.as_millis() as u64, &self.health, &views, None);
            for cmd in out {
                match &cmd {
                    Command::Create(p) => self.store.push((**p).clone()),
                    Command::Revert { id, .. } => {
                        let p = self.store.iter_mut().find(|p| &p.id == id).unwrap();
                        p.transition(Status::Reverted, "agent", 0, "").unwrap();
                    }
                }
                self.commands.push((self.t, cmd));
            }
        }

        fn run(&mut self, seconds: u32, rtt: impl Fn(&HopId, u32) -> Option<Duration>) {
            for _ in 0..seconds {
                self.step(&rtt);
            }
        }
    }

    /// Runs `routes` for `half_seconds` steps of 500 ms: primaries are
    /// probed on even steps, fallbacks on odd ones (`rtt(hop, step)`; None:
    /// no result at all, as from a hop that cannot be probed). With
    /// `news_only`, each tick gets the hops probed in its step (as the
    /// runner passes them) and a full pass only when the store changed.
    fn replay(
        routes: Vec<WatchedRoute>,
        half_seconds: u32,
        news_only: bool,
        rtt: impl Fn(&HopId, u32) -> Option<Option<Duration>>,
    ) -> Vec<(u32, Command)> {
        let mut c = Controller::default();
        c.set_routes(routes, &HashMap::new());
        let hops: Vec<HopId> = c.hops().iter().map(|(h, _)| h.clone()).collect();
        let (mut health, mut store, mut out) = (HashMap::<HopId, HopHealth>::new(), Vec::<Proposal>::new(), vec![]);
        let mut last_views = None;
        for step in 1..=half_seconds {
            let now = S * step / 2;
            let mut changed = Vec::new();
            for (i, h) in hops.iter().enumerate() {
                if primary_of(h) == step.is_multiple_of(2)
                    && let Some(r) = rtt(h, step)
                {
                    health.entry(h.clone()).or_default().record_probe(now, r);
                    changed.push(i);
                }
            }
            let views = view(&store);
            let full = !news_only || last_views.as_ref() != Some(&views);
            let cmds = c.tick(now, T0 + now.as_millis() as u64, &health, &views, (!full).then_some(&changed));
            last_views = Some(views);
            for cmd in cmds {
                match &cmd {
                    Command::Create(p) => store.push((**p).clone()),
                    Command::Revert { id, .. } => {
                        let p = store.iter_mut().find(|p| &p.id == id).unwrap();
                        p.transition(Status::Reverted, "agent", 0, "").unwrap();
                    }
                }
                out.push((step, cmd));
            }
        }
        out
    }

    #[test]
    fn ticks_on_news_decide_as_full_passes_do() {
        let routes = || vec![watched(1, Some(true)), watched(2, Some(true)), watched(3, None), watched(4, Some(false))];
        // Seconds 20–40 route 1's primary dead; 100–160 every other probe
        // of route 2's primary lost (50 %, a soft breach held `for`);
        // 200–260 route 2's primary dead and 201–230 its fallback too (a
        // failed verification); 300–330 route 1's primary dead again;
        // 400–420 route 4's (a question for a person); from 450 route 1's
        // primary dead, then no result from either of its hops: the
        // switch's verification fails by its deadline alone.
        let rtt = |h: &HopId, step: u32| {
            let t = step / 2;
            let i = h.interface.as_str();
            if (i == "p1" && t >= 453) || (i == "f1" && t >= 452) {
                return None;
            }
            let dead = (i == "p1" && ((20..40).contains(&t) || (300..330).contains(&t)))
                || (i == "p2" && (100..160).contains(&t) && step.is_multiple_of(4))
                || (i == "p2" && (200..260).contains(&t))
                || (i == "f2" && (201..230).contains(&t))
                || (i == "p4" && (400..420).contains(&t))
                || (i == "p1" && t >= 450);
            Some(if dead { None } else { jitter(h, step) })
        };
        let full = replay(routes(), 1000, false, rtt);
        let news = replay(routes(), 1000, true, rtt);
        let kinds: Vec<String> = full
            .iter()
            .map(|(t, c)| match c {
                Command::Create(p) => format!("{t}:{} {}", p.route, p.status),
                Command::Revert { route, reason, .. } => format!("{t}:{route} revert: {reason}"),
            })
            .collect();
        assert!(kinds.len() >= 7, "the series makes decisions: {kinds:?}");
        assert!(kinds.iter().any(|k| k.contains("verification failed")), "{kinds:#?}");
        assert_eq!(news, full);
    }

    #[test]
    fn drop_rate_counts_what_the_datapath_failed_to_deliver_on_the_primary() {
        let mut w = watched(1, Some(true));
        if let Some(r) = w.rule.as_mut() {
            r.metric = FallbackMetric::DropRate;
            r.rule.metric = Metric::DropRate;
            r.rule.above = 0.5;
            r.rule.trigger_for = S * 2;
        }
        let mut sim = Sim::new(vec![w]);
        // Clean probes and clean delivery: nothing to do.
        let (mut forwarded, mut failed) = (0u64, 0u64);
        for _ in 0..20 {
            forwarded += 100;
            sim.c.record_delivery(S * (sim.t + 1), 0, forwarded, failed);
            sim.step(jitter);
        }
        assert!(sim.commands.is_empty(), "{:?}", sim.commands);
        // No traffic at all: no data, the route holds.
        for _ in 0..10 {
            sim.c.record_delivery(S * (sim.t + 1), 0, forwarded, failed);
            sim.step(jitter);
        }
        assert!(sim.commands.is_empty(), "an idle route is no data: {:?}", sim.commands);
        // Probes still answered, but 80 % of the route's packets fail to
        // be redirected: switched after `for`, and the proposal says why.
        for _ in 0..15 {
            forwarded += 100;
            failed += 80;
            sim.c.record_delivery(S * (sim.t + 1), 0, forwarded, failed);
            sim.step(jitter);
        }
        let Some((t, Command::Create(p))) = sim.commands.first() else { panic!("{:?}", sim.commands) };
        assert_eq!(p.status, Status::Applied);
        assert!(p.evidence.reason.contains("the datapath failed to deliver 80 %"), "{}", p.evidence.reason);
        // The window's traffic (after the idle spell) is all failing from
        // the first reading (t = 31); then `for` (2 s) passes: not before.
        assert_eq!(*t, 33);
    }

    #[test]
    fn delivery_counters_that_go_back_start_a_new_series() {
        let mut d = DeliverySeries::default();
        d.record(S, 1000, 0, S * 20);
        d.record(S * 2, 2000, 500, S * 20);
        assert_eq!(d.failure_ratio(S * 2, S * 10, 5), Some(0.5));
        // The map was made again: counts from zero, never a negative delta.
        d.record(S * 3, 10, 10, S * 20);
        assert_eq!(d.failure_ratio(S * 3, S * 10, 5), None, "one reading is no rate");
        d.record(S * 4, 110, 10, S * 20);
        assert_eq!(d.failure_ratio(S * 4, S * 10, 5), Some(0.0));
        assert_eq!(d.failure_ratio(S * 4, S * 10, 1000), None, "too few packets");
    }

    /// 2 ms ± 0.3 ms, deterministic.
    fn jitter(h: &HopId, t: u32) -> Option<Duration> {
        let seed = h.interface.bytes().map(u32::from).sum::<u32>();
        Some(Duration::from_micros(1700 + ((t * 7919 + seed * 104_729) % 600) as u64))
    }

    fn primary_of(h: &HopId) -> bool {
        h.interface.starts_with('p')
    }

    #[test]
    fn an_hour_of_clean_jittery_probes_makes_no_command_with_or_without_rules() {
        let mut sim = Sim::new(vec![watched(1, Some(true)), watched(2, None), watched(3, Some(false))]);
        sim.run(3600, jitter);
        assert!(sim.commands.is_empty(), "{:?}", sim.commands);
    }

    #[test]
    fn a_hard_failure_is_applied_at_once_verified_and_reverted_after_recovery() {
        let mut sim = Sim::new(vec![watched(1, Some(true))]);
        sim.run(20, jitter);
        // Primary dead from t=21 to t=40.
        sim.run(40, |h, t| if primary_of(h) && t <= 40 { None } else { jitter(h, t) });
        let kinds: Vec<String> = sim
            .commands
            .iter()
            .map(|(t, c)| match c {
                Command::Create(p) => format!("{t}:{}", p.status),
                Command::Revert { reason, .. } => format!("{t}:revert {reason}"),
            })
            .collect();
        assert_eq!(kinds[0], "23:applied", "three misses in a row: {kinds:?}");
        assert_eq!(kinds.len(), 2, "{kinds:?}");
        // Back once the primary's window is clean (10 s) and held 10 s.
        let (t_back, _) = sim.commands[1];
        assert!(t_back >= 41 + 10, "{kinds:?}");
        assert!(kinds[1].contains("primary below 0.05"), "{kinds:?}");
    }

    #[test]
    fn without_auto_apply_a_proposal_waits_and_is_not_repeated_until_decided() {
        let mut sim = Sim::new(vec![watched(1, Some(false))]);
        sim.run(10, jitter);
        sim.run(30, |h, t| if primary_of(h) { None } else { jitter(h, t) });
        assert_eq!(sim.commands.len(), 1, "one question at a time: {:?}", sim.commands);
        let Command::Create(p) = &sim.commands[0].1 else { panic!() };
        assert_eq!(p.status, Status::Pending);
        assert_eq!(p.queued_because.as_deref(), Some("rule `r1` does not set `auto-apply`"));
        // A person approves: the route is on its fallback; recovery reverts.
        sim.store[0].transition(Status::Applied, "user:x", 0, "").unwrap();
        sim.run(40, jitter);
        assert!(matches!(sim.commands.last(), Some((_, Command::Revert { .. }))), "{:?}", sim.commands);
    }

    #[test]
    fn a_rejection_is_not_asked_again_until_the_primary_recovered() {
        let mut sim = Sim::new(vec![watched(1, Some(false))]);
        sim.run(10, jitter);
        let down = |h: &HopId, t: u32| if primary_of(h) { None } else { jitter(h, t) };
        sim.run(10, down);
        assert_eq!(sim.commands.len(), 1);
        sim.store[0].transition(Status::Rejected, "user:x", 0, "not now").unwrap();
        sim.run(120, down);
        assert_eq!(sim.commands.len(), 1, "silenced while the same condition holds: {:?}", sim.commands);
        sim.run(20, jitter);
        sim.run(10, down);
        assert_eq!(sim.commands.len(), 2, "a new episode is asked about: {:?}", sim.commands);
    }

    #[test]
    fn many_routes_degrading_at_once_look_local_and_are_queued() {
        let routes: Vec<WatchedRoute> = (1..=4).map(|n| watched(n, Some(true))).collect();
        let mut sim = Sim::new(routes);
        sim.run(10, jitter);
        // Two of four primaries fail together: more than a quarter.
        let failing = |h: &HopId| h.interface == "p1" || h.interface == "p2";
        sim.run(5, |h, t| if failing(h) { None } else { jitter(h, t) });
        let created: Vec<&Proposal> = sim
            .commands
            .iter()
            .filter_map(|(_, c)| if let Command::Create(p) = c { Some(&**p) } else { None })
            .collect();
        assert_eq!(created.len(), 2, "{created:?}");
        for p in created {
            assert_eq!(p.status, Status::Pending);
            assert!(p.queued_because.as_deref().unwrap().contains("2 of 4 watched routes"), "{p:?}");
        }
    }

    #[test]
    fn a_switch_whose_target_stops_answering_goes_back_and_says_why() {
        let mut sim = Sim::new(vec![watched(1, Some(true))]);
        sim.run(10, jitter);
        // The primary dies at t=11; the fallback dies right after the switch.
        sim.run(10, |h, t| if primary_of(h) || t >= 14 { None } else { jitter(h, t) });
        let reasons: Vec<String> = sim
            .commands
            .iter()
            .filter_map(|(_, c)| if let Command::Revert { reason, .. } = c { Some(reason.clone()) } else { None })
            .collect();
        assert_eq!(reasons.len(), 1, "{:?}", sim.commands);
        assert!(reasons[0].starts_with("verification failed"), "{reasons:?}");
    }

    #[test]
    fn a_route_without_a_rule_gets_baseline_findings_for_review_once_per_long_window() {
        let mut sim = Sim::new(vec![watched(1, None)]);
        sim.run(300, jitter);
        // The primary's RTT jumps tenfold.
        sim.run(200, |h, t| if primary_of(h) { Some(Duration::from_millis(20)) } else { jitter(h, t) });
        let created: Vec<&Proposal> = sim
            .commands
            .iter()
            .filter_map(|(_, c)| if let Command::Create(p) = c { Some(&**p) } else { None })
            .collect();
        assert_eq!(created.len(), 1, "{created:?}");
        assert_eq!(created[0].source, "baseline detector");
        assert_eq!(created[0].status, Status::Pending);
        assert!(created[0].evidence.reason.contains("probe RTT"), "{:?}", created[0].evidence);
        // Approved, the route stays on its fallback until a person moves it
        // back: no rule declared when recovery counts.
        sim.store[0].transition(Status::Applied, "user:x", 0, "").unwrap();
        let before = sim.commands.len();
        sim.run(600, jitter);
        assert_eq!(sim.commands.len(), before, "{:?}", &sim.commands[before..]);
    }
}

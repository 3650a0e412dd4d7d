//! The heal loop's edge, on a thread of its own: it probes every hop of
//! every watched route on its schedule, follows rtnetlink link and
//! neighbour events, feeds [`super::controller`] and carries out its
//! commands in the proposal store. An overlay change is handed to the
//! agent (`Observer::overlay_changed`), which reconciles: the runner never
//! touches the kernel's eBPF state itself.
//!
//! One thread waits on every probe socket and the netlink socket with one
//! poll(2); probes are sent when due, each with its own timeout.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::controller::{Command, Controller, ProbeSettings, RouteReport, RouteView, WatchedRoute, view};
use super::detector::FlapMemory;
use super::health::HopHealth;
use super::probe::{ProbeSocket, new_id};
use super::proposal::{HopId, Proposal, Status};
use super::store::{Store, StoreError, now_unix_ms};
use serde_json::json;

use crate::kernel::netlink::{HealthEvent, HealthEvents};

/// Pending proposals older than this expire (the evidence is stale).
pub const EXPIRE_PENDING_AFTER: Duration = Duration::from_secs(3600);
/// The controller runs at most this often (it reads the store).
const MIN_TICK: Duration = Duration::from_millis(20);

/// The routes to watch, set by the reconciler whenever a spec is loaded.
#[derive(Default)]
pub struct RoutesCell(Mutex<(u64, Arc<Vec<WatchedRoute>>)>);

impl RoutesCell {
    pub fn set(&self, routes: Vec<WatchedRoute>) {
        let mut g = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if *g.1 != routes {
            *g = (g.0 + 1, Arc::new(routes));
        }
    }

    pub fn get(&self) -> (u64, Arc<Vec<WatchedRoute>>) {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

/// One hop's figures now, for `status` and `/metrics`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HopReport {
    pub hop: HopId,
    pub probe_interval_ms: u64,
    pub loss: Option<f64>,
    pub rtt_smoothed_ms: Option<f64>,
    pub rtt_p50_ms: Option<f64>,
    pub rtt_p99_ms: Option<f64>,
    pub consecutive_misses: u32,
    pub link_up: Option<bool>,
    pub neighbor_reachable: Option<bool>,
    pub hard_failure: Option<String>,
    /// Why it cannot be probed, when it cannot.
    pub probe_error: Option<String>,
}

/// What the heal loop shows.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct HealSnapshot {
    pub routes: Vec<RouteReport>,
    pub hops: Vec<HopReport>,
    /// Proposals by (source kind, status).
    pub proposals: BTreeMap<String, BTreeMap<String, usize>>,
    pub overlay_entries: usize,
}

/// What the agent is told.
pub trait Observer: Send {
    /// One probe's result.
    fn probe(&self, hop: &HopId, rtt: Option<Duration>);
    /// A route moved, was queued for review, or was locked
    /// (`switch`, `revert`, `verify-failed`, `queued`, `lock`).
    fn event(&self, route: &str, what: &str, reason: &str);
    fn snapshot(&self, snapshot: HealSnapshot);
    /// The overlay changed: reconcile now.
    fn overlay_changed(&self);
}

struct Hop {
    settings: ProbeSettings,
    target: IpAddr,
    /// The socket of its interface and family, when it could be opened.
    socket: Option<SocketKey>,
    id: u16,
    seq: u16,
    error: Option<String>,
    next_due: Instant,
    /// The echo in flight: its sequence number, when it left (monotonic
    /// and wall clock: answers carry the kernel's wall-clock receive time).
    inflight: Option<(u16, Instant, std::time::SystemTime)>,
    health: HopHealth,
    ifindex: u32,
}

/// One probe socket per interface and address family.
type SocketKey = (String, bool);

/// What the store holds per route prefix.
type Views = Arc<HashMap<String, RouteView>>;

/// The last reading of the proposal store.
struct ProposalCache {
    mtime: Option<std::time::SystemTime>,
    read_at: Instant,
    proposals: Arc<Vec<Proposal>>,
    views: Views,
}

/// The hops' health, read in place (histories are not copied per tick).
struct HopsHealth<'a>(&'a BTreeMap<HopId, Hop>);

impl super::controller::Healths for HopsHealth<'_> {
    fn health(&self, hop: &HopId) -> Option<&HopHealth> {
        self.0.get(hop).map(|h| &h.health)
    }
}

pub struct Runner {
    sockets: HashMap<SocketKey, ProbeSocket>,
    /// Echo identifier → the hop it belongs to.
    ids: HashMap<u16, HopId>,
    store: Store,
    routes: Arc<RoutesCell>,
    generation: u64,
    controller: Controller,
    hops: BTreeMap<HopId, Hop>,
    events: Option<HealthEvents>,
    observer: Box<dyn Observer>,
    /// Start of the heal clock: durations since the Unix epoch at start
    /// plus monotonic time since, so windows never jump with the wall
    /// clock and flap times stay comparable across restarts.
    origin: (Instant, Duration),
    last_tick: Instant,
    dirty: bool,
    cache: Option<ProposalCache>,
    /// The earliest probe send or timeout (probe_due walks the hops then).
    next_event: Instant,
    /// Hops with new results or events since the last tick.
    changed: std::collections::HashSet<HopId>,
    /// When every route was last evaluated.
    last_full_tick: Instant,
    /// The applied proposals at the last tick: a change made elsewhere (a
    /// person's approval) is reconciled at once too.
    last_overlay: Option<Vec<String>>,
    /// When the snapshot file was last written (`bpfsync status` reads it).
    last_snapshot_file: Option<Instant>,
    /// When the snapshot was last made.
    last_report: Option<Instant>,
}

fn source_kind(p: &Proposal) -> &'static str {
    if p.source.starts_with("rule ") {
        "rule"
    } else if p.source.starts_with("flap lock") {
        "flap-lock"
    } else if p.source == "baseline detector" {
        "baseline"
    } else {
        "detector"
    }
}

fn read_link_up(interface: &str) -> Option<bool> {
    // Absent: down. `unknown` is what drivers without carrier report.
    match std::fs::read_to_string(format!("/sys/class/net/{interface}/operstate")) {
        Ok(s) => Some(matches!(s.trim(), "up" | "unknown")),
        Err(_) => Some(false),
    }
}

/// The neighbour table's states; one that cannot be read gives no verdict
/// on any hop (neither reachable nor failed: probes still judge), and says so.
fn neighbor_states() -> HashMap<(u32, IpAddr), Option<bool>> {
    crate::kernel::netlink::neighbor_states().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot read the neighbour table; hops are judged by probes and events");
        HashMap::new()
    })
}

fn ifindex(interface: &str) -> u32 {
    let Ok(c) = std::ffi::CString::new(interface) else { return 0 };
    // SAFETY: a valid NUL-terminated string.
    unsafe { libc::if_nametoindex(c.as_ptr()) }
}

impl Runner {
    pub fn new(state_dir: &std::path::Path, routes: Arc<RoutesCell>, observer: Box<dyn Observer>) -> Runner {
        let unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let events = match HealthEvents::subscribe(Duration::from_millis(1)) {
            Ok(e) => Some(e),
            Err(e) => {
                tracing::warn!(error = %e, "cannot follow link and neighbour events; hop health relies on probes alone");
                None
            }
        };
        Runner {
            sockets: HashMap::new(),
            ids: HashMap::new(),
            store: Store::new(state_dir),
            routes,
            generation: 0,
            controller: Controller::default(),
            hops: BTreeMap::new(),
            events,
            observer,
            origin: (Instant::now(), unix),
            last_tick: Instant::now(),
            dirty: true,
            changed: Default::default(),
            next_event: Instant::now(),
            cache: None,
            last_full_tick: Instant::now(),
            last_overlay: None,
            last_snapshot_file: None,
            last_report: None,
        }
    }

    fn clock(&self, at: Instant) -> Duration {
        self.origin.1 + at.saturating_duration_since(self.origin.0)
    }

    fn load_memory(&self) -> HashMap<String, FlapMemory> {
        std::fs::read_to_string(self.store.routes_path())
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    }

    fn save_memory(&self) {
        let value = serde_json::to_value(self.controller.memory()).unwrap_or_default();
        let saved = self.store.lock().and_then(|l| l.save_json(&self.store.routes_path(), &value));
        if let Err(e) = saved {
            tracing::warn!(error = %crate::apply::error_chain(&e), "cannot save the flap history");
        }
    }

    /// Follows a new set of routes: hops that stay keep their history.
    fn refresh_routes(&mut self) {
        let (generation, routes) = self.routes.get();
        if generation == self.generation {
            return;
        }
        self.generation = generation;
        let memory = self.load_memory();
        self.controller.set_routes(routes.as_ref().clone(), &memory);
        let wanted = self.controller.hops();
        self.hops.retain(|id, _| wanted.contains_key(id));
        self.ids.retain(|_, hop| wanted.contains_key(hop));
        let now = Instant::now();
        // One dump of the neighbour table for every new hop.
        let neighbors = neighbor_states();
        for (id, settings) in wanted {
            if let Some(h) = self.hops.get_mut(&id) {
                h.settings = settings;
                continue;
            }
            let Ok(target) = id.neighbor.parse::<IpAddr>() else { continue };
            let key: SocketKey = (id.interface.clone(), target.is_ipv6());
            let error = match self.sockets.entry(key.clone()) {
                std::collections::hash_map::Entry::Occupied(_) => None,
                std::collections::hash_map::Entry::Vacant(v) => match ProbeSocket::new(&id.interface, target.is_ipv6())
                {
                    Ok(s) => {
                        v.insert(s);
                        None
                    }
                    Err(e) => Some(format!("cannot probe through `{}`: {e}", id.interface)),
                },
            };
            if let Some(e) = &error {
                tracing::warn!(hop = %id, "{e}");
            }
            let mut health = HopHealth::default();
            let ifindex = ifindex(&id.interface);
            if let Some(up) = read_link_up(&id.interface) {
                health.set_link(up);
            }
            health.set_neighbor_state(neighbors.get(&(ifindex, target)).copied().flatten());
            let echo_id = (0..16).map(|_| new_id()).find(|i| !self.ids.contains_key(i)).unwrap_or_else(new_id);
            self.ids.insert(echo_id, id.clone());
            let socket = error.is_none().then_some(key);
            // Hops start spread over the interval (20 slots), so a thousand
            // echoes and their answers do not all meet in one instant.
            let slot = id.to_string().bytes().fold(0u32, |a, b| a.wrapping_mul(31).wrapping_add(b as u32)) % 20;
            let next_due = now + settings.interval * slot / 20;
            self.hops.insert(
                id,
                Hop { settings, target, socket, id: echo_id, seq: 0, error, next_due, inflight: None, health, ifindex },
            );
        }
        self.next_event = now;
        // Sockets no hop uses any more are closed.
        let used: std::collections::HashSet<&SocketKey> =
            self.hops.values().filter_map(|h| h.socket.as_ref()).collect();
        self.sockets.retain(|k, _| used.contains(k));
        self.dirty = true;
    }

    fn on_events(&mut self) {
        let Some(events) = self.events.as_mut() else { return };
        let batch = match events.recv() {
            Ok(b) => b,
            Err(e) => {
                // Lost events: read every hop's state again.
                tracing::warn!(error = %e, "link and neighbour events were lost; reading their state again");
                let neighbors = neighbor_states();
                for (id, h) in self.hops.iter_mut() {
                    h.ifindex = ifindex(&id.interface);
                    if let Some(up) = read_link_up(&id.interface) {
                        h.health.set_link(up);
                    }
                    h.health.set_neighbor_state(neighbors.get(&(h.ifindex, h.target)).copied().flatten());
                    self.changed.insert(id.clone());
                }
                self.dirty = true;
                return;
            }
        };
        for ev in batch {
            match ev {
                HealthEvent::Link(name) => {
                    for (id, h) in self.hops.iter_mut().filter(|(id, _)| id.interface == name) {
                        h.ifindex = ifindex(&id.interface);
                        if let Some(up) = read_link_up(&id.interface) {
                            h.health.set_link(up);
                        }
                        self.changed.insert(id.clone());
                        self.dirty = true;
                    }
                }
                HealthEvent::Neighbor { ifindex, addr, reachable } => {
                    for (id, h) in self.hops.iter_mut().filter(|(_, h)| h.ifindex == ifindex && h.target == addr) {
                        h.health.set_neighbor_state(reachable);
                        self.changed.insert(id.clone());
                        self.dirty = true;
                    }
                }
            }
        }
    }

    /// Sends the probes that are due, and times out the ones unanswered.
    fn probe_due(&mut self, now: Instant) {
        // Nothing is due before the earliest send or timeout: no walk over
        // every hop at every wakeup.
        if now < self.next_event {
            return;
        }
        let clock = self.clock(now);
        let mut next_event = now + Duration::from_secs(1);
        for (id, h) in self.hops.iter_mut() {
            if let Some((_, sent, _)) = h.inflight
                && now.saturating_duration_since(sent) >= h.settings.timeout
            {
                h.inflight = None;
                h.health.record_probe(clock, None);
                self.observer.probe(id, None);
                self.changed.insert(id.clone());
                self.dirty = true;
            }
            if now < h.next_due {
                continue;
            }
            // On schedule, not drifting: skip missed slots after a stall.
            h.next_due += h.settings.interval;
            if h.next_due < now {
                h.next_due = now + h.settings.interval;
            }
            let Some(socket) = h.socket.as_ref().and_then(|k| self.sockets.get(k)) else { continue };
            if h.inflight.is_some() {
                continue;
            }
            h.seq = h.seq.wrapping_add(1);
            match socket.send(h.target, h.id, h.seq) {
                Ok(true) => h.inflight = Some((h.seq, now, std::time::SystemTime::now())),
                Ok(false) => {
                    h.health.record_probe(clock, None);
                    self.observer.probe(id, None);
                    self.changed.insert(id.clone());
                    self.dirty = true;
                }
                Err(e) => {
                    let msg = format!("probe through `{}` failed: {e}", id.interface);
                    if h.error.as_deref() != Some(msg.as_str()) {
                        tracing::warn!(hop = %id, "{msg}");
                    }
                    h.error = Some(msg);
                }
            }
        }
        for h in self.hops.values() {
            next_event = next_event.min(h.next_due);
            if let Some((_, sent, _)) = h.inflight {
                next_event = next_event.min(sent + h.settings.timeout);
            }
        }
        self.next_event = next_event;
    }

    /// Reads every answer waiting. Sockets are not polled: answers are
    /// read when the loop wakes for a send, a timeout or an event, and
    /// their kernel receive time keeps the RTT exact (a thousand hops cost
    /// a few dozen wakeups a second, not one per answer).
    fn collect_answers(&mut self) {
        let now = Instant::now();
        let clock = self.clock(now);
        for (key, socket) in &self.sockets {
            let answers = match socket.answers() {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(interface = %key.0, error = %e, "reading probe answers failed");
                    continue;
                }
            };
            for a in answers {
                let Some(id) = self.ids.get(&a.id) else { continue };
                let Some(h) = self.hops.get_mut(id) else { continue };
                match h.inflight {
                    Some((seq, sent, sent_wall))
                        if seq == a.seq && a.from == h.target && h.socket.as_ref() == Some(key) =>
                    {
                        let rtt = a
                            .received
                            .and_then(|r| r.duration_since(sent_wall).ok())
                            .unwrap_or_else(|| now.saturating_duration_since(sent));
                        // Read after its timeout passed: lost, as it would
                        // have been counted had the loop woken earlier.
                        let rtt = (rtt < h.settings.timeout).then_some(rtt);
                        h.inflight = None;
                        h.error = None;
                        h.health.record_probe(clock, rtt);
                        self.observer.probe(id, rtt);
                        self.changed.insert(id.clone());
                        self.dirty = true;
                    }
                    _ => {} // late (already counted lost), or not ours
                }
            }
        }
    }

    /// Waits until the next probe send or timeout, or a link or neighbour
    /// event.
    fn wait(&self) -> Vec<std::os::fd::RawFd> {
        let now = Instant::now();
        let mut until = (now + Duration::from_millis(200)).min(self.next_event);
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(1);
        if let Some(e) = &self.events {
            fds.push(libc::pollfd { fd: e.raw_fd(), events: libc::POLLIN, revents: 0 });
        }
        if self.dirty {
            // A decision is owed: wake up as soon as the tick may run.
            until = until.min(self.last_tick + MIN_TICK);
        }
        let timeout = until.saturating_duration_since(now).as_millis().min(200) as i32;
        // SAFETY: `fds` is a valid array of pollfd of the given length.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if rc <= 0 {
            return Vec::new();
        }
        fds.iter().filter(|p| p.revents != 0).map(|p| p.fd).collect()
    }

    /// The store's proposals and their per-route view, read again when the
    /// directory changed (a write or a rename) or a second passed.
    fn proposals(&mut self, now: Instant) -> Result<(Arc<Vec<Proposal>>, Views), StoreError> {
        let mtime = std::fs::metadata(self.store.proposals_dir()).and_then(|m| m.modified()).ok();
        if let Some(c) = &self.cache
            && c.mtime == mtime
            && mtime.is_some()
            && now.saturating_duration_since(c.read_at) < Duration::from_secs(1)
        {
            return Ok((c.proposals.clone(), c.views.clone()));
        }
        let listing = self.store.list()?;
        let views = Arc::new(view(&listing.proposals));
        let proposals = Arc::new(listing.proposals);
        self.cache = Some(ProposalCache { mtime, read_at: now, proposals: proposals.clone(), views: views.clone() });
        Ok((proposals, views))
    }

    /// Runs the controller and carries out what it says.
    fn tick(&mut self) {
        let now = Instant::now();
        if !self.dirty || now.saturating_duration_since(self.last_tick) < MIN_TICK {
            return;
        }
        self.dirty = false;
        self.last_tick = now;
        let (proposals, views) = match self.proposals(now) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %crate::apply::error_chain(&e), "cannot read the proposals; no decision this round");
                return;
            }
        };
        let clock = self.clock(now);
        // Every route once a second (deadlines, decisions made elsewhere);
        // in between only those whose hops have news.
        let full = now.saturating_duration_since(self.last_full_tick) >= Duration::from_secs(1);
        if full {
            self.last_full_tick = now;
        }
        let changed = std::mem::take(&mut self.changed);
        let hops = HopsHealth(&self.hops);
        let commands = self.controller.tick(clock, now_unix_ms(), &hops, &views, (!full).then_some(&changed));
        let mut overlay_changed = false;
        for c in &commands {
            overlay_changed |= self.carry_out(c);
        }
        self.expire(&proposals);
        if !commands.is_empty() {
            self.save_memory();
        }
        if overlay_changed {
            self.observer.overlay_changed();
        }
        let proposals = if commands.is_empty() {
            proposals
        } else {
            self.cache = None;
            self.proposals(now).map(|(p, _)| p).unwrap_or(proposals)
        };
        let applied: Vec<String> =
            proposals.iter().filter(|p| p.status == Status::Applied).map(|p| p.id.clone()).collect();
        if self.last_overlay.as_ref().is_some_and(|last| *last != applied) && !overlay_changed {
            self.observer.overlay_changed();
        }
        self.last_overlay = Some(applied);
        // The snapshot (every hop's percentiles) once a second, or at once
        // after a decision: not at every tick.
        if commands.is_empty()
            && !overlay_changed
            && self.last_report.is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1))
        {
            return;
        }
        self.last_report = Some(now);
        self.report(&proposals, clock);
    }

    /// Returns whether the overlay changed.
    fn carry_out(&self, c: &Command) -> bool {
        let lock = match self.store.lock() {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %crate::apply::error_chain(&e), "cannot write a proposal");
                return false;
            }
        };
        match c {
            Command::Create(p) => {
                if let Err(e) = lock.create(p) {
                    tracing::error!(route = %p.route, error = %crate::apply::error_chain(&e), "cannot write a proposal");
                    return false;
                }
                let what = match (&p.action, p.status) {
                    (super::proposal::Action::Lock { .. }, _) => "lock",
                    (_, Status::Applied) => "switch",
                    _ => "queued",
                };
                let target = match &p.action {
                    super::proposal::Action::Switch { to, .. } => to.to_string(),
                    super::proposal::Action::Lock { on, .. } => on.to_string(),
                };
                match what {
                    "switch" => {
                        tracing::warn!(route = %p.route, to = %target, proposal = %p.id, source = %p.source, "switched to a fallback hop: {}", p.evidence.reason)
                    }
                    "lock" => {
                        tracing::warn!(route = %p.route, on = %target, proposal = %p.id, "route flapped: locked on its fallback, queued for review: {}", p.evidence.reason)
                    }
                    _ => {
                        tracing::warn!(route = %p.route, to = %target, proposal = %p.id, source = %p.source, queued_because = p.queued_because.as_deref().unwrap_or(""), "proposal queued for review: {}", p.evidence.reason)
                    }
                }
                self.observer.event(&p.route, what, &p.evidence.reason);
                p.status == Status::Applied
            }
            Command::Revert { id, route, reason } => match lock.transition(id, Status::Reverted, "agent", reason) {
                Ok(_) => {
                    let what = if reason.starts_with("verification failed") { "verify-failed" } else { "revert" };
                    tracing::warn!(route = %route, proposal = %id, "back on the primary hop: {reason}");
                    self.observer.event(route, what, reason);
                    true
                }
                Err(e) => {
                    tracing::error!(route = %route, proposal = %id, error = %crate::apply::error_chain(&e), "cannot revert");
                    false
                }
            },
        }
    }

    /// Pending proposals past [`EXPIRE_PENDING_AFTER`] expire (the overlay
    /// holds applied ones only, so it does not change).
    fn expire(&self, proposals: &[Proposal]) {
        let now = now_unix_ms();
        let old: Vec<&Proposal> = proposals
            .iter()
            .filter(|p| {
                p.status == Status::Pending
                    && now.saturating_sub(p.created_unix_ms) > EXPIRE_PENDING_AFTER.as_millis() as u64
            })
            .collect();
        if old.is_empty() {
            return;
        }
        if let Ok(lock) = self.store.lock() {
            for p in old {
                let _ = lock.transition(&p.id, Status::Expired, "agent", "pending for longer than an hour");
            }
        }
    }

    fn report(&mut self, proposals: &[Proposal], clock: Duration) {
        let views = view(proposals);
        let mut counts: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
        for p in proposals {
            *counts.entry(source_kind(p).into()).or_default().entry(p.status.name().into()).or_default() += 1;
        }
        let hops = self
            .hops
            .iter()
            .map(|(id, h)| {
                let (w, m) = (h.settings.window, h.settings.min_samples);
                HopReport {
                    hop: id.clone(),
                    probe_interval_ms: h.settings.interval.as_millis() as u64,
                    loss: h.health.loss(clock, w, m),
                    rtt_smoothed_ms: h.health.smoothed_rtt().map(|d| d.as_secs_f64() * 1e3),
                    rtt_p50_ms: h.health.rtt_quantile_ms(clock, w, 0.5, 1),
                    rtt_p99_ms: h.health.rtt_quantile_ms(clock, w, 0.99, 1),
                    consecutive_misses: h.health.consecutive_misses(),
                    link_up: h.health.link_up(),
                    neighbor_reachable: h.health.neighbor_reachable(),
                    hard_failure: h.health.hard_failure(h.settings.down_after).map(|f| f.to_string()),
                    probe_error: h.error.clone(),
                }
            })
            .collect();
        let snapshot = HealSnapshot {
            routes: self.controller.reports(&views),
            hops,
            proposals: counts,
            overlay_entries: proposals.iter().filter(|p| p.status == Status::Applied).count(),
        };
        if self.last_snapshot_file.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            self.last_snapshot_file = Some(Instant::now());
            let value = json!({ "at_unix_ms": now_unix_ms(), "snapshot": snapshot });
            if let Ok(lock) = self.store.lock() {
                let _ = lock.save_json(&self.store.snapshot_path(), &value);
            }
        }
        self.observer.snapshot(snapshot);
    }

    /// Runs until `stop`.
    pub fn run(mut self, stop: Arc<AtomicBool>) {
        while !stop.load(Ordering::Relaxed) {
            self.refresh_routes();
            self.collect_answers();
            self.probe_due(Instant::now());
            let readable = self.wait();
            if self.events.as_ref().is_some_and(|e| readable.contains(&e.raw_fd())) {
                self.on_events();
            }
            self.collect_answers();
            self.probe_due(Instant::now());
            // A person's decision shows in the store: look at it now and then.
            if self.last_tick.elapsed() >= Duration::from_millis(200) {
                self.dirty = true;
            }
            self.tick();
        }
    }
}

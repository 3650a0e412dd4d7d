//! The heal loop's edge, on a thread of its own: it probes every hop of
//! every watched route on its schedule, follows rtnetlink link and
//! neighbour events, feeds [`super::controller`] and carries out its
//! commands in the proposal store. An overlay change is handed to the
//! agent (`Observer::overlay_changed`), which reconciles: the runner never
//! touches the kernel's eBPF state itself.
//!
//! One thread waits on every probe socket and the netlink socket with one
//! poll(2); probes are sent when due, each with its own timeout.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::controller::{Command, Controller, ProbeSettings, RouteReport, RouteView, WatchedRoute, view};
use super::detector::FlapMemory;
use super::health::HopHealth;
use super::probe::{Echo, ProbeSocket, new_id};
use super::proposal::{HopId, Proposal, Status};
use super::store::{Store, StoreError, now_unix_ms};

use crate::kernel::netlink::{HealthEvent, HealthEvents};

/// Pending proposals older than this expire (the evidence is stale).
pub const EXPIRE_PENDING_AFTER: Duration = Duration::from_secs(3600);
/// The snapshot file's hop figures are at most this old.
const SNAPSHOT_FILE_EVERY: Duration = Duration::from_secs(2);
/// Every route is evaluated at least this often (a safety net: routes
/// are evaluated on news, deadlines and decisions made elsewhere).
const FULL_PASS_EVERY: Duration = Duration::from_secs(10);
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

/// Where the runner reads the datapath's delivery counters of routes
/// (for `drop-rate` rules). The agent reads the kernel's maps; the runner
/// never touches eBPF state itself.
pub trait DeliveryCounters: Send {
    /// For each route id ([`crate::mesh::route_id`]): packets forwarded and
    /// packets whose redirect failed, totals (0 for a route that has not
    /// forwarded yet). An error is no reading this round, not zero.
    fn read(&mut self, route_ids: &[u32]) -> Result<Vec<(u64, u64)>, String>;
}

/// Delivery counters are read at most this often, and at least this
/// rarely, whatever the probe interval.
const DELIVERY_READ_MIN: Duration = Duration::from_millis(100);
const DELIVERY_READ_MAX: Duration = Duration::from_secs(1);

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
    key: HopId,
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
    /// In [`Runner::changed`] already.
    changed: bool,
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
struct HopsHealth<'a>(&'a [Hop]);

impl super::controller::Healths for HopsHealth<'_> {
    fn health(&self, hop: &HopId) -> Option<&HopHealth> {
        self.0.binary_search_by(|h| h.key.cmp(hop)).ok().map(|i| &self.0[i].health)
    }

    fn health_at(&self, at: usize, hop: &HopId) -> Option<&HopHealth> {
        // The runner keeps the controller's order (`refresh_routes`).
        debug_assert!(self.0.get(at).is_some_and(|h| h.key == *hop));
        self.0.get(at).map(|h| &h.health)
    }
}

/// What the snapshot file holds (`bpfsync status` reads it).
#[derive(serde::Serialize)]
struct SnapshotFile<'a> {
    at_unix_ms: u64,
    snapshot: &'a HealSnapshot,
}

pub struct Runner {
    sockets: HashMap<SocketKey, ProbeSocket>,
    /// Every hop, in the controller's order ([`Controller::hops`]): the
    /// runner and the controller name hops by their place here (no string
    /// hashing per probe).
    hops: Vec<Hop>,
    /// Echo identifier → the hop it belongs to.
    ids: HashMap<u16, usize>,
    /// Each hop's next send: one entry per hop.
    sends: BinaryHeap<Reverse<(Instant, usize)>>,
    /// When an echo in flight counts as lost: (deadline, hop, sequence
    /// number); entries of echoes answered since are skipped when due.
    timeouts: BinaryHeap<Reverse<(Instant, usize, u16)>>,
    store: Store,
    routes: Arc<RoutesCell>,
    generation: u64,
    controller: Controller,
    events: Option<HealthEvents>,
    observer: Box<dyn Observer>,
    /// Start of the heal clock: durations since the Unix epoch at start
    /// plus monotonic time since, so windows never jump with the wall
    /// clock and flap times stay comparable across restarts.
    origin: (Instant, Duration),
    last_tick: Instant,
    dirty: bool,
    cache: Option<ProposalCache>,
    /// Hops with new results or events since the last tick.
    changed: Vec<usize>,
    /// When every route was last evaluated.
    last_full_tick: Instant,
    /// The store's per-route view at the last tick.
    last_views: Option<Views>,
    /// The applied proposals at the last tick: a change made elsewhere (a
    /// person's approval) is reconciled at once too.
    last_overlay: Option<Vec<String>>,
    /// When the snapshot file was last written (`bpfsync status` reads it).
    last_snapshot_file: Option<Instant>,
    /// The routes' picture in the file last written.
    last_file_routes: Vec<RouteReport>,
    /// When the snapshot was last made.
    last_report: Option<Instant>,
    delivery: Option<Box<dyn DeliveryCounters>>,
    /// When the delivery counters are read next.
    next_delivery_read: Instant,
    /// The last error reading them (logged once).
    delivery_error: Option<String>,
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
            hops: Vec::new(),
            ids: HashMap::new(),
            sends: BinaryHeap::new(),
            timeouts: BinaryHeap::new(),
            store: Store::new(state_dir),
            routes,
            generation: 0,
            controller: Controller::default(),
            events,
            observer,
            origin: (Instant::now(), unix),
            last_tick: Instant::now(),
            dirty: true,
            changed: Vec::new(),
            cache: None,
            last_full_tick: Instant::now(),
            last_views: None,
            last_overlay: None,
            last_snapshot_file: None,
            last_file_routes: Vec::new(),
            last_report: None,
            delivery: None,
            next_delivery_read: Instant::now(),
            delivery_error: None,
        }
    }

    /// Reads the datapath's delivery counters from `source` (without it,
    /// `drop-rate` is probe loss alone).
    pub fn with_delivery_counters(mut self, source: Box<dyn DeliveryCounters>) -> Runner {
        self.delivery = Some(source);
        self
    }

    /// Reads the delivery counters of the routes with `drop-rate` rules
    /// when due, and hands them to the controller.
    fn read_delivery(&mut self, now: Instant) {
        if now < self.next_delivery_read {
            return;
        }
        let Some(source) = self.delivery.as_mut() else { return };
        let routes = self.controller.delivery_routes();
        let every = routes.iter().map(|r| r.2).min().unwrap_or(DELIVERY_READ_MAX);
        self.next_delivery_read = now + every.clamp(DELIVERY_READ_MIN, DELIVERY_READ_MAX);
        if routes.is_empty() {
            return;
        }
        let ids: Vec<u32> = routes.iter().map(|r| r.1).collect();
        let places: Vec<usize> = routes.iter().map(|r| r.0).collect();
        match source.read(&ids) {
            Ok(counters) => {
                self.delivery_error = None;
                let clock = self.clock(now);
                for (route, (forwarded, failed)) in places.into_iter().zip(counters) {
                    self.controller.record_delivery(clock, route, forwarded, failed);
                }
                self.dirty = true;
            }
            Err(e) => {
                if self.delivery_error.as_deref() != Some(e.as_str()) {
                    tracing::warn!(error = %e, "cannot read the routes' delivery counters; `drop-rate` is probe loss alone until they can be read");
                }
                self.delivery_error = Some(e);
            }
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
        let taken: std::collections::HashSet<u16> = self.hops.iter().map(|h| h.id).collect();
        let mut old: HashMap<HopId, Hop> = self.hops.drain(..).map(|h| (h.key.clone(), h)).collect();
        let now = Instant::now();
        // One dump of the neighbour table for every new hop.
        let neighbors =
            if wanted.iter().all(|(id, _)| old.contains_key(id)) { HashMap::new() } else { neighbor_states() };
        // Every hop the controller names, in its order, probed or not.
        for (id, settings) in wanted {
            let settings = *settings;
            if let Some(mut h) = old.remove(id) {
                h.settings = settings;
                self.hops.push(h);
                continue;
            }
            let target = id.neighbor.parse::<IpAddr>();
            let key: Option<SocketKey> = target.as_ref().ok().map(|t| (id.interface.clone(), t.is_ipv6()));
            let error = match (&target, &key) {
                (Err(_), _) | (_, None) => Some(format!("cannot probe `{}`: not an IP address", id.neighbor)),
                (Ok(target), Some(key)) => match self.sockets.entry(key.clone()) {
                    std::collections::hash_map::Entry::Occupied(_) => None,
                    std::collections::hash_map::Entry::Vacant(v) => {
                        match ProbeSocket::new(&id.interface, target.is_ipv6()) {
                            Ok(s) => {
                                v.insert(s);
                                None
                            }
                            Err(e) => Some(format!("cannot probe through `{}`: {e}", id.interface)),
                        }
                    }
                },
            };
            let target = target.unwrap_or(IpAddr::from([0, 0, 0, 0]));
            if let Some(e) = &error {
                tracing::warn!(hop = %id, "{e}");
            }
            let mut health = HopHealth::default();
            let ifindex = ifindex(&id.interface);
            if let Some(up) = read_link_up(&id.interface) {
                health.set_link(up);
            }
            health.set_neighbor_state(neighbors.get(&(ifindex, target)).copied().flatten());
            let in_use = |i: &u16| taken.contains(i) || self.hops.iter().any(|h| h.id == *i);
            let echo_id = (0..16).map(|_| new_id()).find(|i| !in_use(i)).unwrap_or_else(new_id);
            let socket = if error.is_none() { key } else { None };
            // Hops start spread over the interval (20 slots), so a thousand
            // echoes and their answers do not all meet in one instant; the
            // hops of one slot leave in one batch.
            let slot = id.to_string().bytes().fold(0u32, |a, b| a.wrapping_mul(31).wrapping_add(b as u32)) % 20;
            let next_due = now + settings.interval * slot / 20;
            self.hops.push(Hop {
                key: id.clone(),
                settings,
                target,
                socket,
                id: echo_id,
                seq: 0,
                error,
                next_due,
                inflight: None,
                health,
                ifindex,
                changed: false,
            });
        }
        // Places changed: the indexes and the schedule are built again.
        self.ids = self.hops.iter().enumerate().map(|(i, h)| (h.id, i)).collect();
        self.sends = self.hops.iter().enumerate().map(|(i, h)| Reverse((h.next_due, i))).collect();
        self.timeouts = self
            .hops
            .iter()
            .enumerate()
            .filter_map(|(i, h)| h.inflight.map(|(seq, sent, _)| Reverse((sent + h.settings.timeout, i, seq))))
            .collect();
        self.changed.clear();
        for h in &mut self.hops {
            h.changed = false;
        }
        // Sockets no hop uses any more are closed.
        let used: std::collections::HashSet<&SocketKey> = self.hops.iter().filter_map(|h| h.socket.as_ref()).collect();
        self.sockets.retain(|k, _| used.contains(k));
        self.dirty = true;
    }

    /// Marks hop `i` as having news for the next tick.
    fn touch(&mut self, i: usize) {
        let h = &mut self.hops[i];
        if !h.changed {
            h.changed = true;
            self.changed.push(i);
        }
        self.dirty = true;
    }

    /// Records one probe result of hop `i`.
    fn record(&mut self, i: usize, clock: Duration, rtt: Option<Duration>) {
        self.hops[i].health.record_probe(clock, rtt);
        self.observer.probe(&self.hops[i].key, rtt);
        self.touch(i);
    }

    fn on_events(&mut self) {
        let Some(events) = self.events.as_mut() else { return };
        let batch = match events.recv() {
            Ok(b) => b,
            Err(e) => {
                // Lost events: read every hop's state again.
                tracing::warn!(error = %e, "link and neighbour events were lost; reading their state again");
                let neighbors = neighbor_states();
                for i in 0..self.hops.len() {
                    let h = &mut self.hops[i];
                    h.ifindex = ifindex(&h.key.interface);
                    if let Some(up) = read_link_up(&h.key.interface) {
                        h.health.set_link(up);
                    }
                    h.health.set_neighbor_state(neighbors.get(&(h.ifindex, h.target)).copied().flatten());
                    self.touch(i);
                }
                return;
            }
        };
        for ev in batch {
            match ev {
                HealthEvent::Link(name) => {
                    let up = read_link_up(&name);
                    let index = ifindex(&name);
                    for i in 0..self.hops.len() {
                        let h = &mut self.hops[i];
                        if h.key.interface != name {
                            continue;
                        }
                        h.ifindex = index;
                        if let Some(up) = up {
                            h.health.set_link(up);
                        }
                        self.touch(i);
                    }
                }
                HealthEvent::Neighbor { ifindex, addr, reachable } => {
                    for i in 0..self.hops.len() {
                        let h = &mut self.hops[i];
                        if h.ifindex == ifindex && h.target == addr {
                            h.health.set_neighbor_state(reachable);
                            self.touch(i);
                        }
                    }
                }
            }
        }
    }

    /// Times out the echoes unanswered, and sends the probes that are due:
    /// the hops due together leave in one system call per socket.
    fn probe_due(&mut self, now: Instant) {
        let clock = self.clock(now);
        while let Some(&Reverse((deadline, i, seq))) = self.timeouts.peek() {
            if deadline > now {
                break;
            }
            self.timeouts.pop();
            if self.hops[i].inflight.is_some_and(|(s, _, _)| s == seq) {
                self.hops[i].inflight = None;
                self.record(i, clock, None);
            }
        }
        let mut batches: BTreeMap<SocketKey, Vec<usize>> = BTreeMap::new();
        while let Some(&Reverse((due, i))) = self.sends.peek() {
            if due > now {
                break;
            }
            self.sends.pop();
            let h = &mut self.hops[i];
            // On schedule, not drifting: skip missed slots after a stall.
            h.next_due = due + h.settings.interval;
            if h.next_due < now {
                h.next_due = now + h.settings.interval;
            }
            self.sends.push(Reverse((h.next_due, i)));
            // A timeout is never over the interval (the spec says so), so
            // an echo still in flight is one the loop has not timed out yet.
            if h.inflight.is_some() {
                continue;
            }
            let Some(key) = h.socket.as_ref() else { continue };
            h.seq = h.seq.wrapping_add(1);
            batches.entry(key.clone()).or_default().push(i);
        }
        for (key, batch) in batches {
            let Some(socket) = self.sockets.get(&key) else { continue };
            let echoes: Vec<Echo> = batch
                .iter()
                .map(|&i| Echo { target: self.hops[i].target, id: self.hops[i].id, seq: self.hops[i].seq })
                .collect();
            let sent_wall = std::time::SystemTime::now();
            for (i, result) in batch.into_iter().zip(socket.send_all(&echoes)) {
                match result {
                    Ok(true) => {
                        let h = &mut self.hops[i];
                        h.inflight = Some((h.seq, now, sent_wall));
                        self.timeouts.push(Reverse((now + h.settings.timeout, i, h.seq)));
                    }
                    Ok(false) => self.record(i, clock, None),
                    Err(e) => {
                        let h = &mut self.hops[i];
                        let msg = format!("probe through `{}` failed: {e}", h.key.interface);
                        if h.error.as_deref() != Some(msg.as_str()) {
                            tracing::warn!(hop = %h.key, "{msg}");
                        }
                        h.error = Some(msg);
                    }
                }
            }
        }
    }

    /// The earliest probe send or timeout.
    fn next_event(&self) -> Option<Instant> {
        let send = self.sends.peek().map(|Reverse((t, _))| *t);
        let timeout = self.timeouts.peek().map(|Reverse((t, _, _))| *t);
        send.into_iter().chain(timeout).min()
    }

    /// Reads every answer waiting. Sockets are not polled: answers are
    /// read when the loop wakes for a send, a timeout or an event, and
    /// their kernel receive time keeps the RTT exact (a thousand hops cost
    /// a few dozen wakeups a second, not one per answer).
    fn collect_answers(&mut self) {
        let now = Instant::now();
        let clock = self.clock(now);
        let mut results = Vec::new();
        for (key, socket) in &self.sockets {
            let answers = match socket.answers() {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(interface = %key.0, error = %e, "reading probe answers failed");
                    continue;
                }
            };
            for a in answers {
                let Some(&i) = self.ids.get(&a.id) else { continue };
                let h = &mut self.hops[i];
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
                        results.push((i, rtt));
                    }
                    _ => {} // late (already counted lost), or not ours
                }
            }
        }
        for (i, rtt) in results {
            self.record(i, clock, rtt);
        }
    }

    /// Waits until the next probe send or timeout, or a link or neighbour
    /// event.
    fn wait(&self) -> Vec<std::os::fd::RawFd> {
        let now = Instant::now();
        let mut until = now + Duration::from_millis(200);
        if let Some(next) = self.next_event() {
            until = until.min(next);
        }
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(1);
        if let Some(e) = &self.events {
            fds.push(libc::pollfd { fd: e.raw_fd(), events: libc::POLLIN, revents: 0 });
        }
        if self.delivery.is_some() {
            until = until.min(self.next_delivery_read);
        }
        if self.dirty {
            // A decision is owed: wake up as soon as the tick may run.
            until = until.min(self.last_tick + MIN_TICK);
        }
        // Rounded up: woken a moment late, never early (an early wakeup
        // finds nothing due and sleeps again for nothing).
        let left = until.saturating_duration_since(now);
        let timeout = left.as_micros().div_ceil(1000).min(200) as i32;
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
        // Every route when a decision made elsewhere (a person's) changed
        // the store, and every ten seconds; in between those with news or
        // a deadline (the controller knows which).
        let decided_elsewhere = self.last_views.as_ref().is_none_or(|v| !Arc::ptr_eq(v, &views) && **v != *views);
        let full = decided_elsewhere || now.saturating_duration_since(self.last_full_tick) >= FULL_PASS_EVERY;
        if full {
            self.last_full_tick = now;
        }
        self.last_views = Some(views.clone());
        let changed = &self.changed;
        let hops = HopsHealth(&self.hops);
        let commands = self.controller.tick(clock, now_unix_ms(), &hops, &views, (!full).then_some(changed.as_slice()));
        for i in std::mem::take(&mut self.changed) {
            self.hops[i].changed = false;
        }
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
            .map(|h| {
                let (w, m) = (h.settings.window, h.settings.min_samples);
                let [p50, p99] = h.health.rtt_quantiles_ms(clock, w, [0.5, 0.99], 1);
                HopReport {
                    hop: h.key.clone(),
                    probe_interval_ms: h.settings.interval.as_millis() as u64,
                    loss: h.health.loss(clock, w, m),
                    rtt_smoothed_ms: h.health.smoothed_rtt().map(|d| d.as_secs_f64() * 1e3),
                    rtt_p50_ms: p50,
                    rtt_p99_ms: p99,
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
        // A route's move is in the file at once; the hops' figures (a few
        // hundred kilobytes for a thousand hops) every few seconds.
        if snapshot.routes != self.last_file_routes
            || self.last_snapshot_file.is_none_or(|t| t.elapsed() >= SNAPSHOT_FILE_EVERY)
        {
            self.last_snapshot_file = Some(Instant::now());
            self.last_file_routes = snapshot.routes.clone();
            let file = SnapshotFile { at_unix_ms: now_unix_ms(), snapshot: &snapshot };
            if let Ok(lock) = self.store.lock() {
                let _ = lock.save_json(&self.store.snapshot_path(), &file);
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
            self.read_delivery(Instant::now());
            // A person's decision shows in the store: look at it now and then.
            if self.last_tick.elapsed() >= Duration::from_millis(200) {
                self.dirty = true;
            }
            self.tick();
        }
    }
}

//! Policy impact: which recorded flows a plan would newly drop, newly allow
//! or send to another next hop.
//!
//! Every recorded flow is evaluated twice by [`mesh::evaluate`] — over the
//! tables the kernel runs now (observed) and over the tables the spec would
//! install (desired, resolved against the node) — so the answer is the
//! datapath's own, not a second reading of the spec. Flows whose verdict or
//! next hop differs are grouped for a reviewer: by change, hook, the peer
//! side as the policy prefix that decided it (source on ingress,
//! destination on egress), the other side's address, protocol and
//! destination port, and the deciding rule before and after.
//!
//! A flow counts as a reply of a tracked connection (which a default deny
//! lets through) when the records hold the reverse connection, first seen
//! no later than it, and the policy being evaluated allows that reverse
//! connection on a hook it was recorded on — as the datapath's conntrack
//! would have it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;

use crate::datapath::RouteValue;
use crate::mesh::evaluate::{Check, FastMap, Packet, Tables, Verdict};
use crate::model::{Direction, State};
use crate::net::Cidr;

/// One flow record, as the impact reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedFlow {
    pub interface: String,
    pub direction: Direction,
    pub protocol: u8,
    pub source: IpAddr,
    pub source_port: u16,
    pub destination: IpAddr,
    pub destination_port: u16,
    /// Unix nanoseconds.
    pub time: u64,
    pub packets: u64,
    pub bytes: u64,
}

/// What changes for a group of flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Change {
    NewlyDropped,
    NewlyAllowed,
    Rerouted,
}

/// Flows that change the same way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub change: Change,
    pub interface: String,
    pub direction: &'static str,
    /// A prefix (the policy's or the route's) or an address.
    pub source: String,
    pub destination: String,
    /// `tcp/8080`, `udp/53`, `icmp`.
    pub service: String,
    /// The deciding rule (or the next hop) before and after.
    pub before: String,
    pub after: String,
    /// Distinct connections (5-tuples) in the group.
    pub flows: u64,
    pub records: u64,
    pub packets: u64,
    pub bytes: u64,
    /// Unix nanoseconds.
    pub first_seen: u64,
    pub last_seen: u64,
}

/// The impact of a plan on recorded traffic, rendered by [`render_text`]
/// and [`to_value`] (the JSON plan's `impact`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Impact {
    /// Records read and distinct flows (connection on a hook) evaluated.
    pub records: u64,
    pub flows: u64,
    /// Unix nanoseconds of the first and last record evaluated.
    pub since: Option<u64>,
    pub until: Option<u64>,
    /// Flows whose verdict and next hop stay the same.
    pub unchanged: u64,
    /// Records that could not be evaluated, by reason.
    pub not_evaluated: BTreeMap<String, u64>,
    /// Largest groups first.
    pub groups: Vec<Group>,
}

impl Impact {
    /// Records that could not be turned into flows (counted, with why).
    pub fn skip_records(&mut self, reason: String, n: u64) {
        self.records += n;
        *self.not_evaluated.entry(reason).or_default() += n;
    }

    /// Flows (not groups) of one kind of change.
    pub fn count(&self, change: Change) -> u64 {
        self.groups.iter().filter(|g| g.change == change).map(|g| g.flows).sum()
    }
}

/// Interface names and indexes of the node (observed).
pub struct Interfaces<'a>(pub &'a BTreeMap<String, u32>);

impl Interfaces<'_> {
    fn name(&self, ifindex: u32) -> String {
        self.0.iter().find(|(_, i)| **i == ifindex).map_or_else(|| format!("ifindex {ifindex}"), |(n, _)| n.clone())
    }
}

/// What the records of one connection on one hook add up to.
#[derive(Debug, Clone, Copy)]
struct Totals {
    records: u64,
    packets: u64,
    bytes: u64,
    first: u64,
    last: u64,
}

/// The connection a packet belongs to, the same whichever hook saw it.
type Tuple = (u8, IpAddr, u16, IpAddr, u16);

fn tuple(p: &Packet) -> Tuple {
    (p.protocol, p.source, p.source_port, p.destination, p.destination_port)
}

fn reverse(t: &Tuple) -> Tuple {
    (t.0, t.3, t.4, t.1, t.2)
}

/// Evaluates `flows` against the tables of `before` (observed) and `after`
/// (desired, resolved); interfaces are named by `observed`.
pub fn evaluate(before: &State, after: &State, observed: &State, flows: &[RecordedFlow]) -> Impact {
    let (old, new) = std::thread::scope(|s| {
        let old = s.spawn(|| Tables::from_state(before));
        (old.join().expect("building tables does not panic"), Tables::from_state(after))
    });
    evaluate_tables(&old, &new, &Interfaces(&observed.interfaces), flows)
}

pub fn evaluate_tables(old: &Tables, new: &Tables, interfaces: &Interfaces, flows: &[RecordedFlow]) -> Impact {
    let mut impact = Impact::default();
    let mut by_flow: FastMap<Packet, Totals> = FastMap::default();
    for f in flows {
        impact.records += 1;
        let Some(&ifindex) = interfaces.0.get(&f.interface) else {
            *impact.not_evaluated.entry(format!("interface `{}` not on this node", f.interface)).or_default() += 1;
            continue;
        };
        if f.source.is_ipv4() != f.destination.is_ipv4() {
            *impact.not_evaluated.entry("mixed address families".into()).or_default() += 1;
            continue;
        }
        impact.since = Some(impact.since.map_or(f.time, |t| t.min(f.time)));
        impact.until = Some(impact.until.map_or(f.time, |t| t.max(f.time)));
        let packet = Packet {
            ifindex,
            direction: f.direction,
            protocol: f.protocol,
            source: f.source,
            source_port: f.source_port,
            destination: f.destination,
            destination_port: f.destination_port,
        };
        let t =
            by_flow.entry(packet).or_insert(Totals { records: 0, packets: 0, bytes: 0, first: f.time, last: f.time });
        t.records += 1;
        t.packets = t.packets.saturating_add(f.packets);
        t.bytes = t.bytes.saturating_add(f.bytes);
        t.first = t.first.min(f.time);
        t.last = t.last.max(f.time);
    }
    impact.flows = by_flow.len() as u64;

    // Where each connection was first seen, and the hooks it was seen on
    // (a list threaded through `hooks`: no allocation per connection).
    let mut connections: FastMap<Tuple, (u64, usize)> = FastMap::default();
    let mut hooks: Vec<(Packet, usize)> = Vec::with_capacity(by_flow.len());
    for (packet, t) in &by_flow {
        let e = connections.entry(tuple(packet)).or_insert((t.first, usize::MAX));
        e.0 = e.0.min(t.first);
        hooks.push((*packet, e.1));
        e.1 = hooks.len() - 1;
    }
    // Whether a connection seen first at `seen`, on the hooks from `head`,
    // was let through somewhere by `tables` — then its reverse is a reply.
    let allowed_somewhere = |tables: &Tables, mut at: usize| -> bool {
        while let Some((hook, next)) = hooks.get(at) {
            if !tables.evaluate(hook, false).dropped() {
                return true;
            }
            at = *next;
        }
        false
    };

    // Each flow, with the hooks of the connection it replies to (seen no
    // later than it), if any.
    let flows: Vec<(&Packet, &Totals, Option<usize>)> = by_flow
        .iter()
        .map(|(packet, t)| {
            let original = connections.get(&reverse(&tuple(packet))).filter(|(seen, _)| *seen <= t.first);
            (packet, t, original.map(|(_, head)| *head))
        })
        .collect();
    // The two sides are independent: one thread each (the lookups are
    // cache misses in tables of 100,000 entries, not computation).
    let verdicts = |tables: &Tables| -> Vec<Verdict> {
        flows
            .iter()
            .map(|(p, _, original)| tables.evaluate(p, original.is_some_and(|h| allowed_somewhere(tables, h))))
            .collect()
    };
    let (was_all, will_all) = std::thread::scope(|s| {
        let was = s.spawn(|| verdicts(old));
        let will = verdicts(new);
        (was.join().expect("the evaluation does not panic"), will)
    });

    let mut groups: BTreeMap<GroupKey, Group> = BTreeMap::new();
    for (((p, t, _), was), will) in flows.iter().zip(&was_all).zip(&will_all) {
        let Some(change) = change_of(was, will) else {
            impact.unchanged += 1;
            continue;
        };
        let key = group_key(change, p, was, will, old, new, interfaces);
        let g = groups.entry(key.clone()).or_insert_with(|| Group {
            change,
            interface: interfaces.name(p.ifindex),
            direction: p.direction.as_str(),
            source: key.source.clone(),
            destination: key.destination.clone(),
            service: key.service.clone(),
            before: key.before.clone(),
            after: key.after.clone(),
            flows: 0,
            records: 0,
            packets: 0,
            bytes: 0,
            first_seen: t.first,
            last_seen: t.last,
        });
        g.flows += 1;
        g.records += t.records;
        g.packets = g.packets.saturating_add(t.packets);
        g.bytes = g.bytes.saturating_add(t.bytes);
        g.first_seen = g.first_seen.min(t.first);
        g.last_seen = g.last_seen.max(t.last);
    }
    impact.groups = groups.into_values().collect();
    impact.groups.sort_by(|a, b| {
        (a.change, std::cmp::Reverse(a.flows), std::cmp::Reverse(a.packets)).cmp(&(
            b.change,
            std::cmp::Reverse(b.flows),
            std::cmp::Reverse(b.packets),
        ))
    });
    impact
}

fn next_hop(v: &Verdict) -> Option<RouteValue> {
    v.route.filter(|_| !v.dropped())
}

fn change_of(was: &Verdict, will: &Verdict) -> Option<Change> {
    match (was.dropped(), will.dropped()) {
        (false, true) => Some(Change::NewlyDropped),
        (true, false) => Some(Change::NewlyAllowed),
        (true, true) => None,
        // The route's counter id may change with the route: the next hop is
        // the interface and the MACs.
        (false, false) => {
            let hop = |r: Option<RouteValue>| r.map(|r| (r.ifindex, r.src_mac, r.dst_mac));
            (hop(next_hop(was)) != hop(next_hop(will))).then_some(Change::Rerouted)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct GroupKey {
    change: Change,
    ifindex: u32,
    direction: Direction,
    source: String,
    destination: String,
    service: String,
    before: String,
    after: String,
}

/// The more specific of two matched prefixes.
fn longer(a: Option<Cidr>, b: Option<Cidr>) -> Option<Cidr> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if b.len > a.len { b } else { a }),
        (a, b) => a.or(b),
    }
}

pub fn service(protocol: u8, port: u16) -> String {
    let name = crate::mesh::policy::protocol_name(protocol);
    match protocol {
        6 | 17 | 132 => format!("{name}/{port}"),
        _ => name,
    }
}

/// Why a packet gets its verdict, in spec terms.
fn reason(v: &Verdict, tables: &Tables) -> String {
    let named = |id: u32| tables.rule_name(id).unwrap_or_else(|| "a rule set without entries".into());
    if v.dropped() {
        return named(v.deciding_rule());
    }
    let replied = matches!(v.check, Check::Reply { .. }) || matches!(v.out_check, Some(Check::Reply { .. }));
    match v.deciding_rule() {
        0 if replied => "reply of a tracked connection".into(),
        0 => "no policy".into(),
        id if replied => format!("{} (reply of a tracked connection)", named(id)),
        id => named(id),
    }
}

fn hop_text(v: &Verdict, interfaces: &Interfaces) -> String {
    match next_hop(v) {
        None => "the node's own stack (no route)".into(),
        Some(r) => format!("{} {}", interfaces.name(r.ifindex), crate::mesh::mac_string(&r.dst_mac)),
    }
}

fn group_key(
    change: Change,
    p: &Packet,
    was: &Verdict,
    will: &Verdict,
    old: &Tables,
    new: &Tables,
    interfaces: &Interfaces,
) -> GroupKey {
    let peer = longer(was.peer_prefix, will.peer_prefix);
    let (mut source, mut destination) = (p.source.to_string(), p.destination.to_string());
    let (before, after) = if change == Change::Rerouted {
        // A route is chosen by destination alone.
        source = "*".into();
        if let Some(prefix) = longer(was.route_prefix, will.route_prefix) {
            destination = prefix.to_string();
        }
        (hop_text(was, interfaces), hop_text(will, interfaces))
    } else {
        if let Some(prefix) = peer {
            match p.direction {
                Direction::Ingress => source = prefix.to_string(),
                Direction::Egress => destination = prefix.to_string(),
            }
        }
        (reason(was, old), reason(will, new))
    };
    GroupKey {
        change,
        ifindex: p.ifindex,
        direction: p.direction,
        source,
        destination,
        service: service(p.protocol, p.destination_port),
        before,
        after,
    }
}

// ---- Rendering ----

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The impact as text, after the plan.
pub fn render_text(impact: &Impact) -> String {
    let t = crate::time::format_rfc3339_seconds;
    let mut out = String::new();
    let window = match (impact.since, impact.until) {
        (Some(a), Some(b)) => format!(", {} .. {}", t(a), t(b)),
        _ => String::new(),
    };
    let _ = writeln!(
        out,
        "\nPolicy impact on {} ({}{window}):",
        plural(impact.flows, "recorded flow", "recorded flows"),
        plural(impact.records, "record", "records")
    );
    for (change, symbol, title) in [
        (Change::NewlyDropped, '-', "newly dropped"),
        (Change::NewlyAllowed, '+', "newly allowed"),
        (Change::Rerouted, '~', "to another next hop"),
    ] {
        let groups: Vec<&Group> = impact.groups.iter().filter(|g| g.change == change).collect();
        if groups.is_empty() {
            continue;
        }
        let _ = writeln!(out, "\n  {symbol} {} {title}", plural(impact.count(change), "flow", "flows"));
        for g in groups {
            let _ = writeln!(
                out,
                "      {} {} -> {} on {} {}: {}, {}, first {} last {}",
                g.service,
                g.source,
                g.destination,
                g.interface,
                g.direction,
                plural(g.flows, "flow", "flows"),
                plural(g.packets, "packet", "packets"),
                t(g.first_seen),
                t(g.last_seen)
            );
            let _ = writeln!(out, "          {} -> {}", g.before, g.after);
        }
    }
    if impact.groups.is_empty() {
        let _ = writeln!(out, "\n  No recorded flow changes its verdict or next hop.");
    }
    for (reason, n) in &impact.not_evaluated {
        let _ = writeln!(out, "\n  {} not evaluated: {reason}", plural(*n, "record", "records"));
    }
    let _ = writeln!(
        out,
        "\nImpact: {} newly dropped, {} newly allowed, {} to another next hop, {} unchanged.",
        impact.count(Change::NewlyDropped),
        impact.count(Change::NewlyAllowed),
        impact.count(Change::Rerouted),
        impact.unchanged
    );
    out
}

/// The impact under `impact` in the JSON plan.
pub fn to_value(impact: &Impact) -> serde_json::Value {
    let t = crate::time::format_rfc3339;
    let groups = |change: Change| -> Vec<serde_json::Value> {
        impact
            .groups
            .iter()
            .filter(|g| g.change == change)
            .map(|g| {
                serde_json::json!({
                    "interface": g.interface,
                    "direction": g.direction,
                    "source": g.source,
                    "destination": g.destination,
                    "service": g.service,
                    "before": g.before,
                    "after": g.after,
                    "flows": g.flows,
                    "records": g.records,
                    "packets": g.packets,
                    "bytes": g.bytes,
                    "first_seen": t(g.first_seen),
                    "last_seen": t(g.last_seen),
                })
            })
            .collect()
    };
    serde_json::json!({
        "records": impact.records,
        "flows": impact.flows,
        "since": impact.since.map(t),
        "until": impact.until.map(t),
        "newly_dropped": groups(Change::NewlyDropped),
        "newly_allowed": groups(Change::NewlyAllowed),
        "rerouted": groups(Change::Rerouted),
        "unchanged": impact.unchanged,
        "not_evaluated": impact.not_evaluated,
        "summary": {
            "newly_dropped": impact.count(Change::NewlyDropped),
            "newly_allowed": impact.count(Change::NewlyAllowed),
            "rerouted": impact.count(Change::Rerouted),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tables(spec: &str) -> (State, State) {
        let loaded = crate::spec::load(std::path::Path::new("t.yaml"), spec).unwrap_or_else(|d| panic!("{d}"));
        let desired = crate::compile::compile(&loaded, &mut crate::compile::ObjectLoader::default()).unwrap();
        let node = State { interfaces: [("veth0".to_string(), 2)].into(), ..Default::default() };
        let (resolved, _) = super::super::resolve_desired(&desired.state, &node);
        (resolved.into_owned(), node)
    }

    fn udp(direction: Direction, source: &str, sport: u16, destination: &str, dport: u16, time: u64) -> RecordedFlow {
        RecordedFlow {
            interface: "veth0".into(),
            direction,
            protocol: 17,
            source: source.parse().unwrap(),
            source_port: sport,
            destination: destination.parse().unwrap(),
            destination_port: dport,
            time,
            packets: 1,
            bytes: 60,
        }
    }

    const BASE: &str = "apiVersion: bpfsync/v1\nkind: NodeSpec\ninterfaces:\n  - { name: veth0, mesh: { mode: skb } }\npolicies:\n  - name: api\n    interfaces: [veth0]\n    ingress:\n      - from: [10.9.0.0/16]\n";

    #[test]
    fn a_reply_passes_a_default_deny_only_while_its_connection_is_allowed() {
        let (loose, node) = tables(BASE);
        let tight = format!("{BASE}    egress:\n      - to: [10.1.0.0/16]\n");
        let (tight, _) = tables(&tight);
        let out = udp(Direction::Egress, "10.0.0.1", 5353, "10.0.3.3", 53, 1);
        let reply = udp(Direction::Ingress, "10.0.3.3", 53, "10.0.0.1", 5353, 2);
        // Under the same policy the reply is let through: nothing changes.
        let same = evaluate(&loose, &loose, &node, &[out.clone(), reply.clone()]);
        assert_eq!((same.unchanged, same.groups.len()), (2, 0), "{same:#?}");
        // Egress tightened: the request is dropped, so its reply is too.
        let i = evaluate(&loose, &tight, &node, &[out.clone(), reply.clone()]);
        assert_eq!(i.count(Change::NewlyDropped), 2, "{i:#?}");
        let reply_group = i.groups.iter().find(|g| g.direction == "ingress").unwrap();
        assert_eq!(reply_group.before, "default deny ingress on veth0 (api) (reply of a tracked connection)");
        assert_eq!(reply_group.after, "default deny ingress on veth0 (api)");
        // A "reply" seen before its request is no reply: dropped on both sides.
        let early = udp(Direction::Ingress, "10.0.3.3", 53, "10.0.0.1", 5353, 0);
        let i = evaluate(&loose, &loose, &node, &[out, early]);
        assert_eq!(i.unchanged, 2);
        let (old, new) = (Tables::from_state(&loose), Tables::from_state(&loose));
        let p = Packet {
            ifindex: 2,
            direction: Direction::Ingress,
            protocol: 17,
            source: "10.0.3.3".parse().unwrap(),
            source_port: 53,
            destination: "10.0.0.1".parse().unwrap(),
            destination_port: 5353,
        };
        assert!(old.evaluate(&p, false).dropped() && new.evaluate(&p, false).dropped());
    }

    #[test]
    fn records_of_one_connection_add_up_and_unknown_interfaces_are_counted() {
        let (loose, node) = tables(BASE);
        let (tight, _) = tables(&BASE.replace("10.9.0.0/16", "10.9.0.0/24"));
        let mut flows = vec![udp(Direction::Ingress, "10.9.7.1", 1000, "10.0.0.1", 53, 5); 3];
        flows[1].time = 9;
        flows[2].time = 7;
        flows.push(RecordedFlow { interface: "veth9".into(), ..flows[0].clone() });
        let i = evaluate(&loose, &tight, &node, &flows);
        assert_eq!((i.records, i.flows), (4, 1));
        let g = &i.groups[0];
        assert_eq!(
            (g.change, g.flows, g.records, g.packets, g.first_seen, g.last_seen),
            (Change::NewlyDropped, 1, 3, 3, 5, 9)
        );
        assert_eq!(g.source, "10.9.0.0/16", "the policy prefix that decided before");
        assert_eq!(i.not_evaluated.get("interface `veth9` not on this node"), Some(&1));
        let text = render_text(&i);
        assert!(text.contains("- 1 flow newly dropped"), "{text}");
        assert!(
            text.contains("Impact: 1 newly dropped, 0 newly allowed, 0 to another next hop, 0 unchanged."),
            "{text}"
        );
    }
}

//! The mesh datapath's model: policies and routes from the spec, compiled
//! into entries of the built-in `mesh` program's maps.
//!
//! Compilation is in two parts. [`compile`] is pure in the spec: rule ids,
//! rule sets and decision tables, routes with symbolic next hops.
//! [`resolve`] adds what only the node knows — interface indexes and MACs,
//! neighbour MACs — from the observed state, so the planner stays a pure
//! function of (desired, observed). A route whose next hop cannot be
//! resolved is reported and left as the kernel has it, never half-written.

pub mod counters;
pub mod evaluate;
pub mod policy;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde_json::{Value, json};

use crate::datapath::{Plain, RouteKey, RouteValue};
use crate::entries::Entries;
use crate::model::{Direction, MapRef, State};
use crate::net::{Cidr, parse_mac};
use crate::spec::{NodeSpec, XdpMode};

pub use policy::PolicyTables;

pub use crate::spec::mesh::{EGRESS_PROGRAM, PROGRAM, REDIRECT_ERR_EVENT, REDIRECT_ERR_PROGRAM};
pub const PEERS_MAP: &str = "policy_peers";
pub const ACTIONS_MAP: &str = "policy_actions";
pub const NAMES_MAP: &str = "rule_names";
pub const ROUTES_MAP: &str = "mesh_routes";
/// Flow record settings (`struct flow_config`), from the spec's `flows:`.
pub const FLOW_CONFIG_MAP: &str = "flow_config";

/// The `flow_config` value for a spec's `flows:` (0 = the datapath's default).
pub fn flow_config(f: Option<&crate::spec::FlowsSpec>) -> crate::datapath::FlowConfig {
    let ns = |d: &Option<crate::spec::DurationSpec>| {
        d.as_ref().and_then(|d| d.to_duration()).map_or(0, |t| t.as_nanos().min(u64::MAX as u128) as u64)
    };
    match f {
        None => Default::default(),
        Some(f) => crate::datapath::FlowConfig {
            disabled: u32::from(f.enabled == Some(false)),
            drop_records_per_sec: f.drop_records_per_second.unwrap_or(0),
            report_interval_ns: ns(&f.report_interval),
            drop_window_ns: ns(&f.drop_window),
        },
    }
}
/// The generation of the policy and route tables (`datapath_generation`):
/// bumped after every write to [`GENERATION_GUARDED`] maps, it retires the
/// decisions the datapath cached for established flows.
pub const GENERATION_MAP: &str = "datapath_generation";
/// The maps the datapath's cached decisions are made from.
pub const GENERATION_GUARDED: [&str; 3] = [PEERS_MAP, ACTIONS_MAP, ROUTES_MAP];
/// Maps whose entries bpfsync writes from the spec.
pub const MANAGED_MAPS: [&str; 4] = [ACTIONS_MAP, PEERS_MAP, NAMES_MAP, ROUTES_MAP];
/// Maps of policy entries, shown in the plan in spec terms.
pub const POLICY_MAPS: [&str; 3] = [ACTIONS_MAP, PEERS_MAP, NAMES_MAP];

pub fn map_ref(map: &str) -> MapRef {
    MapRef { program: PROGRAM.into(), map: map.into() }
}

/// A next hop of a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextHop {
    pub interface: String,
    pub neighbor: IpAddr,
    /// Given in the spec; otherwise looked up in the neighbour table.
    pub mac: Option<[u8; 6]>,
}

impl std::fmt::Display for NextHop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} via {}", self.neighbor, self.interface)
    }
}

/// A route: the primary hop is installed; fallbacks are kept for the
/// anomaly detector, which switches a route by rewriting its one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub id: u32,
    pub prefix: Cidr,
    pub via: NextHop,
    pub fallback: Vec<NextHop>,
}

/// Everything the mesh datapath needs from the spec.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MeshModel {
    pub policy: PolicyTables,
    pub routes: Vec<Route>,
    /// Interfaces that run the datapath, with their XDP mode.
    pub interfaces: BTreeMap<String, XdpMode>,
}

pub use crate::spec::mesh::{in_use, interfaces};

/// The id a route has in the datapath's maps and counters: a function of
/// its prefix alone.
pub fn route_id(prefix: &Cidr) -> u32 {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(format!("route\0{prefix}").as_bytes());
    u32::from_le_bytes([d[0], d[1], d[2], d[3]])
}

fn next_hop(h: &crate::spec::NextHopSpec) -> Option<NextHop> {
    Some(NextHop {
        interface: h.interface.clone(),
        neighbor: h.neighbor.parse().ok()?,
        mac: h.mac.as_deref().and_then(parse_mac),
    })
}

/// Compiles the mesh sections of a validated spec.
pub fn compile(spec: &NodeSpec) -> MeshModel {
    let routes = spec
        .routes
        .iter()
        .filter_map(|r| {
            let prefix: Cidr = r.prefix.parse().ok()?;
            Some(Route {
                id: route_id(&prefix),
                prefix,
                via: next_hop(&r.via)?,
                fallback: r.fallback.iter().filter_map(next_hop).collect(),
            })
        })
        .collect();
    MeshModel {
        policy: policy::compile(spec),
        routes,
        interfaces: interfaces(spec).into_iter().map(|(k, (m, _))| (k, m)).collect(),
    }
}

pub use crate::model::Unresolved;

impl crate::model::NodeFacts for MeshModel {
    fn resolve(&self, observed: &State) -> (BTreeMap<MapRef, Entries>, Vec<Unresolved>) {
        let (entries, unresolved) = resolve(self, observed);
        (entries.into_iter().map(|(m, e)| (map_ref(m), e)).collect(), unresolved)
    }

    fn needs(&self) -> (Vec<String>, Vec<(String, std::net::IpAddr)>) {
        let hops = self.routes.iter().flat_map(|r| std::iter::once(&r.via).chain(&r.fallback));
        let interfaces = hops.clone().map(|h| h.interface.clone()).collect();
        let neighbors = hops.filter(|h| h.mac.is_none()).map(|h| (h.interface.clone(), h.neighbor)).collect();
        (interfaces, neighbors)
    }

    fn generation(&self) -> Option<(MapRef, Vec<MapRef>)> {
        Some((map_ref(GENERATION_MAP), GENERATION_GUARDED.iter().map(|m| map_ref(m)).collect()))
    }

    fn counter_ids(&self) -> Vec<(MapRef, std::collections::BTreeSet<u32>)> {
        let rules: std::collections::BTreeSet<u32> = self.policy.names.keys().copied().collect();
        let routes: std::collections::BTreeSet<u32> = self.routes.iter().map(|r| r.id).collect();
        counters::RULE_COUNTER_MAPS
            .iter()
            .map(|m| (map_ref(m), rules.clone()))
            .chain(counters::ROUTE_COUNTER_MAPS.iter().map(|m| (map_ref(m), routes.clone())))
            .collect()
    }
}

/// `struct route_key`.
pub fn encode_route_key(prefix: &Cidr) -> Vec<u8> {
    let mut addr = [0u8; 16];
    let b = prefix.addr_bytes();
    addr[..b.len()].copy_from_slice(&b);
    let family = if prefix.addr.is_ipv4() { 4 } else { 6 };
    RouteKey { prefixlen: 32 + prefix.len as u32, family, pad: [0; 3], addr }.to_vec()
}

/// `struct route_value`.
pub fn encode_route_value(ifindex: u32, route_id: u32, src: [u8; 6], dst: [u8; 6]) -> Vec<u8> {
    RouteValue { ifindex, route_id, src_mac: src, dst_mac: dst }.to_vec()
}

pub fn decode_route_key(k: &[u8]) -> Option<Cidr> {
    let key = RouteKey::read(k)?;
    let len = key.prefixlen.checked_sub(32)? as u8;
    let addr = match key.family {
        4 => IpAddr::from(<[u8; 4]>::try_from(&key.addr[..4]).ok()?),
        _ => IpAddr::from(key.addr),
    };
    Some(Cidr { addr, len })
}

/// (ifindex, route id, source MAC, next-hop MAC).
pub fn decode_route_value(v: &[u8]) -> Option<(u32, u32, [u8; 6], [u8; 6])> {
    let r = RouteValue::read(v)?;
    Some((r.ifindex, r.route_id, r.src_mac, r.dst_mac))
}

pub fn mac_string(m: &[u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// The next hop's resolved (ifindex, source MAC, destination MAC), or why
/// not.
fn resolve_hop(hop: &NextHop, observed: &State) -> Result<(u32, [u8; 6], [u8; 6]), String> {
    let Some(&ifindex) = observed.interfaces.get(&hop.interface) else {
        return Err(format!("interface `{}` does not exist", hop.interface));
    };
    let Some(src) = observed.interface_macs.get(&hop.interface) else {
        return Err(format!("interface `{}` has no Ethernet address", hop.interface));
    };
    let dst = match hop.mac {
        Some(m) => m,
        None => match observed.neighbors.get(&(hop.interface.clone(), hop.neighbor)) {
            Some(m) => *m,
            None => {
                return Err(format!(
                    "neighbour {} on `{}` is not in the neighbour table (no usable ARP/NDP entry); give its `mac:` or let the node reach it first",
                    hop.neighbor, hop.interface
                ));
            }
        },
    };
    Ok((ifindex, *src, dst))
}

/// The entries of the mesh maps for this node, and what could not be
/// resolved. Unresolved routes keep the entry the kernel has, if any.
pub fn resolve(model: &MeshModel, observed: &State) -> (BTreeMap<&'static str, Entries>, Vec<Unresolved>) {
    let mut unresolved = Vec::new();
    let mut peers = Vec::new();
    let mut actions = Vec::new();
    let mut used_sets = BTreeSet::new();
    for ((iface, dir), list) in &model.policy.peers {
        let Some(&ifindex) = observed.interfaces.get(iface) else {
            unresolved.push(Unresolved {
                what: format!("{} policy on `{iface}`", dir.as_str()),
                message: format!("interface `{iface}` does not exist; its policy is installed when it appears"),
            });
            continue;
        };
        for e in list {
            used_sets.insert(e.set_id);
            peers.push(policy::encode_peer(ifindex, *dir, e));
        }
    }
    for id in used_sets {
        for d in &model.policy.sets[&id] {
            actions.push(policy::encode_decision(id, d));
        }
    }
    let names: Entries = model.policy.names.iter().map(|(id, n)| policy::encode_rule_name(*id, n)).collect();

    let observed_routes = observed.maps.get(&map_ref(ROUTES_MAP)).map(|m| &m.entries);
    let mut routes = Vec::new();
    for r in &model.routes {
        let key = encode_route_key(&r.prefix);
        match resolve_hop(&r.via, observed) {
            Ok((ifindex, src, dst)) => routes.push((key, encode_route_value(ifindex, r.id, src, dst))),
            Err(message) => {
                if let Some(v) = observed_routes.and_then(|e| e.get(&key)) {
                    routes.push((key, v.to_vec()));
                }
                unresolved.push(Unresolved { what: format!("route {}", r.prefix), message });
            }
        }
    }
    let mut out = BTreeMap::new();
    out.insert(PEERS_MAP, peers.into_iter().collect());
    out.insert(ACTIONS_MAP, actions.into_iter().collect());
    out.insert(NAMES_MAP, names);
    out.insert(ROUTES_MAP, routes.into_iter().collect());
    (out, unresolved)
}

/// Human names for what mesh map entries hold: interfaces by index and
/// rule names by id.
#[derive(Debug, Default)]
pub struct Names {
    pub interfaces: BTreeMap<u32, String>,
    pub rules: BTreeMap<u32, String>,
}

impl Names {
    pub fn new(observed: &State, desired_rules: &Entries, observed_rules: Option<&Entries>) -> Names {
        let mut rules = BTreeMap::new();
        for (k, v) in observed_rules.into_iter().flat_map(|e| e.iter()).chain(desired_rules.iter()) {
            if let Ok(id) = <[u8; 4]>::try_from(k) {
                rules.insert(u32::from_ne_bytes(id), policy::decode_rule_name(v));
            }
        }
        Names { interfaces: observed.interfaces.iter().map(|(n, i)| (*i, n.clone())).collect(), rules }
    }

    fn iface(&self, ifindex: u32) -> String {
        self.interfaces.get(&ifindex).cloned().unwrap_or_else(|| format!("ifindex {ifindex}"))
    }

    fn rule(&self, id: u32) -> String {
        match id {
            0 => "no policy (allow)".into(),
            _ => self.rules.get(&id).cloned().unwrap_or_else(|| format!("rule {id:#010x}")),
        }
    }
}

/// A readable (key, value) for an entry of a mesh map; None for other maps.
pub fn describe(map: &str, key: &[u8], value: &[u8], names: &Names) -> Option<(String, Value)> {
    match map {
        ROUTES_MAP => {
            let prefix = decode_route_key(key)?;
            let (ifindex, id, src, dst) = decode_route_value(value)?;
            Some((
                prefix.to_string(),
                json!({ "interface": names.iface(ifindex), "next-hop-mac": mac_string(&dst), "source-mac": mac_string(&src), "route-id": format!("{id:#010x}") }),
            ))
        }
        PEERS_MAP => {
            let (ifindex, dir, prefix) = policy::decode_peer_key(key)?;
            let set = u32::from_ne_bytes(value.try_into().ok()?);
            Some((
                format!("{} {} {prefix}", names.iface(ifindex), dir.as_str()),
                json!({ "set": format!("{set:#010x}") }),
            ))
        }
        ACTIONS_MAP => {
            let (set, d) = policy::decode_decision(key, value)?;
            Some((
                format!("{set:#010x} {}", scope_text(&d.scope)),
                json!({ "rule": names.rule(d.rule_id), "action": d.action.as_str() }),
            ))
        }
        NAMES_MAP => {
            let id = u32::from_ne_bytes(key.try_into().ok()?);
            Some((format!("{id:#010x}"), json!(policy::decode_rule_name(value))))
        }
        _ => None,
    }
}

fn scope_text(s: &policy::Scope) -> String {
    match *s {
        policy::Scope::All => "any".into(),
        policy::Scope::Protocol(p) => policy::protocol_name(p),
        policy::Scope::Port { protocol, port, bits } => {
            let span = 1u32 << (16 - bits);
            let hi = port as u32 + span - 1;
            if span == 1 {
                format!("{}/{port}", policy::protocol_name(protocol))
            } else {
                format!("{}/{port}-{hi}", policy::protocol_name(protocol))
            }
        }
    }
}

/// A policy rule's reach, in spec terms, before and after a plan.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PolicyChange {
    /// `api ingress[0]`, `default deny ingress on veth0 (api)`.
    pub rule: String,
    pub added: Vec<String>,
    pub removed: Vec<String>,
}

/// What each rule decides, as readable atoms (`from 10.0.0.0/24 tcp/8080
/// on veth0`), read back from the policy maps. An atom an enclosing
/// prefix already gives the same rule is left out, so the atoms read like
/// the spec.
pub fn policy_atoms(peers: &Entries, actions: &Entries, names: &Names) -> BTreeMap<String, BTreeSet<String>> {
    let mut tables: BTreeMap<u32, Vec<policy::Decision>> = BTreeMap::new();
    for (k, v) in actions.iter() {
        if let Some((set, d)) = policy::decode_decision(k, v) {
            tables.entry(set).or_default().push(d);
        }
    }
    // (ifindex, dir, family) → prefixes with their set, shortest first.
    let mut hooks: BTreeMap<(u32, Direction, bool), Vec<(Cidr, u32)>> = BTreeMap::new();
    for (k, v) in peers.iter() {
        let (Some((ifindex, dir, prefix)), Ok(set)) = (policy::decode_peer_key(k), <[u8; 4]>::try_from(v)) else {
            continue;
        };
        hooks.entry((ifindex, dir, prefix.addr.is_ipv4())).or_default().push((prefix, u32::from_ne_bytes(set)));
    }
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for ((ifindex, dir, _), mut list) in hooks {
        list.sort_by_key(|(c, _)| c.len);
        let side = if dir == Direction::Ingress { "from" } else { "to" };
        let atoms_of =
            |set: u32| -> BTreeSet<(u32, String)> { merged_scopes(tables.get(&set).map(Vec::as_slice).unwrap_or(&[])) };
        for (i, (prefix, set)) in list.iter().enumerate() {
            let parent = list[..i].iter().rev().find(|(c, _)| c.contains(prefix));
            let inherited = parent.map(|(_, s)| atoms_of(*s)).unwrap_or_default();
            let own = atoms_of(*set);
            let iface = names.iface(ifindex);
            for (rule, scope) in own.difference(&inherited).filter(|(r, _)| *r != 0) {
                out.entry(names.rule(*rule)).or_default().insert(format!("{side} {prefix} {scope} on {iface}"));
            }
            // What the enclosing prefix decides and this one does not: a
            // hole (`except`, or another rule deciding instead).
            for (rule, scope) in inherited.difference(&own).filter(|(r, _)| *r != 0) {
                out.entry(names.rule(*rule)).or_default().insert(format!("except {side} {prefix} {scope} on {iface}"));
            }
        }
    }
    out
}

/// A set's table as (rule, readable scope), adjacent port prefixes of one
/// rule merged into ranges.
fn merged_scopes(table: &[policy::Decision]) -> BTreeSet<(u32, String)> {
    let mut out = BTreeSet::new();
    let mut ranges: BTreeMap<(u32, u8), Vec<(u32, u32)>> = BTreeMap::new();
    for d in table {
        match d.scope {
            policy::Scope::Port { protocol, port, bits } => ranges
                .entry((d.rule_id, protocol))
                .or_default()
                .push((port as u32, port as u32 + (1 << (16 - bits)) - 1)),
            s => {
                out.insert((d.rule_id, scope_text(&s)));
            }
        }
    }
    for ((rule, proto), mut rs) in ranges {
        rs.sort();
        let mut merged: Vec<(u32, u32)> = Vec::new();
        for (lo, hi) in rs {
            match merged.last_mut() {
                Some(last) if last.1 + 1 == lo => last.1 = hi,
                _ => merged.push((lo, hi)),
            }
        }
        for (lo, hi) in merged {
            let name = policy::protocol_name(proto);
            out.insert((rule, if lo == hi { format!("{name}/{lo}") } else { format!("{name}/{lo}-{hi}") }));
        }
    }
    out
}

/// Rule by rule, what a plan adds to and removes from each rule's reach.
pub fn policy_changes(
    before: &BTreeMap<String, BTreeSet<String>>,
    after: &BTreeMap<String, BTreeSet<String>>,
) -> Vec<PolicyChange> {
    let rules: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    let empty = BTreeSet::new();
    rules
        .into_iter()
        .filter_map(|rule| {
            let b = before.get(rule).unwrap_or(&empty);
            let a = after.get(rule).unwrap_or(&empty);
            // Holes after what they cut into.
            let ordered = |mut v: Vec<String>| {
                v.sort_by_key(|x| x.starts_with("except "));
                v
            };
            let added = ordered(a.difference(b).cloned().collect());
            let removed = ordered(b.difference(a).cloned().collect());
            (!added.is_empty() || !removed.is_empty()).then(|| PolicyChange { rule: rule.clone(), added, removed })
        })
        .collect()
}

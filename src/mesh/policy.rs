//! Policies → the two LPM tables of the `mesh` datapath.
//!
//! A single LPM key over (interface, direction, protocol, port, address)
//! cannot wildcard the port of an entry while it fixes an address prefix
//! (an LPM key only wildcards its tail). So the lookup has two stages, as
//! Cilium's identity + policy maps do:
//!
//! 1. `policy_peers`: (interface, direction, peer address) → a rule *set*:
//!    every rule whose peers contain the address and whose `except`s do
//!    not. Overlapping prefixes are resolved here, in user space: the entry
//!    for a prefix names the set of the rules that cover that prefix, so the
//!    longest match alone gives the answer.
//! 2. `policy_actions`: (set, protocol, destination port prefix) → the
//!    deciding rule and its action. Port ranges become prefixes; explicit
//!    denies are folded in (deny wins), so the longest match is the
//!    decision. Every set has a /32 entry (its default).
//!
//! Both lookups cost the same whatever the number of rules.
//!
//! Transition safety: a set's id is a digest of its table, so a set id
//! always means the same table. The planner writes new sets before the
//! peers that point at them and removes old ones after; peer entries are
//! written most specific first and removed least specific first (see
//! `plan::order_lpm_changes`). Then at every step of an apply, the longest
//! match for an address is either its old or its new longest match, with
//! that side's table: every packet meets its old or its new verdict.
//! `tests/kernel_policy_transition.rs` checks this on random changes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use sha2::{Digest, Sha256};

use crate::datapath::{Plain, PolicyActionKey, PolicyActionValue, PolicyPeerKey, PolicyPeerValue};
use crate::model::Direction;
use crate::net::Cidr;
use crate::spec::{NodeSpec, PolicyRule, Protocol};

/// Rule ids with this bit set are the default deny of an interface and
/// direction (the datapath lets replies of tracked connections through
/// those, and only those).
pub const RULE_DEFAULT_BIT: u32 = 0x8000_0000;

/// `enum policy_action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    Allow = 1,
    Deny = 2,
}

impl Action {
    pub fn from_byte(b: u8) -> Option<Action> {
        match b {
            1 => Some(Action::Allow),
            2 => Some(Action::Deny),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }
}

/// What traffic a rule matches besides its peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Match {
    Any,
    Protocol(u8),
    Ports(u8, u16, u16),
}

/// One spec rule, in one direction.
#[derive(Debug, Clone, PartialEq)]
struct Rule {
    id: u32,
    name: String,
    action: Action,
    /// Empty: every address (of both families).
    peers: Vec<Cidr>,
    excepts: Vec<Cidr>,
    matches: Vec<Match>,
}

/// Level of a `policy_actions` entry, from its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// prefixlen 32: any protocol, any port.
    All,
    /// prefixlen 40: one protocol, any port.
    Protocol(u8),
    /// prefixlen 48 + bits: a port prefix of one protocol.
    Port { protocol: u8, port: u16, bits: u8 },
}

impl Scope {
    fn prefixlen(self) -> u32 {
        match self {
            Scope::All => 32,
            Scope::Protocol(_) => 40,
            Scope::Port { bits, .. } => 48 + bits as u32,
        }
    }
}

/// One entry of a rule set's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Decision {
    pub scope: Scope,
    pub rule_id: u32,
    pub action: Action,
}

/// One `policy_peers` entry, before interfaces are resolved to ifindexes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PeerEntry {
    pub prefix: Cidr,
    pub set_id: u32,
}

/// Policies compiled, independent of the node's interface indexes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicyTables {
    /// (interface, direction) → its peer entries.
    pub peers: BTreeMap<(String, Direction), Vec<PeerEntry>>,
    /// Set id → its table.
    pub sets: BTreeMap<u32, Vec<Decision>>,
    /// Rule id → spec name (`api ingress[0]`, `default deny ingress on veth0`).
    pub names: BTreeMap<u32, String>,
}

fn digest32(parts: &[&[u8]]) -> u32 {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u32).to_le_bytes());
        h.update(p);
    }
    let d = h.finalize();
    u32::from_le_bytes([d[0], d[1], d[2], d[3]])
}

/// Ids are digests of names, so editing one rule renumbers nothing else;
/// a collision moves the later name on.
fn assign_id(names: &mut BTreeMap<u32, String>, name: &str, default: bool) -> u32 {
    let mut salt = 0u32;
    loop {
        let mut id = digest32(&[name.as_bytes(), &salt.to_le_bytes()]) & !RULE_DEFAULT_BIT;
        if default {
            id |= RULE_DEFAULT_BIT;
        }
        if id != 0 && id != RULE_DEFAULT_BIT && !names.contains_key(&id) {
            names.insert(id, name.to_string());
            return id;
        }
        salt += 1;
    }
}

fn protocol_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
        Protocol::Icmp => 1,
        Protocol::Icmpv6 => 58,
    }
}

pub fn protocol_name(n: u8) -> String {
    match n {
        6 => "tcp".into(),
        17 => "udp".into(),
        132 => "sctp".into(),
        1 => "icmp".into(),
        58 => "icmpv6".into(),
        other => format!("proto-{other}"),
    }
}

fn masked(c: Cidr) -> Cidr {
    Cidr { addr: mask(c.addr, c.len), len: c.len }
}

fn bits(a: &IpAddr) -> u128 {
    match a {
        IpAddr::V4(v) => u32::from(*v) as u128,
        IpAddr::V6(v) => u128::from(*v),
    }
}

fn mask(a: IpAddr, len: u8) -> IpAddr {
    let width = Cidr::max_len(&a) as u32;
    let keep = if len == 0 { 0 } else { u128::MAX << (width - len as u32) };
    let b = bits(&a) & keep;
    match a {
        IpAddr::V4(_) => IpAddr::from((b as u32).to_be_bytes()),
        IpAddr::V6(_) => IpAddr::from(b.to_be_bytes()),
    }
}

fn family_root(v4: bool) -> Cidr {
    if v4 { Cidr { addr: IpAddr::from([0u8; 4]), len: 0 } } else { Cidr { addr: IpAddr::from([0u8; 16]), len: 0 } }
}

/// The minimal list of (port, prefix bits) covering `lo..=hi`.
pub fn port_prefixes(lo: u16, hi: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (lo as u32, hi as u32);
    while lo <= hi {
        let mut size = 1u32;
        while size < 65536 && lo.is_multiple_of(size * 2) && lo + size * 2 - 1 <= hi {
            size *= 2;
        }
        out.push((lo as u16, 16 - size.trailing_zeros() as u8));
        lo += size;
    }
    out
}

fn rule_matches(rule: &PolicyRule) -> Vec<Match> {
    if !rule.ports.is_empty() {
        rule.ports
            .iter()
            .map(|p| Match::Ports(protocol_number(p.protocol), p.port, p.end_port.unwrap_or(p.port)))
            .collect()
    } else if let Some(p) = rule.protocol {
        vec![Match::Protocol(protocol_number(p))]
    } else {
        vec![Match::Any]
    }
}

fn cidrs(list: &[String]) -> Vec<Cidr> {
    list.iter().filter_map(|s| s.parse::<Cidr>().ok()).map(masked).collect()
}

/// The rules that apply to one interface and direction, and whether a
/// policy selects it (default deny).
#[derive(Default)]
struct Selection {
    rules: Vec<Rule>,
    selected_by: Vec<String>,
}

/// Compiles the spec's policies. The spec has been validated.
pub fn compile(spec: &NodeSpec) -> PolicyTables {
    let mut names = BTreeMap::new();
    let mut by_hook: BTreeMap<(String, Direction), Selection> = BTreeMap::new();
    for p in &spec.policies {
        let mut rules: Vec<(Direction, Rule)> = Vec::new();
        let sections = [
            ("ingress", Some(Direction::Ingress), p.ingress.as_deref().unwrap_or(&[]), Action::Allow),
            ("egress", Some(Direction::Egress), p.egress.as_deref().unwrap_or(&[]), Action::Allow),
            ("deny", None, &p.deny[..], Action::Deny),
        ];
        for (section, dir, list, action) in sections {
            for (i, r) in list.iter().enumerate() {
                let name = format!("{} {section}[{i}]", p.name);
                let id = assign_id(&mut names, &name, false);
                let dirs: Vec<Direction> = match dir {
                    Some(d) => vec![d],
                    // A deny rule applies where its peers say: `from` on
                    // ingress, `to` on egress, neither: both.
                    None => match (r.from.is_empty(), r.to.is_empty()) {
                        (false, true) => vec![Direction::Ingress],
                        (true, false) => vec![Direction::Egress],
                        _ => vec![Direction::Ingress, Direction::Egress],
                    },
                };
                for d in dirs {
                    let peers = cidrs(if d == Direction::Ingress { &r.from } else { &r.to });
                    rules.push((
                        d,
                        Rule {
                            id,
                            name: name.clone(),
                            action,
                            peers,
                            excepts: cidrs(&r.except),
                            matches: rule_matches(r),
                        },
                    ));
                }
            }
        }
        for iface in &p.interfaces {
            for d in [Direction::Ingress, Direction::Egress] {
                let selects = if d == Direction::Ingress { p.ingress.is_some() } else { p.egress.is_some() };
                let sel = by_hook.entry((iface.clone(), d)).or_default();
                if selects {
                    sel.selected_by.push(p.name.clone());
                }
                sel.rules.extend(rules.iter().filter(|(rd, _)| *rd == d).map(|(_, r)| r.clone()));
            }
        }
    }

    let mut tables = PolicyTables::default();
    for ((iface, dir), sel) in by_hook {
        if sel.selected_by.is_empty() && sel.rules.is_empty() {
            continue;
        }
        let default = if sel.selected_by.is_empty() {
            None
        } else {
            let name = format!("default deny {} on {iface} ({})", dir.as_str(), sel.selected_by.join(", "));
            Some(assign_id(&mut names, &name, true))
        };
        let mut entries = Vec::new();
        for v4 in [true, false] {
            compile_family(&sel.rules, default, v4, &mut tables.sets, &mut entries);
        }
        tables.peers.insert((iface, dir), entries);
    }
    tables.names = names;
    tables
}

/// The peer entries of one family on one interface and direction.
fn compile_family(
    rules: &[Rule],
    default: Option<u32>,
    v4: bool,
    sets: &mut BTreeMap<u32, Vec<Decision>>,
    out: &mut Vec<PeerEntry>,
) {
    let root = family_root(v4);
    // Rules of this family; no peers means every address.
    let peers_of = |r: &Rule| -> Vec<Cidr> {
        if r.peers.is_empty() {
            vec![root]
        } else {
            r.peers.iter().copied().filter(|c| c.addr.is_ipv4() == v4).collect()
        }
    };
    let family_rules: Vec<(usize, Vec<Cidr>)> =
        rules.iter().enumerate().map(|(i, r)| (i, peers_of(r))).filter(|(_, p)| !p.is_empty()).collect();
    if family_rules.is_empty() && default.is_none() {
        return;
    }
    // Every prefix that starts or ends a rule's reach, by (len, address).
    let mut at: HashMap<(u8, u128), Vec<(usize, bool)>> = HashMap::new();
    let mut prefixes: BTreeSet<(u8, u128)> = BTreeSet::new();
    prefixes.insert((0, 0));
    for (i, peers) in &family_rules {
        for c in peers {
            at.entry((c.len, bits(&c.addr))).or_default().push((*i, false));
            prefixes.insert((c.len, bits(&c.addr)));
        }
        for c in rules[*i].excepts.iter().filter(|c| c.addr.is_ipv4() == v4) {
            at.entry((c.len, bits(&c.addr))).or_default().push((*i, true));
            prefixes.insert((c.len, bits(&c.addr)));
        }
    }
    let lens: BTreeSet<u8> = prefixes.iter().map(|(l, _)| *l).collect();
    let width = if v4 { 32u32 } else { 128 };
    let mask_bits = |b: u128, len: u8| if len == 0 { 0 } else { b & (u128::MAX << (width - len as u32)) };
    let mut emitted: HashMap<(u8, u128), u32> = HashMap::new();
    let mut cache: HashMap<Vec<usize>, u32> = HashMap::new();
    for &(len, b) in &prefixes {
        // Rules covering this prefix: a peer contains it, no except does.
        let (mut peer_of, mut excepted) = (BTreeSet::new(), BTreeSet::new());
        for &l in lens.range(..=len) {
            for &(i, is_except) in at.get(&(l, mask_bits(b, l))).into_iter().flatten() {
                if is_except {
                    excepted.insert(i)
                } else {
                    peer_of.insert(i)
                };
            }
        }
        let members: Vec<usize> = peer_of.difference(&excepted).copied().collect();
        let set_id = match cache.get(&members) {
            Some(id) => *id,
            None => {
                let table = decide(rules, &members, default);
                let id = intern(sets, table);
                cache.insert(members, id);
                id
            }
        };
        // Skip prefixes that say what their nearest emitted ancestor says.
        let parent = lens.range(..len).rev().find_map(|&l| emitted.get(&(l, mask_bits(b, l))).copied());
        if parent == Some(set_id) {
            continue;
        }
        emitted.insert((len, b), set_id);
        let addr = if v4 { IpAddr::from((b as u32).to_be_bytes()) } else { IpAddr::from(b.to_be_bytes()) };
        out.push(PeerEntry { prefix: Cidr { addr, len }, set_id });
    }
}

/// Interns a table under a digest of its contents; equal ids always mean
/// equal tables (a collision with another table moves this one on).
fn intern(sets: &mut BTreeMap<u32, Vec<Decision>>, table: Vec<Decision>) -> u32 {
    let mut bytes = Vec::with_capacity(table.len() * 12);
    for d in &table {
        let (k, v) = encode_decision(0, d);
        bytes.extend_from_slice(&k);
        bytes.extend_from_slice(&v);
    }
    let mut salt = 0u32;
    loop {
        let id = digest32(&[&bytes, &salt.to_le_bytes()]);
        match sets.get(&id) {
            Some(t) if *t == table => return id,
            None if id != 0 => {
                sets.insert(id, table);
                return id;
            }
            _ => salt += 1,
        }
    }
}

/// The decision table of a set of rules (indexes into `rules`, in spec
/// order). Deny beats allow; among allows the most specific names the
/// verdict, then the first in spec order.
fn decide(rules: &[Rule], members: &[usize], default: Option<u32>) -> Vec<Decision> {
    let rs: Vec<&Rule> = members.iter().map(|&i| &rules[i]).collect();
    let first = |action: Action, pred: &dyn Fn(&Match) -> bool| -> Option<u32> {
        rs.iter().find(|r| r.action == action && r.matches.iter().any(pred)).map(|r| r.id)
    };
    let default_decision = match default {
        Some(id) => (id, Action::Deny),
        None => (0, Action::Allow),
    };
    let base = first(Action::Deny, &|m| *m == Match::Any)
        .map(|id| (id, Action::Deny))
        .or_else(|| first(Action::Allow, &|m| *m == Match::Any).map(|id| (id, Action::Allow)))
        .unwrap_or(default_decision);
    let mut table = vec![Decision { scope: Scope::All, rule_id: base.0, action: base.1 }];
    if base.1 == Action::Deny && base.0 != default_decision.0 {
        return table; // an explicit deny of everything
    }
    let protocols: BTreeSet<u8> = rs
        .iter()
        .flat_map(|r| r.matches.iter())
        .filter_map(|m| match m {
            Match::Any => None,
            Match::Protocol(p) | Match::Ports(p, ..) => Some(*p),
        })
        .collect();
    for proto in protocols {
        let pbase = first(Action::Deny, &|m| *m == Match::Protocol(proto))
            .map(|id| (id, Action::Deny))
            .or_else(|| first(Action::Allow, &|m| *m == Match::Protocol(proto)).map(|id| (id, Action::Allow)))
            .unwrap_or(base);
        if pbase != base {
            table.push(Decision { scope: Scope::Protocol(proto), rule_id: pbase.0, action: pbase.1 });
        }
        if pbase.1 == Action::Deny && pbase.0 != default_decision.0 {
            continue;
        }
        // Port ranges of this protocol, walked segment by segment.
        let ranges: Vec<(Action, u32, u16, u16)> = rs
            .iter()
            .flat_map(|r| {
                r.matches.iter().filter_map(move |m| match m {
                    Match::Ports(p, lo, hi) if *p == proto => Some((r.action, r.id, *lo, *hi)),
                    _ => None,
                })
            })
            .collect();
        let mut cuts: BTreeSet<u32> = BTreeSet::new();
        for (_, _, lo, hi) in &ranges {
            cuts.insert(*lo as u32);
            cuts.insert(*hi as u32 + 1);
        }
        let cuts: Vec<u32> = cuts.into_iter().collect();
        let mut runs: Vec<(u32, u32, (u32, Action))> = Vec::new();
        for w in cuts.windows(2) {
            let (lo, hi) = (w[0], w[1] - 1);
            let covering =
                |a: Action| ranges.iter().find(|(ra, _, rlo, rhi)| *ra == a && *rlo as u32 <= lo && hi <= *rhi as u32);
            let d = covering(Action::Deny)
                .map(|r| (r.1, Action::Deny))
                .or_else(|| covering(Action::Allow).map(|r| (r.1, Action::Allow)))
                .unwrap_or(pbase);
            match runs.last_mut() {
                Some(last) if last.2 == d && last.1 + 1 == lo => last.1 = hi,
                _ => runs.push((lo, hi, d)),
            }
        }
        for (lo, hi, d) in runs {
            if d == pbase {
                continue;
            }
            for (port, bits) in port_prefixes(lo as u16, hi as u16) {
                table.push(Decision { scope: Scope::Port { protocol: proto, port, bits }, rule_id: d.0, action: d.1 });
            }
        }
    }
    table
}

// ---- Encoding (bpf/bpfsync.h) ----

/// `struct policy_peer_key` and `struct policy_peer_value`.
pub fn encode_peer(ifindex: u32, dir: Direction, e: &PeerEntry) -> (Vec<u8>, Vec<u8>) {
    let mut addr = [0u8; 16];
    let b = e.prefix.addr_bytes();
    addr[..b.len()].copy_from_slice(&b);
    let key = PolicyPeerKey {
        prefixlen: 64 + e.prefix.len as u32,
        ifindex,
        dir: dir_byte(dir),
        family: if e.prefix.addr.is_ipv4() { 4 } else { 6 },
        pad: [0; 2],
        addr,
    };
    (key.to_vec(), PolicyPeerValue { set_id: e.set_id }.to_vec())
}

pub fn dir_byte(d: Direction) -> u8 {
    match d {
        Direction::Ingress => 0,
        Direction::Egress => 1,
    }
}

/// `struct policy_action_key` and `struct policy_action_value`.
pub fn encode_decision(set_id: u32, d: &Decision) -> (Vec<u8>, Vec<u8>) {
    let (protocol, port) = match d.scope {
        Scope::All => (0, 0),
        Scope::Protocol(p) => (p, 0),
        Scope::Port { protocol, port, .. } => (protocol, port),
    };
    let key = PolicyActionKey { prefixlen: d.scope.prefixlen(), set_id, protocol, pad: 0, port_be: port.to_be() };
    let value = PolicyActionValue { rule_id: d.rule_id, action: d.action as u8, pad: [0; 3] };
    (key.to_vec(), value.to_vec())
}

/// `struct rule_name` (`RULE_NAME_LEN` bytes, NUL-padded; long names are
/// cut at a character boundary).
pub use crate::datapath::RULE_NAME_LEN;

pub fn encode_rule_name(id: u32, name: &str) -> (Vec<u8>, Vec<u8>) {
    let mut end = name.len().min(RULE_NAME_LEN - 1);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    let mut v = name.as_bytes()[..end].to_vec();
    v.resize(RULE_NAME_LEN, 0);
    (id.to_ne_bytes().to_vec(), v)
}

pub fn decode_rule_name(v: &[u8]) -> String {
    let end = v.iter().position(|b| *b == 0).unwrap_or(v.len());
    String::from_utf8_lossy(&v[..end]).into_owned()
}

/// A decoded `policy_peers` key: (ifindex, direction, prefix).
pub fn decode_peer_key(k: &[u8]) -> Option<(u32, Direction, Cidr)> {
    let key = PolicyPeerKey::read(k)?;
    let dir = if key.dir == 0 { Direction::Ingress } else { Direction::Egress };
    let addr = match key.family {
        4 => IpAddr::from(<[u8; 4]>::try_from(&key.addr[..4]).ok()?),
        _ => IpAddr::from(key.addr),
    };
    Some((key.ifindex, dir, Cidr { addr, len: key.prefixlen.checked_sub(64)? as u8 }))
}

/// A decoded `policy_actions` entry: (set id, decision).
pub fn decode_decision(k: &[u8], v: &[u8]) -> Option<(u32, Decision)> {
    let (key, value) = (PolicyActionKey::read(k)?, PolicyActionValue::read(v)?);
    let (proto, port) = (key.protocol, u16::from_be(key.port_be));
    let scope = match key.prefixlen {
        32 => Scope::All,
        40 => Scope::Protocol(proto),
        n if (48..=64).contains(&n) => Scope::Port { protocol: proto, port, bits: (n - 48) as u8 },
        _ => return None,
    };
    Some((key.set_id, Decision { scope, rule_id: value.rule_id, action: Action::from_byte(value.action)? }))
}

/// What a (set, protocol, port) lookup returns: the longest matching
/// entry of the set's table. For tests and `bpfsync` explanations.
pub fn lookup(table: &[Decision], protocol: u8, port: u16) -> Option<Decision> {
    table
        .iter()
        .filter(|d| match d.scope {
            Scope::All => true,
            Scope::Protocol(p) => p == protocol,
            Scope::Port { protocol: p, port: base, bits } => {
                let m = if bits == 0 { 0 } else { u16::MAX << (16 - bits) };
                p == protocol && port & m == base & m
            }
        })
        .max_by_key(|d| d.scope.prefixlen())
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_become_minimal_prefixes() {
        assert_eq!(port_prefixes(8080, 8080), vec![(8080, 16)]);
        assert_eq!(port_prefixes(0, 65535), vec![(0, 0)]);
        assert_eq!(
            port_prefixes(9000, 9100),
            vec![(9000, 13), (9008, 12), (9024, 10), (9088, 13), (9096, 14), (9100, 16)]
        );
        // Every port of a range is covered exactly once, nothing outside.
        for (lo, hi) in [(1u16, 1023u16), (9000, 9100), (65534, 65535), (3, 5)] {
            let ps = port_prefixes(lo, hi);
            let mut covered = 0u32;
            for (base, bits) in &ps {
                covered += 1 << (16 - bits);
                assert!(*base >= lo);
            }
            assert_eq!(covered, (hi - lo) as u32 + 1, "{lo}-{hi}");
        }
    }
}

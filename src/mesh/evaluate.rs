//! The mesh datapath's decision, evaluated in user space over its tables.
//!
//! Reads the same map entries the kernel reads — `policy_peers`,
//! `policy_actions`, `mesh_routes`, `rule_names` as bytes, from the observed
//! or the desired state — and follows `mesh.bpf.c` step by step: the peer
//! LPM lookup keyed by (interface, direction, family, address), the action
//! LPM lookup keyed by (set, protocol, destination port), deny-by-default
//! letting replies of tracked connections through, and on ingress the route
//! lookup and the outgoing interface's egress check that the XDP program
//! makes before it redirects. There is no second reading of the spec here:
//! the longest-prefix match is the kernel's (bits compared from the first
//! byte of the key after `prefixlen`, most significant bit first), so what
//! the tables say is what this answers. `tests/kernel_impact_equivalence.rs`
//! checks that against `BPF_PROG_TEST_RUN` on random policies and packets.
//!
//! Not modelled, because a flow record does not carry it: a TTL about to
//! expire (the kernel then passes the packet to the stack instead of
//! redirecting it) and packets that cannot be parsed.

use std::collections::HashMap;
use std::net::IpAddr;

use crate::datapath::{Plain, PolicyActionValue, PolicyPeerValue, RouteValue};
use crate::entries::Entries;
use crate::model::{Direction, State};
use crate::net::Cidr;

use super::policy::{Action, RULE_DEFAULT_BIT, decode_rule_name, dir_byte};
use super::{ACTIONS_MAP, NAMES_MAP, PEERS_MAP, ROUTES_MAP, map_ref};

/// A hasher for the fixed-size keys here: a multiply-rotate over 8-byte
/// words. std's SipHash resists flooding, which does not matter for tables
/// the node's own spec produced, and cost a third of an impact evaluation.
#[derive(Default, Clone, Copy)]
pub struct WordHasher(u64);

impl std::hash::Hasher for WordHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.write_u64(u64::from_ne_bytes(c.try_into().expect("eight bytes")));
        }
        let mut tail = [0u8; 8];
        let rest = chunks.remainder();
        tail[..rest.len()].copy_from_slice(rest);
        self.write_u64(u64::from_ne_bytes(tail) ^ rest.len() as u64);
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(n as u64);
    }
    fn write_u16(&mut self, n: u16) {
        self.write_u64(n as u64);
    }
    fn write_u8(&mut self, n: u8) {
        self.write_u64(n as u64);
    }
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// A hash map over [`WordHasher`].
pub type FastMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<WordHasher>>;

/// The entries of one prefix length: the mask of that length, and the
/// entries keyed by their data under it.
type SameLength<const N: usize, V> = (u32, [u8; N], FastMap<[u8; N], V>);

/// An LPM trie's entries (`N` bytes of data after `prefixlen`), answering
/// longest-prefix lookups as the kernel's `BPF_MAP_TYPE_LPM_TRIE` does.
#[derive(Debug, Clone)]
struct Lpm<const N: usize, V> {
    /// Prefix lengths present, longest first.
    by_len: Vec<SameLength<N, V>>,
}

fn mask_of<const N: usize>(bits: u32) -> [u8; N] {
    let mut m = [0u8; N];
    for (i, b) in m.iter_mut().enumerate() {
        let start = i as u32 * 8;
        *b = match bits.saturating_sub(start) {
            0 => 0,
            n if n >= 8 => 0xff,
            n => 0xffu8 << (8 - n),
        };
    }
    m
}

fn masked<const N: usize>(data: &[u8; N], mask: &[u8; N]) -> [u8; N] {
    std::array::from_fn(|i| data[i] & mask[i])
}

impl<const N: usize, V> Lpm<N, V> {
    /// From a map's entries (key = `u32 prefixlen` + `N` bytes of data);
    /// entries whose key or value does not decode are left out and counted.
    fn from_entries(entries: &Entries, decode: impl Fn(&[u8]) -> Option<V>) -> (Lpm<N, V>, usize) {
        let mut lens: FastMap<u32, FastMap<[u8; N], V>> = FastMap::default();
        let mut bad = 0;
        for (k, v) in entries.iter() {
            let decoded = (k.len() == 4 + N).then(|| decode(v)).flatten();
            let Some(value) = decoded else {
                bad += 1;
                continue;
            };
            let prefixlen = u32::from_ne_bytes(k[..4].try_into().expect("four bytes"));
            if prefixlen as usize > N * 8 {
                bad += 1;
                continue;
            }
            let data: [u8; N] = k[4..].try_into().expect("N bytes");
            lens.entry(prefixlen).or_default().insert(masked(&data, &mask_of(prefixlen)), value);
        }
        let mut by_len: Vec<_> = lens.into_iter().map(|(len, m)| (len, mask_of(len), m)).collect();
        by_len.sort_by_key(|(len, _, _)| std::cmp::Reverse(*len));
        (Lpm { by_len }, bad)
    }

    /// The longest entry matching `data` (a key's data at full length),
    /// with its prefix length.
    fn longest(&self, data: &[u8; N]) -> Option<(u32, &V)> {
        self.by_len.iter().find_map(|(len, mask, entries)| entries.get(&masked(data, mask)).map(|v| (*len, v)))
    }
}

impl<const N: usize, V> Default for Lpm<N, V> {
    fn default() -> Self {
        Lpm { by_len: Vec::new() }
    }
}

/// One packet as the datapath classifies it: the hook it meets and its
/// 5-tuple (ports in host order; ICMP echo as `mesh.bpf.c` reads it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Packet {
    pub ifindex: u32,
    pub direction: Direction,
    pub protocol: u8,
    pub source: IpAddr,
    pub source_port: u16,
    pub destination: IpAddr,
    pub destination_port: u16,
}

impl Packet {
    /// The same connection seen the other way (a reply's original).
    pub fn reversed(&self) -> (IpAddr, u16, IpAddr, u16) {
        (self.destination, self.destination_port, self.source, self.source_port)
    }
}

/// What one hook's policy check decided (`policy_check`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Check {
    /// No policy covers the interface and direction.
    NoPolicy,
    /// Allowed by a rule (0: a rule set with no default and no rule for it).
    Allow { rule: u32 },
    /// A default deny let a reply of a tracked connection through.
    Reply { rule: u32 },
    /// Dropped by a rule or a default deny (0: a set without entries).
    Deny { rule: u32 },
}

impl Check {
    pub fn allows(self) -> bool {
        !matches!(self, Check::Deny { .. })
    }
}

/// The decision for a packet on its hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// The check of the packet's own hook.
    pub check: Check,
    /// Ingress only: the route the packet would take (`mesh_routes`).
    pub route: Option<RouteValue>,
    /// Ingress with a route: the outgoing interface's egress check.
    pub out_check: Option<Check>,
    /// The longest `policy_peers` prefix that matched the peer address
    /// (source on ingress, destination on egress), if any.
    pub peer_prefix: Option<Cidr>,
    /// The longest `mesh_routes` prefix that matched, if any.
    pub route_prefix: Option<Cidr>,
}

impl Verdict {
    pub fn dropped(&self) -> bool {
        !self.check.allows() || self.out_check.is_some_and(|c| !c.allows())
    }

    /// The rule the datapath names for this packet: the one that dropped
    /// it, else the one that let it in, else the one that let it out
    /// (0: none).
    pub fn deciding_rule(&self) -> u32 {
        let id = |c: Check| match c {
            Check::NoPolicy => 0,
            Check::Allow { rule } | Check::Reply { rule } | Check::Deny { rule } => rule,
        };
        match (self.check, self.out_check) {
            (Check::Deny { rule }, _) | (_, Some(Check::Deny { rule })) => rule,
            (c, _) if id(c) != 0 => id(c),
            (_, Some(out)) => id(out),
            _ => 0,
        }
    }
}

/// The mesh tables of one state (observed: what the kernel runs; desired,
/// resolved: what the spec would install).
#[derive(Debug, Clone, Default)]
pub struct Tables {
    peers: Lpm<24, u32>,
    actions: Lpm<8, (u32, u8)>,
    routes: Lpm<20, RouteValue>,
    names: FastMap<u32, String>,
    /// Entries that did not decode (left out of the lookups).
    pub malformed: usize,
}

fn addr16(a: &IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match a {
        IpAddr::V4(v) => out[..4].copy_from_slice(&v.octets()),
        IpAddr::V6(v) => out = v.octets(),
    }
    out
}

fn family(a: &IpAddr) -> u8 {
    if a.is_ipv4() { 4 } else { 6 }
}

/// The prefix an LPM match stands for: `len` bits of `addr`.
fn prefix_of(addr: &IpAddr, len: u32) -> Cidr {
    let len = len.min(Cidr::max_len(addr) as u32) as u8;
    let bits = |width: u32, b: u128| if len == 0 { 0 } else { b & (u128::MAX << (width - len as u32)) };
    let addr = match addr {
        IpAddr::V4(v) => IpAddr::from((bits(32, u32::from(*v) as u128) as u32).to_be_bytes()),
        IpAddr::V6(v) => IpAddr::from(bits(128, u128::from(*v)).to_be_bytes()),
    };
    Cidr { addr, len }
}

impl Tables {
    /// The mesh maps' entries of `state` (absent maps: empty tables, as a
    /// node without the mesh program passes everything).
    pub fn from_state(state: &State) -> Tables {
        let empty = Entries::new();
        let entries = |name: &str| state.maps.get(&map_ref(name)).map_or(&empty, |m| &m.entries);
        Tables::from_entries(entries(PEERS_MAP), entries(ACTIONS_MAP), entries(ROUTES_MAP), entries(NAMES_MAP))
    }

    pub fn from_entries(peers: &Entries, actions: &Entries, routes: &Entries, names: &Entries) -> Tables {
        let (peers, bad_peers) = Lpm::from_entries(peers, |v| PolicyPeerValue::read(v).map(|p| p.set_id));
        let (actions, bad_actions) =
            Lpm::from_entries(actions, |v| PolicyActionValue::read(v).map(|a| (a.rule_id, a.action)));
        let (routes, bad_routes) = Lpm::from_entries(routes, RouteValue::read);
        let names = names
            .iter()
            .filter_map(|(k, v)| Some((u32::from_ne_bytes(k.try_into().ok()?), decode_rule_name(v))))
            .collect();
        Tables { peers, actions, routes, names, malformed: bad_peers + bad_actions + bad_routes }
    }

    /// A rule's spec name (`api ingress[0]`), or `rule <id>` when the
    /// tables do not name it.
    pub fn rule_name(&self, id: u32) -> Option<String> {
        (id != 0).then(|| self.names.get(&id).cloned().unwrap_or_else(|| format!("rule {id}")))
    }

    /// `policy_decide`: the peer set of the packet's peer address on
    /// (ifindex, dir), then the set's action for (protocol, destination
    /// port). `None`: no policy covers the hook.
    fn decide(&self, ifindex: u32, dir: Direction, p: &Packet) -> (Option<(u32, Action)>, Option<Cidr>) {
        let peer = if dir == Direction::Ingress { p.source } else { p.destination };
        let mut data = [0u8; 24];
        data[..4].copy_from_slice(&ifindex.to_ne_bytes());
        data[4] = dir_byte(dir);
        data[5] = family(&peer);
        data[8..].copy_from_slice(&addr16(&peer));
        let Some((len, set_id)) = self.peers.longest(&data) else { return (None, None) };
        let prefix = len.checked_sub(64).map(|l| prefix_of(&peer, l));
        let mut key = [0u8; 8];
        key[..4].copy_from_slice(&set_id.to_ne_bytes());
        key[4] = p.protocol;
        key[6..].copy_from_slice(&p.destination_port.to_be_bytes());
        let decision = match self.actions.longest(&key) {
            // `policy_check` drops on `ACTION_DENY` and lets anything else
            // through.
            Some((_, &(rule, action))) if action == Action::Deny as u8 => (rule, Action::Deny),
            Some((_, &(rule, _))) => (rule, Action::Allow),
            // Every compiled set has a /32 entry; a missing one fails closed.
            None => (0, Action::Deny),
        };
        (Some(decision), prefix)
    }

    /// `policy_check` on one hook; `tracked` says whether the packet is a
    /// reply of a connection the datapath tracks.
    fn check(&self, ifindex: u32, dir: Direction, p: &Packet, tracked: bool) -> (Check, Option<Cidr>) {
        let (decision, prefix) = self.decide(ifindex, dir, p);
        let check = match decision {
            None => Check::NoPolicy,
            Some((rule, Action::Allow)) => Check::Allow { rule },
            Some((rule, Action::Deny)) if rule & RULE_DEFAULT_BIT != 0 && tracked => Check::Reply { rule },
            Some((rule, Action::Deny)) => Check::Deny { rule },
        };
        (check, prefix)
    }

    /// The route for a destination (`mesh_routes`), with its prefix.
    pub fn route(&self, destination: &IpAddr) -> Option<(Cidr, RouteValue)> {
        let mut data = [0u8; 20];
        data[0] = family(destination);
        data[4..].copy_from_slice(&addr16(destination));
        let (len, r) = self.routes.longest(&data)?;
        Some((prefix_of(destination, len.saturating_sub(32)), *r))
    }

    /// The datapath's decision for `p` (see the module comment); `tracked`:
    /// the packet is a reply of a connection the datapath tracks.
    pub fn evaluate(&self, p: &Packet, tracked: bool) -> Verdict {
        let (check, peer_prefix) = self.check(p.ifindex, p.direction, p, tracked);
        let mut v = Verdict { check, route: None, out_check: None, peer_prefix, route_prefix: None };
        if p.direction == Direction::Egress || !check.allows() {
            return v;
        }
        if let Some((prefix, route)) = self.route(&p.destination) {
            v.route = Some(route);
            v.route_prefix = Some(prefix);
            v.out_check = Some(self.check(route.ifindex, Direction::Egress, p, tracked).0);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::{PolicyActionKey, PolicyPeerKey, RouteKey};

    fn peer(entries: &mut Entries, ifindex: u32, dir: Direction, prefix: &str, set_id: u32) {
        let c: Cidr = prefix.parse().unwrap();
        let (k, v) =
            super::super::policy::encode_peer(ifindex, dir, &super::super::policy::PeerEntry { prefix: c, set_id });
        assert_eq!(k.len(), std::mem::size_of::<PolicyPeerKey>());
        entries.insert(k, v);
    }

    fn action(entries: &mut Entries, set_id: u32, prefixlen: u32, protocol: u8, port: u16, rule: u32, a: Action) {
        let key = PolicyActionKey { prefixlen, set_id, protocol, pad: 0, port_be: port.to_be() };
        let value = PolicyActionValue { rule_id: rule, action: a as u8, pad: [0; 3] };
        entries.insert(key.to_vec(), value.to_vec());
    }

    fn tcp(dir: Direction, source: &str, destination: &str, dport: u16) -> Packet {
        Packet {
            ifindex: 7,
            direction: dir,
            protocol: 6,
            source: source.parse().unwrap(),
            source_port: 40000,
            destination: destination.parse().unwrap(),
            destination_port: dport,
        }
    }

    #[test]
    fn the_longest_peer_prefix_and_the_longest_port_prefix_decide() {
        let (mut peers, mut actions) = (Entries::new(), Entries::new());
        let default = RULE_DEFAULT_BIT | 5;
        peer(&mut peers, 7, Direction::Ingress, "0.0.0.0/0", 1);
        peer(&mut peers, 7, Direction::Ingress, "10.1.0.0/16", 2);
        peer(&mut peers, 7, Direction::Ingress, "10.1.2.0/24", 1);
        action(&mut actions, 1, 32, 0, 0, default, Action::Deny);
        action(&mut actions, 2, 32, 0, 0, default, Action::Deny);
        // tcp/8080-8081 allowed by rule 9: one /15 port prefix.
        action(&mut actions, 2, 48 + 15, 6, 8080, 9, Action::Allow);
        let t = Tables::from_entries(&peers, &actions, &Entries::new(), &Entries::new());
        assert_eq!(t.malformed, 0);
        let v = t.evaluate(&tcp(Direction::Ingress, "10.1.9.9", "10.0.0.2", 8081), false);
        assert_eq!(v.check, Check::Allow { rule: 9 });
        assert_eq!(v.peer_prefix, Some("10.1.0.0/16".parse().unwrap()));
        let v = t.evaluate(&tcp(Direction::Ingress, "10.1.9.9", "10.0.0.2", 8082), false);
        assert_eq!(v.check, Check::Deny { rule: default });
        assert!(v.dropped());
        // The more specific /24 points back at the default set.
        let v = t.evaluate(&tcp(Direction::Ingress, "10.1.2.3", "10.0.0.2", 8080), false);
        assert_eq!(v.check, Check::Deny { rule: default });
        assert_eq!(v.peer_prefix, Some("10.1.2.0/24".parse().unwrap()));
        // A default deny lets a tracked reply through; an explicit deny does not.
        let v = t.evaluate(&tcp(Direction::Ingress, "10.1.2.3", "10.0.0.2", 8080), true);
        assert_eq!(v.check, Check::Reply { rule: default });
        // Another interface, direction or family: no policy.
        let v = t.evaluate(&tcp(Direction::Egress, "10.1.2.3", "10.0.0.2", 8080), false);
        assert_eq!(v.check, Check::NoPolicy);
        let v = t.evaluate(&tcp(Direction::Ingress, "fd00::1", "fd00::2", 8080), false);
        assert_eq!(v.check, Check::NoPolicy);
    }

    #[test]
    fn ingress_with_a_route_checks_the_outgoing_interface_egress() {
        let (mut peers, mut actions, mut routes) = (Entries::new(), Entries::new(), Entries::new());
        peer(&mut peers, 3, Direction::Egress, "0.0.0.0/0", 1);
        action(&mut actions, 1, 32, 0, 0, RULE_DEFAULT_BIT | 1, Action::Deny);
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[10, 9, 0, 0]);
        let key = RouteKey { prefixlen: 32 + 16, family: 4, pad: [0; 3], addr };
        let value = RouteValue { ifindex: 3, route_id: 4, src_mac: [1; 6], dst_mac: [2; 6] };
        routes.insert(key.to_vec(), value.to_vec());
        let t = Tables::from_entries(&peers, &actions, &routes, &Entries::new());
        let v = t.evaluate(&tcp(Direction::Ingress, "10.1.0.1", "10.9.3.4", 80), false);
        assert_eq!(v.route, Some(value));
        assert_eq!(v.route_prefix, Some("10.9.0.0/16".parse().unwrap()));
        assert_eq!(v.out_check, Some(Check::Deny { rule: RULE_DEFAULT_BIT | 1 }));
        assert!(v.dropped());
        assert_eq!(v.deciding_rule(), RULE_DEFAULT_BIT | 1);
        let v = t.evaluate(&tcp(Direction::Ingress, "10.1.0.1", "10.8.3.4", 80), false);
        assert_eq!((v.route, v.out_check, v.dropped()), (None, None, false));
    }

    #[test]
    fn malformed_entries_are_left_out_and_counted() {
        let mut peers = Entries::new();
        // prefixlen beyond the key's data.
        let mut k = vec![0u8; 28];
        k[..4].copy_from_slice(&500u32.to_ne_bytes());
        peers.insert(k, 1u32.to_ne_bytes());
        let t = Tables::from_entries(&peers, &Entries::new(), &Entries::new(), &Entries::new());
        assert_eq!(t.malformed, 1);
    }
}

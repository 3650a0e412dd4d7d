//! The user-space evaluator (`mesh::evaluate`) decides exactly as the `mesh`
//! programs do, on the real kernel.
//!
//! Random policies and routes over two interfaces (IPv4 and IPv6 peers,
//! `except` holes, port ranges, protocols, denies) are applied; then random
//! packets — every protocol the datapath knows, addresses on prefix edges,
//! ports on range edges, some of them replies of a tracked connection — run
//! through the XDP (ingress) and TCX (egress) programs with
//! `BPF_PROG_TEST_RUN`. For each, the evaluator's verdict over the observed
//! tables must equal the kernel's: the return code, the next hop's MACs of a
//! redirect, and the rules the datapath counted (`rule_stats`: the deciding
//! rule of each check it made). Seeded: `BPFSYNC_SEED=… cargo test --test
//! kernel_impact_equivalence` replays a failure.

mod common;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuHashMap};
use bpfsync::apply::journal::MemJournal;
use bpfsync::apply::{self, Retry, scope_for};
use bpfsync::datapath::{CtKey, CtValue, Plain, ProtoStats};
use bpfsync::kernel::Kernel;
use bpfsync::kernel::real::RealKernel;
use bpfsync::kernel::testrun::run_pinned_on;
use bpfsync::mesh::evaluate::{Check, Packet as Flow, Tables};
use bpfsync::model::Direction;
use bpfsync::net::Cidr;
use bpfsync::packet::{Packet, Transport, macs};
use bpfsync::plan;
use bpfsync::sandbox::Sandbox;
use bpfsync::spec::ProgramType;
use common::{Env, Rng, compile_text};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
const TC_SHOT: u32 = 2;
const TCX_NEXT: u32 = u32::MAX;

const PEERS: &[&str] = &[
    "0.0.0.0/0",
    "10.0.0.0/8",
    "10.1.0.0/16",
    "10.1.2.0/24",
    "10.1.2.3/32",
    "10.2.0.0/15",
    "::/0",
    "fd00::/16",
    "fd00:1::/32",
    "fd00:1:2::/48",
    "fd00:1:2::3/128",
];
const HOLES: &[&str] =
    &["10.1.2.0/24", "10.1.2.3/32", "10.1.3.0/25", "10.3.0.0/16", "fd00:1:2::/48", "fd00:1:2::3/128"];
const PORT_RULES: &[(&str, u16, u16)] = &[
    ("tcp", 80, 80),
    ("tcp", 80, 443),
    ("tcp", 443, 443),
    ("udp", 53, 53),
    ("udp", 1, 1023),
    ("udp", 9000, 9100),
    ("sctp", 1, 100),
    ("tcp", 1, 65535),
];
const PROTOCOLS: &[&str] = &["tcp", "udp", "icmp", "icmpv6", "sctp"];
const ROUTES: &[&str] = &["10.20.0.0/16", "10.20.5.0/24", "10.1.0.0/16", "fd20::/48", "fd20:0:0:1::/64", "fd00::/16"];

fn random_rule(rng: &mut Rng, key: &str) -> String {
    let mut fields = Vec::new();
    let peers: Vec<&str> = (0..1 + rng.below(2)).map(|_| *rng.pick(PEERS)).collect();
    if !rng.chance(10) {
        let quoted: Vec<String> = peers.iter().map(|p| format!("\"{p}\"")).collect();
        fields.push(format!("{key}: [{}]", quoted.join(", ")));
        let hole: Cidr = rng.pick(HOLES).parse().unwrap();
        let first: Cidr = peers[0].parse().unwrap();
        if rng.chance(35) && first.contains(&hole) && first != hole {
            fields.push(format!("except: [\"{hole}\"]"));
        }
    }
    match rng.below(4) {
        0 => fields.push(format!("protocol: {}", rng.pick(PROTOCOLS))),
        // Any protocol (a rule needs peers or a match: give it one).
        1 if !fields.is_empty() => {}
        1 => fields.push("protocol: tcp".into()),
        _ => {
            let (proto, lo, hi) = *rng.pick(PORT_RULES);
            fields.push(if lo == hi {
                format!("ports: [{{ port: {lo}, protocol: {proto} }}]")
            } else {
                format!("ports: [{{ port: {lo}, end-port: {hi}, protocol: {proto} }}]")
            });
        }
    }
    format!("      - {}\n", fields.join("\n        "))
}

fn random_spec(rng: &mut Rng, a: &str, b: &str) -> String {
    let mut s = format!(
        "apiVersion: bpfsync/v1\nkind: NodeSpec\ninterfaces:\n  - name: {a}\n    mesh: {{ mode: skb }}\n  - name: {b}\n    mesh: {{ mode: skb }}\npolicies:\n"
    );
    for p in 0..1 + rng.below(2) {
        let ifaces = match rng.below(3) {
            0 => a.to_string(),
            1 => b.to_string(),
            _ => format!("{a}, {b}"),
        };
        s.push_str(&format!("  - name: p{p}\n    interfaces: [{ifaces}]\n"));
        for (section, key, chance) in [("ingress", "from", 75), ("egress", "to", 50), ("deny", "from", 35)] {
            if rng.chance(chance) {
                s.push_str(&format!("    {section}:\n"));
                for _ in 0..1 + rng.below(3) {
                    let key = if section == "deny" && rng.chance(50) { "to" } else { key };
                    s.push_str(&random_rule(rng, key));
                }
            }
        }
    }
    let routes: BTreeSet<&str> = (0..rng.below(4)).map(|_| *rng.pick(ROUTES)).collect();
    if !routes.is_empty() {
        s.push_str("routes:\n");
        for (i, prefix) in routes.iter().enumerate() {
            let iface = if rng.chance(50) { a } else { b };
            let neighbor = if prefix.contains(':') { "fe80::1" } else { "10.99.0.1" };
            s.push_str(&format!(
                "  - prefix: \"{prefix}\"\n    via: {{ interface: {iface}, neighbor: \"{neighbor}\", mac: \"02:00:00:00:99:{i:02x}\" }}\n"
            ));
        }
    }
    s
}

/// An address near the edges of the prefixes above (first, last, one in),
/// or anywhere.
fn random_address(rng: &mut Rng, v4: bool) -> IpAddr {
    let pool: Vec<Cidr> = PEERS
        .iter()
        .chain(HOLES)
        .chain(ROUTES)
        .map(|p| p.parse::<Cidr>().unwrap())
        .filter(|c| c.addr.is_ipv4() == v4)
        .collect();
    let c = rng.pick(&pool);
    let width = if v4 { 32 } else { 128 };
    let host_bits = width - c.len as u32;
    let base: u128 = match c.addr {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    };
    let span = if host_bits >= 128 { u128::MAX } else { (1u128 << host_bits) - 1 };
    let offset = match rng.below(4) {
        0 => 0,
        1 => span,
        2 => (rng.next() as u128 | ((rng.next() as u128) << 64)) & span,
        // Just outside the prefix.
        _ => span.wrapping_add(1),
    };
    let bits = base.wrapping_add(offset);
    if v4 { IpAddr::from((bits as u32).to_be_bytes()) } else { IpAddr::from(bits.to_be_bytes()) }
}

fn random_port(rng: &mut Rng) -> u16 {
    let (_, lo, hi) = *rng.pick(PORT_RULES);
    match rng.below(6) {
        0 => lo.wrapping_sub(1),
        1 => lo,
        2 => hi,
        3 => hi.wrapping_add(1),
        4 => lo.wrapping_add((rng.next() % (hi - lo).max(1) as u64) as u16),
        _ => rng.next() as u16,
    }
}

/// A random packet, and the tuple the datapath reads from it.
fn random_packet(rng: &mut Rng, sport: u16) -> (Packet, u8, u16, u16) {
    let v4 = rng.chance(60);
    let (src, dst) = (random_address(rng, v4), random_address(rng, v4));
    let dport = random_port(rng);
    let (transport, protocol, sport, dport) = match rng.below(5) {
        0 | 1 => (Transport::Tcp { sport, dport, flags: 0x02 }, 6, sport, dport),
        2 => (Transport::Udp { sport, dport }, 17, sport, dport),
        // The echo identifier (1 in crafted packets) is the source port of
        // a request and the destination port of a reply.
        3 if v4 && rng.chance(50) => (Transport::Icmp { kind: 8, code: 0 }, 1, 1, 0),
        3 if v4 => (Transport::Icmp { kind: 0, code: 0 }, 1, 0, 1),
        3 if rng.chance(50) => (Transport::Icmpv6 { kind: 128, code: 0 }, 58, 1, 0),
        3 => (Transport::Icmpv6 { kind: 129, code: 0 }, 58, 0, 1),
        _ => (Transport::Other(132), 132, 0, 0),
    };
    (Packet::new(src, dst, transport), protocol, sport, dport)
}

fn ifindex(name: &str) -> u32 {
    std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex")).unwrap().trim().parse().unwrap()
}

fn program_pin(root: &Path, program: &str) -> PathBuf {
    std::fs::read_dir(root.join("programs").join(program)).unwrap().next().unwrap().unwrap().path()
}

fn apply_spec(k: &mut RealKernel, text: &str) -> Tables {
    let desired = compile_text("spec.yaml", text);
    let observed = k.observe(&scope_for(&desired.state)).unwrap();
    let p = plan::plan(&desired.state, &observed);
    assert!(p.errors.is_empty() && p.conflicts.is_empty(), "{:?} {:?}\n{text}", p.errors, p.conflicts);
    apply::apply(k, &p, &desired, &observed, &mut MemJournal::default(), Retry::none()).unwrap();
    // The tables as the kernel holds them now.
    let observed = k.observe(&scope_for(&desired.state)).unwrap();
    let tables = Tables::from_state(&observed);
    assert_eq!(tables.malformed, 0);
    tables
}

fn ct_key(f: &Flow) -> CtKey {
    let bytes = |a: &IpAddr| {
        let mut out = [0u8; 16];
        match a {
            IpAddr::V4(v) => out[..4].copy_from_slice(&v.octets()),
            IpAddr::V6(v) => out = v.octets(),
        }
        out
    };
    CtKey {
        family: if f.source.is_ipv4() { 4 } else { 6 },
        protocol: f.protocol,
        sport_be: f.source_port.to_be(),
        dport_be: f.destination_port.to_be(),
        pad: [0; 2],
        saddr: bytes(&f.source),
        daddr: bytes(&f.destination),
    }
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The maps the test reads and resets between packets.
struct Maps {
    conntrack: BpfHashMap<MapData, [u8; 40], [u8; 168]>,
    rule_stats: PerCpuHashMap<MapData, u32, [u8; 16]>,
}

impl Maps {
    fn open(root: &Path) -> Maps {
        let map = |name: &str| MapData::from_pin(root.join("maps/mesh").join(name)).unwrap();
        Maps {
            conntrack: BpfHashMap::try_from(aya::maps::Map::LruHashMap(map("conntrack"))).unwrap(),
            rule_stats: PerCpuHashMap::try_from(aya::maps::Map::PerCpuHashMap(map("rule_stats"))).unwrap(),
        }
    }

    /// Forgets every connection and count, so each packet meets the tables alone.
    fn reset(&mut self) {
        let keys: Vec<[u8; 40]> = self.conntrack.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = self.conntrack.remove(&k);
        }
        let keys: Vec<u32> = self.rule_stats.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = self.rule_stats.remove(&k);
        }
    }

    /// Makes the reverse of `f` a connection the datapath tracks.
    fn track_reverse(&mut self, f: &Flow) {
        let (source, source_port, destination, destination_port) = f.reversed();
        let reverse = Flow { source, source_port, destination, destination_port, ..*f };
        let mut value = CtValue::read(&[0u8; 168]).unwrap();
        value.last_seen_ns = monotonic_ns();
        let key: [u8; 40] = ct_key(&reverse).to_vec().try_into().unwrap();
        let value: [u8; 168] = value.to_vec().try_into().unwrap();
        self.conntrack.insert(key, value, 0).unwrap();
    }

    /// Rules with a packet counted since the last reset.
    fn counted(&self) -> BTreeSet<u32> {
        self.rule_stats
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, per_cpu)| per_cpu.iter().any(|v| ProtoStats::from_bytes(v).is_some_and(|s| s.packets > 0)))
            .map(|(k, _)| k)
            .collect()
    }
}

/// The rules the datapath counts for a check (`policy_check`): an allowing
/// rule, any denying one (a default deny too), not a reply's default.
fn counted_by(check: Check, out: &mut BTreeSet<u32>) {
    match check {
        Check::Allow { rule } if rule != 0 => {
            out.insert(rule);
        }
        Check::Deny { rule } => {
            out.insert(rule);
        }
        _ => {}
    }
}

#[test]
fn the_user_space_evaluator_decides_as_the_kernel_does() {
    let env = Env::new();
    let (sa, sb) = (Sandbox::create().unwrap(), Sandbox::create().unwrap());
    let (a, b) = (sa.host_if.clone(), sb.host_if.clone());
    let indexes = [ifindex(&a), ifindex(&b)];
    // The programs are attached to real interfaces: keep the stack's own
    // IPv6 chatter (neighbour discovery, MLD) off them, or it is counted too.
    sa.disable_ipv6().unwrap();
    sb.disable_ipv6().unwrap();
    let seed = std::env::var("BPFSYNC_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x1a9_ac7_u64);
    let mut rng = Rng(seed);
    let mut k = env.kernel();
    let rounds = 30;
    let per_round = 100;
    let mut seen = BTreeSet::new();
    let mut maps = None;
    for round in 0..rounds {
        let spec = random_spec(&mut rng, &a, &b);
        let tables = apply_spec(&mut k, &spec);
        let maps = maps.get_or_insert_with(|| Maps::open(&env.bpffs.root()));
        let (xdp, tcx) = (program_pin(&env.bpffs.root(), "mesh"), program_pin(&env.bpffs.root(), "mesh_egress"));
        for i in 0..per_round {
            let (packet, protocol, sport, dport) = random_packet(&mut rng, 1024 + i as u16);
            let ifindex = *rng.pick(&indexes);
            let direction = if rng.chance(60) { Direction::Ingress } else { Direction::Egress };
            let flow = Flow {
                ifindex,
                direction,
                protocol,
                source: packet.src,
                source_port: sport,
                destination: packet.dst,
                destination_port: dport,
            };
            maps.reset();
            let tracked = rng.chance(25);
            if tracked {
                maps.track_reverse(&flow);
            }
            let want = tables.evaluate(&flow, tracked);
            let frame = packet.build();
            let (program, program_type) =
                if direction == Direction::Ingress { (&xdp, ProgramType::Xdp) } else { (&tcx, ProgramType::Tc) };
            let got = run_pinned_on(program, program_type, &frame, 1, Some(ifindex)).unwrap();
            let case = format!(
                "round {round} packet {i} (seed {seed:#x}): {flow:?} tracked={tracked}\nevaluator: {want:?}\nspec:\n{spec}"
            );
            let want_code = match (direction, want.dropped(), want.route) {
                (Direction::Egress, true, _) => TC_SHOT,
                (Direction::Egress, false, _) => TCX_NEXT,
                (Direction::Ingress, true, _) => XDP_DROP,
                (Direction::Ingress, false, Some(_)) => XDP_REDIRECT,
                (Direction::Ingress, false, None) => XDP_PASS,
            };
            assert_eq!(got.return_value, want_code, "return code, {case}");
            if let Some(route) = want.route.filter(|_| !want.dropped()) {
                assert_eq!(macs(&got.data_out), (route.src_mac, route.dst_mac), "next hop, {case}");
            }
            let mut want_counted = BTreeSet::new();
            counted_by(want.check, &mut want_counted);
            if let Some(out) = want.out_check {
                counted_by(out, &mut want_counted);
            }
            assert_eq!(maps.counted(), want_counted, "counted rules, {case}");
            seen.insert((direction, want_code, format!("{:?}", want.check).split(' ').next().unwrap().to_string()));
        }
    }
    // The cases reached every kind of outcome, or the test proves less than it says.
    for kind in ["NoPolicy", "Allow", "Deny", "Reply"] {
        assert!(seen.iter().any(|s| s.2 == kind), "no {kind} case in {seen:?}");
    }
    assert!(seen.iter().any(|s| s.1 == XDP_REDIRECT), "no redirect in {seen:?}");
    assert!(seen.iter().any(|s| s.1 == TC_SHOT), "no egress drop in {seen:?}");
}

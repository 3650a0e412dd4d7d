//! The mesh datapath on crafted packets (`BPF_PROG_TEST_RUN`): every kind
//! of policy rule, conntrack replies, and route forwarding with its
//! rewritten bytes — applied by bpfsync from a spec, run on the real kernel.

mod common;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use bpfsync::datapath::ProtoStats;
use bpfsync::kernel::testrun::run_pinned_on;
use bpfsync::kernel::{Kernel, Scope};
use bpfsync::model::MapRef;
use bpfsync::packet::{Packet, Transport, ipv4_header_checksum_ok, ipv4_ttl, macs};
use bpfsync::sandbox::Sandbox;
use bpfsync::spec::ProgramType;
use common::{Env, write_spec};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
const TC_SHOT: u32 = 2;
const TCX_NEXT: u32 = u32::MAX;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn ifindex(name: &str) -> u32 {
    std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex")).unwrap().trim().parse().unwrap()
}

fn mac_of(name: &str) -> [u8; 6] {
    let text = std::fs::read_to_string(format!("/sys/class/net/{name}/address")).unwrap();
    bpfsync::net::parse_mac(text.trim()).unwrap()
}

fn pin(env: &Env, program: &str) -> PathBuf {
    let dir = env.bpffs.root().join("programs").join(program);
    std::fs::read_dir(dir).unwrap().next().unwrap().unwrap().path()
}

fn tcp(src: &str, dst: &str, sport: u16, dport: u16) -> Packet {
    Packet::new(ip(src), ip(dst), Transport::Tcp { sport, dport, flags: 0x02 })
}

fn udp(src: &str, dst: &str, sport: u16, dport: u16) -> Packet {
    Packet::new(ip(src), ip(dst), Transport::Udp { sport, dport })
}

/// Rule name → packets the rule decided, from `rule_stats` and `rule_names`.
/// The test runs land on whichever CPU the test thread is on: the sum of
/// the per-CPU copies is what counts.
fn rule_hits(env: &Env) -> BTreeMap<String, u64> {
    let stats = MapRef { program: "mesh".into(), map: "rule_stats".into() };
    let names = MapRef { program: "mesh".into(), map: "rule_names".into() };
    let s = env.kernel().observe(&Scope { maps: [stats.clone(), names.clone()].into(), ..Default::default() }).unwrap();
    let name_of: BTreeMap<Vec<u8>, String> =
        s.maps[&names].entries.iter().map(|(k, v)| (k.to_vec(), bpfsync::mesh::policy::decode_rule_name(v))).collect();
    s.maps[&stats]
        .entries
        .iter()
        // Per-CPU counters: every CPU's copy, summed.
        .map(|(k, v)| (name_of.get(k).cloned().unwrap_or_default(), ProtoStats::from_bytes(v).unwrap().packets))
        .collect()
}

/// `frame` (Ethernet + IPv6) with extension headers (type, length in
/// bytes, a multiple of 8) inserted after the IPv6 header, in order.
fn with_ipv6_extensions(frame: &[u8], exts: &[(u8, usize)]) -> Vec<u8> {
    let (eth, ip6, rest) = (&frame[..14], &frame[14..54], &frame[54..]);
    let mut ip6 = ip6.to_vec();
    let transport = ip6[6];
    let mut chain = Vec::new();
    for (i, (kind, len)) in exts.iter().enumerate() {
        let next = exts.get(i + 1).map_or(transport, |e| e.0);
        let mut h = vec![0u8; *len];
        h[0] = next;
        // Hop-by-hop, routing, destination options: 8-octet units beyond
        // the first; a fragment header is 8 bytes (offset 0: the first).
        h[1] = if *kind == 44 { 0 } else { (len / 8 - 1) as u8 };
        chain.extend_from_slice(&h);
    }
    ip6[6] = exts.first().map_or(transport, |e| e.0);
    let payload = u16::from_be_bytes([ip6[4], ip6[5]]) as usize + chain.len();
    ip6[4..6].copy_from_slice(&(payload as u16).to_be_bytes());
    [eth, &ip6, &chain, rest].concat()
}

#[test]
fn every_kind_of_policy_rule_decides_crafted_packets() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    let iface = sb.host_if.clone();
    let spec = format!(
        r#"apiVersion: bpfsync/v1
kind: NodeSpec
interfaces:
  - name: {iface}
    mesh: {{ mode: skb }}
policies:
  - name: api
    interfaces: [{iface}]
    ingress:
      - from: [10.0.0.0/24, "fd00::/64"]
        except: [10.0.0.66/32]
        ports: [{{ port: 8080, protocol: tcp }}, {{ port: 9000, end-port: 9100, protocol: udp }}]
      - from: [0.0.0.0/0]
        protocol: icmp
    egress:
      - to: [10.1.0.0/16]
        ports: [{{ port: 53, protocol: udp }}]
    deny:
      - from: [10.9.0.0/16, 10.1.9.0/24]
"#
    );
    let path = write_spec(env.state.path(), "spec.yaml", &spec);
    env.run_ok(&["apply", &path, "--auto-approve"]);
    let ingress = pin(&env, "mesh");
    let egress = pin(&env, "mesh_egress");
    let idx = ifindex(&iface);
    let xdp = |p: &Packet| run_pinned_on(&ingress, ProgramType::Xdp, &p.build(), 1, Some(idx)).unwrap().return_value;
    let tc = |p: &Packet| run_pinned_on(&egress, ProgramType::Tc, &p.build(), 1, Some(idx)).unwrap().return_value;

    let cases: Vec<(&str, Packet, u32)> = vec![
        ("allowed port", tcp("10.0.0.5", "10.0.0.1", 40000, 8080), XDP_PASS),
        ("other port: default deny", tcp("10.0.0.5", "10.0.0.1", 40000, 8081), XDP_DROP),
        ("port on the wrong protocol", udp("10.0.0.5", "10.0.0.1", 40000, 8080), XDP_DROP),
        ("range start", udp("10.0.0.5", "10.0.0.1", 40000, 9000), XDP_PASS),
        ("range end", udp("10.0.0.5", "10.0.0.1", 40000, 9100), XDP_PASS),
        ("inside the range", udp("10.0.0.5", "10.0.0.1", 40000, 9057), XDP_PASS),
        ("below the range", udp("10.0.0.5", "10.0.0.1", 40000, 8999), XDP_DROP),
        ("above the range", udp("10.0.0.5", "10.0.0.1", 40000, 9101), XDP_DROP),
        ("except carves a hole", tcp("10.0.0.66", "10.0.0.1", 40000, 8080), XDP_DROP),
        ("next to the hole", tcp("10.0.0.67", "10.0.0.1", 40000, 8080), XDP_PASS),
        ("peer outside every rule", tcp("10.0.1.5", "10.0.0.1", 40000, 8080), XDP_DROP),
        (
            "icmp from anywhere",
            Packet::new(ip("192.168.7.7"), ip("10.0.0.1"), Transport::Icmp { kind: 8, code: 0 }),
            XDP_PASS,
        ),
        (
            "explicit deny beats the icmp allow",
            Packet::new(ip("10.9.1.1"), ip("10.0.0.1"), Transport::Icmp { kind: 8, code: 0 }),
            XDP_DROP,
        ),
        ("ipv6 allowed", tcp("fd00::5", "fd00::1", 40000, 8080), XDP_PASS),
        ("ipv6 other prefix", tcp("fd01::5", "fd00::1", 40000, 8080), XDP_DROP),
        (
            "ipv6 icmpv6 is not icmp",
            Packet::new(ip("fd00::5"), ip("fd00::1"), Transport::Icmpv6 { kind: 128, code: 0 }),
            XDP_DROP,
        ),
    ];
    for (what, packet, want) in &cases {
        assert_eq!(xdp(packet), *want, "ingress: {what}");
    }
    // IPv6 extension headers are walked to the transport header: hop-by-hop,
    // destination options and a first fragment before TCP.
    let v6 =
        |dport: u16, exts: &[(u8, usize)]| with_ipv6_extensions(&tcp("fd00::5", "fd00::1", 40000, dport).build(), exts);
    let chain = [(0u8, 8usize), (60, 16), (44, 8)];
    let xdp_raw =
        |frame: &[u8], on: u32| run_pinned_on(&ingress, ProgramType::Xdp, frame, 1, Some(on)).unwrap().return_value;
    assert_eq!(xdp_raw(&v6(8080, &chain), idx), XDP_PASS, "allowed port behind extension headers");
    assert_eq!(xdp_raw(&v6(8081, &chain), idx), XDP_DROP, "other port behind extension headers");
    // What cannot be classified is dropped where a policy applies, under
    // its own reason, and passed where none does (loopback: no policy).
    let too_long = [(60u8, 8usize); 9];
    assert_eq!(xdp_raw(&v6(8080, &too_long), idx), XDP_DROP, "a chain beyond the walk");
    let cut = tcp("10.0.0.5", "10.0.0.1", 40000, 8080).build();
    let cut = &cut[..14 + 20 + 10]; // half a TCP header
    assert_eq!(xdp_raw(cut, idx), XDP_DROP, "a truncated transport header");
    assert_eq!(xdp_raw(cut, 1), XDP_PASS, "no policy on the interface: not the policy's business");
    let cut_udp = udp("10.0.0.1", "10.1.2.3", 40000, 53).build();
    let cut_udp = &cut_udp[..14 + 20 + 4];
    assert_eq!(
        run_pinned_on(&egress, ProgramType::Tc, cut_udp, 1, Some(idx)).unwrap().return_value,
        TC_SHOT,
        "egress: a truncated header is not let through"
    );
    let status: serde_json::Value = serde_json::from_str(&env.run_ok(&["status", "-o", "json"])).unwrap();
    let unparseable = |dir: &str| status["mesh"]["verdicts"][format!("{dir}/drop-unparseable")]["packets"].as_u64();
    assert_eq!(unparseable("ingress"), Some(2), "{:#}", status["mesh"]);
    assert_eq!(unparseable("egress"), Some(1), "{:#}", status["mesh"]);

    // Non-IP frames are not the policy's business.
    let arp = bpfsync::packet::arp();
    assert_eq!(run_pinned_on(&ingress, ProgramType::Xdp, &arp, 1, Some(idx)).unwrap().return_value, XDP_PASS);

    // Egress: default deny, one allowed destination and port.
    assert_eq!(tc(&udp("10.0.0.1", "10.1.2.3", 40000, 53)), TCX_NEXT, "egress allowed");
    assert_eq!(tc(&udp("10.0.0.1", "10.1.2.3", 40000, 54)), TC_SHOT, "egress other port");
    assert_eq!(tc(&tcp("10.0.0.1", "10.2.0.1", 40000, 53)), TC_SHOT, "egress other peer");

    // Replies of the allowed egress connection pass ingress default deny;
    // the same peer on another port does not.
    assert_eq!(xdp(&udp("10.1.2.3", "10.0.0.1", 53, 40000)), XDP_PASS, "reply via conntrack");
    assert_eq!(xdp(&udp("10.1.2.3", "10.0.0.1", 53, 40001)), XDP_DROP, "not a reply");
    // An explicit deny holds even for replies.
    assert_eq!(tc(&udp("10.0.0.1", "10.1.9.9", 40000, 53)), TCX_NEXT, "egress allowed");
    assert_eq!(xdp(&udp("10.1.9.9", "10.0.0.1", 53, 40000)), XDP_DROP, "reply from a denied peer");

    // Per-rule counters name the rules that decided.
    let hits = rule_hits(&env);
    assert_eq!(hits.get("api ingress[0]"), Some(&7), "six cases and the extension-header one: {hits:?}");
    assert_eq!(hits.get("api ingress[1]"), Some(&1), "{hits:?}");
    assert_eq!(hits.get("api deny[0]"), Some(&2), "{hits:?}");
    // The interface is live: the kernel's own IPv6 neighbour discovery on
    // it meets the default denies too, so these are lower bounds.
    let at_least = |name: String, n: u64| assert!(hits.get(&name).is_some_and(|h| *h >= n), "{name}: {hits:?}");
    at_least(format!("default deny ingress on {iface} (api)"), 9);
    at_least(format!("default deny egress on {iface} (api)"), 2);
    assert_eq!(hits.get("api egress[0]"), Some(&2), "{hits:?}");

    // Counters are per CPU: a packet on each CPU adds up in what bpfsync reads.
    let icmp = Packet::new(ip("192.168.7.7"), ip("10.0.0.1"), Transport::Icmp { kind: 8, code: 0 }).build();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()).min(4);
    for cpu in 0..cpus {
        let (ingress, icmp) = (ingress.clone(), icmp.clone());
        std::thread::spawn(move || {
            // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes within it.
            unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                assert_eq!(libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set), 0);
            }
            run_pinned_on(&ingress, ProgramType::Xdp, &icmp, 1, Some(idx)).unwrap()
        })
        .join()
        .unwrap();
    }
    let hits = rule_hits(&env);
    assert_eq!(hits.get("api ingress[1]"), Some(&(1 + cpus as u64)), "one more per CPU: {hits:?}");

    env.run_ok(&["down", "--auto-approve"]);
}

#[test]
fn routes_forward_with_rewritten_macs_ttl_and_checksum() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    let iface = sb.host_if.clone();
    let spec = format!(
        r#"apiVersion: bpfsync/v1
kind: NodeSpec
interfaces:
  - name: {iface}
    mesh: {{ mode: skb }}
routes:
  - prefix: 10.20.0.0/16
    via: {{ interface: {iface}, neighbor: {peer}, mac: "02:aa:bb:cc:dd:ee" }}
  - prefix: fd20::/48
    via: {{ interface: {iface}, neighbor: "fe80::1", mac: "02:aa:bb:cc:dd:ef" }}
"#,
        peer = sb.peer_ip
    );
    let path = write_spec(env.state.path(), "spec.yaml", &spec);
    env.run_ok(&["apply", &path, "--auto-approve"]);
    let ingress = pin(&env, "mesh");
    let idx = ifindex(&iface);
    let run = |p: &Packet| run_pinned_on(&ingress, ProgramType::Xdp, &p.build(), 1, Some(idx)).unwrap();

    let p = udp("10.0.0.5", "10.20.1.1", 40000, 53);
    let r = run(&p);
    assert_eq!(r.return_value, XDP_REDIRECT);
    let (src, dst) = macs(&r.data_out);
    assert_eq!(dst, [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee], "next-hop MAC");
    assert_eq!(src, mac_of(&iface), "the egress interface's MAC");
    assert_eq!(ipv4_ttl(&r.data_out), 63);
    assert!(ipv4_header_checksum_ok(&r.data_out), "checksum fixed after the TTL decrement");
    // Only the MACs, the TTL and the header checksum change.
    let before = p.build();
    let changed: Vec<usize> = (0..before.len()).filter(|i| before[*i] != r.data_out[*i]).collect();
    assert!(changed.iter().all(|i| *i < 12 || *i == 22 || *i == 24 || *i == 25), "{changed:?}");

    let mut expiring = udp("10.0.0.5", "10.20.1.1", 40000, 53);
    expiring.ttl = 1;
    let r = run(&expiring);
    assert_eq!(r.return_value, XDP_PASS, "TTL expiry goes to the stack");
    assert_eq!(r.data_out, expiring.build(), "untouched");

    let r = run(&udp("10.0.0.5", "10.21.0.1", 40000, 53));
    assert_eq!(r.return_value, XDP_PASS, "no route: up the stack");

    let p6 = udp("fd00::5", "fd20::9", 40000, 53);
    let r = run(&p6);
    assert_eq!(r.return_value, XDP_REDIRECT);
    assert_eq!(macs(&r.data_out).1, [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xef]);
    assert_eq!(r.data_out[14 + 7], 63, "hop limit decremented");

    // Switching the route to another next hop is a one-entry plan.
    let switched = spec.replace("02:aa:bb:cc:dd:ee", "02:aa:bb:cc:dd:01");
    let path = write_spec(env.state.path(), "spec.yaml", &switched);
    let out = env.run_ok(&["apply", &path, "--auto-approve"]);
    assert!(out.contains("Plan: 0 to add, 1 to change, 0 to destroy."), "{out}");
    assert_eq!(macs(&run(&p).data_out).1, [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0x01]);

    env.run_ok(&["down", "--auto-approve"]);
}

#[test]
fn an_unresolved_neighbour_is_reported_and_its_route_not_installed() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    let iface = sb.host_if.clone();
    // 10.255.255.254 is never a neighbour here: nothing answers for it.
    let spec = format!(
        "apiVersion: bpfsync/v1\nkind: NodeSpec\ninterfaces:\n  - name: {iface}\n    mesh: {{ mode: skb }}\nroutes:\n  - prefix: 10.30.0.0/16\n    via: {{ interface: {iface}, neighbor: 10.255.255.254 }}\n"
    );
    let path = write_spec(env.state.path(), "spec.yaml", &spec);
    let out = env.run_ok(&["apply", &path, "--auto-approve"]);
    assert!(out.contains("route 10.30.0.0/16: neighbour 10.255.255.254"), "{out}");
    assert!(!out.contains("mesh_routes["), "nothing half-written: {out}");
    let ingress = pin(&env, "mesh");
    let r = run_pinned_on(
        &ingress,
        ProgramType::Xdp,
        &udp("10.0.0.5", "10.30.0.1", 1, 2).build(),
        1,
        Some(ifindex(&iface)),
    )
    .unwrap();
    assert_eq!(r.return_value, XDP_PASS);

    // Once the kernel knows the neighbour, the route is installed.
    let status = std::process::Command::new("ip")
        .args(["neigh", "replace", "10.255.255.254", "lladdr", "02:12:34:56:78:9a", "dev", &iface, "nud", "permanent"])
        .status()
        .unwrap();
    assert!(status.success());
    let out = env.run_ok(&["apply", &path, "--auto-approve"]);
    assert!(out.contains("mesh_routes[10.30.0.0/16] will be created"), "{out}");
    let r = run_pinned_on(
        &ingress,
        ProgramType::Xdp,
        &udp("10.0.0.5", "10.30.0.1", 1, 2).build(),
        1,
        Some(ifindex(&iface)),
    )
    .unwrap();
    assert_eq!(r.return_value, XDP_REDIRECT);
    assert_eq!(macs(&r.data_out).1, [0x02, 0x12, 0x34, 0x56, 0x78, 0x9a]);
    env.run_ok(&["down", "--auto-approve"]);
}

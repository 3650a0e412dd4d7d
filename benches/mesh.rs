//! Cost per packet of the `mesh` datapath as its tables grow, from
//! `BPF_PROG_TEST_RUN` (the kernel's own timing): 10, 1,000 and 100,000
//! policy peer entries; 10, 10,000 and 1,000,000 routes. Two figures per
//! row: an established flow (a TCP ACK of a known connection: the cached
//! decision, one conntrack lookup) and the full path (the same packet with
//! SYN: every policy and route lookup, as for a new flow). Ratios are to
//! the 10-entry case of the same run; an empty XDP program's cost is
//! printed first as the floor, and each figure as a multiple of it.
//! Goals: established policy + route ≤ 100 ns at 10 / 10 and ≤ 1.3× of
//! that at 100,000 peers / 1,000,000 routes; full path ≤ 400 ns.
//!
//!     cargo bench --bench mesh

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use bpfsync::kernel::real::RealKernel;
use bpfsync::kernel::testrun::run_pinned_on;
use bpfsync::kernel::{Kernel, LoadRequest};
use bpfsync::mesh::policy::{Action, Decision, PeerEntry, Scope, encode_decision, encode_peer};
use bpfsync::mesh::{self, encode_route_key, encode_route_value};
use bpfsync::model::Direction;
use bpfsync::net::Cidr;
use bpfsync::packet::{Packet, Transport};
use bpfsync::sandbox::{Sandbox, TempBpffs};
use bpfsync::spec::ProgramType;

/// A test run repeats the program on the same buffer, so a forwarded
/// packet's TTL drops by one per repetition: runs of `REPEAT` from TTL 255
/// stay on the forwarding path; `BATCHES` of them make one figure.
const REPEAT: u32 = 200;
const BATCHES: u32 = 2_000;
const SET: u32 = 7;
const DEFAULT_SET: u32 = 8;

fn host(i: u32) -> Cidr {
    Cidr { addr: IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)), len: 32 }
}

type RawEntries = Vec<(Vec<u8>, Vec<u8>)>;

/// `n` peer prefixes on `ifindex` ingress (one per host), all allowed TCP 8080.
fn policy_entries(ifindex: u32, n: u32) -> (RawEntries, RawEntries) {
    let mut peers: Vec<_> =
        (0..n).map(|i| encode_peer(ifindex, Direction::Ingress, &PeerEntry { prefix: host(i), set_id: SET })).collect();
    peers.push(encode_peer(
        ifindex,
        Direction::Ingress,
        &PeerEntry { prefix: "0.0.0.0/0".parse().unwrap(), set_id: DEFAULT_SET },
    ));
    let deny = Decision { scope: Scope::All, rule_id: 0x8000_0001, action: Action::Deny };
    let allow =
        Decision { scope: Scope::Port { protocol: 6, port: 8080, bits: 16 }, rule_id: 1, action: Action::Allow };
    let actions = vec![encode_decision(SET, &deny), encode_decision(SET, &allow), encode_decision(DEFAULT_SET, &deny)];
    (peers, actions)
}

/// `n` routes to /32 hosts in 172.16.0.0/12 and beyond, via `ifindex`.
fn route_entries(ifindex: u32, n: u32) -> RawEntries {
    (0..n)
        .map(|i| {
            let prefix = Cidr { addr: IpAddr::V4(Ipv4Addr::from(0xac10_0000 + i)), len: 32 };
            (encode_route_key(&prefix), encode_route_value(ifindex, i, [2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]))
        })
        .collect()
}

fn main() {
    if unsafe { libc::geteuid() } != 0 {
        println!("mesh benchmarks need root");
        return;
    }
    let sb = Sandbox::create().unwrap();
    let ifindex: u32 =
        std::fs::read_to_string(format!("/sys/class/net/{}/ifindex", sb.host_if)).unwrap().trim().parse().unwrap();
    let bpffs = TempBpffs::create().unwrap();
    let mut k = RealKernel::open(bpffs.root()).unwrap();
    k.load_program(&LoadRequest::builtin(mesh::PROGRAM, "bench").unwrap()).unwrap();
    let pin = bpffs.root().join("programs").join(mesh::PROGRAM).join("bench");
    let peers_map = mesh::map_ref(mesh::PEERS_MAP);
    let actions_map = mesh::map_ref(mesh::ACTIONS_MAP);
    let routes_map = mesh::map_ref(mesh::ROUTES_MAP);
    let generation_map = mesh::map_ref(mesh::GENERATION_MAP);
    // The floor: an empty XDP program under the same test runs.
    let empty = LoadRequest {
        name: "empty".into(),
        digest: "bench".into(),
        function: "empty_xdp".into(),
        program_type: ProgramType::Xdp,
        bytes: Arc::from(&include_bytes!("../tests/fixtures/empty_xdp.bpf.o")[..]),
        map_owner: "empty".into(),
        fresh_maps: vec![],
    };
    k.load_program(&empty).unwrap();
    let empty_pin = bpffs.root().join("programs").join("empty").join("bench");
    let time = |pin: &std::path::Path, p: &[u8]| {
        let (mut total, mut verdict) = (0.0, 0);
        for _ in 0..BATCHES {
            let r = run_pinned_on(pin, ProgramType::Xdp, p, REPEAT, Some(ifindex)).unwrap();
            total += r.per_run.as_nanos() as f64;
            verdict = r.return_value;
        }
        (total / BATCHES as f64, verdict)
    };
    let packet = |src: u32, dst: Ipv4Addr, flags: u8| {
        let mut p = Packet::new(
            IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + src)),
            IpAddr::V4(dst),
            Transport::Tcp { sport: 40000, dport: 8080, flags },
        );
        p.ttl = 255;
        p.build()
    };
    let floor = time(&empty_pin, &packet(1, Ipv4Addr::new(10, 250, 0, 1), 0x10)).0;
    // (established, full path, verdict): the ACK's first run makes the
    // connection and the second caches its decision; the rest use it.
    let ns = |src: u32, dst: Ipv4Addr| {
        let (established, verdict) = time(&pin, &packet(src, dst, 0x10));
        let (full, full_verdict) = time(&pin, &packet(src, dst, 0x02));
        assert_eq!(verdict, full_verdict, "the fast path decides as the full path does");
        (established, full, verdict)
    };
    let clear = |k: &mut RealKernel, map: &bpfsync::model::MapRef, entries: &[(Vec<u8>, Vec<u8>)]| {
        let keys: Vec<Vec<u8>> = entries.iter().map(|(k, _)| k.clone()).collect();
        k.delete_entries(map, &keys).unwrap();
    };

    println!("floor (empty XDP program): {floor:.0} ns per run");
    println!();
    println!("| table | entries | established ns | × floor | ratio to 10 | full path ns | × floor | ratio to 10 |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let row = |what: &str, entries: String, t: (f64, f64), base: (f64, f64)| {
        println!(
            "| {what} | {entries} | {:.0} | {:.1} | {:.2} | {:.0} | {:.1} | {:.2} |",
            t.0,
            t.0 / floor,
            t.0 / base.0,
            t.1,
            t.1 / floor,
            t.1 / base.1
        );
    };
    // Policy only: the packet's source matches one of n peer prefixes; no routes.
    let mut base = (0.0, 0.0);
    for n in [10u32, 1_000, 100_000] {
        let (peers, actions) = policy_entries(ifindex, n);
        k.write_entries(&actions_map, &actions).unwrap();
        k.write_entries(&peers_map, &peers).unwrap();
        k.bump_generation(&generation_map).unwrap();
        let (established, full, verdict) = ns(n / 2, Ipv4Addr::new(10, 250, 0, 1));
        assert_eq!(verdict, 2, "allowed, up the stack");
        if n == 10 {
            base = (established, full);
        }
        row("policy (peers)", n.to_string(), (established, full), base);
        clear(&mut k, &peers_map, &peers);
    }
    // Routes only: no policy on the interface.
    for n in [10u32, 10_000, 1_000_000] {
        let routes = route_entries(ifindex, n);
        k.write_entries(&routes_map, &routes).unwrap();
        k.bump_generation(&generation_map).unwrap();
        let (established, full, verdict) = ns(1, Ipv4Addr::from(0xac10_0000 + n / 2));
        assert_eq!(verdict, 4, "redirected");
        if n == 10 {
            base = (established, full);
        }
        row("routes", n.to_string(), (established, full), base);
        clear(&mut k, &routes_map, &routes);
    }
    // Both: the full path of a forwarded packet (ingress policy, route,
    // egress policy lookup of the outgoing interface, conntrack).
    for (np, nr) in [(10u32, 10u32), (100_000, 1_000_000)] {
        let (peers, _) = policy_entries(ifindex, np);
        let routes = route_entries(ifindex, nr);
        k.write_entries(&peers_map, &peers).unwrap();
        k.write_entries(&routes_map, &routes).unwrap();
        k.bump_generation(&generation_map).unwrap();
        let (established, full, verdict) = ns(np / 2, Ipv4Addr::from(0xac10_0000 + nr / 2));
        assert_eq!(verdict, 4);
        if np == 10 {
            base = (established, full);
        }
        row("policy + route", format!("{np} peers, {nr} routes"), (established, full), base);
        clear(&mut k, &peers_map, &peers);
        clear(&mut k, &routes_map, &routes);
    }
}

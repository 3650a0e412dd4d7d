//! Policy impact (`plan --impact`): one rule changed in a policy of 100,000
//! peers, evaluated against 100,000 recorded flows (goal: under 200 ms).
//!
//!     cargo bench --bench impact
//!
//! Pure: the specs are compiled and resolved against a node described in
//! memory, as `plan --observed` does. Printed by phase: the tables built
//! from the two states' entries, the evaluation of every flow under both,
//! and — apart — reading the flows as JSON lines (what `--flows` adds).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use bpfsync::compile::{ObjectLoader, compile};
use bpfsync::flows::record::{FlowRecord, read_json_lines};
use bpfsync::mesh::evaluate::Tables;
use bpfsync::model::{Direction, State};
use bpfsync::plan::impact::{self, Change, Interfaces, RecordedFlow};
use bpfsync::plan::resolve_desired;
use bpfsync::spec;

const PEERS: u32 = 100_000;
const FLOWS: u32 = 100_000;

fn peer(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a00_0000 + i * 4)
}

/// A policy allowing tcp/443 from 100,000 /32 peers (and tcp/80 from the
/// first 1,000); `port` replaces the second rule's port (the one change).
fn spec_text(port: u16) -> String {
    let mut s = String::from(
        "apiVersion: bpfsync/v1\nkind: NodeSpec\ninterfaces:\n  - { name: veth0, mesh: { mode: skb } }\npolicies:\n  - name: api\n    interfaces: [veth0]\n    ingress:\n      - ports: [{ port: 443, protocol: tcp }]\n        from:\n",
    );
    for i in 0..PEERS {
        s.push_str(&format!("          - {}/32\n", peer(i)));
    }
    s.push_str(&format!("      - ports: [{{ port: {port}, protocol: tcp }}]\n        from:\n"));
    for i in 0..1_000 {
        s.push_str(&format!("          - {}/32\n", peer(i)));
    }
    s
}

fn node() -> State {
    State {
        interfaces: [("veth0".to_string(), 2u32)].into(),
        interface_macs: [("veth0".to_string(), [2, 0, 0, 0, 0, 2])].into(),
        ..Default::default()
    }
}

fn resolved(text: &str, node: &State) -> State {
    let loaded = spec::load(std::path::Path::new("bench.yaml"), text).unwrap_or_else(|d| panic!("{d}"));
    let desired = compile(&loaded, &mut ObjectLoader::default()).unwrap_or_else(|d| panic!("{d}"));
    let (state, unresolved) = resolve_desired(&desired.state, node);
    assert!(unresolved.is_empty());
    state.into_owned()
}

/// Flows from the peers (and from outside them) to ports 443 and 80.
fn flows() -> Vec<RecordedFlow> {
    (0..FLOWS)
        .map(|i| RecordedFlow {
            interface: "veth0".into(),
            direction: Direction::Ingress,
            protocol: 6,
            source: IpAddr::V4(peer(i % (PEERS + 5_000))),
            source_port: 30_000 + (i % 20_000) as u16,
            destination: IpAddr::V4(Ipv4Addr::new(10, 250, 0, 1)),
            destination_port: if i % 10 == 0 { 80 } else { 443 },
            time: 1_790_000_000_000_000_000 + i as u64 * 1_000_000,
            packets: 3,
            bytes: 180,
        })
        .collect()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    let node = node();
    let (before, after) = (resolved(&spec_text(80), &node), resolved(&spec_text(8080), &node));
    let flows = flows();
    let mut build = Vec::new();
    let mut eval = Vec::new();
    let mut total = Vec::new();
    let mut result = None;
    for _ in 0..5 {
        let t = Instant::now();
        let (old, new) = (Tables::from_state(&before), Tables::from_state(&after));
        build.push(t.elapsed());
        let t = Instant::now();
        let _ = impact::evaluate_tables(&old, &new, &Interfaces(&node.interfaces), &flows);
        eval.push(t.elapsed());
        // What `plan --impact` runs: both (the tables built side by side).
        let t = Instant::now();
        let r = impact::evaluate(&before, &after, &node, &flows);
        total.push(t.elapsed());
        result = Some(r);
    }
    let r = result.unwrap();
    let to_80_from_first: u64 =
        flows.iter().filter(|f| f.destination_port == 80 && f.source < IpAddr::V4(peer(1_000))).count() as u64;
    assert_eq!(r.count(Change::NewlyDropped), to_80_from_first, "the flows to port 80 from the first 1,000 peers");

    // Reading the same flows as JSON lines.
    let mut text = String::new();
    for (i, f) in flows.iter().enumerate() {
        let record = FlowRecord {
            seq: i as u64 + 1,
            time: f.time,
            kind: bpfsync::flows::record::RecordKind::New,
            verdict: bpfsync::flows::record::Verdict::Forwarded,
            drop_reason: None,
            interface: f.interface.clone(),
            direction: Direction::Ingress,
            ip_version: 4,
            protocol: bpfsync::flows::record::Protocol::TCP,
            source: bpfsync::flows::record::Endpoint { ip: f.source, port: f.source_port },
            destination: bpfsync::flows::record::Endpoint { ip: f.destination, port: f.destination_port },
            tcp_flags: vec!["SYN".into()],
            packets: f.packets,
            bytes: f.bytes,
            rule: Some("api ingress[0]".into()),
            policies: vec!["api".into()],
            suppressed: 0,
        };
        text.push_str(&serde_json::to_string(&record).unwrap());
        text.push('\n');
    }
    let read = median(
        (0..3)
            .map(|_| {
                let t = Instant::now();
                let read = read_json_lines(text.as_bytes(), "bench", 1_000_000).unwrap();
                let converted: Vec<RecordedFlow> = read.records.iter().map(|r| r.to_recorded().unwrap()).collect();
                assert_eq!(converted.len(), FLOWS as usize);
                t.elapsed()
            })
            .collect(),
    );
    let groups: BTreeMap<&str, usize> = r.groups.iter().fold(BTreeMap::new(), |mut m, g| {
        *m.entry(g.service.as_str()).or_default() += 1;
        m
    });
    println!(
        "impact of a one-rule change, {PEERS} policy peers, {FLOWS} recorded flows (medians of 5):\n  \
         tables from both states {} (one after the other), evaluation {}; end to end {} (goal < 200 ms)\n  \
         newly dropped {} flows in {} groups {groups:?}\n  \
         reading the flows as JSON lines ({:.1} MB): {} more",
        ms(median(build)),
        ms(median(eval)),
        ms(median(total)),
        r.count(Change::NewlyDropped),
        r.groups.len(),
        text.len() as f64 / 1e6,
        ms(read)
    );
}

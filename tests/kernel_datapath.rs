//! The built-in datapath programs on crafted packets (`BPF_PROG_TEST_RUN`):
//! verdicts, counters and the marks they set, applied by bpfsync itself.

mod common;

use std::net::IpAddr;

use bpfsync::datapath::proto_counters;
use bpfsync::kernel::testrun::run_pinned;
use bpfsync::kernel::{Kernel, Scope};
use bpfsync::model::MapRef;
use bpfsync::packet::{Packet, Transport, arp};
use bpfsync::spec::ProgramType;
use common::{Env, write_spec};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TCX_NEXT: u32 = u32::MAX; // -1

fn spec(enabled: u32, drop_non_ip: u32) -> String {
    format!(
        "apiVersion: bpfsync/v1\nkind: NodeSpec\nprograms:\n  - name: counter\n    builtin: counter\n    type: xdp\n    maps:\n      - name: counter_config\n        entries: [{{ key: 0, value: {enabled} }}, {{ key: 1, value: {drop_non_ip} }}]\n  - name: classify\n    builtin: classifier\n    type: tc\n    maps:\n      - name: class_ports\n        entries:\n          - {{ key: {{ protocol: 17, port: 9 }}, value: {{ mark: 16, priority: 3 }} }}\n      - name: class_prefixes\n        entries:\n          - {{ key: 10.0.0.0/8, value: {{ mark: 1 }} }}\n"
    )
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn pin(env: &Env, program: &str) -> std::path::PathBuf {
    let dir = env.bpffs.root().join("programs").join(program);
    std::fs::read_dir(dir).unwrap().next().unwrap().unwrap().path()
}

fn counters(env: &Env, program: &str, map: &str) -> std::collections::BTreeMap<&'static str, (u64, u64)> {
    let r = MapRef { program: program.into(), map: map.into() };
    let mut k = env.kernel();
    let s = k.observe(&Scope { maps: [r.clone()].into(), ..Default::default() }).unwrap();
    proto_counters(&s.maps[&r].entries).into_iter().map(|(k, v)| (k, (v.packets, v.bytes))).collect()
}

#[test]
fn the_counter_counts_every_protocol_and_drops_non_ip_only_when_asked() {
    let env = Env::new();
    let path = write_spec(env.state.path(), "spec.yaml", &spec(1, 0));
    env.run_ok(&["apply", &path, "--auto-approve"]);
    let counter = pin(&env, "counter");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "tcp",
            Packet::new(ip("10.0.0.1"), ip("10.0.0.2"), Transport::Tcp { sport: 1000, dport: 80, flags: 0x02 }).build(),
        ),
        ("udp", Packet::new(ip("10.0.0.1"), ip("10.0.0.2"), Transport::Udp { sport: 1000, dport: 53 }).build()),
        ("icmp", Packet::new(ip("10.0.0.1"), ip("10.0.0.2"), Transport::Icmp { kind: 8, code: 0 }).build()),
        ("icmpv6", Packet::new(ip("fd00::1"), ip("fd00::2"), Transport::Icmpv6 { kind: 128, code: 0 }).build()),
        (
            "tcp",
            Packet::new(ip("fd00::1"), ip("fd00::2"), Transport::Tcp { sport: 1000, dport: 443, flags: 0x10 }).build(),
        ),
        ("other", Packet::new(ip("10.0.0.1"), ip("10.0.0.2"), Transport::Other(47)).build()),
        ("non-ip", arp()),
    ];
    let mut expected: std::collections::BTreeMap<&str, (u64, u64)> = Default::default();
    for (proto, packet) in &cases {
        let r = run_pinned(&counter, ProgramType::Xdp, packet, 1).unwrap();
        assert_eq!(r.return_value, XDP_PASS, "{proto}");
        assert_eq!(&r.data_out, packet, "{proto}: the counter does not touch packets");
        let e = expected.entry(proto).or_default();
        e.0 += 1;
        e.1 += packet.len() as u64;
    }
    assert_eq!(counters(&env, "counter", "packet_stats"), expected);

    // Drop non-IP frames: one config entry changes, and only ARP is dropped.
    let path = write_spec(env.state.path(), "spec.yaml", &spec(1, 1));
    let out = env.run_ok(&["apply", &path, "--auto-approve"]);
    // Array maps hold every index: 0 → 1 shows as the entry being created.
    assert!(out.contains("Plan: 1 to add, 0 to change, 0 to destroy."), "{out}");
    assert_eq!(run_pinned(&counter, ProgramType::Xdp, &arp(), 1).unwrap().return_value, XDP_DROP);
    assert_eq!(run_pinned(&counter, ProgramType::Xdp, &cases[0].1, 1).unwrap().return_value, XDP_PASS);

    // Counting off (2): packets pass uncounted.
    let path = write_spec(env.state.path(), "spec.yaml", &spec(2, 0));
    env.run_ok(&["apply", &path, "--auto-approve"]);
    let before = counters(&env, "counter", "packet_stats");
    run_pinned(&counter, ProgramType::Xdp, &cases[1].1, 10).unwrap();
    assert_eq!(counters(&env, "counter", "packet_stats"), before);
}

#[test]
fn the_counter_counts_with_an_empty_spec() {
    let env = Env::new();
    let text =
        "apiVersion: bpfsync/v1\nkind: NodeSpec\nprograms:\n  - { name: counter, builtin: counter, type: xdp }\n";
    let path = write_spec(env.state.path(), "spec.yaml", text);
    env.run_ok(&["apply", &path, "--auto-approve"]);
    let udp = Packet::new(ip("10.0.0.1"), ip("10.0.0.2"), Transport::Udp { sport: 1000, dport: 53 }).build();
    run_pinned(&pin(&env, "counter"), ProgramType::Xdp, &udp, 3).unwrap();
    assert_eq!(counters(&env, "counter", "packet_stats").get("udp").map(|c| c.0), Some(3));
}

#[test]
fn the_classifier_marks_by_prefix_then_port_and_counts_what_it_classified() {
    let env = Env::new();
    let path = write_spec(env.state.path(), "spec.yaml", &spec(1, 0));
    env.run_ok(&["apply", &path, "--auto-approve"]);
    let classify = pin(&env, "classify");
    // Port rule wins over the prefix rule.
    let udp9 = Packet::new(ip("10.1.0.1"), ip("10.2.0.1"), Transport::Udp { sport: 5000, dport: 9 }).build();
    let r = run_pinned(&classify, ProgramType::Tc, &udp9, 1).unwrap();
    assert_eq!((r.return_value, r.mark, r.priority), (TCX_NEXT, Some(16), Some(3)));
    // Only the prefix matches.
    let tcp80 =
        Packet::new(ip("10.1.0.1"), ip("10.2.0.1"), Transport::Tcp { sport: 5000, dport: 80, flags: 0x02 }).build();
    let r = run_pinned(&classify, ProgramType::Tc, &tcp80, 1).unwrap();
    assert_eq!((r.return_value, r.mark, r.priority), (TCX_NEXT, Some(1), Some(0)));
    // Nothing matches: untouched, uncounted.
    let other =
        Packet::new(ip("10.1.0.1"), ip("192.168.1.1"), Transport::Tcp { sport: 5000, dport: 9999, flags: 0x02 })
            .build();
    let r = run_pinned(&classify, ProgramType::Tc, &other, 1).unwrap();
    assert_eq!((r.return_value, r.mark, r.priority), (TCX_NEXT, Some(0), Some(0)));
    let c = counters(&env, "classify", "class_stats");
    assert_eq!(c.get("udp").map(|x| x.0), Some(1));
    assert_eq!(c.get("tcp").map(|x| x.0), Some(1), "the unclassified packet is not counted");
}

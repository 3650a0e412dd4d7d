//! `bpfsync flows -o jsonpb` and the `jsonpb` export file: every shape of
//! record bpfsync makes is decoded as Hubble's `GetFlowsResponse` by
//! protobuf's own JSON parser, unknown fields refused, over classes that
//! grpcio-tools generates from Hubble's schema
//! (`tests/fixtures/hubble_flow.proto`, `hubble_decode.py`).

mod common;

use std::net::IpAddr;

use bpfsync::flows::hubble::to_jsonpb;
use bpfsync::flows::record::{DropReason, Endpoint, FlowRecord, Protocol, RecordKind, Verdict};
use bpfsync::model::Direction;
use serde_json::Value;

fn record(protocol: &str, source: (&str, u16), destination: (&str, u16)) -> FlowRecord {
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    FlowRecord {
        seq: 1,
        time: 1_796_225_193_539_014_475,
        kind: RecordKind::New,
        verdict: Verdict::Forwarded,
        drop_reason: None,
        interface: "mesh0".into(),
        direction: Direction::Ingress,
        ip_version: if source.0.contains(':') { 6 } else { 4 },
        protocol: Protocol::parse(protocol).unwrap(),
        source: Endpoint { ip: ip(source.0), port: source.1 },
        destination: Endpoint { ip: ip(destination.0), port: destination.1 },
        tcp_flags: vec![],
        packets: 1,
        bytes: 60,
        rule: Some("api ingress[0]".into()),
        policies: vec!["api".into()],
        suppressed: 0,
    }
}

/// The decoded messages (proto field names), one per record.
fn decode(lines: &[Value]) -> Vec<Value> {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    common::hubble_decode(&text).unwrap_or_else(|e| panic!("the decoder refused a line: {e}"))
}

#[test]
fn every_record_shape_decodes_as_hubbles_get_flows_response() {
    let mut syn = record("tcp", ("10.0.0.1", 45678), ("10.0.0.2", 8080));
    syn.tcp_flags = vec!["SYN".into(), "ACK".into()];
    let mut denied = record("udp", ("10.0.0.9", 5000), ("10.0.0.2", 53));
    denied.verdict = Verdict::Dropped;
    denied.kind = RecordKind::Drop;
    denied.drop_reason = Some(DropReason::PolicyDeny);
    let mut by_default = denied.clone();
    by_default.drop_reason = Some(DropReason::DefaultDeny);
    let mut no_set = denied.clone();
    no_set.drop_reason = Some(DropReason::NoRuleSet);
    let mut unparseable = denied.clone();
    unparseable.drop_reason = Some(DropReason::Unparseable);
    let mut redirected = record("udp", ("10.0.0.1", 40000), ("10.20.0.9", 53));
    redirected.verdict = Verdict::Redirected;
    let mut egress6 = record("tcp", ("fd00::1", 40000), ("fd00::2", 443));
    egress6.direction = Direction::Egress;
    let records = vec![
        syn,
        denied,
        by_default,
        no_set,
        unparseable,
        redirected,
        egress6,
        record("icmp", ("10.0.0.1", 7), ("10.0.0.2", 0)),
        record("icmp", ("10.0.0.2", 0), ("10.0.0.1", 7)),
        record("icmpv6", ("fd00::1", 7), ("fd00::2", 0)),
        record("icmpv6", ("fd00::2", 0), ("fd00::1", 7)),
        record("icmp", ("10.0.0.1", 0), ("10.0.0.2", 0)),
        record("47", ("10.0.0.1", 0), ("10.0.0.2", 0)),
        record("tcp", ("10.0.0.1", 1), ("10.0.0.2", 2)),
    ];
    let lines: Vec<Value> = records.iter().map(|r| to_jsonpb(r, "node-a")).collect();
    let decoded = decode(&lines);
    assert_eq!(decoded.len(), records.len());
    // What the decoder read back is what bpfsync meant (Timestamps come
    // back normalised, so they are compared apart).
    let f = |i: usize| &decoded[i]["flow"];
    assert_eq!(decoded[0]["node_name"], "node-a");
    assert_eq!(decoded[0]["time"], "2026-12-02T15:26:33.539014475Z");
    assert_eq!(f(0)["time"], decoded[0]["time"]);
    assert_eq!(f(0)["verdict"], "FORWARDED");
    assert_eq!(f(0)["Type"], "L3_L4");
    assert_eq!(f(0)["IP"], serde_json::json!({"source": "10.0.0.1", "destination": "10.0.0.2", "ipVersion": "IPv4"}));
    assert_eq!(
        f(0)["l4"],
        serde_json::json!({"TCP": {"source_port": 45678, "destination_port": 8080, "flags": {"SYN": true, "ACK": true}}})
    );
    assert_eq!(f(0)["Summary"], "TCP Flags: SYN, ACK");
    assert_eq!(f(0)["traffic_direction"], "INGRESS");
    assert_eq!(f(0)["interface"]["name"], "mesh0");
    let reasons: Vec<(&str, u64)> =
        (1..5).map(|i| (f(i)["drop_reason_desc"].as_str().unwrap(), f(i)["drop_reason"].as_u64().unwrap())).collect();
    assert_eq!(
        reasons,
        [
            ("POLICY_DENY", 181),
            ("POLICY_DENIED", 133),
            ("NO_CONFIGURATION_AVAILABLE_TO_PERFORM_POLICY_DECISION", 165),
            ("INVALID_PACKET_DROPPED", 134)
        ]
    );
    assert!((1..5).all(|i| f(i)["verdict"] == "DROPPED"));
    assert_eq!(f(5)["verdict"], "FORWARDED", "an XDP redirect to a next hop is forwarding in Hubble's terms");
    assert_eq!((f(6)["traffic_direction"].as_str(), f(6)["IP"]["ipVersion"].as_str()), (Some("EGRESS"), Some("IPv6")));
    assert_eq!(f(7)["l4"], serde_json::json!({"ICMPv4": {"type": 8}}));
    assert_eq!(f(7)["Summary"], "ICMPv4 EchoRequest");
    assert_eq!(f(8)["l4"], serde_json::json!({"ICMPv4": {}}), "echo reply: type 0, the proto's default");
    assert_eq!(f(9)["l4"], serde_json::json!({"ICMPv6": {"type": 128}}));
    assert_eq!(f(10)["l4"], serde_json::json!({"ICMPv6": {"type": 129}}));
    assert_eq!(f(11)["Summary"], "ICMPv4");
    assert!(f(12).get("l4").is_none());
    assert_eq!(f(12)["Summary"], "IP protocol 47");
    assert_eq!(f(13)["Summary"], "TCP");
}

#[test]
fn a_field_hubble_does_not_have_is_refused_by_the_decoder() {
    // The checker is strict: bpfsync's own fields would fail it.
    let mut line = to_jsonpb(&record("tcp", ("10.0.0.1", 1), ("10.0.0.2", 2)), "n");
    line["flow"]["rule"] = Value::String("api ingress[0]".into());
    let err = common::hubble_decode(&format!("{line}\n")).unwrap_err();
    assert!(err.contains("rule"), "{err}");
}

//! Flow records in the shape `hubble observe -o jsonpb` prints: a
//! `GetFlowsResponse` of Cilium's observer API with its `flow` (message
//! `flow.Flow` of `api/v1/flow/flow.proto`), in the protobuf JSON mapping
//! with the proto's own field names (`IP`, `l4`, `TCP`, `source_port`,
//! `traffic_direction`, `drop_reason_desc`, `Type`, `Summary`), so that
//! tools reading Hubble's output read bpfsync's.
//!
//! Only fields of that schema are written (a strict decoder refuses
//! others: `tests/flows_jsonpb.rs` parses every line with protobuf's own
//! JSON parser over those definitions). What Hubble has no field for —
//! the spec rule, packet and byte counts — stays in bpfsync's own JSON.
//!
//! Mapping: bpfsync's `REDIRECTED` (an XDP redirect to a mesh route's next
//! hop) is Hubble's `FORWARDED` (Hubble's `REDIRECTED` means "to the L7
//! proxy"); drop reasons map to Cilium's codes: a deny rule →
//! `POLICY_DENY` (181), a default deny → `POLICY_DENIED` (133), a set
//! without entries → `NO_CONFIGURATION_AVAILABLE_TO_PERFORM_POLICY_DECISION`
//! (165), an unparseable packet → `INVALID_PACKET_DROPPED` (134). ICMP
//! types are known only for echo requests and replies (what the datapath
//! reads); other ICMP messages carry no type.

use serde_json::{Map, Value, json};

use super::record::{DropReason, FlowRecord, Protocol, Verdict};
use crate::model::Direction;

/// Cilium's `DropReason` name and number for a bpfsync drop reason.
fn drop_reason(reason: DropReason) -> (&'static str, u32) {
    match reason {
        DropReason::PolicyDeny => ("POLICY_DENY", 181),
        DropReason::DefaultDeny => ("POLICY_DENIED", 133),
        DropReason::NoRuleSet => ("NO_CONFIGURATION_AVAILABLE_TO_PERFORM_POLICY_DECISION", 165),
        DropReason::Unparseable => ("INVALID_PACKET_DROPPED", 134),
    }
}

/// `flow.Layer4` and the `Summary` Hubble writes for it.
fn layer4(r: &FlowRecord) -> (Option<Value>, String) {
    let ports = || json!({ "source_port": r.source.port, "destination_port": r.destination.port });
    match r.protocol {
        Protocol::TCP => {
            let flags: Map<String, Value> = r.tcp_flags.iter().map(|f| (f.clone(), Value::Bool(true))).collect();
            let mut tcp = ports();
            if !flags.is_empty() {
                tcp["flags"] = Value::Object(flags);
            }
            let summary = if r.tcp_flags.is_empty() {
                "TCP".to_string()
            } else {
                format!("TCP Flags: {}", r.tcp_flags.join(", "))
            };
            (Some(json!({ "TCP": tcp })), summary)
        }
        Protocol::UDP => (Some(json!({ "UDP": ports() })), "UDP".into()),
        Protocol::ICMP | Protocol::ICMPV6 => {
            let v6 = r.protocol == Protocol::ICMPV6;
            // `mesh.bpf.c` keeps the echo identifier as the source port of
            // a request and the destination port of a reply.
            let (kind, name) = match (r.source.port != 0, r.destination.port != 0, v6) {
                (true, false, false) => (Some(8), "EchoRequest"),
                (false, true, false) => (Some(0), "EchoReply"),
                (true, false, true) => (Some(128), "EchoRequest"),
                (false, true, true) => (Some(129), "EchoReply"),
                _ => (None, ""),
            };
            let key = if v6 { "ICMPv6" } else { "ICMPv4" };
            let body = kind.map_or_else(|| json!({}), |t| json!({ "type": t }));
            let summary = format!("{key} {name}").trim_end().to_string();
            (Some(json!({ key: body })), summary)
        }
        Protocol(other) => (None, format!("IP protocol {other}")),
    }
}

/// One record as a `GetFlowsResponse` (what `hubble observe -o jsonpb`
/// prints per line); `node` is this node's name.
pub fn to_jsonpb(r: &FlowRecord, node: &str) -> Value {
    let time = crate::time::format_rfc3339(r.time);
    let verdict = match r.verdict {
        Verdict::Dropped => "DROPPED",
        Verdict::Forwarded | Verdict::Redirected => "FORWARDED",
    };
    let mut flow = Map::new();
    flow.insert("time".into(), json!(time));
    flow.insert("verdict".into(), json!(verdict));
    if let Some(reason) = r.drop_reason {
        let (name, code) = drop_reason(reason);
        flow.insert("drop_reason".into(), json!(code));
        flow.insert("drop_reason_desc".into(), json!(name));
    }
    flow.insert(
        "IP".into(),
        json!({
            "source": r.source.ip.to_string(),
            "destination": r.destination.ip.to_string(),
            "ipVersion": if r.ip_version == 6 { "IPv6" } else { "IPv4" },
        }),
    );
    let (l4, summary) = layer4(r);
    if let Some(l4) = l4 {
        flow.insert("l4".into(), l4);
    }
    flow.insert("Type".into(), json!("L3_L4"));
    flow.insert("node_name".into(), json!(node));
    flow.insert("traffic_direction".into(), json!(if r.direction == Direction::Egress { "EGRESS" } else { "INGRESS" }));
    flow.insert("interface".into(), json!({ "name": r.interface }));
    flow.insert("Summary".into(), json!(summary));
    json!({ "flow": flow, "node_name": node, "time": time })
}

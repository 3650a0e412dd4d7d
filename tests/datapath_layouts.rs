//! Every struct the datapath shares with Rust has one layout: the Rust
//! mirrors in `src/datapath.rs` (which the encoders use) against what
//! clang made of `bpf/bpfsync.h`, read from the committed objects' BTF —
//! size, and each field's offset and size, by name. A field added, moved
//! or resized on one side only fails here. No kernel needed.

use std::collections::BTreeMap;
use std::mem::{offset_of, size_of};

use bpfsync::codec::Layout;
use bpfsync::datapath::*;

/// A Rust mirror's layout: its size and (C field name → offset, size).
struct Mirror {
    size: usize,
    fields: BTreeMap<&'static str, (usize, usize)>,
}

/// `mirror!(Type { "c_name" => rust_field, … })`.
macro_rules! mirror {
    ($t:ty { $($c:literal => $f:ident),* $(,)? }) => {{
        let value = <$t>::default();
        let _ = &value;
        Mirror {
            size: size_of::<$t>(),
            fields: [$(($c, (offset_of!($t, $f), std::mem::size_of_val(&value.$f)))),*].into_iter().collect(),
        }
    }};
}

fn object(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/bpf/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// Compares one C struct in `object`'s BTF with its mirror.
fn check(object_bytes: &[u8], c_struct: &str, mirror: Mirror, problems: &mut Vec<String>) {
    let Some(Layout::Struct { size, fields }) = bpfsync::object::struct_layout(object_bytes, c_struct) else {
        problems.push(format!("`struct {c_struct}` is not in the object's BTF"));
        return;
    };
    if size != mirror.size {
        problems.push(format!("`struct {c_struct}`: C is {size} bytes, Rust {}", mirror.size));
    }
    for f in &fields {
        match mirror.fields.get(f.name.as_str()) {
            None => problems.push(format!("`struct {c_struct}`: field `{}` has no Rust mirror", f.name)),
            Some(&(offset, len)) if (offset, len) != (f.offset, f.layout.size()) => problems.push(format!(
                "`struct {c_struct}.{}`: C at {} ({} bytes), Rust at {offset} ({len} bytes)",
                f.name,
                f.offset,
                f.layout.size()
            )),
            Some(_) => {}
        }
    }
    for name in mirror.fields.keys() {
        if !fields.iter().any(|f| f.name == *name) {
            problems.push(format!("`struct {c_struct}`: Rust mirrors `{name}`, which C does not have"));
        }
    }
}

#[test]
fn every_shared_struct_has_the_same_layout_in_c_and_rust() {
    let mesh = object("mesh.bpf.o");
    let classifier = object("classifier.bpf.o");
    let mut problems = Vec::new();
    let p = &mut problems;
    check(&mesh, "proto_stats", mirror!(ProtoStats { "packets" => packets, "bytes" => bytes }), p);
    check(
        &mesh,
        "policy_peer_key",
        mirror!(PolicyPeerKey {
            "prefixlen" => prefixlen, "ifindex" => ifindex, "dir" => dir, "family" => family, "pad" => pad, "addr" => addr
        }),
        p,
    );
    check(&mesh, "policy_peer_value", mirror!(PolicyPeerValue { "set_id" => set_id }), p);
    check(
        &mesh,
        "policy_action_key",
        mirror!(PolicyActionKey {
            "prefixlen" => prefixlen, "set_id" => set_id, "protocol" => protocol, "pad" => pad, "port" => port_be
        }),
        p,
    );
    check(
        &mesh,
        "policy_action_value",
        mirror!(PolicyActionValue { "rule_id" => rule_id, "action" => action, "pad" => pad }),
        p,
    );
    check(
        &mesh,
        "route_key",
        mirror!(RouteKey { "prefixlen" => prefixlen, "family" => family, "pad" => pad, "addr" => addr }),
        p,
    );
    check(
        &mesh,
        "route_value",
        mirror!(RouteValue { "ifindex" => ifindex, "route_id" => route_id, "src_mac" => src_mac, "dst_mac" => dst_mac }),
        p,
    );
    check(
        &mesh,
        "ct_key",
        mirror!(CtKey {
            "family" => family, "protocol" => protocol, "sport" => sport_be, "dport" => dport_be, "pad" => pad,
            "saddr" => saddr, "daddr" => daddr
        }),
        p,
    );
    check(
        &mesh,
        "ct_value",
        mirror!(CtValue {
            "last_seen_ns" => last_seen_ns, "report_ns" => report_ns, "packets" => packets, "bytes" => bytes,
            "reported_packets" => reported_packets, "reported_bytes" => reported_bytes, "rule_id" => rule_id,
            "ifindex" => ifindex, "tcp_flags" => tcp_flags, "dir" => dir, "flags" => flags, "pad" => pad,
            "check_jiffies" => check_jiffies, "decision" => decision
        }),
        p,
    );
    check(
        &mesh,
        "ct_decision",
        mirror!(CtDecision {
            "generation" => generation, "ifindex" => ifindex, "rule_id" => rule_id, "out_rule_id" => out_rule_id,
            "route" => route, "verdict" => verdict, "reply" => reply, "pad" => pad
        }),
        p,
    );
    check(
        &mesh,
        "flow_event",
        mirror!(FlowEvent {
            "time_ns" => time_ns, "bytes" => bytes, "packets" => packets, "ifindex" => ifindex, "rule_id" => rule_id,
            "suppressed" => suppressed, "kind" => kind, "verdict" => verdict, "dir" => dir,
            "drop_reason" => drop_reason, "tcp_flags" => tcp_flags, "pad" => pad, "tuple" => tuple
        }),
        p,
    );
    check(
        &mesh,
        "flow_config",
        mirror!(FlowConfig {
            "disabled" => disabled, "drop_records_per_sec" => drop_records_per_sec,
            "report_interval_ns" => report_interval_ns, "drop_window_ns" => drop_window_ns
        }),
        p,
    );
    check(&mesh, "iface_key", mirror!(IfaceKey { "ifindex" => ifindex, "dir" => dir }), p);
    check(
        &classifier,
        "class_port_key",
        mirror!(ClassPortKey { "protocol" => protocol, "pad" => pad, "port" => port }),
        p,
    );
    check(&classifier, "class_action", mirror!(ClassAction { "mark" => mark, "priority" => priority }), p);
    check(&classifier, "class_prefix_key", mirror!(ClassPrefixKey { "prefixlen" => prefixlen, "addr" => addr }), p);
    let tcp = object("tcp_telemetry.bpf.o");
    check(&tcp, "watch_key", mirror!(WatchKey { "prefixlen" => prefixlen, "addr" => addr }), p);
    check(
        &tcp,
        "tcp_watch_stats",
        mirror!(TcpWatchStats {
            "rtt_buckets" => rtt_buckets, "rtt_sum_us" => rtt_sum_us, "rtt_samples" => rtt_samples,
            "connect_buckets" => connect_buckets, "connect_sum_us" => connect_sum_us,
            "connect_samples" => connect_samples, "retransmits" => retransmits, "cong_cwr" => cong_cwr,
            "cong_recovery" => cong_recovery, "cong_loss" => cong_loss, "opened_active" => opened_active,
            "opened_passive" => opened_passive, "closed" => closed, "connects_failed" => connects_failed,
            "resets_received" => resets_received, "resets_sent" => resets_sent,
        }),
        p,
    );
    check(
        &object("xdp_errors.bpf.o"),
        "xdp_error_key",
        mirror!(XdpErrorKey { "ifindex" => ifindex, "kind" => kind, "code" => code }),
        p,
    );
    match bpfsync::object::struct_layout(&tcp, "watch_name") {
        Some(l) if l.size() == 64 => {}
        other => problems.push(format!("`struct watch_name`: {other:?}, Rust writes 64 bytes")),
    }
    // `struct rule_name` is one char array: its length is the constant.
    match bpfsync::object::struct_layout(&mesh, "rule_name") {
        Some(l) if l.size() == RULE_NAME_LEN => {}
        other => problems.push(format!("`struct rule_name`: {other:?}, Rust has {RULE_NAME_LEN} bytes")),
    }
    assert!(problems.is_empty(), "C and Rust disagree:\n  {}", problems.join("\n  "));
}

#[test]
fn a_disagreement_is_reported_by_field() {
    // The check itself can fail: a mirror with a field moved and one missing.
    let mesh = object("mesh.bpf.o");
    let mut problems = Vec::new();
    let wrong = Mirror { size: 24, fields: [("prefixlen", (0, 4)), ("family", (5, 1))].into_iter().collect() };
    check(&mesh, "route_key", wrong, &mut problems);
    assert!(problems.iter().any(|p| p.contains("route_key.family") && p.contains("C at 4")), "{problems:?}");
    assert!(problems.iter().any(|p| p.contains("field `addr` has no Rust mirror")), "{problems:?}");
}

//! The program names and tracepoints the spec's `telemetry:` section
//! reserves. Here, not in `telemetry/`, because the spec's own checks
//! need them and `spec` sits below `telemetry`.

use super::TelemetrySpec;
use crate::net::Cidr;

/// Watches a spec may declare: slots 1..=255 of `tcp_stats` (slot 0 is
/// `other`).
pub const MAX_WATCHES: usize = 255;
/// Prefixes over all watches: `watch_prefixes`' `max_entries`.
pub const MAX_PREFIXES: usize = 1024;

/// The TCP programs and their tracepoints; the first owns the maps.
pub const TCP_PROGRAMS: [(&str, &str); 6] = [
    ("tcp_rtt", "tcp/tcp_probe"),
    ("tcp_retransmits", "tcp/tcp_retransmit_skb"),
    ("tcp_congestion", "tcp/tcp_cong_state_set"),
    ("tcp_lifecycle", "sock/inet_sock_set_state"),
    ("tcp_resets_received", "tcp/tcp_receive_reset"),
    ("tcp_resets_sent", "tcp/tcp_send_reset"),
];
pub const DROP_PROGRAMS: [(&str, &str); 1] = [("skb_drops", "skb/kfree_skb")];
pub const XDP_PROGRAMS: [(&str, &str); 2] =
    [("xdp_redirect_errors", "xdp/xdp_redirect_err"), ("xdp_exceptions", "xdp/xdp_exception")];

/// The programs a telemetry section loads: (name, tracepoint, the owner
/// of its maps when it shares them).
pub fn programs(t: &TelemetrySpec) -> Vec<(&'static str, &'static str, Option<&'static str>)> {
    let mut out = Vec::new();
    for (on, list) in [
        (t.tcp.is_some(), &TCP_PROGRAMS[..]),
        (t.drops.is_some(), &DROP_PROGRAMS[..]),
        (t.xdp_errors, &XDP_PROGRAMS[..]),
    ] {
        if on {
            let owner = list[0].0;
            out.extend(list.iter().enumerate().map(|(i, (name, event))| (*name, *event, (i > 0).then_some(owner))));
        }
    }
    out
}

/// A watched prefix as the trie holds it: IPv4 as IPv4-mapped IPv6
/// (`::ffff:a.b.c.d/len+96`), so one trie answers for both families.
pub fn trie_cidr(c: &Cidr) -> String {
    match c.addr {
        std::net::IpAddr::V4(a) => format!("{}/{}", a.to_ipv6_mapped(), c.len + 96),
        std::net::IpAddr::V6(a) => format!("{a}/{}", c.len),
    }
}

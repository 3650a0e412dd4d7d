//! Rust mirrors of `bpf/bpfsync.h`, and decoders for the counters the
//! built-in programs keep. Sizes are asserted at compile time; every size
//! and field offset is checked against the objects' BTF by
//! `tests/datapath_layouts.rs`. Encoders build map keys and values from
//! these types ([`Plain`]), never byte by byte.

use std::collections::BTreeMap;

use crate::entries::Entries;

/// A `#[repr(C)]` mirror of a C struct whose bytes are the struct's:
/// no padding (the fields' sizes add up to the size, checked at compile
/// time by [`plain!`]), only integers and byte arrays in it, so every bit
/// pattern is a valid value.
///
/// # Safety
/// Implemented only by [`plain!`], which makes those checks.
pub unsafe trait Plain: Copy + Default {
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: no padding, so every byte of `self` is initialised.
        unsafe { std::slice::from_raw_parts((self as *const Self).cast::<u8>(), std::mem::size_of::<Self>()) }
    }

    fn to_vec(&self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }

    /// The value `b` holds; None unless `b` is exactly its size.
    fn read(b: &[u8]) -> Option<Self> {
        // SAFETY: the length matches and every bit pattern is valid;
        // read_unaligned copes with any alignment.
        (b.len() == std::mem::size_of::<Self>()).then(|| unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<Self>()) })
    }
}

/// Defines a [`Plain`] mirror: `#[repr(C)]`, and a compile-time proof that
/// it has no padding.
macro_rules! plain {
    ($(#[$meta:meta])* pub struct $name:ident { $(pub $field:ident: $ty:ty,)* }) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct $name {
            $(pub $field: $ty,)*
        }
        const _: () = assert!(
            std::mem::size_of::<$name>() == 0 $(+ std::mem::size_of::<$ty>())*,
            concat!("`", stringify!($name), "` has padding: name it as a field")
        );
        // SAFETY: repr(C) with no padding (asserted above); the fields are
        // integers, byte arrays and other `Plain` types.
        unsafe impl Plain for $name {}
    };
}

plain! {
    /// `struct proto_stats`.
    pub struct ProtoStats {
        pub packets: u64,
        pub bytes: u64,
    }
}
const _: () = assert!(std::mem::size_of::<ProtoStats>() == 16);

plain! {
    /// `struct class_port_key`.
    pub struct ClassPortKey {
        pub protocol: u8,
        pub pad: u8,
        pub port: u16,
    }
}
const _: () = assert!(std::mem::size_of::<ClassPortKey>() == 4);

plain! {
    /// `struct class_action`.
    pub struct ClassAction {
        pub mark: u32,
        pub priority: u32,
    }
}
const _: () = assert!(std::mem::size_of::<ClassAction>() == 8);

plain! {
    /// `struct class_prefix_key`.
    pub struct ClassPrefixKey {
        pub prefixlen: u32,
        pub addr: [u8; 4],
    }
}
const _: () = assert!(std::mem::size_of::<ClassPrefixKey>() == 8);

/// `enum bpfsync_proto`: slot names of `packet_stats` and `class_stats`.
pub const PROTO_NAMES: [&str; 6] = ["other", "icmp", "tcp", "udp", "icmpv6", "non-ip"];

/// `enum mesh_dir`.
pub const DIRECTION_NAMES: [&str; 2] = ["ingress", "egress"];

/// `enum mesh_verdict`: slot names of `verdict_stats` (per direction).
pub const VERDICT_NAMES: [&str; 7] =
    ["pass", "forward", "drop-rule", "drop-default", "reply", "ttl-exceeded", "drop-unparseable"];

plain! {
    /// `struct policy_peer_key`.
    pub struct PolicyPeerKey {
        pub prefixlen: u32,
        pub ifindex: u32,
        pub dir: u8,
        pub family: u8,
        pub pad: [u8; 2],
        pub addr: [u8; 16],
    }
}
const _: () = assert!(std::mem::size_of::<PolicyPeerKey>() == 28);

plain! {
    /// `struct policy_action_key`.
    pub struct PolicyActionKey {
        pub prefixlen: u32,
        pub set_id: u32,
        pub protocol: u8,
        pub pad: u8,
        pub port_be: u16,
    }
}
const _: () = assert!(std::mem::size_of::<PolicyActionKey>() == 12);

plain! {
    /// `struct policy_action_value`.
    pub struct PolicyActionValue {
        pub rule_id: u32,
        pub action: u8,
        pub pad: [u8; 3],
    }
}
const _: () = assert!(std::mem::size_of::<PolicyActionValue>() == 8);

plain! {
    /// `struct policy_peer_value`.
    pub struct PolicyPeerValue {
        pub set_id: u32,
    }
}

plain! {
    /// `struct iface_key` (mesh.bpf.c): the key of `iface_drops`.
    pub struct IfaceKey {
        pub ifindex: u32,
        pub dir: u32,
    }
}

/// `struct rule_name`.
pub const RULE_NAME_LEN: usize = 96;

plain! {
    /// `struct route_key`.
    pub struct RouteKey {
        pub prefixlen: u32,
        pub family: u8,
        pub pad: [u8; 3],
        pub addr: [u8; 16],
    }
}
const _: () = assert!(std::mem::size_of::<RouteKey>() == 24);

plain! {
    /// `struct route_value`.
    pub struct RouteValue {
        pub ifindex: u32,
        pub route_id: u32,
        pub src_mac: [u8; 6],
        pub dst_mac: [u8; 6],
    }
}
const _: () = assert!(std::mem::size_of::<RouteValue>() == 20);

plain! {
    /// `struct ct_key` and `struct ct_value`.
    pub struct CtKey {
        pub family: u8,
        pub protocol: u8,
        pub sport_be: u16,
        pub dport_be: u16,
        pub pad: [u8; 2],
        pub saddr: [u8; 16],
        pub daddr: [u8; 16],
    }
}
const _: () = assert!(std::mem::size_of::<CtKey>() == 40);

plain! {
    pub struct CtValue {
        pub last_seen_ns: u64,
        pub report_ns: u64,
        pub packets: u64,
        pub bytes: u64,
        pub reported_packets: u64,
        pub reported_bytes: u64,
        pub rule_id: u32,
        pub ifindex: u32,
        pub tcp_flags: u32,
        pub dir: u8,
        pub flags: u8,
        pub pad: [u8; 2],
        pub check_jiffies: u64,
        pub decision: [CtDecision; 2],
    }
}
const _: () = assert!(std::mem::size_of::<CtValue>() == 168);

plain! {
    /// `struct ct_decision`: a hook's cached decision for a connection (the
    /// established-flow fast path), valid under one `datapath_generation`.
    pub struct CtDecision {
        pub generation: u64,
        pub ifindex: u32,
        pub rule_id: u32,
        pub out_rule_id: u32,
        pub route: RouteValue,
        pub verdict: u8,
        pub reply: u8,
        pub pad: [u8; 6],
    }
}
const _: () = assert!(std::mem::size_of::<CtDecision>() == 48);

/// `CT_F_REPLY`: an entry made for the reply direction of a connection.
pub const CT_F_REPLY: u8 = 1;

/// `enum flow_kind`.
pub const FLOW_KIND_NAMES: [&str; 3] = ["new", "update", "drop"];
/// `enum flow_verdict`, spelled as Hubble does.
pub const FLOW_VERDICT_NAMES: [&str; 3] = ["FORWARDED", "DROPPED", "REDIRECTED"];
/// `enum drop_reason`.
pub const DROP_REASON_NAMES: [&str; 5] = ["", "policy-deny", "default-deny", "no-rule-set", "unparseable"];

plain! {
    /// `struct flow_event`: one record of the `flow_events` ring buffer.
    pub struct FlowEvent {
        pub time_ns: u64,
        pub bytes: u64,
        pub packets: u32,
        pub ifindex: u32,
        pub rule_id: u32,
        pub suppressed: u32,
        pub kind: u8,
        pub verdict: u8,
        pub dir: u8,
        pub drop_reason: u8,
        pub tcp_flags: u8,
        pub pad: [u8; 3],
        pub tuple: CtKey,
    }
}
const _: () = assert!(std::mem::size_of::<FlowEvent>() == 80);

impl FlowEvent {
    /// Reads a record as the kernel wrote it; `None` when it is too short.
    pub fn from_bytes(b: &[u8]) -> Option<FlowEvent> {
        if b.len() < std::mem::size_of::<FlowEvent>() {
            return None;
        }
        // SAFETY: FlowEvent is plain old data of that size, every bit
        // pattern is valid, and read_unaligned copes with any alignment.
        Some(unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<FlowEvent>()) })
    }
}

plain! {
    /// `struct flow_config`, the one value of `flow_config` (0 = default).
    pub struct FlowConfig {
        pub disabled: u32,
        pub drop_records_per_sec: u32,
        pub report_interval_ns: u64,
        pub drop_window_ns: u64,
    }
}
const _: () = assert!(std::mem::size_of::<FlowConfig>() == 24);

/// Slots of `flow_counters` (`enum flow_counter`): records lost because the
/// ring buffer was full, by kind; drop records the rate limit skipped; and
/// dropped packets no record will carry.
pub const FLOW_COUNTER_NAMES: [&str; 5] =
    ["lost-new", "lost-update", "lost-drop", "suppressed-drop", "unrecorded-drop"];

/// Decodes `flow_counters` (u32 slot → u64) by slot name.
pub fn flow_counters(entries: &Entries) -> BTreeMap<&'static str, u64> {
    let mut out: BTreeMap<&'static str, u64> = FLOW_COUNTER_NAMES.iter().map(|n| (*n, 0)).collect();
    for (k, v) in entries.iter() {
        let slot = k.get(..4).and_then(|b| b.try_into().ok()).map(u32::from_ne_bytes);
        let value = v.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_ne_bytes);
        if let (Some(name), Some(n)) = (slot.and_then(|s| FLOW_COUNTER_NAMES.get(s as usize)), value) {
            out.insert(name, n);
        }
    }
    out
}

/// Decodes a per-direction array (`mesh_stats`, `verdict_stats`: u32
/// `dir * slots.len() + slot` → proto_stats) as `direction/slot` → stats;
/// zero slots are left out.
pub fn directional_counters(entries: &Entries, slots: &[&str]) -> BTreeMap<String, ProtoStats> {
    let mut out = BTreeMap::new();
    for (k, v) in entries.iter() {
        let Some(i) = k.get(..4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes) else { continue };
        let (dir, slot) = (i as usize / slots.len(), i as usize % slots.len());
        if let (Some(d), Some(s), Some(st)) = (DIRECTION_NAMES.get(dir), slots.get(slot), ProtoStats::from_bytes(v))
            && st.packets > 0
        {
            out.insert(format!("{d}/{s}"), st);
        }
    }
    out
}

/// Decodes a map keyed by a u32 id (`rule_stats`, `route_stats`).
pub fn keyed_counters(entries: &Entries) -> BTreeMap<u32, ProtoStats> {
    entries
        .iter()
        .filter_map(|(k, v)| Some((u32::from_ne_bytes(k.get(..4)?.try_into().ok()?), ProtoStats::from_bytes(v)?)))
        .collect()
}

/// Decodes `iface_drops` (`struct iface_key { u32 ifindex; u32 dir; }` →
/// proto_stats): (ifindex, direction name) → what the policy dropped there.
pub fn interface_counters(entries: &Entries) -> BTreeMap<(u32, &'static str), ProtoStats> {
    entries
        .iter()
        .filter_map(|(k, v)| {
            let key = IfaceKey::read(k)?;
            Some(((key.ifindex, *DIRECTION_NAMES.get(key.dir as usize)?), ProtoStats::from_bytes(v)?))
        })
        .collect()
}

/// `WATCH_SLOTS`: slot 0 is "other", 1.. the spec's watches in order.
pub const WATCH_SLOTS: usize = 256;
/// `TELEMETRY_BUCKETS`: log2 buckets of microseconds.
pub const TELEMETRY_BUCKETS: usize = 32;
/// `DROP_REASON_SLOTS`: the last slot holds subsystem reasons.
pub const DROP_REASON_SLOTS: usize = 1024;

plain! {
    /// `struct watch_key`: IPv4 as IPv4-mapped IPv6, prefix length + 96.
    pub struct WatchKey {
        pub prefixlen: u32,
        pub addr: [u8; 16],
    }
}

plain! {
    /// `struct tcp_watch_stats`.
    pub struct TcpWatchStats {
        pub rtt_buckets: [u64; TELEMETRY_BUCKETS],
        pub rtt_sum_us: u64,
        pub rtt_samples: u64,
        pub connect_buckets: [u64; TELEMETRY_BUCKETS],
        pub connect_sum_us: u64,
        pub connect_samples: u64,
        pub retransmits: u64,
        pub cong_cwr: u64,
        pub cong_recovery: u64,
        pub cong_loss: u64,
        pub opened_active: u64,
        pub opened_passive: u64,
        pub closed: u64,
        pub connects_failed: u64,
        pub resets_received: u64,
        pub resets_sent: u64,
    }
}

plain! {
    /// `struct xdp_error_key`.
    pub struct XdpErrorKey {
        pub ifindex: u32,
        pub kind: u16,
        pub code: u16,
    }
}

/// `enum xdp_error_kind`.
pub const XDP_ERR_REDIRECT: u16 = 0;
pub const XDP_ERR_EXCEPTION: u16 = 1;

/// `LATENCY_BUCKETS`.
pub const LATENCY_BUCKETS: usize = 64;

impl ProtoStats {
    /// One `struct proto_stats`, or the sum of a per-CPU map's copies (the
    /// kernel hands them over one after another, 16 bytes each).
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() < 16 {
            return None;
        }
        let word = |c: &[u8], at: usize| u64::from_ne_bytes(c[at..at + 8].try_into().unwrap_or_default());
        Some(b.chunks_exact(16).fold(ProtoStats::default(), |sum, c| ProtoStats {
            packets: sum.packets.wrapping_add(word(c, 0)),
            bytes: sum.bytes.wrapping_add(word(c, 8)),
        }))
    }
}

/// Decodes a `packet_stats`-shaped map (u32 slot → proto_stats) by
/// protocol name; absent slots are zero.
pub fn proto_counters(entries: &Entries) -> BTreeMap<&'static str, ProtoStats> {
    let mut out = BTreeMap::new();
    for (k, v) in entries.iter() {
        let slot = k.first().copied().unwrap_or(0) as usize;
        if let (Some(name), Some(s)) = (PROTO_NAMES.get(slot), ProtoStats::from_bytes(v)) {
            out.insert(*name, s);
        }
    }
    out
}

/// Decodes `latency_hist` (u32 bucket → u64 count) into (bucket, count).
pub fn latency_histogram(entries: &Entries) -> Vec<(u32, u64)> {
    entries
        .iter()
        .filter_map(|(k, v)| {
            let b = u32::from_le_bytes(k.get(..4)?.try_into().ok()?);
            let c = u64::from_le_bytes(v.get(..8)?.try_into().ok()?);
            Some((b, c))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_counters() {
        let mut m = Entries::new();
        let mut v = 3u64.to_le_bytes().to_vec();
        v.extend(300u64.to_le_bytes());
        m.insert(2u32.to_le_bytes(), v);
        let c = proto_counters(&m);
        assert_eq!(c["tcp"], ProtoStats { packets: 3, bytes: 300 });
    }
}

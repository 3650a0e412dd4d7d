//! Rust mirrors of `bpf/bpfsync.h`, and decoders for the counters the
//! built-in programs keep. Sizes are asserted at compile time.

use std::collections::BTreeMap;

use crate::entries::Entries;

/// `struct proto_stats`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProtoStats {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(std::mem::size_of::<ProtoStats>() == 16);

/// `struct class_port_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClassPortKey {
    pub protocol: u8,
    pub pad: u8,
    pub port: u16,
}
const _: () = assert!(std::mem::size_of::<ClassPortKey>() == 4);

/// `struct class_action`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClassAction {
    pub mark: u32,
    pub priority: u32,
}
const _: () = assert!(std::mem::size_of::<ClassAction>() == 8);

/// `struct class_prefix_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClassPrefixKey {
    pub prefixlen: u32,
    pub addr: [u8; 4],
}
const _: () = assert!(std::mem::size_of::<ClassPrefixKey>() == 8);

/// `enum bpfsync_proto`: slot names of `packet_stats` and `class_stats`.
pub const PROTO_NAMES: [&str; 6] = ["other", "icmp", "tcp", "udp", "icmpv6", "non-ip"];

/// `LATENCY_BUCKETS`.
pub const LATENCY_BUCKETS: usize = 64;

impl ProtoStats {
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() < 16 {
            return None;
        }
        Some(ProtoStats {
            packets: u64::from_le_bytes(b[0..8].try_into().ok()?),
            bytes: u64::from_le_bytes(b[8..16].try_into().ok()?),
        })
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

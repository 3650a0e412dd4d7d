//! Network telemetry from tracepoints (`telemetry:` in the spec): which
//! built-in programs it loads and what their maps hold, and the counters
//! and histograms they keep, decoded from an observed state.
//!
//! Three objects, each with its own maps:
//! - `tcp_telemetry.bpf.o`: six TCP tracepoints charge every event to the
//!   slot of its remote address in `watch_prefixes` (slot 0 = `other`)
//!   in the per-CPU `tcp_stats`: RTT and connect-latency log2
//!   histograms, retransmits, congestion-state entries, opens, closes,
//!   failed connects and resets;
//! - `skb_drops.bpf.o`: `skb:kfree_skb` counted by drop reason, filtered
//!   in the program by `drop_filter` (reasons named from kernel BTF, see
//!   [`reasons`]);
//! - `xdp_errors.bpf.o`: failed redirects and exceptions by interface.
//!
//! They see traffic this node terminates or whose skb it frees; what the
//! mesh datapath forwards in XDP never becomes an skb here.

pub mod hist;
pub mod reasons;

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::datapath::{self, Plain, TcpWatchStats, WatchKey, XdpErrorKey};
use crate::entries::Entries;
use crate::model::{MapRef, State};
use crate::net::Cidr;
use crate::spec::{EntrySpec, MapSpec, ProgramSpec, ProgramType, TelemetrySpec};

pub use hist::Log2Histogram;
pub use reasons::DropReasonNames;

pub use crate::spec::telemetry::{
    DROP_PROGRAMS, MAX_PREFIXES, MAX_WATCHES, TCP_PROGRAMS, XDP_PROGRAMS, programs, trie_cidr,
};

// The spec's limits are the maps' sizes.
const _: () = assert!(MAX_WATCHES == datapath::WATCH_SLOTS - 1);

/// The name of slot 0.
pub const OTHER: &str = "other";

/// The section as ordinary programs with their managed map entries: the
/// compiler treats them like declared ones. `drop_skip` is the filter,
/// resolved against the kernel's reasons by the caller (slots to skip).
pub fn program_specs(t: &TelemetrySpec, drop_skip: &[u32]) -> Vec<ProgramSpec> {
    programs(t)
        .into_iter()
        .map(|(name, _, owner)| {
            let maps = match name {
                "tcp_rtt" => watch_maps(t),
                "skb_drops" => vec![MapSpec {
                    name: "drop_filter".into(),
                    entries: drop_skip.iter().map(|s| EntrySpec { key: json!(s), value: json!({"skip": 1}) }).collect(),
                }],
                _ => vec![],
            };
            ProgramSpec {
                name: name.into(),
                builtin: Some(name.into()),
                object: None,
                function: None,
                program_type: ProgramType::Tracepoint,
                share_maps: owner.map(String::from),
                maps,
            }
        })
        .collect()
}

/// `watch_prefixes` (prefix → slot) and `watch_names` (slot → name).
/// Prefixes are written IPv4-mapped, the form the trie holds.
fn watch_maps(t: &TelemetrySpec) -> Vec<MapSpec> {
    let watches = t.tcp.as_ref().map(|tcp| tcp.watch.as_slice()).unwrap_or_default();
    let mut prefixes = Vec::new();
    let mut names = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, w) in watches.iter().enumerate() {
        let slot = i as u32 + 1;
        names.push(EntrySpec { key: json!(slot), value: json!({ "name": w.name }) });
        for p in &w.prefixes {
            // The spec's own checks report a prefix that does not parse or
            // is watched twice; here it is left out.
            if let Some(key) = p.parse::<Cidr>().ok().map(|c| trie_cidr(&c))
                && seen.insert(key.clone())
            {
                prefixes.push(EntrySpec { key: json!(key), value: json!(slot) });
            }
        }
    }
    vec![
        MapSpec { name: "watch_prefixes".into(), entries: prefixes },
        MapSpec { name: "watch_names".into(), entries: names },
    ]
}

/// A trie key back as the prefix the spec wrote.
pub fn spec_cidr(key: &WatchKey) -> String {
    let v6 = std::net::Ipv6Addr::from(key.addr);
    match v6.to_ipv4_mapped() {
        Some(v4) if key.prefixlen >= 96 => format!("{v4}/{}", key.prefixlen - 96),
        _ => format!("{v6}/{}", key.prefixlen),
    }
}

/// What the telemetry programs counted, as observed.
#[derive(Debug, Clone, Default)]
pub struct Telemetry {
    /// Per slot that has a name or counted anything, `other` first.
    pub tcp: Option<Vec<TcpWatch>>,
    /// (drop reason slot, count), counted slots only.
    pub drops: Option<Vec<(u32, u64)>>,
    pub xdp_errors: Option<Vec<XdpError>>,
}

#[derive(Debug, Clone, Default)]
pub struct TcpWatch {
    pub slot: u32,
    pub name: String,
    pub prefixes: Vec<String>,
    pub stats: TcpWatchStats,
}

impl TcpWatch {
    pub fn rtt(&self) -> Log2Histogram {
        Log2Histogram::new(self.stats.rtt_buckets, self.stats.rtt_sum_us, self.stats.rtt_samples)
    }

    pub fn connect(&self) -> Log2Histogram {
        Log2Histogram::new(self.stats.connect_buckets, self.stats.connect_sum_us, self.stats.connect_samples)
    }

    /// (event, count) of the connection lifecycle, in a fixed order.
    pub fn lifecycle(&self) -> [(&'static str, u64); 6] {
        let s = &self.stats;
        [
            ("opened_active", s.opened_active),
            ("opened_passive", s.opened_passive),
            ("closed", s.closed),
            ("connect_failed", s.connects_failed),
            ("reset_received", s.resets_received),
            ("reset_sent", s.resets_sent),
        ]
    }

    /// (congestion state, entries).
    pub fn congestion(&self) -> [(&'static str, u64); 3] {
        let s = &self.stats;
        [("cwr", s.cong_cwr), ("recovery", s.cong_recovery), ("loss", s.cong_loss)]
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XdpError {
    pub ifindex: u32,
    /// Filled in by the caller (a name lookup is a kernel question).
    pub interface: Option<String>,
    pub kind: &'static str,
    /// `redirect`: the errno's name; `exception`: the XDP action's.
    pub code: String,
    pub count: u64,
}

fn map<'a>(state: &'a State, program: &str, map: &str) -> Option<&'a Entries> {
    state.maps.get(&MapRef { program: program.into(), map: map.into() }).map(|m| &m.entries)
}

/// Sums a per-CPU value: each CPU's copy in turn, rounded up to 8 bytes.
fn per_cpu_sum<T: Plain>(bytes: &[u8], add: impl Fn(&mut T, &T)) -> Option<T> {
    let size = std::mem::size_of::<T>().div_ceil(8) * 8;
    if bytes.is_empty() || !bytes.len().is_multiple_of(size) {
        return None;
    }
    let mut sum = T::default();
    for chunk in bytes.chunks_exact(size) {
        add(&mut sum, &T::read(&chunk[..std::mem::size_of::<T>()])?);
    }
    Some(sum)
}

/// Sums a per-CPU `u64`.
fn per_cpu_u64(bytes: &[u8]) -> Option<u64> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(8) {
        return None;
    }
    Some(bytes.chunks_exact(8).map(|c| u64::from_ne_bytes(c.try_into().unwrap_or_default())).fold(0, u64::wrapping_add))
}

/// Field by field `op(a, b)`: the sum of two CPUs' copies, or what was
/// counted between two readings.
fn combine(a: &TcpWatchStats, b: &TcpWatchStats, op: fn(u64, u64) -> u64) -> TcpWatchStats {
    let mut out = *a;
    for i in 0..datapath::TELEMETRY_BUCKETS {
        out.rtt_buckets[i] = op(a.rtt_buckets[i], b.rtt_buckets[i]);
        out.connect_buckets[i] = op(a.connect_buckets[i], b.connect_buckets[i]);
    }
    for (x, y) in [
        (&mut out.rtt_sum_us, b.rtt_sum_us),
        (&mut out.rtt_samples, b.rtt_samples),
        (&mut out.connect_sum_us, b.connect_sum_us),
        (&mut out.connect_samples, b.connect_samples),
        (&mut out.retransmits, b.retransmits),
        (&mut out.cong_cwr, b.cong_cwr),
        (&mut out.cong_recovery, b.cong_recovery),
        (&mut out.cong_loss, b.cong_loss),
        (&mut out.opened_active, b.opened_active),
        (&mut out.opened_passive, b.opened_passive),
        (&mut out.closed, b.closed),
        (&mut out.connects_failed, b.connects_failed),
        (&mut out.resets_received, b.resets_received),
        (&mut out.resets_sent, b.resets_sent),
    ] {
        *x = op(*x, y);
    }
    out
}

fn u32_key(k: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(k.get(..4)?.try_into().ok()?))
}

/// A NUL-padded name.
fn c_name(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

impl Telemetry {
    /// Decodes the telemetry maps of `state`; None when no telemetry
    /// program's maps are there.
    pub fn from_state(state: &State) -> Option<Telemetry> {
        let t = Telemetry {
            tcp: map(state, "tcp_rtt", "tcp_stats").map(|stats| Self::tcp(state, stats)),
            drops: map(state, "skb_drops", "drop_reasons").map(|e| {
                e.iter().filter_map(|(k, v)| Some((u32_key(k)?, per_cpu_u64(v)?))).filter(|(_, n)| *n > 0).collect()
            }),
            xdp_errors: map(state, "xdp_redirect_errors", "xdp_errors").map(|e| {
                let mut out: Vec<XdpError> = e
                    .iter()
                    .filter_map(|(k, v)| {
                        let key = XdpErrorKey::read(k)?;
                        let count = u64::from_ne_bytes(v.get(..8)?.try_into().ok()?);
                        let (kind, code) = match key.kind {
                            datapath::XDP_ERR_REDIRECT => ("redirect", errno_name(key.code)),
                            datapath::XDP_ERR_EXCEPTION => ("exception", xdp_action_name(key.code)),
                            _ => return None,
                        };
                        Some(XdpError { ifindex: key.ifindex, interface: None, kind, code, count })
                    })
                    .collect();
                out.sort_by(|a, b| (a.ifindex, a.kind, &a.code).cmp(&(b.ifindex, b.kind, &b.code)));
                out
            }),
        };
        (t.tcp.is_some() || t.drops.is_some() || t.xdp_errors.is_some()).then_some(t)
    }

    fn tcp(state: &State, stats: &Entries) -> Vec<TcpWatch> {
        let mut slots: BTreeMap<u32, TcpWatch> = BTreeMap::new();
        slots.insert(0, TcpWatch { slot: 0, name: OTHER.into(), ..Default::default() });
        for (k, v) in map(state, "tcp_rtt", "watch_names").into_iter().flat_map(Entries::iter) {
            if let Some(s) = u32_key(k).filter(|s| *s > 0) {
                slots.entry(s).or_insert_with(|| TcpWatch { slot: s, ..Default::default() }).name = c_name(v);
            }
        }
        for (k, v) in map(state, "tcp_rtt", "watch_prefixes").into_iter().flat_map(Entries::iter) {
            if let (Some(key), Some(s)) = (WatchKey::read(k), u32_key(v)) {
                slots
                    .entry(s)
                    .or_insert_with(|| TcpWatch { slot: s, ..Default::default() })
                    .prefixes
                    .push(spec_cidr(&key));
            }
        }
        for (k, v) in stats.iter() {
            let (Some(s), Some(sum)) =
                (u32_key(k), per_cpu_sum::<TcpWatchStats>(v, |a, b| *a = combine(a, b, u64::wrapping_add)))
            else {
                continue;
            };
            slots.entry(s).or_insert_with(|| TcpWatch { slot: s, ..Default::default() }).stats = sum;
        }
        for w in slots.values_mut() {
            if w.name.is_empty() {
                w.name = format!("slot-{}", w.slot);
            }
        }
        slots.into_values().collect()
    }

    /// The report `status -o json` and `/status` carry.
    pub fn to_json(&self, reasons: &DropReasonNames) -> Value {
        let tcp = self.tcp.as_ref().map(|watches| {
            watches
                .iter()
                .map(|w| {
                    json!({
                        "name": w.name, "prefixes": w.prefixes,
                        "rtt": w.rtt().to_json(), "connect_latency": w.connect().to_json(),
                        "retransmits": w.stats.retransmits,
                        "congestion": w.congestion().iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
                        "connections": w.lifecycle().iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
                    })
                })
                .collect::<Vec<_>>()
        });
        let drops = self.drops.as_ref().map(|d| {
            d.iter()
                .map(|(slot, n)| json!({ "reason": reasons.name(*slot), "code": slot, "count": n }))
                .collect::<Vec<_>>()
        });
        let xdp = self.xdp_errors.as_ref().map(|e| {
            e.iter()
                .map(|x| json!({ "interface": x.interface, "ifindex": x.ifindex, "kind": x.kind, "code": x.code, "count": x.count }))
                .collect::<Vec<_>>()
        });
        json!({ "tcp": tcp, "drops": drops, "xdp_errors": xdp })
    }
}

/// Linux errno names of the errors a redirect reports
/// (include/uapi/asm-generic/errno-base.h, errno.h).
fn errno_name(code: u16) -> String {
    match code {
        1 => "EPERM".into(),
        2 => "ENOENT".into(),
        6 => "ENXIO".into(),
        7 => "E2BIG".into(),
        12 => "ENOMEM".into(),
        16 => "EBUSY".into(),
        19 => "ENODEV".into(),
        22 => "EINVAL".into(),
        28 => "ENOSPC".into(),
        34 => "ERANGE".into(),
        90 => "EMSGSIZE".into(),
        95 => "EOPNOTSUPP".into(),
        100 => "ENETDOWN".into(),
        n => format!("errno {n}"),
    }
}

/// `enum xdp_action` (include/uapi/linux/bpf.h).
fn xdp_action_name(code: u16) -> String {
    match code {
        0 => "ABORTED".into(),
        1 => "DROP".into(),
        2 => "PASS".into(),
        3 => "TX".into(),
        4 => "REDIRECT".into(),
        n => format!("invalid action {n}"),
    }
}

/// The maps the decoders read (`status`, `stats` and `/metrics` observe
/// only these).
pub const MAPS: [&str; 5] = ["tcp_stats", "watch_prefixes", "watch_names", "drop_reasons", "xdp_errors"];

impl Telemetry {
    /// What was counted since `before` (a program reloaded in between
    /// starts from zero: its counters never go below zero here).
    pub fn since(&self, before: &Telemetry) -> Telemetry {
        let tcp = self.tcp.as_ref().map(|watches| {
            watches
                .iter()
                .map(|w| {
                    let earlier = before.tcp.iter().flatten().find(|b| b.slot == w.slot && b.name == w.name);
                    let stats = earlier.map_or(w.stats, |b| combine(&w.stats, &b.stats, u64::saturating_sub));
                    TcpWatch { stats, ..w.clone() }
                })
                .collect()
        });
        let drops = self.drops.as_ref().map(|d| {
            d.iter()
                .map(|(slot, n)| {
                    let earlier = before.drops.iter().flatten().find(|(s, _)| s == slot).map_or(0, |(_, n)| *n);
                    (*slot, n.saturating_sub(earlier))
                })
                .collect()
        });
        let xdp_errors = self.xdp_errors.as_ref().map(|e| {
            e.iter()
                .map(|x| {
                    let earlier = before
                        .xdp_errors
                        .iter()
                        .flatten()
                        .find(|b| (b.ifindex, b.kind, &b.code) == (x.ifindex, x.kind, &x.code))
                        .map_or(0, |b| b.count);
                    XdpError { count: x.count.saturating_sub(earlier), ..x.clone() }
                })
                .collect()
        });
        Telemetry { tcp, drops, xdp_errors }
    }

    /// Names the interfaces of XDP errors with `name_of(ifindex)`.
    pub fn name_interfaces(&mut self, name_of: impl Fn(u32) -> Option<String>) {
        for x in self.xdp_errors.iter_mut().flatten() {
            x.interface = name_of(x.ifindex);
        }
    }

    /// The text `status` prints (totals) and `stats` prints (`per_second`
    /// over an interval: counts with their rates, percentiles of the
    /// interval's samples).
    pub fn render_text(&self, reasons: &DropReasonNames, per_second: Option<f64>) -> String {
        use std::fmt::Write as _;
        let count = |n: u64| match per_second {
            Some(secs) => format!("{n} ({:.1}/s)", n as f64 / secs),
            None => n.to_string(),
        };
        let ms = |h: &Log2Histogram| {
            let q = |x: f64| h.quantile(x).map_or("-".to_string(), |s| format!("{:.3}", s * 1e3));
            format!("{}/{}/{} ms ({} samples)", q(0.5), q(0.9), q(0.99), h.count)
        };
        let mut o = String::new();
        if let Some(watches) = &self.tcp {
            let _ = writeln!(o, "  TCP by watched remote prefix (locally terminated connections)");
            for w in watches {
                let prefixes =
                    if w.prefixes.is_empty() { String::new() } else { format!(" ({})", w.prefixes.join(", ")) };
                let _ = writeln!(o, "    {}{prefixes}", w.name);
                let _ = writeln!(o, "      rtt p50/p90/p99       {}", ms(&w.rtt()));
                let _ = writeln!(o, "      connect p50/p90/p99   {}", ms(&w.connect()));
                let _ = writeln!(o, "      retransmits           {}", count(w.stats.retransmits));
                let cong: Vec<String> = w.congestion().iter().map(|(k, v)| format!("{k} {}", count(*v))).collect();
                let _ = writeln!(o, "      congestion entries    {}", cong.join(", "));
                let life: Vec<String> = w.lifecycle().iter().map(|(k, v)| format!("{k} {}", count(*v))).collect();
                let _ = writeln!(o, "      connections           {}", life.join(", "));
            }
        }
        if let Some(drops) = &self.drops {
            let _ = writeln!(o, "  Stack drops by kernel drop reason");
            if drops.iter().all(|(_, n)| *n == 0) {
                let _ = writeln!(o, "    none");
            }
            for (slot, n) in drops.iter().filter(|(_, n)| *n > 0) {
                let _ = writeln!(o, "    {:<32} {}", reasons.name(*slot), count(*n));
            }
        }
        if let Some(errors) = &self.xdp_errors {
            let _ = writeln!(o, "  XDP errors by interface");
            if errors.iter().all(|x| x.count == 0) {
                let _ = writeln!(o, "    none");
            }
            for x in errors.iter().filter(|x| x.count > 0) {
                let iface = x.interface.clone().unwrap_or_else(|| format!("ifindex {}", x.ifindex));
                let _ = writeln!(o, "    {iface:<16} {:<9} {:<16} {}", x.kind, x.code, count(x.count));
            }
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(retransmits: u64, bucket3: u64) -> TcpWatchStats {
        let mut s = TcpWatchStats { retransmits, ..Default::default() };
        s.rtt_buckets[3] = bucket3;
        s
    }

    #[test]
    fn per_cpu_copies_are_summed_and_readings_subtracted() {
        // Two CPUs' copies, one after the other (624 bytes: no rounding).
        let mut bytes = stats(2, 5).as_bytes().to_vec();
        bytes.extend(stats(3, 1).as_bytes());
        let sum = per_cpu_sum::<TcpWatchStats>(&bytes, |a, b| *a = combine(a, b, u64::wrapping_add)).unwrap();
        assert_eq!((sum.retransmits, sum.rtt_buckets[3]), (5, 6));
        assert!(per_cpu_sum::<TcpWatchStats>(&bytes[1..], |_, _| {}).is_none(), "a torn value is no value");
        // Since an earlier reading; a counter that went back (a reload) is 0.
        let watch = |s| TcpWatch { slot: 1, name: "w".into(), prefixes: vec![], stats: s };
        let after = Telemetry { tcp: Some(vec![watch(stats(7, 2))]), ..Default::default() };
        let before = Telemetry { tcp: Some(vec![watch(stats(4, 9))]), ..Default::default() };
        let d = after.since(&before).tcp.unwrap();
        assert_eq!((d[0].stats.retransmits, d[0].stats.rtt_buckets[3]), (3, 0));
    }

    #[test]
    fn trie_keys_read_back_as_the_prefixes_written() {
        for text in ["10.20.0.0/16", "0.0.0.0/0", "fd00:20::/48", "::1/128"] {
            let c: Cidr = text.parse().unwrap();
            let trie: Cidr = trie_cidr(&c).parse().unwrap();
            let mut key = WatchKey { prefixlen: trie.len as u32, ..Default::default() };
            key.addr.copy_from_slice(&crate::net::ip_bytes(&trie.addr));
            assert_eq!(spec_cidr(&key), text);
        }
    }
}

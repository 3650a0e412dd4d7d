//! The agent's metrics, in OpenMetrics text via prometheus-client.
//!
//! Agent metrics are kept in the registry; datapath counters are read from
//! the kernel at each scrape by [`DatapathCollector`] (never cached).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::datapath;
use crate::flows::hub::{FlowCounters, FlowHub};
use crate::kernel::real::RealKernel;
use crate::kernel::{Kernel, Scope};
use crate::mesh::counters::{COUNTER_MAPS, MeshCounters};
use crate::model::MapRef;
use crate::telemetry::{Log2Histogram, TcpWatch, Telemetry};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HopLabel {
    pub hop: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HopResultLabel {
    pub hop: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteHopLabel {
    pub route: String,
    pub hop: String,
    pub role: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteReasonLabel {
    pub route: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceStateLabel {
    pub source: String,
    pub state: String,
}

/// The heal loop's figures.
pub struct HealMetrics {
    pub active_hop: Family<RouteHopLabel, Gauge>,
    pub probe_rtt: Family<HopLabel, Histogram>,
    pub probes: Family<HopResultLabel, Counter>,
    pub probe_loss: Family<HopLabel, Gauge<f64, AtomicU64>>,
    pub switches: Family<RouteReasonLabel, Counter>,
    pub proposals: Family<SourceStateLabel, Gauge>,
    pub overlay_superseded: Counter,
    pub flap_locked: Family<RouteLabel, Gauge>,
}

impl HealMetrics {
    fn register(registry: &mut Registry) -> HealMetrics {
        let active_hop = Family::<RouteHopLabel, Gauge>::default();
        registry.register(
            "route_active_hop",
            "1 for the hop a watched route runs on, 0 for its others",
            active_hop.clone(),
        );
        let probe_rtt = Family::<HopLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
        });
        registry.register_with_unit(
            "probe_rtt",
            "Round-trip time of answered hop probes",
            Unit::Seconds,
            probe_rtt.clone(),
        );
        let probes = Family::<HopResultLabel, Counter>::default();
        registry.register("probes", "Hop probes by result (answered, lost)", probes.clone());
        let probe_loss = Family::<HopLabel, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "probe_loss_ratio",
            "Lost probes over the hop's window (absent: too few samples)",
            probe_loss.clone(),
        );
        let switches = Family::<RouteReasonLabel, Counter>::default();
        registry.register(
            "route_switches",
            "Route moves by reason (switch, revert, verify-failed, lock, queued)",
            switches.clone(),
        );
        let proposals = Family::<SourceStateLabel, Gauge>::default();
        registry.register("proposals", "Proposals in the state directory by source and status", proposals.clone());
        let overlay_superseded = Counter::default();
        registry.register(
            "overlay_superseded",
            "Overlay entries superseded because the spec file changed under them",
            overlay_superseded.clone(),
        );
        let flap_locked = Family::<RouteLabel, Gauge>::default();
        registry.register(
            "route_flap_locked",
            "1 when a route is locked on its fallback after flapping",
            flap_locked.clone(),
        );
        HealMetrics { active_hop, probe_rtt, probes, probe_loss, switches, proposals, overlay_superseded, flap_locked }
    }
}

/// Everything the agent counts about itself.
pub struct Metrics {
    pub heal: HealMetrics,
    pub overlay_entries: Gauge,
    pub registry: Registry,
    pub reconciles: Family<ResultLabel, Counter>,
    pub reconcile_duration: Histogram,
    pub drift_repairs: Family<KindLabel, Counter>,
    pub managed_objects: Family<KindLabel, Gauge>,
    pub last_success: Gauge<f64, AtomicU64>,
    pub spec_validation_errors: Counter,
    pub spec_valid: Gauge,
    pub conflicts: Gauge,
    pub ready: Gauge,
}

impl Metrics {
    pub fn new(bpffs_root: PathBuf, flows: Arc<FlowHub>) -> Metrics {
        let mut registry = Registry::with_prefix("bpfsync");
        let reconciles = Family::<ResultLabel, Counter>::default();
        registry.register(
            "reconciles",
            "Reconcile runs by result (applied, no_change, error, invalid_spec, skipped)",
            reconciles.clone(),
        );
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register_with_unit(
            "reconcile_duration",
            "Time to observe, plan and apply",
            Unit::Seconds,
            reconcile_duration.clone(),
        );
        let drift_repairs = Family::<KindLabel, Counter>::default();
        registry.register(
            "drift_repairs",
            "Changes made to undo drift, by object kind and action (e.g. attachment-create)",
            drift_repairs.clone(),
        );
        let managed_objects = Family::<KindLabel, Gauge>::default();
        registry.register("managed_objects", "Objects the spec declares, by kind", managed_objects.clone());
        let last_success = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "last_successful_apply_timestamp",
            "Unix time of the last reconcile that left the kernel matching the spec",
            Unit::Seconds,
            last_success.clone(),
        );
        let spec_validation_errors = Counter::default();
        registry.register(
            "spec_validation_errors",
            "Spec versions rejected by validation (the last good state is kept)",
            spec_validation_errors.clone(),
        );
        let spec_valid = Gauge::default();
        registry.register("spec_valid", "1 when the spec file currently validates", spec_valid.clone());
        let conflicts = Gauge::default();
        registry.register(
            "conflicts",
            "Hooks the plan cannot take (foreign programs, missing interfaces)",
            conflicts.clone(),
        );
        let ready = Gauge::default();
        registry.register("ready", "1 once a reconcile has succeeded", ready.clone());
        let overlay_entries = Gauge::default();
        registry.register("overlay_entries", "Accepted proposals merged onto the spec file", overlay_entries.clone());
        let heal = HealMetrics::register(&mut registry);
        registry.register_collector(Box::new(DatapathCollector { bpffs_root }));
        registry.register_collector(Box::new(FlowCollector { hub: flows }));
        // Known label values start at zero, so `rate()` and absence alerts
        // work from the first scrape.
        for result in ["applied", "no_change", "error", "invalid_spec"] {
            let _ = reconciles.get_or_create(&ResultLabel { result: result.into() });
        }
        for kind in ["program", "attachment", "map_entry"] {
            let _ = managed_objects.get_or_create(&KindLabel { kind: kind.into() });
        }
        Metrics {
            heal,
            overlay_entries,
            registry,
            reconciles,
            reconcile_duration,
            drift_repairs,
            managed_objects,
            last_success,
            spec_validation_errors,
            spec_valid,
            conflicts,
            ready,
        }
    }

    pub fn encode(&self) -> String {
        let mut s = String::new();
        if prometheus_client::encoding::text::encode(&mut s, &self.registry).is_err() {
            let _ = writeln!(s, "# encoding failed");
        }
        s
    }

    pub fn count_reconcile(&self, result: &str) {
        self.reconciles.get_or_create(&ResultLabel { result: result.into() }).inc();
    }
}

/// The classic Prometheus text format (0.0.4) of an OpenMetrics exposition,
/// for scrapers that do not ask for OpenMetrics: counters are named by
/// their `_total` sample, `_created` samples, `# UNIT` lines and `# EOF`
/// go (the classic format has none of them).
pub fn to_classic_text(openmetrics: &str) -> String {
    let (mut counters, mut with_created) = (std::collections::HashSet::new(), std::collections::HashSet::new());
    for line in openmetrics.lines() {
        if let Some((name, kind)) = line.strip_prefix("# TYPE ").and_then(|r| r.split_once(' ')) {
            if kind == "counter" {
                counters.insert(name.to_string());
            }
            if matches!(kind, "counter" | "histogram" | "summary") {
                with_created.insert(name.to_string());
            }
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = line
            .strip_prefix("# HELP ")
            .map(|r| ("# HELP ", r))
            .or(line.strip_prefix("# TYPE ").map(|r| ("# TYPE ", r)));
        if let Some((kind, rest)) = meta {
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            let name = if counters.contains(name) { format!("{name}_total") } else { name.to_string() };
            out.push_str(&format!("{kind}{name} {tail}\n"));
            continue;
        }
        let sample = line.split(['{', ' ']).next().unwrap_or("");
        if sample.strip_suffix("_created").is_some_and(|family| with_created.contains(family)) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Families the [`DatapathCollector`] adds at scrape time when the programs
/// they count are loaded (without the `bpfsync_` prefix and type suffixes).
pub const DATAPATH_FAMILIES: [&str; 23] = [
    "datapath_packets",
    "datapath_bytes",
    "syscall_latency_seconds",
    "drops",
    "mesh_verdicts",
    "mesh_packets",
    "mesh_bytes",
    "rule_hits",
    "rule_bytes",
    "route_packets",
    "route_bytes",
    "route_redirect_errors",
    "interface_drops",
    "lost_events",
    "flow_records_suppressed",
    "flow_unrecorded_drops",
    "tcp_rtt_seconds",
    "tcp_connect_seconds",
    "tcp_retransmits",
    "tcp_congestion_entries",
    "tcp_connections",
    "stack_drops",
    "xdp_errors",
];

type Labels = Vec<(&'static str, String)>;

/// Writes one counter family (`_total` is added by the encoder).
fn counter_family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: &[(Labels, u64)],
) -> Result<(), std::fmt::Error> {
    let mut enc = encoder.encode_descriptor(name, help, unit, MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(*v).encode(enc.encode_family(labels)?)?;
    }
    Ok(())
}

/// The telemetry programs' histograms and counters; drop reasons named
/// from the running kernel's BTF.
fn encode_telemetry(encoder: &mut DescriptorEncoder, t: &Telemetry) -> Result<(), std::fmt::Error> {
    let watches = t.tcp.as_deref().unwrap_or_default();
    for (name, help, pick) in [
        (
            "tcp_rtt",
            "Smoothed TCP round-trip time per received segment of locally terminated connections, by watched remote prefix (log2 buckets of microseconds)",
            TcpWatch::rtt as fn(&TcpWatch) -> Log2Histogram,
        ),
        ("tcp_connect", "TCP connect latency, SYN sent to established, by watched remote prefix", TcpWatch::connect),
    ] {
        if t.tcp.is_none() {
            break;
        }
        let mut enc = encoder.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
        for w in watches {
            let h = pick(w);
            let buckets = h.per_bucket();
            // `_count` is the buckets' total, so it equals the `+Inf` bucket.
            let count = buckets.iter().map(|(_, n)| n).sum();
            let labels = [("watch", w.name.as_str())];
            enc.encode_family(&labels)?.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                h.sum_us as f64 / 1e6,
                count,
                &buckets,
                None,
            )?;
        }
    }
    if t.tcp.is_some() {
        let rows: Vec<(Labels, u64)> =
            watches.iter().map(|w| (vec![("watch", w.name.clone())], w.stats.retransmits)).collect();
        counter_family(
            encoder,
            "tcp_retransmits",
            "Retransmitted TCP segments, by watched remote prefix",
            None,
            &rows,
        )?;
        let rows: Vec<(Labels, u64)> = watches
            .iter()
            .flat_map(|w| w.congestion().map(|(k, n)| (vec![("watch", w.name.clone()), ("state", k.to_string())], n)))
            .collect();
        counter_family(
            encoder,
            "tcp_congestion_entries",
            "Entries of TCP connections into a congestion state (cwr, recovery, loss), by watched remote prefix",
            None,
            &rows,
        )?;
        let rows: Vec<(Labels, u64)> = watches
            .iter()
            .flat_map(|w| w.lifecycle().map(|(k, n)| (vec![("watch", w.name.clone()), ("event", k.to_string())], n)))
            .collect();
        counter_family(
            encoder,
            "tcp_connections",
            "TCP connection events (opened_active, opened_passive, closed, connect_failed, reset_received, reset_sent), by watched remote prefix",
            None,
            &rows,
        )?;
    }
    if let Some(drops) = &t.drops {
        let names = crate::telemetry::reasons::kernel_names().0;
        let rows: Vec<(Labels, u64)> =
            drops.iter().map(|(slot, n)| (vec![("reason", names.name(*slot))], *n)).collect();
        counter_family(
            encoder,
            "stack_drops",
            "Packets the kernel's stack dropped (skb:kfree_skb), by the kernel's drop reason",
            None,
            &rows,
        )?;
    }
    if let Some(errors) = &t.xdp_errors {
        let rows: Vec<(Labels, u64)> = errors
            .iter()
            .map(|x| {
                let iface = x.interface.clone().unwrap_or_else(|| format!("ifindex-{}", x.ifindex));
                (vec![("interface", iface), ("kind", x.kind.to_string()), ("code", x.code.clone())], x.count)
            })
            .collect();
        counter_family(
            encoder,
            "xdp_errors",
            "Failed XDP redirects (by errno) and XDP exceptions (by action), by interface",
            None,
            &rows,
        )?;
    }
    Ok(())
}

/// The mesh datapath's kernel counters: exact, and never lost with events.
fn encode_mesh(encoder: &mut DescriptorEncoder, c: &MeshCounters) -> Result<(), std::fmt::Error> {
    let split = |k: &str| -> (String, String) {
        let (a, b) = k.split_once('/').unwrap_or((k, ""));
        (a.to_string(), b.to_string())
    };
    let by = |m: &std::collections::BTreeMap<String, datapath::ProtoStats>,
              l1: &'static str,
              l2: &'static str,
              bytes: bool|
     -> Vec<(Labels, u64)> {
        m.iter()
            .map(|(k, s)| {
                let (a, b) = split(k);
                (vec![(l1, a), (l2, b)], if bytes { s.bytes } else { s.packets })
            })
            .collect()
    };
    let drops: Vec<(Labels, u64)> = c
        .verdicts
        .iter()
        .filter_map(|(k, s)| {
            let (dir, verdict) = split(k);
            let reason = match verdict.as_str() {
                "drop-rule" => "policy-deny",
                "drop-default" => "default-deny",
                "drop-unparseable" => "unparseable",
                _ => return None,
            };
            Some((vec![("reason", reason.to_string()), ("direction", dir)], s.packets))
        })
        .collect();
    counter_family(encoder, "drops", "Packets the mesh datapath dropped, by reason (kernel counters)", None, &drops)?;
    let verdicts = by(&c.verdicts, "direction", "verdict", false);
    counter_family(encoder, "mesh_verdicts", "Mesh datapath packets by direction and verdict", None, &verdicts)?;
    let protocols = by(&c.protocols, "direction", "protocol", false);
    counter_family(encoder, "mesh_packets", "Mesh datapath packets by direction and protocol", None, &protocols)?;
    let protocol_bytes = by(&c.protocols, "direction", "protocol", true);
    counter_family(
        encoder,
        "mesh",
        "Mesh datapath bytes by direction and protocol",
        Some(&Unit::Bytes),
        &protocol_bytes,
    )?;
    let named = |m: &std::collections::BTreeMap<String, datapath::ProtoStats>,
                 label: &'static str,
                 bytes: bool|
     -> Vec<(Labels, u64)> {
        m.iter().map(|(k, s)| (vec![(label, k.clone())], if bytes { s.bytes } else { s.packets })).collect()
    };
    counter_family(
        encoder,
        "rule_hits",
        "Packets each policy rule decided (by spec name)",
        None,
        &named(&c.rules, "rule", false),
    )?;
    counter_family(
        encoder,
        "rule",
        "Bytes each policy rule decided",
        Some(&Unit::Bytes),
        &named(&c.rules, "rule", true),
    )?;
    counter_family(
        encoder,
        "route_packets",
        "Packets each mesh route forwarded",
        None,
        &named(&c.routes, "route", false),
    )?;
    counter_family(
        encoder,
        "route",
        "Bytes each mesh route forwarded",
        Some(&Unit::Bytes),
        &named(&c.routes, "route", true),
    )?;
    counter_family(
        encoder,
        "route_redirect_errors",
        "Packets a mesh route's redirect failed for (its interface down or gone, over its MTU)",
        None,
        &named(&c.redirect_errors, "route", false),
    )?;
    let iface: Vec<(Labels, u64)> = c
        .interface_drops
        .iter()
        .map(|(k, s)| {
            let (name, dir) = k.rsplit_once('/').unwrap_or((k.as_str(), ""));
            (vec![("interface", name.to_string()), ("direction", dir.to_string())], s.packets)
        })
        .collect();
    counter_family(
        encoder,
        "interface_drops",
        "Packets the mesh policy dropped on each interface and direction (their rate over the interface's packet rate is its drop rate)",
        None,
        &iface,
    )?;
    let lost: Vec<(Labels, u64)> = ["new", "update", "drop"]
        .iter()
        .map(|k| (vec![("kind", k.to_string())], c.flow.get(format!("lost-{k}").as_str()).copied().unwrap_or(0)))
        .collect();
    counter_family(encoder, "lost_events", "Flow records lost because the ring buffer was full, by kind", None, &lost)?;
    let suppressed = vec![(Labels::new(), c.flow.get("suppressed-drop").copied().unwrap_or(0))];
    counter_family(
        encoder,
        "flow_records_suppressed",
        "Drop records not made because of the per-CPU rate limit (the drops are in bpfsync_drops_total)",
        None,
        &suppressed,
    )?;
    let unrecorded = vec![(Labels::new(), c.flow.get("unrecorded-drop").copied().unwrap_or(0))];
    counter_family(
        encoder,
        "flow_unrecorded_drops",
        "Dropped packets no flow record carries (evicted from aggregation while the rate limit was spent)",
        None,
        &unrecorded,
    )
}

/// The flow reader's counters and the export queues'.
#[derive(Debug)]
struct FlowCollector {
    hub: Arc<FlowHub>,
}

impl Collector for FlowCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let c = &self.hub.counters;
        let cells = |a: &[AtomicU64]| -> Vec<(Labels, u64)> {
            (0..FlowCounters::CELLS)
                .map(|i| {
                    let (v, d, p) = FlowCounters::labels(i);
                    (
                        vec![("verdict", v.to_string()), ("direction", d.to_string()), ("protocol", p.to_string())],
                        a[i].load(Ordering::Relaxed),
                    )
                })
                .collect()
        };
        counter_family(&mut encoder, "flows", "Flows seen (new connections and drop records)", None, &cells(&c.flows))?;
        counter_family(&mut encoder, "flow_packets", "Packets in flow records", None, &cells(&c.packets))?;
        counter_family(&mut encoder, "flow", "Bytes in flow records", Some(&Unit::Bytes), &cells(&c.bytes))?;
        let one = |v: u64| vec![(Labels::new(), v)];
        counter_family(
            &mut encoder,
            "flow_records",
            "Flow records read from the ring buffer",
            None,
            &one(c.records.load(Ordering::Relaxed)),
        )?;
        counter_family(
            &mut encoder,
            "flow_records_malformed",
            "Ring buffer records too short to decode",
            None,
            &one(c.malformed.load(Ordering::Relaxed)),
        )?;
        let gauge =
            encoder.encode_descriptor("flow_history", "Flow records held for /flows", None, MetricType::Gauge)?;
        prometheus_client::metrics::gauge::ConstGauge::new(self.hub.len() as i64).encode(gauge)?;
        let exports = self.hub.exports();
        let per_sink = |f: &dyn Fn(&crate::flows::export::ExportQueue) -> u64| -> Vec<(Labels, u64)> {
            exports.iter().map(|q| (vec![("sink", q.sink.to_string())], f(q))).collect()
        };
        counter_family(
            &mut encoder,
            "flow_exported",
            "Flow records delivered to an export sink",
            None,
            &per_sink(&|q| q.exported.load(Ordering::Relaxed)),
        )?;
        counter_family(
            &mut encoder,
            "flow_export_dropped",
            "Flow records an export sink lost because its queue was full (sink down or slow)",
            None,
            &per_sink(&|q| q.dropped.load(Ordering::Relaxed)),
        )?;
        counter_family(
            &mut encoder,
            "flow_export_errors",
            "Failed export attempts (retried, unless the receiver refused the batch for good)",
            None,
            &per_sink(&|q| q.errors.load(Ordering::Relaxed)),
        )?;
        counter_family(
            &mut encoder,
            "flow_export_rejected",
            "Flow records the receiver refused (a batch refused for good, or an OTLP partial success)",
            None,
            &per_sink(&|q| q.rejected.load(Ordering::Relaxed)),
        )?;
        let mut enc = encoder.encode_descriptor(
            "flow_export_queued",
            "Flow records waiting for an export sink",
            None,
            MetricType::Gauge,
        )?;
        for q in exports {
            prometheus_client::metrics::gauge::ConstGauge::new(q.queued() as i64)
                .encode(enc.encode_family(&[("sink", q.sink)])?)?;
        }
        Ok(())
    }
}

/// Reads the built-in programs' counters from the kernel at scrape time.
#[derive(Debug)]
pub struct DatapathCollector {
    bpffs_root: PathBuf,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtoLabels {
    program: String,
    protocol: String,
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(mut kernel) = RealKernel::open(&self.bpffs_root) else { return Ok(()) };
        let names = ["packet_stats", "class_stats", "latency_hist"]
            .iter()
            .chain(COUNTER_MAPS.iter())
            .chain(crate::telemetry::MAPS.iter())
            .map(|n| n.to_string());
        let Ok(state) = kernel.observe(&Scope { map_names: names.collect(), ..Default::default() }) else {
            return Ok(());
        };
        if let Some(mut mesh) = MeshCounters::from_state(&state) {
            mesh.name_interfaces(crate::kernel::netlink::interface_name);
            encode_mesh(&mut encoder, &mesh)?;
        }
        if let Some(mut t) = Telemetry::from_state(&state) {
            t.name_interfaces(crate::kernel::netlink::interface_name);
            encode_telemetry(&mut encoder, &t)?;
        }
        let wanted: Vec<MapRef> = state.maps.iter().filter(|(_, m)| m.managed).map(|(r, _)| r.clone()).collect();
        let mut packets = Vec::new();
        let mut hist = Vec::new();
        for r in &wanted {
            let Some(m) = state.maps.get(r) else { continue };
            if r.map != "packet_stats" && r.map != "class_stats" && r.map != "latency_hist" {
                continue;
            }
            if r.map == "latency_hist" {
                hist.push((r.program.clone(), datapath::latency_histogram(&m.entries)));
                continue;
            }
            for (proto, s) in datapath::proto_counters(&m.entries) {
                packets.push((ProtoLabels { program: r.program.clone(), protocol: proto.to_string() }, s));
            }
        }
        let mut enc = encoder.encode_descriptor(
            "datapath_packets",
            "Packets seen by a built-in program, by protocol",
            None,
            MetricType::Counter,
        )?;
        for (labels, s) in &packets {
            ConstCounter::new(s.packets).encode(enc.encode_family(labels)?)?;
        }
        let mut enc = encoder.encode_descriptor(
            "datapath",
            "Bytes seen by a built-in program, by protocol",
            Some(&Unit::Bytes),
            MetricType::Counter,
        )?;
        for (labels, s) in &packets {
            ConstCounter::new(s.bytes).encode(enc.encode_family(labels)?)?;
        }
        let mut enc = encoder.encode_descriptor(
            "syscall_latency",
            "Syscall latency from raw_syscalls tracepoints (log2 buckets; the sum is estimated from bucket midpoints)",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for (program, h) in &hist {
            let mut buckets: Vec<(f64, u64)> = (0..datapath::LATENCY_BUCKETS as u32)
                .map(|b| (2f64.powi(b as i32 + 1) / 1e9, h.iter().find(|(x, _)| *x == b).map_or(0, |(_, c)| *c)))
                .collect();
            buckets.push((f64::MAX, 0)); // the encoder writes f64::MAX as `+Inf`
            let count: u64 = buckets.iter().map(|(_, c)| c).sum();
            let sum: f64 = h.iter().map(|(b, c)| 1.5 * 2f64.powi(*b as i32) / 1e9 * *c as f64).sum();
            let labels = [("program", program.as_str())];
            enc.encode_family(&labels)?
                .encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)?;
        }
        Ok(())
    }
}

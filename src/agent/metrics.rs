//! The agent's metrics, in OpenMetrics text via prometheus-client.
//!
//! Agent metrics are kept in the registry; datapath counters are read from
//! the kernel at each scrape by [`DatapathCollector`] (never cached).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::datapath;
use crate::kernel::real::RealKernel;
use crate::kernel::{Kernel, Scope};
use crate::model::MapRef;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

/// Everything the agent counts about itself.
pub struct Metrics {
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
    pub fn new(bpffs_root: PathBuf) -> Metrics {
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
        registry.register_collector(Box::new(DatapathCollector { bpffs_root }));
        // Known label values start at zero, so `rate()` and absence alerts
        // work from the first scrape.
        for result in ["applied", "no_change", "error", "invalid_spec"] {
            let _ = reconciles.get_or_create(&ResultLabel { result: result.into() });
        }
        for kind in ["program", "attachment", "map_entry"] {
            let _ = managed_objects.get_or_create(&KindLabel { kind: kind.into() });
        }
        Metrics {
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

/// Families the [`DatapathCollector`] adds at scrape time (without the
/// `bpfsync_` prefix and type suffixes).
pub const DATAPATH_FAMILIES: [&str; 3] = ["datapath_packets", "datapath_bytes", "syscall_latency_seconds"];

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
        let names = ["packet_stats", "class_stats", "latency_hist"].map(String::from);
        let Ok(state) = kernel.observe(&Scope { map_names: names.into(), ..Default::default() }) else {
            return Ok(());
        };
        let wanted: Vec<MapRef> = state.maps.iter().filter(|(_, m)| m.managed).map(|(r, _)| r.clone()).collect();
        let mut packets = Vec::new();
        let mut hist = Vec::new();
        for r in &wanted {
            let Some(m) = state.maps.get(r) else { continue };
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

//! The spec's serde types (v1).
//!
//! Keys are kebab-case everywhere, except the Kubernetes-style envelope
//! `apiVersion` / `kind`. Every type denies unknown fields; the JSON Schema
//! in `schema/bpfsync.schema.json` describes the same shapes and a test
//! keeps the two in agreement.

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub const API_VERSION: &str = "bpfsync/v1";
pub const KIND: &str = "NodeSpec";

/// The whole desired state of one node.
///
/// ```yaml
/// apiVersion: bpfsync/v1
/// kind: NodeSpec
/// programs:
///   - { name: counter, builtin: counter, type: xdp }
/// interfaces:
///   - { name: veth0, xdp: { program: counter, mode: skb } }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub programs: Vec<ProgramSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<InterfaceSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tracepoints: Vec<TracepointSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<PolicySpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallback: Vec<FallbackRule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flows: Option<FlowsSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telemetry: Option<TelemetrySpec>,
}

/// Network telemetry from tracepoints, for traffic this node terminates:
/// TCP per watched remote prefix, stack drops by reason, XDP errors.
///
/// ```yaml
/// telemetry:
///   tcp:                        # RTT, connect latency, retransmits,
///     watch:                    # congestion, opens/closes/resets
///       - name: mesh-peers
///         prefixes: [10.20.0.0/16, fd00:20::/48]
///   drops:
///     ignore: [NOT_SPECIFIED]   # or `only: [...]`; names from the kernel
///   xdp-errors: true
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TelemetrySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpTelemetrySpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drops: Option<DropsSpec>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub xdp_errors: bool,
}

/// TCP telemetry; remote addresses no watched prefix covers count as
/// `other`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TcpTelemetrySpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub watch: Vec<WatchSpec>,
}

/// Remote prefixes whose connections are counted under one name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct WatchSpec {
    pub name: String,
    pub prefixes: Vec<String>,
}

/// Stack drops by the kernel's drop reason (`enum skb_drop_reason`,
/// named without its `SKB_DROP_REASON_` prefix). Without a list every
/// reason is counted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DropsSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub only: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignore: Vec<String>,
}

/// How the agent watches the next hops of routes with `fallback` hops;
/// a route's own `health` overrides these field by field.
///
/// ```yaml
/// health:
///   probe-interval: 1s    # one ICMP echo per hop per interval
///   probe-timeout: 500ms  # an echo unanswered by then is lost
///   down-after: 3         # this many lost in a row: the hop is down at once
///   window: 10s           # loss and RTT percentiles are computed over it
///   min-samples: 5        # fewer probes in the window: no data, hold
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct HealthSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_interval: Option<DurationSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_timeout: Option<DurationSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down_after: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<DurationSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_samples: Option<u32>,
}

/// Flow records of the mesh datapath; absent fields keep their defaults.
///
/// ```yaml
/// flows:
///   enabled: true                 # false: no records (counters still count)
///   report-interval: 10s          # `update` records of long-lived connections
///   drop-records-per-second: 1000 # per CPU; the rest are counted as suppressed
///   drop-window: 1s               # drops of one flow within it make one record
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FlowsSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_interval: Option<DurationSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_records_per_second: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_window: Option<DurationSpec>,
}

/// An eBPF program: a built-in one or a function of an ELF object.
///
/// ```yaml
/// - name: counter
///   builtin: counter
///   type: xdp
///   maps:
///     - name: counter_config
///       entries:
///         - { key: 0, value: 1 }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ProgramSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builtin: Option<String>,
    /// ELF path, relative to the spec file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    /// Function in the object; optional when the object has one program.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<String>,
    #[serde(rename = "type")]
    pub program_type: ProgramType,
    /// Use the maps of this other program (same object) instead of owning
    /// a copy, e.g. a tracepoint pair that shares a start-time map.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share_maps: Option<String>,
    /// Maps whose contents bpfsync manages: exactly these entries, no others.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub maps: Vec<MapSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProgramType {
    Xdp,
    Tc,
    Tracepoint,
}

impl ProgramType {
    pub fn as_str(self) -> &'static str {
        match self {
            ProgramType::Xdp => "xdp",
            ProgramType::Tc => "tc",
            ProgramType::Tracepoint => "tracepoint",
        }
    }
}

/// The managed contents of one map of a program.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct MapSpec {
    pub name: String,
    #[serde(default)]
    pub entries: Vec<EntrySpec>,
}

/// One map entry. Keys and values are integers, IP addresses, CIDRs,
/// `0x…` bytes, or (with BTF) mappings of field names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntrySpec {
    pub key: Value,
    pub value: Value,
}

/// Hooks of one network interface.
///
/// ```yaml
/// - name: veth0
///   xdp: { program: counter, mode: skb }
///   tc: { ingress: [classify], egress: [classify] }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct InterfaceSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xdp: Option<XdpHookSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tc: Option<TcHookSpec>,
    /// Run the mesh datapath here (XDP `mesh` on ingress, TCX
    /// `mesh_egress` on egress). Implied, in `auto` mode, for interfaces
    /// that policies select or routes use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<MeshHookSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct MeshHookSpec {
    #[serde(default)]
    pub mode: XdpMode,
    /// Replace programs on these hooks that bpfsync does not own.
    #[serde(default, skip_serializing_if = "is_false")]
    pub takeover: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct XdpHookSpec {
    pub program: String,
    #[serde(default)]
    pub mode: XdpMode,
    /// Replace a program on this hook that bpfsync does not own.
    #[serde(default, skip_serializing_if = "is_false")]
    pub takeover: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum XdpMode {
    Skb,
    Driver,
    #[default]
    Auto,
}

impl XdpMode {
    pub fn as_str(self) -> &'static str {
        match self {
            XdpMode::Skb => "skb",
            XdpMode::Driver => "driver",
            XdpMode::Auto => "auto",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TcHookSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<String>,
    /// Remove TCX programs on these hooks that bpfsync does not own.
    #[serde(default, skip_serializing_if = "is_false")]
    pub takeover: bool,
}

/// A tracepoint attachment: `category/name` from tracefs `events/`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TracepointSpec {
    pub event: String,
    pub program: String,
}

/// A mesh route (compiled into the datapath by the `mesh` program).
///
/// ```yaml
/// - prefix: 10.20.0.0/16
///   via: { interface: mesh0, neighbor: 10.0.0.2 }
///   fallback:
///     - { interface: mesh1, neighbor: 10.0.1.2 }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RouteSpec {
    pub prefix: String,
    pub via: NextHopSpec,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallback: Vec<NextHopSpec>,
    /// Overrides of the global `health` settings for this route's hops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NextHopSpec {
    pub interface: String,
    pub neighbor: String,
    /// The neighbour's MAC; resolved from the neighbour table when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// A network policy, Kubernetes NetworkPolicy semantics.
///
/// ```yaml
/// - name: api
///   interfaces: [veth0]
///   ingress:
///     - from: [10.0.0.0/24]
///       except: [10.0.0.66/32]
///       ports: [{ port: 8080, protocol: tcp }]
///   deny:
///     - from: [10.9.0.0/16]
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PolicySpec {
    pub name: String,
    pub interfaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<PolicyRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<PolicyRule>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<PolicyRule>,
}

/// One allow or deny rule; peers and ports are ANDed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PolicyRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortSpec>,
    /// Protocol for rules without ports (e.g. `icmp`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PortSpec {
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<u16>,
    #[serde(default = "default_protocol")]
    pub protocol: Protocol,
}

fn default_protocol() -> Protocol {
    Protocol::Tcp
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
    Icmp,
    Icmpv6,
}

/// A fallback rule: when a route's primary path degrades, switch it to its
/// declared fallback, and back when it recovers (with hysteresis).
///
/// ```yaml
/// - name: mesh0-loss
///   route: 10.20.0.0/16
///   when: { metric: drop-rate, above: 0.05, for: 30s }
///   recover: { below: 0.01, for: 60s }
///   auto-apply: true
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FallbackRule {
    pub name: String,
    /// The `prefix` of the route this rule switches.
    pub route: String,
    pub when: Trigger,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recover: Option<Recovery>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub auto_apply: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Trigger {
    pub metric: FallbackMetric,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub above: Option<f64>,
    /// Seconds or a duration such as `30s`, `2m`.
    #[serde(default, rename = "for", skip_serializing_if = "Option::is_none")]
    pub for_duration: Option<DurationSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Recovery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub below: Option<f64>,
    #[serde(default, rename = "for", skip_serializing_if = "Option::is_none")]
    pub for_duration: Option<DurationSpec>,
}

/// A duration: whole seconds, or a number with `ms`, `s`, `m` or `h`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DurationSpec {
    Seconds(u64),
    Text(String),
}

impl DurationSpec {
    pub fn to_duration(&self) -> Option<std::time::Duration> {
        use std::time::Duration;
        match self {
            DurationSpec::Seconds(s) => Some(Duration::from_secs(*s)),
            DurationSpec::Text(t) => {
                let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
                let (n, unit) = t.split_at(split);
                let n: u64 = n.parse().ok()?;
                // Overflow is "not a duration", never a panic.
                match unit {
                    "" | "s" => Some(Duration::from_secs(n)),
                    "ms" => Some(Duration::from_millis(n)),
                    "m" => n.checked_mul(60).map(Duration::from_secs),
                    "h" => n.checked_mul(3600).map(Duration::from_secs),
                    _ => None,
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FallbackMetric {
    /// What the route loses (0..=1): its probes' loss, or the share of
    /// its packets the datapath failed to deliver while it runs on its
    /// primary, whichever is higher.
    DropRate,
    /// The share of the hop's probes lost (0..=1).
    ProbeLoss,
    LatencyP99Ms,
    LinkDown,
    NeighborUnreachable,
}

fn is_false(b: &bool) -> bool {
    !*b
}

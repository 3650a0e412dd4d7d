//! The deployment files in `examples/deploy/` stay consistent with the
//! code: the ConfigMap's spec compiles, the DaemonSet probes the agent's
//! endpoints, and the dashboard only queries metrics the agent exports.

use std::collections::BTreeSet;
use std::fs;
use std::path::PathBuf;

use bpfsync::agent::metrics::{DATAPATH_FAMILIES, Metrics};
use bpfsync::compile::{ObjectLoader, compile};
use bpfsync::flows::hub::FlowHub;
use bpfsync::spec;

#[test]
fn the_configmap_holds_a_valid_spec() {
    let cm: serde_yaml::Value =
        serde_yaml::from_str(&fs::read_to_string("examples/deploy/configmap.yaml").unwrap()).unwrap();
    let text = cm["data"]["spec.yaml"].as_str().expect("data.spec.yaml");
    let loaded = spec::load(&PathBuf::from("configmap:spec.yaml"), text).unwrap_or_else(|d| panic!("{d}"));
    compile(&loaded, &mut ObjectLoader::default()).unwrap_or_else(|d| panic!("{d}"));
}

#[test]
fn the_daemonset_runs_the_agent_and_probes_its_endpoints() {
    let ds: serde_yaml::Value =
        serde_yaml::from_str(&fs::read_to_string("examples/deploy/daemonset.yaml").unwrap()).unwrap();
    let c = &ds["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<&str> = c["args"].as_sequence().unwrap().iter().filter_map(|a| a.as_str()).collect();
    assert!(args.contains(&"agent") && args.contains(&"--spec=/etc/bpfsync/spec.yaml"), "{args:?}");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"].as_str(), Some("/healthz"));
    assert_eq!(c["readinessProbe"]["httpGet"]["path"].as_str(), Some("/readyz"));
    let caps: Vec<&str> =
        c["securityContext"]["capabilities"]["add"].as_sequence().unwrap().iter().filter_map(|a| a.as_str()).collect();
    for cap in ["BPF", "NET_ADMIN", "PERFMON", "NET_RAW"] {
        assert!(caps.contains(&cap), "missing capability {cap}");
    }
    let unit = fs::read_to_string("examples/deploy/bpfsync.service").unwrap();
    assert!(unit.contains("agent --spec /etc/bpfsync/spec.yaml"));
    // Raw ICMP sockets for the heal loop's probes.
    assert!(unit.lines().any(|l| l.starts_with("AmbientCapabilities=") && l.contains("CAP_NET_RAW")), "{unit}");
}

#[test]
fn the_dashboard_queries_only_exported_metrics() {
    let metrics = Metrics::new(PathBuf::from("/nonexistent"), std::sync::Arc::new(FlowHub::new(10, vec![])));
    // Drift kinds appear with the first repair.
    metrics.drift_repairs.get_or_create(&bpfsync::agent::metrics::KindLabel { kind: "attachment-create".into() }).inc();
    // So do the heal loop's, with the first watched route and probe.
    use bpfsync::agent::metrics::{HopLabel, RouteHopLabel, RouteLabel, RouteReasonLabel, SourceStateLabel};
    let h = &metrics.heal;
    let hop = HopLabel { hop: "10.0.0.2 via mesh0".into() };
    h.probe_rtt.get_or_create(&hop).observe(0.001);
    h.probe_loss.get_or_create(&hop).set(0.0);
    let route = RouteHopLabel { route: "10.20.0.0/16".into(), hop: hop.hop.clone(), role: "primary".into() };
    h.active_hop.get_or_create(&route).set(1);
    h.switches.get_or_create(&RouteReasonLabel { route: route.route.clone(), reason: "switch".into() }).inc();
    h.flap_locked.get_or_create(&RouteLabel { route: route.route.clone() }).set(0);
    h.proposals.get_or_create(&SourceStateLabel { source: "rule".into(), state: "applied".into() }).set(1);
    let text = metrics.encode();
    let mut families: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    families.extend(DATAPATH_FAMILIES.iter().map(|f| format!("bpfsync_{f}")));
    let dash = fs::read_to_string("examples/deploy/grafana-dashboard.json").unwrap();
    let _: serde_json::Value = serde_json::from_str(&dash).expect("valid JSON");
    let mut used = BTreeSet::new();
    let mut rest = dash.as_str();
    while let Some(i) = rest.find("bpfsync_") {
        let name: String = rest[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        rest = &rest[i + name.len()..];
        used.insert(name);
    }
    assert!(used.len() >= 8, "{used:?}");
    for name in used {
        let family = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .fold(name.clone(), |n, s| n.strip_suffix(s).map(str::to_string).unwrap_or(n));
        assert!(
            families.contains(&family),
            "the dashboard queries `{name}`, which the agent does not export ({families:?})"
        );
    }
}

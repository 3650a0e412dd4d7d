//! The mesh datapath's counters, named: read from the observed maps by
//! `status`, `stats` and the agent's `/metrics`.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::{NAMES_MAP, ROUTES_MAP, decode_route_key, decode_route_value, map_ref, policy};
use crate::datapath::{self, ProtoStats};
use crate::model::State;

/// Maps to observe for [`MeshCounters::from_state`].
pub const COUNTER_MAPS: [&str; 9] = [
    "verdict_stats",
    "mesh_stats",
    "rule_stats",
    "route_stats",
    "route_redirect_errors",
    "iface_drops",
    "flow_counters",
    NAMES_MAP,
    ROUTES_MAP,
];

/// Counter maps keyed by a rule id (u32), filled by the datapath on first
/// use and pruned by bpfsync when the rule goes.
pub const RULE_COUNTER_MAPS: [&str; 1] = ["rule_stats"];
/// Counter maps keyed by a route id (u32).
pub const ROUTE_COUNTER_MAPS: [&str; 2] = ["route_stats", "route_redirect_errors"];

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeshCounters {
    /// `direction/verdict` (`ingress/drop-default`).
    pub verdicts: BTreeMap<String, ProtoStats>,
    /// `direction/protocol` (`egress/tcp`).
    pub protocols: BTreeMap<String, ProtoStats>,
    /// By spec rule name (`api ingress[0]`).
    pub rules: BTreeMap<String, ProtoStats>,
    /// By route prefix.
    pub routes: BTreeMap<String, ProtoStats>,
    /// Packets whose redirect failed, by route prefix.
    pub redirect_errors: BTreeMap<String, ProtoStats>,
    /// Packets the policy dropped, by `interface/direction` (the
    /// interface's name when the observation knows it, else its ifindex).
    pub interface_drops: BTreeMap<String, ProtoStats>,
    /// Flow record counters (`lost-new`, …, `suppressed-drop`).
    pub flow: BTreeMap<&'static str, u64>,
}

impl MeshCounters {
    /// None when the mesh datapath is not loaded.
    pub fn from_state(observed: &State) -> Option<MeshCounters> {
        let entries = |map: &str| observed.maps.get(&map_ref(map)).map(|m| &m.entries);
        let verdicts = entries("verdict_stats")?;
        let rule_names: BTreeMap<u32, String> = entries(NAMES_MAP)
            .into_iter()
            .flat_map(|e| e.iter())
            .filter_map(|(k, v)| Some((u32::from_ne_bytes(k.try_into().ok()?), policy::decode_rule_name(v))))
            .collect();
        let route_names: BTreeMap<u32, String> = entries(ROUTES_MAP)
            .into_iter()
            .flat_map(|e| e.iter())
            .filter_map(|(k, v)| Some((decode_route_value(v)?.1, decode_route_key(k)?.to_string())))
            .collect();
        let named = |map: &str, names: &BTreeMap<u32, String>| -> BTreeMap<String, ProtoStats> {
            entries(map)
                .map(datapath::keyed_counters)
                .unwrap_or_default()
                .into_iter()
                .map(|(id, s)| {
                    (names.get(&id).cloned().unwrap_or_else(|| format!("{id:#010x} (no longer in the spec)")), s)
                })
                .collect()
        };
        Some(MeshCounters {
            verdicts: datapath::directional_counters(verdicts, &datapath::VERDICT_NAMES),
            protocols: entries("mesh_stats")
                .map(|e| datapath::directional_counters(e, &datapath::PROTO_NAMES))
                .unwrap_or_default(),
            rules: named("rule_stats", &rule_names),
            routes: named("route_stats", &route_names),
            redirect_errors: named("route_redirect_errors", &route_names),
            interface_drops: entries("iface_drops")
                .map(datapath::interface_counters)
                .unwrap_or_default()
                .into_iter()
                .map(|((ifindex, dir), st)| {
                    let name = observed
                        .interfaces
                        .iter()
                        .find(|(_, i)| **i == ifindex)
                        .map(|(n, _)| n.clone())
                        .unwrap_or_else(|| format!("ifindex {ifindex}"));
                    (format!("{name}/{dir}"), st)
                })
                .collect(),
            flow: entries("flow_counters").map(datapath::flow_counters).unwrap_or_default(),
        })
    }

    /// Names the interfaces the observation did not (`ifindex N/dir` →
    /// `name/dir`) with `name_of`, the kernel's own lookup at the edges.
    pub fn name_interfaces(&mut self, name_of: impl Fn(u32) -> Option<String>) {
        let drops = std::mem::take(&mut self.interface_drops);
        self.interface_drops = drops
            .into_iter()
            .map(|(k, st)| {
                let renamed = k.strip_prefix("ifindex ").and_then(|rest| {
                    let (index, dir) = rest.split_once('/')?;
                    Some(format!("{}/{dir}", name_of(index.parse().ok()?)?))
                });
                (renamed.unwrap_or(k), st)
            })
            .collect();
    }

    pub fn to_json(&self) -> Value {
        let stats = |m: &BTreeMap<String, ProtoStats>| -> serde_json::Map<String, Value> {
            m.iter().map(|(k, s)| (k.clone(), json!({ "packets": s.packets, "bytes": s.bytes }))).collect()
        };
        json!({
            "verdicts": stats(&self.verdicts),
            "protocols": stats(&self.protocols),
            "rules": stats(&self.rules),
            "routes": stats(&self.routes),
            "redirect_errors": stats(&self.redirect_errors),
            "interface_drops": stats(&self.interface_drops),
            "flow_records": self.flow,
        })
    }
}

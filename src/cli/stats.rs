//! `bpfsync stats`: the mesh datapath's counters by protocol, verdict,
//! policy rule and route, and the telemetry programs' (TCP per watched
//! prefix, stack drops, XDP errors), read from the kernel twice to give
//! rates and percentiles over the interval between.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{Context, Exit, Output, open_kernel_read_only};
use crate::apply::error_chain;
use crate::datapath::ProtoStats;
use crate::kernel::{Kernel, Scope};
use crate::mesh::counters::{COUNTER_MAPS, MeshCounters};
use crate::telemetry::Telemetry;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Time between the two readings the rates come from.
    #[arg(long, value_parser = parse_interval, default_value = "1s")]
    pub interval: Duration,
    /// Output format: `text` for people, `json` for tools (JSON on errors too).
    #[arg(short, long, value_enum, default_value = "text")]
    pub output: Output,
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    crate::spec::DurationSpec::Text(s.to_string())
        .to_duration()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("`{s}` is not a positive duration: use e.g. `1s`, `500ms`"))
}

/// One row: totals at the second reading and rates over the interval.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub name: String,
    pub packets: u64,
    pub bytes: u64,
    pub packets_per_second: f64,
    pub bytes_per_second: f64,
}

/// Totals of `after` with the rates since `before`.
pub fn rows(before: &BTreeMap<String, ProtoStats>, after: &BTreeMap<String, ProtoStats>, secs: f64) -> Vec<Row> {
    after
        .iter()
        .map(|(name, a)| {
            let b = before.get(name).copied().unwrap_or_default();
            Row {
                name: name.clone(),
                packets: a.packets,
                bytes: a.bytes,
                packets_per_second: a.packets.saturating_sub(b.packets) as f64 / secs,
                bytes_per_second: a.bytes.saturating_sub(b.bytes) as f64 / secs,
            }
        })
        .collect()
}

/// The packets an interface received (`ingress`) or sent (`egress`) so far,
/// from the kernel's own counters: the denominator of its drop rate.
fn interface_packets(key: &str) -> Option<u64> {
    let (name, dir) = key.rsplit_once('/')?;
    let counter = if dir == "ingress" { "rx_packets" } else { "tx_packets" };
    std::fs::read_to_string(format!("/sys/class/net/{name}/statistics/{counter}")).ok()?.trim().parse().ok()
}

/// Per `interface/direction`: the policy's drops per second and their
/// share of the packets the interface carried over the interval (None
/// when its counters cannot be read; at most 1 — the two sources are
/// not read in the same instant).
pub fn interface_drop_rates(
    before: &MeshCounters,
    after: &MeshCounters,
    packets: &BTreeMap<String, (Option<u64>, Option<u64>)>,
    secs: f64,
) -> BTreeMap<String, (f64, Option<f64>)> {
    after
        .interface_drops
        .iter()
        .map(|(k, a)| {
            let dropped = a.packets.saturating_sub(before.interface_drops.get(k).map_or(0, |b| b.packets));
            // What arrived includes what the policy dropped on the way in;
            // what left does not include what it dropped on the way out.
            let egress = k.ends_with("/egress");
            let ratio = match packets.get(k) {
                Some((Some(b), Some(a))) => {
                    let carried = a.saturating_sub(*b) + if egress { dropped } else { 0 };
                    Some(if carried == 0 { 0.0 } else { (dropped as f64 / carried as f64).min(1.0) })
                }
                _ => None,
            };
            (k.clone(), (dropped as f64 / secs, ratio))
        })
        .collect()
}

/// Dropped packets per second and their share of all packets over the interval.
pub fn drop_rate(before: &MeshCounters, after: &MeshCounters, secs: f64) -> (f64, f64) {
    let sum = |c: &MeshCounters, drops: bool| -> u64 {
        c.verdicts.iter().filter(|(k, _)| k.contains("/drop-") == drops || !drops).map(|(_, s)| s.packets).sum()
    };
    let dropped = sum(after, true).saturating_sub(sum(before, true));
    let total = sum(after, false).saturating_sub(sum(before, false));
    (dropped as f64 / secs, if total == 0 { 0.0 } else { dropped as f64 / total as f64 })
}

/// One reading: the mesh datapath's counters and the telemetry programs'
/// (each None when not loaded; both None is an error).
struct Reading {
    mesh: Option<MeshCounters>,
    telemetry: Option<Telemetry>,
}

fn read(ctx: &Context) -> anyhow::Result<Reading> {
    let mut kernel = open_kernel_read_only(ctx)?;
    let names = COUNTER_MAPS.iter().chain(crate::telemetry::MAPS.iter()).map(|m| m.to_string());
    let scope = Scope { map_names: names.collect(), ..Default::default() };
    let state = kernel.observe(&scope).map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    let mut mesh = MeshCounters::from_state(&state);
    let mut telemetry = Telemetry::from_state(&state);
    if mesh.is_none() && telemetry.is_none() {
        anyhow::bail!(
            "neither the mesh datapath nor telemetry is loaded: apply a spec with policies, routes, `mesh:` interfaces or `telemetry:`"
        );
    }
    if let Some(m) = &mut mesh {
        m.name_interfaces(crate::kernel::netlink::interface_name);
    }
    if let Some(t) = &mut telemetry {
        t.name_interfaces(crate::kernel::netlink::interface_name);
    }
    Ok(Reading { mesh, telemetry })
}

fn render_text(sections: &[(&str, Vec<Row>)], secs: f64, drop: (f64, f64), flow: &BTreeMap<&str, u64>) -> String {
    let mut s = format!("MESH DATAPATH (rates over the last {secs:.1} s)\n");
    for (title, rows) in sections {
        if rows.is_empty() {
            continue;
        }
        let w = rows.iter().map(|r| r.name.len()).max().unwrap_or(0).max(title.len());
        let _ = writeln!(s, "\n{title:<w$}  {:>12}  {:>14}  {:>10}  {:>12}", "PACKETS", "BYTES", "PKT/S", "BYTES/S");
        for r in rows {
            let _ = writeln!(
                s,
                "{:<w$}  {:>12}  {:>14}  {:>10.1}  {:>12.1}",
                r.name, r.packets, r.bytes, r.packets_per_second, r.bytes_per_second
            );
        }
    }
    let _ = writeln!(s, "\ndrop rate: {:.1} packets/s ({:.2}% of packets)", drop.0, drop.1 * 100.0);
    let lost: u64 = flow.iter().filter(|(k, _)| k.starts_with("lost-")).map(|(_, v)| v).sum();
    let _ = writeln!(
        s,
        "flow records: {lost} lost (ring buffer full: new {}, update {}, drop {}), {} drop records suppressed by the rate limit, {} dropped packets in no record",
        flow.get("lost-new").unwrap_or(&0),
        flow.get("lost-update").unwrap_or(&0),
        flow.get("lost-drop").unwrap_or(&0),
        flow.get("suppressed-drop").unwrap_or(&0),
        flow.get("unrecorded-drop").unwrap_or(&0)
    );
    s
}

pub fn run(ctx: &Context, args: &Args) -> anyhow::Result<Exit> {
    // The interfaces' own counters are read outside the two readings of
    // ours (first before, last after), so the drops counted fall within
    // the packets counted.
    let first: BTreeMap<String, Option<u64>> = read(ctx)?
        .mesh
        .map(|m| m.interface_drops.keys().map(|k| (k.clone(), interface_packets(k))).collect())
        .unwrap_or_default();
    let before = read(ctx)?;
    let started = Instant::now();
    std::thread::sleep(args.interval);
    let after = read(ctx)?;
    let secs = started.elapsed().as_secs_f64();
    let reasons = crate::telemetry::reasons::kernel_names().0;
    // Loaded between the readings: everything it counted is the interval's.
    let nothing_before = Telemetry::default();
    let telemetry =
        after.telemetry.as_ref().map(|a| (a, a.since(before.telemetry.as_ref().unwrap_or(&nothing_before))));
    let mesh = match (&before.mesh, &after.mesh) {
        (Some(b), Some(a)) => Some(mesh_report(b, a, &first, secs)),
        _ => None,
    };
    match args.output {
        Output::Json => {
            let mut v = json!({ "interval_seconds": secs });
            if let Some((_, json)) = &mesh {
                v.as_object_mut().expect("an object").extend(json.as_object().cloned().unwrap_or_default());
            }
            if let Some((total, interval)) = &telemetry {
                v["telemetry"] = json!({ "interval": interval.to_json(reasons), "total": total.to_json(reasons) });
            }
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Output::Text => {
            if let Some((text, _)) = &mesh {
                print!("{text}");
            }
            if let Some((_, interval)) = &telemetry {
                println!("TELEMETRY (counted over the last {secs:.1} s; percentiles of that interval's samples)");
                print!("{}", interval.render_text(reasons, Some(secs)));
            }
        }
    }
    Ok(0)
}

/// The mesh datapath's rates between two readings: as text and as JSON.
fn mesh_report(
    before: &MeshCounters,
    after: &MeshCounters,
    first: &BTreeMap<String, Option<u64>>,
    secs: f64,
) -> (String, Value) {
    let packets: BTreeMap<String, (Option<u64>, Option<u64>)> = after
        .interface_drops
        .keys()
        .map(|k| (k.clone(), (first.get(k).copied().flatten(), interface_packets(k))))
        .collect();
    let per_interface = interface_drop_rates(before, after, &packets, secs);
    let sections = [
        ("PROTOCOL", rows(&before.protocols, &after.protocols, secs)),
        ("VERDICT", rows(&before.verdicts, &after.verdicts, secs)),
        ("RULE", rows(&before.rules, &after.rules, secs)),
        ("ROUTE", rows(&before.routes, &after.routes, secs)),
    ];
    let drop = drop_rate(before, after, secs);
    let section = |rows: &[Row]| -> Value {
        rows.iter()
            .map(|r| {
                (
                    r.name.clone(),
                    json!({ "packets": r.packets, "bytes": r.bytes,
                    "packets_per_second": r.packets_per_second, "bytes_per_second": r.bytes_per_second }),
                )
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    let v = json!({
        "protocols": section(&sections[0].1),
        "verdicts": section(&sections[1].1),
        "rules": section(&sections[2].1),
        "routes": section(&sections[3].1),
        "drops_per_second": drop.0,
        "drop_ratio": drop.1,
        "interfaces": per_interface.iter().map(|(k, (rate, ratio))| {
            (k.clone(), json!({ "drops_per_second": rate, "drop_ratio": ratio }))
        }).collect::<serde_json::Map<_, _>>(),
        "flow_records": after.flow,
    });
    let mut text = render_text(&sections, secs, drop, &after.flow);
    for (k, (rate, ratio)) in &per_interface {
        let share = ratio
            .map(|r| format!("{:.2} % of its packets", r * 100.0))
            .unwrap_or_else(|| "its packet counters are unreadable".into());
        let _ = writeln!(text, "policy drops on {k}: {rate:.1}/s, {share}");
    }
    (text, v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interface_drop_rate_is_its_drops_over_its_own_packets() {
        let counters = |drops: u64| MeshCounters {
            interface_drops: [("veth0/ingress".to_string(), stats(drops, drops * 100))].into(),
            ..Default::default()
        };
        let packets = [("veth0/ingress".to_string(), (Some(1_000), Some(1_400)))].into();
        let rates = interface_drop_rates(&counters(10), &counters(30), &packets, 2.0);
        assert_eq!(rates["veth0/ingress"], (10.0, Some(0.05)), "20 of 400 packets over 2 s");
        // On the way out, dropped packets never reach the interface's count.
        let out = |drops: u64| MeshCounters {
            interface_drops: [("veth0/egress".to_string(), stats(drops, 0))].into(),
            ..Default::default()
        };
        let sent = [("veth0/egress".to_string(), (Some(0), Some(60)))].into();
        assert_eq!(interface_drop_rates(&out(0), &out(20), &sent, 1.0)["veth0/egress"].1, Some(0.25));
        let unreadable = [("veth0/ingress".to_string(), (None, Some(1_400)))].into();
        assert_eq!(interface_drop_rates(&counters(10), &counters(30), &unreadable, 2.0)["veth0/ingress"].1, None);
    }

    fn stats(p: u64, b: u64) -> ProtoStats {
        ProtoStats { packets: p, bytes: b }
    }

    #[test]
    fn rates_are_the_difference_over_the_interval() {
        let before = BTreeMap::from([("ingress/tcp".to_string(), stats(10, 1000))]);
        let after =
            BTreeMap::from([("ingress/tcp".to_string(), stats(30, 3000)), ("ingress/udp".to_string(), stats(4, 400))]);
        let r = rows(&before, &after, 2.0);
        assert_eq!(
            r[0],
            Row {
                name: "ingress/tcp".into(),
                packets: 30,
                bytes: 3000,
                packets_per_second: 10.0,
                bytes_per_second: 1000.0
            }
        );
        assert_eq!(r[1].packets_per_second, 2.0, "a new row counts from zero");
    }

    #[test]
    fn the_drop_rate_is_drops_over_all_verdicts() {
        let mut before = MeshCounters::default();
        before.verdicts.insert("ingress/pass".into(), stats(10, 0));
        let mut after = before.clone();
        after.verdicts.insert("ingress/pass".into(), stats(40, 0));
        after.verdicts.insert("ingress/drop-default".into(), stats(10, 0));
        assert_eq!(drop_rate(&before, &after, 1.0), (10.0, 0.25));
    }
}

//! `bpfsync status`: every owned object as the kernel has it, the counters
//! of the built-in programs, foreign programs on declared hooks, kernel
//! features, and drift against the last applied spec.

use std::fmt::Write as _;

use serde_json::Value;

use super::{Context, Exit, Output};
use crate::model::State;
use crate::plan::Plan;
use crate::snapshot::Snapshot;
use crate::telemetry::{Telemetry, reasons};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Output format: `text` for people, `json` for tools (JSON on errors too).
    #[arg(short, long, value_enum, default_value = "text")]
    pub output: Output,
    /// Print an observed-state snapshot (YAML) for `plan --observed`.
    #[arg(long)]
    pub snapshot: bool,
}

pub fn run(ctx: &Context, args: &Args) -> anyhow::Result<Exit> {
    super::require_root()?;
    let (v, observed, drift) = crate::status::report(ctx)?;
    if args.snapshot {
        print!("{}", serde_yaml::to_string(&Snapshot::from_state(&observed))?);
        return Ok(0);
    }
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&v)?),
        Output::Text => print!("{}", render_text(&v, &observed, drift.as_ref())),
    }
    Ok(0)
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub fn render_text(v: &Value, observed: &State, drift: Option<&Plan>) -> String {
    let mut o = String::new();
    let f = &v["features"];
    let _ = writeln!(o, "bpfsync status: root {}, kernel {}", s(&v["bpffs_root"]), s(&f["kernel_release"]));
    let yn = |b: &Value| if b.as_bool() == Some(true) { "yes" } else { "no" };
    let _ = writeln!(
        o,
        "features: tcx {} (6.6+), xdp links {}, batch map ops {}, tracefs {}, lpm trie {}, lru hash {}, ring buffer {}, kernel btf {}",
        yn(&f["tcx"]),
        yn(&f["xdp_link"]),
        yn(&f["batch_map_ops"]),
        yn(&f["tracefs"]),
        yn(&f["lpm_trie"]),
        yn(&f["lru_hash"]),
        yn(&f["ringbuf"]),
        yn(&f["kernel_btf"])
    );
    let _ = writeln!(o, "\nPROGRAMS");
    for p in v["programs"].as_array().into_iter().flatten() {
        let _ = writeln!(
            o,
            "  {:<16} {:<10} id {:<6} tag {}  digest {}  function {}",
            s(&p["name"]),
            s(&p["type"]),
            s(&p["id"]),
            s(&p["tag"]),
            s(&p["digest"]).chars().take(12).collect::<String>(),
            s(&p["function"])
        );
    }
    let _ = writeln!(o, "\nATTACHMENTS");
    for a in v["attachments"].as_array().into_iter().flatten() {
        let defunct = if a["defunct"].as_bool() == Some(true) { "  DEFUNCT" } else { "" };
        let mode = match (a["mode"].as_str(), a["running_mode"].as_str()) {
            (None, _) => String::new(),
            (Some(m), Some(r)) if m != r => format!("  mode {m} (running {r})"),
            (Some(m), _) => format!("  mode {m}"),
        };
        let _ =
            writeln!(o, "  {:<36} {:<16} link {}{mode}{defunct}", s(&a["hook"]), s(&a["program"]), s(&a["link_id"]));
    }
    let _ = writeln!(o, "\nMAPS");
    for m in v["maps"].as_array().into_iter().flatten() {
        let managed = if m["managed"].as_bool() == Some(true) { "  managed" } else { "" };
        let _ = writeln!(
            o,
            "  {:<36} {:<9} {}/{} entries{managed}",
            s(&m["map"]),
            s(&m["type"]),
            s(&m["entries"]),
            s(&m["max_entries"])
        );
        if let Some(c) = m["counters"].as_object() {
            for (proto, st) in c {
                let _ = writeln!(o, "      {proto:<8} {:>10} packets {:>12} bytes", s(&st["packets"]), s(&st["bytes"]));
            }
        }
        if let Some(h) = m["histogram_log2_ns"].as_array() {
            let total: u64 = h.iter().filter_map(|x| x[1].as_u64()).sum();
            let _ = writeln!(o, "      {total} samples");
            for x in h {
                let b = x[0].as_u64().unwrap_or(0);
                let c = x[1].as_u64().unwrap_or(0);
                let bar = "#".repeat(((c as f64 / total.max(1) as f64) * 40.0).ceil() as usize);
                let _ = writeln!(o, "      {:>12} ns  {c:>10} {bar}", 1u64 << b.min(63));
            }
        }
    }
    if let Some(mesh) = v["mesh"].as_object() {
        let _ = writeln!(o, "\nMESH DATAPATH");
        for (title, key) in [
            ("verdicts", "verdicts"),
            ("protocols", "protocols"),
            ("policy rules", "rules"),
            ("routes", "routes"),
            ("failed redirects", "redirect_errors"),
        ] {
            let Some(rows) = mesh[key].as_object().filter(|r| !r.is_empty()) else { continue };
            let _ = writeln!(o, "  {title}");
            for (name, st) in rows {
                let _ = writeln!(o, "    {name:<44} {:>10} packets {:>12} bytes", s(&st["packets"]), s(&st["bytes"]));
            }
        }
    }
    if let Some(mut t) = Telemetry::from_state(observed) {
        t.name_interfaces(crate::kernel::netlink::interface_name);
        let _ = writeln!(o, "\nTELEMETRY (traffic this node terminates; what XDP forwards is not seen)");
        o.push_str(&t.render_text(reasons::kernel_names().0, None));
    }
    render_heal(&mut o, &v["heal"]);
    if let Some(fs) = v["foreign"].as_array().filter(|a| !a.is_empty()) {
        let _ = writeln!(o, "\nFOREIGN PROGRAMS ON DECLARED HOOKS (not touched)");
        for x in fs {
            let _ = writeln!(
                o,
                "  {:<36} `{}` id {} ({})",
                s(&x["hook"]),
                s(&x["program_name"]),
                s(&x["program_id"]),
                s(&x["detail"])
            );
        }
    }
    let _ = writeln!(o);
    if let Some(meta) = v["last_applied"].as_object() {
        match meta["spec_now"].as_str() {
            Some("changed") => {
                let _ = writeln!(
                    o,
                    "SPEC: {} changed since it was applied; `bpfsync plan {0}` shows what applying it would do",
                    s(&meta["spec"])
                );
            }
            Some("unreadable") => {
                let _ = writeln!(o, "SPEC: {} cannot be read any more (moved or deleted?)", s(&meta["spec"]));
            }
            _ => {}
        }
    }
    match (drift, v["last_applied"].as_object()) {
        (Some(p), Some(meta)) if p.is_converged() => {
            let _ = writeln!(o, "DRIFT: none — the kernel matches the spec applied from {}", s(&meta["spec"]));
        }
        (Some(p), Some(meta)) if p.is_empty() => {
            let _ = writeln!(
                o,
                "DRIFT: {} declared object(s) of the spec applied from {} are not in place:",
                p.pending().count(),
                s(&meta["spec"])
            );
        }
        (Some(p), Some(meta)) => {
            let _ = writeln!(o, "DRIFT against the spec applied from {}:", s(&meta["spec"]));
            for c in p.changes.iter().filter(|c| c.part_of.is_none()) {
                let _ = writeln!(o, "  {} {} ({})", c.action.symbol(), c.address, c.reason);
            }
            let sm = p.summary();
            let _ = writeln!(
                o,
                "  `bpfsync apply` would make {} to add, {} to change, {} to destroy.",
                sm.add, sm.change, sm.destroy
            );
        }
        _ => {
            let _ = writeln!(o, "DRIFT: unknown — nothing applied yet from this state directory");
        }
    }
    if let Some(p) = drift {
        for c in &p.conflicts {
            let mark = if c.pending { "…" } else { "!" };
            let _ = writeln!(o, "  {mark} {}: {}", c.hook, c.message);
        }
    }
    o
}

/// Routes with fallback hops: where each runs and why, its hops' health
/// (from the agent's last snapshot), and the proposals in force or waiting.
fn render_heal(o: &mut String, heal: &Value) {
    let routes = heal["snapshot"]["routes"].as_array().filter(|r| !r.is_empty());
    let proposals = heal["proposals"].as_array().filter(|p| !p.is_empty());
    if routes.is_none() && proposals.is_none() {
        return;
    }
    let age =
        heal["snapshot_age_seconds"].as_f64().map(|a| format!(" (agent's view {a:.0} s ago)")).unwrap_or_default();
    let _ = writeln!(o, "\nSELF-HEALING{age}");
    for r in routes.into_iter().flatten() {
        let on = if r["on_fallback"].as_bool() == Some(true) { "fallback" } else { "primary" };
        let lock = if r["locked"].as_bool() == Some(true) { ", flap-locked" } else { "" };
        let active = format!("{} via {}", s(&r["active"]["neighbor"]), s(&r["active"]["interface"]));
        let _ = writeln!(o, "  route {:<20} on {on} {active}{lock} — {}", s(&r["route"]), s(&r["why"]));
    }
    if let Some(hops) = heal["snapshot"]["hops"].as_array().filter(|h| !h.is_empty()) {
        let _ = writeln!(o, "  hops");
        for h in hops {
            let f = |v: &Value, scale: f64, unit: &str| {
                v.as_f64().map(|x| format!("{:.2}{unit}", x * scale)).unwrap_or_else(|| "-".into())
            };
            let state = h["hard_failure"].as_str().map(|x| format!("DOWN ({x})")).unwrap_or_else(|| "up".into());
            let _ = writeln!(
                o,
                "    {:<32} {state:<28} loss {:<7} rtt p50 {:<9} p99 {}",
                format!("{} via {}", s(&h["hop"]["neighbor"]), s(&h["hop"]["interface"])),
                f(&h["loss"], 100.0, "%"),
                f(&h["rtt_p50_ms"], 1.0, "ms"),
                f(&h["rtt_p99_ms"], 1.0, "ms"),
            );
        }
    }
    for p in proposals.into_iter().flatten() {
        let _ = writeln!(
            o,
            "  proposal {} {} for {}: {} ({})",
            s(&p["id"]),
            s(&p["status"]),
            s(&p["route"]),
            s(&p["reason"]),
            s(&p["source"])
        );
    }
}

//! The status report: every owned object as the kernel has it, the
//! counters of the built-in programs, foreign programs on declared hooks,
//! kernel features, and drift against the last applied spec. `bpfsync
//! status -o json` prints it; the agent serves it at `/status`.

use serde_json::{Value, json};

use crate::applied::{AppliedError, Context};
use crate::apply::scope_for;
use crate::datapath;
use crate::kernel::real::{RealKernel, probe_features};
use crate::kernel::{Kernel, KernelError, Scope};
use crate::model::State;
use crate::object::map_type_name;
use crate::plan::{self, Plan};

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Applied(#[from] AppliedError),
}

/// The status report, as `-o json` prints it (and the agent serves).
pub fn report(ctx: &Context) -> Result<(Value, State, Option<Plan>), StatusError> {
    let mut kernel = RealKernel::open_read_only(&ctx.bpffs_root)?;
    let applied = crate::applied::load(ctx)?;
    let mut scope = applied.as_ref().map(|(_, d)| scope_for(&d.state)).unwrap_or_else(Scope::default);
    scope.all_maps = true;
    let observed = kernel.observe(&scope)?;
    let drift = applied.as_ref().map(|(_, d)| plan::plan(&d.state, &observed));
    let features = probe_features(&ctx.bpffs_root);

    let programs: Vec<Value> = observed
        .programs
        .values()
        .map(|p| {
            json!({ "name": p.name, "type": p.program_type.as_str(), "function": p.function,
                    "digest": p.digest, "id": p.id, "tag": p.tag, "share_maps": p.share_maps })
        })
        .collect();
    let attachments: Vec<Value> = observed
        .attachments
        .iter()
        .map(|(h, a)| {
            json!({ "hook": h.to_string(), "program": a.program, "mode": a.mode.map(|m| m.as_str()),
                    "running_mode": a.running_mode.map(|m| m.as_str()),
                    "link_id": a.link_id, "defunct": a.defunct })
        })
        .collect();
    let maps: Vec<Value> = observed
        .maps
        .iter()
        .map(|(r, m)| {
            let managed = applied.as_ref().is_some_and(|(_, d)| d.state.maps.get(r).is_some_and(|dm| dm.managed));
            let mut v = json!({ "map": r.to_string(), "id": m.id,
                "type": m.shape.map(|s| map_type_name(s.map_type)), "entries": m.entries.len(),
                "max_entries": m.shape.map(|s| s.max_entries), "managed": managed });
            if r.map == "packet_stats" || r.map == "class_stats" {
                let c = datapath::proto_counters(&m.entries);
                v["counters"] = json!(
                    c.iter()
                        .map(|(k, s)| (k.to_string(), json!({"packets": s.packets, "bytes": s.bytes})))
                        .collect::<serde_json::Map<_, _>>()
                );
            }
            if r.map == "latency_hist" {
                let h = datapath::latency_histogram(&m.entries);
                v["histogram_log2_ns"] = json!(h.iter().map(|(b, c)| json!([b, c])).collect::<Vec<_>>());
            }
            v
        })
        .collect();
    let mesh = mesh_counters(&observed);
    let telemetry = telemetry_json(&observed);
    let drift_json = drift.as_ref().map(|p| {
        json!({
            "in_sync": p.is_converged(),
            "pending": p.pending().collect::<Vec<_>>(),
            "summary": p.summary(),
            "changes": p.changes.iter().filter(|c| c.part_of.is_none()).map(|c| json!({"address": c.address, "action": c.action, "reason": c.reason})).collect::<Vec<_>>(),
            "conflicts": p.conflicts,
        })
    });
    let v = json!({
        "format_version": "1.0",
        "bpffs_root": ctx.bpffs_root,
        "state_dir": ctx.state_dir,
        "features": features,
        "programs": programs,
        "attachments": attachments,
        "maps": maps,
        "mesh": mesh,
        "telemetry": telemetry,
        "foreign": observed.foreign.iter().map(|f| json!({
            "hook": f.hook.to_string(), "program_id": f.program_id, "program_name": f.program_name,
            "detail": f.detail, "link_id": f.link_id,
        })).collect::<Vec<_>>(),
        "stray_programs": observed.stray_programs,
        "last_applied": applied.as_ref().map(|(m, _)| json!({"spec": m.spec_path, "sha256": m.spec_sha256,
            "at_unix": m.applied_at_unix, "spec_now": spec_now(&m.spec_path, &m.spec_sha256)})),
        "drift": drift_json,
        "heal": heal_json(ctx, applied.as_ref().map(|(m, _)| m)),
    });
    Ok((v, observed, drift))
}

/// The heal loop: the agent's last snapshot of routes and hops (with its
/// age), the overlay applied, and the proposals waiting or in force.
fn heal_json(ctx: &Context, meta: Option<&crate::applied::AppliedMeta>) -> Value {
    let store = crate::heal::store::Store::new(&ctx.state_dir);
    let snapshot: Option<Value> =
        std::fs::read_to_string(store.snapshot_path()).ok().and_then(|t| serde_json::from_str(&t).ok());
    let proposals = match store.list() {
        Ok(l) => json!(
            l.proposals
                .iter()
                .filter(|p| !p.status.is_final())
                .map(|p| json!({ "id": p.id, "status": p.status, "route": p.route, "source": p.source,
                             "reason": p.evidence.reason, "action": p.action }))
                .collect::<Vec<_>>()
        ),
        Err(e) => json!({ "error": crate::apply::error_chain(&e) }),
    };
    let age = snapshot
        .as_ref()
        .and_then(|s| s["at_unix_ms"].as_u64())
        .map(|at| crate::heal::store::now_unix_ms().saturating_sub(at) as f64 / 1e3);
    json!({
        "overlay": meta.map(|m| &m.overlay),
        "proposals": proposals,
        "snapshot": snapshot.map(|s| s["snapshot"].clone()),
        "snapshot_age_seconds": age,
    })
}

/// Whether the spec file still holds what was applied: `unchanged`,
/// `changed` or `unreadable` (moved, deleted, no permission).
fn spec_now(path: &str, applied_sha256: &str) -> &'static str {
    match std::fs::read(path) {
        Ok(bytes) if crate::object::digest(&bytes) == applied_sha256 => "unchanged",
        Ok(_) => "changed",
        Err(_) => "unreadable",
    }
}

/// What the telemetry programs counted (null when none is loaded), drop
/// reasons named from the running kernel's BTF.
fn telemetry_json(observed: &State) -> Value {
    let Some(mut t) = crate::telemetry::Telemetry::from_state(observed) else { return Value::Null };
    t.name_interfaces(crate::kernel::netlink::interface_name);
    let (names, error) = crate::telemetry::reasons::kernel_names();
    let mut v = t.to_json(names);
    if let Some(e) = error {
        v["drop_reason_names_error"] = json!(e);
    }
    v
}

/// The mesh datapath's counters by name (null when it is not loaded).
fn mesh_counters(observed: &State) -> Value {
    crate::mesh::counters::MeshCounters::from_state(observed).map_or(Value::Null, |mut c| {
        c.name_interfaces(crate::kernel::netlink::interface_name);
        c.to_json()
    })
}

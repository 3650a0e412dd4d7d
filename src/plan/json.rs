//! The machine-readable plan, `-o json`.
//!
//! Format (versioned by `format_version`; additions bump the minor, any
//! change to existing fields the major):
//! ```json
//! { "format_version": "1.3",
//!   "changes": [ { "address": "…", "kind": "program|attachment|map-entry",
//!                  "action": "create|update|replace|delete", "reason": "…",
//!                  "before": {…}|null, "after": {…}|null,
//!                  "part_of": "…" (only on the old half of a replace),
//!                  "operation": { "op": "…", … raw keys and values in hex } } ],
//!   "summary": { "add": 0, "change": 0, "destroy": 0 },
//!   "conflicts": [ { "hook": "…", "kind": "…", "message": "…", "program_id": 1,
//!                    "pending": true } ],
//!   "policy_changes": [ { "rule": "api ingress[0]", "added": ["from 10.0.2.0/24 tcp/8080 on veth0"],
//!                         "removed": [] } ],
//!   "errors": [ "…" ],
//!   "impact": { … } (only with `plan --impact`: see `plan::impact::to_value`) }
//! ```
//! 1.1 added `policy_changes` and `errors`; 1.2 `pending` on conflicts (the
//! declared object is not in place); 1.3 `impact`.

use serde_json::{Value, json};

use super::Plan;

pub const FORMAT_VERSION: &str = "1.3";

pub fn to_value(plan: &Plan) -> Value {
    let changes: Vec<Value> = plan
        .changes
        .iter()
        .map(|c| {
            let mut v = serde_json::to_value(c).expect("changes serialise");
            v["operation"] = serde_json::to_value(&c.op).expect("operations serialise");
            v
        })
        .collect();
    json!({
        "format_version": FORMAT_VERSION,
        "changes": changes,
        "summary": plan.summary(),
        "conflicts": plan.conflicts,
        "policy_changes": plan.policy_changes,
        "errors": plan.errors,
    })
}

pub fn render(plan: &Plan) -> String {
    let mut s = serde_json::to_string_pretty(&to_value(plan)).expect("plan serialises");
    s.push('\n');
    s
}

//! A proposal: a change of the spec the heal loop wants, as data. It
//! carries its evidence, the JSON Patch (guarded by `test` operations) and
//! the diff a person reads, and its status with every transition (who,
//! when, why). Pure: the files are [`super::store`]'s.
//!
//! ```text
//! pending ──approve──▶ applied ──revert──▶ reverted
//!    │ reject / expire     │ spec edit: test fails
//!    ▼                     ▼
//! rejected, expired    superseded   (also from pending)
//! ```

use serde::{Deserialize, Serialize};

use crate::spec::RouteSpec;
use crate::spec::overlay::OverlayEntry;
use crate::spec::patch::PatchOp;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    Pending,
    Applied,
    Rejected,
    Reverted,
    Superseded,
    Expired,
}

impl Status {
    pub const ALL: [Status; 6] =
        [Status::Pending, Status::Applied, Status::Rejected, Status::Reverted, Status::Superseded, Status::Expired];

    pub fn name(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Applied => "applied",
            Status::Rejected => "rejected",
            Status::Reverted => "reverted",
            Status::Superseded => "superseded",
            Status::Expired => "expired",
        }
    }

    /// Whether a proposal may go from `self` to `to`.
    pub fn may_become(self, to: Status) -> bool {
        use Status::*;
        matches!((self, to), (Pending, Applied | Rejected | Superseded | Expired) | (Applied, Reverted | Superseded))
    }

    pub fn is_final(self) -> bool {
        !matches!(self, Status::Pending | Status::Applied)
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
    }
}

/// One next hop, as the spec names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HopId {
    pub interface: String,
    pub neighbor: String,
}

impl std::fmt::Display for HopId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} via {}", self.neighbor, self.interface)
    }
}

/// What the proposal does to its route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Action {
    /// Traffic of the route goes to its fallback hop `to` (index into the
    /// file's `fallback`) instead of the primary.
    Switch { from: HopId, to: HopId, fallback_index: usize },
    /// The route flapped: keep it on the fallback until a person decides
    /// (approve keeps it, reject sends it back to the primary).
    Lock { on: HopId, fallback_index: usize },
}

/// One hop's figures when the proposal was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct HopFigures {
    pub hop: HopId,
    pub role: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_p99_ms: Option<f64>,
    pub consecutive_misses: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hard_failure: Option<String>,
}

/// Why: the values and the window that triggered it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Evidence {
    pub reason: String,
    pub metric: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    pub window_ms: u64,
    pub held_ms: u64,
    pub hops: Vec<HopFigures>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Transition {
    pub status: Status,
    /// `agent`, `rule <name>`, or the person (`user:<login>`).
    pub by: String,
    pub at_unix_ms: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Proposal {
    pub id: String,
    pub created_unix_ms: u64,
    /// `rule <name>`, `baseline detector`, or `flap lock (rule <name>)`.
    pub source: String,
    /// The route's prefix.
    pub route: String,
    pub action: Action,
    /// Whether the rule allowed applying it without a person.
    pub auto_apply: bool,
    /// Why it was not applied automatically, when it could have been.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued_because: Option<String>,
    pub evidence: Evidence,
    /// RFC 6902, against the spec file's document.
    pub patch: Vec<PatchOp>,
    /// The route's lines before and after, for people.
    pub diff: String,
    /// What `bpfsync plan` shows for it: the datapath change it leads to.
    pub plan: String,
    pub status: Status,
    pub history: Vec<Transition>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("proposal `{id}` is {from}: it cannot become {to}")]
pub struct BadTransition {
    pub id: String,
    pub from: Status,
    pub to: Status,
}

impl Proposal {
    /// Moves to `to`, recording who and why.
    pub fn transition(&mut self, to: Status, by: &str, at_unix_ms: u64, note: &str) -> Result<(), BadTransition> {
        if !self.status.may_become(to) {
            return Err(BadTransition { id: self.id.clone(), from: self.status, to });
        }
        self.status = to;
        self.history.push(Transition { status: to, by: by.to_string(), at_unix_ms, note: note.to_string() });
        Ok(())
    }

    pub fn overlay_entry(&self) -> OverlayEntry {
        OverlayEntry {
            id: self.id.clone(),
            reason: format!("{} ({})", self.evidence.reason, self.source),
            patch: self.patch.clone(),
        }
    }

    /// The fallback index the route runs on while this proposal is applied.
    pub fn fallback_index(&self) -> usize {
        match &self.action {
            Action::Switch { fallback_index, .. } | Action::Lock { fallback_index, .. } => *fallback_index,
        }
    }
}

/// The hop a spec names.
pub fn hop_id(h: &crate::spec::NextHopSpec) -> HopId {
    HopId { interface: h.interface.clone(), neighbor: h.neighbor.clone() }
}

/// The JSON Patch that moves route `index` (as the file has it) to its
/// fallback `to`: `test`s pin the prefix, the primary and the fallback
/// list, then `via` and that fallback trade places — the route's own
/// declared hops, nothing else.
pub fn switch_patch(index: usize, route: &RouteSpec, to: usize) -> Option<Vec<PatchOp>> {
    let target = route.fallback.get(to)?;
    fn json<T: serde::Serialize>(v: &T) -> Option<serde_json::Value> {
        serde_json::to_value(v).ok()
    }
    let base = format!("/routes/{index}");
    Some(vec![
        PatchOp::Test { path: format!("{base}/prefix"), value: route.prefix.clone().into() },
        PatchOp::Test { path: format!("{base}/via"), value: json(&route.via)? },
        PatchOp::Test { path: format!("{base}/fallback"), value: json(&route.fallback)? },
        PatchOp::Replace { path: format!("{base}/via"), value: json(target)? },
        PatchOp::Replace { path: format!("{base}/fallback/{to}"), value: json(&route.via)? },
    ])
}

/// The route's lines before and after a switch to fallback `to`.
pub fn switch_diff(index: usize, route: &RouteSpec, to: usize) -> String {
    let hop = |h: &crate::spec::NextHopSpec| {
        let mac = h.mac.as_ref().map(|m| format!(", mac: {m}")).unwrap_or_default();
        format!("{{ interface: {}, neighbor: {}{mac} }}", h.interface, h.neighbor)
    };
    let Some(target) = route.fallback.get(to) else { return String::new() };
    format!(
        "  routes[{index}] ({prefix})\n-   via: {a}\n+   via: {b}\n-   fallback[{to}]: {b}\n+   fallback[{to}]: {a}\n",
        prefix = route.prefix,
        a = hop(&route.via),
        b = hop(target),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::NextHopSpec;

    fn route() -> RouteSpec {
        let hop = |i: &str, n: &str| NextHopSpec { interface: i.into(), neighbor: n.into(), mac: None };
        RouteSpec {
            prefix: "10.20.0.0/16".into(),
            via: hop("mesh0", "10.0.0.2"),
            fallback: vec![hop("mesh1", "10.0.1.2")],
            health: None,
        }
    }

    #[test]
    fn a_switch_patch_swaps_the_route_own_hops_and_fails_once_the_route_changed() {
        let doc = serde_json::json!({ "routes": [ serde_json::to_value(route()).unwrap() ] });
        let ops = switch_patch(0, &route(), 0).unwrap();
        let out = crate::spec::patch::apply(&doc, &ops).unwrap();
        assert_eq!(out["routes"][0]["via"]["interface"], "mesh1");
        assert_eq!(out["routes"][0]["fallback"][0]["interface"], "mesh0");
        let mut edited = doc.clone();
        edited["routes"][0]["fallback"][0]["neighbor"] = "10.0.1.3".into();
        assert!(crate::spec::patch::apply(&edited, &ops).is_err(), "a new fallback hop makes it stale");
        assert!(switch_patch(0, &route(), 1).is_none());
    }

    #[test]
    fn only_the_documented_transitions_are_allowed() {
        use Status::*;
        for from in Status::ALL {
            for to in Status::ALL {
                let ok = from.may_become(to);
                let expected = matches!(
                    (from, to),
                    (Pending, Applied)
                        | (Pending, Rejected)
                        | (Pending, Superseded)
                        | (Pending, Expired)
                        | (Applied, Reverted)
                        | (Applied, Superseded)
                );
                assert_eq!(ok, expected, "{from} → {to}");
            }
        }
    }
}

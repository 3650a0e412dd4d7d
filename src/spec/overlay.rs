//! The overlay: patches of accepted proposals, merged onto the spec file's
//! document when it is loaded. The file keeps one writer (its author, or
//! git); what the automation chose lives beside it (like VPA's
//! recommendations beside a Deployment) and is applied when the spec is
//! materialised, so no GitOps tool ever sees bpfsync's edits.
//!
//! Every entry's patch starts with `test` operations. An edit of the file
//! that makes one fail, or that makes the patched spec invalid, supersedes
//! the entry: it is reported, never applied to something else.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::patch::{self, PatchOp};

/// One accepted patch, in the order it was accepted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OverlayEntry {
    /// The proposal it comes from.
    pub id: String,
    /// Why, in a line (shown by `plan` and `status`).
    pub reason: String,
    pub patch: Vec<PatchOp>,
}

/// An entry and why: applied (its reason) or superseded (why it no longer applies).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntryNote {
    pub id: String,
    pub reason: String,
}

/// What the overlay did to one load of the spec.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OverlayReport {
    pub applied: Vec<OverlayEntry>,
    pub superseded: Vec<EntryNote>,
}

impl OverlayReport {
    pub fn is_empty(&self) -> bool {
        self.applied.is_empty() && self.superseded.is_empty()
    }
}

/// Applies the entries one after the other to `doc`; an entry whose patch
/// fails is superseded and the next one goes on from where the document is.
pub fn merge(doc: &Value, entries: &[OverlayEntry]) -> (Value, OverlayReport) {
    let mut out = doc.clone();
    let mut report = OverlayReport::default();
    for entry in entries {
        match patch::apply(&out, &entry.patch) {
            Ok(patched) => {
                out = patched;
                report.applied.push(entry.clone());
            }
            Err(e) => report
                .superseded
                .push(EntryNote { id: entry.id.clone(), reason: format!("the spec file changed under it: {e}") }),
        }
    }
    (out, report)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn entry(id: &str, prefix: &str, to: &str) -> OverlayEntry {
        let ops = json!([
            { "op": "test", "path": "/routes/0/prefix", "value": prefix },
            { "op": "replace", "path": "/routes/0/via/interface", "value": to }
        ]);
        OverlayEntry { id: id.into(), reason: "test".into(), patch: serde_json::from_value(ops).unwrap() }
    }

    #[test]
    fn stale_entries_are_superseded_and_the_rest_applied() {
        let doc = json!({ "routes": [ { "prefix": "10.0.0.0/8", "via": { "interface": "a" } } ] });
        let (out, report) = merge(&doc, &[entry("p1", "10.9.0.0/16", "x"), entry("p2", "10.0.0.0/8", "b")]);
        assert_eq!(out["routes"][0]["via"]["interface"], "b");
        assert_eq!(report.applied.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["p2"]);
        assert_eq!(report.superseded.len(), 1);
        assert!(report.superseded[0].reason.contains("`test` failed at `/routes/0/prefix`"), "{report:?}");
        assert_eq!(doc["routes"][0]["via"]["interface"], "a", "the input is untouched");
    }
}

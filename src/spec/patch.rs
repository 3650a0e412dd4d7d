//! RFC 6902 JSON Patch over the spec document, as proposals carry it:
//! `test` operations guard what the patch assumes, so a patch made stale
//! by a spec edit fails instead of changing something else. Applied all or
//! nothing (on a copy). Paths are RFC 6901 JSON pointers (`~0` is `~`,
//! `~1` is `/`; `-` appends to an array).

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum PatchOp {
    Test { path: String, value: Value },
    Replace { path: String, value: Value },
    Add { path: String, value: Value },
    Remove { path: String },
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PatchError {
    #[error("operation {index}: `test` failed at `{path}`: the document has {found}, the patch expects {expected}")]
    TestFailed { index: usize, path: String, expected: String, found: String },
    #[error("operation {index}: `{path}` does not exist in the document")]
    NoSuchPath { index: usize, path: String },
    #[error("operation {index}: `{path}` is not a JSON pointer (it must start with `/`)")]
    BadPointer { index: usize, path: String },
}

/// `/a/b~1c/0` → ["a", "b/c", "0"].
fn tokens(path: &str) -> Option<Vec<String>> {
    if path.is_empty() {
        return Some(Vec::new());
    }
    let rest = path.strip_prefix('/')?;
    Some(rest.split('/').map(|t| t.replace("~1", "/").replace("~0", "~")).collect())
}

/// The container of the last token, and that token.
fn parent_mut<'a>(doc: &'a mut Value, toks: &[String]) -> Option<(&'a mut Value, String)> {
    let (last, init) = toks.split_last()?;
    let mut cur = doc;
    for t in init {
        cur = match cur {
            Value::Object(m) => m.get_mut(t)?,
            Value::Array(a) => a.get_mut(t.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some((cur, last.clone()))
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 80 { format!("{}…", &s[..s.char_indices().nth(80).map_or(s.len(), |(i, _)| i)]) } else { s }
}

fn apply_one(doc: &mut Value, index: usize, op: &PatchOp) -> Result<(), PatchError> {
    let path = match op {
        PatchOp::Test { path, .. } | PatchOp::Replace { path, .. } | PatchOp::Add { path, .. } => path,
        PatchOp::Remove { path } => path,
    };
    let missing = || PatchError::NoSuchPath { index, path: path.clone() };
    let toks = tokens(path).ok_or_else(|| PatchError::BadPointer { index, path: path.clone() })?;
    match op {
        PatchOp::Test { value, .. } => {
            let found = doc.pointer(path).ok_or_else(missing)?;
            if found != value {
                return Err(PatchError::TestFailed {
                    index,
                    path: path.clone(),
                    expected: short(value),
                    found: short(found),
                });
            }
        }
        PatchOp::Replace { value, .. } => {
            *doc.pointer_mut(path).ok_or_else(missing)? = value.clone();
        }
        PatchOp::Add { value, .. } => {
            if toks.is_empty() {
                *doc = value.clone();
                return Ok(());
            }
            let (parent, last) = parent_mut(doc, &toks).ok_or_else(missing)?;
            match parent {
                Value::Object(m) => {
                    m.insert(last, value.clone());
                }
                Value::Array(a) if last == "-" => a.push(value.clone()),
                Value::Array(a) => {
                    let i = last.parse::<usize>().ok().filter(|i| *i <= a.len()).ok_or_else(missing)?;
                    a.insert(i, value.clone());
                }
                _ => return Err(missing()),
            }
        }
        PatchOp::Remove { .. } => {
            let (parent, last) = parent_mut(doc, &toks).ok_or_else(missing)?;
            match parent {
                Value::Object(m) => {
                    m.remove(&last).ok_or_else(missing)?;
                }
                Value::Array(a) => {
                    let i = last.parse::<usize>().ok().filter(|i| *i < a.len()).ok_or_else(missing)?;
                    a.remove(i);
                }
                _ => return Err(missing()),
            }
        }
    }
    Ok(())
}

/// Applies `ops` to a copy of `doc`: the patched document, or the first
/// operation that failed (and `doc` is untouched).
pub fn apply(doc: &Value, ops: &[PatchOp]) -> Result<Value, PatchError> {
    let mut out = doc.clone();
    for (index, op) in ops.iter().enumerate() {
        apply_one(&mut out, index, op)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn ops(v: Value) -> Vec<PatchOp> {
        serde_json::from_value(v).unwrap()
    }

    fn spec() -> Value {
        json!({
            "routes": [
                { "prefix": "10.20.0.0/16", "via": { "interface": "mesh0", "neighbor": "10.0.0.2" },
                  "fallback": [ { "interface": "mesh1", "neighbor": "10.0.1.2" } ] }
            ]
        })
    }

    /// A route switch: test what the route is, then swap `via` and its
    /// fallback.
    fn switch() -> Vec<PatchOp> {
        ops(json!([
            { "op": "test", "path": "/routes/0/prefix", "value": "10.20.0.0/16" },
            { "op": "test", "path": "/routes/0/via/interface", "value": "mesh0" },
            { "op": "replace", "path": "/routes/0/via", "value": { "interface": "mesh1", "neighbor": "10.0.1.2" } },
            { "op": "replace", "path": "/routes/0/fallback/0", "value": { "interface": "mesh0", "neighbor": "10.0.0.2" } }
        ]))
    }

    #[test]
    fn a_route_switch_applies_when_its_tests_hold() {
        let out = apply(&spec(), &switch()).unwrap();
        assert_eq!(out["routes"][0]["via"]["interface"], "mesh1");
        assert_eq!(out["routes"][0]["fallback"][0]["interface"], "mesh0");
    }

    #[test]
    fn a_patch_made_stale_by_an_edit_fails_and_changes_nothing() {
        let mut edited = spec();
        edited["routes"][0]["prefix"] = json!("10.30.0.0/16");
        let err = apply(&edited, &switch()).unwrap_err();
        assert_eq!(
            err,
            PatchError::TestFailed {
                index: 0,
                path: "/routes/0/prefix".into(),
                expected: "\"10.20.0.0/16\"".into(),
                found: "\"10.30.0.0/16\"".into()
            }
        );
        let gone = json!({ "routes": [] });
        assert!(matches!(apply(&gone, &switch()), Err(PatchError::NoSuchPath { index: 0, .. })));
    }

    #[test]
    fn add_remove_and_escaped_pointers_follow_rfc_6902() {
        let doc = json!({ "a/b": { "~k": [1, 2] } });
        let out = apply(
            &doc,
            &ops(json!([
                { "op": "add", "path": "/a~1b/~0k/-", "value": 3 },
                { "op": "add", "path": "/a~1b/~0k/0", "value": 0 },
                { "op": "remove", "path": "/a~1b/~0k/1" },
                { "op": "add", "path": "/new", "value": true }
            ])),
        )
        .unwrap();
        assert_eq!(out, json!({ "a/b": { "~k": [0, 2, 3] }, "new": true }));
        let bad = ops(json!([{ "op": "remove", "path": "nope" }]));
        assert!(matches!(apply(&doc, &bad), Err(PatchError::BadPointer { .. })));
        let out_of_range = ops(json!([{ "op": "add", "path": "/a~1b/~0k/9", "value": 1 }]));
        assert!(matches!(apply(&doc, &out_of_range), Err(PatchError::NoSuchPath { .. })));
    }
}

//! A proposal as an edit of the spec file's text, for the pull request
//! that makes it permanent: the scalars the patch replaces are rewritten in
//! place (quoting and comments kept), and the result shown as a unified
//! diff. Pure.
//!
//! Only `replace` operations whose old and new values are mappings of
//! the same scalar keys (a route's hops) are edited in place; anything
//! else returns None and the caller shows the JSON Patch alone.

use serde_json::Value;

use crate::spec::patch::PatchOp;
use crate::spec::yaml::{MarkedDocument, Position};

/// The byte offset of a 1-based line and (character) column.
fn offset(source: &str, pos: Position) -> Option<usize> {
    let line_start =
        if pos.line <= 1 { 0 } else { source.match_indices('\n').nth(pos.line - 2).map(|(i, _)| i + 1)? };
    let line = &source[line_start..];
    let col = line.char_indices().nth(pos.col.saturating_sub(1)).map(|(i, _)| i)?;
    Some(line_start + col)
}

/// The scalar token starting at `at`: its byte length and its value.
fn scalar_token(source: &str, at: usize) -> Option<(usize, String, char)> {
    let rest = &source[at..];
    let first = rest.chars().next()?;
    match first {
        '"' => {
            let mut escaped = false;
            for (i, c) in rest.char_indices().skip(1) {
                match c {
                    '\\' if !escaped => escaped = true,
                    '"' if !escaped => return Some((i + 1, serde_json::from_str(&rest[..=i]).ok()?, '"')),
                    '\n' => return None,
                    _ => escaped = false,
                }
            }
            None
        }
        '\'' => {
            let end = rest[1..].find('\'')? + 1;
            let inner = &rest[1..end];
            (!inner.contains('\n')).then(|| (end + 1, inner.to_string(), '\''))
        }
        _ => {
            let mut end = rest.len();
            for (i, c) in rest.char_indices() {
                let comment = c == '#' && rest[..i].ends_with(' ');
                if matches!(c, ',' | '}' | ']' | '\n') || comment {
                    end = i;
                    break;
                }
            }
            let token = rest[..end].trim_end();
            Some((token.len(), token.to_string(), ' '))
        }
    }
}

/// The spec text with the patch's hop replacements made in place.
pub fn edit_text(source: &str, doc: &MarkedDocument, ops: &[PatchOp]) -> Option<String> {
    let mut edits: Vec<(usize, usize, String)> = Vec::new();
    for op in ops {
        let PatchOp::Replace { path, value: Value::Object(new) } = op else {
            if matches!(op, PatchOp::Test { .. }) {
                continue;
            }
            return None;
        };
        let Some(Value::Object(old)) = doc.value.pointer(path) else { return None };
        if old.keys().ne(new.keys()) {
            return None;
        }
        for (key, new_value) in new {
            let (Value::String(old_s), Value::String(new_s)) = (&old[key], new_value) else { return None };
            if old_s == new_s {
                continue;
            }
            let at = offset(source, doc.value_position(&format!("{path}/{key}"))?)?;
            let (len, text, quote) = scalar_token(source, at)?;
            if &text != old_s {
                return None;
            }
            let replacement = match quote {
                '"' => serde_json::to_string(new_s).ok()?,
                '\'' => format!("'{}'", new_s.replace('\'', "''")),
                _ => new_s.clone(),
            };
            edits.push((at, len, replacement));
        }
    }
    edits.sort_by_key(|e| std::cmp::Reverse(e.0));
    let mut out = source.to_string();
    for (at, len, text) in edits {
        out.replace_range(at..at + len, &text);
    }
    Some(out)
}

/// A unified diff (3 lines of context) of two texts with the same number
/// of lines, as in-place edits produce.
pub fn unified_diff(path: &str, before: &str, after: &str) -> String {
    let (a, b): (Vec<&str>, Vec<&str>) = (before.lines().collect(), after.lines().collect());
    if a.len() != b.len() {
        return String::new();
    }
    let changed: Vec<usize> = (0..a.len()).filter(|&i| a[i] != b[i]).collect();
    let mut out = format!("--- a/{path}\n+++ b/{path}\n");
    let mut i = 0;
    while i < changed.len() {
        // Changes closer than 7 lines share a hunk (their contexts touch).
        let mut j = i;
        while j + 1 < changed.len() && changed[j + 1] - changed[j] <= 6 {
            j += 1;
        }
        let (from, to) = (changed[i].saturating_sub(3), (changed[j] + 3).min(a.len() - 1));
        let n = to - from + 1;
        out.push_str(&format!("@@ -{},{n} +{},{n} @@\n", from + 1, from + 1));
        for k in from..=to {
            if a[k] == b[k] {
                out.push_str(&format!(" {}\n", a[k]));
            } else {
                out.push_str(&format!("-{}\n+{}\n", a[k], b[k]));
            }
        }
        i = j + 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = "\
apiVersion: bpfsync/v1
kind: NodeSpec
routes:
  - prefix: 10.20.0.0/16   # the far site
    via: { interface: mesh0, neighbor: 10.0.0.2 }
    fallback:
      - interface: \"mesh1\"
        neighbor: 10.0.1.2 # backup
";

    #[test]
    fn a_route_switch_edits_the_hops_in_place_and_keeps_comments_and_quotes() {
        let doc = crate::spec::yaml::parse(SPEC).unwrap();
        let ops = vec![
            PatchOp::Replace {
                path: "/routes/0/via".into(),
                value: serde_json::json!({ "interface": "mesh1", "neighbor": "10.0.1.2" }),
            },
            PatchOp::Replace {
                path: "/routes/0/fallback/0".into(),
                value: serde_json::json!({ "interface": "mesh0", "neighbor": "10.0.0.2" }),
            },
        ];
        let after = edit_text(SPEC, &doc, &ops).unwrap();
        assert!(after.contains("via: { interface: mesh1, neighbor: 10.0.1.2 }"), "{after}");
        assert!(after.contains("- interface: \"mesh0\"\n        neighbor: 10.0.0.2 # backup"), "{after}");
        let diff = unified_diff("spec.yaml", SPEC, &after);
        assert_eq!(diff.matches("\n-    via").count(), 1, "{diff}");
        assert_eq!(diff.matches("\n+").count() - 1, 3, "three lines changed: {diff}");
        assert!(diff.starts_with("--- a/spec.yaml\n+++ b/spec.yaml\n@@ -2,7 +2,7 @@\n"), "{diff}");
        // The edited text parses to what the patch says.
        let patched = crate::spec::patch::apply(&doc.value, &ops).unwrap();
        assert_eq!(crate::spec::yaml::parse(&after).unwrap().value, patched);
    }
}

//! YAML → JSON value, remembering where every node came from.
//!
//! serde_yaml does not expose positions of nodes, and spec errors must point
//! at `FILE:LINE:COL` for any document path. This module walks the parser's
//! marked events once and builds both the value (validated by the JSON
//! Schema, then deserialised) and an index from JSON pointer to position.
//!
//! Scalars resolve as in the YAML 1.2 core schema, with one exception:
//! plain `0x…` scalars stay strings, because map keys and values use them as
//! literal bytes.
//!
//! Limits, checked while the events stream in, so that no input costs more
//! than its size: nesting at most [`MAX_DEPTH`] deep, aliases at most
//! [`MAX_ALIASES`] and together expanding to at most [`MAX_ALIAS_NODES`]
//! nodes (a 370-byte "billion laughs" once took 2.4 GiB), and one document
//! per file (a second `---` is an error, never silently ignored).

use std::collections::HashMap;

use serde_json::{Map, Number, Value};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// A 1-based line and column in the source text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub line: usize,
    pub col: usize,
}

impl Position {
    fn from_marker(m: Marker) -> Self {
        // yaml-rust2 lines start at 1 and columns at 0.
        Position { line: m.line().max(1), col: m.col() + 1 }
    }
}

/// A parsed document: its value and the position of each node and key.
#[derive(Debug, Default)]
pub struct MarkedDocument {
    pub value: Value,
    /// JSON pointer → where the node's value starts.
    pub values: HashMap<String, Position>,
    /// JSON pointer → where the mapping key naming that node starts.
    pub keys: HashMap<String, Position>,
    /// Problems the parser tolerated but the spec does not (duplicate keys,
    /// non-scalar keys): pointer, position, message.
    pub problems: Vec<(String, Position, String)>,
}

impl MarkedDocument {
    /// The best position for `pointer`: its value, else its key, else the
    /// nearest ancestor.
    pub fn position(&self, pointer: &str) -> Position {
        let mut p = pointer.to_string();
        loop {
            if let Some(pos) = self.values.get(&p) {
                return *pos;
            }
            if let Some(pos) = self.keys.get(&p) {
                return *pos;
            }
            match p.rfind('/') {
                Some(i) => p.truncate(i),
                None => return Position { line: 1, col: 1 },
            }
        }
    }

    /// The position of the key that names `pointer`, else its value.
    pub fn key_position(&self, pointer: &str) -> Position {
        self.keys.get(pointer).copied().unwrap_or_else(|| self.position(pointer))
    }
}

/// A YAML syntax error.
#[derive(Debug, Clone)]
pub struct SyntaxError {
    pub position: Position,
    pub message: String,
}

pub fn parse(text: &str) -> Result<MarkedDocument, SyntaxError> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    parser
        // Every document, so that a second one is seen and refused.
        .load(&mut builder, true)
        .map_err(|e| SyntaxError { position: Position::from_marker(*e.marker()), message: e.info().to_string() })?;
    if let Some(e) = builder.error {
        return Err(e);
    }
    let mut doc = builder.doc;
    doc.value = builder.root.unwrap_or(Value::Null);
    Ok(doc)
}

/// Deepest nesting of sequences and mappings.
pub const MAX_DEPTH: usize = 64;
/// Most alias uses in one document.
pub const MAX_ALIASES: usize = 10_000;
/// Most nodes all aliases may expand to, together.
pub const MAX_ALIAS_NODES: usize = 100_000;

enum Frame {
    Seq {
        pointer: String,
        items: Vec<Value>,
        anchor: usize,
        first_node: usize,
    },
    Map {
        pointer: String,
        map: Map<String, Value>,
        pending_key: Option<(String, Position)>,
        anchor: usize,
        first_node: usize,
    },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    root: Option<Value>,
    /// Anchored values and how many nodes each holds.
    anchors: HashMap<usize, (Value, usize)>,
    /// Nodes made so far, aliases expanded.
    nodes: usize,
    aliases: usize,
    alias_nodes: usize,
    documents: usize,
    doc: MarkedDocument,
    error: Option<SyntaxError>,
    /// Depth of a complex (non-scalar) mapping key being skipped.
    skipping_key: usize,
}

impl Builder {
    fn fail(&mut self, position: Position, message: String) {
        self.error = Some(SyntaxError { position, message });
    }

    /// Pointer of the node about to be produced in the current container.
    fn child_pointer(&self) -> Option<String> {
        match self.stack.last() {
            None => Some(String::new()),
            Some(Frame::Seq { pointer, items, .. }) => Some(format!("{pointer}/{}", items.len())),
            Some(Frame::Map { pointer, pending_key: Some((k, _)), .. }) => Some(format!("{pointer}/{}", escape(k))),
            Some(Frame::Map { .. }) => None, // the next node is a key
        }
    }

    fn push_value(&mut self, value: Value) {
        match self.stack.last_mut() {
            None => self.root = Some(value),
            Some(Frame::Seq { items, .. }) => items.push(value),
            Some(Frame::Map { map, pending_key, pointer, .. }) => match pending_key.take() {
                Some((k, pos)) => {
                    if map.contains_key(&k) {
                        let ptr = format!("{pointer}/{}", escape(&k));
                        self.doc.problems.push((ptr, pos, format!("duplicate key `{k}`")));
                    }
                    map.insert(k, value);
                }
                None => unreachable!("value pushed where a key was expected"),
            },
        }
    }
}

fn escape(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.error.is_some() {
            return;
        }
        let pos = Position::from_marker(mark);
        if self.skipping_key > 0 {
            match ev {
                Event::SequenceStart(..) | Event::MappingStart(..) => self.skipping_key += 1,
                Event::SequenceEnd | Event::MappingEnd => {
                    self.skipping_key -= 1;
                    if self.skipping_key == 0 {
                        // The complex key's value follows: give it a placeholder key.
                        if let Some(Frame::Map { pending_key, .. }) = self.stack.last_mut() {
                            *pending_key = Some(("<complex key>".into(), pos));
                        }
                    }
                }
                _ => {}
            }
            return;
        }
        // A mapping expecting a key?
        let expecting_key = matches!(self.stack.last(), Some(Frame::Map { pending_key: None, .. }));
        match ev {
            Event::Scalar(text, style, anchor, tag) if expecting_key => {
                let _ = (anchor, tag, style);
                if let Some(Frame::Map { pointer, pending_key, .. }) = self.stack.last_mut() {
                    let ptr = format!("{pointer}/{}", escape(&text));
                    self.doc.keys.insert(ptr, pos);
                    *pending_key = Some((text, pos));
                }
            }
            Event::SequenceStart(..) | Event::MappingStart(..) if expecting_key => {
                if let Some(Frame::Map { pointer, .. }) = self.stack.last() {
                    let p = pointer.clone();
                    self.doc.problems.push((p, pos, "mapping keys must be plain scalars".into()));
                }
                self.skipping_key = 1;
            }
            Event::Alias(id) if expecting_key => {
                let _ = id;
                self.error =
                    Some(SyntaxError { position: pos, message: "aliases are not allowed as mapping keys".into() });
            }
            Event::Scalar(text, style, anchor, tag) => {
                let ptr = self.child_pointer().unwrap_or_default();
                self.doc.values.insert(ptr, pos);
                let is_str_tag = tag.as_ref().is_some_and(|t| t.suffix == "str");
                let value = if style == TScalarStyle::Plain && !is_str_tag {
                    resolve_plain(&text)
                } else {
                    Value::String(text)
                };
                self.nodes += 1;
                if anchor > 0 {
                    self.anchors.insert(anchor, (value.clone(), 1));
                }
                self.push_value(value);
            }
            Event::Alias(id) => {
                let ptr = self.child_pointer().unwrap_or_default();
                self.doc.values.insert(ptr, pos);
                let Some((value, size)) = self.anchors.get(&id) else {
                    return self.fail(pos, "unknown alias".into());
                };
                self.aliases += 1;
                self.alias_nodes += size;
                if self.aliases > MAX_ALIASES || self.alias_nodes > MAX_ALIAS_NODES {
                    return self.fail(
                        pos,
                        format!(
                            "aliases expand too far (at most {MAX_ALIASES} aliases expanding to {MAX_ALIAS_NODES} nodes in all): write the values out"
                        ),
                    );
                }
                let (value, size) = (value.clone(), *size);
                self.nodes += size;
                self.push_value(value);
            }
            Event::SequenceStart(..) | Event::MappingStart(..) if self.stack.len() >= MAX_DEPTH => {
                self.fail(pos, format!("nesting deeper than {MAX_DEPTH} levels"));
            }
            Event::SequenceStart(anchor, _) => {
                let ptr = self.child_pointer().unwrap_or_default();
                self.doc.values.insert(ptr.clone(), pos);
                self.nodes += 1;
                let first_node = self.nodes;
                self.stack.push(Frame::Seq { pointer: ptr, items: Vec::new(), anchor, first_node });
            }
            Event::MappingStart(anchor, _) => {
                let ptr = self.child_pointer().unwrap_or_default();
                self.doc.values.insert(ptr.clone(), pos);
                self.nodes += 1;
                let first_node = self.nodes;
                self.stack.push(Frame::Map { pointer: ptr, map: Map::new(), pending_key: None, anchor, first_node });
            }
            Event::SequenceEnd => {
                if let Some(Frame::Seq { items, anchor, first_node, .. }) = self.stack.pop() {
                    let v = Value::Array(items);
                    if anchor > 0 {
                        self.anchors.insert(anchor, (v.clone(), self.nodes - first_node + 1));
                    }
                    self.push_value(v);
                }
            }
            Event::MappingEnd => {
                if let Some(Frame::Map { map, anchor, first_node, .. }) = self.stack.pop() {
                    let v = Value::Object(map);
                    if anchor > 0 {
                        self.anchors.insert(anchor, (v.clone(), self.nodes - first_node + 1));
                    }
                    self.push_value(v);
                }
            }
            Event::DocumentStart => {
                self.documents += 1;
                if self.documents > 1 {
                    self.fail(
                        pos,
                        "a second YAML document starts here: a spec is one document (remove the `---`)".into(),
                    );
                }
            }
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => {}
        }
    }
}

/// Resolves a plain scalar: null, booleans, integers and floats as in the
/// YAML 1.2 core schema; `0x…` and everything else stay strings.
fn resolve_plain(text: &str) -> Value {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(i) = text.parse::<i64>() {
            return Value::Number(i.into());
        }
        if let Ok(u) = text.trim_start_matches('+').parse::<u64>() {
            return Value::Number(u.into());
        }
        return Value::String(text.to_string());
    }
    let looks_float = digits.bytes().next().is_some_and(|b| b.is_ascii_digit() || b == b'.')
        && digits.bytes().all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'-' | b'+'));
    if looks_float && let Some(n) = text.parse::<f64>().ok().and_then(Number::from_f64) {
        return Value::Number(n);
    }
    Value::String(text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_point_at_values_and_keys() {
        let doc = parse("a: 1\nb:\n  - x: 0x10\n    y: \"2\"\n").unwrap();
        assert_eq!(doc.value["b"][0]["x"], Value::String("0x10".into()));
        assert_eq!(doc.value["b"][0]["y"], Value::String("2".into()));
        assert_eq!(doc.value["a"], Value::Number(1.into()));
        assert_eq!(doc.values["/b/0/x"], Position { line: 3, col: 8 });
        assert_eq!(doc.keys["/b/0/y"], Position { line: 4, col: 5 });
    }

    #[test]
    fn duplicate_keys_are_problems() {
        let doc = parse("a: 1\na: 2\n").unwrap();
        assert_eq!(doc.problems.len(), 1);
        assert!(doc.problems[0].2.contains("duplicate key `a`"));
    }

    #[test]
    fn an_alias_bomb_is_refused_quickly_and_small() {
        let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        let mut prev = 'a';
        for name in 'b'..='j' {
            let refs = vec![format!("*{prev}"); 10].join(", ");
            bomb.push_str(&format!("{name}: &{name} [{refs}]\n"));
            prev = name;
        }
        let started = std::time::Instant::now();
        let err = parse(&bomb).unwrap_err();
        assert!(err.message.contains("aliases expand too far"), "{}", err.message);
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        // A few aliases are fine.
        let doc = parse("a: &x [1, 2]\nb: *x\nc: *x\n").unwrap();
        assert_eq!(doc.value["c"], serde_json::json!([1, 2]));
    }

    #[test]
    fn deep_nesting_and_second_documents_are_errors_with_positions() {
        let deep = format!("{}1{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert!(parse(&deep).unwrap_err().message.contains("nesting deeper"));
        let two = parse("a: 1\n---\nb: 2\n").unwrap_err();
        assert!(two.message.contains("second YAML document"), "{}", two.message);
        assert_eq!(two.position.line, 2);
        assert!(parse("---\na: 1\n...\n").is_ok(), "one document with markers is fine");
    }

    #[test]
    fn syntax_errors_have_positions() {
        let err = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(err.position.line >= 1);
    }
}

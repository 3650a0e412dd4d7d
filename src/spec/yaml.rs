//! YAML → JSON value, remembering where every node came from.
//!
//! serde_yaml does not expose positions of nodes, and spec errors must point
//! at `FILE:LINE:COL` for any document path. This module walks the parser's
//! marked events once and builds both the value (validated by the JSON
//! Schema, then deserialised) and a tree of positions shaped like it.
//! Positions are looked up by JSON pointer only when a diagnostic needs
//! one, by walking the tree: building an index of pointer strings was 80 %
//! of loading a spec of 100,000 map entries (a string and a hash per node).
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
use std::ops::ControlFlow;

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

/// Where one node came from, and its children's positions.
#[derive(Debug, Clone, Default)]
pub struct Positions {
    /// Where the node's value starts.
    value: Position,
    /// Where the mapping key naming it starts (nodes in mappings).
    key: Option<Position>,
    children: Children,
}

#[derive(Debug, Clone, Default)]
enum Children {
    #[default]
    None,
    Seq(Vec<Positions>),
    /// Sorted by key (stably: of duplicate keys the first comes first), so
    /// a lookup is a binary search — a mapping of 100,000 unknown keys makes
    /// 100,000 diagnostics that each locate their key.
    Map(Vec<(Box<str>, Positions)>),
}

impl Default for Position {
    fn default() -> Self {
        Position { line: 1, col: 1 }
    }
}

/// A parsed document: its value and the position of each node and key.
#[derive(Debug, Default)]
pub struct MarkedDocument {
    pub value: Value,
    /// The root's positions (None for an empty document).
    positions: Option<Positions>,
    /// Problems the parser tolerated but the spec does not (duplicate keys,
    /// non-scalar keys): pointer, position, message.
    pub problems: Vec<(String, Position, String)>,
}

impl MarkedDocument {
    /// The nodes on the way to `pointer`, from the root, as far as they
    /// exist.
    fn walk(&self, pointer: &str) -> Vec<&Positions> {
        let mut out: Vec<&Positions> = self.positions.iter().collect();
        if pointer.is_empty() {
            return out;
        }
        let _ = pointer.split('/').skip(1).try_for_each(|raw| {
            let segment = raw.replace("~1", "/").replace("~0", "~");
            let next = match &out.last().expect("a root").children {
                Children::Seq(items) => segment.parse::<usize>().ok().and_then(|i| items.get(i)),
                Children::Map(entries) => {
                    let at = entries.partition_point(|(k, _)| **k < *segment);
                    entries.get(at).filter(|(k, _)| **k == *segment).map(|(_, p)| p)
                }
                Children::None => None,
            };
            match next {
                Some(p) => {
                    out.push(p);
                    ControlFlow::Continue(())
                }
                None => ControlFlow::Break(()),
            }
        });
        out
    }

    /// Where the value at `pointer` starts, if that node exists.
    pub fn value_position(&self, pointer: &str) -> Option<Position> {
        let path = self.walk(pointer);
        (path.len() == pointer.split('/').count()).then(|| path.last().map(|p| p.value)).flatten()
    }

    /// The best position for `pointer`: its value, else the nearest
    /// ancestor's.
    pub fn position(&self, pointer: &str) -> Position {
        self.walk(pointer).last().map(|p| p.value).unwrap_or_default()
    }

    /// The position of the key that names `pointer`, else its value (or
    /// the nearest ancestor's).
    pub fn key_position(&self, pointer: &str) -> Position {
        let path = self.walk(pointer);
        let exact = path.len() == pointer.split('/').count();
        match path.last() {
            Some(p) if exact => p.key.unwrap_or(p.value),
            Some(p) => p.value,
            None => Position::default(),
        }
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
    let (value, positions) = builder.root.map_or((Value::Null, None), |(v, p)| (v, Some(p)));
    doc.value = value;
    doc.positions = positions;
    Ok(doc)
}

/// Deepest nesting of sequences and mappings.
pub const MAX_DEPTH: usize = 64;
/// Most alias uses in one document.
pub const MAX_ALIASES: usize = 10_000;
/// Most nodes all aliases may expand to, together.
pub const MAX_ALIAS_NODES: usize = 100_000;

/// A sequence or mapping being built. Its JSON pointer is not kept: it is
/// made from the stack when a problem needs it ([`Builder::pointer`]).
enum Frame {
    Seq {
        at: Position,
        items: Vec<Value>,
        positions: Vec<Positions>,
        anchor: usize,
        first_node: usize,
    },
    Map {
        at: Position,
        map: Map<String, Value>,
        positions: Vec<(Box<str>, Positions)>,
        pending_key: Option<(String, Position)>,
        anchor: usize,
        first_node: usize,
    },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    root: Option<(Value, Positions)>,
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

    /// The JSON pointer of the innermost open container.
    fn pointer(&self) -> String {
        let mut out = String::new();
        // Each container's segment is what its parent holds open for it:
        // a sequence's next index, a mapping's pending key.
        for parent in &self.stack[..self.stack.len().saturating_sub(1)] {
            match parent {
                Frame::Seq { items, .. } => out.push_str(&format!("/{}", items.len())),
                Frame::Map { pending_key: Some((k, _)), .. } => {
                    out.push('/');
                    out.push_str(&escape(k));
                }
                Frame::Map { .. } => out.push_str("/<complex key>"),
            }
        }
        out
    }

    /// Adds a finished node (value at `at`, with its children's positions)
    /// to the innermost container, or makes it the root.
    fn push_value(&mut self, value: Value, at: Position, children: Children) {
        let pointer = match self.stack.last() {
            Some(Frame::Map { map, pending_key: Some((k, _)), .. }) if map.contains_key(k) => Some(self.pointer()),
            _ => None,
        };
        match self.stack.last_mut() {
            None => self.root = Some((value, Positions { value: at, key: None, children })),
            Some(Frame::Seq { items, positions, .. }) => {
                items.push(value);
                positions.push(Positions { value: at, key: None, children });
            }
            Some(Frame::Map { map, positions, pending_key, .. }) => match pending_key.take() {
                Some((k, key_at)) => {
                    if let Some(pointer) = pointer {
                        let ptr = format!("{pointer}/{}", escape(&k));
                        self.doc.problems.push((ptr, key_at, format!("duplicate key `{k}`")));
                    }
                    positions.push((k.as_str().into(), Positions { value: at, key: Some(key_at), children }));
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
                if let Some(Frame::Map { pending_key, .. }) = self.stack.last_mut() {
                    *pending_key = Some((text, pos));
                }
            }
            Event::SequenceStart(..) | Event::MappingStart(..) if expecting_key => {
                let p = self.pointer();
                self.doc.problems.push((p, pos, "mapping keys must be plain scalars".into()));
                self.skipping_key = 1;
            }
            Event::Alias(id) if expecting_key => {
                let _ = id;
                self.error =
                    Some(SyntaxError { position: pos, message: "aliases are not allowed as mapping keys".into() });
            }
            Event::Scalar(text, style, anchor, tag) => {
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
                self.push_value(value, pos, Children::None);
            }
            Event::Alias(id) => {
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
                // An alias's nodes all point at the alias.
                self.push_value(value, pos, Children::None);
            }
            Event::SequenceStart(..) | Event::MappingStart(..) if self.stack.len() >= MAX_DEPTH => {
                self.fail(pos, format!("nesting deeper than {MAX_DEPTH} levels"));
            }
            Event::SequenceStart(anchor, _) => {
                self.nodes += 1;
                let first_node = self.nodes;
                self.stack.push(Frame::Seq { at: pos, items: Vec::new(), positions: Vec::new(), anchor, first_node });
            }
            Event::MappingStart(anchor, _) => {
                self.nodes += 1;
                let first_node = self.nodes;
                self.stack.push(Frame::Map {
                    at: pos,
                    map: Map::new(),
                    positions: Vec::new(),
                    pending_key: None,
                    anchor,
                    first_node,
                });
            }
            Event::SequenceEnd => {
                if let Some(Frame::Seq { at, items, positions, anchor, first_node }) = self.stack.pop() {
                    let v = Value::Array(items);
                    if anchor > 0 {
                        self.anchors.insert(anchor, (v.clone(), self.nodes - first_node + 1));
                    }
                    self.push_value(v, at, Children::Seq(positions));
                }
            }
            Event::MappingEnd => {
                if let Some(Frame::Map { at, map, mut positions, anchor, first_node, .. }) = self.stack.pop() {
                    positions.sort_by(|a, b| a.0.cmp(&b.0));
                    let v = Value::Object(map);
                    if anchor > 0 {
                        self.anchors.insert(anchor, (v.clone(), self.nodes - first_node + 1));
                    }
                    self.push_value(v, at, Children::Map(positions));
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
        assert_eq!(doc.value_position("/b/0/x"), Some(Position { line: 3, col: 8 }));
        assert_eq!(doc.key_position("/b/0/y"), Position { line: 4, col: 5 });
        assert_eq!(doc.position("/b/0/y"), Position { line: 4, col: 8 });
        assert_eq!(doc.position("/b/0/nope/deeper").line, 3, "the nearest node that exists: `/b/0`");
        assert_eq!(doc.value_position("/b/1"), None);
        assert_eq!(doc.position("").line, 1);
        let escaped = parse("\"a/b\": { \"c~d\": 1 }\n").unwrap();
        assert_eq!(escaped.value_position("/a~1b/c~0d"), Some(Position { line: 1, col: 17 }));
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

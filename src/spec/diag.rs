//! Spec diagnostics: `FILE:LINE:COL: message`, the document path, and a
//! caret under the spot.

use std::fmt;
use std::path::{Path, PathBuf};

use super::yaml::Position;

/// One problem found in a spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub position: Position,
    /// Document path such as `programs[1].maps[0].entries[3].key`; empty
    /// for the document itself.
    pub path: String,
    pub message: String,
    /// The source line the position is on, for the caret snippet.
    pub source_line: Option<String>,
}

impl Diagnostic {
    pub fn new(file: &Path, source: &str, position: Position, pointer: &str, message: impl Into<String>) -> Self {
        Diagnostic {
            file: file.to_path_buf(),
            position,
            path: pointer_to_path(pointer),
            message: message.into(),
            source_line: source.lines().nth(position.line.saturating_sub(1)).map(str::to_string),
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: {}", self.file.display(), self.position.line, self.position.col, self.message)?;
        if !self.path.is_empty() {
            write!(f, "\n  at `{}`", self.path)?;
        }
        if let Some(line) = &self.source_line {
            let n = self.position.line.to_string();
            let pad = " ".repeat(n.len());
            let caret = " ".repeat(self.position.col.saturating_sub(1));
            write!(f, "\n {pad} |\n {n} | {line}\n {pad} | {caret}^")?;
        }
        Ok(())
    }
}

/// All problems found in one spec, in source order.
#[derive(Debug, Clone)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            writeln!(f, "{d}")?;
        }
        let n = self.0.len();
        write!(f, "{n} error{} in spec", if n == 1 { "" } else { "s" })
    }
}

impl std::error::Error for Diagnostics {}

/// `/programs/1/maps/0/entries/3/key` → `programs[1].maps[0].entries[3].key`.
pub fn pointer_to_path(pointer: &str) -> String {
    let mut out = String::new();
    for seg in pointer.split('/').skip(1) {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&seg);
        }
    }
    out
}

impl Diagnostics {
    /// `{ "errors": [ { file, line, column, path, message } ] }`.
    pub fn to_json(&self) -> serde_json::Value {
        let errors: Vec<serde_json::Value> = self
            .0
            .iter()
            .map(|d| {
                serde_json::json!({
                    "file": d.file.display().to_string(),
                    "line": d.position.line,
                    "column": d.position.col,
                    "path": d.path,
                    "message": d.message,
                })
            })
            .collect();
        serde_json::json!({ "valid": false, "errors": errors })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointer_becomes_document_path() {
        assert_eq!(pointer_to_path("/programs/1/maps/0/entries/3/key"), "programs[1].maps[0].entries[3].key");
        assert_eq!(pointer_to_path(""), "");
    }

    #[test]
    fn renders_caret_under_column() {
        let d = Diagnostic::new(Path::new("s.yaml"), "a: 1\nbb: x\n", Position { line: 2, col: 5 }, "/bb", "bad");
        let text = d.to_string();
        assert!(text.starts_with("s.yaml:2:5: bad\n  at `bb`"), "{text}");
        assert!(text.ends_with(" 2 | bb: x\n   |     ^"), "{text}");
    }
}

//! Spec diagnostics: `FILE:LINE:COL: message`, the document path, and a
//! caret under the spot.
//!
//! Limits, so that no spec costs more to report than to read: messages are
//! cut at [`MESSAGE_MAX`] bytes (values are echoed in them), the line shown
//! above the caret at [`SNIPPET_MAX`] characters around the column, at most
//! `KEPT_MAX` diagnostics are kept and [`SHOWN_MAX`] shown as text ("and
//! N more"), and source lines are found in one pass for all diagnostics.

use std::fmt;
use std::path::{Path, PathBuf};

use super::yaml::Position;

/// Longest message kept: values echoed in messages may be megabytes long.
pub const MESSAGE_MAX: usize = 400;
/// Longest stretch of a source line shown above the caret.
pub const SNIPPET_MAX: usize = 120;
/// Diagnostics shown as text; the rest are counted.
pub const SHOWN_MAX: usize = 100;
/// Diagnostics kept at all (`-o json` lists them).
pub const KEPT_MAX: usize = 1000;

/// One problem found in a spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub position: Position,
    /// Document path such as `programs[1].maps[0].entries[3].key`; empty
    /// for the document itself.
    pub path: String,
    pub message: String,
    /// The source line (or a window of it) the position is on, and the
    /// caret's column in it; filled in by `finish`.
    pub snippet: Option<(String, usize)>,
}

impl Diagnostic {
    /// The source line for the caret is filled in later, for every
    /// diagnostic in one pass (`finish`): looking it up here cost a scan
    /// of the source per diagnostic (100,000 errors took 102 s).
    pub fn new(file: &Path, _source: &str, position: Position, pointer: &str, message: impl Into<String>) -> Self {
        Diagnostic {
            file: file.to_path_buf(),
            position,
            path: pointer_to_path(pointer),
            message: truncate(message.into(), MESSAGE_MAX),
            snippet: None,
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: {}", self.file.display(), self.position.line, self.position.col, self.message)?;
        if !self.path.is_empty() {
            write!(f, "\n  at `{}`", truncate(self.path.clone(), MESSAGE_MAX))?;
        }
        if let Some((line, col)) = &self.snippet {
            let n = self.position.line.to_string();
            let pad = " ".repeat(n.len());
            let caret = " ".repeat(col.saturating_sub(1));
            write!(f, "\n {pad} |\n {n} | {line}\n {pad} | {caret}^")?;
        }
        Ok(())
    }
}

/// All problems found in one spec, in source order.
#[derive(Debug, Clone, Default)]
pub struct Diagnostics {
    pub items: Vec<Diagnostic>,
    /// Problems found beyond `KEPT_MAX`, counted only.
    pub omitted: usize,
}

impl Diagnostics {
    /// Every problem found, kept and omitted.
    pub fn count(&self) -> usize {
        self.items.len() + self.omitted
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.items.iter().take(SHOWN_MAX).enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            writeln!(f, "{d}")?;
        }
        let n = self.count();
        let more = n - self.items.len().min(SHOWN_MAX);
        if more > 0 {
            writeln!(f, "\n… and {more} more (all of the first {KEPT_MAX}: `bpfsync validate -o json`)")?;
        }
        write!(f, "{n} error{} in spec", if n == 1 { "" } else { "s" })
    }
}

impl std::error::Error for Diagnostics {}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let cut = (0..=max).rev().find(|i| s.is_char_boundary(*i)).unwrap_or(0);
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// Sorts and de-duplicates diagnostics, keeps the first `KEPT_MAX`
/// (counting the rest), and fills in their source snippets in one pass
/// over `source`.
pub fn finish(mut diags: Vec<Diagnostic>, source: &str) -> Diagnostics {
    diags.sort_by(|a, b| (a.position, &a.path, &a.message).cmp(&(b.position, &b.path, &b.message)));
    diags.dedup();
    let omitted = diags.len().saturating_sub(KEPT_MAX);
    diags.truncate(KEPT_MAX);
    let mut lines = source.lines().enumerate().peekable();
    for d in &mut diags {
        let want = d.position.line.saturating_sub(1);
        while lines.next_if(|(n, _)| *n < want).is_some() {}
        if let Some((n, line)) = lines.peek()
            && *n == want
        {
            d.snippet = Some(snippet(line, d.position.col));
        }
    }
    Diagnostics { items: diags, omitted }
}

/// At most [`SNIPPET_MAX`] characters of `line` around 1-based column
/// `col`, and the caret's column in that window.
fn snippet(line: &str, col: usize) -> (String, usize) {
    if line.chars().count() <= SNIPPET_MAX {
        return (line.to_string(), col);
    }
    let chars: Vec<char> = line.chars().collect();
    let start = col.saturating_sub(SNIPPET_MAX / 2).min(chars.len() - SNIPPET_MAX);
    let text: String = chars[start..start + SNIPPET_MAX].iter().collect();
    // One column for the leading `…`.
    (format!("…{text}…"), col - start + 1)
}

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
    /// `{ "valid": false, "errors": [ { file, line, column, path, message } ],
    /// "omitted": N }`.
    pub fn to_json(&self) -> serde_json::Value {
        let errors: Vec<serde_json::Value> = self
            .items
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
        serde_json::json!({ "valid": false, "errors": errors, "omitted": self.omitted })
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
        let d = Diagnostic::new(Path::new("s.yaml"), "", Position { line: 2, col: 5 }, "/bb", "bad");
        let text = finish(vec![d], "a: 1\nbb: x\n").items[0].to_string();
        assert!(text.starts_with("s.yaml:2:5: bad\n  at `bb`"), "{text}");
        assert!(text.ends_with(" 2 | bb: x\n   |     ^"), "{text}");
    }

    #[test]
    fn long_lines_messages_and_many_errors_are_cut() {
        let line = format!("key: {}", "x".repeat(10_000));
        let d = Diagnostic::new(Path::new("s.yaml"), "", Position { line: 1, col: 5000 }, "/key", "y".repeat(5000));
        let all = finish(vec![d.clone(); 1], &line);
        let text = all.items[0].to_string();
        assert!(text.len() < 1000, "{} bytes", text.len());
        let (shown, col) = all.items[0].snippet.clone().unwrap();
        assert_eq!(shown.chars().nth(col - 1), Some('x'), "the caret stays on its character");

        let many: Vec<Diagnostic> = (1..=5000)
            .map(|i| Diagnostic::new(Path::new("s.yaml"), "", Position { line: i, col: 1 }, "", "bad"))
            .collect();
        let source = "a\n".repeat(5000);
        let started = std::time::Instant::now();
        let all = finish(many, &source);
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        assert_eq!((all.items.len(), all.omitted, all.count()), (KEPT_MAX, 4000, 5000));
        let text = all.to_string();
        assert!(
            text.contains("… and 4900 more") && text.ends_with("5000 errors in spec"),
            "{}",
            &text[text.len() - 200..]
        );
    }
}

//! Self-healing events to OpenTelemetry: the heal store's history log —
//! every proposal transition, whether the agent made it (a route switched
//! to a fallback, a revert, a flap lock) or a person did with `bpfsync
//! proposals` — tailed and sent to the OTLP collector as log records
//! beside the flow records (scope `bpfsync.heal`).
//!
//! The tail starts at the log's end when the agent starts (what happened
//! before is in the log itself), follows its rotation, and keeps at most
//! [`MAX_PENDING`] unsent events while the collector is away (the oldest
//! go first, counted in the log).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::flows::export::SendError;
use crate::flows::otlp::{HEAL_SCOPE, OtlpSink, int, string};
use crate::heal::store::Store;

/// Events kept while the collector cannot take them.
pub const MAX_PENDING: usize = 10_000;
/// Most bytes read from the log per poll.
const MAX_READ: u64 = 1 << 20;
/// How often the log is looked at (and `stop` with it).
const POLL: Duration = Duration::from_millis(200);

/// New complete lines of an append-only file that may be rotated (renamed
/// away and started again).
pub struct Tail {
    path: PathBuf,
    offset: u64,
    /// A line read without its end yet.
    partial: Vec<u8>,
}

impl Tail {
    /// Starts at the file's current end (or its start, once it exists).
    pub fn at_end(path: PathBuf) -> Tail {
        let offset = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        Tail { path, offset, partial: Vec::new() }
    }

    /// The lines completed since the last call.
    pub fn read(&mut self) -> Vec<String> {
        let Ok(mut file) = File::open(&self.path) else { return Vec::new() };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if len < self.offset {
            // Rotated (a new, shorter file): read it from its start.
            self.offset = 0;
            self.partial.clear();
        }
        if file.seek(SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut bytes = Vec::new();
        let n = file.take(MAX_READ).read_to_end(&mut bytes).unwrap_or(0);
        self.offset += n as u64;
        self.partial.extend_from_slice(&bytes);
        let mut lines = Vec::new();
        while let Some(end) = self.partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line).trim().to_string();
            if !text.is_empty() {
                lines.push(text);
            }
        }
        // A line longer than a read is not a history entry: drop what is held.
        if self.partial.len() as u64 > MAX_READ {
            self.partial.clear();
        }
        lines
    }
}

/// One history entry as an OTLP log record; the proposal it names (when its
/// file is still there) adds the route and the action.
pub fn event_record(line: &str, store: &Store) -> Option<Value> {
    let entry: Value = serde_json::from_str(line).ok()?;
    let id = entry["id"].as_str()?;
    let status = entry["status"].as_str().unwrap_or("unknown");
    let by = entry["by"].as_str().unwrap_or("");
    let at_ms = entry["at-unix-ms"].as_u64().unwrap_or(0);
    let note = entry["note"].as_str().unwrap_or("");
    let mut attributes = vec![
        string("bpfsync.event", "proposal"),
        string("bpfsync.proposal.id", id),
        string("bpfsync.proposal.status", status),
        string("bpfsync.proposal.by", by),
    ];
    let mut body = format!("proposal {id} {status} by {by}");
    if let Ok(p) = store.get(id) {
        attributes.push(string("bpfsync.route", &p.route));
        attributes.push(string("bpfsync.proposal.source", &p.source));
        let action = serde_json::to_value(&p.action).unwrap_or(Value::Null);
        if let Some(kind) = action.as_object().and_then(|o| o.keys().next()) {
            attributes.push(string("bpfsync.proposal.action", kind));
        }
        body = format!("proposal {id} for route {} {status} by {by}", p.route);
    }
    if !note.is_empty() {
        attributes.push(string("bpfsync.proposal.note", note));
        body.push_str(&format!(": {note}"));
    }
    attributes.push(int("bpfsync.proposal.at_unix_ms", at_ms));
    let time_ns = at_ms.saturating_mul(1_000_000);
    Some(json!({
        "timeUnixNano": time_ns.to_string(),
        "observedTimeUnixNano": crate::time::now_unix_ns().to_string(),
        "severityNumber": 9,
        "severityText": "INFO",
        "body": { "stringValue": body },
        "attributes": attributes,
    }))
}

/// Tails `store`'s history into `sink` until `stop`.
pub fn spawn(store: Store, mut sink: OtlpSink, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("export-heal-events".into())
        .spawn(move || {
            let mut tail = Tail::at_end(store.history_path());
            let mut pending: VecDeque<Value> = VecDeque::new();
            let mut dropped = 0u64;
            let mut next_try = Instant::now();
            let mut backoff = Duration::from_millis(100);
            while !stop.load(Ordering::Relaxed) {
                for line in tail.read() {
                    match event_record(&line, &store) {
                        Some(r) => pending.push_back(r),
                        None => tracing::warn!(%line, "a heal history line that is not an event; not exported"),
                    }
                    if pending.len() > MAX_PENDING {
                        pending.pop_front();
                        dropped += 1;
                    }
                }
                if dropped > 0 {
                    tracing::warn!(dropped, "heal events dropped while the OTLP collector was away");
                    dropped = 0;
                }
                if !pending.is_empty() && Instant::now() >= next_try {
                    let batch: Vec<Value> = pending.iter().take(500).cloned().collect();
                    match sink.send_records(HEAL_SCOPE, batch.clone()) {
                        Ok(_) => {
                            pending.drain(..batch.len());
                            backoff = Duration::from_millis(100);
                        }
                        Err(SendError::Reject { error }) => {
                            tracing::warn!(%error, events = batch.len(), "the collector refused heal events; dropped");
                            pending.drain(..batch.len());
                        }
                        Err(SendError::Retry { error, after }) => {
                            tracing::debug!(%error, "heal events not sent yet; retrying");
                            next_try = Instant::now() + after.unwrap_or(backoff);
                            backoff = (backoff * 2).min(Duration::from_secs(30));
                        }
                    }
                }
                std::thread::sleep(POLL);
            }
        })
        .expect("spawn the heal events thread")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::TempDir;
    use std::io::Write;

    #[test]
    fn the_tail_reads_complete_lines_and_follows_rotation() {
        let dir = TempDir::create("bpfsync-tail").unwrap();
        let path = dir.path().join("history.jsonl");
        std::fs::write(&path, "old\n").unwrap();
        let mut tail = Tail::at_end(path.clone());
        assert!(tail.read().is_empty(), "what was there before is not sent again");
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        write!(f, "one\ntw").unwrap();
        assert_eq!(tail.read(), ["one"]);
        writeln!(f, "o").unwrap();
        assert_eq!(tail.read(), ["two"]);
        // Rotated: renamed away, a new file begun.
        std::fs::rename(&path, dir.path().join("history.jsonl.1")).unwrap();
        std::fs::write(&path, "three\n").unwrap();
        assert_eq!(tail.read(), ["three"]);
        let missing = Tail::at_end(dir.path().join("none")).read();
        assert!(missing.is_empty());
    }

    #[test]
    fn a_history_entry_becomes_a_log_record() {
        let dir = TempDir::create("bpfsync-heal-ev").unwrap();
        let store = Store::new(dir.path());
        let r = event_record(
            r#"{"id":"p-1","status":"applied","by":"user:alice","at-unix-ms":1796225193539,"note":"looks right"}"#,
            &store,
        )
        .unwrap();
        assert_eq!(r["body"]["stringValue"], "proposal p-1 applied by user:alice: looks right");
        assert_eq!(r["timeUnixNano"], "1796225193539000000");
        assert!(event_record("not json", &store).is_none());
        assert!(event_record(r#"{"status":"applied"}"#, &store).is_none(), "no id");
    }
}

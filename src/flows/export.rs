//! Flow export: JSON lines to a file (rotated by size) and/or to an HTTP
//! collector. Each sink has a bounded queue (when it is full the oldest
//! records go, counted as dropped), a thread that sends batches, and
//! retries with exponential backoff (100 ms → 30 s) while the sink fails.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::record::FlowRecord;

/// A destination for batches of records.
pub trait Sink: Send {
    fn send(&mut self, batch: &[Arc<FlowRecord>]) -> Result<Sent, SendError>;
}

/// A batch the sink took.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    /// Records the receiver said it rejected (OTLP `partial_success`).
    pub rejected: u64,
}

/// Why a batch did not go through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    /// Worth another try, after `after` when the receiver said so
    /// (`Retry-After`), else after the exporter's backoff.
    Retry { error: String, after: Option<Duration> },
    /// The receiver refused the batch for good (e.g. 400): it is dropped and
    /// counted, not retried.
    Reject { error: String },
}

impl From<io::Error> for SendError {
    fn from(e: io::Error) -> Self {
        SendError::Retry { error: e.to_string(), after: None }
    }
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Retry { error, .. } | SendError::Reject { error } => f.write_str(error),
        }
    }
}

/// A sink's bounded queue and its counters.
pub struct ExportQueue {
    /// `file` or `http` (the metrics label).
    pub sink: &'static str,
    queue: Mutex<VecDeque<Arc<FlowRecord>>>,
    ready: Condvar,
    capacity: usize,
    pub exported: AtomicU64,
    /// Records dropped because the queue was full (the sink too slow or down).
    pub dropped: AtomicU64,
    /// Failed send attempts.
    pub errors: AtomicU64,
    /// Records the receiver refused: a batch it rejected for good, or those
    /// its partial success named.
    pub rejected: AtomicU64,
}

impl ExportQueue {
    pub fn new(sink: &'static str, capacity: usize) -> ExportQueue {
        ExportQueue {
            sink,
            queue: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
            capacity: capacity.max(1),
            exported: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
        }
    }

    pub fn push_all(&self, records: &[Arc<FlowRecord>]) {
        let mut q = self.queue.lock().unwrap();
        for r in records {
            if q.len() == self.capacity {
                q.pop_front();
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            q.push_back(r.clone());
        }
        drop(q);
        self.ready.notify_one();
    }

    pub fn queued(&self) -> usize {
        self.queue.lock().unwrap().len()
    }

    /// Waits until `batch` records are queued or `linger` passes (or stop),
    /// then takes up to `batch`.
    fn take(&self, batch: usize, linger: Duration, stop: &AtomicBool) -> Vec<Arc<FlowRecord>> {
        let deadline = Instant::now() + linger;
        let mut q = self.queue.lock().unwrap();
        loop {
            let now = Instant::now();
            if q.len() >= batch || (now >= deadline && !q.is_empty()) || stop.load(Ordering::Relaxed) {
                break;
            }
            let wait = if q.is_empty() { Duration::from_millis(200) } else { deadline.saturating_duration_since(now) };
            q = self.ready.wait_timeout(q, wait).unwrap().0;
            if q.is_empty() && Instant::now() >= deadline {
                return Vec::new();
            }
        }
        let n = q.len().min(batch);
        q.drain(..n).collect()
    }
}

/// How an exporter batches and retries.
#[derive(Debug, Clone)]
pub struct ExportPolicy {
    pub batch: usize,
    /// How long a partial batch waits for more records.
    pub linger: Duration,
    pub backoff_start: Duration,
    pub backoff_max: Duration,
}

impl Default for ExportPolicy {
    fn default() -> Self {
        ExportPolicy {
            batch: 500,
            linger: Duration::from_millis(500),
            backoff_start: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// Runs a sink on its own thread until `stop`; what is queued then gets
/// one last attempt.
pub fn spawn(
    queue: Arc<ExportQueue>,
    mut sink: Box<dyn Sink>,
    policy: ExportPolicy,
    stop: Arc<AtomicBool>,
) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(format!("export-{}", queue.sink))
        .spawn(move || {
            let mut backoff = policy.backoff_start;
            let mut failing_since: Option<Instant> = None;
            loop {
                let stopping = stop.load(Ordering::Relaxed);
                let batch = queue.take(policy.batch, policy.linger, &stop);
                if batch.is_empty() {
                    if stopping {
                        return;
                    }
                    continue;
                }
                // The batch is retried until it goes through; meanwhile new
                // records queue up (and the oldest are dropped when full).
                loop {
                    match sink.send(&batch) {
                        Ok(sent) => {
                            let rejected = sent.rejected.min(batch.len() as u64);
                            queue.exported.fetch_add(batch.len() as u64 - rejected, Ordering::Relaxed);
                            if rejected > 0 {
                                queue.rejected.fetch_add(rejected, Ordering::Relaxed);
                                tracing::warn!(sink = queue.sink, rejected, "the collector rejected part of a batch");
                            }
                            if let Some(t) = failing_since.take() {
                                tracing::info!(sink = queue.sink, down_for = ?t.elapsed(), "flow export recovered");
                            }
                            backoff = policy.backoff_start;
                            break;
                        }
                        Err(SendError::Reject { error }) => {
                            queue.errors.fetch_add(1, Ordering::Relaxed);
                            queue.rejected.fetch_add(batch.len() as u64, Ordering::Relaxed);
                            tracing::warn!(sink = queue.sink, %error, records = batch.len(), "the collector refused a batch; it is dropped");
                            break;
                        }
                        Err(SendError::Retry { error, after }) => {
                            queue.errors.fetch_add(1, Ordering::Relaxed);
                            if failing_since.is_none() {
                                tracing::warn!(sink = queue.sink, %error, "flow export failing; retrying with backoff");
                                failing_since = Some(Instant::now());
                            }
                            if stop.load(Ordering::Relaxed) {
                                queue.dropped.fetch_add(batch.len() as u64, Ordering::Relaxed);
                                break;
                            }
                            // The receiver's `Retry-After`, within the backoff's ceiling.
                            let wait = after.map_or(backoff, |a| a.min(policy.backoff_max));
                            sleep_unless_stopped(wait, &stop);
                            backoff = (backoff * 2).min(policy.backoff_max);
                        }
                    }
                }
            }
        })
        .expect("spawn the export thread")
}

fn sleep_unless_stopped(d: Duration, stop: &AtomicBool) {
    let end = Instant::now() + d;
    while Instant::now() < end && !stop.load(Ordering::Relaxed) {
        std::thread::sleep((end - Instant::now()).min(Duration::from_millis(50)));
    }
}

fn json_lines(batch: &[Arc<FlowRecord>]) -> Vec<u8> {
    json_lines_as(batch, &FileFormat::Json)
}

/// How the file sink writes a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileFormat {
    /// bpfsync's record, one JSON object per line.
    Json,
    /// Hubble's `jsonpb` shape ([`super::hubble`]), with this node's name.
    Jsonpb { node: String },
}

fn json_lines_as(batch: &[Arc<FlowRecord>], format: &FileFormat) -> Vec<u8> {
    let mut out = Vec::with_capacity(batch.len() * 400);
    for r in batch {
        let written = match format {
            FileFormat::Json => serde_json::to_writer(&mut out, r.as_ref()),
            FileFormat::Jsonpb { node } => serde_json::to_writer(&mut out, &super::hubble::to_jsonpb(r, node)),
        };
        if written.is_ok() {
            out.push(b'\n');
        }
    }
    out
}

/// JSON lines appended to `path`; past `max_bytes` the file becomes
/// `path.1` (older ones shift to `.2` … `.keep`, the oldest is removed).
pub struct FileSink {
    path: PathBuf,
    format: FileFormat,
    max_bytes: u64,
    keep: usize,
    file: Option<File>,
    size: u64,
}

impl FileSink {
    pub fn new(path: PathBuf, max_bytes: u64, keep: usize) -> io::Result<FileSink> {
        FileSink::with_format(path, max_bytes, keep, FileFormat::Json)
    }

    pub fn with_format(path: PathBuf, max_bytes: u64, keep: usize, format: FileFormat) -> io::Result<FileSink> {
        let mut s = FileSink { path, format, max_bytes, keep, file: None, size: 0 };
        s.open()?;
        Ok(s)
    }

    fn open(&mut self) -> io::Result<()> {
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir)?;
        }
        let f = OpenOptions::new().create(true).append(true).open(&self.path)?;
        self.size = f.metadata()?.len();
        self.file = Some(f);
        Ok(())
    }

    fn rotated(path: &Path, n: usize) -> PathBuf {
        let mut s = path.as_os_str().to_owned();
        s.push(format!(".{n}"));
        PathBuf::from(s)
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.file = None;
        if self.keep == 0 {
            fs::remove_file(&self.path)?;
        } else {
            let _ = fs::remove_file(Self::rotated(&self.path, self.keep));
            for n in (1..self.keep).rev() {
                let from = Self::rotated(&self.path, n);
                if from.exists() {
                    fs::rename(&from, Self::rotated(&self.path, n + 1))?;
                }
            }
            fs::rename(&self.path, Self::rotated(&self.path, 1))?;
        }
        self.open()
    }
}

impl Sink for FileSink {
    fn send(&mut self, batch: &[Arc<FlowRecord>]) -> Result<Sent, SendError> {
        if self.file.is_none() {
            self.open()?;
        }
        let bytes = json_lines_as(batch, &self.format);
        let f = self.file.as_mut().expect("opened above");
        if let Err(e) = f.write_all(&bytes) {
            self.file = None; // reopen next time (the file may have been removed)
            return Err(e.into());
        }
        self.size += bytes.len() as u64;
        if self.size >= self.max_bytes {
            self.rotate()?;
        }
        Ok(Sent::default())
    }
}

/// POSTs batches as JSON lines to an `http://` collector (ureq: a
/// maintained HTTP client, chunked responses, redirects and timeouts
/// handled). `https://` is refused: put a TLS proxy in front.
#[derive(Debug)]
pub struct HttpSink {
    url: String,
    agent: ureq::Agent,
}

impl HttpSink {
    pub fn new(url: &str) -> Result<HttpSink, String> {
        let parsed = url::Url::parse(url).map_err(|e| format!("collector URL `{url}`: {e}"))?;
        if parsed.scheme() != "http" {
            return Err(format!("collector URL `{url}`: only http:// is supported (put a TLS proxy in front)"));
        }
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err(format!("collector URL `{url}` has no host"));
        }
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .redirects(0)
            .build();
        Ok(HttpSink { url: parsed.to_string(), agent })
    }
}

impl Sink for HttpSink {
    fn send(&mut self, batch: &[Arc<FlowRecord>]) -> Result<Sent, SendError> {
        let body = json_lines(batch);
        match self.agent.post(&self.url).set("Content-Type", "application/x-ndjson").send_bytes(&body) {
            Ok(_) => Ok(Sent::default()),
            Err(ureq::Error::Status(code, _)) => {
                Err(SendError::Retry { error: format!("collector answered {code}"), after: None })
            }
            Err(e) => Err(SendError::Retry { error: e.to_string(), after: None }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::record::tests::{FixedNames, event};
    use crate::sandbox::TempDir;

    fn records(n: u16) -> Vec<Arc<FlowRecord>> {
        (0..n)
            .map(|i| {
                Arc::new(FlowRecord::from_event(&event(0, 0, 6, 1000, i, 7), i as u64, 0, &mut FixedNames).unwrap())
            })
            .collect()
    }

    #[test]
    fn a_full_queue_drops_the_oldest_and_counts_them() {
        let q = ExportQueue::new("file", 3);
        q.push_all(&records(5));
        assert_eq!(q.dropped.load(Ordering::Relaxed), 2);
        let stop = AtomicBool::new(false);
        let got = q.take(10, Duration::ZERO, &stop);
        assert_eq!(got.iter().map(|r| r.destination.port).collect::<Vec<_>>(), [2, 3, 4]);
    }

    #[test]
    fn the_file_rotates_by_size_and_keeps_the_newest() {
        let dir = TempDir::create("bpfsync-export").unwrap();
        let path = dir.path().join("flows.jsonl");
        let mut sink = FileSink::new(path.clone(), 1000, 2).unwrap();
        for _ in 0..10 {
            sink.send(&records(2)).unwrap();
        }
        let rotated = |n| FileSink::rotated(&path, n);
        assert!(rotated(1).exists() && rotated(2).exists() && !rotated(3).exists());
        for p in [path.clone(), rotated(1), rotated(2)] {
            let text = fs::read_to_string(&p).unwrap_or_default();
            for line in text.lines() {
                serde_json::from_str::<FlowRecord>(line).expect("every line is a flow record");
            }
            assert!(text.len() < 1000 + 2 * 600, "{} is rotated near the limit", p.display());
        }
    }

    #[test]
    fn collector_urls_are_checked() {
        assert_eq!(HttpSink::new("http://127.0.0.1:9000/ingest").unwrap().url, "http://127.0.0.1:9000/ingest");
        assert_eq!(HttpSink::new("http://[::1]:8080").unwrap().url, "http://[::1]:8080/");
        assert!(HttpSink::new("https://x").unwrap_err().contains("only http://"));
        assert!(HttpSink::new("http://").is_err());
        assert!(HttpSink::new("http://h:99999/").is_err());
    }
}

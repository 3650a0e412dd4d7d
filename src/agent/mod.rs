//! `bpfsync agent`: keeps the node equal to a spec file, continuously.
//!
//! Tasks: a file watch (notify) feeding a debounced reconcile; a periodic
//! resync that observes the kernel and repairs drift; retries with
//! exponential backoff (100 ms → 1 min) for errors that may pass; and one
//! HTTP listener for `/metrics`, `/healthz`, `/readyz`, `/status`.
//!
//! Stopping the agent leaves the datapath running (everything is pinned).
//! A new agent adopts what is there: it prunes nothing before the spec has
//! been loaded and the kernel observed, and an unchanged object is never
//! reloaded. A spec that fails validation, or a deleted spec file, keeps
//! the last good state running.

mod http;
pub mod metrics;
mod watch;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::applied::{self, Context};
use crate::apply::journal::FileJournal;
use crate::apply::lock::NodeLock;
use crate::apply::{self, ApplyError, Retry, error_chain, scope_for};
use crate::compile::{Desired, ObjectLoader, load_and_compile};
use crate::flows::export::{self, ExportPolicy, ExportQueue, FileSink, HttpSink, Sink};
use crate::flows::hub::FlowHub;
use crate::flows::reader;
use crate::kernel::Kernel;
use crate::kernel::real::RealKernel;
use crate::plan;
use metrics::{KindLabel, Metrics};

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub spec: PathBuf,
    pub ctx: Context,
    pub resync: Duration,
    pub debounce: Duration,
    pub listen: SocketAddr,
    pub flows: FlowOptions,
}

/// The flow reader's history and exports.
#[derive(Debug, Clone)]
pub struct FlowOptions {
    /// Records kept for `/flows` (0 keeps none; metrics and exports still run).
    pub history: usize,
    /// JSON lines file, rotated at `file_max_bytes` keeping `file_keep` old files.
    pub export_file: Option<PathBuf>,
    pub file_max_bytes: u64,
    pub file_keep: usize,
    /// `http://host:port/path` collector that receives JSON lines by POST.
    pub export_http: Option<String>,
    /// Records each export queue holds while its sink is slow or down.
    pub export_buffer: usize,
    pub export: ExportPolicy,
}

impl Default for FlowOptions {
    fn default() -> Self {
        FlowOptions {
            history: 10_000,
            export_file: None,
            file_max_bytes: 100 << 20,
            file_keep: 3,
            export_http: None,
            export_buffer: 10_000,
            export: ExportPolicy::default(),
        }
    }
}

/// What `/status` and `/readyz` report about the agent itself.
#[derive(Debug, Default)]
pub struct AgentState {
    pub ready: bool,
    pub spec_digest: Option<String>,
    pub last_reconcile_unix: Option<f64>,
    pub last_result: Option<String>,
    /// The last reconcile's error, if it failed.
    pub last_error: Option<String>,
    /// Why the spec file is not being followed right now (unreadable,
    /// invalid); the last good state keeps running meanwhile.
    pub spec_error: Option<String>,
    pub last_duration_ms: Option<f64>,
    pub listen: Option<SocketAddr>,
    /// When the reconcile that is running now started (None: idle). A
    /// reconcile running far longer than a resync interval means the loop
    /// is stuck: `/healthz` says so.
    pub reconcile_started: Option<Instant>,
    /// Panics caught in reconciles (each also logged with the spec digest).
    pub panics: u64,
}

/// State shared between the reconcile loop and the HTTP listener.
pub struct Shared {
    pub state: Mutex<AgentState>,
    pub metrics: Metrics,
    pub config: AgentConfig,
    pub flows: Arc<FlowHub>,
    /// Interfaces the spec names: an event on one of them reconciles at once
    /// (a declared hook whose interface appears is attached then).
    pub watched_interfaces: Mutex<std::collections::BTreeSet<String>>,
}

impl Shared {
    /// The agent's own state. A panic elsewhere never leaves it unusable:
    /// the data is plain values, valid whatever was interrupted.
    pub fn state(&self) -> std::sync::MutexGuard<'_, AgentState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Why the reconcile loop is not healthy, if it is not: a reconcile
    /// running longer than three resync intervals (at least a minute).
    pub fn unhealthy(&self) -> Option<String> {
        let started = self.state().reconcile_started?;
        let limit = (self.config.resync * 3).max(Duration::from_secs(60));
        let running = started.elapsed();
        (running > limit).then(|| {
            format!(
                "a reconcile has been running for {:.0} s (limit {:.0} s)",
                running.as_secs_f64(),
                limit.as_secs_f64()
            )
        })
    }

    fn status_json(&self) -> Value {
        let mut v = match crate::status::report(&self.config.ctx) {
            Ok((v, _, _)) => v,
            Err(e) => json!({ "error": error_chain(&e) }),
        };
        let s = self.state();
        v["agent"] = json!({
            "spec": self.config.spec,
            "spec_sha256": s.spec_digest,
            "ready": s.ready,
            "last_reconcile_unix": s.last_reconcile_unix,
            "last_result": s.last_result,
            "last_error": s.last_error,
            "spec_error": s.spec_error,
            "last_duration_ms": s.last_duration_ms,
            "resync_seconds": self.config.resync.as_secs_f64(),
        });
        v
    }
}

fn now_unix() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Why a reconcile runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Start,
    SpecChanged,
    Resync,
    Retry,
    /// An interface the spec names appeared, went or changed.
    Interface,
}

/// What one reconcile did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    NoChange,
    /// No valid spec yet: nothing is touched.
    NotReady,
    /// A failure that may pass: retry after the backoff.
    Retry,
    /// A failure the kernel will likely repeat (a refused program, a busy
    /// hook): retried too, but starting at a long backoff, and at every
    /// resync, so a condition that clears (a foreign program removed) is
    /// repaired without a restart.
    Failed,
    Skipped,
}

struct LastGood {
    digest: String,
    desired: Desired,
    /// The last-applied record for this spec, staged in the state directory.
    staged: PathBuf,
}

/// The reconcile state machine, run on a blocking thread.
struct Reconciler {
    shared: Arc<Shared>,
    kernel: Option<RealKernel>,
    last_good: Option<LastGood>,
    /// Digest of the last spec text seen (valid or not).
    seen_digest: Option<String>,
    /// Digest of the spec last applied successfully: a later non-empty plan
    /// for the same spec is drift.
    applied_digest: Option<String>,
    lock: Option<NodeLock>,
}

impl Reconciler {
    /// Opens the kernel and takes the node lock, held from then on: no CLI
    /// write runs beside the agent. A busy lock is retried with backoff.
    fn kernel(&mut self) -> Result<&mut RealKernel, String> {
        if self.kernel.is_none() {
            let ctx = &self.shared.config.ctx;
            let k = RealKernel::open(&ctx.bpffs_root).map_err(|e| error_chain(&e))?;
            self.lock = Some(NodeLock::acquire(k.root(), &ctx.state_dir, "agent").map_err(|e| error_chain(&e))?);
            self.kernel = Some(k);
        }
        Ok(self.kernel.as_mut().unwrap())
    }

    /// Reads the spec file; a new valid version becomes the last good one.
    /// Returns None when the text did not change since the last read, else
    /// whether the new text is valid (and now the last good spec).
    fn refresh_spec(&mut self) -> Option<bool> {
        let path = &self.shared.config.spec;
        let text = match crate::spec::read_limited(path, self.shared.config.ctx.max_spec_bytes) {
            Ok(t) => t,
            Err(e) => {
                let msg = format!("{}; keeping the last good state", error_chain(&e));
                tracing::warn!("{msg}");
                self.shared.state().spec_error = Some(msg);
                // Re-read whatever comes back, even the same text.
                self.seen_digest = None;
                return None;
            }
        };
        let digest = crate::object::digest(text.as_bytes());
        if self.seen_digest.as_deref() == Some(digest.as_str()) {
            return None;
        }
        self.seen_digest = Some(digest.clone());
        // Parsing a big spec takes ~40x the memory of its compiled state:
        // keep only the compiled state (the last-applied record is staged on
        // disk) and give the rest back.
        let ctx = &self.shared.config.ctx;
        let compiled = (|| -> Result<(Desired, PathBuf), String> {
            let (loaded, desired) =
                load_and_compile(path, &text, &mut ObjectLoader::default()).map_err(|d| d.to_string())?;
            let staged = applied::stage(ctx, &loaded, &desired, "last-applied.next")
                .map_err(|e| format!("cannot write to the state directory: {e}"))?;
            Ok((desired, staged))
        })();
        drop(text);
        trim_heap();
        match compiled {
            Ok((desired, staged)) => {
                self.shared.metrics.spec_valid.set(1);
                let mut st = self.shared.state();
                st.spec_digest = Some(digest.clone());
                st.spec_error = None;
                drop(st);
                self.last_good = Some(LastGood { digest, desired, staged });
                Some(true)
            }
            Err(diags) => {
                self.shared.metrics.spec_valid.set(0);
                self.shared.metrics.spec_validation_errors.inc();
                let msg = format!("the new spec is invalid; keeping the last good state:\n{diags}");
                tracing::error!("{msg}");
                self.shared.state().spec_error = Some(msg);
                Some(false)
            }
        }
    }

    fn reconcile(&mut self, trigger: Trigger) -> Outcome {
        crate::fault::point("reconcile");
        let started = Instant::now();
        let refreshed = self.refresh_spec();
        if trigger == Trigger::SpecChanged && refreshed.is_none() {
            return Outcome::Skipped; // a touch, or a neighbour's event
        }
        let rejected = refreshed == Some(false);
        let Some(good) = &self.last_good else {
            if rejected {
                self.shared.metrics.count_reconcile("invalid_spec");
            }
            return Outcome::NotReady;
        };
        let digest = good.digest.clone();
        let outcome = self.reconcile_with(&digest);
        trim_heap(); // the observed state, plan and journal of big maps are transient
        let elapsed = started.elapsed();
        self.shared.metrics.reconcile_duration.observe(elapsed.as_secs_f64());
        // A rejected spec still runs the last good one (and repairs drift);
        // the run is counted under what the user changed.
        let result = match &outcome {
            Ok(_) if rejected => "invalid_spec",
            Ok(0) => "no_change",
            Ok(_) => "applied",
            Err(_) => "error",
        };
        self.shared.metrics.count_reconcile(result);
        let mut st = self.shared.state();
        st.last_reconcile_unix = Some(now_unix());
        st.last_result = Some(result.to_string());
        st.last_duration_ms = Some(elapsed.as_secs_f64() * 1e3);
        match outcome {
            Ok(n) => {
                st.ready = true;
                st.last_error = None;
                self.shared.metrics.ready.set(1);
                self.shared.metrics.last_success.set(now_unix());
                if n == 0 { Outcome::NoChange } else { Outcome::Applied }
            }
            Err((msg, retryable)) => {
                tracing::error!(error = %msg, retryable, "reconcile failed");
                st.last_error = Some(msg);
                if retryable { Outcome::Retry } else { Outcome::Failed }
            }
        }
    }

    /// Observe, plan, apply. Ok(number of changes) or Err((message, retryable)).
    fn reconcile_with(&mut self, digest: &str) -> Result<usize, (String, bool)> {
        let ctx = self.shared.config.ctx.clone();
        let mut journal = FileJournal::new(&ctx.state_dir);
        let kernel = self.kernel().map_err(|e| (e, true))?;
        // Before every apply, not only at start: an apply of ours whose
        // rollback failed left its journal, to be rolled back before
        // anything else is tried.
        let n = apply::recover(kernel, &mut journal, Retry::default()).map_err(|e| (error_chain(&e), true))?;
        if n > 0 {
            tracing::warn!(steps = n, "rolled back an interrupted apply");
        }
        let good = self.last_good.as_ref().unwrap();
        let kernel = self.kernel.as_mut().unwrap();
        let scope = scope_for(&good.desired.state);
        *self.shared.watched_interfaces.lock().unwrap() = scope.interfaces.clone();
        let observed = kernel.observe(&scope).map_err(|e| {
            let retry = e.is_retryable();
            (error_chain(&e), retry)
        })?;
        let p = plan::plan(&good.desired.state, &observed);
        let m = &self.shared.metrics;
        m.conflicts.set(p.conflicts.len() as i64);
        for c in &p.conflicts {
            tracing::warn!(hook = %c.hook, "conflict: {}", c.message);
        }
        let st = &good.desired.state;
        m.managed_objects.get_or_create(&KindLabel { kind: "program".into() }).set(st.programs.len() as i64);
        m.managed_objects.get_or_create(&KindLabel { kind: "attachment".into() }).set(st.attachments.len() as i64);
        let entries: usize = st.maps.values().filter(|x| x.managed).map(|x| x.entries.len()).sum();
        m.managed_objects.get_or_create(&KindLabel { kind: "map_entry".into() }).set(entries as i64);
        if p.is_empty() {
            if self.applied_digest.as_deref() != Some(digest) {
                let _ = applied::commit(&ctx, &good.staged);
                self.applied_digest = Some(digest.to_string());
            }
            return Ok(0);
        }
        let drift = self.applied_digest.as_deref() == Some(digest);
        let shown: Vec<_> = p.changes.iter().filter(|c| c.part_of.is_none()).collect();
        for c in &shown {
            if drift {
                let kind = format!("{}-{}", kind_name(c.kind), action_name(c.action));
                tracing::warn!(object = %c.address, kind = %kind, "repairing drift: {}", c.reason);
                m.drift_repairs.get_or_create(&KindLabel { kind }).inc();
            }
        }
        let s = p.summary();
        tracing::info!(add = s.add, change = s.change, destroy = s.destroy, drift, "applying plan");
        let kernel = self.kernel.as_mut().unwrap();
        match apply::apply(kernel, &p, &good.desired, &observed, &mut journal, Retry::default()) {
            Ok(report) => {
                tracing::info!(steps = report.steps, kernel_writes = report.kernel_writes, "applied");
                if self.applied_digest.as_deref() != Some(digest) {
                    let _ = applied::commit(&ctx, &good.staged);
                }
                self.applied_digest = Some(digest.to_string());
                Ok(shown.len())
            }
            Err(e) => {
                let retryable = match &e {
                    ApplyError::RolledBack { cause, .. } => cause.is_retryable(),
                    ApplyError::Refused { .. } => false,
                    // The rest pass or are finished by the next run's recovery.
                    _ => true,
                };
                Err((error_chain(&e), retryable))
            }
        }
    }
}

/// Runs one reconcile; a panic in it is caught, logged with the spec
/// digest, counted (`bpfsync_reconciles_total{result="panic"}`) and retried
/// with backoff like any failure. The reconciler forgets the spec text it
/// saw, so the next run reads and compiles it again; no lock stays poisoned.
fn reconcile_catching_panics(r: &Mutex<Reconciler>, trigger: Trigger) -> Outcome {
    let mut guard = r.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let shared = guard.shared.clone();
    shared.state().reconcile_started = Some(Instant::now());
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| guard.reconcile(trigger)));
    shared.state().reconcile_started = None;
    match outcome {
        Ok(outcome) => outcome,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            let digest = guard.last_good.as_ref().map(|g| g.digest.clone()).unwrap_or_default();
            tracing::error!(panic = %what, spec_sha256 = %digest, "a reconcile panicked; it will be retried");
            guard.seen_digest = None;
            shared.metrics.count_reconcile("panic");
            let mut st = shared.state();
            st.panics += 1;
            st.last_result = Some("panic".into());
            st.last_error = Some(format!("the reconcile panicked: {what}"));
            Outcome::Retry
        }
    }
}

/// Returns freed heap memory to the system: parsing a big spec or reading a
/// big map leaves the allocator holding pages the idle agent never reuses.
fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn kind_name(k: plan::Kind) -> &'static str {
    match k {
        plan::Kind::Program => "program",
        plan::Kind::Attachment => "attachment",
        plan::Kind::MapEntry => "map-entry",
        plan::Kind::Map => "map",
    }
}

fn action_name(a: plan::Action) -> &'static str {
    match a {
        plan::Action::Create => "create",
        plan::Action::Update => "update",
        plan::Action::Replace => "replace",
        plan::Action::Delete => "delete",
    }
}

/// Raises the soft descriptor limit to the hard one (at most 65,536), as
/// Go's runtime does: systemd's default soft limit of 1,024 is what HTTP
/// clients exhausted before the listener had a connection limit.
fn raise_descriptor_limit() {
    let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain getrlimit/setrlimit on a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max.min(65_536) {
            let want = libc::rlimit { rlim_cur: l.rlim_max.min(65_536), rlim_max: l.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) != 0 {
                tracing::warn!("cannot raise the descriptor limit from {}", l.rlim_cur);
            }
        }
    }
}

/// The longest wait between retries of a failing reconcile.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// The first wait after a failure the kernel will likely repeat.
const PERMANENT_FIRST_BACKOFF: Duration = Duration::from_secs(5);

/// Runs the agent until `shutdown` completes. `on_listen` learns the bound
/// address (useful with port 0).
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()>,
    on_listen: impl FnOnce(SocketAddr),
) -> anyhow::Result<()> {
    raise_descriptor_limit();
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    let flow_stop = Arc::new(AtomicBool::new(false));
    let (hub, flow_threads) = start_flows(&config, &flow_stop)?;
    on_listen(addr);
    tracing::info!(%addr, spec = %config.spec.display(), "agent listening");
    let shared = Arc::new(Shared {
        state: Mutex::new(AgentState { listen: Some(addr), ..Default::default() }),
        metrics: Metrics::new(config.ctx.bpffs_root.clone(), hub.clone()),
        config: config.clone(),
        flows: hub,
        watched_interfaces: Mutex::default(),
    });
    let http = tokio::spawn(http::serve(listener, shared.clone()));

    let (tx, mut rx) = mpsc::channel::<()>(1);
    let _watcher = watch::watch(&config.spec, tx).map_err(|e| anyhow::anyhow!("cannot watch the spec: {e}"))?;
    let (link_tx, mut link_rx) = mpsc::channel::<()>(1);
    let link_thread = watch::watch_links(shared.clone(), link_tx, flow_stop.clone());
    let reconciler = Arc::new(Mutex::new(Reconciler {
        shared: shared.clone(),
        kernel: None,
        last_good: None,
        seen_digest: None,
        applied_digest: None,
        lock: None,
    }));
    let run_once = |trigger: Trigger| {
        let r = reconciler.clone();
        async move {
            tokio::task::spawn_blocking(move || reconcile_catching_panics(&r, trigger)).await.unwrap_or(Outcome::Retry)
        }
    };

    tokio::pin!(shutdown);
    let mut resync = tokio::time::interval(config.resync);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    resync.tick().await; // the first tick is now: the start reconcile below covers it
    let mut backoff = Duration::from_millis(100);
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut outcome = run_once(Trigger::Start).await;
    loop {
        match outcome {
            Outcome::Retry | Outcome::NotReady if retry_at.is_none() => {
                retry_at = Some(tokio::time::Instant::now() + backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Outcome::Failed if retry_at.is_none() => {
                backoff = (backoff * 2).max(PERMANENT_FIRST_BACKOFF).min(MAX_BACKOFF);
                retry_at = Some(tokio::time::Instant::now() + backoff);
            }
            Outcome::Applied | Outcome::NoChange => {
                backoff = Duration::from_millis(100);
                retry_at = None;
            }
            _ => {}
        }
        let trigger = tokio::select! {
            _ = &mut shutdown => break,
            Some(()) = rx.recv() => {
                // Debounce: wait until the directory has been quiet a while.
                loop {
                    tokio::select! {
                        Some(()) = rx.recv() => continue,
                        _ = tokio::time::sleep(config.debounce) => break,
                    }
                }
                backoff = Duration::from_millis(100);
                retry_at = None;
                Trigger::SpecChanged
            }
            Some(()) = link_rx.recv() => {
                // Interfaces come up in bursts (a veth pair, its settings).
                tokio::time::sleep(config.debounce).await;
                while link_rx.try_recv().is_ok() {}
                Trigger::Interface
            }
            _ = resync.tick() => Trigger::Resync,
            _ = async { tokio::time::sleep_until(retry_at.unwrap()).await }, if retry_at.is_some() => {
                retry_at = None;
                Trigger::Retry
            }
        };
        // While a failure backs off, resyncs wait for the retry (spec edits
        // and interface events do not): a failing repair is retried at the
        // backoff's pace, not at every tick.
        if trigger == Trigger::Resync && retry_at.is_some() {
            continue;
        }
        outcome = run_once(trigger).await;
        if trigger == Trigger::SpecChanged && outcome == Outcome::NotReady {
            retry_at = None;
        }
    }
    tracing::info!("agent stopping; the datapath keeps running");
    http.abort();
    flow_stop.store(true, Ordering::Relaxed);
    tokio::task::spawn_blocking(move || {
        for t in flow_threads.into_iter().chain(link_thread) {
            let _ = t.join();
        }
    })
    .await?;
    Ok(())
}

/// Starts the flow reader and the export threads.
fn start_flows(
    config: &AgentConfig,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<(Arc<FlowHub>, Vec<std::thread::JoinHandle<()>>)> {
    let o = &config.flows;
    let mut sinks: Vec<(Arc<ExportQueue>, Box<dyn Sink>)> = Vec::new();
    if let Some(path) = &o.export_file {
        let sink = FileSink::new(path.clone(), o.file_max_bytes, o.file_keep)
            .map_err(|e| anyhow::anyhow!("cannot open the flow export file `{}`: {e}", path.display()))?;
        sinks.push((Arc::new(ExportQueue::new("file", o.export_buffer)), Box::new(sink)));
    }
    if let Some(url) = &o.export_http {
        let sink = HttpSink::new(url).map_err(|e| anyhow::anyhow!(e))?;
        sinks.push((Arc::new(ExportQueue::new("http", o.export_buffer)), Box::new(sink)));
    }
    let hub = Arc::new(FlowHub::new(o.history, sinks.iter().map(|(q, _)| q.clone()).collect()));
    let mut threads = Vec::new();
    for (queue, sink) in sinks {
        threads.push(export::spawn(queue, sink, o.export.clone(), stop.clone()));
    }
    threads.push(reader::spawn(config.ctx.bpffs_root.clone(), hub.clone(), stop.clone()));
    Ok((hub, threads))
}

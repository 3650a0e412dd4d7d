//! `bpfsync agent`: keeps the node equal to a spec file, continuously.
//!
//! Wiring only: a file watch (notify) and an rtnetlink watch feed the
//! [`driver`] (debounce, periodic resync, backoff after any failure), which
//! runs the [`reconciler`] (the engine for the last good spec) on a
//! blocking thread, catching panics; the flow reader and exporters; and one
//! HTTP listener for `/metrics`, `/healthz`, `/readyz`, `/status` and
//! `/flows`. The agent holds the node lock for as long as it runs.
//!
//! Stopping the agent leaves the datapath running (everything is pinned).
//! A new agent adopts what is there: it prunes nothing before the spec has
//! been loaded and the kernel observed, and an unchanged object is never
//! reloaded. A spec that fails validation, or a deleted spec file, keeps
//! the last good state running.

pub mod driver;
mod heal;
pub mod heal_events;
mod http;
pub mod metrics;
pub mod reconciler;
mod watch;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::applied::Context;
use crate::apply::error_chain;
use crate::apply::lock::NodeLock;
use crate::flows::export::{self, ExportPolicy, ExportQueue, FileSink, HttpSink, Sink};
use crate::flows::hub::FlowHub;
use crate::flows::otlp::{OtlpSink, Resource};
use crate::flows::reader;
use crate::kernel::real::RealKernel;
use metrics::Metrics;
pub use reconciler::{KernelOpener, Outcome, Reconciler, Trigger, reconcile_catching_panics};

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
    /// bpfsync's JSON or Hubble's `jsonpb` in the export file.
    pub file_format: crate::flows::export::FileFormat,
    /// `http://host:port/path` collector that receives JSON lines by POST.
    pub export_http: Option<String>,
    /// OpenTelemetry collector (OTLP/HTTP, JSON) that receives log records.
    pub export_otlp: Option<String>,
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
            file_format: crate::flows::export::FileFormat::Json,
            export_http: None,
            export_otlp: None,
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
    /// Routes with fallback hops of the last good spec, for the heal loop.
    pub heal_routes: Arc<crate::heal::runner::RoutesCell>,
    /// What the heal loop shows (`/status`, `/proposals`).
    pub heal: Mutex<crate::heal::runner::HealSnapshot>,
}

impl Shared {
    pub fn new(config: AgentConfig, flows: Arc<FlowHub>) -> Shared {
        Shared {
            state: Mutex::default(),
            metrics: Metrics::new(config.ctx.bpffs_root.clone(), flows.clone()),
            config,
            flows,
            watched_interfaces: Mutex::default(),
            heal_routes: Arc::default(),
            heal: Mutex::default(),
        }
    }

    /// A watched route's hops with their roles (`primary`, `fallback[i]`).
    pub fn heal_routes_of(&self, prefix: &str) -> Vec<(String, crate::heal::proposal::HopId)> {
        let (_, routes) = self.heal_routes.get();
        routes
            .iter()
            .filter(|w| w.route.prefix == prefix)
            .flat_map(|w| {
                std::iter::once(("primary".to_string(), w.primary()))
                    .chain(w.fallbacks().into_iter().enumerate().map(|(i, h)| (format!("fallback[{i}]"), h)))
            })
            .collect()
    }

    /// The routes the heal loop watches, from a newly loaded spec.
    pub fn set_heal_spec(&self, routes: Vec<crate::heal::controller::WatchedRoute>) {
        self.heal_routes.set(routes);
    }

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

    /// Every proposal and the heal loop's view (`GET /proposals`).
    fn proposals_json(&self) -> Value {
        let store = crate::heal::store::Store::new(&self.config.ctx.state_dir);
        let heal = self.heal.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        match store.list() {
            Ok(l) => json!({ "proposals": l.proposals, "set-aside": l.set_aside, "heal": heal }),
            Err(e) => json!({ "error": error_chain(&e), "heal": heal }),
        }
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
        v["heal"] = serde_json::to_value(&*self.heal.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
            .unwrap_or_default();
        v
    }
}

pub(crate) fn now_unix() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
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

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot listen on `{addr}`")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot watch the spec `{path}`")]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
    #[error("cannot open the flow export file `{path}`")]
    ExportFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    ExportUrl(String),
}

/// Runs the agent until `shutdown` completes. `on_listen` learns the bound
/// address (useful with port 0).
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()>,
    on_listen: impl FnOnce(SocketAddr),
) -> Result<(), AgentError> {
    raise_descriptor_limit();
    let listen_failed = |source| AgentError::Listen { addr: config.listen, source };
    let listener = tokio::net::TcpListener::bind(config.listen).await.map_err(listen_failed)?;
    let addr = listener.local_addr().map_err(listen_failed)?;
    let flow_stop = Arc::new(AtomicBool::new(false));
    let (hub, flow_threads) = start_flows(&config, &flow_stop)?;
    on_listen(addr);
    tracing::info!(%addr, spec = %config.spec.display(), "agent listening");
    let shared = Arc::new(Shared::new(config.clone(), hub));
    shared.state().listen = Some(addr);
    let http = tokio::spawn(http::serve(listener, shared.clone()));

    let (tx, spec_rx) = mpsc::channel::<()>(1);
    let _watcher =
        watch::watch(&config.spec, tx).map_err(|source| AgentError::Watch { path: config.spec.clone(), source })?;
    let (link_tx, link_rx) = mpsc::channel::<()>(1);
    let link_thread = watch::watch_links(shared.clone(), link_tx, flow_stop.clone());
    let (overlay_tx, overlay_rx) = mpsc::channel::<()>(1);
    let observer = heal::AgentObserver { shared: shared.clone(), overlay: overlay_tx };
    let delivery = heal::KernelDelivery { bpffs_root: config.ctx.bpffs_root.clone() };
    let runner =
        crate::heal::runner::Runner::new(&config.ctx.state_dir, shared.heal_routes.clone(), Box::new(observer))
            .with_delivery_counters(Box::new(delivery));
    let heal_stop = flow_stop.clone();
    let heal_thread = std::thread::Builder::new()
        .name("bpfsync-heal".into())
        .spawn(move || runner.run(heal_stop))
        .map_err(|e| tracing::error!(error = %e, "cannot start the heal loop"))
        .ok();
    let ctx = config.ctx.clone();
    let open: KernelOpener<RealKernel> = Box::new(move || {
        let k = RealKernel::open(&ctx.bpffs_root)?;
        let lock = NodeLock::acquire(k.root(), &ctx.state_dir, "agent")?;
        Ok((k, Some(lock)))
    });
    let reconciler = Arc::new(Mutex::new(Reconciler::new(shared.clone(), open)));
    let run_once = |trigger: Trigger| {
        let r = reconciler.clone();
        async move {
            tokio::task::spawn_blocking(move || reconcile_catching_panics(&r, trigger)).await.unwrap_or(Outcome::Retry)
        }
    };
    let timing = driver::Timing { resync: config.resync, debounce: config.debounce };
    driver::drive(
        run_once,
        driver::Hints { spec: spec_rx, interfaces: link_rx, overlay: overlay_rx },
        timing,
        shutdown,
    )
    .await;
    tracing::info!("agent stopping; the datapath keeps running");
    http.abort();
    flow_stop.store(true, Ordering::Relaxed);
    let _ = tokio::task::spawn_blocking(move || {
        for t in flow_threads.into_iter().chain(link_thread).chain(heal_thread) {
            let _ = t.join();
        }
    })
    .await;
    Ok(())
}

/// Starts the flow reader and the export threads.
fn start_flows(
    config: &AgentConfig,
    stop: &Arc<AtomicBool>,
) -> Result<(Arc<FlowHub>, Vec<std::thread::JoinHandle<()>>), AgentError> {
    let o = &config.flows;
    let mut sinks: Vec<(Arc<ExportQueue>, Box<dyn Sink>)> = Vec::new();
    if let Some(path) = &o.export_file {
        let sink = FileSink::with_format(path.clone(), o.file_max_bytes, o.file_keep, o.file_format.clone())
            .map_err(|source| AgentError::ExportFile { path: path.clone(), source })?;
        sinks.push((Arc::new(ExportQueue::new("file", o.export_buffer)), Box::new(sink)));
    }
    if let Some(url) = &o.export_http {
        let sink = HttpSink::new(url).map_err(AgentError::ExportUrl)?;
        sinks.push((Arc::new(ExportQueue::new("http", o.export_buffer)), Box::new(sink)));
    }
    let mut threads = Vec::new();
    if let Some(endpoint) = &o.export_otlp {
        let sink = OtlpSink::new(endpoint, Resource::this_node()).map_err(AgentError::ExportUrl)?;
        sinks.push((Arc::new(ExportQueue::new("otlp", o.export_buffer)), Box::new(sink)));
        // Self-healing events go the same way, from the heal store's history.
        let events = OtlpSink::new(endpoint, Resource::this_node()).map_err(AgentError::ExportUrl)?;
        let store = crate::heal::store::Store::new(&config.ctx.state_dir);
        threads.push(heal_events::spawn(store, events, stop.clone()));
    }
    let hub = Arc::new(FlowHub::new(o.history, sinks.iter().map(|(q, _)| q.clone()).collect()));
    for (queue, sink) in sinks {
        threads.push(export::spawn(queue, sink, o.export.clone(), stop.clone()));
    }
    threads.push(reader::spawn(config.ctx.bpffs_root.clone(), hub.clone(), stop.clone()));
    Ok((hub, threads))
}

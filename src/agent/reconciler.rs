//! One reconcile of the agent: read the spec file (a new valid version
//! becomes the last good one), run the engine for the last good spec,
//! keep the agent's state and metrics. Holds no loop: [`super::driver`]
//! decides when it runs.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::metrics::KindLabel;
use super::{Shared, now_unix};
use crate::applied;
use crate::apply::journal::FileJournal;
use crate::apply::lock::NodeLock;
use crate::apply::{Retry, error_chain, scope_for};
use crate::compile::{Desired, ObjectLoader, load_and_compile};
use crate::engine;
use crate::kernel::Kernel;
use crate::plan;

/// Why a reconcile runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Start,
    SpecChanged,
    Resync,
    Retry,
    /// An interface the spec names appeared, went or changed.
    Interface,
    /// The heal loop changed the overlay.
    Overlay,
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
    /// A failure the kernel will likely repeat (a refused program): retried
    /// too, starting at a longer backoff (5 s), so a condition that clears
    /// is repaired without a restart.
    Failed,
    /// Nothing to do (a hint without a change).
    Skipped,
}

struct LastGood {
    digest: String,
    desired: Desired,
    /// The last-applied record for this spec, staged in the state directory.
    staged: PathBuf,
}

/// Opens the kernel the reconciler works on, with the node lock it holds
/// from then on (None for kernels without one, in tests).
pub type KernelOpener<K> = Box<dyn FnMut() -> Result<(K, Option<NodeLock>), OpenError> + Send>;

/// Why the kernel could not be opened (or locked): retried with backoff.
pub type OpenError = Box<dyn std::error::Error + Send + Sync>;

/// Why a reconcile failed, typed until it is shown.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("cannot open the kernel")]
    Open(#[source] OpenError),
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
}

impl ReconcileError {
    /// Whether it may pass: the first retry comes soon, not after seconds.
    pub fn is_retryable(&self) -> bool {
        match self {
            ReconcileError::Open(_) => true,
            ReconcileError::Engine(e) => e.is_retryable(),
        }
    }
}

/// The reconcile state machine, run on a blocking thread. Generic over the
/// [`Kernel`] trait: the agent runs it on the real kernel, tests in-process
/// on the in-memory one.
pub struct Reconciler<K: Kernel> {
    shared: Arc<Shared>,
    open: KernelOpener<K>,
    kernel: Option<K>,
    last_good: Option<LastGood>,
    /// Digest of the last spec text seen (valid or not).
    seen_digest: Option<String>,
    /// Digest of the spec last applied successfully: a later non-empty plan
    /// for the same spec is drift.
    applied_digest: Option<String>,
    lock: Option<NodeLock>,
}

impl<K: Kernel> Reconciler<K> {
    pub fn new(shared: Arc<Shared>, open: KernelOpener<K>) -> Self {
        Reconciler { shared, open, kernel: None, last_good: None, seen_digest: None, applied_digest: None, lock: None }
    }

    /// Opens the kernel and takes the node lock, held from then on: no CLI
    /// write runs beside the agent. A busy lock is retried with backoff.
    fn kernel(&mut self) -> Result<&mut K, ReconcileError> {
        if self.kernel.is_none() {
            let (k, lock) = (self.open)().map_err(ReconcileError::Open)?;
            self.lock = lock;
            self.kernel = Some(k);
        }
        Ok(self.kernel.as_mut().expect("opened above"))
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
        let ctx = &self.shared.config.ctx;
        // The overlay is part of what runs: an approval or a revert is a
        // new version as much as an edit of the file.
        let store = crate::heal::store::Store::new(&ctx.state_dir);
        let overlay = match store.overlay() {
            Ok(o) => o,
            Err(e) => {
                let msg = format!("cannot read the proposals: {}; keeping the last good state", error_chain(&e));
                tracing::warn!("{msg}");
                self.shared.state().spec_error = Some(msg);
                self.seen_digest = None;
                return None;
            }
        };
        let digest = crate::heal::overlay_digest(&crate::object::digest(text.as_bytes()), &overlay);
        if self.seen_digest.as_deref() == Some(digest.as_str()) {
            return None;
        }
        self.seen_digest = Some(digest.clone());
        // Parsing a big spec takes ~40x the memory of its compiled state:
        // keep only the compiled state (the last-applied record is staged on
        // disk) and give the rest back.
        let compiled = (|| -> Result<(Desired, PathBuf), String> {
            let (loaded, desired) =
                load_and_compile(path, &text, &overlay, &mut ObjectLoader::default()).map_err(|d| d.to_string())?;
            let superseded = crate::heal::supersede(&store, &loaded.overlay, "agent");
            self.shared.metrics.heal.overlay_superseded.inc_by(superseded as u64);
            self.shared.set_heal_spec(crate::heal::controller::watched_routes(&loaded));
            self.shared.metrics.overlay_entries.set(loaded.overlay.applied.len() as i64);
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

    pub fn reconcile(&mut self, trigger: Trigger) -> Outcome {
        crate::fault::point("reconcile");
        let started = Instant::now();
        let refreshed = self.refresh_spec();
        if matches!(trigger, Trigger::SpecChanged | Trigger::Overlay) && refreshed.is_none() {
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
            Err(e) => {
                let (msg, retryable) = (error_chain(&e), e.is_retryable());
                tracing::error!(error = %msg, retryable, "reconcile failed");
                st.last_error = Some(msg);
                if retryable { Outcome::Retry } else { Outcome::Failed }
            }
        }
    }

    /// The engine's sequence for the last good spec, with the agent's
    /// bookkeeping around it. Returns the number of changes made.
    fn reconcile_with(&mut self, digest: &str) -> Result<usize, ReconcileError> {
        let ctx = self.shared.config.ctx.clone();
        let mut journal = FileJournal::new(&ctx.state_dir);
        self.kernel()?;
        // Both are there: opened just above, and `reconcile` only calls this
        // with a last good spec.
        let (Some(kernel), Some(good)) = (self.kernel.as_mut(), self.last_good.as_ref()) else { return Ok(0) };
        *self.shared.watched_interfaces.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            scope_for(&good.desired.state).interfaces;
        // Recovery runs before every apply, not only at start: an apply of
        // ours whose rollback failed left its journal.
        let prepared = engine::prepare(kernel, &mut journal, &good.desired, Retry::default())?;
        let p = &prepared.plan;
        let m = &self.shared.metrics;
        m.conflicts.set(p.conflicts.len() as i64);
        for c in &p.conflicts {
            tracing::warn!(hook = %c.hook, pending = c.pending, "conflict: {}", c.message);
        }
        let st = &good.desired.state;
        m.managed_objects.get_or_create(&KindLabel { kind: "program".into() }).set(st.programs.len() as i64);
        m.managed_objects.get_or_create(&KindLabel { kind: "attachment".into() }).set(st.attachments.len() as i64);
        let entries: usize = st.maps.values().filter(|x| x.managed).map(|x| x.entries.len()).sum();
        m.managed_objects.get_or_create(&KindLabel { kind: "map_entry".into() }).set(entries as i64);
        if p.is_empty() && p.errors.is_empty() {
            if self.applied_digest.as_deref() != Some(digest) {
                let _ = applied::commit(&ctx, &good.staged);
                self.applied_digest = Some(digest.to_string());
            }
            return Ok(0);
        }
        let drift = self.applied_digest.as_deref() == Some(digest);
        let shown = p.changes.iter().filter(|c| c.part_of.is_none()).count();
        if drift {
            for c in p.changes.iter().filter(|c| c.part_of.is_none()) {
                let kind = format!("{}-{}", kind_name(c.kind), action_name(c.action));
                tracing::warn!(object = %c.address, kind = %kind, "repairing drift: {}", c.reason);
                m.drift_repairs.get_or_create(&KindLabel { kind }).inc();
            }
        }
        let s = p.summary();
        tracing::info!(add = s.add, change = s.change, destroy = s.destroy, drift, "applying plan");
        let report = engine::execute(kernel, &mut journal, &good.desired, &prepared, Retry::default())?;
        tracing::info!(steps = report.steps, kernel_writes = report.kernel_writes, "applied");
        if self.applied_digest.as_deref() != Some(digest) {
            let _ = applied::commit(&ctx, &good.staged);
        }
        self.applied_digest = Some(digest.to_string());
        Ok(shown)
    }
}

/// Runs one reconcile; a panic in it is caught, logged with the spec
/// digest, counted (`bpfsync_reconciles_total{result="panic"}`) and retried
/// with backoff like any failure. The reconciler forgets the spec text it
/// saw, so the next run reads and compiles it again; no lock stays poisoned.
pub fn reconcile_catching_panics<K: Kernel>(r: &Mutex<Reconciler<K>>, trigger: Trigger) -> Outcome {
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

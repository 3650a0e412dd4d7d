//! When the agent reconciles: at start; after a spec edit, once the spec's
//! directory has been quiet for the debounce; after an event on an
//! interface the spec names; at once when the heal loop changed the
//! overlay; at every resync; and after a failure, with
//! exponential backoff (100 ms → 1 min; from 5 s for failures the kernel
//! will likely repeat). While a failure backs off, resyncs wait for the
//! retry. Holds no reconcile logic: it calls `reconcile` with the reason,
//! and reads back an [`Outcome`]. Tests drive it in-process on a paused
//! clock.

use std::future::Future;
use std::time::Duration;

use tokio::sync::mpsc;

use super::reconciler::{Outcome, Trigger};

/// The first wait after a failure that may pass.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait between retries of a failing reconcile.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// The first wait after a failure the kernel will likely repeat.
pub const PERMANENT_FIRST_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub resync: Duration,
    pub debounce: Duration,
}

/// Hints that something changed (each may come many times).
pub struct Hints {
    /// The spec file's directory changed.
    pub spec: mpsc::Receiver<()>,
    /// An interface the spec names appeared, went or changed.
    pub interfaces: mpsc::Receiver<()>,
    /// The overlay changed (a route switched, reverted, or a person
    /// decided a proposal): reconciled at once, no debounce.
    pub overlay: mpsc::Receiver<()>,
}

/// Runs reconciles until `shutdown` completes.
pub async fn drive<F, Fut>(mut reconcile: F, mut hints: Hints, timing: Timing, shutdown: impl Future<Output = ()>)
where
    F: FnMut(Trigger) -> Fut,
    Fut: Future<Output = Outcome>,
{
    tokio::pin!(shutdown);
    let mut resync = tokio::time::interval(timing.resync);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    resync.tick().await; // the first tick is now: the start reconcile below covers it
    let mut backoff = FIRST_BACKOFF;
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut outcome = reconcile(Trigger::Start).await;
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
                backoff = FIRST_BACKOFF;
                retry_at = None;
            }
            _ => {}
        }
        let trigger = tokio::select! {
            _ = &mut shutdown => break,
            Some(()) = hints.spec.recv() => {
                // Debounce: wait until the directory has been quiet a while.
                loop {
                    tokio::select! {
                        Some(()) = hints.spec.recv() => continue,
                        _ = tokio::time::sleep(timing.debounce) => break,
                    }
                }
                backoff = FIRST_BACKOFF;
                retry_at = None;
                Trigger::SpecChanged
            }
            Some(()) = hints.interfaces.recv() => {
                // Interfaces come up in bursts (a veth pair, its settings).
                tokio::time::sleep(timing.debounce).await;
                while hints.interfaces.try_recv().is_ok() {}
                Trigger::Interface
            }
            Some(()) = hints.overlay.recv() => {
                while hints.overlay.try_recv().is_ok() {}
                Trigger::Overlay
            }
            _ = resync.tick() => Trigger::Resync,
            _ = async { if let Some(at) = retry_at { tokio::time::sleep_until(at).await } }, if retry_at.is_some() => {
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
        outcome = reconcile(trigger).await;
        if trigger == Trigger::SpecChanged && outcome == Outcome::NotReady {
            retry_at = None;
        }
    }
}

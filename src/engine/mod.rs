//! The one reconcile sequence: recover → observe → plan → apply → verify,
//! over the [`Kernel`] trait. `apply`, `down`, the demo and the agent all
//! run it, so a fix to the sequence is made (and tested) once.
//!
//! It comes in two halves because a person may stand between them:
//! [`prepare`] rolls back an interrupted apply, observes and plans;
//! [`execute`] applies that plan and verifies it ([`crate::apply`]).
//! [`reconcile`] runs both.

use crate::apply::journal::JournalStore;
use crate::apply::{self, ApplyError, ApplyReport, Retry, scope_for};
use crate::compile::Desired;
use crate::kernel::{Kernel, KernelError};
use crate::model::State;
use crate::plan::{self, Plan};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// An interrupted apply was found and could not be rolled back.
    #[error(transparent)]
    Recover(ApplyError),
    #[error("failed to observe the kernel")]
    Observe(#[source] KernelError),
    #[error(transparent)]
    Apply(ApplyError),
}

impl EngineError {
    /// Whether running the sequence again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            // Lookups that could not be made (EMFILE, ENOMEM) pass; a root
            // that is not on bpffs does not.
            EngineError::Observe(e) => !matches!(e, KernelError::Unsupported { .. }),
            EngineError::Apply(ApplyError::RolledBack { cause, .. }) => cause.is_retryable(),
            EngineError::Apply(ApplyError::Refused { .. }) => false,
            // Verification, journal and rollback failures pass, or are
            // finished by the next run's recovery.
            EngineError::Apply(_) | EngineError::Recover(_) => true,
        }
    }
}

/// What [`prepare`] found: the plan and what it was made from.
#[derive(Debug)]
pub struct Prepared {
    /// Steps of an interrupted earlier apply that were rolled back first.
    pub recovered: usize,
    pub observed: State,
    pub plan: Plan,
}

/// What a whole reconcile did.
#[derive(Debug)]
pub struct Reconciled {
    pub prepared: Prepared,
    /// None when there was nothing to apply.
    pub report: Option<ApplyReport>,
}

/// Rolls back an interrupted apply, observes what `desired` needs, plans.
/// Changes the kernel only to finish a rollback.
pub fn prepare<K: Kernel + ?Sized>(
    kernel: &mut K,
    journal: &mut dyn JournalStore,
    desired: &Desired,
    retry: Retry,
) -> Result<Prepared, EngineError> {
    let recovered = apply::recover(kernel, journal, retry).map_err(EngineError::Recover)?;
    if recovered > 0 {
        tracing::warn!(steps = recovered, "rolled back an interrupted apply");
    }
    let observed = kernel.observe(&scope_for(&desired.state)).map_err(EngineError::Observe)?;
    let plan = plan::plan(&desired.state, &observed);
    Ok(Prepared { recovered, observed, plan })
}

/// Applies a prepared plan, journaled, and verifies it; any failure rolls
/// back. A plan with errors is refused before anything is touched (by
/// [`apply::apply`]).
pub fn execute<K: Kernel + ?Sized>(
    kernel: &mut K,
    journal: &mut dyn JournalStore,
    desired: &Desired,
    prepared: &Prepared,
    retry: Retry,
) -> Result<ApplyReport, EngineError> {
    let report = apply::apply(kernel, &prepared.plan, desired, &prepared.observed, journal, retry)
        .map_err(EngineError::Apply)?;
    prune_counters(kernel, desired);
    Ok(report)
}

/// Deletes the datapath's counters of rules and routes the applied tables
/// no longer hold ([`crate::model::NodeFacts::counter_ids`]): the datapath
/// makes them on a rule's or route's first packet, and without pruning a
/// counter map fills (65,536 ids) and new rules go uncounted. Best effort:
/// counters are not desired state; a failure is logged, and the next apply
/// tries again.
fn prune_counters<K: Kernel + ?Sized>(kernel: &mut K, desired: &Desired) {
    let Some(mesh) = &desired.state.mesh else { return };
    let live = mesh.0.counter_ids();
    let scope =
        crate::kernel::Scope { map_names: live.iter().map(|(m, _)| m.map.clone()).collect(), ..Default::default() };
    let observed = match kernel.observe(&scope) {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!(error = %crate::apply::error_chain(&e), "cannot read the rule and route counters to prune them");
            return;
        }
    };
    for (map, ids) in live {
        let Some(m) = observed.maps.get(&map) else { continue };
        let stale: Vec<Vec<u8>> = m
            .entries
            .iter()
            .filter(|(k, _)| {
                k.get(..4).and_then(|b| b.try_into().ok()).is_some_and(|b| !ids.contains(&u32::from_ne_bytes(b)))
            })
            .map(|(k, _)| k.to_vec())
            .collect();
        if stale.is_empty() {
            continue;
        }
        match kernel.delete_entries(&map, &stale) {
            Ok(()) => {
                tracing::debug!(map = %map, entries = stale.len(), "pruned the counters of rules or routes that are gone")
            }
            Err(e) => tracing::warn!(map = %map, error = %crate::apply::error_chain(&e), "cannot prune counters"),
        }
    }
}
/// [`prepare`], then [`execute`] when there is something to do.
pub fn reconcile<K: Kernel + ?Sized>(
    kernel: &mut K,
    journal: &mut dyn JournalStore,
    desired: &Desired,
    retry: Retry,
) -> Result<Reconciled, EngineError> {
    let prepared = prepare(kernel, journal, desired, retry)?;
    // A plan with errors goes to `execute` too, which refuses it.
    let nothing_to_do = prepared.plan.is_empty() && prepared.plan.errors.is_empty();
    let report = if nothing_to_do { None } else { Some(execute(kernel, journal, desired, &prepared, retry)?) };
    Ok(Reconciled { prepared, report })
}

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
    apply::apply(kernel, &prepared.plan, desired, &prepared.observed, journal, retry).map_err(EngineError::Apply)
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

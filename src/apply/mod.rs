//! The executor: runs a plan against a [`Kernel`], in order, journaled,
//! undoable, and verified by observing again.
//!
//! Every step's undo is computed from the observed state before the first
//! step runs. On a failure the undos of the steps that ran are replayed
//! newest first; a failed rollback is reported beside the original error.

pub mod journal;
pub mod lock;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::compile::Desired;
use crate::kernel::{Kernel, KernelError, LoadRequest, Scope};
use crate::model::{ForeignProgram, Hook, MapRef, State};
use crate::plan::{self, Op, Plan};
use crate::spec::XdpMode;
use journal::{JournalStep, JournalStore};

/// One kernel operation, forward or undo. Undo operations are written to
/// the journal, so they carry plain data (bytes as hex).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum KernelOp {
    LoadProgram {
        program: String,
        digest: String,
        fresh_maps: Vec<String>,
    },
    UnloadProgram {
        program: String,
        digest: String,
    },
    RestoreProgram {
        program: String,
        digest: String,
    },
    DiscardProgram {
        program: String,
        digest: String,
    },
    WriteEntries {
        map: MapRef,
        #[serde(with = "hex_pairs")]
        entries: Vec<(Vec<u8>, Vec<u8>)>,
    },
    DeleteEntries {
        map: MapRef,
        #[serde(with = "hex_list")]
        keys: Vec<Vec<u8>>,
    },
    Attach {
        hook: Hook,
        program: String,
        digest: String,
        mode: Option<XdpMode>,
    },
    UpdateLink {
        hook: Hook,
        program: String,
        digest: String,
    },
    Detach {
        hook: Hook,
    },
    Evict {
        foreign: ForeignProgram,
    },
    Unevict {
        foreign: ForeignProgram,
    },
    PinMap {
        map: MapRef,
        id: u32,
    },
    UnpinMap {
        map: MapRef,
    },
    /// Retires the decisions the datapath cached from the tables a step
    /// changed ([`crate::model::NodeFacts::generation`]).
    BumpGeneration {
        map: MapRef,
    },
}

mod hex_list {
    use serde::{Deserialize, Deserializer, Serializer, ser::SerializeSeq};
    pub fn serialize<S: Serializer>(v: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for b in v {
            seq.serialize_element(&crate::codec::hex(b))?;
        }
        seq.end()
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        let v: Vec<String> = Vec::deserialize(d)?;
        v.iter().map(|s| crate::codec::unhex(s).ok_or_else(|| serde::de::Error::custom("bad hex"))).collect()
    }
}

mod hex_pairs {
    use serde::{Deserialize, Deserializer, Serializer, ser::SerializeSeq};
    pub fn serialize<S: Serializer>(v: &[(Vec<u8>, Vec<u8>)], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for (k, val) in v {
            seq.serialize_element(&[crate::codec::hex(k), crate::codec::hex(val)])?;
        }
        seq.end()
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<super::Entries, D::Error> {
        let v: Vec<[String; 2]> = Vec::deserialize(d)?;
        v.iter()
            .map(|[k, val]| match (crate::codec::unhex(k), crate::codec::unhex(val)) {
                (Some(k), Some(val)) => Ok((k, val)),
                _ => Err(serde::de::Error::custom("bad hex")),
            })
            .collect()
    }
}

pub type UndoOp = KernelOp;

/// Map entries as (key, value) byte pairs.
pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// One executor step: forward operations and their undo.
#[derive(Debug, Clone)]
pub struct Step {
    pub what: String,
    pub forward: Vec<KernelOp>,
    pub undo: Vec<KernelOp>,
    /// Entry changes of one map in one batch: later changes of the same
    /// kind to the same map join this step.
    pub batch: Option<Batch>,
}

/// What an entry step batches.
#[derive(Debug, Clone, PartialEq)]
pub enum Batch {
    Writes(MapRef),
    Deletes(MapRef),
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("step {index} ({what}) failed; every earlier step was rolled back, the node is as it was")]
    RolledBack {
        index: usize,
        what: String,
        #[source]
        cause: KernelError,
    },
    #[error(
        "step {index} ({what}) failed: {}; the rollback failed too: {}; the journal is kept: run `bpfsync recover` to retry the rollback",
        error_chain(cause),
        chains(rollback)
    )]
    RollbackFailed { index: usize, what: String, cause: KernelError, rollback: Vec<KernelError> },
    #[error("verification after apply found {count} difference(s) (first: `{first}`); the apply was rolled back")]
    Verify { count: usize, first: String },
    #[error(
        "verification after apply found {count} difference(s) (first: `{first}`), and rolling back failed too: {}; the journal is kept: run `bpfsync recover` to retry the rollback",
        chains(rollback)
    )]
    VerifyRollbackFailed { count: usize, first: String, rollback: Vec<KernelError> },
    #[error("failed to observe the kernel")]
    Observe(#[source] KernelError),
    #[error("failed to write the journal in the state directory")]
    Journal(#[source] std::io::Error),
    #[error("an interrupted apply ({} step(s) started: {}) could not be rolled back: {}; nothing else was changed. `bpfsync recover` retries the rollback; `bpfsync recover --discard` drops the journal and keeps what the kernel runs now, for the next apply to converge from", steps.len(), steps.join(", "), chains(errors))]
    Recovery { errors: Vec<KernelError>, steps: Vec<String> },
    #[error("the plan cannot be applied, nothing was changed: {}", errors.join("; "))]
    Refused { errors: Vec<String> },
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ApplyReport {
    pub steps: usize,
    pub kernel_writes: u64,
    /// Steps of an interrupted earlier apply that were rolled back first.
    pub recovered_steps: usize,
}

/// Retry policy for kernel operations that may succeed later.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    pub attempts: u32,
    pub first_delay: Duration,
    pub max_delay: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry { attempts: 3, first_delay: Duration::from_millis(100), max_delay: Duration::from_secs(60) }
    }
}

impl Retry {
    pub fn none() -> Self {
        Retry { attempts: 1, ..Default::default() }
    }
}

/// Builds the executor steps of a plan: consecutive entry writes (or
/// deletes) of one map become one batched step.
pub fn steps(plan: &Plan, desired: &Desired, observed: &State) -> Vec<Step> {
    let is_array = |map: &MapRef| {
        let shape = desired.state.maps.get(map).and_then(|m| m.shape).or_else(|| observed.maps.get(map)?.shape);
        shape.is_some_and(|s| s.map_type == crate::object::BPF_MAP_TYPE_ARRAY)
    };
    let digest_of = |state: &State, name: &str| state.programs.get(name).map(|p| p.digest.clone()).unwrap_or_default();
    let mut out: Vec<Step> = Vec::new();
    let mut array_of_last: Option<(&MapRef, bool)> = None;
    for c in &plan.changes {
        match &c.op {
            Op::LoadProgram { program, fresh_maps } => {
                let digest = digest_of(&desired.state, program);
                out.push(Step {
                    batch: None,
                    what: format!("load program `{program}`"),
                    forward: vec![KernelOp::LoadProgram {
                        program: program.clone(),
                        digest: digest.clone(),
                        fresh_maps: fresh_maps.clone(),
                    }],
                    undo: vec![KernelOp::DiscardProgram { program: program.clone(), digest }],
                });
            }
            Op::UnloadProgram { program, digest } => out.push(Step {
                batch: None,
                what: format!("unload program `{program}`"),
                forward: vec![KernelOp::UnloadProgram { program: program.clone(), digest: digest.clone() }],
                undo: vec![KernelOp::RestoreProgram { program: program.clone(), digest: digest.clone() }],
            }),
            Op::WriteEntry { map, key, value, old } => {
                // An array holds every index: a new entry is undone by
                // writing zeroes back (arrays refuse deletes with EINVAL).
                // (Whether a map is an array is asked once per run of its
                // entries, not per entry: a 100,000-entry plan is one run.)
                let array = match array_of_last {
                    Some((m, a)) if m == map => a,
                    _ => {
                        let a = is_array(map);
                        array_of_last = Some((map, a));
                        a
                    }
                };
                let old = match old {
                    None if array => Some(vec![0u8; value.len()]),
                    other => other.clone(),
                };
                push_entry_write(&mut out, map, key, value, old);
            }
            Op::DeleteEntry { map, key, old, zero } => push_entry_delete(&mut out, map, key, old, *zero),
            Op::Attach { hook, program, mode, evict } => {
                for f in evict {
                    out.push(Step {
                        batch: None,
                        what: format!("evict foreign program `{}` from `{hook}`", f.program_name),
                        forward: vec![KernelOp::Evict { foreign: f.clone() }],
                        undo: vec![KernelOp::Unevict { foreign: f.clone() }],
                    });
                }
                let digest = digest_of(&desired.state, program);
                out.push(Step {
                    batch: None,
                    what: format!("attach `{program}` to `{hook}`"),
                    forward: vec![KernelOp::Attach {
                        hook: hook.clone(),
                        program: program.clone(),
                        digest,
                        mode: *mode,
                    }],
                    undo: vec![KernelOp::Detach { hook: hook.clone() }],
                });
            }
            Op::Evict { hook, foreign } => out.push(Step {
                batch: None,
                what: format!("evict foreign program `{}` from `{hook}`", foreign.program_name),
                forward: vec![KernelOp::Evict { foreign: foreign.clone() }],
                undo: vec![KernelOp::Unevict { foreign: foreign.clone() }],
            }),
            Op::UpdateLink { hook, from, to } => out.push(Step {
                batch: None,
                what: format!("update the link on `{hook}` to `{to}`"),
                forward: vec![KernelOp::UpdateLink {
                    hook: hook.clone(),
                    program: to.clone(),
                    digest: digest_of(&desired.state, to),
                }],
                undo: vec![KernelOp::UpdateLink {
                    hook: hook.clone(),
                    program: from.clone(),
                    digest: digest_of(observed, from),
                }],
            }),
            Op::Reattach { hook, program, from_mode, to_mode, old_program } => {
                let old_digest = digest_of(observed, old_program);
                let defunct = observed.attachments.get(hook).is_some_and(|a| a.defunct);
                out.push(Step {
                    batch: None,
                    what: format!("detach `{hook}` to re-attach it"),
                    forward: vec![KernelOp::Detach { hook: hook.clone() }],
                    undo: if defunct {
                        vec![]
                    } else {
                        vec![KernelOp::Attach {
                            hook: hook.clone(),
                            program: old_program.clone(),
                            digest: old_digest,
                            mode: *from_mode,
                        }]
                    },
                });
                out.push(Step {
                    batch: None,
                    what: format!("attach `{program}` to `{hook}`"),
                    forward: vec![KernelOp::Attach {
                        hook: hook.clone(),
                        program: program.clone(),
                        digest: digest_of(&desired.state, program),
                        mode: *to_mode,
                    }],
                    undo: vec![KernelOp::Detach { hook: hook.clone() }],
                });
            }
            Op::PinMap { map, id } => out.push(Step {
                batch: None,
                what: format!("pin map `{map}` again"),
                forward: vec![KernelOp::PinMap { map: map.clone(), id: *id }],
                undo: vec![KernelOp::UnpinMap { map: map.clone() }],
            }),
            Op::Detach { hook, program, mode, defunct } => out.push(Step {
                batch: None,
                what: format!("detach `{hook}`"),
                forward: vec![KernelOp::Detach { hook: hook.clone() }],
                undo: if *defunct {
                    vec![]
                } else {
                    vec![KernelOp::Attach {
                        hook: hook.clone(),
                        program: program.clone(),
                        digest: digest_of(observed, program),
                        mode: *mode,
                    }]
                },
            }),
        }
    }
    add_generation_bumps(&mut out, desired);
    // Empty undo halves of entry steps are dropped.
    for s in &mut out {
        s.undo.retain(|op| match op {
            KernelOp::WriteEntries { entries, .. } => !entries.is_empty(),
            KernelOp::DeleteEntries { keys, .. } => !keys.is_empty(),
            _ => true,
        });
    }
    out
}

/// After every step that writes or deletes entries of a table the datapath
/// caches decisions from, and after its undo, the generation is bumped: a
/// decision cached from the tables before (or during) the step is never
/// used after it. In the undo too, because a rollback — also one by the
/// next start's recovery, after a kill between the write and the bump —
/// changes the tables again.
fn add_generation_bumps(steps: &mut [Step], desired: &Desired) {
    let Some((generation, guarded)) = desired.state.mesh.as_ref().and_then(|m| m.0.generation()) else { return };
    for s in steps {
        let (Some(Batch::Writes(map)) | Some(Batch::Deletes(map))) = &s.batch else { continue };
        if guarded.contains(map) {
            s.forward.push(KernelOp::BumpGeneration { map: generation.clone() });
            s.undo.push(KernelOp::BumpGeneration { map: generation.clone() });
        }
    }
}

/// Adds one entry write to the current write batch of `map`, or starts one.
/// The undo deletes keys that were new and writes back old values.
fn push_entry_write(out: &mut Vec<Step>, map: &MapRef, key: &[u8], value: &[u8], old: Option<Vec<u8>>) {
    if !matches!(out.last(), Some(Step { batch: Some(Batch::Writes(m)), .. }) if m == map) {
        let batch = Some(Batch::Writes(map.clone()));
        out.push(Step {
            what: format!("write entries of map `{map}`"),
            forward: vec![KernelOp::WriteEntries { map: map.clone(), entries: vec![] }],
            undo: vec![
                KernelOp::DeleteEntries { map: map.clone(), keys: vec![] },
                KernelOp::WriteEntries { map: map.clone(), entries: vec![] },
            ],
            batch,
        });
    }
    let Some(step) = out.last_mut() else { return };
    if let [KernelOp::WriteEntries { entries, .. }] = step.forward.as_mut_slice() {
        entries.push((key.to_vec(), value.to_vec()));
    }
    match (old, step.undo.as_mut_slice()) {
        (None, [KernelOp::DeleteEntries { keys, .. }, _]) => keys.push(key.to_vec()),
        (Some(o), [_, KernelOp::WriteEntries { entries, .. }]) => entries.push((key.to_vec(), o)),
        _ => {}
    }
}

/// Adds one entry removal to the current delete batch of `map`, or starts
/// one. Array entries are zeroed instead (arrays hold every index). The
/// undo writes the old values back.
fn push_entry_delete(out: &mut Vec<Step>, map: &MapRef, key: &[u8], old: &[u8], zero: bool) {
    if !matches!(out.last(), Some(Step { batch: Some(Batch::Deletes(m)), .. }) if m == map) {
        let batch = Some(Batch::Deletes(map.clone()));
        let forward = if zero {
            KernelOp::WriteEntries { map: map.clone(), entries: vec![] }
        } else {
            KernelOp::DeleteEntries { map: map.clone(), keys: vec![] }
        };
        out.push(Step {
            what: format!("delete entries of map `{map}`"),
            forward: vec![forward],
            undo: vec![KernelOp::WriteEntries { map: map.clone(), entries: vec![] }],
            batch,
        });
    }
    let Some(step) = out.last_mut() else { return };
    match step.forward.as_mut_slice() {
        [KernelOp::WriteEntries { entries, .. }] => entries.push((key.to_vec(), vec![0; old.len()])),
        [KernelOp::DeleteEntries { keys, .. }] => keys.push(key.to_vec()),
        _ => {}
    }
    if let [KernelOp::WriteEntries { entries, .. }] = step.undo.as_mut_slice() {
        entries.push((key.to_vec(), old.to_vec()));
    }
}

fn run_op<K: Kernel + ?Sized>(k: &mut K, op: &KernelOp, desired: Option<&Desired>) -> Result<(), KernelError> {
    match op {
        KernelOp::LoadProgram { program, digest, fresh_maps } => {
            let desired =
                desired.ok_or_else(|| KernelError::NotFound { what: "no desired state to load from".into() })?;
            let p = desired
                .state
                .programs
                .get(program)
                .ok_or_else(|| KernelError::NotFound { what: format!("program `{program}` is not desired") })?;
            let bytes = desired
                .objects
                .get(program)
                .cloned()
                .ok_or_else(|| KernelError::NotFound { what: format!("no object for `{program}`") })?;
            k.load_program(&LoadRequest {
                name: program.clone(),
                digest: digest.clone(),
                function: p.function.clone(),
                program_type: p.program_type,
                bytes,
                map_owner: p.map_owner().to_string(),
                fresh_maps: fresh_maps.clone(),
            })
        }
        KernelOp::UnloadProgram { program, digest } => k.unload_program(program, digest),
        KernelOp::RestoreProgram { program, digest } => k.restore_program(program, digest),
        KernelOp::DiscardProgram { program, digest } => k.discard_program(program, digest),
        KernelOp::WriteEntries { map, entries } => k.write_entries(map, entries),
        KernelOp::DeleteEntries { map, keys } => k.delete_entries(map, keys),
        KernelOp::Attach { hook, program, digest, mode } => k.attach(hook, program, digest, *mode),
        KernelOp::UpdateLink { hook, program, digest } => k.update_link(hook, program, digest),
        KernelOp::Detach { hook } => k.detach(hook),
        KernelOp::Evict { foreign } => k.evict(foreign),
        KernelOp::Unevict { foreign } => k.unevict(foreign),
        KernelOp::PinMap { map, id } => k.pin_map(map, *id),
        KernelOp::UnpinMap { map } => k.unpin_map(map),
        KernelOp::BumpGeneration { map } => k.bump_generation(map),
    }
}

fn with_retry<K: Kernel + ?Sized>(
    k: &mut K,
    op: &KernelOp,
    desired: Option<&Desired>,
    retry: Retry,
) -> Result<(), KernelError> {
    let mut delay = retry.first_delay;
    let mut attempt = 1;
    loop {
        match run_op(k, op, desired) {
            Err(e) if e.is_retryable() && attempt < retry.attempts => {
                tracing::warn!(error = %e, attempt, "kernel operation failed, retrying");
                std::thread::sleep(delay);
                delay = (delay * 2).min(retry.max_delay);
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Replays undos newest first; returns what failed.
fn roll_back<K: Kernel + ?Sized>(k: &mut K, undos: &[Vec<KernelOp>], retry: Retry) -> Vec<KernelError> {
    let mut errors = Vec::new();
    for ops in undos.iter().rev() {
        for op in ops {
            match with_retry(k, op, None, retry) {
                Ok(()) => {}
                // A map that is gone has no entries to put back (the step
                // failed to open it, or its pin was removed meanwhile).
                Err(e @ KernelError::NotFound { .. })
                    if matches!(
                        op,
                        KernelOp::WriteEntries { .. }
                            | KernelOp::DeleteEntries { .. }
                            | KernelOp::BumpGeneration { .. }
                    ) =>
                {
                    tracing::warn!(error = %e, "nothing to undo: the map is gone");
                }
                Err(e) => errors.push(e),
            }
        }
    }
    errors
}

/// Each error with its sources, `; `-separated.
fn chains(errors: &[KernelError]) -> String {
    errors.iter().map(|e| error_chain(e)).collect::<Vec<_>>().join("; ")
}

/// `a: b: c` from an error and its sources.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// Rolls back an apply that was interrupted (crash, `kill -9`), if any.
/// Returns how many steps were undone.
pub fn recover<K: Kernel + ?Sized>(
    k: &mut K,
    journal: &mut dyn JournalStore,
    retry: Retry,
) -> Result<usize, ApplyError> {
    let Some((steps, started)) = journal.pending().map_err(ApplyError::Journal)? else {
        // Objects set aside by a run killed after its journal was removed.
        k.commit().map_err(|e| ApplyError::Recovery { errors: vec![e], steps: vec![] })?;
        return Ok(0);
    };
    let Some(last) = started else {
        finish(k, journal)?;
        return Ok(0);
    };
    let undos: Vec<Vec<KernelOp>> =
        steps[..=last.min(steps.len().saturating_sub(1))].iter().map(|s| s.undo.clone()).collect();
    tracing::warn!(steps = undos.len(), "rolling back an interrupted apply");
    let errors = roll_back(k, &undos, retry);
    if !errors.is_empty() {
        let steps = steps[..undos.len()].iter().map(|s| s.what.clone()).collect();
        return Err(ApplyError::Recovery { errors, steps });
    }
    finish(k, journal)?;
    Ok(undos.len())
}

/// Ends an apply or a rollback: the journal goes first, then the objects set
/// aside. In the other order a kill between the two would leave undo steps
/// that need objects already gone; in this one it leaves only set-aside
/// objects no journal refers to, which the next [`recover`] removes.
fn finish<K: Kernel + ?Sized>(k: &mut K, journal: &mut dyn JournalStore) -> Result<(), ApplyError> {
    journal.finish().map_err(ApplyError::Journal)?;
    crate::fault::point("journal-finished");
    // The apply is done whether or not the set-aside objects could go now:
    // they are only garbage, swept by the next run.
    if let Err(e) = k.commit() {
        tracing::warn!(error = %error_chain(&e), "could not remove objects set aside by the apply; the next run will");
    }
    Ok(())
}

/// Drops an interrupted apply's journal without rolling it back, and the
/// objects it set aside: the way out when a rollback cannot succeed. The
/// node keeps whatever the kernel runs now; the next apply plans from that.
/// Returns the steps the journal held.
pub fn discard_journal<K: Kernel + ?Sized>(
    k: &mut K,
    journal: &mut dyn JournalStore,
) -> Result<Vec<String>, ApplyError> {
    let Some((steps, _)) = journal.pending().map_err(ApplyError::Journal)? else { return Ok(Vec::new()) };
    finish(k, journal)?;
    Ok(steps.into_iter().map(|s| s.what).collect())
}

/// The scope to observe for a desired state.
pub fn scope_for(desired: &State) -> Scope {
    let (hop_interfaces, neighbors) = desired.mesh.as_ref().map(|m| m.0.needs()).unwrap_or_default();
    Scope {
        interfaces: desired
            .attachments
            .keys()
            .filter_map(|h| h.interface().map(str::to_string))
            .chain(hop_interfaces)
            .collect(),
        neighbors: neighbors.into_iter().collect(),
        maps: desired.maps.iter().filter(|(_, m)| m.managed).map(|(r, _)| r.clone()).collect(),
        all_maps: false,
        map_names: Default::default(),
        events: desired
            .attachments
            .keys()
            .filter_map(|h| match h {
                Hook::Tracepoint { event, .. } => Some(event.clone()),
                _ => None,
            })
            .collect(),
    }
}

/// Applies `plan` (computed from `observed`), then observes again and
/// checks that nothing is left to do. Any failure rolls back.
pub fn apply<K: Kernel + ?Sized>(
    k: &mut K,
    plan: &Plan,
    desired: &Desired,
    observed: &State,
    journal: &mut dyn JournalStore,
    retry: Retry,
) -> Result<ApplyReport, ApplyError> {
    if !plan.errors.is_empty() {
        return Err(ApplyError::Refused { errors: plan.errors.clone() });
    }
    if journal.pending().map_err(ApplyError::Journal)?.is_some() {
        return Err(ApplyError::Refused {
            errors: vec!["an interrupted apply must be recovered first (`bpfsync recover`)".into()],
        });
    }
    let writes_before = k.writes();
    let steps = steps(plan, desired, observed);
    if steps.is_empty() {
        return Ok(ApplyReport::default());
    }
    let jsteps: Vec<JournalStep> =
        steps.iter().map(|s| JournalStep { what: s.what.clone(), undo: s.undo.clone() }).collect();
    journal.begin(&jsteps).map_err(ApplyError::Journal)?;
    crate::fault::point("journal-written");

    for (i, step) in steps.iter().enumerate() {
        journal.started(i).map_err(ApplyError::Journal)?;
        crate::fault::point("step-started");
        let mut failure = None;
        for op in &step.forward {
            if let Err(e) = with_retry(k, op, Some(desired), retry) {
                failure = Some(e);
                break;
            }
        }
        if let Some(cause) = failure {
            // The failed step may have half-happened: undo it too.
            let undos: Vec<Vec<KernelOp>> = steps[..=i].iter().map(|s| s.undo.clone()).collect();
            let rollback = roll_back(k, &undos, retry);
            if rollback.is_empty() {
                finish(k, journal)?;
                return Err(ApplyError::RolledBack { index: i + 1, what: step.what.clone(), cause });
            }
            return Err(ApplyError::RollbackFailed { index: i + 1, what: step.what.clone(), cause, rollback });
        }
        journal.done(i).map_err(ApplyError::Journal)?;
        crate::fault::point("step-done");
    }

    // Verify: the kernel must now match the desired state.
    let remaining = verify(k, plan, desired, observed).map_err(ApplyError::Observe)?;
    if !remaining.is_empty() {
        let undos: Vec<Vec<KernelOp>> = steps.iter().map(|s| s.undo.clone()).collect();
        let rollback = roll_back(k, &undos, retry);
        let first = format!("{} ({})", remaining[0].0, remaining[0].1);
        if !rollback.is_empty() {
            return Err(ApplyError::VerifyRollbackFailed { count: remaining.len(), first, rollback });
        }
        finish(k, journal)?;
        return Err(ApplyError::Verify { count: remaining.len(), first });
    }
    finish(k, journal)?;
    Ok(ApplyReport { steps: steps.len(), kernel_writes: k.writes() - writes_before, recovered_steps: 0 })
}

/// Up to this many changed keys of a map are verified by reading them back
/// one by one; beyond, the map is read whole — unless this apply made it.
const POINT_VERIFY_MAX: usize = 1024;

/// What is still different after an apply: (address, reason) of each
/// difference. Programs, links and map shapes are always observed again. A
/// map whose program was not reloaded and whose plan touched few keys is
/// checked by reading back exactly those keys — a one-key change to a
/// 100k-entry map costs one lookup to verify, not a full read (the other
/// keys were observed moments before, to make the plan). A map this apply
/// created (its program loaded, the map new or made fresh) holds only what
/// this apply wrote, and every write was confirmed by the kernel: it is
/// checked by reading back an even sample of POINT_VERIFY_MAX of the
/// written keys (they are in the map that is pinned, with their values),
/// not by reading 100,000 entries back. Managed maps have one writer,
/// bpfsync, which holds the node's lock; the datapath never writes them.
fn verify<K: Kernel + ?Sized>(
    k: &mut K,
    plan: &Plan,
    desired: &Desired,
    before: &State,
) -> Result<Vec<(String, String)>, KernelError> {
    let mut touched: BTreeMap<MapRef, Vec<Vec<u8>>> = BTreeMap::new();
    let mut reloaded = std::collections::BTreeSet::new();
    let mut fresh = std::collections::BTreeSet::new();
    for c in &plan.changes {
        match &c.op {
            Op::WriteEntry { map, key, .. } | Op::DeleteEntry { map, key, .. } => {
                touched.entry(map.clone()).or_default().push(key.clone())
            }
            Op::LoadProgram { program, fresh_maps } => {
                reloaded.insert(program.clone());
                fresh.extend(fresh_maps.iter().map(|m| MapRef { program: program.clone(), map: m.clone() }));
            }
            _ => {}
        }
    }
    let mut scope = scope_for(&desired.state);
    // Made by this apply: its program was loaded, and the map was not there
    // before (or was made anew), so only this apply wrote it.
    let made: std::collections::BTreeSet<MapRef> = scope
        .maps
        .iter()
        .filter(|r| {
            // (`scope.maps` holds managed maps only.)
            reloaded.contains(&r.program)
                && (fresh.contains(*r) || !before.maps.contains_key(*r))
                && touched.get(*r).is_some_and(|keys| keys.len() > POINT_VERIFY_MAX)
        })
        .cloned()
        .collect();
    for r in &made {
        if let Some(keys) = touched.get_mut(r) {
            let step = keys.len().div_ceil(POINT_VERIFY_MAX);
            *keys = keys.iter().step_by(step).cloned().collect();
        }
    }
    let point: std::collections::BTreeSet<MapRef> = scope
        .maps
        .iter()
        .filter(|r| {
            made.contains(*r)
                || (!reloaded.contains(&r.program)
                    && before.maps.get(*r).is_some_and(|m| m.managed)
                    && touched.get(*r).map_or(0, Vec::len) <= POINT_VERIFY_MAX)
        })
        .cloned()
        .collect();
    scope.maps.retain(|r| !point.contains(r));
    let after = k.observe(&scope)?;
    let mut diffs: Vec<(String, String)> = plan::plan_skipping_entries(&desired.state, &after, &point)
        .changes
        .into_iter()
        .filter(|c| c.part_of.is_none())
        .map(|c| (c.address, c.reason))
        .collect();
    let (resolved, _) = plan::resolve_desired(&desired.state, before);
    for r in &point {
        let keys = touched.remove(r).unwrap_or_default();
        let values = k.lookup_entries(r, &keys)?;
        let want = &resolved.maps[r].entries;
        for (key, got) in keys.iter().zip(values) {
            if want.get(key) != got.as_deref() {
                diffs
                    .push((format!("map_entry.{r}[{}]", crate::codec::hex(key)), "the value read back differs".into()));
            }
        }
    }
    Ok(diffs)
}

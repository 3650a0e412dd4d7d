//! The planner: a pure function from (desired, observed) to a plan.
//!
//! A plan is data: each change has an action, a reason, before/after
//! values for people, and the operation the executor runs. Rendering lives
//! in [`text`] and [`mod@json`].

pub mod impact;
pub mod json;
pub mod text;

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::{Value, json};

use crate::codec;
use crate::compile::{decode_key, decode_value};
use crate::mesh;
use crate::model::{ForeignProgram, Hook, MapRef, MapState, State};
use crate::spec::XdpMode;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Create,
    Update,
    Replace,
    Delete,
}

impl Action {
    pub fn symbol(self) -> &'static str {
        match self {
            Action::Create => "+",
            Action::Update => "~",
            Action::Replace => "-/+",
            Action::Delete => "-",
        }
    }

    pub fn verb(self) -> &'static str {
        match self {
            Action::Create => "will be created",
            Action::Update => "will be updated in-place",
            Action::Replace => "will be replaced",
            Action::Delete => "will be destroyed",
        }
    }

    pub fn legend(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Update => "update in-place",
            Action::Replace => "replace (create the new one, then destroy the old one)",
            Action::Delete => "destroy",
        }
    }
}

/// What the executor does for one change. Each operation carries what its
/// undo needs (old values, old programs).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Op {
    /// Load a program version and pin it (beside an older version, if any).
    /// `fresh_maps` are owned maps whose shape changed: they are recreated.
    LoadProgram { program: String, fresh_maps: Vec<String> },
    /// Unpin a program version (and its maps, when it owns them).
    UnloadProgram { program: String, digest: String },
    WriteEntry {
        map: MapRef,
        #[serde(serialize_with = "ser_hex")]
        key: Vec<u8>,
        #[serde(serialize_with = "ser_hex")]
        value: Vec<u8>,
        #[serde(serialize_with = "ser_opt_hex")]
        old: Option<Vec<u8>>,
    },
    DeleteEntry {
        map: MapRef,
        #[serde(serialize_with = "ser_hex")]
        key: Vec<u8>,
        #[serde(serialize_with = "ser_hex")]
        old: Vec<u8>,
        /// Array maps cannot delete: the entry is zeroed.
        zero: bool,
    },
    /// Attach a program; first evict foreign programs (takeover).
    Attach { hook: Hook, program: String, mode: Option<XdpMode>, evict: Vec<ForeignProgram> },
    /// Atomically swap the program behind an existing link.
    UpdateLink { hook: Hook, from: String, to: String },
    /// XDP mode change: attach in the new mode, then drop the old link.
    Reattach { hook: Hook, program: String, from_mode: Option<XdpMode>, to_mode: Option<XdpMode>, old_program: String },
    /// Remove a foreign program from a hook where ours already runs.
    Evict { hook: Hook, foreign: ForeignProgram },
    /// Remove a link.
    Detach { hook: Hook, program: String, mode: Option<XdpMode>, defunct: bool },
    /// Pin again a map whose pin was removed while its program holds it.
    PinMap { map: MapRef, id: u32 },
}

fn ser_hex<S: serde::Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&codec::hex(b))
}

fn ser_opt_hex<S: serde::Serializer>(b: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
    match b {
        Some(b) => s.serialize_str(&codec::hex(b)),
        None => s.serialize_none(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Program,
    Attachment,
    MapEntry,
    /// A map's pin (its contents are map entries).
    Map,
}

/// One change to one object.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    pub address: String,
    pub kind: Kind,
    pub action: Action,
    pub reason: String,
    pub before: Option<Value>,
    pub after: Option<Value>,
    /// Set on the second half of a replace (unpinning the old version):
    /// executed, but not counted or shown as its own change.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub part_of: Option<String>,
    #[serde(skip)]
    pub op: Op,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConflictKind {
    /// A program bpfsync does not own holds a declared hook.
    ForeignProgram,
    MissingInterface,
    MissingTracepoint,
    /// A route or policy that cannot be resolved on this node (missing
    /// interface, unknown neighbour MAC); it is left as the kernel has it.
    Unresolved,
}

/// Something the plan cannot do, and why; the rest of the plan proceeds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Conflict {
    pub hook: String,
    pub kind: ConflictKind,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub program_id: Option<u32>,
    /// The declared object is not in place (attached nowhere, entries not
    /// installed) until the condition clears: the node does not match the
    /// spec even when there is nothing to do now.
    pub pending: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Summary {
    pub add: usize,
    pub change: usize,
    pub destroy: usize,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// In execution order: loads, map writes, attachments, entry deletes,
    /// detaches, unloads.
    pub changes: Vec<Change>,
    pub conflicts: Vec<Conflict>,
    /// Policy changes in spec terms (the same entries are in `changes`).
    pub policy_changes: Vec<mesh::PolicyChange>,
    /// Why this plan must not be applied at all (e.g. a map would
    /// overflow); the executor refuses a plan with errors.
    pub errors: Vec<String>,
}

impl Plan {
    /// Nothing to do now (declared objects may still be pending).
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// Declared objects that are not in place and wait on something
    /// outside bpfsync (an interface, a neighbour, a foreign program).
    pub fn pending(&self) -> impl Iterator<Item = &Conflict> {
        self.conflicts.iter().filter(|c| c.pending)
    }

    /// Everything declared is in place: no changes and nothing pending.
    pub fn is_converged(&self) -> bool {
        self.changes.is_empty() && self.pending().next().is_none()
    }

    /// Terraform's counting: a replace is one add and one destroy.
    pub fn summary(&self) -> Summary {
        let mut s = Summary::default();
        for c in self.changes.iter().filter(|c| c.part_of.is_none()) {
            match c.action {
                Action::Create => s.add += 1,
                Action::Update => s.change += 1,
                Action::Replace => {
                    s.add += 1;
                    s.destroy += 1
                }
                Action::Delete => s.destroy += 1,
            }
        }
        s
    }
}

/// The first 12 characters of a digest (snapshots may hold any text).
fn short(digest: &str) -> &str {
    digest.char_indices().nth(12).map_or(digest, |(i, _)| &digest[..i])
}

fn program_value(p: &crate::model::Program) -> Value {
    let mut v = json!({
        "type": p.program_type.as_str(),
        "function": p.function,
        "digest": short(&p.digest),
    });
    if !p.source.is_empty() {
        v["source"] = json!(p.source);
    }
    if let Some(owner) = &p.share_maps {
        v["share-maps"] = json!(owner);
    }
    v
}

fn attachment_value(a: &crate::model::Attachment) -> Value {
    let mut v = json!({ "program": a.program });
    if let Some(m) = a.mode {
        v["mode"] = json!(m.as_str());
    }
    v
}

/// Groups of changes, in execution order.
#[derive(Default)]
struct Phases {
    loads: Vec<Change>,
    writes: Vec<Change>,
    attaches: Vec<Change>,
    entry_deletes: Vec<Change>,
    detaches: Vec<Change>,
    unloads: Vec<Change>,
}

/// Diffs desired against observed. Pure.
pub fn plan(desired: &State, observed: &State) -> Plan {
    plan_skipping_entries(desired, observed, &BTreeSet::new())
}

/// [`plan`], leaving out the entries of the maps in `skip` (the executor
/// verifies those key by key).
pub fn plan_skipping_entries(desired: &State, observed: &State, skip: &BTreeSet<MapRef>) -> Plan {
    let mut ph = Phases::default();
    let (observed, repins) = adopt_unpinned_maps(desired, observed);
    let observed = observed.as_ref();
    ph.loads.extend(repins);
    let mut conflicts = Vec::new();
    let mut errors = Vec::new();
    let (desired, unresolved) = resolve_desired(desired, observed);
    let desired = desired.as_ref();
    for u in unresolved {
        conflicts.push(Conflict {
            hook: u.what,
            kind: ConflictKind::Unresolved,
            message: u.message,
            program_id: None,
            pending: true,
        });
    }
    let names = desired.mesh.as_ref().map(|_| {
        fn rules(s: &State) -> Option<&crate::entries::Entries> {
            s.maps.get(&mesh::map_ref(mesh::NAMES_MAP)).map(|m| &m.entries)
        }
        mesh::Names::new(observed, rules(desired).unwrap_or(&Default::default()), rules(observed))
    });

    let (renewed, fresh_maps) = plan_programs(desired, observed, &mut ph);
    plan_entries(desired, observed, skip, &fresh_maps, names.as_ref(), &mut ph, &mut errors);
    let policy_changes = policy_changes_of(&ph, names.as_ref(), desired, observed);
    plan_attachments(desired, observed, &renewed, &mut ph, &mut conflicts);
    Plan { changes: ph.into_changes(), conflicts, policy_changes, errors }
}

/// Programs to load, replace or unload. Returns the programs that get a
/// new kernel program (their links follow) and, per program, the maps that
/// are recreated because their shape changed.
#[allow(clippy::type_complexity, reason = "two results named at the call site")]
fn plan_programs<'d>(
    desired: &'d State,
    observed: &State,
    ph: &mut Phases,
) -> (BTreeSet<&'d str>, BTreeMap<&'d str, Vec<String>>) {
    let mut renewed: BTreeSet<&'d str> = BTreeSet::new();
    let mut fresh_maps: BTreeMap<&'d str, Vec<String>> = BTreeMap::new();
    for (name, d) in &desired.programs {
        let address = format!("program.{name}");
        let mut changed_maps = Vec::new();
        if d.share_maps.is_none() {
            for (r, dm) in desired.maps.range(MapRef { program: name.clone(), map: String::new() }..) {
                if &r.program != name {
                    break;
                }
                if let (Some(ds), Some(os)) = (dm.shape, observed.maps.get(r).and_then(|m| m.shape))
                    && ds != os
                {
                    changed_maps.push(r.map.clone());
                }
            }
        }
        let Some(o) = observed.programs.get(name) else {
            ph.loads.push(Change {
                address,
                kind: Kind::Program,
                action: Action::Create,
                reason: "it is not loaded".into(),
                before: None,
                after: Some(program_value(d)),
                part_of: None,
                op: Op::LoadProgram { program: name.clone(), fresh_maps: vec![] },
            });
            renewed.insert(name);
            continue;
        };
        let reason = if o.program_type != d.program_type {
            Some(format!("its type changes from `{}` to `{}`", o.program_type.as_str(), d.program_type.as_str()))
        } else if o.share_maps != d.share_maps {
            Some("it changes whose maps it uses (`share-maps`)".to_string())
        } else if o.digest != d.digest {
            Some(format!("its bytecode changed: digest {} → {}", short(&o.digest), short(&d.digest)))
        } else if !changed_maps.is_empty() {
            Some(format!("map `{}` changed shape and is recreated", changed_maps.join("`, `")))
        } else {
            None
        };
        if let Some(reason) = reason {
            let reason = if changed_maps.is_empty() || reason.starts_with("map `") {
                reason
            } else {
                format!("{reason}; map `{}` changes shape and is recreated", changed_maps.join("`, `"))
            };
            ph.loads.push(Change {
                address,
                kind: Kind::Program,
                action: Action::Replace,
                reason,
                before: Some(program_value(o)),
                after: Some({
                    // The kernel does not know where bytecode came from: do
                    // not show that as a change.
                    let mut v = program_value(d);
                    if o.source.is_empty()
                        && let Some(m) = v.as_object_mut()
                    {
                        m.remove("source");
                    }
                    v
                }),
                part_of: None,
                op: Op::LoadProgram { program: name.clone(), fresh_maps: changed_maps.clone() },
            });
            renewed.insert(name);
            ph.unloads.push(Change {
                address: format!("program.{name}@{}", short(&o.digest)),
                kind: Kind::Program,
                action: Action::Delete,
                reason: "the replaced version is no longer attached".into(),
                before: Some(program_value(o)),
                after: None,
                part_of: Some(format!("program.{name}")),
                op: Op::UnloadProgram { program: name.clone(), digest: o.digest.clone() },
            });
            fresh_maps.insert(name, changed_maps);
        }
    }
    for (name, o) in &observed.programs {
        if !desired.programs.contains_key(name) {
            ph.unloads.push(Change {
                address: format!("program.{name}"),
                kind: Kind::Program,
                action: Action::Delete,
                reason: "it is not in the spec".into(),
                before: Some(program_value(o)),
                after: None,
                part_of: None,
                op: Op::UnloadProgram { program: name.clone(), digest: o.digest.clone() },
            });
        }
    }
    for (name, digest) in &observed.stray_programs {
        ph.unloads.push(Change {
            address: format!("program.{name}@{}", short(digest)),
            kind: Kind::Program,
            action: Action::Delete,
            reason: "it is a leftover version from an interrupted apply".into(),
            before: Some(json!({ "digest": short(digest) })),
            after: None,
            part_of: None,
            op: Op::UnloadProgram { program: name.clone(), digest: digest.clone() },
        });
    }

    (renewed, fresh_maps)
}

/// Entry changes of every managed map (but those in `skip`); a map that
/// would overflow while the plan runs is an error of the plan.
fn plan_entries(
    desired: &State,
    observed: &State,
    skip: &BTreeSet<MapRef>,
    fresh_maps: &BTreeMap<&str, Vec<String>>,
    names: Option<&mesh::Names>,
    ph: &mut Phases,
    errors: &mut Vec<String>,
) {
    let empty = MapState::default();
    for (r, dm) in desired.maps.iter().filter(|(r, m)| m.managed && !skip.contains(r)) {
        let fresh = !observed.programs.contains_key(&r.program)
            || fresh_maps.get(r.program.as_str()).is_some_and(|m| m.contains(&r.map));
        let om = if fresh { &empty } else { observed.maps.get(r).unwrap_or(&empty) };
        let view = names.filter(|_| r.program == mesh::PROGRAM);
        let peak = diff_entries(r, dm, om, view, ph);
        if let Some(shape) = dm.shape
            && shape.map_type != crate::object::BPF_MAP_TYPE_ARRAY
            && peak > shape.max_entries as usize
        {
            errors.push(format!(
                "map `{r}` would hold {peak} entries while the plan is applied ({} now, {} wanted; entries are added before old ones are removed), but it holds at most {}",
                om.entries.len(),
                dm.entries.len(),
                shape.max_entries
            ));
        }
    }
}

/// Policy entry changes in spec terms.
fn policy_changes_of(
    ph: &Phases,
    names: Option<&mesh::Names>,
    desired: &State,
    observed: &State,
) -> Vec<mesh::PolicyChange> {
    // Decoding every policy entry costs time on big tables: only when a
    // policy entry changes (the agent plans on every resync).
    let touches_policy = ph.writes.iter().chain(&ph.entry_deletes).any(|c| match &c.op {
        Op::WriteEntry { map, .. } | Op::DeleteEntry { map, .. } => {
            map.program == mesh::PROGRAM && mesh::POLICY_MAPS.contains(&map.map.as_str())
        }
        _ => false,
    });
    match names {
        Some(names) if touches_policy => {
            let empty = crate::entries::Entries::new();
            let atoms = |s: &State| {
                let get = |m: &str| s.maps.get(&mesh::map_ref(m)).map_or(&empty, |m| &m.entries);
                mesh::policy_atoms(get(mesh::PEERS_MAP), get(mesh::ACTIONS_MAP), names)
            };
            mesh::policy_changes(&atoms(observed), &atoms(desired))
        }
        _ => Vec::new(),
    }
}

/// Attachments to create, update, re-create or remove, and the conflicts
/// and pending objects on the hooks the spec declares.
fn plan_attachments(
    desired: &State,
    observed: &State,
    renewed: &BTreeSet<&str>,
    ph: &mut Phases,
    conflicts: &mut Vec<Conflict>,
) {
    for (hook, d) in &desired.attachments {
        let address = format!("attachment.{hook}");
        let observed_att = observed.attachments.get(hook);
        if let Some(iface) = hook.interface()
            && !observed.interfaces.contains_key(iface)
        {
            conflicts.push(Conflict {
                hook: hook.to_string(),
                kind: ConflictKind::MissingInterface,
                message: format!("waiting for interface `{iface}`: `{}` is attached when it appears", d.program),
                program_id: None,
                pending: true,
            });
            if let Some(o) = observed_att {
                ph.detaches.push(detach_change(hook, o, "its interface is gone and the link is defunct"));
            }
            continue;
        }
        if let (Hook::Tracepoint { event, .. }, Some(events)) = (hook, &observed.events)
            && !events.contains(event)
        {
            conflicts.push(Conflict {
                hook: hook.to_string(),
                kind: ConflictKind::MissingTracepoint,
                message: format!("tracepoint `{event}` does not exist on this kernel"),
                program_id: None,
                pending: true,
            });
            continue;
        }
        let foreign: Vec<ForeignProgram> =
            observed.foreign.iter().filter(|f| same_hook(&f.hook, hook)).cloned().collect();
        // XDP has one slot per mode: a foreign program there blocks ours.
        let blocked = matches!(hook, Hook::Xdp { .. }) && !foreign.is_empty() && !d.takeover;
        let ours_in_place = observed_att.is_some_and(|o| !o.defunct);
        let mut evict = Vec::new();
        for f in &foreign {
            if d.takeover {
                evict.push(f.clone());
            } else {
                conflicts.push(Conflict {
                    hook: hook.to_string(),
                    kind: ConflictKind::ForeignProgram,
                    message: format!(
                        "program `{}` (id {}, {}) is attached and not owned by bpfsync; it is left alone (set `takeover: true` on this hook to replace it)",
                        f.program_name, f.program_id, f.detail
                    ),
                    program_id: Some(f.program_id),
                    pending: blocked && !ours_in_place,
                });
            }
        }
        // Ours is already there: a takeover only removes the foreign ones.
        if observed_att.is_some() {
            for f in &evict {
                ph.attaches.push(Change {
                    address: format!("attachment.{hook}#foreign-{}", f.program_id),
                    kind: Kind::Attachment,
                    action: Action::Delete,
                    reason: format!(
                        "`takeover: true` removes foreign program `{}` (id {})",
                        f.program_name, f.program_id
                    ),
                    before: Some(json!({ "program": format!("{} (foreign, id {})", f.program_name, f.program_id) })),
                    after: None,
                    part_of: None,
                    op: Op::Evict { hook: hook.clone(), foreign: f.clone() },
                });
            }
        }
        match observed_att {
            None if blocked => {}
            // Our link was detached and a foreign program took the slot:
            // drop the dead link, leave the hook to its owner.
            Some(o) if o.defunct && blocked => {
                ph.detaches.push(detach_change(hook, o, "its link is defunct and a foreign program holds the hook"));
            }
            None => {
                let (action, reason) = if evict.is_empty() {
                    (Action::Create, "it is not attached".to_string())
                } else {
                    let names: Vec<_> =
                        evict.iter().map(|f| format!("`{}` (id {})", f.program_name, f.program_id)).collect();
                    (Action::Replace, format!("`takeover: true` replaces foreign program {}", names.join(", ")))
                };
                let before = (!evict.is_empty()).then(|| {
                    let names: Vec<_> =
                        evict.iter().map(|f| format!("{} (foreign, id {})", f.program_name, f.program_id)).collect();
                    json!({ "program": names.join(", ") })
                });
                ph.attaches.push(Change {
                    address,
                    kind: Kind::Attachment,
                    action,
                    reason,
                    before,
                    after: Some(attachment_value(d)),
                    part_of: None,
                    op: Op::Attach { hook: hook.clone(), program: d.program.clone(), mode: d.mode, evict },
                });
            }
            Some(o) if o.defunct => {
                let reason = "its link is defunct: the interface was re-created".to_string();
                ph.attaches.push(reattach_change(hook, o, d, reason));
            }
            Some(o) if o.mode != d.mode => {
                let show = |m: Option<XdpMode>| m.map_or("none", |m| m.as_str());
                let reason = format!("its mode changes from `{}` to `{}`", show(o.mode), show(d.mode));
                ph.attaches.push(reattach_change(hook, o, d, reason));
            }
            Some(o) if o.program != d.program || renewed.contains(d.program.as_str()) => {
                let reason = if o.program != d.program {
                    format!("its program changes from `{}` to `{}`", o.program, d.program)
                } else {
                    format!("program `{}` is replaced", d.program)
                };
                ph.attaches.push(Change {
                    address,
                    kind: Kind::Attachment,
                    action: Action::Update,
                    reason,
                    before: Some(attachment_value(o)),
                    after: Some(attachment_value(d)),
                    part_of: None,
                    op: Op::UpdateLink { hook: hook.clone(), from: o.program.clone(), to: d.program.clone() },
                });
            }
            Some(_) => {}
        }
    }
    for (hook, o) in &observed.attachments {
        if !desired.attachments.contains_key(hook) {
            ph.detaches.push(detach_change(hook, o, "it is not in the spec"));
        }
    }
}

impl Phases {
    /// The changes in execution order: loads, map writes, attachments,
    /// entry deletes, detaches, unloads.
    fn into_changes(mut self) -> Vec<Change> {
        let mut changes = self.loads;
        changes.extend(self.writes);
        changes.extend(self.attaches);
        // Writes run map by map in name order, deletes in reverse: a map whose
        // values point at another map's keys is named after it
        // (`policy_peers` → `policy_actions`), so what it points at exists
        // whenever it is visible.
        self.entry_deletes.sort_by(|a, b| match (&a.op, &b.op) {
            (Op::DeleteEntry { map: ma, .. }, Op::DeleteEntry { map: mb, .. }) => mb.cmp(ma),
            _ => std::cmp::Ordering::Equal,
        });
        changes.extend(self.entry_deletes);
        changes.extend(self.detaches);
        changes.extend(self.unloads);
        changes
    }
}

/// Maps whose pin was removed while their program still holds them (drift
/// made by hand): each is pinned again where the spec wants it, keeping its
/// contents, and is from then on diffed like any other map. Runs first, so
/// a program load in the same plan reuses the map instead of creating an
/// empty one.
fn adopt_unpinned_maps<'a>(desired: &State, observed: &'a State) -> (std::borrow::Cow<'a, State>, Vec<Change>) {
    if !observed.maps.values().any(|m| m.pin_missing) {
        return (std::borrow::Cow::Borrowed(observed), Vec::new());
    }
    let cut = |m: &str| m.get(..crate::model::KERNEL_NAME_MAX).unwrap_or(m).to_string();
    let mut o = observed.clone();
    let mut changes = Vec::new();
    let lost: Vec<MapRef> = observed.maps.iter().filter(|(_, m)| m.pin_missing).map(|(r, _)| r.clone()).collect();
    for r in lost {
        let wanted = desired.maps.keys().find(|d| {
            d.program == r.program && cut(&d.map) == r.map && observed.maps.get(*d).is_none_or(|m| m.pin_missing)
        });
        let (Some(wanted), Some(mut m)) = (wanted.cloned(), o.maps.remove(&r)) else { continue };
        m.pin_missing = false;
        let id = m.id.unwrap_or_default();
        o.maps.insert(wanted.clone(), m);
        changes.push(Change {
            address: format!("map.{wanted}"),
            kind: Kind::Map,
            action: Action::Create,
            reason: format!(
                "its pin is gone while program `{}` still holds it (id {id}): it is pinned again, contents kept",
                r.program
            ),
            before: None,
            after: Some(json!({ "id": id })),
            part_of: None,
            op: Op::PinMap { map: wanted, id },
        });
    }
    (std::borrow::Cow::Owned(o), changes)
}

/// The desired state with the mesh maps' entries resolved against the
/// observed node (interface indexes, MACs, neighbours).
pub fn resolve_desired<'a>(
    desired: &'a State,
    observed: &State,
) -> (std::borrow::Cow<'a, State>, Vec<crate::model::Unresolved>) {
    let Some(facts) = &desired.mesh else { return (std::borrow::Cow::Borrowed(desired), Vec::new()) };
    let (entries, unresolved) = facts.0.resolve(observed);
    let mut d = desired.clone();
    for (map, e) in entries {
        if let Some(m) = d.maps.get_mut(&map) {
            m.entries = e;
        }
    }
    (std::borrow::Cow::Owned(d), unresolved)
}

fn same_hook(foreign: &Hook, ours: &Hook) -> bool {
    match (foreign, ours) {
        (Hook::Xdp { interface: a }, Hook::Xdp { interface: b }) => a == b,
        (Hook::Tc { interface: a, direction: da, .. }, Hook::Tc { interface: b, direction: db, position: 0 }) => {
            a == b && da == db
        }
        _ => false,
    }
}

/// Detach, then attach again: for modes the kernel cannot switch in place
/// and for defunct links.
fn reattach_change(hook: &Hook, o: &crate::model::Attachment, d: &crate::model::Attachment, reason: String) -> Change {
    Change {
        address: format!("attachment.{hook}"),
        kind: Kind::Attachment,
        action: Action::Replace,
        reason,
        before: Some(attachment_value(o)),
        after: Some(attachment_value(d)),
        part_of: None,
        op: Op::Reattach {
            hook: hook.clone(),
            program: d.program.clone(),
            from_mode: o.mode,
            to_mode: d.mode,
            old_program: o.program.clone(),
        },
    }
}

fn detach_change(hook: &Hook, o: &crate::model::Attachment, reason: &str) -> Change {
    Change {
        address: format!("attachment.{hook}"),
        kind: Kind::Attachment,
        action: Action::Delete,
        reason: reason.into(),
        before: Some(attachment_value(o)),
        after: None,
        part_of: None,
        op: Op::Detach { hook: hook.clone(), program: o.program.clone(), mode: o.mode, defunct: o.defunct },
    }
}

fn entry_address(r: &MapRef, key: &str) -> String {
    format!("map_entry.{r}[{key}]")
}

/// Merge-join of two sorted entry sets: O(n), one change per differing key.
/// Returns how many keys the map holds at its fullest while the plan runs
/// (writes go before deletes: the union of both sides).
fn diff_entries(r: &MapRef, dm: &MapState, om: &MapState, names: Option<&mesh::Names>, ph: &mut Phases) -> usize {
    let is_array = dm.shape.is_some_and(|s| s.map_type == crate::object::BPF_MAP_TYPE_ARRAY);
    let mut d = dm.entries.iter().peekable();
    let mut o = om.entries.iter().peekable();
    let mut union = 0usize;
    let (writes_from, deletes_from) = (ph.writes.len(), ph.entry_deletes.len());
    let described = |k: &[u8], v: &[u8]| names.and_then(|n| mesh::describe(&r.map, k, v, n));
    let address = |k: &[u8], v: &[u8]| match described(k, v) {
        Some((key, _)) => entry_address(r, &key),
        None => entry_address(r, &codec::display(&decode_key(dm, k))),
    };
    let entry_value = |k: &[u8], v: &[u8]| match described(k, v) {
        Some((key, value)) => json!({ "key": key, "value": value }),
        None => json!({ "key": decode_key(dm, k), "value": decode_value(dm, v) }),
    };
    loop {
        let ord = match (d.peek(), o.peek()) {
            (None, None) => break,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some((dk, _)), Some((ok, _))) => dk.cmp(ok),
        };
        union += 1;
        match ord {
            std::cmp::Ordering::Less => {
                let (k, v) = d.next().unwrap();
                ph.writes.push(Change {
                    address: address(k, v),
                    kind: Kind::MapEntry,
                    action: Action::Create,
                    reason: "the key is missing".into(),
                    before: None,
                    after: Some(entry_value(k, v)),
                    part_of: None,
                    op: Op::WriteEntry { map: r.clone(), key: k.to_vec(), value: v.to_vec(), old: None },
                });
            }
            std::cmp::Ordering::Greater => {
                let (k, v) = o.next().unwrap();
                ph.entry_deletes.push(Change {
                    address: address(k, v),
                    kind: Kind::MapEntry,
                    action: Action::Delete,
                    reason: "the key is not in the spec".into(),
                    before: Some(entry_value(k, v)),
                    after: None,
                    part_of: None,
                    op: Op::DeleteEntry { map: r.clone(), key: k.to_vec(), old: v.to_vec(), zero: is_array },
                });
            }
            std::cmp::Ordering::Equal => {
                let (k, dv) = d.next().unwrap();
                let (_, ov) = o.next().unwrap();
                if dv != ov {
                    ph.writes.push(Change {
                        address: address(k, dv),
                        kind: Kind::MapEntry,
                        action: Action::Update,
                        reason: "the value differs".into(),
                        before: Some(entry_value(k, ov)),
                        after: Some(entry_value(k, dv)),
                        part_of: None,
                        op: Op::WriteEntry {
                            map: r.clone(),
                            key: k.to_vec(),
                            value: dv.to_vec(),
                            old: Some(ov.to_vec()),
                        },
                    });
                }
            }
        }
    }
    if dm.shape.is_some_and(|s| s.map_type == crate::object::BPF_MAP_TYPE_LPM_TRIE) {
        order_lpm_changes(&mut ph.writes[writes_from..], &mut ph.entry_deletes[deletes_from..]);
    }
    union
}

/// LPM trie changes run so that a lookup meets the old or the new answer,
/// never a third: writes most specific first (a new prefix is visible only
/// once every longer new prefix is), removals least specific first (an old
/// prefix stays only while every longer old one does). A key starts with
/// its prefix length.
fn order_lpm_changes(writes: &mut [Change], deletes: &mut [Change]) {
    let prefixlen = |c: &Change| match &c.op {
        Op::WriteEntry { key, .. } | Op::DeleteEntry { key, .. } if key.len() >= 4 => {
            u32::from_ne_bytes(key[..4].try_into().unwrap())
        }
        _ => 0,
    };
    writes.sort_by_key(|c| std::cmp::Reverse(prefixlen(c)));
    deletes.sort_by_key(prefixlen);
}

//! Spec → desired state: resolves programs to object bytes, checks them
//! against the objects (functions, types, map sizes), and encodes map
//! entries.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::Value;

use crate::builtin;
use crate::codec::{self, Form};
use crate::mesh;
use crate::model::{Attachment, Direction, Hook, MapCodec, MapRef, MapShape, MapState, Program, State};
use crate::object::{self, MapDef, ObjectInfo};
use crate::spec::overlay::OverlayEntry;
use crate::spec::{Diagnostic, Diagnostics, LoadedSpec, ProgramSpec, ProgramType, XdpMode};
use crate::telemetry::{self, DropReasonNames};

/// The desired state, plus what the executor needs to create it.
#[derive(Debug, Clone, Default)]
pub struct Desired {
    pub state: State,
    /// Program name → the ELF bytes it is loaded from.
    pub objects: BTreeMap<String, Arc<[u8]>>,
    /// Map definitions from the objects, by map.
    pub map_defs: BTreeMap<MapRef, MapDef>,
}

/// An object's bytes and what they hold.
type LoadedObject = (Arc<[u8]>, Arc<ObjectInfo>);

/// Reads object files named by specs; caches by path.
#[derive(Default)]
pub struct ObjectLoader {
    cache: HashMap<PathBuf, Result<LoadedObject, String>>,
}

impl ObjectLoader {
    fn load_path(&mut self, path: PathBuf) -> Result<LoadedObject, String> {
        self.cache
            .entry(path.clone())
            .or_insert_with(|| {
                let bytes = read_object(&path)?;
                let info = object::inspect(&bytes).map_err(|e| format!("`{}`: {e}", path.display()))?;
                Ok((Arc::from(bytes), Arc::new(info)))
            })
            .clone()
    }

    fn load_builtin(&mut self, name: &str) -> Result<LoadedObject, String> {
        let b = builtin::find(name).ok_or_else(|| format!("unknown builtin `{name}`"))?;
        let key = PathBuf::from(format!("builtin:{}", b.object));
        self.cache
            .entry(key)
            .or_insert_with(|| {
                let info = object::inspect(b.bytes).map_err(|e| format!("builtin `{name}`: {e}"))?;
                Ok((Arc::from(b.bytes), Arc::new(info)))
            })
            .clone()
    }
}

/// The largest eBPF object read (the built-ins are under 100 KiB).
pub const MAX_OBJECT_BYTES: u64 = 64 << 20;

/// An object file's bytes: a regular file of at most [`MAX_OBJECT_BYTES`].
fn read_object(path: &std::path::Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let cannot = |e: std::io::Error| format!("cannot read object `{}`: {e}", path.display());
    let meta = std::fs::metadata(path).map_err(cannot)?;
    if !meta.is_file() {
        return Err(format!("object `{}` is not a regular file", path.display()));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path).map_err(cannot)?.take(MAX_OBJECT_BYTES + 1).read_to_end(&mut bytes).map_err(cannot)?;
    if bytes.len() as u64 > MAX_OBJECT_BYTES {
        return Err(format!("object `{}` is larger than {MAX_OBJECT_BYTES} bytes", path.display()));
    }
    Ok(bytes)
}

/// Program digest: the object's bytes and the function loaded from it.
pub fn program_digest(object_digest: &str, function: &str) -> String {
    object::digest(format!("{object_digest}\0{function}").as_bytes())
}

/// Loads, validates and compiles spec text, reporting the problems of
/// every stage at once: a schema error does not hide a missing object.
/// The overlay's entries are merged onto the file's spec when it is valid
/// (see [`crate::spec::overlay`]).
pub fn load_and_compile(
    file: &std::path::Path,
    source: &str,
    overlay: &[OverlayEntry],
    loader: &mut ObjectLoader,
) -> Result<(LoadedSpec, Desired), Diagnostics> {
    let (loaded, mut diags) = crate::spec::load_partial_with_overlay(file, source, overlay);
    let Some(loaded) = loaded else { return Err(crate::spec::diagnostics(diags, source)) };
    match compile(&loaded, loader) {
        Ok(desired) if diags.is_empty() => Ok((loaded, desired)),
        Ok(_) => Err(crate::spec::diagnostics(diags, source)),
        Err(more) => {
            diags.extend(more.items);
            let mut all = crate::spec::diagnostics(diags, source);
            all.omitted += more.omitted;
            Err(all)
        }
    }
}

/// Compiles a validated spec into the desired state. Every problem is
/// reported, as diagnostics pointing into the spec.
pub fn compile(spec: &LoadedSpec, loader: &mut ObjectLoader) -> Result<Desired, Diagnostics> {
    let s = &spec.spec;
    let mut diags: Vec<Diagnostic> = Vec::new();
    let mut desired = Desired::default();
    let mesh_on = mesh::in_use(s);
    let mut programs = with_mesh_programs(&s.programs, mesh_on);
    if let Some(t) = &s.telemetry {
        let skip = drop_filter(spec, &mut diags);
        programs.extend(telemetry::program_specs(t, &skip));
    }

    let infos = compile_programs(spec, &programs, loader, &mut desired, &mut diags);
    compile_maps(spec, &programs, &infos, &mut desired, &mut diags);
    if mesh_on {
        compile_mesh(spec, &mut desired);
    }
    compile_attachments(spec, &mut desired);
    compile_telemetry_hooks(spec, &mut desired);
    if diags.is_empty() { Ok(desired) } else { Err(crate::spec::diagnostics(diags, &spec.source)) }
}

/// Each program's object: read (or built in), its function found and
/// checked, its digest. Returns the objects' infos by program name.
fn compile_programs(
    spec: &LoadedSpec,
    programs: &[ProgramSpec],
    loader: &mut ObjectLoader,
    desired: &mut Desired,
    diags: &mut Vec<Diagnostic>,
) -> BTreeMap<String, Arc<ObjectInfo>> {
    let mut infos: BTreeMap<String, Arc<ObjectInfo>> = BTreeMap::new();
    for (i, p) in programs.iter().enumerate() {
        let ptr = format!("/programs/{i}");
        let (loaded, source, default_function) = match (&p.builtin, &p.object) {
            (Some(b), _) => {
                let def = builtin::find(b).map(|b| b.function.to_string());
                (loader.load_builtin(b), format!("builtin:{b}"), def)
            }
            (None, Some(o)) => {
                let path = spec.base_dir().join(o);
                (loader.load_path(path), o.clone(), None)
            }
            (None, None) => continue, // reported by the spec checks
        };
        let (bytes, info) = match loaded {
            Ok(x) => x,
            Err(e) => {
                let field = if p.builtin.is_some() { "builtin" } else { "object" };
                diags.push(spec.diag(&format!("{ptr}/{field}"), e));
                continue;
            }
        };
        let function = match (&p.function, default_function) {
            (Some(f), _) => f.clone(),
            (None, Some(f)) => f,
            (None, None) => {
                let usable: Vec<_> = info.functions.iter().filter(|(_, t)| t.is_some()).map(|(n, _)| n).collect();
                if usable.len() == 1 {
                    usable[0].clone()
                } else {
                    let names: Vec<_> = usable.iter().map(|n| format!("`{n}`")).collect();
                    diags.push(spec.diag(
                        &format!("{ptr}/object"),
                        format!(
                            "the object has {} programs ({}): name one with `function`",
                            usable.len(),
                            names.join(", ")
                        ),
                    ));
                    continue;
                }
            }
        };
        let fptr = if p.function.is_some() { format!("{ptr}/function") } else { format!("{ptr}/type") };
        match info.functions.get(&function) {
            None => {
                let names: Vec<_> = info.functions.keys().map(|n| format!("`{n}`")).collect();
                diags.push(
                    spec.diag(&fptr, format!("no program `{function}` in the object (it has {})", names.join(", "))),
                );
                continue;
            }
            Some(None) => {
                diags.push(spec.diag(&fptr, format!("`{function}` is not an xdp, tc or tracepoint program")));
                continue;
            }
            Some(Some(t)) if *t != p.program_type => {
                diags.push(spec.diag(
                    &format!("{ptr}/type"),
                    format!("`{function}` is a `{}` program, not `{}`", t.as_str(), p.program_type.as_str()),
                ));
                continue;
            }
            Some(Some(_)) => {}
        }
        let program = Program {
            name: p.name.clone(),
            program_type: p.program_type,
            function: function.clone(),
            digest: program_digest(&info.digest, &function),
            share_maps: p.share_maps.clone(),
            source,
            id: None,
            tag: None,
        };
        desired.objects.insert(p.name.clone(), bytes);
        infos.insert(p.name.clone(), info.clone());
        desired.state.programs.insert(p.name.clone(), program);
    }

    infos
}

/// Every map of each owner's object; the declared ones are managed, their
/// entries encoded by the map's BTF layout.
fn compile_maps(
    spec: &LoadedSpec,
    programs: &[ProgramSpec],
    infos: &BTreeMap<String, Arc<ObjectInfo>>,
    desired: &mut Desired,
    diags: &mut Vec<Diagnostic>,
) {
    // Maps: owners get every map of their object; declared ones are managed.
    for (i, p) in programs.iter().enumerate() {
        let Some(info) = infos.get(&p.name) else { continue };
        if let Some(owner) = &p.share_maps {
            if let Some(owner_info) = infos.get(owner)
                && owner_info.digest != info.digest
            {
                diags.push(spec.diag(
                    &format!("/programs/{i}/share-maps"),
                    format!("`{owner}` is loaded from a different object: only programs of one object can share maps"),
                ));
            }
            continue;
        }
        for (name, def) in &info.maps {
            let r = MapRef { program: p.name.clone(), map: name.clone() };
            desired.map_defs.insert(r.clone(), def.clone());
            let shape = MapShape {
                map_type: def.map_type,
                key_size: def.key_size,
                value_size: def.value_size,
                max_entries: def.max_entries,
                flags: def.flags,
            };
            desired.state.maps.insert(r, MapState { shape: Some(shape), ..Default::default() });
        }
        for (j, m) in p.maps.iter().enumerate() {
            let mptr = format!("/programs/{i}/maps/{j}");
            let Some(def) = info.maps.get(&m.name) else {
                let names: Vec<_> = info.maps.keys().map(|n| format!("`{n}`")).collect();
                diags.push(spec.diag(
                    &format!("{mptr}/name"),
                    format!("no map `{}` in the object (it has {})", m.name, names.join(", ")),
                ));
                continue;
            };
            if !def.is_manageable() {
                diags.push(spec.diag(
                    &format!("{mptr}/name"),
                    format!(
                        "map `{}` is a {} map: only hash, lru_hash, array and lpm_trie maps take entries",
                        m.name,
                        def.type_name()
                    ),
                ));
                continue;
            }
            let r = MapRef { program: p.name.clone(), map: m.name.clone() };
            let state = desired.state.maps.get_mut(&r).expect("inserted above");
            state.managed = true;
            state.codec = MapCodec {
                key: Some(def.key.clone()),
                value: Some(def.value.clone()),
                key_form: m.entries.first().map(|e| Form::of(&e.key)).unwrap_or_default(),
                value_form: m.entries.first().map(|e| Form::of(&e.value)).unwrap_or_default(),
            };
            if m.entries.len() > def.max_entries as usize {
                diags.push(spec.diag(
                    &format!("{mptr}/entries"),
                    format!("{} entries, map `{}` holds at most {}", m.entries.len(), m.name, def.max_entries),
                ));
            }
            // Encoded first, then sorted: duplicates sit side by side (no
            // hash of every key), and the entries come out in key order.
            let mut encoded: Vec<(Vec<u8>, Vec<u8>, usize)> = Vec::with_capacity(m.entries.len());
            for (k, e) in m.entries.iter().enumerate() {
                // Made only for a diagnostic: a pointer per entry is 100,000
                // strings for a big map.
                let eptr = || format!("{mptr}/entries/{k}");
                let key = codec::encode(&e.key, &def.key)
                    .map_err(|err| diags.push(spec.diag(&format!("{}/key", eptr()), format!("key: {err}"))));
                let value = codec::encode(&e.value, &def.value)
                    .map_err(|err| diags.push(spec.diag(&format!("{}/value", eptr()), format!("value: {err}"))));
                let (Ok(key), Ok(value)) = (key, value) else { continue };
                if def.is_array() {
                    let index = u32::from_le_bytes(key[..4.min(key.len())].try_into().unwrap_or([0; 4]));
                    if key.len() != 4 || index >= def.max_entries {
                        diags.push(spec.diag(
                            &format!("{}/key", eptr()),
                            format!(
                                "index {index} is out of range for array map `{}` (0..{})",
                                m.name, def.max_entries
                            ),
                        ));
                        continue;
                    }
                }
                encoded.push((key, value, k));
            }
            encoded.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(a.2.cmp(&b.2)));
            // One pass: the first of equal keys is kept (by entry order), the
            // others reported against it.
            let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(encoded.len());
            let mut first_entry = 0;
            for (key, value, k) in encoded {
                if pairs.last().is_some_and(|(last, _)| *last == key) {
                    diags.push(spec.diag(
                        &format!("{mptr}/entries/{k}/key"),
                        format!("duplicate key {} (also entries[{first_entry}])", codec::display(&m.entries[k].key)),
                    ));
                    continue;
                }
                first_entry = k;
                pairs.push((key, value));
            }
            // Array maps always hold every index: zero is "no entry".
            if def.is_array() {
                pairs.retain(|(_, v)| v.iter().any(|b| *b != 0));
            }
            state.entries = pairs.into_iter().collect();
        }
    }
}

/// The mesh datapath: its managed maps, its node-dependent entries (policies
/// and routes, resolved when planning) and its hooks.
fn compile_mesh(spec: &LoadedSpec, desired: &mut Desired) {
    let s = &spec.spec;
    let model = mesh::compile(s);
    for map in mesh::MANAGED_MAPS {
        let r = mesh::map_ref(map);
        if let (Some(state), Some(def)) = (desired.state.maps.get_mut(&r), desired.map_defs.get(&r)) {
            state.managed = true;
            state.codec = MapCodec { key: Some(def.key.clone()), value: Some(def.value.clone()), ..Default::default() };
        }
    }
    for (iface, mode) in &model.interfaces {
        let spec_iface = s.interfaces.iter().find(|i| &i.name == iface);
        let takeover = spec_iface.and_then(|i| i.mesh.as_ref()).is_some_and(|m| m.takeover);
        let egress_position = spec_iface.and_then(|i| i.tc.as_ref()).map_or(0, |tc| tc.egress.len());
        let attachment = |program: &str, mode: Option<XdpMode>| Attachment {
            program: program.into(),
            mode,
            takeover,
            link_id: None,
            defunct: false,
            running_mode: None,
        };
        desired
            .state
            .attachments
            .insert(Hook::Xdp { interface: iface.clone() }, attachment(mesh::PROGRAM, Some(*mode)));
        desired.state.attachments.insert(
            Hook::Tc { interface: iface.clone(), direction: Direction::Egress, position: egress_position as u32 },
            attachment(mesh::EGRESS_PROGRAM, None),
        );
    }
    // Failed redirects, counted per route (a kernel without the
    // tracepoint leaves it pending; the rest of the datapath runs).
    insert_tracepoint(desired, mesh::REDIRECT_ERR_EVENT, mesh::REDIRECT_ERR_PROGRAM);
    desired.state.mesh = Some(crate::model::NodeDependent(Arc::new(model)));
    // Flow record settings: one array entry (all zero = the defaults,
    // which is also what an array holds when nothing was written).
    let r = mesh::map_ref(mesh::FLOW_CONFIG_MAP);
    if let (Some(state), Some(def)) = (desired.state.maps.get_mut(&r), desired.map_defs.get(&r)) {
        state.managed = true;
        state.codec = MapCodec { key: Some(def.key.clone()), value: Some(def.value.clone()), ..Default::default() };
        let value = crate::datapath::Plain::to_vec(&mesh::flow_config(s.flows.as_ref()));
        state.entries = if value.iter().all(|b| *b == 0) {
            Default::default()
        } else {
            [(0u32.to_ne_bytes().to_vec(), value)].into_iter().collect()
        };
    }
}

/// The drop reason slots `telemetry.drops` skips, its names resolved
/// against the kernel's own table (none to resolve: no kernel BTF read).
fn drop_filter(spec: &LoadedSpec, diags: &mut Vec<Diagnostic>) -> Vec<u32> {
    let Some(drops) = spec.spec.telemetry.as_ref().and_then(|t| t.drops.as_ref()) else { return vec![] };
    if drops.only.is_empty() && drops.ignore.is_empty() {
        return vec![];
    }
    // The running kernel's table, or the node's BTF `BPFSYNC_KERNEL_BTF`
    // names (plans made elsewhere).
    let reasons = match DropReasonNames::kernel() {
        Ok(r) => r,
        Err(e) => {
            diags.push(spec.diag("/telemetry/drops", format!("cannot name drop reasons: {e}")));
            return vec![];
        }
    };
    reasons.skipped_slots(&drops.only, &drops.ignore).unwrap_or_else(|unknown| {
        for (list, i, name) in unknown {
            let close = reasons.suggest(&name);
            let hint = if close.is_empty() {
                String::new()
            } else {
                format!(": did you mean {}?", close.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(" or "))
            };
            diags.push(spec.diag(
                &format!("/telemetry/drops/{list}/{i}"),
                format!("this kernel has no drop reason `{name}`{hint}"),
            ));
        }
        vec![]
    })
}

/// The tracepoints of the telemetry programs.
fn compile_telemetry_hooks(spec: &LoadedSpec, desired: &mut Desired) {
    let Some(t) = &spec.spec.telemetry else { return };
    for (program, event, _) in telemetry::programs(t) {
        insert_tracepoint(desired, event, program);
    }
}

/// `program` on the tracepoint `event`.
fn insert_tracepoint(desired: &mut Desired, event: &str, program: &str) {
    let hook = Hook::Tracepoint { event: event.into(), program: program.into() };
    let att = Attachment {
        program: program.into(),
        mode: None,
        takeover: false,
        link_id: None,
        defunct: false,
        running_mode: None,
    };
    desired.state.attachments.insert(hook, att);
}

/// The hooks the spec declares on interfaces and tracepoints.
fn compile_attachments(spec: &LoadedSpec, desired: &mut Desired) {
    let s = &spec.spec;
    for (i, iface) in s.interfaces.iter().enumerate() {
        if let Some(x) = &iface.xdp {
            let hook = Hook::Xdp { interface: iface.name.clone() };
            let att = Attachment {
                program: x.program.clone(),
                mode: Some(x.mode),
                takeover: x.takeover,
                link_id: None,
                defunct: false,
                running_mode: None,
            };
            desired.state.attachments.insert(hook, att);
        }
        if let Some(tc) = &iface.tc {
            for (direction, list) in [(Direction::Ingress, &tc.ingress), (Direction::Egress, &tc.egress)] {
                for (position, program) in list.iter().enumerate() {
                    let hook = Hook::Tc { interface: iface.name.clone(), direction, position: position as u32 };
                    let att = Attachment {
                        program: program.clone(),
                        mode: None,
                        takeover: tc.takeover,
                        link_id: None,
                        defunct: false,
                        running_mode: None,
                    };
                    desired.state.attachments.insert(hook, att);
                }
            }
        }
        let _ = i;
    }
    for tp in &s.tracepoints {
        insert_tracepoint(desired, &tp.event, &tp.program);
    }
}

/// The spec's programs, plus the mesh datapath's when the spec uses it.
fn with_mesh_programs(declared: &[ProgramSpec], mesh_on: bool) -> Vec<ProgramSpec> {
    let mut programs = declared.to_vec();
    if mesh_on {
        for (name, program_type, share_maps) in [
            (mesh::PROGRAM, ProgramType::Xdp, None),
            (mesh::EGRESS_PROGRAM, ProgramType::Tc, Some(mesh::PROGRAM.to_string())),
            (mesh::REDIRECT_ERR_PROGRAM, ProgramType::Tracepoint, Some(mesh::PROGRAM.to_string())),
        ] {
            programs.push(ProgramSpec {
                name: name.into(),
                builtin: Some(name.into()),
                object: None,
                function: None,
                program_type,
                share_maps,
                maps: vec![],
            });
        }
    }
    programs
}

/// Decodes an entry of `map` for display with the desired codec.
pub fn decode_key(state: &MapState, key: &[u8]) -> Value {
    match &state.codec.key {
        Some(l) => codec::decode(key, l, state.codec.key_form),
        None => codec::decode(key, &codec::Layout::Opaque { size: key.len() }, Form::Auto),
    }
}

pub fn decode_value(state: &MapState, value: &[u8]) -> Value {
    match &state.codec.value {
        Some(l) => codec::decode(value, l, state.codec.value_form),
        None => codec::decode(value, &codec::Layout::Opaque { size: value.len() }, Form::Auto),
    }
}

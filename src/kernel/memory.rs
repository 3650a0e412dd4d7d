//! An in-memory kernel for planner and executor tests.
//!
//! It models only what it was taught: program versions with ids, maps
//! (array maps hold every key: "absent" is all zeroes), links per hook, and
//! foreign programs. Each invariant here has a real-kernel test beside it.
//! Any mutating call can be made to fail, by name or by position.

use std::collections::BTreeMap;

use super::{Kernel, KernelError, LoadRequest, Scope};
use crate::model::{Attachment, ForeignProgram, Hook, MapRef, MapShape, MapState, Program, State};
use crate::object;
use crate::spec::XdpMode;

#[derive(Debug, Clone)]
struct MemProgram {
    program: Program,
}

#[derive(Debug, Clone)]
struct MemLink {
    program: String,
    digest: String,
    mode: Option<XdpMode>,
    id: u32,
}

#[derive(Debug, Default, Clone)]
pub struct MemoryKernel {
    programs: BTreeMap<String, BTreeMap<String, MemProgram>>,
    aside_programs: BTreeMap<(String, String), MemProgram>,
    maps: BTreeMap<MapRef, MapState>,
    aside_maps: BTreeMap<MapRef, MapState>,
    links: BTreeMap<Hook, MemLink>,
    pub foreign: Vec<ForeignProgram>,
    evicted: Vec<ForeignProgram>,
    pub interfaces: BTreeMap<String, u32>,
    /// Neighbour table: (interface, address) → MAC. Interfaces have MAC
    /// `02:00:00:00:00:<ifindex>`.
    pub neighbors: BTreeMap<(String, std::net::IpAddr), [u8; 6]>,
    pub events: Vec<String>,
    next_id: u32,
    writes: u64,
    calls: u64,
    /// Fail the call with this number (0-based, counting mutating calls).
    pub fail_call: Option<u64>,
    /// Fail every call of this operation.
    pub fail_op: Option<String>,
}

impl MemoryKernel {
    pub fn new() -> Self {
        MemoryKernel { next_id: 100, ..Default::default() }
    }

    pub fn with_interfaces(names: &[&str]) -> Self {
        let mut k = Self::new();
        for (i, n) in names.iter().enumerate() {
            k.interfaces.insert(n.to_string(), i as u32 + 2);
        }
        k
    }

    /// Mutating calls so far (including failed ones), for fault sweeps.
    pub fn calls(&self) -> u64 {
        self.calls
    }

    fn gate(&mut self, op: &str) -> Result<(), KernelError> {
        let n = self.calls;
        self.calls += 1;
        if self.fail_call == Some(n) || self.fail_op.as_deref() == Some(op) {
            return Err(KernelError::Injected { op: op.to_string() });
        }
        self.writes += 1;
        Ok(())
    }

    fn id(&mut self) -> u32 {
        self.next_id += 1;
        self.next_id
    }

    /// Everything, as a comparable snapshot (entries of every map).
    pub fn snapshot(&mut self) -> State {
        let scope =
            Scope { all_maps: true, interfaces: self.interfaces.keys().cloned().collect(), ..Default::default() };
        self.observe(&scope).expect("memory observe cannot fail")
    }

    fn current(&self, name: &str) -> Option<&MemProgram> {
        let versions = self.programs.get(name)?;
        let linked = self.links.values().find(|l| l.program == name).map(|l| l.digest.clone());
        linked.and_then(|d| versions.get(&d)).or_else(|| versions.values().max_by_key(|p| p.program.id))
    }
}

impl Kernel for MemoryKernel {
    fn observe(&mut self, scope: &Scope) -> Result<State, KernelError> {
        let mut s = State::default();
        for name in self.programs.keys() {
            if let Some(p) = self.current(name) {
                s.programs.insert(name.clone(), p.program.clone());
                for d in self.programs[name].keys().filter(|d| **d != p.program.digest) {
                    s.stray_programs.push((name.clone(), d.clone()));
                }
            }
        }
        for (r, m) in &self.maps {
            let read = scope.all_maps || scope.maps.contains(r) || scope.map_names.contains(&r.map);
            let mut m = m.clone();
            m.managed = read;
            if !read {
                m.entries.clear();
            }
            s.maps.insert(r.clone(), m);
        }
        for (hook, l) in &self.links {
            let defunct = hook.interface().is_some_and(|i| !self.interfaces.contains_key(i));
            s.attachments.insert(
                hook.clone(),
                Attachment {
                    program: l.program.clone(),
                    mode: l.mode,
                    takeover: false,
                    link_id: Some(l.id),
                    defunct,
                    running_mode: None,
                },
            );
        }
        for i in &scope.interfaces {
            if let Some(idx) = self.interfaces.get(i) {
                s.interfaces.insert(i.clone(), *idx);
                s.interface_macs.insert(i.clone(), [2, 0, 0, 0, 0, *idx as u8]);
            }
        }
        for n in &scope.neighbors {
            if let Some(mac) = self.neighbors.get(n) {
                s.neighbors.insert(n.clone(), *mac);
            }
        }
        s.foreign = self
            .foreign
            .iter()
            .filter(|f| f.hook.interface().is_some_and(|i| scope.interfaces.contains(i)))
            .cloned()
            .collect();
        if !scope.events.is_empty() {
            s.events = Some(scope.events.iter().filter(|e| self.events.contains(e)).cloned().collect());
        }
        Ok(s)
    }

    fn load_program(&mut self, req: &LoadRequest) -> Result<(), KernelError> {
        if self.programs.get(&req.name).is_some_and(|v| v.contains_key(&req.digest)) {
            return Ok(());
        }
        self.gate("load_program")?;
        let info = object::inspect(&req.bytes).map_err(|e| KernelError::aya("parse object", e))?;
        for m in &req.fresh_maps {
            let r = MapRef { program: req.map_owner.clone(), map: m.clone() };
            if let Some(old) = self.maps.remove(&r) {
                self.aside_maps.insert(r, old);
            }
        }
        for (name, def) in &info.maps {
            let r = MapRef { program: req.map_owner.clone(), map: name.clone() };
            let id = self.id();
            self.maps.entry(r).or_insert_with(|| MapState {
                shape: Some(MapShape {
                    map_type: def.map_type,
                    key_size: def.key_size,
                    value_size: def.value_size,
                    max_entries: def.max_entries,
                    flags: def.flags,
                }),
                id: Some(id),
                ..Default::default()
            });
        }
        let id = self.id();
        let program = Program {
            name: req.name.clone(),
            program_type: req.program_type,
            function: req.function.clone(),
            digest: req.digest.clone(),
            share_maps: (req.map_owner != req.name).then(|| req.map_owner.clone()),
            source: String::new(),
            id: Some(id),
            tag: None,
        };
        self.programs.entry(req.name.clone()).or_default().insert(req.digest.clone(), MemProgram { program });
        Ok(())
    }

    fn unload_program(&mut self, name: &str, digest: &str) -> Result<(), KernelError> {
        self.gate("unload_program")?;
        if let Some(versions) = self.programs.get_mut(name) {
            if let Some(p) = versions.remove(digest) {
                self.aside_programs.insert((name.into(), digest.into()), p);
            }
            if versions.is_empty() {
                self.programs.remove(name);
                let owned: Vec<MapRef> = self.maps.keys().filter(|r| r.program == name).cloned().collect();
                for r in owned {
                    let m = self.maps.remove(&r).unwrap();
                    self.aside_maps.insert(r, m);
                }
            }
        }
        Ok(())
    }

    fn restore_program(&mut self, name: &str, digest: &str) -> Result<(), KernelError> {
        self.gate("restore_program")?;
        let back: Vec<MapRef> = self.aside_maps.keys().filter(|r| r.program == name).cloned().collect();
        for r in back {
            let m = self.aside_maps.remove(&r).unwrap();
            self.maps.insert(r, m);
        }
        if let Some(p) = self.aside_programs.remove(&(name.to_string(), digest.to_string())) {
            self.programs.entry(name.into()).or_default().insert(digest.into(), p);
        }
        Ok(())
    }

    fn discard_program(&mut self, name: &str, digest: &str) -> Result<(), KernelError> {
        self.gate("discard_program")?;
        if let Some(versions) = self.programs.get_mut(name) {
            versions.remove(digest);
            if versions.is_empty() {
                self.programs.remove(name);
                self.maps.retain(|r, _| r.program != name);
            }
        }
        // Maps set aside for this load (their shape changed) come back to
        // the version that is still loaded.
        if self.programs.contains_key(name) {
            let back: Vec<MapRef> = self.aside_maps.keys().filter(|r| r.program == name).cloned().collect();
            for r in back {
                let m = self.aside_maps.remove(&r).unwrap();
                self.maps.insert(r, m);
            }
        }
        Ok(())
    }

    fn write_entries(&mut self, map: &MapRef, entries: &[(Vec<u8>, Vec<u8>)]) -> Result<(), KernelError> {
        if entries.is_empty() {
            return Ok(());
        }
        self.gate("write_entries")?;
        let m = self.maps.get_mut(map).ok_or_else(|| KernelError::NotFound { what: format!("no map `{map}`") })?;
        let is_array = m.shape.is_some_and(|s| s.map_type == object::BPF_MAP_TYPE_ARRAY);
        for (k, v) in entries {
            if is_array && v.iter().all(|b| *b == 0) {
                m.entries.remove(k);
            } else {
                m.entries.insert(k, v);
            }
        }
        Ok(())
    }

    fn delete_entries(&mut self, map: &MapRef, keys: &[Vec<u8>]) -> Result<(), KernelError> {
        if keys.is_empty() {
            return Ok(());
        }
        self.gate("delete_entries")?;
        let m = self.maps.get_mut(map).ok_or_else(|| KernelError::NotFound { what: format!("no map `{map}`") })?;
        // Arrays hold every index; the kernel refuses deletes with EINVAL.
        if m.shape.is_some_and(|s| s.map_type == object::BPF_MAP_TYPE_ARRAY) {
            return Err(KernelError::Unsupported { what: format!("delete entries of array map `{map}`: EINVAL") });
        }
        for k in keys {
            m.entries.remove(k);
        }
        Ok(())
    }

    fn attach(&mut self, hook: &Hook, program: &str, digest: &str, mode: Option<XdpMode>) -> Result<(), KernelError> {
        if self.links.contains_key(hook) {
            return Ok(());
        }
        self.gate("attach")?;
        if let Some(i) = hook.interface()
            && !self.interfaces.contains_key(i)
        {
            return Err(KernelError::NotFound { what: format!("interface `{i}` does not exist") });
        }
        if matches!(hook, Hook::Xdp { .. }) && self.foreign.iter().any(|f| &f.hook == hook) {
            return Err(KernelError::Unsupported { what: format!("`{hook}` is busy") });
        }
        let id = self.id();
        self.links.insert(hook.clone(), MemLink { program: program.into(), digest: digest.into(), mode, id });
        Ok(())
    }

    fn update_link(&mut self, hook: &Hook, program: &str, digest: &str) -> Result<(), KernelError> {
        self.gate("update_link")?;
        let l =
            self.links.get_mut(hook).ok_or_else(|| KernelError::NotFound { what: format!("no link on `{hook}`") })?;
        l.program = program.into();
        l.digest = digest.into();
        Ok(())
    }

    fn detach(&mut self, hook: &Hook) -> Result<(), KernelError> {
        self.gate("detach")?;
        self.links.remove(hook);
        Ok(())
    }

    fn evict(&mut self, foreign: &ForeignProgram) -> Result<(), KernelError> {
        self.gate("evict")?;
        if let Some(pos) = self.foreign.iter().position(|f| f == foreign) {
            self.evicted.push(self.foreign.remove(pos));
        }
        Ok(())
    }

    fn unevict(&mut self, foreign: &ForeignProgram) -> Result<(), KernelError> {
        self.gate("unevict")?;
        if let Some(pos) = self.evicted.iter().position(|f| f == foreign) {
            self.foreign.push(self.evicted.remove(pos));
        }
        Ok(())
    }

    fn pin_map(&mut self, map: &MapRef, _id: u32) -> Result<(), KernelError> {
        self.gate("pin_map")?;
        if let Some(m) = self.maps.get_mut(map) {
            m.pin_missing = false;
        }
        Ok(())
    }

    fn unpin_map(&mut self, map: &MapRef) -> Result<(), KernelError> {
        self.gate("unpin_map")?;
        if let Some(m) = self.maps.get_mut(map) {
            m.pin_missing = true;
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<(), KernelError> {
        self.aside_programs.clear();
        self.aside_maps.clear();
        self.evicted.clear();
        Ok(())
    }

    fn lookup_entries(&mut self, map: &MapRef, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, KernelError> {
        let m = self.maps.get(map).ok_or_else(|| KernelError::NotFound { what: format!("no map `{map}`") })?;
        Ok(keys.iter().map(|k| m.entries.get(k).map(<[u8]>::to_vec)).collect())
    }

    fn writes(&self) -> u64 {
        self.writes
    }
}

/// A memory kernel shared between an agent under test and the test itself,
/// which injects drift and faults into it while the agent runs.
impl Kernel for std::sync::Arc<std::sync::Mutex<MemoryKernel>> {
    fn observe(&mut self, scope: &Scope) -> Result<State, KernelError> {
        self.lock().unwrap_or_else(std::sync::PoisonError::into_inner).observe(scope)
    }
    fn load_program(&mut self, req: &LoadRequest) -> Result<(), KernelError> {
        self.lock().unwrap_or_else(std::sync::PoisonError::into_inner).load_program(req)
    }
    fn unload_program(&mut self, name: &str, digest: &str) -> Result<(), KernelError> {
        self.lock().unwrap_or_else(std::sync::PoisonError::into_inner).unload_program(name, digest)
    }
    fn restore_program(&mut self, name: &str, digest: &str) -> Result<(), KernelError> {
        self.lock().unwrap_or_else(std::sync::PoisonError::into_inner).restore_program(name, digest)
    }
    fn discard_program(&mut self, name: &str, digest: &str) -> Result<(), KernelError> {
        self.lock().unwrap_or_else(std::sync::PoisonError::into_inner).discard_program(name, digest)
    }
    fn write_entries(&mut self, map: &MapRef, entries: &[(Vec<u8>, Vec<u8>)]) -> Result<(), KernelError> {
        self.lock().unwrap_or_else(std::sync::PoisonError::into_inner).write_entries(map, entries)
    }
    fn delete_entries(&mut self, map: &MapRef, keys: &[Vec<u8>]) -> Result<(), KernelError> {
        self.lock().unwrap_or_else(std::sync::PoisonError::into_inner).delete_entries(map, keys)
    }
    fn attach(&mut self, hook: &Hook, program: &str, digest: &str, mode: Option<XdpMode>) -> Result<(), KernelError> {
        self.lock().unwrap_or_else(std::sync::PoisonError::into_inner).attach(hook, program, digest, mode)
    }
    fn update_link(&mut self, hook: &Hook, program: &str, digest: &str) -> Result<(), KernelError> {
        self.lock().unwrap_or_else(std::sync::PoisonError::into_inner).update_link(hook, program, digest)
    }
    fn detach(&mut self, hook: &Hook) -> Result<(), KernelError> {
        self.lock().unwrap_or_else(std::sync::PoisonError::into_inner).detach(hook)
    }
    fn evict(&mut self, foreign: &ForeignProgram) -> Result<(), KernelError> {
        self.lock().unwrap_or_else(std::sync::PoisonError::into_inner).evict(foreign)
    }
    fn unevict(&mut self, foreign: &ForeignProgram) -> Result<(), KernelError> {
        self.lock().unwrap_or_else(std::sync::PoisonError::into_inner).unevict(foreign)
    }
    fn pin_map(&mut self, map: &MapRef, id: u32) -> Result<(), KernelError> {
        self.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pin_map(map, id)
    }
    fn unpin_map(&mut self, map: &MapRef) -> Result<(), KernelError> {
        self.lock().unwrap_or_else(std::sync::PoisonError::into_inner).unpin_map(map)
    }
    fn commit(&mut self) -> Result<(), KernelError> {
        self.lock().unwrap_or_else(std::sync::PoisonError::into_inner).commit()
    }
    fn lookup_entries(&mut self, map: &MapRef, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, KernelError> {
        self.lock().unwrap_or_else(std::sync::PoisonError::into_inner).lookup_entries(map, keys)
    }
    fn writes(&self) -> u64 {
        self.lock().unwrap_or_else(std::sync::PoisonError::into_inner).writes()
    }
}

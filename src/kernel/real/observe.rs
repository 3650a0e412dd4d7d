//! Observing: bpfsync's pins and the objects they name, foreign programs on
//! declared hooks, interfaces, neighbours, tracepoint events. Each part is
//! a function of its own; [`observe`] runs them in the order their answers
//! are needed (maps before programs, programs before links).

use super::*;

/// An interface's index while observing: absent only when the kernel says so.
pub(super) fn observed_ifindex(name: &str) -> Result<Option<u32>, KernelError> {
    sys::ifindex_checked(name).map_err(|e| KernelError::sys(format!("look up interface `{name}`"), e))
}

/// One pinned version of a program.
struct Version {
    digest: String,
    program: Program,
    /// Ids of maps it holds that have no pin of ours.
    unpinned_maps: Vec<u32>,
}

/// Programs by name, every pinned version of each.
type Versions = BTreeMap<String, Vec<Version>>;
/// Program id → (name, digest) of our pinned versions.
type ByProgId = HashMap<u32, (String, String)>;

/// What the links say about the programs and interfaces.
#[derive(Default)]
struct Linked {
    /// Program name → the version a link runs.
    versions: BTreeMap<String, String>,
    /// Interface → ids of our programs attached there.
    prog_ids_on_if: HashMap<String, Vec<u32>>,
}

pub(super) fn observe(rk: &mut RealKernel, scope: &Scope) -> Result<State, KernelError> {
    let mut state = State::default();
    rk.map_fds.clear();
    let map_owner_by_id = observe_maps(rk, scope, &mut state)?;
    let (versions, by_prog_id) = observe_programs(rk, &map_owner_by_id)?;
    let linked = observe_links(rk, &by_prog_id, &mut state)?;
    pick_current_versions(rk, scope, versions, &linked, &mut state)?;
    observe_neighbors(scope, &mut state)?;
    observe_interfaces(rk, scope, &linked, &mut state)?;
    observe_events(scope, &mut state)?;
    Ok(state)
}

/// Pinned maps, with the entries of those `scope` asks for. Returns map id
/// → owning program (program→owner resolution needs it).
fn observe_maps(rk: &mut RealKernel, scope: &Scope, state: &mut State) -> Result<HashMap<u32, String>, KernelError> {
    let mut map_owner_by_id: HashMap<u32, String> = HashMap::new();
    for owner in read_pins(&rk.root.join("maps"))? {
        for map in read_pins(&rk.root.join("maps").join(&owner))? {
            let path = rk.map_pin(&owner, &map);
            let fd = rk.open_pin(&path, "map")?;
            let info = sys::map_info(fd.as_fd())
                .map_err(|e| KernelError::sys(format!("read info of map `{owner}/{map}`"), e))?;
            map_owner_by_id.insert(info.id, owner.clone());
            let r = MapRef { program: owner.clone(), map: map.clone() };
            let read = scope.all_maps || scope.maps.contains(&r) || scope.map_names.contains(&r.map);
            let m = rk.map_state(&fd, &info, &r, read)?;
            state.maps.insert(r, m);
        }
    }

    Ok(map_owner_by_id)
}

/// Every pinned program version, and program id → (name, digest).
fn observe_programs(
    rk: &mut RealKernel,
    map_owner_by_id: &HashMap<u32, String>,
) -> Result<(Versions, ByProgId), KernelError> {
    let mut versions = Versions::new();
    let mut by_prog_id = ByProgId::new();
    for name in read_pins(&rk.root.join("programs"))? {
        for digest in read_pins(&rk.root.join("programs").join(&name))? {
            let path = rk.prog_pin(&name, &digest);
            let fd = rk.open_pin(&path, "program")?;
            let (info, map_ids) = sys::prog_info(fd.as_fd())
                .map_err(|e| KernelError::sys(format!("read info of program `{name}`"), e))?;
            let owner = map_ids.iter().find_map(|id| map_owner_by_id.get(id)).cloned();
            let unpinned_maps = map_ids.iter().filter(|id| !map_owner_by_id.contains_key(id)).copied().collect();
            let program = Program {
                name: name.clone(),
                program_type: prog_type_of(info.type_).unwrap_or(ProgramType::Xdp),
                function: sys::c_name(&info.name),
                digest: digest.clone(),
                share_maps: owner.filter(|o| o != &name),
                source: String::new(),
                id: Some(info.id),
                tag: Some(tag_hex(&info.tag)),
            };
            by_prog_id.insert(info.id, (name.clone(), digest.clone()));
            versions.entry(name.clone()).or_default().push(Version { digest, program, unpinned_maps });
        }
    }

    Ok((versions, by_prog_id))
}

/// Our pinned links: which hook runs which program, and whether the link
/// still holds its interface.
fn observe_links(rk: &mut RealKernel, by_prog_id: &ByProgId, state: &mut State) -> Result<Linked, KernelError> {
    let mut linked = Linked::default();
    for pin_name in read_pins(&rk.links_dir())? {
        let Some((hook, mode)) = parse_link_pin(&pin_name) else { continue };
        let path = rk.links_dir().join(&pin_name);
        let fd = rk.open_pin(&path, "link")?;
        let info =
            sys::link_info(fd.as_fd()).map_err(|e| KernelError::sys(format!("read info of link `{hook}`"), e))?;
        // SAFETY: union members are read only for the matching link type.
        let link_if = unsafe {
            match info.type_ {
                BPF_LINK_TYPE_XDP => Some(info.__bindgen_anon_1.xdp.ifindex),
                BPF_LINK_TYPE_TCX => Some(info.__bindgen_anon_1.tcx.ifindex),
                _ => None,
            }
        };
        let expected_if = match hook.interface() {
            Some(i) => observed_ifindex(i)?,
            None => None,
        };
        let defunct = match (hook.interface(), link_if) {
            (Some(_), Some(idx)) => idx == 0 || Some(idx) != expected_if,
            (Some(_), None) => true,
            (None, _) => info.type_ != BPF_LINK_TYPE_PERF_EVENT,
        };
        let program = match by_prog_id.get(&info.prog_id) {
            Some((name, digest)) => {
                linked.versions.insert(name.clone(), digest.clone());
                name.clone()
            }
            None => format!("<foreign program id {}>", info.prog_id),
        };
        if let Some(i) = hook.interface() {
            linked.prog_ids_on_if.entry(i.to_string()).or_default().push(info.prog_id);
        }
        // Which XDP slot the kernel put it in (`auto` may mean either).
        let running_mode = match (&hook, expected_if) {
            (Hook::Xdp { .. }, Some(idx)) if !defunct => netlink::xdp_state(idx).ok().and_then(|x| {
                if x.drv_prog == Some(info.prog_id) {
                    Some(XdpMode::Driver)
                } else if x.skb_prog == Some(info.prog_id) {
                    Some(XdpMode::Skb)
                } else {
                    None
                }
            }),
            _ => None,
        };
        state
            .attachments
            .insert(hook, Attachment { program, mode, takeover: false, link_id: Some(info.id), defunct, running_mode });
    }

    Ok(linked)
}

/// One current version per program (the linked one, else the newest); the
/// rest are strays. Maps the current one holds without a pin are observed
/// too.
fn pick_current_versions(
    rk: &mut RealKernel,
    scope: &Scope,
    versions: Versions,
    linked: &Linked,
    state: &mut State,
) -> Result<(), KernelError> {
    for (name, mut vs) in versions {
        let pick = linked
            .versions
            .get(&name)
            .and_then(|d| vs.iter().position(|v| &v.digest == d))
            .unwrap_or_else(|| (0..vs.len()).max_by_key(|i| vs[*i].program.id.unwrap_or(0)).unwrap_or(0));
        let current = vs.swap_remove(pick);
        for v in vs {
            state.stray_programs.push((name.clone(), v.digest));
        }
        if current.program.share_maps.is_none() {
            for id in &current.unpinned_maps {
                rk.observe_unpinned_map(&name, *id, scope, state)?;
            }
        }
        state.programs.insert(name, current.program);
    }

    Ok(())
}

/// MACs of the next hops `scope` names, from the neighbour table.
fn observe_neighbors(scope: &Scope, state: &mut State) -> Result<(), KernelError> {
    if !scope.neighbors.is_empty() {
        let table = netlink::neighbors().map_err(|e| KernelError::io("read the neighbour table", e))?;
        for (iface, addr) in &scope.neighbors {
            let Some(idx) = observed_ifindex(iface)? else { continue };
            if let Some(n) = table.iter().find(|n| n.ifindex == idx && n.addr == *addr) {
                state.neighbors.insert((iface.clone(), *addr), n.mac);
            }
        }
    }

    Ok(())
}

/// The interfaces `scope` names: index, MAC, and programs on them that are
/// not ours (foreign).
fn observe_interfaces(
    rk: &mut RealKernel,
    scope: &Scope,
    linked: &Linked,
    state: &mut State,
) -> Result<(), KernelError> {
    let tcx = kernel_version().1 >= (6, 6);
    for iface in &scope.interfaces {
        let Some(idx) = observed_ifindex(iface)? else { continue };
        state.interfaces.insert(iface.clone(), idx);
        if let Some(mac) =
            netlink::link_mac(idx).map_err(|e| KernelError::io(format!("query the MAC of `{iface}`"), e))?
        {
            state.interface_macs.insert(iface.clone(), mac);
        }
        let ours = linked.prog_ids_on_if.get(iface).cloned().unwrap_or_default();
        let xdp = netlink::xdp_state(idx).map_err(|e| KernelError::io(format!("query XDP state of `{iface}`"), e))?;
        for (id, mode) in [(xdp.skb_prog, XdpMode::Skb), (xdp.drv_prog, XdpMode::Driver)] {
            let Some(id) = id.filter(|id| !ours.contains(id)) else { continue };
            let link_id = rk.find_link(BPF_LINK_TYPE_XDP, idx, id)?;
            state.foreign.push(ForeignProgram {
                hook: Hook::Xdp { interface: iface.clone() },
                program_id: id,
                program_name: RealKernel::prog_name_by_id(id),
                detail: format!(
                    "{} mode, {}",
                    mode.as_str(),
                    link_id.map_or("netlink".into(), |l| format!("link {l}"))
                ),
                mode: Some(mode),
                link_id,
            });
        }
        if tcx {
            for direction in [Direction::Ingress, Direction::Egress] {
                let progs = match SchedClassifier::query_tcx(iface, tc_type(direction)) {
                    Ok((_, progs)) => progs,
                    Err(e) => {
                        let e = KernelError::aya(format!("query the TCX {} chain of `{iface}`", direction.as_str()), e);
                        // The interface went between the two lookups: it has
                        // no chain. Anything else is a lookup that could not
                        // be made, not an empty chain.
                        if matches!(e.errno(), Some(libc::ENODEV) | Some(libc::ENOENT)) {
                            continue;
                        }
                        return Err(e);
                    }
                };
                for p in progs {
                    let id = p.id();
                    if ours.contains(&id) {
                        continue;
                    }
                    let link_id = rk.find_link(BPF_LINK_TYPE_TCX, idx, id)?;
                    state.foreign.push(ForeignProgram {
                        hook: Hook::Tc { interface: iface.clone(), direction, position: 0 },
                        program_id: id,
                        program_name: RealKernel::prog_name_by_id(id),
                        detail: format!(
                            "tcx {}, {}",
                            direction.as_str(),
                            link_id.map_or("prog attach".into(), |l| format!("link {l}"))
                        ),
                        mode: None,
                        link_id,
                    });
                }
            }
        }
    }
    Ok(())
}

/// Which of the tracepoint events `scope` names this kernel has.
fn observe_events(scope: &Scope, state: &mut State) -> Result<(), KernelError> {
    if !scope.events.is_empty() {
        let _ = ensure_tracefs();
        let dir = tracefs_dir();
        let mut events = Vec::new();
        for e in &scope.events {
            let Some(d) = &dir else { break };
            let id = d.join("events").join(e).join("id");
            if id.try_exists().map_err(|err| KernelError::io(format!("look for tracepoint `{e}`"), err))? {
                events.push(e.clone());
            }
        }
        state.events = Some(events);
    }
    Ok(())
}

//! Program versions: loaded and pinned beside each other, set aside,
//! restored, discarded.

use super::*;

pub(super) fn tag_hex(tag: &[u8; 8]) -> String {
    tag.iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn prog_type_of(kernel_type: u32) -> Option<ProgramType> {
    // enum bpf_prog_type: SCHED_CLS = 3, TRACEPOINT = 5, XDP = 6.
    match kernel_type {
        3 => Some(ProgramType::Tc),
        5 => Some(ProgramType::Tracepoint),
        6 => Some(ProgramType::Xdp),
        _ => None,
    }
}

impl RealKernel {
    pub(super) fn prog_name_by_id(id: u32) -> String {
        sys::prog_fd_by_id(id)
            .ok()
            .and_then(|fd| sys::prog_info(fd.as_fd()).ok())
            .map(|(i, _)| sys::c_name(&i.name))
            .unwrap_or_else(|| format!("prog{id}"))
    }
}

pub(super) fn load_program(rk: &mut RealKernel, req: &LoadRequest) -> Result<(), KernelError> {
    let pin = rk.prog_pin(&req.name, &req.digest);
    if pin.exists() {
        return Ok(());
    }
    rk.map_fds.clear();
    for m in &req.fresh_maps {
        let p = rk.map_pin(&req.map_owner, m);
        if p.exists() {
            rk.set_aside(&p)?;
        }
    }
    let info =
        object::inspect(&req.bytes).map_err(|e| KernelError::aya(format!("parse object of `{}`", req.name), e))?;
    let map_dir = rk.root.join("maps").join(&req.map_owner);
    fs::create_dir_all(&map_dir).map_err(|e| KernelError::io(format!("create `{}`", map_dir.display()), e))?;
    let mut loader = aya::EbpfLoader::new();
    for name in info.maps.keys() {
        loader.map_pin_path(name.as_str(), map_dir.join(name));
    }
    let what = format!("load program `{}` (`{}`)", req.name, req.function);
    let mut ebpf = loader.load(&object::for_aya(&req.bytes)).map_err(|e| KernelError::aya(what.clone(), e))?;
    let prog = ebpf.program_mut(&req.function).ok_or_else(|| KernelError::NotFound {
        what: format!("no function `{}` in the object of `{}`", req.function, req.name),
    })?;
    let dir = pin.parent().expect("pin has a parent");
    fs::create_dir_all(dir).map_err(|e| KernelError::io(format!("create `{}`", dir.display()), e))?;
    // Load (the verifier's log travels in the error), then pin.
    let loaded: Result<Result<(), aya::pin::PinError>, ProgramError> = match (prog, req.program_type) {
        (AyaProgram::Xdp(p), ProgramType::Xdp) => p.load().map(|_| p.pin(&pin)),
        (AyaProgram::SchedClassifier(p), ProgramType::Tc) => p.load().map(|_| p.pin(&pin)),
        (AyaProgram::TracePoint(p), ProgramType::Tracepoint) => p.load().map(|_| p.pin(&pin)),
        (_, t) => {
            return Err(KernelError::NotFound { what: format!("`{}` is not a {} program", req.function, t.as_str()) });
        }
    };
    let res = match loaded {
        Err(e) => Err(KernelError::aya(what, e)),
        Ok(Err(e)) => Err(KernelError::aya(format!("pin `{}`", pin.display()), e)),
        Ok(Ok(())) => Ok(()),
    };
    rk.wrote();
    res
}

pub(super) fn unload_program(rk: &mut RealKernel, name: &str, digest: &str) -> Result<(), KernelError> {
    rk.map_fds.clear();
    let pin = rk.prog_pin(name, digest);
    if pin.exists() {
        rk.set_aside(&pin)?;
        rk.wrote();
    }
    // The last version takes its maps along.
    let dir = rk.root.join("programs").join(name);
    if read_pins(&dir)?.is_empty() {
        let _ = fs::remove_dir(&dir);
        let maps = rk.root.join("maps").join(name);
        if maps.exists() {
            rk.set_aside(&maps)?;
        }
    }
    Ok(())
}

pub(super) fn restore_program(rk: &mut RealKernel, name: &str, digest: &str) -> Result<(), KernelError> {
    rk.map_fds.clear();
    let maps = rk.root.join("maps").join(name);
    rk.bring_back(&maps)?;
    rk.bring_back(&rk.prog_pin(name, digest))?;
    Ok(())
}

pub(super) fn discard_program(rk: &mut RealKernel, name: &str, digest: &str) -> Result<(), KernelError> {
    rk.map_fds.clear();
    let pin = rk.prog_pin(name, digest);
    if pin.exists() {
        fs::remove_file(&pin).map_err(|e| KernelError::io(format!("unpin `{}`", pin.display()), e))?;
        rk.wrote();
    }
    // Maps set aside for this load come back.
    let trash = rk.root.join("trash");
    let prefix = format!("maps:{name}:");
    for t in read_pins(&trash)?.into_iter().filter(|t| t.starts_with(&prefix)) {
        let map = &t[prefix.len()..];
        rk.bring_back(&rk.map_pin(name, map))?;
    }
    let dir = rk.root.join("programs").join(name);
    if read_pins(&dir)?.is_empty() {
        let _ = fs::remove_dir(&dir);
        let maps = rk.root.join("maps").join(name);
        if maps.exists() {
            remove_any(&maps).map_err(|e| KernelError::io(format!("remove `{}`", maps.display()), e))?;
        }
    }
    Ok(())
}

//! Links: XDP, TCX and tracepoint attachments as pinned bpf links;
//! atomic updates; foreign programs evicted and put back.

use super::*;

pub(super) fn aya_mode(mode: Option<XdpMode>) -> AyaXdpMode {
    match mode {
        Some(XdpMode::Skb) => AyaXdpMode::Skb,
        Some(XdpMode::Driver) => AyaXdpMode::Driver,
        _ => AyaXdpMode::Default,
    }
}

pub(super) fn tc_type(d: Direction) -> TcAttachType {
    match d {
        Direction::Ingress => TcAttachType::Ingress,
        Direction::Egress => TcAttachType::Egress,
    }
}

impl RealKernel {
    pub(super) fn attach_new(
        &mut self,
        hook: &Hook,
        prog_pin: &Path,
        mode: Option<XdpMode>,
        pin: &Path,
    ) -> Result<(), KernelError> {
        let what = format!("attach `{}` to `{hook}`", prog_pin.display());
        let fd_link: FdLink = match hook {
            Hook::Xdp { interface } => {
                let mut p = Xdp::from_pin(prog_pin, aya_obj::programs::XdpAttachType::Interface)
                    .map_err(|e| KernelError::aya(what.clone(), e))?;
                let id = p.attach(interface, aya_mode(mode)).map_err(|e| KernelError::aya(what.clone(), e))?;
                let link = p.take_link(id).map_err(|e| KernelError::aya(what.clone(), e))?;
                link.try_into().map_err(|_| KernelError::Unsupported {
                    what: format!("{what}: the kernel attached it without a bpf link (XDP links need Linux 5.9)"),
                })?
            }
            Hook::Tc { interface, direction, .. } => {
                let mut p = SchedClassifier::from_pin(prog_pin).map_err(|e| KernelError::aya(what.clone(), e))?;
                let opts = TcAttachOptions::TcxOrder(LinkOrder::default());
                let id = p.attach_with_options(interface, tc_type(*direction), opts).map_err(|e| {
                    let (_, v) = kernel_version();
                    if v < (6, 6) {
                        KernelError::Unsupported {
                            what: format!(
                                "{what}: TC hooks use TCX links, which need Linux 6.6 or later (this kernel is {}.{})",
                                v.0, v.1
                            ),
                        }
                    } else {
                        KernelError::aya(what.clone(), e)
                    }
                })?;
                let link = p.take_link(id).map_err(|e| KernelError::aya(what.clone(), e))?;
                link.try_into().map_err(|_| KernelError::Unsupported { what: format!("{what}: no TCX link") })?
            }
            Hook::Tracepoint { event, .. } => {
                ensure_tracefs()?;
                let (cat, name) = event.split_once('/').unwrap_or((event, ""));
                let mut p = TracePoint::from_pin(prog_pin).map_err(|e| KernelError::aya(what.clone(), e))?;
                let id = p.attach(cat, name).map_err(|e| KernelError::aya(what.clone(), e))?;
                let link = p.take_link(id).map_err(|e| KernelError::aya(what.clone(), e))?;
                link.try_into().map_err(|_| KernelError::Unsupported {
                    what: format!("{what}: the kernel gave no perf link (needs Linux 5.15)"),
                })?
            }
        };
        self.wrote();
        fd_link.pin(pin).map_err(|e| KernelError::aya(format!("pin link at `{}`", pin.display()), e))?;
        self.wrote();
        Ok(())
    }

    pub(super) fn detach_pin(&mut self, pin: &Path) -> Result<(), KernelError> {
        if let Ok(fd) = sys::obj_get(pin) {
            // A defunct link (interface gone) cannot be detached again: fine.
            match sys::link_detach(fd.as_fd()) {
                Ok(()) => self.writes += 1,
                Err(e) if matches!(e.errno(), Some(libc::ENOLINK) | Some(libc::EINVAL) | Some(libc::EOPNOTSUPP)) => {}
                Err(e) => return Err(KernelError::sys(format!("detach link pinned at `{}`", pin.display()), e)),
            }
        }
        fs::remove_file(pin).map_err(|e| KernelError::io(format!("unpin `{}`", pin.display()), e))?;
        self.wrote();
        Ok(())
    }

    /// Finds the bpf link that holds `prog_id` on `ifindex` (any owner).
    /// The link holding `prog_id` on `ifindex` (None: attached without a
    /// link). A link that goes away while the list is walked is skipped;
    /// any other failure is an error, not "no link" (the answer decides how
    /// a takeover removes the program).
    pub(super) fn find_link(&self, link_type: u32, ifindex: u32, prog_id: u32) -> Result<Option<u32>, KernelError> {
        let failed = |e| KernelError::sys("walk the kernel's links", e);
        let mut id = 0;
        while let Some(next) = sys::link_next_id(id).map_err(failed)? {
            id = next;
            let fd = match sys::link_fd_by_id(id) {
                Ok(fd) => fd,
                Err(e) if e.errno() == Some(libc::ENOENT) => continue,
                Err(e) => return Err(failed(e)),
            };
            let info = sys::link_info(fd.as_fd()).map_err(failed)?;
            if info.type_ != link_type || info.prog_id != prog_id {
                continue;
            }
            // SAFETY: the union member matches `type_` checked above.
            let link_if = unsafe {
                match link_type {
                    BPF_LINK_TYPE_XDP => info.__bindgen_anon_1.xdp.ifindex,
                    _ => info.__bindgen_anon_1.tcx.ifindex,
                }
            };
            if link_if == ifindex {
                return Ok(Some(id));
            }
        }
        Ok(None)
    }
}

pub(super) fn attach(
    rk: &mut RealKernel,
    hook: &Hook,
    program: &str,
    digest: &str,
    mode: Option<XdpMode>,
) -> Result<(), KernelError> {
    let pin = rk.links_dir().join(link_pin_name(hook, mode));
    if pin.exists() {
        return Ok(());
    }
    let prog_pin = rk.prog_pin(program, digest);
    rk.attach_new(hook, &prog_pin, mode, &pin)
}

pub(super) fn update_link(rk: &mut RealKernel, hook: &Hook, program: &str, digest: &str) -> Result<(), KernelError> {
    let prog_pin = rk.prog_pin(program, digest);
    if let Hook::Tracepoint { .. } = hook {
        // Perf links cannot be updated: attach the new one, then drop
        // the old (both run for an instant; none is missed).
        let pin = rk.links_dir().join(link_pin_name(hook, None));
        let next = rk.links_dir().join(format!("{}:next", link_pin_name(hook, None)));
        if next.exists() {
            rk.detach_pin(&next)?;
        }
        rk.attach_new(hook, &prog_pin, None, &next)?;
        if pin.exists() {
            rk.detach_pin(&pin)?;
        }
        fs::rename(&next, &pin).map_err(|e| KernelError::io(format!("rename link pin `{}`", next.display()), e))?;
        return Ok(());
    }
    let pins = rk.hook_pins(hook)?;
    let Some(link_pin) = pins.first() else {
        return Err(KernelError::NotFound { what: format!("no link on `{hook}` to update") });
    };
    let link = rk.open_pin(link_pin, "link")?;
    let prog = rk.open_pin(&prog_pin, "program")?;
    sys::link_update(link.as_fd(), prog.as_fd(), None)
        .map_err(|e| KernelError::sys(format!("update the link on `{hook}` to `{program}`"), e))?;
    rk.wrote();
    Ok(())
}

pub(super) fn detach(rk: &mut RealKernel, hook: &Hook) -> Result<(), KernelError> {
    for pin in rk.hook_pins(hook)? {
        rk.detach_pin(&pin)?;
    }
    Ok(())
}

pub(super) fn evict(rk: &mut RealKernel, f: &ForeignProgram) -> Result<(), KernelError> {
    let iface = f.hook.interface().unwrap_or_default();
    let idx =
        sys::ifindex(iface).ok_or_else(|| KernelError::NotFound { what: format!("interface `{iface}` is gone") })?;
    let what = format!("remove foreign program `{}` (id {}) from `{}`", f.program_name, f.program_id, f.hook);
    if let Some(link_id) = f.link_id {
        let fd = sys::link_fd_by_id(link_id).map_err(|e| KernelError::sys(what.clone(), e))?;
        sys::link_detach(fd.as_fd()).map_err(|e| KernelError::sys(what.clone(), e))?;
    } else {
        match &f.hook {
            Hook::Xdp { .. } => {
                let flags = if f.mode == Some(XdpMode::Driver) { XDP_FLAGS_DRV_MODE } else { XDP_FLAGS_SKB_MODE };
                netlink::xdp_set(idx, -1, flags).map_err(|e| KernelError::io(what.clone(), e))?;
            }
            Hook::Tc { direction, .. } => {
                let prog = sys::prog_fd_by_id(f.program_id).map_err(|e| KernelError::sys(what.clone(), e))?;
                let t = if *direction == Direction::Ingress { sys::BPF_TCX_INGRESS } else { sys::BPF_TCX_EGRESS };
                sys::tcx_prog_detach(idx, prog.as_fd(), t).map_err(|e| KernelError::sys(what.clone(), e))?;
            }
            Hook::Tracepoint { .. } => {}
        }
    }
    rk.wrote();
    Ok(())
}

pub(super) fn unevict(rk: &mut RealKernel, f: &ForeignProgram) -> Result<(), KernelError> {
    let what = format!("put foreign program `{}` (id {}) back on `{}`", f.program_name, f.program_id, f.hook);
    match (&f.hook, f.link_id) {
        (Hook::Xdp { interface }, None) => {
            let idx = sys::ifindex(interface).ok_or_else(|| KernelError::NotFound { what: what.clone() })?;
            let prog = sys::prog_fd_by_id(f.program_id).map_err(|e| KernelError::sys(what.clone(), e))?;
            let flags = if f.mode == Some(XdpMode::Driver) { XDP_FLAGS_DRV_MODE } else { XDP_FLAGS_SKB_MODE };
            use std::os::fd::AsRawFd;
            netlink::xdp_set(idx, prog.as_raw_fd(), flags).map_err(|e| KernelError::io(what, e))?;
            rk.wrote();
            Ok(())
        }
        _ => Err(KernelError::Unsupported { what: format!("cannot {what}: its owner's link was detached") }),
    }
}

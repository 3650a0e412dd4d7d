//! bpfsync's pins under its root: where each object lives, link pin names,
//! listing pins (a listing that fails is an error, never "nothing"), and
//! the trash that holds objects set aside until an apply ends.

use super::*;

pub(super) fn parse_mode(s: &str) -> Option<XdpMode> {
    match s {
        "skb" => Some(XdpMode::Skb),
        "driver" => Some(XdpMode::Driver),
        "auto" => Some(XdpMode::Auto),
        _ => None,
    }
}

/// Link pin name → hook and (for XDP) requested mode.
pub(super) fn parse_link_pin(name: &str) -> Option<(Hook, Option<XdpMode>)> {
    let parts: Vec<&str> = name.split(':').collect();
    match parts.as_slice() {
        ["xdp", iface, mode] => Some((Hook::Xdp { interface: iface.to_string() }, Some(parse_mode(mode)?))),
        ["tcx", iface, dir, pos] => {
            let direction = match *dir {
                "ingress" => Direction::Ingress,
                "egress" => Direction::Egress,
                _ => return None,
            };
            Some((Hook::Tc { interface: iface.to_string(), direction, position: pos.parse().ok()? }, None))
        }
        ["tp", cat, event, prog] => {
            Some((Hook::Tracepoint { event: format!("{cat}/{event}"), program: prog.to_string() }, None))
        }
        _ => None,
    }
}

pub(super) fn link_pin_name(hook: &Hook, mode: Option<XdpMode>) -> String {
    match hook {
        Hook::Xdp { interface } => format!("xdp:{interface}:{}", mode.unwrap_or_default().as_str()),
        Hook::Tc { interface, direction, position } => format!("tcx:{interface}:{}:{position}", direction.as_str()),
        Hook::Tracepoint { event, program } => format!("tp:{}:{program}", event.replace('/', ":")),
    }
}

/// The names in a pin directory, sorted; a directory that does not exist
/// holds nothing. Any other failure (EMFILE, ENOMEM, EACCES) is an error:
/// observing must never take "could not look" for "nothing is pinned",
/// which would plan to load everything again.
pub(super) fn read_pins(dir: &Path) -> Result<Vec<String>, KernelError> {
    let failed = |e| KernelError::io(format!("list `{}`", dir.display()), e);
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(failed(e)),
    };
    let mut names = Vec::new();
    for e in rd {
        names.push(e.map_err(failed)?.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

pub(super) fn remove_any(p: &Path) -> std::io::Result<()> {
    if p.is_dir() { fs::remove_dir_all(p) } else { fs::remove_file(p) }
}

impl RealKernel {
    pub(super) fn prog_pin(&self, name: &str, digest: &str) -> PathBuf {
        self.root.join("programs").join(name).join(digest)
    }

    pub(super) fn map_pin(&self, owner: &str, map: &str) -> PathBuf {
        self.root.join("maps").join(owner).join(map)
    }

    pub(super) fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    pub(super) fn trash_path(&self, original: &Path) -> PathBuf {
        let rel = original.strip_prefix(&self.root).unwrap_or(original);
        let name = rel.to_string_lossy().replace('/', ":");
        self.root.join("trash").join(name)
    }

    pub(super) fn set_aside(&mut self, path: &Path) -> Result<(), KernelError> {
        let t = self.trash_path(path);
        if t.exists() {
            remove_any(&t).map_err(|e| KernelError::io(format!("remove `{}`", t.display()), e))?;
        }
        fs::rename(path, &t).map_err(|e| KernelError::io(format!("set aside `{}`", path.display()), e))
    }

    pub(super) fn bring_back(&mut self, path: &Path) -> Result<bool, KernelError> {
        let t = self.trash_path(path);
        if !t.exists() {
            return Ok(false);
        }
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| KernelError::io(format!("create `{}`", parent.display()), e))?;
        }
        if path.exists() {
            remove_any(path).map_err(|e| KernelError::io(format!("remove `{}`", path.display()), e))?;
        }
        fs::rename(&t, path).map_err(|e| KernelError::io(format!("restore `{}`", path.display()), e))?;
        Ok(true)
    }

    pub(super) fn open_pin(&self, path: &Path, what: &str) -> Result<OwnedFd, KernelError> {
        sys::obj_get(path).map_err(|e| KernelError::sys(format!("open {what} pinned at `{}`", path.display()), e))
    }

    /// The link pin(s) of a hook (XDP may be pinned under any mode).
    pub(super) fn hook_pins(&self, hook: &Hook) -> Result<Vec<PathBuf>, KernelError> {
        let dir = self.links_dir();
        Ok(match hook {
            Hook::Xdp { interface } => {
                let prefix = format!("xdp:{interface}:");
                read_pins(&dir)?
                    .into_iter()
                    .filter(|n| n.starts_with(&prefix) && !n.ends_with(":next"))
                    .map(|n| dir.join(n))
                    .collect()
            }
            _ => {
                let p = dir.join(link_pin_name(hook, None));
                let exists = p.try_exists().map_err(|e| KernelError::io(format!("look at `{}`", p.display()), e))?;
                if exists { vec![p] } else { vec![] }
            }
        })
    }
}

pub(super) fn commit(rk: &mut RealKernel) -> Result<(), KernelError> {
    let trash = rk.root.join("trash");
    for t in read_pins(&trash)? {
        let p = trash.join(&t);
        remove_any(&p).map_err(|e| KernelError::io(format!("remove `{}`", p.display()), e))?;
        crate::fault::point("trash-removed");
    }
    Ok(())
}

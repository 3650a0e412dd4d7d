//! The real kernel backend: aya for loading and attaching, raw bpf calls
//! for pins, map contents and link updates, rtnetlink for XDP state.
//!
//! Everything bpfsync owns is pinned under its root (default
//! `/sys/fs/bpf/bpfsync`):
//!
//! ```text
//! programs/<name>/<digest>      one pin per loaded program version
//! maps/<owner>/<map>            maps, shared by the versions of a program
//! links/xdp:<if>:<mode>         XDP link (mode as requested: skb|driver|auto)
//! links/tcx:<if>:<dir>:<pos>    TCX link
//! links/tp:<cat>:<event>:<prog> tracepoint (perf) link
//! trash/…                       objects set aside during an apply
//! ```
//!
//! bpffs forbids `.` in names and interface names cannot hold `:`, so `:`
//! separates the parts of a link pin name.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, LinkOrder};
use aya::programs::tc::{SchedClassifier, TcAttachOptions, TcAttachType};
use aya::programs::trace_point::TracePoint;
use aya::programs::xdp::{Xdp, XdpMode as AyaXdpMode};
use aya::programs::{Program as AyaProgram, ProgramError};

use super::netlink::{self, XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE};
use super::sys;
use super::{Features, Kernel, KernelError, LoadRequest, Scope};
use crate::entries::Entries;
use crate::model::{Attachment, Direction, ForeignProgram, Hook, MapRef, MapShape, MapState, Program, State};
use crate::object::{self, BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_LPM_TRIE, BPF_MAP_TYPE_LRU_HASH};
use crate::spec::{ProgramType, XdpMode};

pub const DEFAULT_ROOT: &str = "/sys/fs/bpf/bpfsync";
const BPF_FS_MAGIC: i64 = 0xcafe4a11;
const TRACEFS_MAGIC: i64 = 0x74726163;

const BPF_LINK_TYPE_PERF_EVENT: u32 = 7;
const BPF_LINK_TYPE_XDP: u32 = 6;
const BPF_LINK_TYPE_TCX: u32 = 11;

pub struct RealKernel {
    root: PathBuf,
    writes: u64,
    /// Open maps: fd, map type, value size.
    map_fds: HashMap<MapRef, (OwnedFd, u32, u32)>,
}

fn fs_magic(path: &Path) -> Option<i64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: zeroed statfs is a valid out-parameter; `c` is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    (rc == 0).then_some(st.f_type as i64)
}

fn mount(source: &str, target: &Path, fstype: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let src = std::ffi::CString::new(source).unwrap();
    let tgt = std::ffi::CString::new(target.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let ty = std::ffi::CString::new(fstype).unwrap();
    // SAFETY: all pointers are valid NUL-terminated strings; no data argument.
    let rc = unsafe { libc::mount(src.as_ptr(), tgt.as_ptr(), ty.as_ptr(), 0, std::ptr::null()) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// Makes sure `root` lives on a bpf filesystem: mounts bpffs on
/// `/sys/fs/bpf` when that is where it should be and nothing is mounted.
pub fn ensure_bpffs(root: &Path) -> Result<(), KernelError> {
    match bpffs_state(root)? {
        BpffsState::Mounted => Ok(()),
        BpffsState::Unmounted => {
            mount("bpf", Path::new(SYS_BPF), "bpf").map_err(|e| KernelError::io("mount bpffs on `/sys/fs/bpf`", e))
        }
    }
}

const SYS_BPF: &str = "/sys/fs/bpf";

enum BpffsState {
    Mounted,
    /// `/sys/fs/bpf` holds the root but nothing is mounted there yet.
    Unmounted,
}

/// Whether `root` lies on bpffs; an error (with the `mount` command to run)
/// when it cannot.
fn bpffs_state(root: &Path) -> Result<BpffsState, KernelError> {
    let mut existing = root.to_path_buf();
    while !existing.exists() {
        if !existing.pop() {
            break;
        }
    }
    if fs_magic(&existing) == Some(BPF_FS_MAGIC) {
        return Ok(BpffsState::Mounted);
    }
    let sys_bpf = Path::new(SYS_BPF);
    if root.starts_with(sys_bpf) && fs_magic(sys_bpf) != Some(BPF_FS_MAGIC) {
        return Ok(BpffsState::Unmounted);
    }
    Err(KernelError::Unsupported {
        what: format!(
            "`{}` is not on a bpf filesystem: mount one with `mount -t bpf bpf {}` or choose another `--bpffs-root`",
            root.display(),
            existing.display()
        ),
    })
}

/// Makes sure tracefs is mounted (tracepoints need it).
pub fn ensure_tracefs() -> Result<(), KernelError> {
    for p in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        if fs_magic(Path::new(p)) == Some(TRACEFS_MAGIC) {
            return Ok(());
        }
    }
    mount("tracefs", Path::new("/sys/kernel/tracing"), "tracefs").map_err(|e| KernelError::Io {
        what: "mount tracefs on `/sys/kernel/tracing` (tracepoints need it)".into(),
        source: e,
    })
}

fn tracefs_dir() -> Option<PathBuf> {
    ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .map(PathBuf::from)
        .find(|p| fs_magic(p) == Some(TRACEFS_MAGIC))
}

/// `6.6.0-foo` → (6, 6).
pub fn kernel_version() -> (String, (u32, u32)) {
    // SAFETY: zeroed utsname is a valid out-parameter.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    unsafe { libc::uname(&mut u) };
    let release = sys::c_name(&u.release);
    let mut parts = release.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u32>().ok());
    let v = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (release, v)
}

/// Probes what the running kernel supports.
pub fn probe_features(root: &Path) -> Features {
    let (release, v) = kernel_version();
    Features {
        kernel_release: release,
        bpffs: ensure_bpffs(root).is_ok(),
        tracefs: tracefs_dir().is_some(),
        // Minimum kernel versions: TCX 6.6, XDP bpf_link 5.9, map batch ops 5.6.
        tcx: v >= (6, 6),
        xdp_link: v >= (5, 9),
        batch_map_ops: v >= (5, 6),
        // Minimum kernel versions: LPM trie 4.11, LRU hash 4.10, ring buffer 5.8.
        lpm_trie: sys::map_type_supported(
            crate::object::BPF_MAP_TYPE_LPM_TRIE,
            8,
            4,
            1,
            1, /* BPF_F_NO_PREALLOC */
        ),
        lru_hash: sys::map_type_supported(crate::object::BPF_MAP_TYPE_LRU_HASH, 4, 4, 1, 0),
        ringbuf: sys::map_type_supported(27 /* BPF_MAP_TYPE_RINGBUF */, 0, 0, 4096, 0),
        kernel_btf: Path::new("/sys/kernel/btf/vmlinux").exists(),
    }
}

fn aya_mode(mode: Option<XdpMode>) -> AyaXdpMode {
    match mode {
        Some(XdpMode::Skb) => AyaXdpMode::Skb,
        Some(XdpMode::Driver) => AyaXdpMode::Driver,
        _ => AyaXdpMode::Default,
    }
}

fn tc_type(d: Direction) -> TcAttachType {
    match d {
        Direction::Ingress => TcAttachType::Ingress,
        Direction::Egress => TcAttachType::Egress,
    }
}

fn parse_mode(s: &str) -> Option<XdpMode> {
    match s {
        "skb" => Some(XdpMode::Skb),
        "driver" => Some(XdpMode::Driver),
        "auto" => Some(XdpMode::Auto),
        _ => None,
    }
}

/// Link pin name → hook and (for XDP) requested mode.
fn parse_link_pin(name: &str) -> Option<(Hook, Option<XdpMode>)> {
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

fn link_pin_name(hook: &Hook, mode: Option<XdpMode>) -> String {
    match hook {
        Hook::Xdp { interface } => format!("xdp:{interface}:{}", mode.unwrap_or_default().as_str()),
        Hook::Tc { interface, direction, position } => format!("tcx:{interface}:{}:{position}", direction.as_str()),
        Hook::Tracepoint { event, program } => format!("tp:{}:{program}", event.replace('/', ":")),
    }
}

fn list_dir(dir: &Path) -> Vec<String> {
    read_pins(dir).unwrap_or_default()
}

/// The names in a pin directory, sorted; a directory that does not exist
/// holds nothing. Any other failure (EMFILE, ENOMEM, EACCES) is an error:
/// observing must never take "could not look" for "nothing is pinned",
/// which would plan to load everything again.
fn read_pins(dir: &Path) -> Result<Vec<String>, KernelError> {
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

/// An interface's index while observing: absent only when the kernel says so.
fn observed_ifindex(name: &str) -> Result<Option<u32>, KernelError> {
    sys::ifindex_checked(name).map_err(|e| KernelError::sys(format!("look up interface `{name}`"), e))
}

fn tag_hex(tag: &[u8; 8]) -> String {
    tag.iter().map(|b| format!("{b:02x}")).collect()
}

fn prog_type_of(kernel_type: u32) -> Option<ProgramType> {
    // enum bpf_prog_type: SCHED_CLS = 3, TRACEPOINT = 5, XDP = 6.
    match kernel_type {
        3 => Some(ProgramType::Tc),
        5 => Some(ProgramType::Tracepoint),
        6 => Some(ProgramType::Xdp),
        _ => None,
    }
}

impl RealKernel {
    /// Opens (creating if needed) bpfsync's root on bpffs.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, KernelError> {
        let root = root.into();
        ensure_bpffs(&root)?;
        for d in ["programs", "maps", "links", "trash"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(|e| KernelError::io(format!("create `{}`", p.display()), e))?;
        }
        Ok(RealKernel { root, writes: 0, map_fds: HashMap::new() })
    }

    /// Opens bpfsync's root for reading only: nothing is created or
    /// mounted (a root that does not exist holds nothing).
    pub fn open_read_only(root: impl Into<PathBuf>) -> Result<Self, KernelError> {
        let root = root.into();
        // Unmounted `/sys/fs/bpf`: nothing can be pinned there, so nothing
        // is owned; reading it needs no mount.
        bpffs_state(&root)?;
        Ok(RealKernel { root, writes: 0, map_fds: HashMap::new() })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Counts a mutating kernel call that was just made (and is a kill
    /// point for crash tests).
    fn wrote(&mut self) {
        self.writes += 1;
        crate::fault::point("kernel-write");
    }

    fn prog_pin(&self, name: &str, digest: &str) -> PathBuf {
        self.root.join("programs").join(name).join(digest)
    }

    fn map_pin(&self, owner: &str, map: &str) -> PathBuf {
        self.root.join("maps").join(owner).join(map)
    }

    fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    fn trash_path(&self, original: &Path) -> PathBuf {
        let rel = original.strip_prefix(&self.root).unwrap_or(original);
        let name = rel.to_string_lossy().replace('/', ":");
        self.root.join("trash").join(name)
    }

    fn set_aside(&mut self, path: &Path) -> Result<(), KernelError> {
        let t = self.trash_path(path);
        if t.exists() {
            remove_any(&t).map_err(|e| KernelError::io(format!("remove `{}`", t.display()), e))?;
        }
        fs::rename(path, &t).map_err(|e| KernelError::io(format!("set aside `{}`", path.display()), e))
    }

    fn bring_back(&mut self, path: &Path) -> Result<bool, KernelError> {
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

    fn open_pin(&self, path: &Path, what: &str) -> Result<OwnedFd, KernelError> {
        sys::obj_get(path).map_err(|e| KernelError::sys(format!("open {what} pinned at `{}`", path.display()), e))
    }

    /// The link pin(s) of a hook (XDP may be pinned under any mode).
    fn hook_pins(&self, hook: &Hook) -> Vec<PathBuf> {
        let dir = self.links_dir();
        match hook {
            Hook::Xdp { interface } => {
                let prefix = format!("xdp:{interface}:");
                list_dir(&dir)
                    .into_iter()
                    .filter(|n| n.starts_with(&prefix) && !n.ends_with(":next"))
                    .map(|n| dir.join(n))
                    .collect()
            }
            _ => {
                let p = dir.join(link_pin_name(hook, None));
                if p.exists() { vec![p] } else { vec![] }
            }
        }
    }

    fn map_fd(&mut self, map: &MapRef) -> Result<(&OwnedFd, u32, u32), KernelError> {
        if !self.map_fds.contains_key(map) {
            let path = self.map_pin(&map.program, &map.map);
            let fd = match sys::obj_get(&path) {
                Ok(fd) => fd,
                Err(e) if e.errno() == Some(libc::ENOENT) => {
                    return Err(KernelError::NotFound {
                        what: format!("map `{map}` is not pinned at `{}`", path.display()),
                    });
                }
                Err(e) => return Err(KernelError::sys(format!("open map `{map}` pinned at `{}`", path.display()), e)),
            };
            let info =
                sys::map_info(fd.as_fd()).map_err(|e| KernelError::sys(format!("read info of map `{map}`"), e))?;
            self.map_fds.insert(map.clone(), (fd, info.type_, info.value_size));
        }
        let (fd, t, vs) = &self.map_fds[map];
        Ok((fd, *t, *vs))
    }

    fn attach_new(
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

    fn detach_pin(&mut self, pin: &Path) -> Result<(), KernelError> {
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

    fn read_map(&self, fd: &OwnedFd, shape: &MapShape) -> Result<Entries, sys::SysError> {
        let ks = shape.key_size as usize;
        let percpu = matches!(shape.map_type, 5 | 6 | 10); // percpu hash/array/lru
        let vs = if percpu {
            (shape.value_size as usize).div_ceil(8) * 8 * sys::possible_cpus()
        } else {
            shape.value_size as usize
        };
        let is_array = matches!(shape.map_type, BPF_MAP_TYPE_ARRAY | 6);
        let batchable =
            matches!(shape.map_type, BPF_MAP_TYPE_HASH | BPF_MAP_TYPE_ARRAY | BPF_MAP_TYPE_LRU_HASH | 5 | 6);
        if !matches!(
            shape.map_type,
            BPF_MAP_TYPE_HASH | BPF_MAP_TYPE_ARRAY | BPF_MAP_TYPE_LRU_HASH | BPF_MAP_TYPE_LPM_TRIE | 5 | 6 | 10
        ) {
            return Ok(Entries::new()); // ring buffers, perf arrays, …: no key/value contents
        }
        if batchable && ks > 0 {
            match sys::map_lookup_all_batch(fd.as_fd(), ks, vs, shape.max_entries as usize) {
                Ok((keys, values)) => {
                    let present = |v: &[u8]| !(is_array && v.iter().all(|b| *b == 0));
                    return Ok(Entries::from_columns(ks, vs, &keys, &values, present));
                }
                Err(e) if sys::batch_unsupported(&e) => {}
                Err(e) => return Err(e),
            }
        }
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        let mut key: Option<Vec<u8>> = None;
        let mut next = vec![0u8; ks];
        let mut value = vec![0u8; vs];
        while sys::map_next_key(fd.as_fd(), key.as_deref(), &mut next)? {
            if sys::map_lookup(fd.as_fd(), &next, &mut value)? && !(is_array && value.iter().all(|b| *b == 0)) {
                keys.extend_from_slice(&next);
                values.extend_from_slice(&value);
            }
            key = Some(next.clone());
        }
        Ok(Entries::from_columns(ks, vs, &keys, &values, |_| true))
    }

    /// Records a map that `owner`'s program holds but whose pin is gone, under
    /// the kernel's (possibly cut) name for it. Maps without a pin by design
    /// (`.rodata`, `.bss`: aya does not pin them) are left out.
    fn observe_unpinned_map(&self, owner: &str, id: u32, scope: &Scope, state: &mut State) -> Result<(), KernelError> {
        let fd = match sys::map_fd_by_id(id) {
            Ok(fd) => fd,
            // Freed between reading the program and now: nothing to repair.
            Err(e) if e.errno() == Some(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(KernelError::sys(format!("open map id {id} of program `{owner}`"), e)),
        };
        let info = sys::map_info(fd.as_fd()).map_err(|e| KernelError::sys(format!("read info of map id {id}"), e))?;
        let name = sys::c_name(&info.name);
        if name.is_empty() || name.starts_with('.') {
            return Ok(());
        }
        let shape = MapShape {
            map_type: info.type_,
            key_size: info.key_size,
            value_size: info.value_size,
            max_entries: info.max_entries,
            flags: info.map_flags,
        };
        let cut = |m: &str| m.get(..crate::model::KERNEL_NAME_MAX).unwrap_or(m).to_string();
        let read = scope.all_maps
            || scope.maps.iter().any(|r| r.program == owner && cut(&r.map) == name)
            || scope.map_names.iter().any(|m| cut(m) == name);
        let r = MapRef { program: owner.to_string(), map: name };
        let entries = if read {
            self.read_map(&fd, &shape).map_err(|e| KernelError::sys(format!("read map `{r}`"), e))?
        } else {
            Default::default()
        };
        state.maps.insert(
            r,
            MapState {
                shape: Some(shape),
                managed: read,
                entries,
                codec: Default::default(),
                id: Some(id),
                pin_missing: true,
            },
        );
        Ok(())
    }

    /// Finds the bpf link that holds `prog_id` on `ifindex` (any owner).
    fn find_link(&self, link_type: u32, ifindex: u32, prog_id: u32) -> Option<u32> {
        let mut id = 0;
        while let Ok(Some(next)) = sys::link_next_id(id) {
            id = next;
            let Ok(fd) = sys::link_fd_by_id(id) else { continue };
            let Ok(info) = sys::link_info(fd.as_fd()) else { continue };
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
                return Some(id);
            }
        }
        None
    }

    fn prog_name_by_id(id: u32) -> String {
        sys::prog_fd_by_id(id)
            .ok()
            .and_then(|fd| sys::prog_info(fd.as_fd()).ok())
            .map(|(i, _)| sys::c_name(&i.name))
            .unwrap_or_else(|| format!("prog{id}"))
    }
}

/// The key after `key` in an LPM trie (None: there is none).
///
/// The kernel's `trie_get_next_key` walks the trie in postorder and, for a
/// key that is not in the trie *exactly* (same prefix length and bits),
/// returns the first key of that order
/// (<https://github.com/torvalds/linux/blob/master/kernel/bpf/lpm_trie.c>).
/// The key after a present key is never the first one, so
/// `next(key) != next(None)` holds exactly when `key` is present.
fn lpm_next(fd: &OwnedFd, key_size: usize, key: Option<&[u8]>) -> Result<Option<Vec<u8>>, sys::SysError> {
    let mut next = vec![0u8; key_size];
    Ok(sys::map_next_key(fd.as_fd(), key, &mut next)?.then_some(next))
}

fn remove_any(p: &Path) -> std::io::Result<()> {
    if p.is_dir() { fs::remove_dir_all(p) } else { fs::remove_file(p) }
}

impl Kernel for RealKernel {
    fn observe(&mut self, scope: &Scope) -> Result<State, KernelError> {
        let mut state = State::default();
        self.map_fds.clear();

        // Maps first: program→owner resolution needs their ids.
        let mut map_owner_by_id: HashMap<u32, String> = HashMap::new();
        for owner in read_pins(&self.root.join("maps"))? {
            for map in read_pins(&self.root.join("maps").join(&owner))? {
                let path = self.map_pin(&owner, &map);
                let fd = self.open_pin(&path, "map")?;
                let info = sys::map_info(fd.as_fd())
                    .map_err(|e| KernelError::sys(format!("read info of map `{owner}/{map}`"), e))?;
                let shape = MapShape {
                    map_type: info.type_,
                    key_size: info.key_size,
                    value_size: info.value_size,
                    max_entries: info.max_entries,
                    flags: info.map_flags,
                };
                map_owner_by_id.insert(info.id, owner.clone());
                let r = MapRef { program: owner.clone(), map: map.clone() };
                let read = scope.all_maps || scope.maps.contains(&r) || scope.map_names.contains(&r.map);
                let entries = if read {
                    self.read_map(&fd, &shape).map_err(|e| KernelError::sys(format!("read map `{r}`"), e))?
                } else {
                    Default::default()
                };
                state.maps.insert(
                    r,
                    MapState {
                        shape: Some(shape),
                        managed: read,
                        entries,
                        codec: Default::default(),
                        id: Some(info.id),
                        pin_missing: false,
                    },
                );
            }
        }

        // Program versions.
        struct Version {
            digest: String,
            program: Program,
            /// Ids of maps it holds that have no pin of ours.
            unpinned_maps: Vec<u32>,
        }
        let mut versions: BTreeMap<String, Vec<Version>> = BTreeMap::new();
        let mut by_prog_id: HashMap<u32, (String, String)> = HashMap::new();
        for name in read_pins(&self.root.join("programs"))? {
            for digest in read_pins(&self.root.join("programs").join(&name))? {
                let path = self.prog_pin(&name, &digest);
                let fd = self.open_pin(&path, "program")?;
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

        // Links.
        let mut linked_versions: BTreeMap<String, String> = BTreeMap::new();
        let mut our_prog_ids_on_if: HashMap<String, Vec<u32>> = HashMap::new();
        for pin_name in read_pins(&self.links_dir())? {
            let Some((hook, mode)) = parse_link_pin(&pin_name) else { continue };
            let path = self.links_dir().join(&pin_name);
            let fd = self.open_pin(&path, "link")?;
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
                    linked_versions.insert(name.clone(), digest.clone());
                    name.clone()
                }
                None => format!("<foreign program id {}>", info.prog_id),
            };
            if let Some(i) = hook.interface() {
                our_prog_ids_on_if.entry(i.to_string()).or_default().push(info.prog_id);
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
            state.attachments.insert(
                hook,
                Attachment { program, mode, takeover: false, link_id: Some(info.id), defunct, running_mode },
            );
        }

        // One current version per program; the rest are strays.
        for (name, mut vs) in versions {
            let pick = linked_versions
                .get(&name)
                .and_then(|d| vs.iter().position(|v| &v.digest == d))
                .unwrap_or_else(|| (0..vs.len()).max_by_key(|i| vs[*i].program.id.unwrap_or(0)).unwrap_or(0));
            let current = vs.swap_remove(pick);
            for v in vs {
                state.stray_programs.push((name.clone(), v.digest));
            }
            if current.program.share_maps.is_none() {
                for id in &current.unpinned_maps {
                    self.observe_unpinned_map(&name, *id, scope, &mut state)?;
                }
            }
            state.programs.insert(name, current.program);
        }

        if !scope.neighbors.is_empty() {
            let table = netlink::neighbors().map_err(|e| KernelError::io("read the neighbour table", e))?;
            for (iface, addr) in &scope.neighbors {
                let Some(idx) = observed_ifindex(iface)? else { continue };
                if let Some(n) = table.iter().find(|n| n.ifindex == idx && n.addr == *addr) {
                    state.neighbors.insert((iface.clone(), *addr), n.mac);
                }
            }
        }

        // Interfaces and foreign programs on them.
        let tcx = kernel_version().1 >= (6, 6);
        for iface in &scope.interfaces {
            let Some(idx) = observed_ifindex(iface)? else { continue };
            state.interfaces.insert(iface.clone(), idx);
            if let Some(mac) =
                netlink::link_mac(idx).map_err(|e| KernelError::io(format!("query the MAC of `{iface}`"), e))?
            {
                state.interface_macs.insert(iface.clone(), mac);
            }
            let ours = our_prog_ids_on_if.get(iface).cloned().unwrap_or_default();
            let xdp =
                netlink::xdp_state(idx).map_err(|e| KernelError::io(format!("query XDP state of `{iface}`"), e))?;
            for (id, mode) in [(xdp.skb_prog, XdpMode::Skb), (xdp.drv_prog, XdpMode::Driver)] {
                let Some(id) = id.filter(|id| !ours.contains(id)) else { continue };
                let link_id = self.find_link(BPF_LINK_TYPE_XDP, idx, id);
                state.foreign.push(ForeignProgram {
                    hook: Hook::Xdp { interface: iface.clone() },
                    program_id: id,
                    program_name: Self::prog_name_by_id(id),
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
                    let Ok((_, progs)) = SchedClassifier::query_tcx(iface, tc_type(direction)) else { continue };
                    for p in progs {
                        let id = p.id();
                        if ours.contains(&id) {
                            continue;
                        }
                        let link_id = self.find_link(BPF_LINK_TYPE_TCX, idx, id);
                        state.foreign.push(ForeignProgram {
                            hook: Hook::Tc { interface: iface.clone(), direction, position: 0 },
                            program_id: id,
                            program_name: Self::prog_name_by_id(id),
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
        Ok(state)
    }

    fn load_program(&mut self, req: &LoadRequest) -> Result<(), KernelError> {
        let pin = self.prog_pin(&req.name, &req.digest);
        if pin.exists() {
            return Ok(());
        }
        self.map_fds.clear();
        for m in &req.fresh_maps {
            let p = self.map_pin(&req.map_owner, m);
            if p.exists() {
                self.set_aside(&p)?;
            }
        }
        let info =
            object::inspect(&req.bytes).map_err(|e| KernelError::aya(format!("parse object of `{}`", req.name), e))?;
        let map_dir = self.root.join("maps").join(&req.map_owner);
        fs::create_dir_all(&map_dir).map_err(|e| KernelError::io(format!("create `{}`", map_dir.display()), e))?;
        let mut loader = aya::EbpfLoader::new();
        for name in info.maps.keys() {
            loader.map_pin_path(name.as_str(), map_dir.join(name));
        }
        let what = format!("load program `{}` (`{}`)", req.name, req.function);
        let mut ebpf = loader.load(&req.bytes).map_err(|e| KernelError::aya(what.clone(), e))?;
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
                return Err(KernelError::NotFound {
                    what: format!("`{}` is not a {} program", req.function, t.as_str()),
                });
            }
        };
        let res = match loaded {
            Err(e) => Err(KernelError::aya(what, e)),
            Ok(Err(e)) => Err(KernelError::aya(format!("pin `{}`", pin.display()), e)),
            Ok(Ok(())) => Ok(()),
        };
        self.wrote();
        res
    }

    fn unload_program(&mut self, name: &str, digest: &str) -> Result<(), KernelError> {
        self.map_fds.clear();
        let pin = self.prog_pin(name, digest);
        if pin.exists() {
            self.set_aside(&pin)?;
            self.wrote();
        }
        // The last version takes its maps along.
        let dir = self.root.join("programs").join(name);
        if list_dir(&dir).is_empty() {
            let _ = fs::remove_dir(&dir);
            let maps = self.root.join("maps").join(name);
            if maps.exists() {
                self.set_aside(&maps)?;
            }
        }
        Ok(())
    }

    fn restore_program(&mut self, name: &str, digest: &str) -> Result<(), KernelError> {
        self.map_fds.clear();
        let maps = self.root.join("maps").join(name);
        self.bring_back(&maps)?;
        self.bring_back(&self.prog_pin(name, digest))?;
        Ok(())
    }

    fn discard_program(&mut self, name: &str, digest: &str) -> Result<(), KernelError> {
        self.map_fds.clear();
        let pin = self.prog_pin(name, digest);
        if pin.exists() {
            fs::remove_file(&pin).map_err(|e| KernelError::io(format!("unpin `{}`", pin.display()), e))?;
            self.wrote();
        }
        // Maps set aside for this load come back.
        let trash = self.root.join("trash");
        let prefix = format!("maps:{name}:");
        for t in list_dir(&trash).into_iter().filter(|t| t.starts_with(&prefix)) {
            let map = &t[prefix.len()..];
            self.bring_back(&self.map_pin(name, map))?;
        }
        let dir = self.root.join("programs").join(name);
        if list_dir(&dir).is_empty() {
            let _ = fs::remove_dir(&dir);
            let maps = self.root.join("maps").join(name);
            if maps.exists() {
                remove_any(&maps).map_err(|e| KernelError::io(format!("remove `{}`", maps.display()), e))?;
            }
        }
        Ok(())
    }

    fn write_entries(&mut self, map: &MapRef, entries: &[(Vec<u8>, Vec<u8>)]) -> Result<(), KernelError> {
        if entries.is_empty() {
            return Ok(());
        }
        let (fd, map_type, _) = self.map_fd(map)?;
        let fd = fd.try_clone().map_err(|e| KernelError::io("duplicate map fd", e))?;
        let batchable = matches!(map_type, BPF_MAP_TYPE_HASH | BPF_MAP_TYPE_ARRAY | BPF_MAP_TYPE_LRU_HASH);
        if entries.len() > 1 && batchable {
            let keys: Vec<u8> = entries.iter().flat_map(|(k, _)| k.iter().copied()).collect();
            let values: Vec<u8> = entries.iter().flat_map(|(_, v)| v.iter().copied()).collect();
            let res = sys::map_update_batch(fd.as_fd(), &keys, &values, entries.len());
            self.wrote();
            match res {
                Ok(()) => return Ok(()),
                Err((_, e)) if sys::batch_unsupported(&e) => {}
                Err((done, e)) => {
                    return Err(KernelError::sys(
                        format!("write {} entries to map `{map}` (stopped after {done})", entries.len()),
                        e,
                    ));
                }
            }
        }
        for (k, v) in entries {
            let res = sys::map_update(fd.as_fd(), k, v);
            self.wrote();
            res.map_err(|e| KernelError::sys(format!("write an entry of map `{map}`"), e))?;
        }
        Ok(())
    }

    fn delete_entries(&mut self, map: &MapRef, keys: &[Vec<u8>]) -> Result<(), KernelError> {
        if keys.is_empty() {
            return Ok(());
        }
        let (fd, map_type, _) = self.map_fd(map)?;
        let fd = fd.try_clone().map_err(|e| KernelError::io("duplicate map fd", e))?;
        if keys.len() > 1 && matches!(map_type, BPF_MAP_TYPE_HASH | BPF_MAP_TYPE_LRU_HASH) {
            let flat: Vec<u8> = keys.iter().flat_map(|k| k.iter().copied()).collect();
            let res = sys::map_delete_batch(fd.as_fd(), &flat, keys.len());
            self.wrote();
            match res {
                Ok(()) => return Ok(()),
                // A missing key stops the batch: finish one by one (idempotent).
                Err((_, e)) if sys::batch_unsupported(&e) || e.errno() == Some(libc::ENOENT) => {}
                Err((_, e)) => {
                    return Err(KernelError::sys(format!("delete {} entries of map `{map}`", keys.len()), e));
                }
            }
        }
        for k in keys {
            let res = sys::map_delete(fd.as_fd(), k);
            self.wrote();
            res.map_err(|e| KernelError::sys(format!("delete an entry of map `{map}`"), e))?;
        }
        Ok(())
    }

    fn attach(&mut self, hook: &Hook, program: &str, digest: &str, mode: Option<XdpMode>) -> Result<(), KernelError> {
        let pin = self.links_dir().join(link_pin_name(hook, mode));
        if pin.exists() {
            return Ok(());
        }
        let prog_pin = self.prog_pin(program, digest);
        self.attach_new(hook, &prog_pin, mode, &pin)
    }

    fn update_link(&mut self, hook: &Hook, program: &str, digest: &str) -> Result<(), KernelError> {
        let prog_pin = self.prog_pin(program, digest);
        if let Hook::Tracepoint { .. } = hook {
            // Perf links cannot be updated: attach the new one, then drop
            // the old (both run for an instant; none is missed).
            let pin = self.links_dir().join(link_pin_name(hook, None));
            let next = self.links_dir().join(format!("{}:next", link_pin_name(hook, None)));
            if next.exists() {
                self.detach_pin(&next)?;
            }
            self.attach_new(hook, &prog_pin, None, &next)?;
            if pin.exists() {
                self.detach_pin(&pin)?;
            }
            fs::rename(&next, &pin).map_err(|e| KernelError::io(format!("rename link pin `{}`", next.display()), e))?;
            return Ok(());
        }
        let pins = self.hook_pins(hook);
        let Some(link_pin) = pins.first() else {
            return Err(KernelError::NotFound { what: format!("no link on `{hook}` to update") });
        };
        let link = self.open_pin(link_pin, "link")?;
        let prog = self.open_pin(&prog_pin, "program")?;
        sys::link_update(link.as_fd(), prog.as_fd(), None)
            .map_err(|e| KernelError::sys(format!("update the link on `{hook}` to `{program}`"), e))?;
        self.wrote();
        Ok(())
    }

    fn detach(&mut self, hook: &Hook) -> Result<(), KernelError> {
        for pin in self.hook_pins(hook) {
            self.detach_pin(&pin)?;
        }
        Ok(())
    }

    fn evict(&mut self, f: &ForeignProgram) -> Result<(), KernelError> {
        let iface = f.hook.interface().unwrap_or_default();
        let idx = sys::ifindex(iface)
            .ok_or_else(|| KernelError::NotFound { what: format!("interface `{iface}` is gone") })?;
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
        self.wrote();
        Ok(())
    }

    fn unevict(&mut self, f: &ForeignProgram) -> Result<(), KernelError> {
        let what = format!("put foreign program `{}` (id {}) back on `{}`", f.program_name, f.program_id, f.hook);
        match (&f.hook, f.link_id) {
            (Hook::Xdp { interface }, None) => {
                let idx = sys::ifindex(interface).ok_or_else(|| KernelError::NotFound { what: what.clone() })?;
                let prog = sys::prog_fd_by_id(f.program_id).map_err(|e| KernelError::sys(what.clone(), e))?;
                let flags = if f.mode == Some(XdpMode::Driver) { XDP_FLAGS_DRV_MODE } else { XDP_FLAGS_SKB_MODE };
                use std::os::fd::AsRawFd;
                netlink::xdp_set(idx, prog.as_raw_fd(), flags).map_err(|e| KernelError::io(what, e))?;
                self.wrote();
                Ok(())
            }
            _ => Err(KernelError::Unsupported { what: format!("cannot {what}: its owner's link was detached") }),
        }
    }

    fn pin_map(&mut self, map: &MapRef, id: u32) -> Result<(), KernelError> {
        self.map_fds.clear();
        let pin = self.map_pin(&map.program, &map.map);
        if pin.exists() {
            return Ok(());
        }
        let fd = sys::map_fd_by_id(id).map_err(|e| KernelError::sys(format!("open map `{map}` (id {id})"), e))?;
        if let Some(dir) = pin.parent() {
            fs::create_dir_all(dir).map_err(|e| KernelError::io(format!("create `{}`", dir.display()), e))?;
        }
        sys::obj_pin(fd.as_fd(), &pin)
            .map_err(|e| KernelError::sys(format!("pin map `{map}` at `{}`", pin.display()), e))?;
        self.wrote();
        Ok(())
    }

    fn unpin_map(&mut self, map: &MapRef) -> Result<(), KernelError> {
        self.map_fds.clear();
        let pin = self.map_pin(&map.program, &map.map);
        match fs::remove_file(&pin) {
            Ok(()) => {
                self.wrote();
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(KernelError::io(format!("unpin `{}`", pin.display()), e)),
        }
    }

    fn commit(&mut self) -> Result<(), KernelError> {
        let trash = self.root.join("trash");
        for t in list_dir(&trash) {
            let p = trash.join(&t);
            remove_any(&p).map_err(|e| KernelError::io(format!("remove `{}`", p.display()), e))?;
            crate::fault::point("trash-removed");
        }
        Ok(())
    }

    fn lookup_entries(&mut self, map: &MapRef, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, KernelError> {
        let (fd, map_type, value_size) = self.map_fd(map)?;
        let is_array = map_type == BPF_MAP_TYPE_ARRAY;
        let lpm = map_type == BPF_MAP_TYPE_LPM_TRIE;
        let failed = |e| KernelError::sys(format!("look up an entry of map `{map}`"), e);
        // An LPM lookup answers with the longest match, not the key itself:
        // a deleted /24 "reads back" as the /0 that still covers it. Whether
        // the exact key is there is asked through get_next_key (below).
        let key_size = keys.first().map_or(0, Vec::len);
        let first = if lpm && key_size > 0 { Some(lpm_next(fd, key_size, None).map_err(failed)?) } else { None };
        let mut value = vec![0u8; value_size as usize];
        keys.iter()
            .map(|k| {
                let mut found = sys::map_lookup(fd.as_fd(), k, &mut value).map_err(failed)?;
                if found && let Some(first) = &first {
                    found = lpm_next(fd, key_size, Some(k)).map_err(failed)? != *first;
                }
                Ok((found && !(is_array && value.iter().all(|b| *b == 0))).then(|| value.clone()))
            })
            .collect()
    }

    fn writes(&self) -> u64 {
        self.writes
    }
}

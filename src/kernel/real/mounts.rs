//! bpffs and tracefs: found, mounted where bpfsync may mount them, or
//! refused with the `mount` command to run; kernel version and features.

use super::*;

pub(super) fn fs_magic(path: &Path) -> Option<i64> {
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

pub(super) enum BpffsState {
    Mounted,
    /// `/sys/fs/bpf` holds the root but nothing is mounted there yet.
    Unmounted,
}

/// Whether `root` lies on bpffs; an error (with the `mount` command to run)
/// when it cannot.
pub(super) fn bpffs_state(root: &Path) -> Result<BpffsState, KernelError> {
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

pub(super) fn tracefs_dir() -> Option<PathBuf> {
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

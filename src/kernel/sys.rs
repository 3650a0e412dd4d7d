//! The raw `bpf(2)` calls aya does not expose as plain bytes: pins, map
//! contents of any map, object info, link update and detach.
//!
//! Each wrapper builds the part of `union bpf_attr` its command reads and
//! passes that size; the kernel zero-extends shorter attrs
//! (<https://docs.kernel.org/userspace-api/ebpf/syscall.html>).

use std::ffi::CString;
use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use aya_obj::generated::{bpf_link_info, bpf_map_info, bpf_prog_info};

const BPF_MAP_LOOKUP_ELEM: u32 = 1;
const BPF_MAP_UPDATE_ELEM: u32 = 2;
const BPF_MAP_DELETE_ELEM: u32 = 3;
const BPF_MAP_GET_NEXT_KEY: u32 = 4;
const BPF_OBJ_PIN: u32 = 6;
const BPF_OBJ_GET: u32 = 7;
const BPF_PROG_DETACH: u32 = 9;
const BPF_PROG_GET_FD_BY_ID: u32 = 13;
const BPF_MAP_GET_FD_BY_ID: u32 = 14;
const BPF_OBJ_GET_INFO_BY_FD: u32 = 15;
const BPF_MAP_LOOKUP_BATCH: u32 = 24;
const BPF_MAP_UPDATE_BATCH: u32 = 26;
const BPF_MAP_DELETE_BATCH: u32 = 27;
const BPF_LINK_UPDATE: u32 = 29;
const BPF_LINK_GET_FD_BY_ID: u32 = 30;
const BPF_LINK_DETACH: u32 = 34;

pub const BPF_ANY: u64 = 0;
pub const BPF_F_REPLACE: u32 = 4;
pub const BPF_TCX_INGRESS: u32 = 46;
pub const BPF_TCX_EGRESS: u32 = 47;

/// A failed bpf call: which command, and the kernel's errno.
#[derive(Debug, thiserror::Error)]
#[error("`{call}` failed")]
pub struct SysError {
    pub call: &'static str,
    #[source]
    pub source: io::Error,
}

impl SysError {
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

pub type SysResult<T> = Result<T, SysError>;

fn bpf<T>(cmd: u32, attr: &mut T, call: &'static str) -> SysResult<i64> {
    // SAFETY: `attr` is a live, initialised repr(C) struct of the size passed.
    let ret =
        unsafe { libc::syscall(libc::SYS_bpf, cmd as libc::c_long, attr as *mut T, size_of::<T>() as libc::c_long) };
    if ret < 0 { Err(SysError { call, source: io::Error::last_os_error() }) } else { Ok(ret) }
}

fn fd_result(ret: i64) -> OwnedFd {
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(ret as i32) }
}

#[repr(C)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    /// Explicit tail padding: the kernel rejects non-zero bytes past the
    /// fields it knows.
    _pad: u32,
}

fn c_path(path: &Path) -> SysResult<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(path.as_os_str().as_bytes()).map_err(|_| SysError {
        call: "path",
        source: io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"),
    })
}

/// Opens a pinned object.
pub fn obj_get(path: &Path) -> SysResult<OwnedFd> {
    let c = c_path(path)?;
    let mut a = ObjAttr { pathname: c.as_ptr() as u64, bpf_fd: 0, file_flags: 0, path_fd: 0, _pad: 0 };
    bpf(BPF_OBJ_GET, &mut a, "BPF_OBJ_GET").map(fd_result)
}

pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> SysResult<()> {
    let c = c_path(path)?;
    let mut a =
        ObjAttr { pathname: c.as_ptr() as u64, bpf_fd: fd.as_raw_fd() as u32, file_flags: 0, path_fd: 0, _pad: 0 };
    bpf(BPF_OBJ_PIN, &mut a, "BPF_OBJ_PIN").map(|_| ())
}

#[repr(C)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

/// Whether the kernel creates a map of this type and shape (the map is
/// closed again at once): a feature probe.
pub fn map_type_supported(map_type: u32, key_size: u32, value_size: u32, max_entries: u32, flags: u32) -> bool {
    const BPF_MAP_CREATE: u32 = 0;
    let mut a = MapCreateAttr { map_type, key_size, value_size, max_entries, map_flags: flags };
    bpf(BPF_MAP_CREATE, &mut a, "BPF_MAP_CREATE").map(fd_result).is_ok()
}

#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

pub fn map_lookup(fd: BorrowedFd<'_>, key: &[u8], value: &mut [u8]) -> SysResult<bool> {
    let mut a = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key: key.as_ptr() as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    match bpf(BPF_MAP_LOOKUP_ELEM, &mut a, "BPF_MAP_LOOKUP_ELEM") {
        Ok(_) => Ok(true),
        Err(e) if e.errno() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

pub fn map_update(fd: BorrowedFd<'_>, key: &[u8], value: &[u8]) -> SysResult<()> {
    let mut a = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key: key.as_ptr() as u64,
        value: value.as_ptr() as u64,
        flags: BPF_ANY,
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut a, "BPF_MAP_UPDATE_ELEM").map(|_| ())
}

/// Deletes a key; a missing key is not an error (deletes are idempotent).
pub fn map_delete(fd: BorrowedFd<'_>, key: &[u8]) -> SysResult<()> {
    let mut a = ElemAttr { map_fd: fd.as_raw_fd() as u32, _pad: 0, key: key.as_ptr() as u64, value: 0, flags: 0 };
    match bpf(BPF_MAP_DELETE_ELEM, &mut a, "BPF_MAP_DELETE_ELEM") {
        Err(e) if e.errno() != Some(libc::ENOENT) => Err(e),
        _ => Ok(()),
    }
}

/// The key after `key` (the first key when `key` is None); None at the end.
pub fn map_next_key(fd: BorrowedFd<'_>, key: Option<&[u8]>, next: &mut [u8]) -> SysResult<bool> {
    let mut a = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key: key.map_or(0, |k| k.as_ptr() as u64),
        value: next.as_mut_ptr() as u64,
        flags: 0,
    };
    match bpf(BPF_MAP_GET_NEXT_KEY, &mut a, "BPF_MAP_GET_NEXT_KEY") {
        Ok(_) => Ok(true),
        Err(e) if e.errno() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Whether a batch call failed because this map or kernel lacks batching.
pub fn batch_unsupported(e: &SysError) -> bool {
    matches!(e.errno(), Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(524 /* ENOTSUPP */))
}

/// Reads the whole map with `BPF_MAP_LOOKUP_BATCH` (hash and array maps,
/// Linux 5.6+). Keys and values are concatenated fixed-size records.
pub fn map_lookup_all_batch(
    fd: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
    max_entries: usize,
) -> SysResult<(Vec<u8>, Vec<u8>)> {
    let chunk = max_entries.clamp(1, 8192);
    let mut keys = Vec::new();
    let mut values = Vec::new();
    let mut kbuf = vec![0u8; chunk * key_size];
    let mut vbuf = vec![0u8; chunk * value_size];
    // The batch token is opaque; 8 bytes is enough for hash and array maps.
    let mut token_in = [0u8; 8];
    let mut token_out = [0u8; 8];
    let mut first = true;
    loop {
        let mut a = BatchAttr {
            in_batch: if first { 0 } else { token_in.as_mut_ptr() as u64 },
            out_batch: token_out.as_mut_ptr() as u64,
            keys: kbuf.as_mut_ptr() as u64,
            values: vbuf.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        let res = bpf(BPF_MAP_LOOKUP_BATCH, &mut a, "BPF_MAP_LOOKUP_BATCH");
        let n = a.count as usize;
        keys.extend_from_slice(&kbuf[..n * key_size]);
        values.extend_from_slice(&vbuf[..n * value_size]);
        match res {
            Ok(_) => {
                token_in = token_out;
                first = false;
            }
            Err(e) if e.errno() == Some(libc::ENOENT) => return Ok((keys, values)),
            Err(e) => return Err(e),
        }
    }
}

/// Writes records with `BPF_MAP_UPDATE_BATCH`; returns how many were written
/// before an error, with the error.
pub fn map_update_batch(fd: BorrowedFd<'_>, keys: &[u8], values: &[u8], count: usize) -> Result<(), (usize, SysError)> {
    let mut a = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: count as u32,
        map_fd: fd.as_raw_fd() as u32,
        elem_flags: BPF_ANY,
        flags: 0,
    };
    bpf(BPF_MAP_UPDATE_BATCH, &mut a, "BPF_MAP_UPDATE_BATCH").map(|_| ()).map_err(|e| (a.count as usize, e))
}

pub fn map_delete_batch(fd: BorrowedFd<'_>, keys: &[u8], count: usize) -> Result<(), (usize, SysError)> {
    let mut a = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: 0,
        count: count as u32,
        map_fd: fd.as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    bpf(BPF_MAP_DELETE_BATCH, &mut a, "BPF_MAP_DELETE_BATCH").map(|_| ()).map_err(|e| (a.count as usize, e))
}

#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

fn info<T>(fd: BorrowedFd<'_>, out: &mut T) -> SysResult<()> {
    let mut a = InfoAttr { bpf_fd: fd.as_raw_fd() as u32, info_len: size_of::<T>() as u32, info: out as *mut T as u64 };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a, "BPF_OBJ_GET_INFO_BY_FD").map(|_| ())
}

/// Program info, with the ids of the maps it uses.
pub fn prog_info(fd: BorrowedFd<'_>) -> SysResult<(bpf_prog_info, Vec<u32>)> {
    // SAFETY: plain-old-data kernel struct; all-zero is a valid value.
    let mut i: bpf_prog_info = unsafe { zeroed() };
    info(fd, &mut i)?;
    let n = i.nr_map_ids as usize;
    let mut ids = vec![0u32; n];
    if n > 0 {
        // SAFETY: as above.
        let mut j: bpf_prog_info = unsafe { zeroed() };
        j.nr_map_ids = n as u32;
        j.map_ids = ids.as_mut_ptr() as u64;
        info(fd, &mut j)?;
        ids.truncate(j.nr_map_ids.min(n as u32) as usize);
    }
    Ok((i, ids))
}

pub fn map_info(fd: BorrowedFd<'_>) -> SysResult<bpf_map_info> {
    // SAFETY: plain-old-data kernel struct; all-zero is a valid value.
    let mut i: bpf_map_info = unsafe { zeroed() };
    info(fd, &mut i).map(|_| i)
}

pub fn link_info(fd: BorrowedFd<'_>) -> SysResult<bpf_link_info> {
    // SAFETY: plain-old-data kernel struct; all-zero is a valid value.
    let mut i: bpf_link_info = unsafe { zeroed() };
    info(fd, &mut i).map(|_| i)
}

#[repr(C)]
struct GetFdByIdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

pub fn prog_fd_by_id(id: u32) -> SysResult<OwnedFd> {
    let mut a = GetFdByIdAttr { id, next_id: 0, open_flags: 0 };
    bpf(BPF_PROG_GET_FD_BY_ID, &mut a, "BPF_PROG_GET_FD_BY_ID").map(fd_result)
}

pub fn map_fd_by_id(id: u32) -> SysResult<OwnedFd> {
    let mut a = GetFdByIdAttr { id, next_id: 0, open_flags: 0 };
    bpf(BPF_MAP_GET_FD_BY_ID, &mut a, "BPF_MAP_GET_FD_BY_ID").map(fd_result)
}

pub fn link_fd_by_id(id: u32) -> SysResult<OwnedFd> {
    let mut a = GetFdByIdAttr { id, next_id: 0, open_flags: 0 };
    bpf(BPF_LINK_GET_FD_BY_ID, &mut a, "BPF_LINK_GET_FD_BY_ID").map(fd_result)
}

#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// Atomically swaps the program behind a link. With `expected`, only when
/// the link still runs that program (`BPF_F_REPLACE`).
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>, expected: Option<BorrowedFd<'_>>) -> SysResult<()> {
    let mut a = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: if expected.is_some() { BPF_F_REPLACE } else { 0 },
        old_prog_fd: expected.map_or(0, |e| e.as_raw_fd() as u32),
    };
    bpf(BPF_LINK_UPDATE, &mut a, "BPF_LINK_UPDATE").map(|_| ())
}

#[repr(C)]
struct LinkDetachAttr {
    link_fd: u32,
}

pub fn link_detach(link: BorrowedFd<'_>) -> SysResult<()> {
    let mut a = LinkDetachAttr { link_fd: link.as_raw_fd() as u32 };
    bpf(BPF_LINK_DETACH, &mut a, "BPF_LINK_DETACH").map(|_| ())
}

#[repr(C)]
struct ProgDetachAttr {
    target_ifindex: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
    relative_fd: u32,
    expected_revision: u64,
}

/// Detaches a TCX program that is attached without a link.
pub fn tcx_prog_detach(ifindex: u32, prog: BorrowedFd<'_>, attach_type: u32) -> SysResult<()> {
    let mut a = ProgDetachAttr {
        target_ifindex: ifindex,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type,
        attach_flags: 0,
        replace_bpf_fd: 0,
        relative_fd: 0,
        expected_revision: 0,
    };
    bpf(BPF_PROG_DETACH, &mut a, "BPF_PROG_DETACH").map(|_| ())
}

/// Kernel object names are NUL-padded C strings.
pub fn c_name(raw: &[libc::c_char]) -> String {
    let bytes: Vec<u8> = raw.iter().take_while(|c| **c != 0).map(|c| *c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

pub fn ifindex(name: &str) -> Option<u32> {
    ifindex_checked(name).ok().flatten()
}

/// The index of interface `name`: `Ok(None)` only when the kernel says it
/// does not exist (ENODEV). A lookup that could not be made (EMFILE: no
/// descriptor for its socket, ENOMEM, EPERM, EINTR) is an error, never
/// "the interface is gone".
pub fn ifindex_checked(name: &str) -> SysResult<Option<u32>> {
    let Ok(c) = CString::new(name) else { return Ok(None) };
    // SAFETY: `c` is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx != 0 {
        return Ok(Some(idx));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENODEV) | Some(libc::ENXIO) => Ok(None),
        _ => Err(SysError { call: "if_nametoindex", source: e }),
    }
}

pub fn ifname(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has IF_NAMESIZE bytes as the call requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    (!p.is_null()).then(|| c_name(&buf))
}

/// Possible CPUs, for per-CPU map values.
pub fn possible_cpus() -> usize {
    std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| {
            let last = s.trim().split(',').next_back()?.split('-').next_back()?.parse::<usize>().ok()?;
            Some(last + 1)
        })
        .unwrap_or(1)
}

const BPF_LINK_GET_NEXT_ID: u32 = 31;

/// The id of the next link after `start` in the whole system (None at the
/// end): used to find a foreign program's link.
pub fn link_next_id(start: u32) -> SysResult<Option<u32>> {
    let mut a = GetFdByIdAttr { id: start, next_id: 0, open_flags: 0 };
    match bpf(BPF_LINK_GET_NEXT_ID, &mut a, "BPF_LINK_GET_NEXT_ID") {
        Ok(_) => Ok(Some(a.next_id)),
        Err(e) if e.errno() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

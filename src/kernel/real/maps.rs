//! Map contents: read in batches, written and deleted in batches, looked
//! up key by key (exact keys, also in LPM tries), pinned again.

use super::*;

/// The key after `key` in an LPM trie (None: there is none).
///
/// The kernel's `trie_get_next_key` walks the trie in postorder and, for a
/// key that is not in the trie *exactly* (same prefix length and bits),
/// returns the first key of that order
/// (<https://github.com/torvalds/linux/blob/master/kernel/bpf/lpm_trie.c>).
/// The key after a present key is never the first one, so
/// `next(key) != next(None)` holds exactly when `key` is present.
pub(super) fn lpm_next(fd: &OwnedFd, key_size: usize, key: Option<&[u8]>) -> Result<Option<Vec<u8>>, sys::SysError> {
    let mut next = vec![0u8; key_size];
    Ok(sys::map_next_key(fd.as_fd(), key, &mut next)?.then_some(next))
}

impl RealKernel {
    /// A map as observed: its shape, id and (when `read`) its entries.
    pub(super) fn map_state(
        &self,
        fd: &OwnedFd,
        info: &aya_obj::generated::bpf_map_info,
        r: &MapRef,
        read: bool,
    ) -> Result<MapState, KernelError> {
        let shape = MapShape {
            map_type: info.type_,
            key_size: info.key_size,
            value_size: info.value_size,
            max_entries: info.max_entries,
            flags: info.map_flags,
        };
        let entries = if read {
            self.read_map(fd, &shape).map_err(|e| KernelError::sys(format!("read map `{r}`"), e))?
        } else {
            Default::default()
        };
        Ok(MapState {
            shape: Some(shape),
            managed: read,
            entries,
            codec: Default::default(),
            id: Some(info.id),
            pin_missing: false,
        })
    }

    pub(super) fn map_fd(&mut self, map: &MapRef) -> Result<(&OwnedFd, u32, u32), KernelError> {
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

    pub(super) fn read_map(&self, fd: &OwnedFd, shape: &MapShape) -> Result<Entries, sys::SysError> {
        let ks = shape.key_size as usize;
        let vs = value_len(shape.map_type, shape.value_size) as usize;
        let is_array = matches!(shape.map_type, BPF_MAP_TYPE_ARRAY | BPF_MAP_TYPE_PERCPU_ARRAY);
        let batchable = matches!(
            shape.map_type,
            BPF_MAP_TYPE_HASH
                | BPF_MAP_TYPE_ARRAY
                | BPF_MAP_TYPE_LRU_HASH
                | BPF_MAP_TYPE_PERCPU_HASH
                | BPF_MAP_TYPE_PERCPU_ARRAY
        );
        if !matches!(
            shape.map_type,
            BPF_MAP_TYPE_HASH
                | BPF_MAP_TYPE_ARRAY
                | BPF_MAP_TYPE_LRU_HASH
                | BPF_MAP_TYPE_LPM_TRIE
                | BPF_MAP_TYPE_PERCPU_HASH
                | BPF_MAP_TYPE_PERCPU_ARRAY
                | BPF_MAP_TYPE_LRU_PERCPU_HASH
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
    pub(super) fn observe_unpinned_map(
        &self,
        owner: &str,
        id: u32,
        scope: &Scope,
        state: &mut State,
    ) -> Result<(), KernelError> {
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
        let cut = |m: &str| m.get(..crate::model::KERNEL_NAME_MAX).unwrap_or(m).to_string();
        let read = scope.all_maps
            || scope.maps.iter().any(|r| r.program == owner && cut(&r.map) == name)
            || scope.map_names.iter().any(|m| cut(m) == name);
        let r = MapRef { program: owner.to_string(), map: name };
        let mut m = self.map_state(&fd, &info, &r, read)?;
        m.pin_missing = true;
        state.maps.insert(r, m);
        Ok(())
    }
}

pub(super) fn write_entries(
    rk: &mut RealKernel,
    map: &MapRef,
    entries: &[(Vec<u8>, Vec<u8>)],
) -> Result<(), KernelError> {
    if entries.is_empty() {
        return Ok(());
    }
    let (fd, map_type, _) = rk.map_fd(map)?;
    let fd = fd.try_clone().map_err(|e| KernelError::io("duplicate map fd", e))?;
    // LPM tries take batches too (the kernel's generic batch, entry by
    // entry in order — the same order per-entry calls would have), but
    // under one lock: never split across threads.
    let batchable =
        matches!(map_type, BPF_MAP_TYPE_HASH | BPF_MAP_TYPE_ARRAY | BPF_MAP_TYPE_LRU_HASH | BPF_MAP_TYPE_LPM_TRIE);
    if entries.len() > 1 && batchable {
        let keys: Vec<u8> = entries.iter().flat_map(|(k, _)| k.iter().copied()).collect();
        let values: Vec<u8> = entries.iter().flat_map(|(_, v)| v.iter().copied()).collect();
        let (res, calls) = if map_type == BPF_MAP_TYPE_LPM_TRIE {
            (sys::map_update_batch(fd.as_fd(), &keys, &values, entries.len()), 1)
        } else {
            update_batch_parallel(fd.as_fd(), &keys, &values, entries.len())
        };
        for _ in 0..calls {
            rk.wrote();
        }
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
        rk.wrote();
        res.map_err(|e| KernelError::sys(format!("write an entry of map `{map}`"), e))?;
    }
    Ok(())
}

/// Batches at least this big are split across threads.
const PARALLEL_BATCH_MIN: usize = 32_768;

/// One batched update, split into a slice per CPU (up to four) written by
/// concurrent `BPF_MAP_UPDATE_BATCH` calls when it is big: hash maps lock
/// per bucket, so the slices go in side by side (a 100,000-entry write
/// into a no-prealloc hash took ~20 % less on two CPUs: every element is
/// allocated, and that part the CPUs share). Every entry has the same key and
/// value size (the map's). Returns the first failure (with the entries
/// written before it in its slice; other slices may have been written —
/// the executor's undo deletes every key of the step, idempotently) and
/// the number of calls made.
fn update_batch_parallel(
    fd: std::os::fd::BorrowedFd<'_>,
    keys: &[u8],
    values: &[u8],
    count: usize,
) -> (Result<(), (usize, sys::SysError)>, usize) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(4);
    if count < PARALLEL_BATCH_MIN
        || threads < 2
        || !keys.len().is_multiple_of(count)
        || !values.len().is_multiple_of(count)
    {
        return (sys::map_update_batch(fd, keys, values, count), 1);
    }
    let (key_size, value_size) = (keys.len() / count, values.len() / count);
    let per = count.div_ceil(threads);
    let results: Vec<Result<(), (usize, sys::SysError)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..count)
            .step_by(per)
            .map(|start| {
                let n = per.min(count - start);
                let k = &keys[start * key_size..(start + n) * key_size];
                let v = &values[start * value_size..(start + n) * value_size];
                scope.spawn(move || sys::map_update_batch(fd, k, v, n))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                // A slice's thread only makes a syscall; should it panic,
                // its slice counts as not written.
                h.join().unwrap_or_else(|_| {
                    Err((
                        0,
                        sys::SysError {
                            call: "BPF_MAP_UPDATE_BATCH",
                            source: std::io::Error::other("writer thread panicked"),
                        },
                    ))
                })
            })
            .collect()
    });
    let calls = results.len();
    (results.into_iter().find(|r| r.is_err()).unwrap_or(Ok(())), calls)
}

pub(super) fn delete_entries(rk: &mut RealKernel, map: &MapRef, keys: &[Vec<u8>]) -> Result<(), KernelError> {
    if keys.is_empty() {
        return Ok(());
    }
    let (fd, map_type, _) = rk.map_fd(map)?;
    let fd = fd.try_clone().map_err(|e| KernelError::io("duplicate map fd", e))?;
    if keys.len() > 1 && matches!(map_type, BPF_MAP_TYPE_HASH | BPF_MAP_TYPE_LRU_HASH | BPF_MAP_TYPE_LPM_TRIE) {
        let flat: Vec<u8> = keys.iter().flat_map(|k| k.iter().copied()).collect();
        let res = sys::map_delete_batch(fd.as_fd(), &flat, keys.len());
        rk.wrote();
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
        rk.wrote();
        res.map_err(|e| KernelError::sys(format!("delete an entry of map `{map}`"), e))?;
    }
    Ok(())
}

/// Map types whose values are one copy per possible CPU.
const BPF_MAP_TYPE_PERCPU_HASH: u32 = 5;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
const BPF_MAP_TYPE_LRU_PERCPU_HASH: u32 = 10;

/// The bytes a lookup of a map of `map_type` returns: `value_size`, or for
/// a per-CPU map every possible CPU's copy, each rounded up to 8 bytes.
fn value_len(map_type: u32, value_size: u32) -> u32 {
    match map_type {
        BPF_MAP_TYPE_PERCPU_HASH | BPF_MAP_TYPE_PERCPU_ARRAY | BPF_MAP_TYPE_LRU_PERCPU_HASH => {
            value_size.div_ceil(8) * 8 * sys::possible_cpus() as u32
        }
        _ => value_size,
    }
}

pub(super) fn lookup_entries(
    rk: &mut RealKernel,
    map: &MapRef,
    keys: &[Vec<u8>],
) -> Result<Vec<Option<Vec<u8>>>, KernelError> {
    let (fd, map_type, value_size) = rk.map_fd(map)?;
    let is_array = matches!(map_type, BPF_MAP_TYPE_ARRAY | BPF_MAP_TYPE_PERCPU_ARRAY);
    let lpm = map_type == BPF_MAP_TYPE_LPM_TRIE;
    // A per-CPU map answers with every possible CPU's copy, each rounded
    // up to 8 bytes: the buffer must hold them all.
    let value_size = value_len(map_type, value_size);
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

pub(super) fn pin_map(rk: &mut RealKernel, map: &MapRef, id: u32) -> Result<(), KernelError> {
    rk.map_fds.clear();
    let pin = rk.map_pin(&map.program, &map.map);
    if pin.exists() {
        return Ok(());
    }
    let fd = sys::map_fd_by_id(id).map_err(|e| KernelError::sys(format!("open map `{map}` (id {id})"), e))?;
    if let Some(dir) = pin.parent() {
        fs::create_dir_all(dir).map_err(|e| KernelError::io(format!("create `{}`", dir.display()), e))?;
    }
    sys::obj_pin(fd.as_fd(), &pin)
        .map_err(|e| KernelError::sys(format!("pin map `{map}` at `{}`", pin.display()), e))?;
    rk.wrote();
    Ok(())
}

pub(super) fn unpin_map(rk: &mut RealKernel, map: &MapRef) -> Result<(), KernelError> {
    rk.map_fds.clear();
    let pin = rk.map_pin(&map.program, &map.map);
    match fs::remove_file(&pin) {
        Ok(()) => {
            rk.wrote();
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(KernelError::io(format!("unpin `{}`", pin.display()), e)),
    }
}

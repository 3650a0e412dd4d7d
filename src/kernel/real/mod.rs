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
//!
//! One file per concept: `mounts` (bpffs, tracefs, features), `pins`
//! (where objects live, the trash), `programs`, `links`, `maps`,
//! `observe`.

mod links;
mod maps;
mod mounts;
mod observe;
mod pins;
mod programs;

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

use links::tc_type;
use mounts::{bpffs_state, tracefs_dir};
pub use mounts::{ensure_bpffs, ensure_tracefs, kernel_version, probe_features};
use pins::{link_pin_name, parse_link_pin, read_pins, remove_any};
use programs::{prog_type_of, tag_hex};

pub const DEFAULT_ROOT: &str = "/sys/fs/bpf/bpfsync";
const BPF_FS_MAGIC: i64 = 0xcafe4a11;
const TRACEFS_MAGIC: i64 = 0x74726163;

const BPF_LINK_TYPE_PERF_EVENT: u32 = 7;
const BPF_LINK_TYPE_XDP: u32 = 6;
const BPF_LINK_TYPE_TCX: u32 = 11;

pub struct RealKernel {
    pub(super) root: PathBuf,
    pub(super) writes: u64,
    /// Open maps: fd, map type, value size.
    pub(super) map_fds: HashMap<MapRef, (OwnedFd, u32, u32)>,
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
    pub(super) fn wrote(&mut self) {
        self.writes += 1;
        crate::fault::point("kernel-write");
    }
}

impl Kernel for RealKernel {
    fn observe(&mut self, scope: &Scope) -> Result<State, KernelError> {
        observe::observe(self, scope)
    }

    fn load_program(&mut self, req: &LoadRequest) -> Result<(), KernelError> {
        programs::load_program(self, req)
    }

    fn unload_program(&mut self, name: &str, digest: &str) -> Result<(), KernelError> {
        programs::unload_program(self, name, digest)
    }

    fn restore_program(&mut self, name: &str, digest: &str) -> Result<(), KernelError> {
        programs::restore_program(self, name, digest)
    }

    fn discard_program(&mut self, name: &str, digest: &str) -> Result<(), KernelError> {
        programs::discard_program(self, name, digest)
    }

    fn write_entries(&mut self, map: &MapRef, entries: &[(Vec<u8>, Vec<u8>)]) -> Result<(), KernelError> {
        maps::write_entries(self, map, entries)
    }

    fn delete_entries(&mut self, map: &MapRef, keys: &[Vec<u8>]) -> Result<(), KernelError> {
        maps::delete_entries(self, map, keys)
    }

    fn attach(&mut self, hook: &Hook, program: &str, digest: &str, mode: Option<XdpMode>) -> Result<(), KernelError> {
        links::attach(self, hook, program, digest, mode)
    }

    fn update_link(&mut self, hook: &Hook, program: &str, digest: &str) -> Result<(), KernelError> {
        links::update_link(self, hook, program, digest)
    }

    fn detach(&mut self, hook: &Hook) -> Result<(), KernelError> {
        links::detach(self, hook)
    }

    fn evict(&mut self, f: &ForeignProgram) -> Result<(), KernelError> {
        links::evict(self, f)
    }

    fn unevict(&mut self, f: &ForeignProgram) -> Result<(), KernelError> {
        links::unevict(self, f)
    }

    fn pin_map(&mut self, map: &MapRef, id: u32) -> Result<(), KernelError> {
        maps::pin_map(self, map, id)
    }

    fn unpin_map(&mut self, map: &MapRef) -> Result<(), KernelError> {
        maps::unpin_map(self, map)
    }

    fn commit(&mut self) -> Result<(), KernelError> {
        pins::commit(self)
    }

    fn lookup_entries(&mut self, map: &MapRef, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, KernelError> {
        maps::lookup_entries(self, map, keys)
    }

    fn writes(&self) -> u64 {
        self.writes
    }
}

//! The one boundary between bpfsync and the kernel.
//!
//! [`Kernel`] is what the executor and the observer see. [`real::RealKernel`]
//! implements it over aya, raw bpf calls ([`sys`]) and rtnetlink
//! ([`netlink`]); [`memory::MemoryKernel`] is an in-memory model of the same
//! state for planner/executor tests, with fault injection. The model knows
//! only the invariants it was taught; each is anchored by a real-kernel
//! test in `tests/kernel_*.rs`.

pub mod memory;
pub mod netlink;
pub mod real;
pub mod sys;
pub mod testrun;

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::model::{ForeignProgram, Hook, MapRef, State};
use crate::spec::{ProgramType, XdpMode};

/// What the observer must look at beyond bpfsync's own pins.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// Interfaces the spec names: checked for existence and foreign programs.
    pub interfaces: BTreeSet<String>,
    /// Maps whose entries are read (managed maps).
    pub maps: BTreeSet<MapRef>,
    /// Read the entries of every owned map (for `status`).
    pub all_maps: bool,
    /// Read the entries of owned maps with these names, whoever owns them
    /// (the built-in counters, for metrics).
    pub map_names: BTreeSet<String>,
    /// Tracepoint events the spec names: checked for existence.
    pub events: BTreeSet<String>,
    /// Next hops whose MACs are looked up in the neighbour table
    /// (interface, address).
    pub neighbors: BTreeSet<(String, std::net::IpAddr)>,
}

/// Everything needed to load one program version.
#[derive(Debug, Clone)]
pub struct LoadRequest {
    pub name: String,
    pub digest: String,
    pub function: String,
    pub program_type: ProgramType,
    pub bytes: Arc<[u8]>,
    /// The program whose maps are used (itself unless `share-maps`).
    pub map_owner: String,
    /// Owned maps to create anew (their shape changed); the old ones are
    /// set aside, restorable until commit.
    pub fresh_maps: Vec<String>,
}

impl LoadRequest {
    /// A built-in program loaded under its own name with its own maps, as
    /// benchmarks and tests load them without a spec.
    pub fn builtin(name: &str, digest: &str) -> Option<LoadRequest> {
        let b = crate::builtin::find(name)?;
        Some(LoadRequest {
            name: name.into(),
            digest: digest.into(),
            function: b.function.into(),
            program_type: b.program_type,
            bytes: Arc::from(b.bytes),
            map_owner: name.into(),
            fresh_maps: vec![],
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("failed to {what}")]
    Sys {
        what: String,
        #[source]
        source: sys::SysError,
    },
    #[error("failed to {what}")]
    Aya {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("failed to {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}")]
    Unsupported { what: String },
    #[error("{what}")]
    NotFound { what: String },
    /// Raised by the in-memory kernel's fault injection.
    #[error("injected failure in `{op}`")]
    Injected { op: String },
}

impl KernelError {
    /// Whether trying again later may succeed (busy, out of memory,
    /// interrupted), as opposed to a request the kernel will always refuse.
    pub fn is_retryable(&self) -> bool {
        matches!(self.errno(), Some(libc::EAGAIN) | Some(libc::EBUSY) | Some(libc::EINTR) | Some(libc::ENOMEM))
            || matches!(self, KernelError::Injected { .. })
    }

    /// The kernel's errno behind this error, wherever it sits in the chain
    /// (aya wraps the syscall's `io::Error` one or two levels down).
    pub fn errno(&self) -> Option<i32> {
        match self {
            KernelError::Sys { source, .. } => source.errno(),
            KernelError::Io { source, .. } => source.raw_os_error(),
            KernelError::Aya { source, .. } => {
                let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(source.as_ref());
                while let Some(e) = cur {
                    if let Some(io) = e.downcast_ref::<std::io::Error>() {
                        return io.raw_os_error();
                    }
                    cur = e.source();
                }
                None
            }
            _ => None,
        }
    }

    pub fn sys(what: impl Into<String>, source: sys::SysError) -> Self {
        KernelError::Sys { what: what.into(), source }
    }

    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        KernelError::Io { what: what.into(), source }
    }

    pub fn aya(what: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        KernelError::Aya { what: what.into(), source: Box::new(source) }
    }
}

/// Capabilities of the running kernel, probed once.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Features {
    pub kernel_release: String,
    pub bpffs: bool,
    pub tracefs: bool,
    pub tcx: bool,
    pub xdp_link: bool,
    pub batch_map_ops: bool,
    /// LPM trie maps (policies, routes), probed by creating one.
    pub lpm_trie: bool,
    /// LRU hash maps (conntrack), probed by creating one.
    pub lru_hash: bool,
    /// BPF ring buffers (flow events), probed by creating one.
    pub ringbuf: bool,
    /// Kernel BTF (`/sys/kernel/btf/vmlinux`).
    pub kernel_btf: bool,
}

/// The kernel as the executor and observer see it. Every mutating call is
/// idempotent where the kernel allows (deleting a missing key succeeds).
pub trait Kernel {
    /// Reads the live state: bpfsync's pins, the objects they name, and
    /// foreign programs on the hooks `scope` names.
    fn observe(&mut self, scope: &Scope) -> Result<State, KernelError>;

    /// Loads and pins a program version, with its maps (reusing pinned ones).
    fn load_program(&mut self, req: &LoadRequest) -> Result<(), KernelError>;
    /// Sets a program version aside (unpinned from view; restorable until
    /// [`Kernel::commit`]). Owned maps go with the last version of a program.
    fn unload_program(&mut self, name: &str, digest: &str) -> Result<(), KernelError>;
    /// Undoes [`Kernel::unload_program`] or, for a version that was just
    /// loaded, removes it (`discard`).
    fn restore_program(&mut self, name: &str, digest: &str) -> Result<(), KernelError>;
    fn discard_program(&mut self, name: &str, digest: &str) -> Result<(), KernelError>;

    fn write_entries(&mut self, map: &MapRef, entries: &[(Vec<u8>, Vec<u8>)]) -> Result<(), KernelError>;
    fn delete_entries(&mut self, map: &MapRef, keys: &[Vec<u8>]) -> Result<(), KernelError>;

    fn attach(&mut self, hook: &Hook, program: &str, digest: &str, mode: Option<XdpMode>) -> Result<(), KernelError>;
    /// Atomically points an existing link at another program version.
    fn update_link(&mut self, hook: &Hook, program: &str, digest: &str) -> Result<(), KernelError>;
    fn detach(&mut self, hook: &Hook) -> Result<(), KernelError>;
    /// Removes a foreign program from a hook (takeover).
    fn evict(&mut self, foreign: &ForeignProgram) -> Result<(), KernelError>;
    /// Puts an evicted foreign program back, where the kernel allows.
    fn unevict(&mut self, foreign: &ForeignProgram) -> Result<(), KernelError>;

    /// Pins again a map whose pin was removed while its program still holds
    /// it (`id`: the kernel's map id), at `map`'s place.
    fn pin_map(&mut self, map: &MapRef, id: u32) -> Result<(), KernelError>;
    /// Removes a map's pin (the undo of [`Kernel::pin_map`]).
    fn unpin_map(&mut self, map: &MapRef) -> Result<(), KernelError>;

    /// Makes set-aside objects go away for good.
    fn commit(&mut self) -> Result<(), KernelError>;

    /// Reads the current values of some keys of a map (None: absent; for
    /// array maps, all-zero values are absent). For verifying small changes
    /// to big maps without reading them whole.
    fn lookup_entries(&mut self, map: &MapRef, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, KernelError>;

    /// Adds one to the u64 at index 0 of an array map: the generation the
    /// datapath checks its cached decisions against.
    fn bump_generation(&mut self, map: &MapRef) -> Result<(), KernelError> {
        let key = 0u32.to_ne_bytes().to_vec();
        let current = self.lookup_entries(map, std::slice::from_ref(&key))?.pop().flatten();
        let n = current.and_then(|v| Some(u64::from_ne_bytes(v.get(..8)?.try_into().ok()?))).unwrap_or(0);
        self.write_entries(map, &[(key, n.wrapping_add(1).to_ne_bytes().to_vec())])
    }

    /// Mutating kernel calls made so far (for minimality tests).
    fn writes(&self) -> u64;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// aya's attach errors wrap the syscall's `io::Error` a level or two
    /// down; EBUSY there is worth retrying like a raw EBUSY.
    #[test]
    fn errno_is_found_through_aya_error_chains() {
        let busy = std::io::Error::from_raw_os_error(libc::EBUSY);
        let wrapped = aya::sys::SyscallError { call: "bpf_link_create", io_error: busy };
        let e = KernelError::aya("attach `counter` to `xdp/veth0`", aya::programs::ProgramError::SyscallError(wrapped));
        assert_eq!(e.errno(), Some(libc::EBUSY));
        assert!(e.is_retryable());
        let refused = std::io::Error::from_raw_os_error(libc::EINVAL);
        let e = KernelError::aya(
            "attach",
            aya::programs::ProgramError::SyscallError(aya::sys::SyscallError {
                call: "bpf_link_create",
                io_error: refused,
            }),
        );
        assert!(!e.is_retryable());
        assert!(!KernelError::NotFound { what: "x".into() }.is_retryable());
    }
}

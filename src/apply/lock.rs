//! One writer per node: an exclusive lock on bpfsync's bpffs root (so two
//! state directories on one root never interleave) and on the state
//! directory (so two roots never share one journal). CLI writes take it
//! for one command; the agent holds it for as long as it runs.
//!
//! `flock(2)` works on a directory descriptor on any filesystem, bpffs
//! included, and the kernel drops it when the holder dies: a `kill -9`
//! never leaves a stale lock behind.

use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot open `{path}` to lock it")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "another bpfsync is changing this node: `{path}` is locked{holder}; stop the agent (or wait for the other command) and try again"
    )]
    Busy { path: PathBuf, holder: String },
}

/// Held while changing the node; released on drop (or death).
#[derive(Debug)]
pub struct NodeLock {
    _root: fs::File,
    _state: fs::File,
}

fn try_flock(file: &fs::File) -> bool {
    // SAFETY: flock on a descriptor we own.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

impl NodeLock {
    /// Takes both locks without waiting. `what` names the holder for the
    /// message another process gets (`agent`, `apply`, …).
    pub fn acquire(bpffs_root: &Path, state_dir: &Path, what: &str) -> Result<NodeLock, LockError> {
        fs::create_dir_all(state_dir).map_err(|source| LockError::Open { path: state_dir.into(), source })?;
        let state_path = state_dir.join("lock");
        let mut state = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&state_path)
            .map_err(|source| LockError::Open { path: state_path.clone(), source })?;
        let holder = || {
            let text = fs::read_to_string(&state_path).unwrap_or_default();
            let text = text.trim();
            if text.is_empty() { String::new() } else { format!(" (by {text})") }
        };
        if !try_flock(&state) {
            return Err(LockError::Busy { path: state_path.clone(), holder: holder() });
        }
        let root = fs::File::open(bpffs_root).map_err(|source| LockError::Open { path: bpffs_root.into(), source })?;
        if !try_flock(&root) {
            // The holder works with another state directory: its record
            // is not ours to read.
            return Err(LockError::Busy { path: bpffs_root.into(), holder: String::new() });
        }
        let _ = state.set_len(0);
        let _ = writeln!(state, "`bpfsync {what}`, pid {}", std::process::id());
        Ok(NodeLock { _root: root, _state: state })
    }
}

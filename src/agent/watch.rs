//! Watching the spec file, and the interfaces the spec names.
//!
//! The directory holding the spec is watched, not the file: an editor's
//! atomic save renames a new file over the old one, and a Kubernetes
//! ConfigMap volume swaps its `..data` symlink, and both replace the inode
//! a file watch would follow. Events on the spec's own name, on the
//! ConfigMap's `..`-prefixed entries, or in the directory the spec's
//! symlink resolves to are hints; the reconciler reads the file and
//! compares digests, so a spurious hint costs one read.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

pub fn watch(spec: &Path, tx: mpsc::Sender<()>) -> notify::Result<RecommendedWatcher> {
    let dir = spec.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = spec.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    let real_dir = std::fs::canonicalize(spec).ok().and_then(|r| r.parent().map(Path::to_path_buf));
    let relevant = move |p: &Path| {
        let file = p.file_name().unwrap_or_default();
        file == name.as_os_str()
            || file.to_string_lossy().starts_with("..")
            || real_dir.as_deref().is_some_and(|d| p.starts_with(d))
    };
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Reads (ours included: the reconciler reads the spec) are not
        // changes; reacting to them would loop.
        if let Ok(event) = event
            && !matches!(event.kind, notify::EventKind::Access(_))
            && event.paths.iter().any(|p| relevant(p))
        {
            // Full channel: a reconcile is already pending.
            let _ = tx.try_send(());
        }
    })?;
    watcher.watch(dir, RecursiveMode::NonRecursive)?;
    // A ConfigMap's file is a symlink into `..data/`: watch where it
    // points as well, so in-place edits there are seen too.
    if let Ok(real) = std::fs::canonicalize(spec)
        && let Some(real_dir) = real.parent()
        && std::fs::canonicalize(dir).ok().as_deref() != Some(real_dir)
    {
        let _ = watcher.watch(real_dir, RecursiveMode::NonRecursive);
    }
    Ok(watcher)
}

/// Follows rtnetlink link events on a thread until `stop`: an event on an
/// interface the spec names sends a hint on `tx`, so a declared hook is
/// attached as soon as its interface appears (not at the next resync).
/// Lost events (socket overflow) send a hint too. Without rtnetlink the
/// resync alone repairs, and this says so once.
pub fn watch_links(
    shared: Arc<super::Shared>,
    tx: mpsc::Sender<()>,
    stop: Arc<AtomicBool>,
) -> Option<std::thread::JoinHandle<()>> {
    let mut events = match crate::kernel::netlink::LinkEvents::subscribe(Duration::from_millis(200)) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %e, "cannot follow interface events; interfaces that appear are attached at the next resync");
            return None;
        }
    };
    let thread = std::thread::Builder::new().name("bpfsync-links".into()).spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let relevant = match events.recv() {
                Ok(names) => {
                    let watched = shared.watched_interfaces.lock().unwrap_or_else(|p| p.into_inner());
                    names.iter().any(|n| watched.contains(n))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "interface events were lost; reconciling");
                    std::thread::sleep(Duration::from_millis(200));
                    true
                }
            };
            if relevant {
                let _ = tx.try_send(()); // a hint already queued is enough
            }
        }
    });
    thread.ok()
}

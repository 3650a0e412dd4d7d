//! Kill points for crash tests: `BPFSYNC_KILL_AT=<point>:<n>` makes the
//! process kill itself with SIGKILL the n-th time (1-based) it passes
//! `<point>`, exactly as a `kill -9` arriving there would. Points:
//! `kernel-write` (after every mutating kernel call), `journal-written`,
//! `step-started`, `step-done`, `journal-finished`, `trash-removed`.
//!
//! Unset (always, outside tests) it costs one relaxed load per point.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

struct KillAt {
    point: String,
    nth: u64,
    seen: AtomicU64,
}

fn config() -> Option<&'static KillAt> {
    static CONFIG: OnceLock<Option<KillAt>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let v = std::env::var("BPFSYNC_KILL_AT").ok()?;
            let (point, nth) = v.rsplit_once(':')?;
            Some(KillAt { point: point.to_string(), nth: nth.parse().ok()?, seen: AtomicU64::new(0) })
        })
        .as_ref()
}

/// Marks that the process passed `point`.
pub fn point(point: &str) {
    let Some(k) = config() else { return };
    if k.point == point && k.seen.fetch_add(1, Ordering::Relaxed) + 1 == k.nth {
        // SAFETY: raising a signal on ourselves has no preconditions.
        unsafe { libc::raise(libc::SIGKILL) };
    }
}

//! Fault points for crash tests, set by environment variables (never in
//! production):
//!
//! - `BPFSYNC_KILL_AT=<point>:<n>` kills the process with SIGKILL the n-th
//!   time (1-based) it passes `<point>`, exactly as a `kill -9` arriving
//!   there would. Points: `kernel-write` (after every mutating kernel
//!   call), `journal-written`, `step-started`, `step-done`,
//!   `journal-finished`, `trash-removed`.
//! - `BPFSYNC_PANIC_AT=<point>:<n>` panics there instead (point
//!   `reconcile`: the start of an agent reconcile), to prove a panic does
//!   not stop the agent.
//!
//! Unset, a point costs one relaxed load.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

struct Trigger {
    point: String,
    nth: u64,
    seen: AtomicU64,
}

impl Trigger {
    fn from_env(var: &str) -> Option<Trigger> {
        let v = std::env::var(var).ok()?;
        let (point, nth) = v.rsplit_once(':')?;
        Some(Trigger { point: point.to_string(), nth: nth.parse().ok()?, seen: AtomicU64::new(0) })
    }

    fn fires(&self, point: &str) -> bool {
        self.point == point && self.seen.fetch_add(1, Ordering::Relaxed) + 1 == self.nth
    }
}

fn kill_at() -> Option<&'static Trigger> {
    static KILL: OnceLock<Option<Trigger>> = OnceLock::new();
    KILL.get_or_init(|| Trigger::from_env("BPFSYNC_KILL_AT")).as_ref()
}

fn panic_at() -> Option<&'static Trigger> {
    static PANIC: OnceLock<Option<Trigger>> = OnceLock::new();
    PANIC.get_or_init(|| Trigger::from_env("BPFSYNC_PANIC_AT")).as_ref()
}

/// Marks that the process passed `point`.
pub fn point(point: &str) {
    if kill_at().is_some_and(|k| k.fires(point)) {
        // SAFETY: raising a signal on ourselves has no preconditions.
        unsafe { libc::raise(libc::SIGKILL) };
    }
    if panic_at().is_some_and(|p| p.fires(point)) {
        panic!("injected panic at `{point}`");
    }
}

//! Self-healing: the loop that moves a route to one of its declared
//! fallback hops when the primary degrades, and back when it recovers.
//!
//! - [`probe`]: ICMP echoes through each hop's own interface (sockets).
//! - [`health`]: a hop's bounded history — loss, RTT percentiles, misses in
//!   a row, link and neighbour state.
//! - [`detector`]: one route's decision (switch, revert, flap lock), pure.
//! - [`baseline`]: anomalies on routes without a declared threshold, for
//!   review only.
//! - [`controller`]: every route's decision against the proposal store:
//!   auto-apply or queue, verify after a switch, revert.
//! - [`proposal`] and [`store`]: proposals as files with their history; the
//!   overlay is the applied ones, merged onto the spec file when it is
//!   compiled ([`crate::spec::overlay`]).
//! - [`export`]: a proposal as an in-place edit of the spec file, diffed.
//! - [`runner`]: the agent's edge — probes, rtnetlink events, the store.

pub mod baseline;
pub mod controller;
pub mod detector;
pub mod export;
pub mod health;
pub mod probe;
pub mod proposal;
pub mod runner;
pub mod store;

use crate::spec::overlay::{OverlayEntry, OverlayReport};

/// The digest of what runs: the spec file's digest and the overlay's ids.
pub fn overlay_digest(file_digest: &str, overlay: &[OverlayEntry]) -> String {
    if overlay.is_empty() {
        return file_digest.to_string();
    }
    let ids: Vec<&str> = overlay.iter().map(|e| e.id.as_str()).collect();
    crate::object::digest(format!("{file_digest}\0{}", ids.join(",")).as_bytes())
}

/// Marks the entries a load could not apply as superseded (logged, and
/// never applied again). Failures are logged: the next load tries again.
pub fn supersede(store: &store::Store, report: &OverlayReport, by: &str) -> usize {
    let mut done = 0;
    if report.superseded.is_empty() {
        return 0;
    }
    let lock = match store.lock() {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %crate::apply::error_chain(&e), "cannot record superseded proposals");
            return 0;
        }
    };
    for s in &report.superseded {
        match lock.transition(&s.id, proposal::Status::Superseded, by, &s.reason) {
            Ok(_) => {
                tracing::warn!(proposal = %s.id, "overlay entry superseded: {}", s.reason);
                done += 1;
            }
            Err(e) => {
                tracing::warn!(proposal = %s.id, error = %crate::apply::error_chain(&e), "cannot mark superseded")
            }
        }
    }
    done
}

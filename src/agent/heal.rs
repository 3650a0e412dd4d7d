//! The heal loop, wired into the agent: its runner ([`crate::heal::runner`])
//! runs on a thread of its own; this observer turns what it reports into
//! metrics, the snapshot `/status` and `/proposals` show, and a hint that
//! makes the driver reconcile the new overlay at once.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::Shared;
use super::metrics::{HopLabel, HopResultLabel, RouteHopLabel, RouteLabel, RouteReasonLabel, SourceStateLabel};
use crate::heal::proposal::HopId;
use crate::heal::runner::{DeliveryCounters, HealSnapshot, Observer};
use crate::kernel::Kernel;

pub struct AgentObserver {
    pub shared: Arc<Shared>,
    pub overlay: mpsc::Sender<()>,
}

impl Observer for AgentObserver {
    fn probe(&self, hop: &HopId, rtt: Option<Duration>) {
        let m = &self.shared.metrics.heal;
        let result = if rtt.is_some() { "answered" } else { "lost" };
        m.probes.get_or_create(&HopResultLabel { hop: hop.to_string(), result: result.into() }).inc();
        if let Some(rtt) = rtt {
            m.probe_rtt.get_or_create(&HopLabel { hop: hop.to_string() }).observe(rtt.as_secs_f64());
        }
    }

    fn event(&self, route: &str, what: &str, _reason: &str) {
        let label = RouteReasonLabel { route: route.into(), reason: what.into() };
        self.shared.metrics.heal.switches.get_or_create(&label).inc();
    }

    fn snapshot(&self, snap: HealSnapshot) {
        let m = &self.shared.metrics.heal;
        for r in &snap.routes {
            let watched = self.shared.heal_routes_of(&r.route);
            for (role, hop) in watched {
                let active = (hop == r.active) as i64;
                m.active_hop
                    .get_or_create(&RouteHopLabel { route: r.route.clone(), hop: hop.to_string(), role })
                    .set(active);
            }
            m.flap_locked.get_or_create(&RouteLabel { route: r.route.clone() }).set(r.locked as i64);
        }
        for h in &snap.hops {
            let label = HopLabel { hop: h.hop.to_string() };
            match h.loss {
                Some(l) => {
                    m.probe_loss.get_or_create(&label).set(l);
                }
                None => {
                    m.probe_loss.remove(&label);
                }
            }
        }
        m.proposals.clear();
        for (source, states) in &snap.proposals {
            for (state, n) in states {
                let label = SourceStateLabel { source: source.clone(), state: state.clone() };
                m.proposals.get_or_create(&label).set(*n as i64);
            }
        }
        *self.shared.heal.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = snap;
    }

    fn overlay_changed(&self) {
        let _ = self.overlay.try_send(()); // one hint queued is enough
    }
}

/// The routes' delivery counters, read from the mesh datapath's pinned
/// maps (`route_stats`: packets forwarded; `route_redirect_errors`:
/// packets whose redirect failed).
pub struct KernelDelivery {
    pub bpffs_root: std::path::PathBuf,
}

impl DeliveryCounters for KernelDelivery {
    fn read(&mut self, route_ids: &[u32]) -> Result<Vec<(u64, u64)>, String> {
        let error = |e: crate::kernel::KernelError| crate::apply::error_chain(&e);
        // Opened afresh each time: a reload may have replaced the maps.
        let mut kernel = crate::kernel::real::RealKernel::open_read_only(&self.bpffs_root).map_err(error)?;
        let keys: Vec<Vec<u8>> = route_ids.iter().map(|id| id.to_ne_bytes().to_vec()).collect();
        let mut read = |map: &str| -> Result<Vec<u64>, String> {
            let values = kernel.lookup_entries(&crate::mesh::map_ref(map), &keys).map_err(error)?;
            // No entry yet: the route has counted nothing.
            Ok(values
                .iter()
                .map(|v| v.as_deref().and_then(crate::datapath::ProtoStats::from_bytes).map_or(0, |s| s.packets))
                .collect())
        };
        let forwarded = read("route_stats")?;
        let failed = read("route_redirect_errors")?;
        Ok(forwarded.into_iter().zip(failed).collect())
    }
}

//! Flow records from the mesh datapath, Hubble style.
//!
//! The datapath writes `struct flow_event`s to the `flow_events` ring
//! buffer ([`datapath::FlowEvent`](crate::datapath::FlowEvent)); the
//! agent's [`reader`] drains them into a [`hub::FlowHub`] (bounded history,
//! live subscribers, counters) and its [`export`] queues. `bpfsync flows`
//! asks the agent's `/flows` with a [`filter::Filter`]; [`record`] renders.
//!
//! Pure: `record`, `filter`, `hub`. Kernel: `reader` (aya ring
//! buffer). I/O: `export` (files, HTTP), `otlp` (OpenTelemetry logs over HTTP).

pub mod export;
pub mod filter;
pub mod hub;
pub mod hubble;
pub mod otlp;
pub mod reader;
pub mod record;
/// Times of flow records (moved below `plan`, which renders them too).
pub use crate::time;

/// This node's name (the kernel's host name), for Hubble's `node_name` and
/// OTLP's `host.name`.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string()
}

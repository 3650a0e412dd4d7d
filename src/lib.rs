//! bpfsync keeps a Linux node's eBPF datapath equal to a YAML spec.
//!
//! # Layout
//!
//! The pipeline is `spec → compile → Desired`, `kernel → observe → Observed`,
//! `plan(Desired, Observed) → Plan`, `apply(Plan) → kernel`.
//!
//! - [`spec`]: the YAML spec — types, JSON Schema, positioned diagnostics,
//!   JSON Patch and the overlay of accepted proposals. Pure.
//! - [`object`]: what an ELF object holds (functions, maps, BTF layouts).
//!   Pure over bytes.
//! - [`codec`]: map keys/values between spec values and bytes.
//! - [`model`]: the flat state model shared by desired and observed;
//!   [`entries`] stores a map's entries as compact sorted records.
//! - [`snapshot`]: observed states as YAML (golden cases, offline plans).
//! - [`datapath`]: Rust mirrors of `bpf/bpfsync.h` and counter decoders.
//! - [`compile`]: spec + objects → desired state (reads object files).
//! - [`mesh`]: policies and routes → entries of the built-in mesh
//!   datapath's maps (pure; resolved against the observed node when
//!   planning), and their spec-level view for plans.
//! - [`mesh`] also evaluates a packet over those tables as the datapath
//!   does (`mesh::evaluate`, proven equal to the kernel by TEST_RUN).
//! - [`telemetry`]: the `telemetry:` section's tracepoint programs (TCP
//!   per watched prefix, stack drops by reason, XDP errors) and the
//!   decoding of what they counted.
//! - [`plan`]: the pure diff, and its text and JSON renderings; the policy
//!   impact of a plan on recorded flows (`plan::impact`).
//! - [`kernel`]: the one boundary to the kernel: a trait with the real
//!   backend (aya, raw bpf syscalls, netlink) and an in-memory model for
//!   tests.
//! - [`apply`]: the executor — ordered, journaled, undoable, verified —
//!   and the node lock.
//! - [`engine`]: the one recover → observe → plan → apply → verify
//!   sequence every caller runs.
//! - [`heal`]: self-healing — probes of every route's hops, rtnetlink
//!   link and neighbour events, the per-route detector and the baseline
//!   one, proposals and their store (the overlay is the applied ones,
//!   merged onto the spec file by [`spec::overlay`]); run by the agent.
//! - [`applied`], [`status`]: the last-applied record in the state
//!   directory, and the status report built on it.
//! - [`flows`]: flow records — decoded from the datapath's ring buffer by
//!   the agent's reader, held, filtered (Hubble's flags), exported.
//! - [`agent`]: the long-running loop: a driver (when), a reconciler
//!   (what, on the engine), watches, metrics, HTTP, the flow reader.
//! - [`time`]: RFC 3339 timestamps (flow records, impact windows).
//! - [`fault`]: kill and panic points for crash tests (environment only).
//!
//! Modules use only those below them (`tests/layers.rs` holds the order).
//! - [`sandbox`]: network namespaces and veths for the demo and tests.
//! - [`cli`]: one module per subcommand; `main.rs` only parses arguments.

pub mod agent;
pub mod applied;
pub mod apply;
pub mod builtin;
pub mod cli;
pub mod codec;
pub mod compile;
pub mod datapath;
pub mod engine;
pub mod entries;
pub mod fault;
pub mod flows;
pub mod heal;
pub mod kernel;
pub mod mesh;
pub mod model;
pub mod net;
pub mod object;
pub mod packet;
pub mod plan;
pub mod sandbox;
pub mod snapshot;
pub mod spec;
pub mod status;
pub mod telemetry;
pub mod time;

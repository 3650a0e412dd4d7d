//! `bpfsync agent --spec FILE`: the long-running reconciler.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::{Context, Exit, require_root};
use crate::agent::{self, AgentConfig, FlowOptions};
use crate::flows::export::ExportPolicy;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The spec file to keep the node equal to.
    #[arg(long)]
    pub spec: PathBuf,
    /// How often to observe the kernel and repair drift.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub resync: Duration,
    /// Quiet time after a spec change before reconciling.
    #[arg(long, value_parser = parse_duration, default_value = "200ms")]
    pub debounce: Duration,
    /// Where to serve `/metrics`, `/healthz`, `/readyz` and `/status`.
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub listen: SocketAddr,
    /// Flow records kept in memory for `/flows` and `bpfsync flows`.
    #[arg(long, default_value_t = 10_000)]
    pub flow_history: usize,
    /// Also write every flow record as a JSON line to this file.
    #[arg(long)]
    pub flow_export_file: Option<PathBuf>,
    /// Rotate the export file past this size (bytes; k, M, G suffixes).
    #[arg(long, value_parser = super::parse_size, default_value = "100M")]
    pub flow_export_file_max_size: u64,
    /// Rotated export files kept (`FILE.1` is the newest).
    #[arg(long, default_value_t = 3)]
    pub flow_export_file_keep: usize,
    /// The export file's lines: bpfsync's records (`json`) or Hubble's
    /// `jsonpb` shape, for tools that read `hubble observe -o jsonpb`.
    #[arg(long, value_enum, default_value = "json")]
    pub flow_export_file_format: ExportFileFormat,
    /// Also POST flow records (JSON lines, in batches) to this `http://` collector.
    #[arg(long)]
    pub flow_export_http: Option<String>,
    /// Also send flow records to this OpenTelemetry collector as OTLP log
    /// records (HTTP, JSON, gzip): `http://host:4318` (`/v1/logs` is added).
    #[arg(long, value_name = "URL")]
    pub flow_export_otlp: Option<String>,
    /// Records each export queue holds while its sink is slow or down; past
    /// it the oldest are dropped (counted in `bpfsync_flow_export_dropped_total`).
    #[arg(long, default_value_t = 10_000)]
    pub flow_export_buffer: usize,
    /// Records per export batch.
    #[arg(long, default_value_t = 500)]
    pub flow_export_batch: usize,
}

/// `--flow-export-file-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFileFormat {
    Json,
    Jsonpb,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::spec::DurationSpec::Text(s.to_string())
        .to_duration()
        .ok_or_else(|| format!("`{s}` is not a duration: use e.g. `30s`, `500ms`, `2m`"))
}

pub fn run(ctx: &Context, args: &Args) -> anyhow::Result<Exit> {
    require_root()?;
    // One malloc arena: the agent's big allocations are transient (a spec
    // parse, a 100k-entry observation) and glibc gives back the main heap
    // well, but per-thread arenas keep what threads once used (measured:
    // 14 MB instead of 31 MB idle with 100k managed entries). Set before
    // any thread starts.
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only tunes the allocator.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    let config = AgentConfig {
        spec: args.spec.clone(),
        ctx: ctx.clone(),
        resync: args.resync,
        debounce: args.debounce,
        listen: args.listen,
        flows: FlowOptions {
            history: args.flow_history,
            export_file: args.flow_export_file.clone(),
            file_max_bytes: args.flow_export_file_max_size,
            file_keep: args.flow_export_file_keep,
            file_format: match args.flow_export_file_format {
                ExportFileFormat::Json => crate::flows::export::FileFormat::Json,
                ExportFileFormat::Jsonpb => {
                    crate::flows::export::FileFormat::Jsonpb { node: crate::flows::host_name() }
                }
            },
            export_http: args.flow_export_http.clone(),
            export_otlp: args.flow_export_otlp.clone(),
            export_buffer: args.flow_export_buffer,
            export: ExportPolicy { batch: args.flow_export_batch.max(1), ..Default::default() },
        },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async {
        // The handlers are installed now, not when the agent first polls
        // `shutdown` (after its first reconcile): a SIGTERM during start-up
        // would otherwise kill the process mid-apply instead of stopping it.
        use anyhow::Context as _;
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        let shutdown = async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        };
        agent::run(config, shutdown, |addr| eprintln!("bpfsync agent: listening on http://{addr}")).await?;
        anyhow::Ok(())
    })?;
    Ok(0)
}

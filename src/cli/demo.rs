//! `bpfsync demo`: the newcomer's first run. Builds a sandbox (a network
//! namespace and a veth pair), applies `examples/demo.yaml` there with its
//! own bpffs root and state directory, shows the plan, the status and the
//! counters moving under real traffic, proves a second apply is a no-op,
//! and tears everything down — also on Ctrl-C.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::{Context, Exit, load_spec, require_root};
use crate::apply::journal::FileJournal;
use crate::apply::{Retry, error_chain, scope_for};
use crate::compile::Desired;
use crate::datapath;
use crate::engine;
use crate::kernel::real::RealKernel;
use crate::kernel::{Kernel, Scope};
use crate::model::MapRef;
use crate::plan::{self, text::TextOptions};
use crate::sandbox::{Sandbox, TempBpffs, TempDir};

pub const DEMO_SPEC: &str = include_str!("../../examples/demo.yaml");
const NETNS: &str = "bpfsync-demo";
const HOST_IF: &str = "bsdemo0";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// How long to send traffic through the sandbox.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    // The demo makes its own bpffs and state directory: the global options
    // naming them are shadowed here so that `demo --help` does not list
    // them; whatever they say, the demo never touches the node's real root.
    #[arg(long, hide = true, value_name = "IGNORED")]
    pub bpffs_root: Option<std::path::PathBuf>,
    #[arg(long, hide = true, value_name = "IGNORED")]
    pub state_dir: Option<std::path::PathBuf>,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// A heading; bold only on a terminal (`Context::color`).
fn section(color: bool, title: &str) {
    if color {
        println!("\n\x1b[1m== {title}\x1b[0m\n");
    } else {
        println!("\n== {title}\n");
    }
}

pub fn run(ctx: &Context, args: &Args) -> anyhow::Result<Exit> {
    require_root()?;
    // SAFETY: the handler only stores to an atomic, which is signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_sigint as *const () as libc::sighandler_t);
    }
    // A demo killed earlier may have left its sandbox: start clean.
    let _ = std::process::Command::new("ip").args(["netns", "del", NETNS]).output();
    let _ = std::process::Command::new("ip").args(["link", "del", HOST_IF]).output();

    section(ctx.color, "sandbox");
    let sandbox = Sandbox::create_named(NETNS, HOST_IF, [10, 201, 0]).context("cannot create the demo sandbox")?;
    let bpffs = TempBpffs::create().context("cannot mount a bpffs for the demo")?;
    let state = TempDir::create("bpfsync-demo-state")?;
    println!(
        "network namespace `{}` with `{}` ({}) ↔ `{}` ({}); bpffs root {}",
        sandbox.netns,
        sandbox.host_if,
        sandbox.host_ip,
        sandbox.peer_if,
        sandbox.peer_ip,
        bpffs.root().display()
    );
    let demo_ctx = Context { bpffs_root: bpffs.root(), state_dir: state.path().to_path_buf(), ..ctx.clone() };
    let spec_path = state.path().join("demo.yaml");
    std::fs::write(&spec_path, DEMO_SPEC)?;
    let result = run_in_sandbox(&demo_ctx, &spec_path, &sandbox, args);

    section(ctx.color, "teardown");
    let down = teardown(&demo_ctx);
    drop(sandbox);
    drop(bpffs);
    println!("removed the sandbox, the demo's bpffs and state directory");
    result.and(down)?;
    if interrupted() {
        println!("interrupted: everything was cleaned up");
        return Ok(130);
    }
    println!("\nNext: write your own spec (see examples/), then `bpfsync plan SPEC` and `bpfsync apply SPEC`.");
    Ok(0)
}

fn teardown(ctx: &Context) -> anyhow::Result<()> {
    let mut kernel = RealKernel::open(&ctx.bpffs_root).map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    let mut journal = FileJournal::new(&ctx.state_dir);
    let done = engine::reconcile(&mut kernel, &mut journal, &Desired::default(), Retry::default())
        .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    let steps = done.report.map_or(0, |r| r.steps);
    println!("`bpfsync down`: {steps} steps, everything bpfsync owned is gone");
    Ok(())
}

fn run_in_sandbox(ctx: &Context, spec_path: &std::path::Path, sandbox: &Sandbox, args: &Args) -> anyhow::Result<()> {
    section(ctx.color, "bpfsync validate examples/demo.yaml");
    let (loaded, desired) = load_spec(ctx, spec_path)?;
    println!("valid: {} programs, {} attachments", desired.state.programs.len(), desired.state.attachments.len());

    section(ctx.color, "bpfsync plan examples/demo.yaml");
    let mut kernel = RealKernel::open(&ctx.bpffs_root).map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    let mut journal = FileJournal::new(&ctx.state_dir);
    let prepared = engine::prepare(&mut kernel, &mut journal, &desired, Retry::default())
        .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    print!("{}", plan::text::render(&prepared.plan, TextOptions { color: ctx.color }));
    if interrupted() {
        return Ok(());
    }

    section(ctx.color, "bpfsync apply examples/demo.yaml --auto-approve");
    let t = Instant::now();
    let report = engine::execute(&mut kernel, &mut journal, &desired, &prepared, Retry::default())
        .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    super::save_last_applied(ctx, &loaded, &desired)?;
    println!(
        "applied {} steps with {} kernel writes in {:?}, verified by observing again",
        report.steps,
        report.kernel_writes,
        t.elapsed()
    );

    section(ctx.color, "bpfsync status");
    let (v, _, drift) = crate::status::report(ctx)?;
    print!("{}", super::status::render_text(&v, drift.as_ref()));

    section(
        ctx.color,
        &format!("live counters: UDP from {} to {} for {}s", sandbox.peer_ip, sandbox.host_ip, args.seconds),
    );
    let stats = MapRef { program: "counter".into(), map: "packet_stats".into() };
    let scope = Scope { maps: [stats.clone()].into(), ..Default::default() };
    let stop = Instant::now() + Duration::from_secs(args.seconds);
    while Instant::now() < stop && !interrupted() {
        sandbox.send_udp(9, 100, Duration::from_millis(5))?;
        let seen = kernel.observe(&scope).map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
        let c = seen.maps.get(&stats).map(|m| datapath::proto_counters(&m.entries)).unwrap_or_default();
        let line: Vec<String> = c.iter().map(|(k, s)| format!("{k} {} pkts/{} B", s.packets, s.bytes)).collect();
        println!("  xdp counter on {}: {}", sandbox.host_if, line.join(", "));
    }
    if interrupted() {
        return Ok(());
    }

    section(ctx.color, "bpfsync plan examples/demo.yaml   (again: nothing to do)");
    let observed = kernel.observe(&scope_for(&desired.state)).map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    let p = plan::plan(&desired.state, &observed);
    print!("{}", plan::text::render(&p, TextOptions { color: ctx.color }));
    Ok(())
}

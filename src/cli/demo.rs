//! `bpfsync demo`: the newcomer's first run. Builds a sandbox (a network
//! namespace and a veth pair), applies `examples/demo.yaml` there with its
//! own bpffs root and state directory, shows the plan, the status and the
//! counters moving under real traffic (and the stack dropping it, by
//! reason), proves a second apply is a no-op,
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
use crate::sandbox::{Sandbox, TempBpffs, TempDir, TwoPaths};
use crate::telemetry::Telemetry;

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
    /// Skip the self-healing scene (a route failing over to its fallback).
    #[arg(long)]
    pub no_heal: bool,
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
    let mut result = run_in_sandbox(&demo_ctx, &spec_path, &sandbox, args);
    if result.is_ok() && !interrupted() && !args.no_heal {
        result = heal_scene(ctx);
    }

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
    let (v, observed, drift) = crate::status::report(ctx)?;
    print!("{}", super::status::render_text(&v, &observed, drift.as_ref()));

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

    section(ctx.color, "bpfsync status   (telemetry: what the node's stack did with those datagrams)");
    let maps = crate::telemetry::MAPS.iter().map(|m| m.to_string()).collect();
    let seen = kernel.observe(&Scope { map_names: maps, ..Default::default() });
    if let Some(t) = seen.ok().as_ref().and_then(Telemetry::from_state) {
        // Node-wide: other traffic on this machine counts too.
        print!("{}", t.render_text(crate::telemetry::reasons::kernel_names().0, None));
    }

    section(ctx.color, "bpfsync plan examples/demo.yaml   (again: nothing to do)");
    let observed = kernel.observe(&scope_for(&desired.state)).map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    let p = plan::plan(&desired.state, &observed);
    print!("{}", plan::text::render(&p, TextOptions { color: ctx.color }));
    Ok(())
}

/// The heal loop in a sandbox of its own: A — R — B with two links, the
/// agent on R, the primary link cut and restored.
fn heal_scene(ctx: &Context) -> anyhow::Result<()> {
    section(ctx.color, "self-healing: a route with a fallback hop, the agent watching both");
    let paths = TwoPaths::create().context("cannot create the two-path sandbox")?;
    let bpffs = TempBpffs::create().context("cannot mount a bpffs for the demo")?;
    let state = TempDir::create("bpfsync-demo-heal")?;
    let heal_ctx = Context { bpffs_root: bpffs.root(), state_dir: state.path().to_path_buf(), ..ctx.clone() };
    let rule = paths.rule("primary-down", "{ metric: link-down }", "{ below: 0.05, for: 1s }", true);
    let spec = state.path().join("heal.yaml");
    std::fs::write(&spec, paths.spec("", &rule))?;
    println!(
        "route {} via {} ({}), fallback via {} ({}); probes every 100 ms",
        paths.prefix(),
        paths.ip(6),
        paths.h1,
        paths.ip(10),
        paths.h2
    );
    let result = with_agent(&heal_ctx, &spec, |store| {
        wait_until(Duration::from_secs(20), || hops_answering(store))?;
        section(ctx.color, "`ip link set b1 down`: the primary link loses its carrier");
        let cut = Instant::now();
        paths.primary_down(true)?;
        wait_until(Duration::from_secs(10), || applied_count(store) == 1)?;
        println!("switched to the fallback {:?} after the cut\n", cut.elapsed());
        super::proposals::run(&heal_ctx, &list_args())?;
        section(ctx.color, "bpfsync status   (the self-healing part)");
        wait_until(Duration::from_secs(5), || hop_down_seen(store))?;
        let (v, observed, drift) = crate::status::report(&heal_ctx)?;
        let text = super::status::render_text(&v, &observed, drift.as_ref());
        let part = text.split("\nSELF-HEALING").nth(1).map(|p| p.split("\n\n").next().unwrap_or(p)).unwrap_or_default();
        println!("SELF-HEALING{part}");
        section(ctx.color, "`ip link set b1 up`: the primary answers again");
        paths.primary_down(false)?;
        let back = Instant::now();
        wait_until(Duration::from_secs(20), || applied_count(store) == 0)?;
        println!("back on the primary {:?} after it recovered (recover.for 1s)\n", back.elapsed());
        let all =
            super::proposals::Args { command: super::proposals::Sub::List { all: true, output: super::Output::Text } };
        super::proposals::run(&heal_ctx, &all)?;
        Ok(())
    });
    println!("\nthe spec file was never written: the switch lived in the overlay in the state directory");
    let down = teardown(&heal_ctx);
    result.and(down)
}

fn list_args() -> super::proposals::Args {
    super::proposals::Args { command: super::proposals::Sub::List { all: false, output: super::Output::Text } }
}

fn applied_count(store: &crate::heal::store::Store) -> usize {
    store
        .list()
        .map(|l| l.proposals.iter().filter(|p| p.status == crate::heal::proposal::Status::Applied).count())
        .unwrap_or(0)
}

/// The agent's snapshot file (written at once when a route moves) shows
/// the primary down.
fn hop_down_seen(store: &crate::heal::store::Store) -> bool {
    let Ok(text) = std::fs::read_to_string(store.snapshot_path()) else { return false };
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    v["snapshot"]["routes"].as_array().is_some_and(|r| r.iter().any(|r| r["on_fallback"] == true))
}

/// The agent's snapshot says every hop answers.
fn hops_answering(store: &crate::heal::store::Store) -> bool {
    let Ok(text) = std::fs::read_to_string(store.snapshot_path()) else { return false };
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let hops = v["snapshot"]["hops"].as_array().cloned().unwrap_or_default();
    !hops.is_empty() && hops.iter().all(|h| h["loss"].as_f64() == Some(0.0))
}

fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if interrupted() {
            anyhow::bail!("interrupted");
        }
        if Instant::now() > deadline {
            anyhow::bail!("the demo's agent did not get there within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Runs `f` beside a `bpfsync agent` on `spec` (this binary), stopped after.
fn with_agent(
    ctx: &Context,
    spec: &std::path::Path,
    f: impl FnOnce(&crate::heal::store::Store) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut agent = std::process::Command::new(std::env::current_exe()?)
        .args(["--bpffs-root", &ctx.bpffs_root.to_string_lossy(), "--state-dir", &ctx.state_dir.to_string_lossy()])
        .args(["agent", "--spec", &spec.to_string_lossy(), "--debounce", "50ms"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("BPFSYNC_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("cannot start the agent")?;
    let result = f(&crate::heal::store::Store::new(&ctx.state_dir));
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let _ = agent.wait();
    result
}

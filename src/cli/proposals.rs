//! `bpfsync proposals`: what the heal loop proposed, and a person's
//! decisions on it. Works on the state directory beside a running agent
//! (the proposal store has its own lock; the node lock stays the agent's):
//! an approval or a revert is picked up by the agent within a fraction of
//! a second, or by the next `bpfsync apply`.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde_json::json;

use super::{Context, Exit, Output};
use crate::heal::proposal::{Action, Proposal, Status};
use crate::heal::store::Store;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: Sub,
}

#[derive(Debug, clap::Subcommand)]
pub enum Sub {
    /// Pending and applied proposals (`--all`: every one kept).
    List {
        /// Also the rejected, reverted, superseded and expired ones.
        #[arg(long)]
        all: bool,
        /// Output format: `text` for people, `json` for tools.
        #[arg(short, long, value_enum, default_value = "text")]
        output: Output,
    },
    /// One proposal: evidence, patch, diff, plan and history.
    Show {
        /// The proposal's id (from `list`).
        id: String,
        /// The spec file its plan is computed from (default: the last applied one).
        #[arg(long)]
        spec: Option<PathBuf>,
        /// Output format: `text` for people, `json` for tools.
        #[arg(short, long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Apply a pending proposal (through the overlay; the spec file is never written).
    Approve {
        /// The proposal's id.
        id: String,
        /// The spec file the patch is checked against (default: the last applied one).
        #[arg(long)]
        spec: Option<PathBuf>,
        /// Why, recorded in the history.
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Decline a pending proposal (a rejected flap lock sends the route back to its primary).
    Reject {
        /// The proposal's id.
        id: String,
        /// Why, recorded in the history.
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Take an applied proposal out of the overlay: the route goes back to its primary.
    Revert {
        /// The proposal's id.
        id: String,
        /// Why, recorded in the history.
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Print the patch as a unified diff of the spec file and as JSON Patch, for a pull request.
    Export {
        /// The proposal's id.
        id: String,
        /// The spec file to diff (default: the last applied one).
        #[arg(long)]
        spec: Option<PathBuf>,
    },
}

impl Args {
    pub fn wants_json(&self) -> bool {
        matches!(&self.command, Sub::List { output: Output::Json, .. } | Sub::Show { output: Output::Json, .. })
    }
}

/// Who decides: the login behind sudo, else the user, else the uid.
fn person() -> String {
    let name = std::env::var("SUDO_USER").or_else(|_| std::env::var("USER")).unwrap_or_else(|_| {
        // SAFETY: getuid has no preconditions.
        format!("uid {}", unsafe { libc::getuid() })
    });
    format!("user:{name}")
}

fn spec_path(ctx: &Context, given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    match crate::applied::load_meta(ctx)? {
        Some(meta) => Ok(PathBuf::from(meta.spec_path)),
        None => bail!("nothing was applied from `{}`: name the spec file with `--spec`", ctx.state_dir.display()),
    }
}

fn when(ms: u64) -> String {
    let id = crate::heal::store::new_id(ms, "");
    // `YYYYMMDD-HHMMSS-xxxx` → `YYYY-MM-DD HH:MM:SS`.
    format!("{}-{}-{} {}:{}:{} UTC", &id[0..4], &id[4..6], &id[6..8], &id[9..11], &id[11..13], &id[13..15])
}

fn target(p: &Proposal) -> String {
    match &p.action {
        Action::Switch { to, .. } => format!("switch to {to}"),
        Action::Lock { on, .. } => format!("lock on {on}"),
    }
}

pub fn run(ctx: &Context, args: &Args) -> anyhow::Result<Exit> {
    let store = Store::new(&ctx.state_dir);
    match &args.command {
        Sub::List { all, output } => list(&store, *all, *output),
        Sub::Show { id, output, spec } => show(ctx, &store, id, spec.as_deref(), *output),
        Sub::Approve { id, spec, note } => approve(ctx, &store, id, spec.as_deref(), note),
        Sub::Reject { id, note } => reject(&store, id, note),
        Sub::Revert { id, note } => {
            let p = store.lock()?.transition(id, Status::Reverted, &person(), note)?;
            println!("Reverted {}: route {} goes back to its primary hop.", p.id, p.route);
            println!("A running agent applies it now; otherwise run `bpfsync apply`.");
            Ok(0)
        }
        Sub::Export { id, spec } => export(ctx, &store, id, spec.as_deref()),
    }
}

fn list(store: &Store, all: bool, output: Output) -> anyhow::Result<Exit> {
    let listing = store.list()?;
    let shown: Vec<&Proposal> = listing.proposals.iter().filter(|p| all || !p.status.is_final()).collect();
    if output == Output::Json {
        println!("{}", json!({ "proposals": shown, "set-aside": listing.set_aside }));
        return Ok(0);
    }
    for s in &listing.set_aside {
        eprintln!("warning: an unreadable proposal was set aside: {s}");
    }
    if shown.is_empty() {
        println!("No {}proposals.", if all { "" } else { "pending or applied " });
        return Ok(0);
    }
    println!("{:<22} {:<10} {:<18} {:<28} SOURCE", "ID", "STATUS", "ROUTE", "ACTION");
    for p in shown {
        println!("{:<22} {:<10} {:<18} {:<28} {}", p.id, p.status, p.route, target(p), p.source);
    }
    Ok(0)
}

fn show(ctx: &Context, store: &Store, id: &str, spec: Option<&Path>, output: Output) -> anyhow::Result<Exit> {
    let p = store.get(id)?;
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&p)?);
        return Ok(0);
    }
    println!("Proposal {} ({})", p.id, p.status);
    println!("  route:    {}", p.route);
    println!("  action:   {}", target(&p));
    println!("  source:   {}{}", p.source, if p.auto_apply { " (auto-apply)" } else { "" });
    if let Some(q) = &p.queued_because {
        println!("  queued:   {q}");
    }
    println!("  created:  {}", when(p.created_unix_ms));
    let e = &p.evidence;
    println!("\nEvidence: {}", e.reason);
    let value = e.value.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into());
    let threshold = e.threshold.map(|v| format!(" (threshold {v})")).unwrap_or_default();
    println!("  {} = {value}{threshold} over {} ms, held {} ms", e.metric, e.window_ms, e.held_ms);
    for h in &e.hops {
        let f = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into());
        println!(
            "  {:<12} {:<28} loss {:<6} p99 {:<8} misses {}{}",
            h.role,
            h.hop.to_string(),
            f(h.loss),
            f(h.rtt_p99_ms).to_string() + "ms",
            h.consecutive_misses,
            h.hard_failure.as_ref().map(|x| format!("  ({x})")).unwrap_or_default()
        );
    }
    println!("\nSpec change (through the overlay; the file is not written):\n{}", p.diff);
    match (p.status, live_plan(ctx, store, &p, spec)) {
        (Status::Pending, Ok(text)) => print!("Plan, if approved, against the kernel now:\n{text}"),
        (Status::Applied, Ok(_)) => println!("Plan: {} (in force)", p.plan),
        (_, Ok(_)) => println!("Plan: {}", p.plan),
        (_, Err(e)) => println!("Plan: {}\n  (no live plan: {e:#})", p.plan),
    }
    println!("\nHistory:");
    for t in &p.history {
        let note = if t.note.is_empty() { String::new() } else { format!(": {}", t.note) };
        println!("  {}  {:<10} by {}{note}", when(t.at_unix_ms), t.status, t.by);
    }
    Ok(0)
}

/// What `bpfsync plan` would show with this proposal in the overlay: the
/// spec file, the overlay in force, the proposal, against the kernel now
/// (read only).
fn live_plan(ctx: &Context, store: &Store, p: &Proposal, spec: Option<&Path>) -> anyhow::Result<String> {
    use crate::kernel::Kernel;
    let spec = spec_path(ctx, spec)?;
    let source = crate::spec::read_limited(&spec, ctx.max_spec_bytes)?;
    let mut overlay = store.overlay()?;
    if p.status == Status::Pending {
        overlay.push(p.overlay_entry());
    }
    let (loaded, desired) =
        crate::compile::load_and_compile(&spec, &source, &overlay, &mut crate::compile::ObjectLoader::default())
            .map_err(|d| anyhow::anyhow!("the spec does not compile:\n{d}"))?;
    if let Some(s) = loaded.overlay.superseded.iter().find(|s| s.id == p.id) {
        anyhow::bail!("it no longer applies: {}", s.reason);
    }
    let mut kernel = super::open_kernel_read_only(ctx)?;
    let observed = kernel
        .observe(&crate::apply::scope_for(&desired.state))
        .map_err(|e| anyhow::anyhow!(crate::apply::error_chain(&e)))?;
    let plan = crate::plan::plan(&desired.state, &observed);
    Ok(crate::plan::text::render(&plan, crate::plan::text::TextOptions { color: ctx.color }))
}

/// The spec file's document now, to check a patch against.
fn current_document(ctx: &Context, spec: &Path) -> anyhow::Result<(String, crate::spec::yaml::MarkedDocument)> {
    let source = crate::spec::read_limited(spec, ctx.max_spec_bytes)?;
    let doc = crate::spec::yaml::parse(&source)
        .map_err(|e| anyhow::anyhow!("`{}` is not valid YAML: {}", spec.display(), e.message))?;
    Ok((source, doc))
}

fn approve(ctx: &Context, store: &Store, id: &str, spec: Option<&Path>, note: &str) -> anyhow::Result<Exit> {
    let spec = spec_path(ctx, spec)?;
    let lock = store.lock()?;
    let p = store.get(id)?;
    if p.status != Status::Pending {
        bail!("proposal `{id}` is {}: only a pending proposal can be approved", p.status);
    }
    let (_, doc) = current_document(ctx, &spec)?;
    if let Err(e) = crate::spec::patch::apply(&doc.value, &p.patch) {
        let why = format!("the spec file changed under it: {e}");
        lock.transition(id, Status::Superseded, &person(), &why)?;
        bail!(
            "refusing to approve `{id}`: it is stale ({why}); it is now superseded. The heal loop proposes again if the condition holds"
        );
    }
    if let Action::Lock { .. } = p.action {
        // The lock keeps the route where its switch put it: the switch's
        // entry gives way, so the two never patch the same hops.
        let listing = store.list()?;
        for s in listing.proposals.iter().filter(|s| s.route == p.route && s.status == Status::Applied) {
            lock.transition(&s.id, Status::Superseded, &person(), &format!("kept by flap lock {id}"))?;
        }
    }
    lock.transition(id, Status::Applied, &person(), note)?;
    println!("Approved {id}: route {} — {}.", p.route, target(&p));
    println!("A running agent applies it now; otherwise run `bpfsync apply`.");
    println!("To make it permanent, commit `bpfsync proposals export {id}` to the spec file's repository.");
    Ok(0)
}

fn reject(store: &Store, id: &str, note: &str) -> anyhow::Result<Exit> {
    let lock = store.lock()?;
    let p = lock.transition(id, Status::Rejected, &person(), note)?;
    if let Action::Lock { .. } = p.action {
        // No lock: the route goes back to its primary, and automatic
        // switching resumes with a fresh flap history.
        for s in store.list()?.proposals.iter().filter(|s| s.route == p.route && s.status == Status::Applied) {
            lock.transition(&s.id, Status::Reverted, &person(), &format!("flap lock {id} rejected"))?;
        }
        println!("Rejected {id}: route {} goes back to its primary; automatic switching resumes.", p.route);
    } else {
        println!("Rejected {id}: nothing changes.");
    }
    Ok(0)
}

fn export(ctx: &Context, store: &Store, id: &str, spec: Option<&Path>) -> anyhow::Result<Exit> {
    let spec = spec_path(ctx, spec)?;
    let p = store.get(id)?;
    let (source, doc) = current_document(ctx, &spec)?;
    crate::spec::patch::apply(&doc.value, &p.patch)
        .with_context(|| format!("proposal `{id}` no longer applies to `{}`", spec.display()))?;
    let name = spec.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    match crate::heal::export::edit_text(&source, &doc, &p.patch) {
        Some(after) => print!("{}", crate::heal::export::unified_diff(&name, &source, &after)),
        None => println!("# the route's lines could not be edited in place; the change:\n{}", p.diff),
    }
    println!("\n# JSON Patch (RFC 6902) against `{}`:", spec.display());
    println!("{}", serde_json::to_string_pretty(&p.patch)?);
    Ok(0)
}

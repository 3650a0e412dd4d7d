//! `bpfsync apply SPEC`: plan, confirm, apply, verify.

use std::path::PathBuf;

use super::{Context, Exit, Output, confirm, load_spec, open_kernel_locked, save_last_applied};
use crate::apply::journal::FileJournal;
use crate::apply::{Retry, error_chain, scope_for};
use crate::engine;
use crate::kernel::Kernel;
use crate::plan::{self, text::TextOptions};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The spec file.
    pub spec: PathBuf,
    /// Apply without asking (required when not on a terminal).
    #[arg(long)]
    pub auto_approve: bool,
    /// Output format: `text` for people, `json` for tools (JSON on errors too).
    #[arg(short, long, value_enum, default_value = "text")]
    pub output: Output,
}

/// Says where `mode: auto` resolved to generic XDP: it works everywhere but
/// costs more than native, which users choosing `auto` may expect.
fn notes_on_xdp_modes(kernel: &mut crate::kernel::real::RealKernel, desired: &crate::compile::Desired) {
    let Ok(seen) = kernel.observe(&scope_for(&desired.state)) else { return };
    for (hook, a) in &seen.attachments {
        let asked = desired.state.attachments.get(hook).and_then(|d| d.mode);
        if asked == Some(crate::spec::XdpMode::Auto) && a.running_mode == Some(crate::spec::XdpMode::Skb) {
            eprintln!("note: `{hook}` runs in generic (skb) mode: the driver has no native XDP");
        }
    }
}

pub fn run(ctx: &Context, args: &Args) -> anyhow::Result<Exit> {
    let (loaded, desired) = load_spec(ctx, &args.spec)?;
    let (mut kernel, _lock) = open_kernel_locked(ctx, "apply")?;
    crate::heal::supersede(&crate::heal::store::Store::new(&ctx.state_dir), &loaded.overlay, "apply");
    let mut journal = FileJournal::new(&ctx.state_dir);
    let prepared = engine::prepare(&mut kernel, &mut journal, &desired, Retry::default())
        .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    if prepared.recovered > 0 {
        eprintln!("Rolled back {} step(s) of an interrupted apply.", prepared.recovered);
    }
    let plan = &prepared.plan;
    let text = args.output == Output::Text;
    if text {
        print!("{}", super::overlay_text(&loaded));
        print!("{}", plan::text::render(plan, TextOptions { color: ctx.color }));
    }
    if !plan.errors.is_empty() {
        anyhow::bail!("the plan cannot be applied, nothing was changed: {}", plan.errors.join("; "));
    }
    let pending = plan.pending().count();
    if plan.is_empty() {
        save_last_applied(ctx, &loaded, &desired)?;
        if text && pending > 0 {
            println!(
                "\nNothing to apply now; {pending} declared object(s) are pending (see above). `bpfsync agent` puts them in place as soon as they can be."
            );
        }
        if !text {
            println!(
                "{}",
                serde_json::json!({ "plan": plan::json::to_value(plan), "applied": { "steps": 0, "kernel_writes": 0 } })
            );
        }
        return Ok(0);
    }
    if !confirm(args.auto_approve, "Do you want to perform these actions?")? {
        println!("Apply cancelled.");
        return Ok(1);
    }
    let report = engine::execute(&mut kernel, &mut journal, &desired, &prepared, Retry::default())
        .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    save_last_applied(ctx, &loaded, &desired)?;
    notes_on_xdp_modes(&mut kernel, &desired);
    let s = plan.summary();
    if text {
        let counts = format!(
            "{} added, {} changed, {} destroyed ({} steps, {} kernel writes, verified)",
            s.add, s.change, s.destroy, report.steps, report.kernel_writes
        );
        if pending > 0 {
            println!(
                "\nApplied what could be applied: {counts}. {pending} declared object(s) are pending (see above); `bpfsync agent` puts them in place as soon as they can be."
            );
        } else {
            println!("\nApply complete! {counts}.");
        }
        let others = plan.conflicts.len() - pending;
        if others > 0 {
            println!("{others} conflict(s) left unresolved (see above).");
        }
    } else {
        println!("{}", serde_json::json!({ "plan": plan::json::to_value(plan), "applied": report }));
    }
    tracing::info!(add = s.add, change = s.change, destroy = s.destroy, steps = report.steps, "applied");
    Ok(0)
}

//! `bpfsync plan SPEC`: what apply would change, changing nothing.

use std::path::PathBuf;

use anyhow::Context as _;

use super::{Context, Exit, Output, load_spec, open_kernel_read_only};
use crate::apply::journal::{FileJournal, JournalStore};
use crate::apply::scope_for;
use crate::kernel::Kernel;
use crate::plan::{self, text::TextOptions};
use crate::snapshot::Snapshot;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The spec file.
    pub spec: PathBuf,
    /// Output format: `text` for people, `json` for tools (JSON on errors too).
    #[arg(short, long, value_enum, default_value = "text")]
    pub output: Output,
    /// Exit 0 when the node matches the spec, 2 when there are changes or
    /// declared objects not in place (pending), 1 on error.
    #[arg(long)]
    pub detailed_exitcode: bool,
    /// Plan against an observed-state snapshot (`bpfsync status --snapshot`)
    /// instead of the kernel: no privileges needed, e.g. in CI.
    #[arg(long, value_name = "FILE")]
    pub observed: Option<PathBuf>,
}

pub fn run(ctx: &Context, args: &Args) -> anyhow::Result<Exit> {
    let (loaded, desired) = load_spec(ctx, &args.spec)?;
    let observed = match &args.observed {
        Some(path) => {
            let text = crate::spec::read_limited(path, ctx.max_spec_bytes)
                .with_context(|| format!("cannot read snapshot `{}`", path.display()))?;
            Snapshot::parse(&text)
                .and_then(|s| s.to_state(&desired.state))
                .with_context(|| format!("invalid snapshot `{}`", path.display()))?
        }
        None => {
            let mut kernel = open_kernel_read_only(ctx)?;
            if FileJournal::new(&ctx.state_dir).pending().ok().flatten().is_some() {
                eprintln!("warning: an interrupted apply is pending; `bpfsync apply` rolls it back before planning");
            }
            kernel.observe(&scope_for(&desired.state)).map_err(|e| anyhow::anyhow!(crate::apply::error_chain(&e)))?
        }
    };
    let plan = plan::plan(&desired.state, &observed);
    match args.output {
        Output::Text => {
            print!("{}", super::overlay_text(&loaded));
            print!("{}", plan::text::render(&plan, TextOptions { color: ctx.color }))
        }
        Output::Json if loaded.overlay.is_empty() => print!("{}", plan::json::render(&plan)),
        Output::Json => {
            let mut v: serde_json::Value = serde_json::from_str(&plan::json::render(&plan))?;
            v["overlay"] = super::overlay_json(&loaded);
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
    }
    if !plan.errors.is_empty() {
        return Ok(1);
    }
    // A declared object that is not in place (pending) is a difference too:
    // a CI gate must not pass over a program attached nowhere.
    Ok(if args.detailed_exitcode && !plan.is_converged() { 2 } else { 0 })
}

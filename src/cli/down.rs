//! `bpfsync down`: removes everything bpfsync owns, and nothing else.

use std::fs;

use super::{Context, Exit, clear_last_applied, confirm, open_kernel_locked};
use crate::apply::journal::FileJournal;
use crate::apply::{Retry, error_chain};
use crate::compile::Desired;
use crate::engine;
use crate::plan::{self, text::TextOptions};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Remove without asking (required when not on a terminal).
    #[arg(long)]
    pub auto_approve: bool,
}

pub fn run(ctx: &Context, args: &Args) -> anyhow::Result<Exit> {
    let (mut kernel, _lock) = open_kernel_locked(ctx, "down")?;
    let mut journal = FileJournal::new(&ctx.state_dir);
    // Nothing desired: the plan removes everything bpfsync owns.
    let desired = Desired::default();
    let prepared = engine::prepare(&mut kernel, &mut journal, &desired, Retry::default())
        .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    print!("{}", plan::text::render(&prepared.plan, TextOptions { color: ctx.color }));
    if !prepared.plan.is_empty() {
        if !confirm(args.auto_approve, "Remove everything bpfsync owns on this node?")? {
            println!("Cancelled.");
            return Ok(1);
        }
        let report = engine::execute(&mut kernel, &mut journal, &desired, &prepared, Retry::default())
            .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
        println!("\nDown complete: {} steps, {} kernel writes.", report.steps, report.kernel_writes);
    }
    // Remove bpfsync's (now empty) directories under its root.
    let root = kernel.root().to_path_buf();
    for d in ["programs", "maps", "links", "trash"] {
        let _ = fs::remove_dir_all(root.join(d));
    }
    let _ = fs::remove_dir(&root);
    clear_last_applied(ctx);
    Ok(0)
}

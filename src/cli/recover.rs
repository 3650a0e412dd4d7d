//! `bpfsync recover`: finishes what an interrupted apply left. Without
//! flags it rolls the journal back (as every apply, `down` and agent start
//! do first); `--discard` drops a journal that cannot be rolled back and
//! keeps what the kernel runs now, for the next apply to converge from.

use super::{Context, Exit, Output, open_kernel_locked};
use crate::apply::journal::{FileJournal, JournalStore};
use crate::apply::{self, Retry, error_chain};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Drop the journal (and the objects it set aside) without rolling back.
    #[arg(long)]
    pub discard: bool,
    /// Output format: `text` for people, `json` for tools (JSON on errors too).
    #[arg(short, long, value_enum, default_value = "text")]
    pub output: Output,
}

pub fn run(ctx: &Context, args: &Args) -> anyhow::Result<Exit> {
    let (mut kernel, _lock) = open_kernel_locked(ctx, "recover")?;
    let mut journal = FileJournal::new(&ctx.state_dir);
    let pending = journal.pending().map_err(|e| anyhow::anyhow!("cannot read the journal: {e}"))?;
    let steps: Vec<String> = pending.iter().flat_map(|(s, _)| s.iter().map(|s| s.what.clone())).collect();
    let started = pending.as_ref().and_then(|(_, started)| *started).map_or(0, |i| i + 1);
    let (action, undone) = if args.discard {
        apply::discard_journal(&mut kernel, &mut journal).map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
        ("discarded", 0)
    } else {
        let n = apply::recover(&mut kernel, &mut journal, Retry::default())
            .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
        ("rolled-back", n)
    };
    let action = if pending.is_none() { "none" } else { action };
    match args.output {
        Output::Json => println!(
            "{}",
            serde_json::json!({ "journal": { "steps": steps, "started": started }, "action": action, "undone": undone })
        ),
        Output::Text => match action {
            "none" => println!("No interrupted apply: nothing to recover."),
            "discarded" => {
                println!(
                    "Discarded the journal of an interrupted apply ({started} of {} step(s) had started):",
                    steps.len()
                );
                for s in &steps {
                    println!("  - {s}");
                }
                println!("The kernel keeps what it runs now; `bpfsync plan` shows what an apply would change.");
            }
            _ => println!("Rolled back {undone} step(s) of an interrupted apply; the node is as it was before it."),
        },
    }
    Ok(0)
}

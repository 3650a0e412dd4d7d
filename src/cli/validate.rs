//! `bpfsync validate SPEC`: parse, schema, semantic and object checks.
//! Touches nothing; needs no privileges.

use std::path::PathBuf;

use super::{Exit, Output, load_spec};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The spec file.
    pub spec: PathBuf,
    #[arg(short, long, value_enum, default_value = "text")]
    pub output: Output,
}

pub fn run(args: &Args) -> anyhow::Result<Exit> {
    let (loaded, desired) = load_spec(&args.spec)?;
    let s = &desired.state;
    let entries: usize = s.maps.values().filter(|m| m.managed).map(|m| m.entries.len()).sum();
    match args.output {
        Output::Text => println!(
            "{}: valid ({} programs, {} attachments, {} map entries; {} routes, {} policies, {} fallback rules)",
            args.spec.display(),
            s.programs.len(),
            s.attachments.len(),
            entries,
            loaded.spec.routes.len(),
            loaded.spec.policies.len(),
            loaded.spec.fallback.len()
        ),
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "valid": true,
                "programs": s.programs.len(),
                "attachments": s.attachments.len(),
                "map_entries": entries,
            })
        ),
    }
    Ok(0)
}

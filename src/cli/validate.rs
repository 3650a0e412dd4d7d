//! `bpfsync validate SPEC`: parse, schema, semantic and object checks.
//! Touches nothing; needs no privileges.

use std::path::PathBuf;

use super::{Exit, InvalidSpec, Output};
use crate::compile::{ObjectLoader, load_and_compile};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The spec file.
    pub spec: PathBuf,
    /// `json` prints `{ "valid": …, "errors": [{file, line, column, path, message}] }` on stdout.
    #[arg(short, long, value_enum, default_value = "text")]
    pub output: Output,
}

pub fn run(ctx: &super::Context, args: &Args) -> anyhow::Result<Exit> {
    let source = crate::spec::read_limited(&args.spec, ctx.max_spec_bytes)?;
    let result = load_and_compile(&args.spec, &source, &[], &mut ObjectLoader::default());
    let (loaded, desired) = match result {
        Ok(x) => x,
        Err(diags) => return Err(InvalidSpec(diags).into()),
    };
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
                "routes": loaded.spec.routes.len(),
                "policies": loaded.spec.policies.len(),
                "fallback": loaded.spec.fallback.len(),
            })
        ),
    }
    Ok(0)
}

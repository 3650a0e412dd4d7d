use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use bpfsync::cli::{self, Context};
use bpfsync::kernel::real::DEFAULT_ROOT;

/// Keeps a Linux node's eBPF datapath equal to a YAML desired-state file.
#[derive(Debug, Parser)]
#[command(name = "bpfsync", version, about)]
struct Cli {
    /// bpfsync's own directory on bpffs, where it pins what it owns.
    #[arg(long, env = "BPFSYNC_BPFFS_ROOT", default_value = DEFAULT_ROOT, global = true)]
    bpffs_root: PathBuf,
    /// Where bpfsync records what it applied, and its journal.
    #[arg(long, env = "BPFSYNC_STATE_DIR", default_value = cli::DEFAULT_STATE_DIR, global = true)]
    state_dir: PathBuf,
    /// Never colour the output (colour is used on terminals only).
    #[arg(long, global = true)]
    no_color: bool,
    /// The largest spec or snapshot read (bytes; k, M, G suffixes).
    #[arg(long, env = "BPFSYNC_MAX_SPEC_SIZE", value_parser = cli::parse_size, default_value = "16M", global = true)]
    max_spec_size: u64,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value = "text", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check a spec: syntax, schema, references, objects, map sizes.
    Validate(cli::validate::Args),
    /// Show what apply would change (exit 2 with changes under --detailed-exitcode).
    Plan(cli::plan::Args),
    /// Change the kernel to match the spec, then verify.
    Apply(cli::apply::Args),
    /// Show what bpfsync owns, counters, and drift from the last applied spec.
    Status(cli::status::Args),
    /// Remove everything bpfsync owns, nothing else.
    Down(cli::down::Args),
    /// Roll back an interrupted apply, or drop its journal (`--discard`).
    Recover(cli::recover::Args),
    /// Proposals of the heal loop: list, show, approve, reject, revert, export.
    Proposals(cli::proposals::Args),
    /// Print the spec's JSON Schema.
    Schema,
    /// Run bpfsync in a throwaway sandbox of network namespaces.
    Demo(cli::demo::Args),
    /// Keep the node equal to a spec file: watch, resync, repair, export metrics and flows.
    Agent(cli::agent::Args),
    /// Show flow records from the agent, filtered (Hubble's flags).
    Flows(Box<cli::flows::Args>),
    /// Mesh datapath and telemetry counters, with rates and percentiles over an interval.
    Stats(cli::stats::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The agent logs every apply and repair; one-shot commands only warnings.
    let default_level = if matches!(cli.command, Command::Agent(_)) { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("BPFSYNC_LOG").unwrap_or_else(|_| default_level.into());
    // Colour only on a terminal (not in files, pipes or journald).
    let ansi = !cli.no_color && std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    match cli.log_format {
        LogFormat::Text => {
            tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).init()
        }
        LogFormat::Json => tracing_subscriber::fmt().json().with_env_filter(filter).with_writer(std::io::stderr).init(),
    }
    let ctx = Context {
        bpffs_root: cli.bpffs_root,
        state_dir: cli.state_dir,
        color: cli::color_for_stdout(cli.no_color),
        max_spec_bytes: cli.max_spec_size,
    };
    let result = match &cli.command {
        Command::Validate(a) => cli::validate::run(&ctx, a),
        Command::Plan(a) => cli::plan::run(&ctx, a),
        Command::Apply(a) => cli::apply::run(&ctx, a),
        Command::Status(a) => cli::status::run(&ctx, a),
        Command::Down(a) => cli::down::run(&ctx, a),
        Command::Recover(a) => cli::recover::run(&ctx, a),
        Command::Proposals(a) => cli::proposals::run(&ctx, a),
        Command::Schema => cli::schema::run(),
        Command::Demo(a) => cli::demo::run(&ctx, a),
        Command::Agent(a) => cli::agent::run(&ctx, a),
        Command::Flows(a) => cli::flows::run(a),
        Command::Stats(a) => cli::stats::run(&ctx, a),
    };
    match result {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            report_error(&e, wants_json(&cli.command));
            ExitCode::from(1)
        }
    }
}

/// Whether the command was asked for JSON: then errors are JSON on stdout
/// too, so a tool reading it never gets text instead.
fn wants_json(command: &Command) -> bool {
    let json = cli::Output::Json;
    match command {
        Command::Validate(a) => a.output == json,
        Command::Plan(a) => a.output == json,
        Command::Apply(a) => a.output == json,
        Command::Status(a) => a.output == json,
        Command::Recover(a) => a.output == json,
        Command::Proposals(a) => a.wants_json(),
        Command::Stats(a) => a.output == json,
        Command::Flows(a) => matches!(a.output, cli::flows::FlowOutput::Json),
        _ => false,
    }
}

fn report_error(e: &anyhow::Error, json: bool) {
    let invalid = e.downcast_ref::<cli::InvalidSpec>();
    let message = match invalid {
        Some(_) => e.to_string(),
        None => bpfsync::apply::error_chain(e.as_ref()),
    };
    if json {
        let mut v = invalid.map_or_else(|| serde_json::json!({}), |i| i.0.to_json());
        v["error"] = serde_json::json!(message);
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    }
    if let Some(i) = invalid {
        eprintln!("{}", i.0);
    }
    eprintln!("error: {message}");
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// Every option of every subcommand says what it does in `--help`.
    #[test]
    fn every_option_has_a_help_line() {
        let mut missing = Vec::new();
        let root = Cli::command();
        let mut commands = vec![root.clone()];
        commands.extend(root.get_subcommands().cloned());
        for cmd in commands {
            for arg in cmd.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && !arg.is_hide_set() && arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{} --{}", cmd.get_name(), arg.get_id()));
                }
            }
        }
        assert!(missing.is_empty(), "options without help: {missing:?}");
    }

    /// The demo runs in its own sandbox: its help does not offer the node's
    /// bpffs root or state directory.
    #[test]
    fn the_demo_does_not_list_options_it_ignores() {
        let mut cmd = Cli::command();
        cmd.build();
        let help = cmd.find_subcommand_mut("demo").unwrap().render_help().to_string();
        assert!(!help.contains("--bpffs-root") && !help.contains("--state-dir"), "{help}");
        assert!(help.contains("--seconds"), "{help}");
    }
}

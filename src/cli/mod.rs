//! The command-line interface: one module per subcommand. `main.rs` parses
//! arguments and calls the `run` of a subcommand; errors become exit code
//! 1 there.

pub mod agent;
pub mod apply;
pub mod demo;
pub mod down;
pub mod flows;
pub mod plan;
pub mod proposals;
pub mod recover;
pub mod schema;
pub mod stats;
pub mod status;
pub mod validate;

use std::io::IsTerminal;
use std::path::Path;

use anyhow::bail;

use crate::apply::lock::NodeLock;
use crate::compile::{self, Desired, ObjectLoader};
use crate::kernel::real::RealKernel;
use crate::spec::LoadedSpec;

pub const DEFAULT_STATE_DIR: &str = "/var/lib/bpfsync";

pub use crate::applied::Context;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// Exit status: 0 ok / no changes, 1 error, 2 changes (`--detailed-exitcode`).
pub type Exit = i32;

/// A spec that failed validation, with every diagnostic; `main` prints
/// them (as text on stderr, or as JSON under `-o json`).
#[derive(Debug, thiserror::Error)]
#[error("the spec is invalid; nothing was changed")]
pub struct InvalidSpec(pub crate::spec::Diagnostics);

/// Loads, validates and compiles a spec file, printing every diagnostic.
/// The overlay of the state directory (accepted proposals) is merged on:
/// what is planned is what the agent would run.
pub fn load_spec(ctx: &Context, path: &Path) -> anyhow::Result<(LoadedSpec, Desired)> {
    let source = crate::spec::read_limited(path, ctx.max_spec_bytes)?;
    let overlay = crate::heal::store::Store::new(&ctx.state_dir).overlay()?;
    compile::load_and_compile(path, &source, &overlay, &mut ObjectLoader::default()).map_err(|d| InvalidSpec(d).into())
}

/// What the overlay changes in a loaded spec, for people.
pub fn overlay_text(loaded: &LoadedSpec) -> String {
    let o = &loaded.overlay;
    if o.is_empty() {
        return String::new();
    }
    let mut out = String::from("Overlay: accepted proposals merged onto the spec file (see `bpfsync proposals`):\n");
    for e in &o.applied {
        out.push_str(&format!("  + {}: {}\n", e.id, e.reason));
    }
    for e in &o.superseded {
        out.push_str(&format!("  ! {} superseded: {}\n", e.id, e.reason));
    }
    out.push('\n');
    out
}

/// The same, for `-o json`.
pub fn overlay_json(loaded: &LoadedSpec) -> serde_json::Value {
    serde_json::json!({ "applied": loaded.overlay.applied, "superseded": loaded.overlay.superseded })
}

pub fn require_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "bpfsync needs root (CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN) to read and change the kernel's eBPF state"
        );
    }
    Ok(())
}

pub fn open_kernel(ctx: &Context) -> anyhow::Result<RealKernel> {
    require_root()?;
    RealKernel::open(&ctx.bpffs_root).map_err(|e| anyhow::anyhow!(crate::apply::error_chain(&e)))
}

/// For commands that only read (`plan`, `status`, `stats`): creates and
/// mounts nothing.
pub fn open_kernel_read_only(ctx: &Context) -> anyhow::Result<RealKernel> {
    require_root()?;
    RealKernel::open_read_only(&ctx.bpffs_root).map_err(|e| anyhow::anyhow!(crate::apply::error_chain(&e)))
}

/// Opens the kernel for changing it, holding the node lock (see
/// [`NodeLock`]) for as long as the returned lock lives.
pub fn open_kernel_locked(ctx: &Context, what: &str) -> anyhow::Result<(RealKernel, NodeLock)> {
    let kernel = open_kernel(ctx)?;
    let lock = NodeLock::acquire(kernel.root(), &ctx.state_dir, what)?;
    Ok((kernel, lock))
}

/// Asks for confirmation on a terminal; elsewhere requires `--auto-approve`.
pub fn confirm(auto_approve: bool, question: &str) -> anyhow::Result<bool> {
    if auto_approve {
        return Ok(true);
    }
    if !std::io::stdin().is_terminal() {
        bail!("refusing to change the kernel without confirmation: not a terminal, pass `--auto-approve`");
    }
    println!("\n{question}\n  Only 'yes' will be accepted to approve.\n");
    print!("  Enter a value: ");
    use std::io::Write;
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    Ok(answer.trim() == "yes")
}

/// Records `loaded` as the last applied spec (see [`crate::applied`]).
pub fn save_last_applied(ctx: &Context, loaded: &LoadedSpec, desired: &Desired) -> anyhow::Result<()> {
    Ok(crate::applied::save(ctx, loaded, desired)?)
}

pub fn load_last_applied(ctx: &Context) -> anyhow::Result<Option<(crate::applied::AppliedMeta, Desired)>> {
    Ok(crate::applied::load(ctx)?)
}

pub fn clear_last_applied(ctx: &Context) {
    crate::applied::clear(ctx)
}

/// A size in bytes: `1048576`, `512k`, `100M`, `1G` (binary multiples).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => (&s[..i], &s[i..]),
        None => (s, ""),
    };
    let mult: u64 = match mult {
        "" => 1,
        "k" | "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        _ => return Err(format!("`{s}` is not a size: use e.g. `1048576`, `512k`, `100M`, `1G`")),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("`{s}` is not a size (at most 2^64 bytes)"))
}

pub fn color_for_stdout(no_color: bool) -> bool {
    !no_color && std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

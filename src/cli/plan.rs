//! `bpfsync plan SPEC`: what apply would change, changing nothing.

use std::collections::BTreeMap;
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
    /// Evaluate recorded flows against the policy and routes the kernel runs
    /// now and those the spec would install; print the flows that would be
    /// newly dropped, newly allowed or sent to another next hop.
    #[arg(long)]
    pub impact: bool,
    /// Recorded flows as JSON lines (`bpfsync flows --all -o json`, the file
    /// exporter) instead of the running agent's history.
    #[arg(long, value_name = "FILE", requires = "impact")]
    pub flows: Option<PathBuf>,
    /// The agent whose flow history `--impact` reads (unless --flows).
    #[arg(long, env = "BPFSYNC_AGENT", default_value = "127.0.0.1:9464")]
    pub agent: std::net::SocketAddr,
    /// Only flows recorded at or after this time: RFC 3339, or a duration
    /// ago (`1h`).
    #[arg(long, requires = "impact")]
    pub since: Option<String>,
    /// Only flows recorded at or before this time.
    #[arg(long, requires = "impact")]
    pub until: Option<String>,
    /// Exit 3 when any recorded flow would be newly dropped (checked before
    /// --detailed-exitcode's 2).
    #[arg(long, requires = "impact")]
    pub fail_on_new_drops: bool,
}

/// `--fail-on-new-drops`: recorded flows would be newly dropped.
pub const EXIT_NEW_DROPS: Exit = 3;

/// Most flow records `--impact` reads.
pub const MAX_IMPACT_RECORDS: usize = 1_000_000;

/// Most distinct interfaces the flows of `--impact` may name.
pub const MAX_IMPACT_INTERFACES: usize = 1_024;

pub fn run(ctx: &Context, args: &Args) -> anyhow::Result<Exit> {
    let (loaded, desired) = load_spec(ctx, &args.spec)?;
    let observed_from_snapshot = args.observed.is_some();
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
    let impact = match args.impact {
        true => Some(impact(ctx, args, &desired.state, observed_from_snapshot.then_some(&observed))?),
        false => None,
    };
    match args.output {
        Output::Text => {
            print!("{}", super::overlay_text(&loaded));
            print!("{}", plan::text::render(&plan, TextOptions { color: ctx.color }));
            if let Some(impact) = &impact {
                print!("{}", plan::impact::render_text(impact));
            }
        }
        Output::Json => {
            let mut v = plan::json::to_value(&plan);
            if !loaded.overlay.is_empty() {
                v["overlay"] = super::overlay_json(&loaded);
            }
            if let Some(impact) = &impact {
                v["impact"] = plan::impact::to_value(impact);
            }
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
    }
    if !plan.errors.is_empty() {
        return Ok(1);
    }
    if args.fail_on_new_drops && impact.is_some_and(|i| i.count(plan::impact::Change::NewlyDropped) > 0) {
        return Ok(EXIT_NEW_DROPS);
    }
    // A declared object that is not in place (pending) is a difference too:
    // a CI gate must not pass over a program attached nowhere.
    Ok(if args.detailed_exitcode && !plan.is_converged() { 2 } else { 0 })
}

/// What `--impact` read: the flows to evaluate, the records it could not
/// turn into flows (by why), and the records the writer skipped.
#[derive(Default)]
struct Recorded {
    flows: Vec<plan::impact::RecordedFlow>,
    rejected: BTreeMap<String, u64>,
    skipped: u64,
}

/// The flows `--impact` evaluates: from `--flows` or the agent, in the
/// `--since`/`--until` window. Each record is turned into the much smaller
/// flow as it is read.
fn recorded_flows(args: &Args) -> anyhow::Result<Recorded> {
    use crate::flows::record::for_each_json_line;
    let now = crate::time::now_unix_ns();
    let window = |t: &Option<String>| t.as_deref().map(|t| super::flows::parse_time(t, now)).transpose();
    let (since, until) =
        (window(&args.since).map_err(anyhow::Error::msg)?, window(&args.until).map_err(anyhow::Error::msg)?);
    let in_window = |t: u64| since.is_none_or(|s| t >= s) && until.is_none_or(|u| t <= u);
    let mut out = Recorded::default();
    let mut each = |r: crate::flows::record::FlowRecord| {
        if !in_window(r.time) {
            return;
        }
        match r.to_recorded() {
            Ok(f) => out.flows.push(f),
            Err(why) => *out.rejected.entry(why).or_default() += 1,
        }
    };
    let skipped = match &args.flows {
        Some(path) => {
            let file = std::fs::File::open(path).with_context(|| format!("cannot read flows `{}`", path.display()))?;
            for_each_json_line(
                std::io::BufReader::new(file),
                &path.display().to_string(),
                MAX_IMPACT_RECORDS,
                &mut each,
            )
        }
        None => {
            let mut params = Vec::new();
            params.extend(since.map(|t| format!("since={t}")));
            params.extend(until.map(|t| format!("until={t}")));
            let target = format!("/flows?{}", params.join("&"));
            let reader = super::flows::query(args.agent, &target, false)?;
            for_each_json_line(reader, &format!("the agent at {}", args.agent), MAX_IMPACT_RECORDS, &mut each)
        }
    }
    .map_err(anyhow::Error::msg)?;
    out.skipped = skipped;
    Ok(out)
}

/// The impact of the plan on recorded flows. The node is observed again
/// for it, wider than for the plan: the mesh tables whatever the spec
/// declares, and the interfaces the flows name.
fn impact(
    ctx: &Context,
    args: &Args,
    desired: &crate::model::State,
    snapshot: Option<&crate::model::State>,
) -> anyhow::Result<plan::impact::Impact> {
    let recorded = recorded_flows(args)?;
    let flows = recorded.flows;
    let observed = match snapshot {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned({
            let mut scope = scope_for(desired);
            scope.maps.extend(crate::mesh::MANAGED_MAPS.map(crate::mesh::map_ref));
            let named: std::collections::BTreeSet<&str> = flows.iter().map(|f| f.interface.as_str()).collect();
            // Each is looked up in the kernel: a file naming a million
            // interfaces would make a million lookups.
            if named.len() > MAX_IMPACT_INTERFACES {
                anyhow::bail!(
                    "the flows name {} interfaces, more than {MAX_IMPACT_INTERFACES}: narrow them (`bpfsync flows --interface …`)",
                    named.len()
                );
            }
            scope.interfaces.extend(named.into_iter().map(str::to_string));
            let mut kernel = open_kernel_read_only(ctx)?;
            kernel.observe(&scope).map_err(|e| anyhow::anyhow!(crate::apply::error_chain(&e)))?
        }),
    };
    let (after, _) = plan::resolve_desired(desired, &observed);
    let mut impact = plan::impact::evaluate(&observed, &after, &observed, &flows);
    for (why, n) in recorded.rejected {
        impact.skip_records(why, n);
    }
    if recorded.skipped > 0 {
        *impact.not_evaluated.entry("records the exporter skipped (it fell behind)".into()).or_default() +=
            recorded.skipped;
    }
    Ok(impact)
}

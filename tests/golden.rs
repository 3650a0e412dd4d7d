//! Golden plans: each `golden/<case>/` holds `spec.yaml` and `observed.yaml`
//! (a snapshot of the kernel), and the expected `plan.txt` and `plan.json`.
//! The planner is pure, so these pin its behaviour exactly.
//!
//! A case may also hold `applied.yaml`: a spec applied before. The kernel
//! then holds exactly what that spec compiles to on the node that
//! `observed.yaml` describes (its interfaces, MACs and neighbours) — so
//! policy and route cases read as two specs instead of hex entries.
//!
//! A case may also hold `flows.jsonl`: recorded flows (as `bpfsync flows
//! -o json` prints them). Their policy impact (`plan --impact`) is then
//! pinned too, in `impact.txt` and `impact.json`.
//!
//! After an intended change, regenerate with
//!     UPDATE_GOLDEN=1 cargo test --test golden
//! and read the diff before committing.

use std::fs;
use std::path::{Path, PathBuf};

use bpfsync::compile::{ObjectLoader, compile};
use bpfsync::flows::record::read_json_lines;
use bpfsync::plan::{self, text::TextOptions};
use bpfsync::snapshot::Snapshot;
use bpfsync::spec;

fn render_case(dir: &Path) -> Vec<(&'static str, String)> {
    let spec_path = dir.join("spec.yaml");
    let source = fs::read_to_string(&spec_path).unwrap();
    let compiled = spec::load(&spec_path, &source).and_then(|l| compile(&l, &mut ObjectLoader::default()));
    let desired = match compiled {
        Ok(d) => d,
        Err(diags) => {
            let json = serde_json::to_string_pretty(&diags.to_json()).unwrap() + "\n";
            return vec![("plan.txt", format!("{diags}\n")), ("plan.json", json)];
        }
    };
    let observed_text = fs::read_to_string(dir.join("observed.yaml")).unwrap();
    let mut observed = Snapshot::parse(&observed_text)
        .and_then(|s| s.to_state(&desired.state))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let applied_path = dir.join("applied.yaml");
    if applied_path.exists() {
        let text = fs::read_to_string(&applied_path).unwrap();
        let before = spec::load(&applied_path, &text)
            .and_then(|l| compile(&l, &mut ObjectLoader::default()))
            .unwrap_or_else(|d| panic!("{}: {d}", applied_path.display()));
        let (resolved, _) = plan::resolve_desired(&before.state, &observed);
        let mut state = resolved.into_owned();
        state.mesh = None;
        state.interfaces = std::mem::take(&mut observed.interfaces);
        state.interface_macs = std::mem::take(&mut observed.interface_macs);
        state.neighbors = std::mem::take(&mut observed.neighbors);
        observed = state;
    }
    let p = plan::plan(&desired.state, &observed);
    let mut out =
        vec![("plan.txt", plan::text::render(&p, TextOptions { color: false })), ("plan.json", plan::json::render(&p))];
    let flows_path = dir.join("flows.jsonl");
    if flows_path.exists() {
        let file = std::io::BufReader::new(fs::File::open(&flows_path).unwrap());
        let read = read_json_lines(file, "flows.jsonl", 1_000_000).unwrap();
        let flows: Vec<_> = read.records.iter().map(|r| r.to_recorded().unwrap()).collect();
        let (after, _) = plan::resolve_desired(&desired.state, &observed);
        let impact = plan::impact::evaluate(&observed, &after, &observed, &flows);
        out.push(("impact.txt", plan::impact::render_text(&impact)));
        out.push(("impact.json", serde_json::to_string_pretty(&plan::impact::to_value(&impact)).unwrap() + "\n"));
    }
    out
}

#[test]
fn golden_cases_match_their_expected_plans() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut dirs: Vec<PathBuf> =
        fs::read_dir("golden").unwrap().map(|e| e.unwrap().path()).filter(|p| p.join("spec.yaml").exists()).collect();
    dirs.sort();
    assert!(dirs.len() >= 20, "expected at least 20 golden cases, found {}", dirs.len());
    let mut failures = Vec::new();
    for dir in &dirs {
        for (name, actual) in render_case(dir) {
            let actual = &actual;
            let path = dir.join(name);
            if update {
                fs::write(&path, actual).unwrap();
                continue;
            }
            let expected = fs::read_to_string(&path).unwrap_or_default();
            if &expected != actual {
                let diff = similar::TextDiff::from_lines(&expected, actual)
                    .unified_diff()
                    .header("expected", "actual")
                    .to_string();
                failures.push(format!("{}:\n{diff}", path.display()));
            }
        }
    }
    assert!(failures.is_empty(), "golden files differ (UPDATE_GOLDEN=1 to regenerate):\n{}", failures.join("\n"));
}

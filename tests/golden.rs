//! Golden plans: each `golden/<case>/` holds `spec.yaml` and `observed.yaml`
//! (a snapshot of the kernel), and the expected `plan.txt` and `plan.json`.
//! The planner is pure, so these pin its behaviour exactly.
//!
//! A case may also hold `applied.yaml`: a spec applied before. The kernel
//! then holds exactly what that spec compiles to on the node that
//! `observed.yaml` describes (its interfaces, MACs and neighbours) — so
//! policy and route cases read as two specs instead of hex entries.
//!
//! After an intended change, regenerate with
//!     UPDATE_GOLDEN=1 cargo test --test golden
//! and read the diff before committing.

use std::fs;
use std::path::{Path, PathBuf};

use bpfsync::compile::{ObjectLoader, compile};
use bpfsync::plan::{self, text::TextOptions};
use bpfsync::snapshot::Snapshot;
use bpfsync::spec;

fn render_case(dir: &Path) -> (String, String) {
    let spec_path = dir.join("spec.yaml");
    let source = fs::read_to_string(&spec_path).unwrap();
    let compiled = spec::load(&spec_path, &source).and_then(|l| compile(&l, &mut ObjectLoader::default()));
    let desired = match compiled {
        Ok(d) => d,
        Err(diags) => {
            let json = serde_json::to_string_pretty(&diags.to_json()).unwrap() + "\n";
            return (format!("{diags}\n"), json);
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
    (plan::text::render(&p, TextOptions { color: false }), plan::json::render(&p))
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
        let (text, json) = render_case(dir);
        for (name, actual) in [("plan.txt", &text), ("plan.json", &json)] {
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

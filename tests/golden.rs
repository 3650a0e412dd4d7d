//! Golden plans: each `golden/<case>/` holds `spec.yaml` and `observed.yaml`
//! (a snapshot of the kernel), and the expected `plan.txt` and `plan.json`.
//! The planner is pure, so these pin its behaviour exactly.
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
    let observed = Snapshot::parse(&observed_text)
        .and_then(|s| s.to_state(&desired.state))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
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

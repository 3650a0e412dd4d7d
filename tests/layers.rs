//! Dependencies point one way (shared/DESIGN.md, "Where things live"): a
//! module may use the modules below it in [`LAYERS`], never those above,
//! and `cli` is imported by no one. Read from the sources, so a new import
//! that breaks the order fails here, not in review.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

/// Lowest first.
const LAYERS: &[&str] = &[
    "net",
    "time",
    "fault",
    "packet",
    "sandbox",
    "codec",
    "entries",
    "spec",
    "object",
    "builtin",
    "datapath",
    "model",
    "mesh",
    "telemetry",
    "compile",
    "snapshot",
    "plan",
    "kernel",
    "apply",
    "engine",
    "heal",
    "applied",
    "status",
    "flows",
    "agent",
    "cli",
];

fn sources(path: &Path, out: &mut Vec<String>) {
    if !path.exists() {
        return;
    }
    if path.is_dir() {
        for e in fs::read_dir(path).unwrap() {
            sources(&e.unwrap().path(), out);
        }
    } else if path.extension().is_some_and(|e| e == "rs") {
        out.push(fs::read_to_string(path).unwrap());
    }
}

/// The top-level modules `module` names with `crate::`.
fn uses(module: &str) -> BTreeSet<String> {
    let mut texts = Vec::new();
    sources(&Path::new("src").join(format!("{module}.rs")), &mut texts);
    sources(&Path::new("src").join(module), &mut texts);
    let mut out = BTreeSet::new();
    for text in texts {
        for (i, _) in text.match_indices("crate::") {
            let name: String = text[i + 7..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_' || c.is_ascii_digit())
                .collect();
            if !name.is_empty() && name != module {
                out.insert(name);
            }
        }
    }
    out
}

#[test]
fn every_module_uses_only_the_layers_below_it() {
    let mut listed: Vec<String> = fs::read_dir("src")
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter_map(|p| {
            let name = p.file_stem()?.to_str()?.to_string();
            (p.is_dir() || p.extension().is_some_and(|e| e == "rs")).then_some(name)
        })
        .filter(|n| n != "lib" && n != "main")
        .collect();
    listed.sort();
    listed.dedup();
    for m in &listed {
        assert!(LAYERS.contains(&m.as_str()), "module `{m}` has no place in LAYERS: add it where it belongs");
    }
    let mut wrong = Vec::new();
    for (rank, module) in LAYERS.iter().enumerate() {
        for used in uses(module) {
            match LAYERS.iter().position(|l| *l == used) {
                Some(r) if r < rank => {}
                Some(_) => wrong.push(format!("`{module}` uses `{used}`, which is above it")),
                None => wrong.push(format!("`{module}` uses `{used}`, which is not a module")),
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

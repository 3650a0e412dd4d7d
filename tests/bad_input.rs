//! Broken specs: each `tests/bad-specs/<case>.yaml` has its exact expected
//! diagnostics in `<case>.expected` (regenerate with `UPDATE_GOLDEN=1`), and
//! none of them may change the kernel.

mod common;

use std::fs;
use std::path::PathBuf;

use bpfsync::compile::{ObjectLoader, load_and_compile};
use common::Env;

fn cases() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir("tests/bad-specs")
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    v.sort();
    v
}

fn diagnostics(path: &PathBuf) -> String {
    let source = fs::read_to_string(path).unwrap();
    match load_and_compile(path, &source, &[], &mut ObjectLoader::default()) {
        Ok(_) => panic!("{} should be rejected", path.display()),
        Err(d) => format!("{d}\n"),
    }
}

#[test]
fn every_broken_spec_is_rejected_with_its_expected_message() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut failures = Vec::new();
    assert!(cases().len() >= 8);
    for case in cases() {
        let actual = diagnostics(&case);
        let expected_path = case.with_extension("expected");
        if update {
            fs::write(&expected_path, &actual).unwrap();
            continue;
        }
        let expected = fs::read_to_string(&expected_path).unwrap_or_default();
        if expected != actual {
            failures.push(format!("{}:\n--- expected\n{expected}\n--- actual\n{actual}", case.display()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn broken_specs_change_nothing_in_the_kernel() {
    let env = Env::new();
    let before = env.pins();
    for case in cases() {
        let path = case.display().to_string();
        for args in [vec!["apply", &path, "--auto-approve"], vec!["plan", &path], vec!["validate", &path]] {
            let out = env.run(&args);
            assert_eq!(out.status.code(), Some(1), "{args:?} should exit 1");
            let err = common::stderr(&out);
            assert!(err.contains(&path), "{args:?}: diagnostics should name the file:\n{err}");
            assert!(err.contains("nothing was changed"), "{err}");
        }
        assert_eq!(env.pins(), before, "{path} changed the bpffs");
    }
    assert!(!env.state.path().join("last-applied").exists());
}

/// Inputs outside the spec that once panicked fail with a message instead:
/// a snapshot digest that is not ASCII, a size flag that overflows.
#[test]
fn snapshots_and_flags_that_once_panicked_are_refused_or_planned() {
    let dir = common::TempDir::create("bpfsync-odd-inputs").unwrap();
    let snapshot = std::fs::read_to_string("golden/no-op/observed.yaml").unwrap().replacen(
        "digest: \"@desired\"",
        "digest: \"ééééééééééééééééé\"",
        1,
    );
    let snap = dir.path().join("observed.yaml");
    fs::write(&snap, snapshot).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bpfsync"))
        .args(["plan", "golden/no-op/spec.yaml", "--observed", snap.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", common::stderr(&out));
    assert!(common::stdout(&out).contains("ééééééééééé"), "{}", common::stdout(&out));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bpfsync"))
        .args(["agent", "--spec", "golden/no-op/spec.yaml", "--flow-export-file-max-size", "99999999999999G"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "a usage error: {}", common::stderr(&out));
    assert!(common::stderr(&out).contains("is not a size"), "{}", common::stderr(&out));
}

/// What arrives where a spec should be: a FIFO (reading it would block
/// forever), a device (`/dev/zero` never ends), a file over the size limit,
/// a file with a byte-order mark (accepted).
#[test]
fn only_regular_files_of_bounded_size_are_read_as_specs() {
    let dir = common::TempDir::create("bpfsync-spec-files").unwrap();
    let run = |args: &[&str]| std::process::Command::new(env!("CARGO_BIN_EXE_bpfsync")).args(args).output().unwrap();
    let fifo = dir.path().join("fifo.yaml");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let out = run(&["validate", fifo.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(common::stderr(&out).contains("is not a regular file (a FIFO)"), "{}", common::stderr(&out));
    let out = run(&["validate", "/dev/zero"]);
    assert!(common::stderr(&out).contains("(a device)"), "{}", common::stderr(&out));
    let out = run(&["--max-spec-size", "1k", "validate", "examples/mesh-node.yaml"]);
    assert!(common::stderr(&out).contains("is larger than 1024 bytes"), "{}", common::stderr(&out));
    let bom = dir.path().join("bom.yaml");
    fs::write(&bom, format!("\u{feff}{}", fs::read_to_string("examples/counter.yaml").unwrap())).unwrap();
    let out = run(&["validate", bom.to_str().unwrap()]);
    assert!(out.status.success(), "a BOM is accepted: {}", common::stderr(&out));
}

/// Every example spec is valid as a whole (schema, meaning, objects), not
/// only against the schema: a newcomer copies them.
#[test]
fn every_example_spec_validates() {
    for e in fs::read_dir("examples").unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_none_or(|x| x != "yaml") {
            continue;
        }
        let source = fs::read_to_string(&path).unwrap();
        if let Err(d) = load_and_compile(&path, &source, &[], &mut ObjectLoader::default()) {
            panic!("{}:\n{d}", path.display());
        }
    }
}

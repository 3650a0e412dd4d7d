//! The committed eBPF objects belong to their sources.
//!
//! Everywhere: `bpf/objects.lock` lists the sha256 of every source the
//! objects were built from; a source edited without `bpf/build.sh` fails.
//! Where clang is installed in the version that built them: rebuilding into
//! a temporary directory must give the committed bytes.

use std::fs;
use std::process::Command;

use sha2::{Digest, Sha256};

fn lock() -> (String, Vec<(String, String)>) {
    let text = fs::read_to_string("bpf/objects.lock").expect("bpf/objects.lock exists");
    let mut lines = text.lines();
    let compiler = lines.next().unwrap().to_string();
    let sums = lines
        .map(|l| {
            let (sum, path) = l.split_once("  ").unwrap();
            (path.to_string(), sum.to_string())
        })
        .collect();
    (compiler, sums)
}

#[test]
fn sources_match_the_digests_the_objects_were_built_from() {
    let (_, sums) = lock();
    let mut sources: Vec<String> = ["bpf", "tests/fixtures"]
        .iter()
        .flat_map(|d| fs::read_dir(d).unwrap().map(|e| e.unwrap().path().display().to_string()))
        .filter(|p| p.ends_with(".bpf.c") || p.ends_with(".h"))
        .collect();
    sources.sort();
    let locked: Vec<String> =
        sums.iter().map(|(p, _)| p.clone()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    assert_eq!(sources, locked, "sources and bpf/objects.lock disagree: run bpf/build.sh");
    for (path, sum) in sums {
        let actual: String = Sha256::digest(fs::read(&path).unwrap()).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(actual, sum, "{path} changed since its object was built: run bpf/build.sh");
    }
}

#[test]
fn rebuilding_gives_the_committed_objects_where_clang_exists() {
    let (compiler, _) = lock();
    let Ok(out) = Command::new("clang").arg("--version").output() else {
        eprintln!("clang is not installed: byte comparison not possible here (digests are still checked)");
        return;
    };
    let version = String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or_default().to_string();
    if version != compiler {
        eprintln!("clang here is `{version}`, objects were built by `{compiler}`: byte comparison not possible");
        return;
    }
    let tmp = bpfsync::sandbox::TempDir::create("bpfsync-rebuild").unwrap();
    let dir = tmp.path();
    let status = Command::new("sh").arg("bpf/build.sh").arg(dir).status().unwrap();
    assert!(status.success(), "bpf/build.sh failed");
    let mut compared = 0;
    for d in ["bpf", "tests/fixtures"] {
        for e in fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "o") {
                let fresh = fs::read(dir.join(p.file_name().unwrap())).unwrap();
                assert!(
                    fresh == fs::read(&p).unwrap(),
                    "{} is stale: run bpf/build.sh and commit the result",
                    p.display()
                );
                compared += 1;
            }
        }
    }
    assert!(compared >= 5, "expected to compare every object, compared {compared}");
}

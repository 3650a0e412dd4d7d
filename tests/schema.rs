//! The JSON Schema is the contract: every example and golden spec validates
//! against it, and the serde types accept exactly what it accepts.

use std::fs;
use std::path::PathBuf;

use bpfsync::spec::{self, NodeSpec, SCHEMA};

fn spec_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir("examples")
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    for e in fs::read_dir("golden").unwrap() {
        let p = e.unwrap().path().join("spec.yaml");
        if p.exists() {
            files.push(p);
        }
    }
    files.sort();
    files
}

#[test]
fn every_example_and_golden_spec_validates_against_the_schema() {
    let schema: serde_json::Value = serde_json::from_str(SCHEMA).unwrap();
    let validator = jsonschema::draft202012::new(&schema).expect("the schema compiles as draft 2020-12");
    let files = spec_files();
    assert!(files.len() > 20);
    for f in files {
        let text = fs::read_to_string(&f).unwrap();
        let doc = spec::yaml::parse(&text).unwrap();
        let errors: Vec<String> =
            validator.iter_errors(&doc.value).map(|e| format!("{} at {}", e, e.instance_path)).collect();
        assert!(errors.is_empty(), "{}: {errors:?}", f.display());
        // …and the serde types take it too.
        let _: NodeSpec = serde_json::from_value(doc.value).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
    }
}

#[test]
fn examples_carry_the_editor_schema_line() {
    for f in spec_files().into_iter().filter(|f| f.starts_with("examples")) {
        let text = fs::read_to_string(&f).unwrap();
        assert!(
            text.lines().next().unwrap().starts_with("# yaml-language-server: $schema="),
            "{} lacks the `# yaml-language-server: $schema=` line",
            f.display()
        );
    }
}

/// Every key the schema knows must be a key serde knows, and the other way
/// round: an unknown key fails both.
#[test]
fn schema_and_serde_reject_the_same_unknown_keys() {
    let schema: serde_json::Value = serde_json::from_str(SCHEMA).unwrap();
    let validator = jsonschema::draft202012::new(&schema).unwrap();
    let base = "apiVersion: bpfsync/v1\nkind: NodeSpec\n";
    let samples = [
        "programs: [{ name: a, builtin: counter, type: xdp, bogus: 1 }]",
        "interfaces: [{ name: eth0, xdp: { program: a, bogus: 1 } }]",
        "routes: [{ prefix: 10.0.0.0/8, via: { interface: a, neighbor: 10.0.0.1, bogus: 1 } }]",
        "policies: [{ name: p, interfaces: [a], ingress: [{ from: [10.0.0.0/8], bogus: 1 }] }]",
        "fallback: [{ name: f, route: 10.0.0.0/8, when: { metric: link-down, bogus: 1 } }]",
        "bogus: 1",
    ];
    for s in samples {
        let doc = spec::yaml::parse(&format!("{base}{s}\n")).unwrap();
        assert!(!validator.is_valid(&doc.value), "schema accepted {s}");
        assert!(serde_json::from_value::<NodeSpec>(doc.value).is_err(), "serde accepted {s}");
    }
    let good = "programs: [{ name: a, builtin: counter, type: xdp, share-maps: b, maps: [{ name: m, entries: [{ key: 1, value: 2 }] }] }]\n\
        interfaces: [{ name: eth0, xdp: { program: a, mode: skb, takeover: true }, tc: { ingress: [a], egress: [a], takeover: false } }]\n\
        tracepoints: [{ event: a/b, program: a }]\n\
        routes: [{ prefix: 10.0.0.0/8, via: { interface: a, neighbor: 10.0.0.1, mac: \"02:00:00:00:00:01\" }, fallback: [{ interface: b, neighbor: 10.0.0.2 }] }]\n\
        policies: [{ name: p, interfaces: [a], ingress: [{ from: [10.0.0.0/8], except: [10.0.0.0/9], ports: [{ port: 1, end-port: 2, protocol: udp }] }], egress: [{ to: [10.0.0.0/8], protocol: icmp }], deny: [{ from: [10.0.0.0/8] }] }]\n\
        fallback: [{ name: f, route: 10.0.0.0/8, when: { metric: drop-rate, above: 0.1, for: 30s }, recover: { below: 0.01, for: 60 }, auto-apply: true }]";
    let doc = spec::yaml::parse(&format!("{base}{good}\n")).unwrap();
    let errs: Vec<String> = validator.iter_errors(&doc.value).map(|e| e.to_string()).collect();
    assert!(errs.is_empty(), "{errs:?}");
    serde_json::from_value::<NodeSpec>(doc.value).expect("serde takes every key the schema knows");
}

#[test]
fn schema_command_prints_the_schema() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bpfsync")).arg("schema").output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), SCHEMA);
}

/// The in-process validator runs the schema as draft 2019-09 (see
/// `spec::schema_validator`); that is only sound while the schema uses
/// keywords that mean the same in 2019-09 and 2020-12.
#[test]
fn the_schema_only_uses_keywords_shared_by_2019_09_and_2020_12() {
    const SHARED: &[&str] = &[
        "$schema",
        "$id",
        "$ref",
        "$defs",
        "title",
        "description",
        "default",
        "type",
        "const",
        "enum",
        "properties",
        "additionalProperties",
        "required",
        "items",
        "minItems",
        "maxItems",
        "pattern",
        "minLength",
        "maxLength",
        "minimum",
        "maximum",
    ];
    fn walk(v: &serde_json::Value, in_properties: bool, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, child) in m {
                    // Under `properties`/`$defs` the keys are names, not keywords.
                    if !in_properties && !SHARED.contains(&k.as_str()) {
                        out.push(k.clone());
                    }
                    walk(child, !in_properties && (k == "properties" || k == "$defs"), out);
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, false, out)),
            _ => {}
        }
    }
    let schema: serde_json::Value = serde_json::from_str(SCHEMA).unwrap();
    let mut unknown = Vec::new();
    walk(&schema, false, &mut unknown);
    assert!(unknown.is_empty(), "keywords outside the shared set: {unknown:?}");
}

#[test]
fn the_2019_09_and_2020_12_engines_agree_on_every_spec_in_the_repository() {
    let schema: serde_json::Value = serde_json::from_str(SCHEMA).unwrap();
    let strict = jsonschema::draft202012::new(&schema).unwrap();
    let fast = spec::schema_validator();
    let mut files = spec_files();
    files.extend(
        fs::read_dir("tests/bad-specs")
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml")),
    );
    let mut compared = 0;
    for f in files {
        let Ok(doc) = spec::yaml::parse(&fs::read_to_string(&f).unwrap()) else { continue };
        let a: Vec<String> = strict.iter_errors(&doc.value).map(|e| format!("{} {}", e.instance_path, e)).collect();
        let b: Vec<String> = fast.iter_errors(&doc.value).map(|e| format!("{} {}", e.instance_path, e)).collect();
        assert_eq!(a, b, "{}", f.display());
        compared += 1;
    }
    assert!(compared > 30);
}

//! Crash safety on the real kernel: `kill -9` after every journal step and
//! after every kernel write of an apply from empty, of a change, and of
//! `down` — each run after it converges, with no journal, no set-aside
//! object and no stray version left. Also: exact read-back of LPM deletes,
//! the way out of a journal that cannot be rolled back, and `status`
//! noticing an edited spec.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output};

use common::{Env, Sandbox, TempDir, repo, stderr, stdout, write_spec};

const HEAD: &str = "apiVersion: bpfsync/v1\nkind: NodeSpec\n";

/// XDP with an array map entry, TCX with hash and LPM entries, a
/// tracepoint: every kind of object and undo.
fn spec_a(iface: &str) -> String {
    format!(
        r#"{HEAD}programs:
  - name: counter
    builtin: counter
    type: xdp
    maps:
      - name: counter_config
        entries: [{{ key: 0, value: 1 }}]
  - name: classify
    builtin: classifier
    type: tc
    maps:
      - name: class_ports
        entries:
          - {{ key: {{ protocol: 17, port: 4242 }}, value: {{ mark: 7, priority: 1 }} }}
      - name: class_prefixes
        entries:
          - {{ key: 10.0.0.0/8, value: {{ mark: 3 }} }}
          - {{ key: 10.1.0.0/16, value: {{ mark: 4 }} }}
  - name: syscall_enter
    builtin: syscall_enter
    type: tracepoint
interfaces:
  - name: {iface}
    xdp: {{ program: counter, mode: skb }}
    tc: {{ ingress: [classify] }}
tracepoints:
  - {{ event: raw_syscalls/sys_enter, program: syscall_enter }}
"#
    )
}

/// A changes everything a plan can: replaced bytecode (the old version
/// goes to the trash), entries added, changed and removed (LPM included),
/// a hook added, a program and its tracepoint removed.
fn spec_b(iface: &str) -> String {
    format!(
        r#"{HEAD}programs:
  - name: counter
    object: {}/tests/fixtures/counter_v2.bpf.o
    function: xdp_counter
    type: xdp
    maps:
      - name: counter_config
        entries: [{{ key: 0, value: 1 }}, {{ key: 1, value: 1 }}]
  - name: classify
    builtin: classifier
    type: tc
    maps:
      - name: class_ports
        entries:
          - {{ key: {{ protocol: 17, port: 4242 }}, value: {{ mark: 9, priority: 1 }} }}
          - {{ key: {{ protocol: 6, port: 80 }}, value: {{ mark: 1, priority: 1 }} }}
      - name: class_prefixes
        entries:
          - {{ key: 10.0.0.0/8, value: {{ mark: 3 }} }}
interfaces:
  - name: {iface}
    xdp: {{ program: counter, mode: skb }}
    tc: {{ ingress: [classify], egress: [classify] }}
"#,
        repo().display()
    )
}

const POINTS: [&str; 6] =
    ["journal-written", "step-started", "kernel-write", "step-done", "journal-finished", "trash-removed"];

fn run_killed_at(env: &Env, point: &str, n: u32, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bpfsync"))
        .args(["--bpffs-root", env.bpffs.root().to_str().unwrap(), "--state-dir", env.state.path().to_str().unwrap()])
        .arg("--no-color")
        .args(args)
        .env("BPFSYNC_KILL_AT", format!("{point}:{n}"))
        .output()
        .unwrap()
}

fn entries(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// Nothing of an apply is left over: no journal, no set-aside objects, one
/// version per program.
fn assert_clean(env: &Env, what: &str) {
    assert!(!env.state.path().join("journal.json").exists(), "{what}: journal left");
    assert_eq!(entries(&env.bpffs.root().join("trash")), 0, "{what}: trash left");
    for p in std::fs::read_dir(env.bpffs.root().join("programs")).into_iter().flatten() {
        assert_eq!(entries(&p.unwrap().path()), 1, "{what}: more than one version of a program");
    }
}

/// Kills `args` at every point in turn, starting each time from what
/// `setup` makes; after each kill the same command, run again, must finish
/// and `converged` must hold. Returns how many kills were made.
fn sweep(env: &Env, setup: &dyn Fn(), args: &[&str], converged: &dyn Fn(&str)) -> u32 {
    let mut kills = 0;
    for point in POINTS {
        for n in 1..=100 {
            env.run_ok(&["down", "--auto-approve"]);
            setup();
            let out = run_killed_at(env, point, n, args);
            if out.status.signal() != Some(libc::SIGKILL) {
                assert!(out.status.success(), "{args:?} unkilled at {point}:{n}: {}", stderr(&out));
                break;
            }
            kills += 1;
            let what = format!("{args:?} killed at {point}:{n}");
            let again = env.run(args);
            assert!(again.status.success(), "{what}: the next run failed: {}\n{}", stderr(&again), stdout(&again));
            converged(&what);
            assert_clean(env, &what);
        }
    }
    kills
}

#[test]
fn a_kill_after_any_journal_step_or_kernel_write_converges_on_the_next_run() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    let a = write_spec(env.state.path(), "a.yaml", &spec_a(&sb.host_if));
    let b = write_spec(env.state.path(), "b.yaml", &spec_b(&sb.host_if));
    let converged_on = |spec: &str| {
        let spec = spec.to_string();
        let env = &env;
        move |what: &str| {
            let plan = env.run(&["plan", &spec, "--detailed-exitcode"]);
            assert_eq!(plan.status.code(), Some(0), "{what}: not converged:\n{}{}", stdout(&plan), stderr(&plan));
        }
    };
    let nothing = || {};
    let at_a = || {
        env.run_ok(&["apply", &a, "--auto-approve"]);
    };
    let from_empty = sweep(&env, &nothing, &["apply", &a, "--auto-approve"], &converged_on(&a));
    let change = sweep(&env, &at_a, &["apply", &b, "--auto-approve"], &converged_on(&b));
    let down = sweep(&env, &at_a, &["down", "--auto-approve"], &|what| {
        assert!(env.pins().is_empty(), "{what}: left {:?}", env.pins());
    });
    eprintln!("kills that converged: {from_empty} (apply from empty), {change} (a change), {down} (down)");
    // Every step of each run was reached (so the sweep can fail).
    assert!(from_empty >= 15 && change >= 15 && down >= 8, "kills: {from_empty}, {change}, {down}");
}

#[test]
fn a_fresh_array_entry_is_rolled_back_by_zeroing_it() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    let a = write_spec(env.state.path(), "a.yaml", &spec_a(&sb.host_if));
    // Killed right after `counter_config[0]` was written: its undo must
    // not be a delete, which arrays refuse.
    let writes_before_config = {
        let mut n = 1;
        loop {
            env.run_ok(&["down", "--auto-approve"]);
            let out = run_killed_at(&env, "kernel-write", n, &["apply", &a, "--auto-approve"]);
            assert_eq!(out.status.signal(), Some(libc::SIGKILL), "the apply ended before the array write");
            let journal = std::fs::read_to_string(env.state.path().join("journal.progress")).unwrap_or_default();
            let steps = std::fs::read_to_string(env.state.path().join("journal.json")).unwrap_or_default();
            let config_step = steps.find("write entries of map `counter/counter_config`");
            if let Some(pos) = config_step {
                let index = steps[..pos].matches("\"what\"").count();
                if journal.lines().any(|l| l == format!("done {index}")) {
                    break n;
                }
            }
            n += 1;
        }
    };
    assert!(writes_before_config > 1);
    // Without `--no-color`: logs go to a pipe, so no colour codes in them.
    let out = Command::new(env!("CARGO_BIN_EXE_bpfsync"))
        .args(["--bpffs-root", env.bpffs.root().to_str().unwrap(), "--state-dir", env.state.path().to_str().unwrap()])
        .arg("recover")
        .env_remove("NO_COLOR")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("Rolled back"), "{}", stdout(&out));
    assert!(stderr(&out).contains("rolling back an interrupted apply"), "{}", stderr(&out));
    assert!(!stderr(&out).contains('\x1b'), "colour codes in logs off a terminal: {:?}", stderr(&out));
    assert!(env.pins().iter().all(|p| !p.contains("programs/") && !p.contains("links/")), "{:?}", env.pins());
    env.run_ok(&["apply", &a, "--auto-approve"]);
}

#[test]
fn a_journal_that_cannot_be_rolled_back_is_shown_and_discarded_on_request() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    let a = write_spec(env.state.path(), "a.yaml", &spec_a(&sb.host_if));
    let b = write_spec(env.state.path(), "b.yaml", &spec_b(&sb.host_if));
    env.run_ok(&["apply", &a, "--auto-approve"]);
    let new_digest = v2_digest_prefix(&env, &b);
    // Killed after the new `counter` version was attached, before the old
    // one was set aside; then the old version's pin goes by hand, so the
    // undo (point the link back at it) cannot run.
    let mut n = 1;
    loop {
        let out = run_killed_at(&env, "step-done", n, &["apply", &b, "--auto-approve"]);
        assert_eq!(out.status.signal(), Some(libc::SIGKILL));
        let progress = std::fs::read_to_string(env.state.path().join("journal.json")).unwrap_or_default();
        if progress.contains("update the link on `xdp/") {
            let steps: Vec<serde_json::Value> =
                serde_json::from_str::<serde_json::Value>(&progress).unwrap()["steps"].as_array().unwrap().clone();
            let link = steps.iter().position(|s| s["what"].as_str().unwrap().starts_with("update the link on `xdp/"));
            if link.is_some_and(|i| i < n as usize) {
                break;
            }
        }
        assert!(env.run(&["recover"]).status.success());
        n += 1;
        assert!(n < 40, "the link update never ran");
    }
    let old = std::fs::read_dir(env.bpffs.root().join("programs/counter"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| !p.file_name().unwrap().to_str().unwrap().starts_with(&new_digest))
        .expect("the old version is still pinned");
    std::fs::remove_file(old).unwrap();

    let out = env.run(&["apply", &b, "--auto-approve"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("could not be rolled back") && err.contains("bpfsync recover --discard"), "{err}");
    assert!(err.contains("update the link on `xdp/"), "the message lists the journal's steps: {err}");

    let out = env.run(&["recover", "--discard", "-o", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["action"], "discarded");
    assert!(v["journal"]["steps"].as_array().is_some_and(|s| !s.is_empty()));
    let out = env.run(&["apply", &b, "--auto-approve"]);
    assert!(out.status.success(), "after --discard the next apply converges: {}", stderr(&out));
    let plan = env.run(&["plan", &b, "--detailed-exitcode"]);
    assert_eq!(plan.status.code(), Some(0), "{}", stdout(&plan));
    assert_clean(&env, "after --discard");
}

/// The first characters of the digest `b`'s counter has (from its plan).
fn v2_digest_prefix(env: &Env, b: &str) -> String {
    let out = env.run(&["plan", b, "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let changes = v["changes"].as_array().unwrap();
    let c = changes.iter().find(|c| c["address"] == "program.counter").expect("counter is replaced");
    c["after"]["digest"].as_str().unwrap().to_string()
}

#[test]
fn removing_an_lpm_prefix_verifies_as_removed_though_a_shorter_one_still_matches() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    let policy = |peers: &str| {
        format!(
            "{HEAD}policies:\n  - name: api\n    interfaces: [{}]\n    ingress:\n      - from: [{peers}]\n        ports: [{{ port: 8080, protocol: tcp }}]\n",
            sb.host_if
        )
    };
    let two = write_spec(env.state.path(), "two.yaml", &policy("10.0.0.0/24, 10.0.1.0/24"));
    let one = write_spec(env.state.path(), "one.yaml", &policy("10.0.0.0/24"));
    env.run_ok(&["apply", &two, "--auto-approve"]);
    // The removed /24 is still covered by the default-deny /0: a
    // longest-prefix lookup would read it back as present.
    let out = env.run(&["apply", &one, "--auto-approve"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), stdout(&out));
    assert!(stdout(&out).contains("Apply complete!"), "{}", stdout(&out));
    let plan = env.run(&["plan", &one, "--detailed-exitcode"]);
    assert_eq!(plan.status.code(), Some(0), "{}", stdout(&plan));
}

#[test]
fn status_says_when_the_applied_spec_file_changed_and_records_its_absolute_path() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    let dir = TempDir::create("bpfsync-rel").unwrap();
    std::fs::write(dir.path().join("spec.yaml"), spec_a(&sb.host_if)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bpfsync"))
        .current_dir(dir.path())
        .args(["--bpffs-root", env.bpffs.root().to_str().unwrap(), "--state-dir", env.state.path().to_str().unwrap()])
        .args(["apply", "spec.yaml", "--auto-approve"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let st: serde_json::Value = serde_json::from_str(&env.run_ok(&["status", "-o", "json"])).unwrap();
    let recorded = st["last_applied"]["spec"].as_str().unwrap().to_string();
    assert!(Path::new(&recorded).is_absolute(), "{recorded}");
    assert_eq!(st["last_applied"]["spec_now"], "unchanged");
    std::fs::write(dir.path().join("spec.yaml"), spec_a(&sb.host_if).replace("mark: 3", "mark: 5")).unwrap();
    let text = env.run_ok(&["status"]);
    assert!(text.contains("changed since it was applied"), "{text}");
    std::fs::remove_file(dir.path().join("spec.yaml")).unwrap();
    let st: serde_json::Value = serde_json::from_str(&env.run_ok(&["status", "-o", "json"])).unwrap();
    assert_eq!(st["last_applied"]["spec_now"], "unreadable");
}

#[test]
fn read_only_commands_create_nothing_on_bpffs() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    let a = write_spec(env.state.path(), "a.yaml", &spec_a(&sb.host_if));
    let before = env.pins();
    env.run_ok(&["plan", &a]);
    env.run_ok(&["status"]);
    assert_eq!(env.pins(), before, "plan and status created something");
}

//! Real-kernel tests of the CLI around apply: drift in `status`, mounts,
//! the exit codes CI relies on, and the demo.

mod common;

use std::process::Command;

use common::{Env, Sandbox, stderr, stdout, write_spec};
use serde_json::Value;

const HEAD: &str = "apiVersion: bpfsync/v1\nkind: NodeSpec\n";

fn spec(iface: &str) -> String {
    format!(
        "{HEAD}programs:\n  - name: classify\n    builtin: classifier\n    type: tc\n    maps:\n      - name: class_ports\n        entries:\n          - {{ key: {{ protocol: 6, port: 80 }}, value: {{ mark: 1 }} }}\n          - {{ key: {{ protocol: 6, port: 443 }}, value: {{ mark: 2 }} }}\ninterfaces:\n  - name: {iface}\n    tc: {{ egress: [classify] }}\n"
    )
}

#[test]
fn plan_exit_codes_follow_detailed_exitcode() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    let path = write_spec(env.state.path(), "spec.yaml", &spec(&sb.host_if));
    assert_eq!(env.run(&["plan", &path, "--detailed-exitcode"]).status.code(), Some(2));
    assert_eq!(env.run(&["plan", &path]).status.code(), Some(0));
    env.run_ok(&["apply", &path, "--auto-approve"]);
    assert_eq!(env.run(&["plan", &path, "--detailed-exitcode"]).status.code(), Some(0));
    let bad = write_spec(env.state.path(), "bad.yaml", "apiVersion: bpfsync/v1\nkind: NodeSpec\nprograms: 3\n");
    assert_eq!(env.run(&["plan", &bad, "--detailed-exitcode"]).status.code(), Some(1));
}

#[test]
fn apply_refuses_without_a_terminal_or_auto_approve() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    let path = write_spec(env.state.path(), "spec.yaml", &spec(&sb.host_if));
    let out = env.run(&["apply", &path]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--auto-approve"), "{}", stderr(&out));
    assert!(!env.bpffs.root().join("programs/classify").exists(), "nothing was applied");
}

#[test]
fn status_reports_drift_made_behind_its_back_and_apply_repairs_it() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    let path = write_spec(env.state.path(), "spec.yaml", &spec(&sb.host_if));
    env.run_ok(&["apply", &path, "--auto-approve"]);
    let pin = env.bpffs.root().join("maps/classify/class_ports");
    // Change one entry and delete another with bpftool.
    let bt = |args: &[&str]| {
        let out = Command::new("bpftool").args(args).output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    };
    let pin = pin.to_str().unwrap();
    bt(&["map", "update", "pinned", pin, "key", "6", "0", "80", "0", "value", "9", "0", "0", "0", "0", "0", "0", "0"]);
    bt(&["map", "delete", "pinned", pin, "key", "6", "0", "0xbb", "1"]);
    let st: Value = serde_json::from_str(&env.run_ok(&["status", "-o", "json"])).unwrap();
    assert_eq!(st["drift"]["in_sync"], false);
    assert_eq!(st["drift"]["summary"], serde_json::json!({"add": 1, "change": 1, "destroy": 0}), "{}", st["drift"]);
    let text = env.run_ok(&["status"]);
    assert!(text.contains("DRIFT against the spec applied from"), "{text}");
    assert!(text.contains("map_entry.classify/class_ports[{protocol: 6, port: 80}]"), "{text}");
    let out = env.run_ok(&["apply", &path, "--auto-approve"]);
    assert!(out.contains("Plan: 1 to add, 1 to change, 0 to destroy."), "{out}");
    let st: Value = serde_json::from_str(&env.run_ok(&["status", "-o", "json"])).unwrap();
    assert_eq!(st["drift"]["in_sync"], true);
}

#[test]
fn a_root_outside_bpffs_is_refused_with_a_clear_message() {
    let dir = common::TempDir::create("bpfsync-notbpffs").unwrap();
    let root = dir.path().join("root");
    let out = Command::new(env!("CARGO_BIN_EXE_bpfsync"))
        .args(["--bpffs-root", root.to_str().unwrap(), "--state-dir", dir.path().to_str().unwrap(), "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("is not on a bpf filesystem") && err.contains("mount -t bpf bpf"), "{err}");
    assert!(!root.exists(), "nothing was created");
}

#[test]
fn snapshot_from_status_plans_offline_like_the_kernel() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    let path = write_spec(env.state.path(), "spec.yaml", &spec(&sb.host_if));
    env.run_ok(&["apply", &path, "--auto-approve"]);
    let snap = env.run_ok(&["status", "--snapshot"]);
    let snap_path = write_spec(env.state.path(), "observed.yaml", &snap);
    let changed = write_spec(env.state.path(), "changed.yaml", &spec(&sb.host_if).replace("mark: 2", "mark: 5"));
    let live = env.run(&["plan", &changed, "-o", "json"]);
    // Offline: no root, no kernel, same answer.
    let offline = Command::new(env!("CARGO_BIN_EXE_bpfsync"))
        .args(["--bpffs-root", "/nonexistent", "plan", &changed, "-o", "json", "--observed", &snap_path])
        .output()
        .unwrap();
    assert!(offline.status.success(), "{}", stderr(&offline));
    assert_eq!(stdout(&live), stdout(&offline));
    assert!(stdout(&offline).contains("\"change\": 1"));
}

#[test]
fn the_demo_runs_end_to_end_and_leaves_nothing_behind() {
    let out =
        Command::new(env!("CARGO_BIN_EXE_bpfsync")).args(["--no-color", "demo", "--seconds", "1"]).output().unwrap();
    let text = stdout(&out);
    assert!(out.status.success(), "{}\n{text}", stderr(&out));
    for needle in [
        "Plan: 13 to add",
        "applied 13 steps",
        "DRIFT: none",
        "xdp counter on bsdemo0",
        "udp 100 pkts",
        // The datagrams go to a closed port: the stack drops each.
        "Stack drops by kernel drop reason",
        "NO_SOCKET",
        "No changes.",
        "everything bpfsync owned is gone",
    ] {
        assert!(text.contains(needle), "demo output lacks `{needle}`:\n{text}");
    }
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(!stdout(&netns).contains("bpfsync-demo"));
    assert!(!std::path::Path::new("/sys/class/net/bsdemo0").exists());

    // Ctrl-C in the middle of the traffic phase also cleans up. (Same test:
    // the demo's sandbox has fixed names.)
    let child = Command::new(env!("CARGO_BIN_EXE_bpfsync"))
        .args(["--no-color", "demo", "--seconds", "60"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let attached = || {
        bpfsync::kernel::sys::ifindex("bsdemo0")
            .and_then(|i| bpfsync::kernel::netlink::xdp_state(i).ok())
            .is_some_and(|x| x.drv_prog.is_some() || x.skb_prog.is_some())
    };
    while !attached() {
        assert!(std::time::Instant::now() < deadline, "the demo never attached its programs");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stdout(&out));
    assert!(stdout(&out).contains("interrupted: everything was cleaned up"), "{}", stdout(&out));
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(!stdout(&netns).contains("bpfsync-demo"));
    assert!(!std::path::Path::new("/sys/class/net/bsdemo0").exists());
}

#[test]
fn every_command_asked_for_json_answers_json_on_its_error_paths_too() {
    let env = Env::new();
    let bad = write_spec(env.state.path(), "bad.yaml", "apiVersion: bpfsync/v1\nkind: NodeSpec\nprograms: 3\n");
    let outside = env.state.path().join("not-bpffs");
    std::fs::create_dir_all(&outside).unwrap();
    let outside = outside.to_str().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let nobody = format!("127.0.0.1:{port}");
    let cases: Vec<Vec<&str>> = vec![
        vec!["validate", "/nonexistent/spec.yaml", "-o", "json"],
        vec!["validate", &bad, "-o", "json"],
        vec!["plan", &bad, "-o", "json"],
        vec!["plan", "/nonexistent/spec.yaml", "-o", "json"],
        vec!["apply", &bad, "--auto-approve", "-o", "json"],
        vec!["--bpffs-root", outside, "status", "-o", "json"],
        vec!["--bpffs-root", outside, "recover", "-o", "json"],
        vec!["flows", "--agent", &nobody, "-o", "json"],
        vec!["--bpffs-root", outside, "stats", "-o", "json"],
    ];
    for args in cases {
        let out = if args[0] == "--bpffs-root" {
            let state = ["--state-dir", env.state.path().to_str().unwrap()];
            Command::new(env!("CARGO_BIN_EXE_bpfsync")).args(state).args(&args).output().unwrap()
        } else {
            env.run(&args)
        };
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: stdout is not JSON ({e}): {}", stdout(&out)));
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{args:?}: {v}");
        if args.contains(&bad.as_str()) {
            assert_eq!(v["valid"], false, "{args:?}: {v}");
            assert!(v["errors"][0]["path"].is_string(), "{args:?}: the diagnostics are included: {v}");
        }
    }
}

#[test]
fn validate_reports_errors_as_json_for_tools() {
    let out = Command::new(env!("CARGO_BIN_EXE_bpfsync"))
        .args(["validate", "tests/bad-specs/dangling-reference.yaml", "-o", "json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["valid"], false);
    assert_eq!(v["errors"][0]["path"], "interfaces[0].xdp.program");
    assert_eq!(v["errors"][0]["line"], 9);
    let ok = Command::new(env!("CARGO_BIN_EXE_bpfsync"))
        .args(["validate", "examples/demo.yaml", "-o", "json"])
        .output()
        .unwrap();
    assert!(ok.status.success());
    let v: Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!((v["valid"].as_bool(), v["programs"].as_u64()), (Some(true), Some(5)));
}

#[test]
fn auto_mode_says_when_it_falls_back_to_generic_xdp() {
    let env = Env::new();
    // A bridge has no native XDP; veth does.
    struct Bridge(String);
    impl Drop for Bridge {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["link", "del", &self.0]).output();
        }
    }
    let br = Bridge(format!("bx{}", std::process::id() % 100_000));
    assert!(Command::new("ip").args(["link", "add", &br.0, "type", "bridge"]).status().unwrap().success());
    let sb = Sandbox::create().unwrap();
    let text = format!(
        "{HEAD}programs:\n  - {{ name: counter, builtin: counter, type: xdp }}\ninterfaces:\n  - {{ name: {}, xdp: {{ program: counter, mode: auto }} }}\n  - {{ name: {}, xdp: {{ program: counter, mode: auto }} }}\n",
        br.0, sb.host_if
    );
    let path = write_spec(env.state.path(), "spec.yaml", &text);
    let out = env.run(&["apply", &path, "--auto-approve"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains(&format!("`xdp/{}` runs in generic (skb) mode", br.0)), "{err}");
    assert!(!err.contains(&format!("`xdp/{}` runs in generic", sb.host_if)), "veth runs natively: {err}");
    let st: Value = serde_json::from_str(&env.run_ok(&["status", "-o", "json"])).unwrap();
    let modes: Vec<(String, String)> = st["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["hook"].as_str().unwrap().to_string(), a["running_mode"].as_str().unwrap_or("-").to_string()))
        .collect();
    assert!(modes.contains(&(format!("xdp/{}", br.0), "skb".into())), "{modes:?}");
    assert!(modes.contains(&(format!("xdp/{}", sb.host_if), "driver".into())), "{modes:?}");
    assert!(env.run_ok(&["status"]).contains("mode auto (running skb)"));
    env.run_ok(&["down", "--auto-approve"]);
}

/// Runs bpfsync in a pseudo-terminal (util-linux `script`), typing `answer`.
fn run_on_a_terminal(env: &Env, args: &str, answer: &str) -> (Option<i32>, String) {
    use std::io::Write;
    let cmd = format!(
        "{} --bpffs-root {} --state-dir {} --no-color {args}",
        env!("CARGO_BIN_EXE_bpfsync"),
        env.bpffs.root().display(),
        env.state.path().display()
    );
    let mut child = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Type once the prompt is up.
    std::thread::sleep(std::time::Duration::from_millis(500));
    child.stdin.take().unwrap().write_all(format!("{answer}\n").as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn apply_asks_on_a_terminal_and_only_yes_applies() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    let path = write_spec(env.state.path(), "spec.yaml", &spec(&sb.host_if));
    let (code, out) = run_on_a_terminal(&env, &format!("apply {path}"), "no");
    assert!(out.contains("Do you want to perform these actions?"), "{out}");
    assert!(out.contains("Apply cancelled."), "{out}");
    assert_eq!(code, Some(1));
    assert!(!env.bpffs.root().join("programs/classify").exists(), "nothing was applied");
    let (code, out) = run_on_a_terminal(&env, &format!("apply {path}"), "yes");
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("Apply complete!"), "{out}");
    assert!(env.bpffs.root().join("programs/classify").exists());
}

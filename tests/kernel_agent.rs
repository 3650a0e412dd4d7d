//! The agent on the real kernel: spec edits (in place, rename-over,
//! ConfigMap symlink swap), invalid and deleted specs, drift repair,
//! restarts without reloads or loss, and its HTTP endpoints.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use bpfsync::kernel::netlink::xdp_state;
use bpfsync::kernel::{Kernel, Scope, sys};
use bpfsync::model::MapRef;
use common::{Agent, Env, Sandbox, TempDir, wait};
use serde_json::Value;

const HEAD: &str = "apiVersion: bpfsync/v1\nkind: NodeSpec\n";

fn spec(iface: &str, mark: u32) -> String {
    format!(
        "{HEAD}programs:\n  - name: counter\n    builtin: counter\n    type: xdp\n    maps:\n      - name: counter_config\n        entries: [{{ key: 0, value: 1 }}]\n  - name: classify\n    builtin: classifier\n    type: tc\n    maps:\n      - name: class_ports\n        entries:\n          - {{ key: {{ protocol: 6, port: 80 }}, value: {{ mark: {mark} }} }}\n          - {{ key: {{ protocol: 6, port: 443 }}, value: {{ mark: 2 }} }}\ninterfaces:\n  - name: {iface}\n    xdp: {{ program: counter, mode: skb }}\n    tc: {{ ingress: [classify] }}\n"
    )
}

/// A spec file in a fresh directory (kept alive by the returned guard).
fn spec_file(iface: &str, mark: u32) -> (TempDir, PathBuf) {
    let dir = TempDir::create("bpfsync-agent-spec").unwrap();
    let path = dir.path().join("spec.yaml");
    std::fs::write(&path, spec(iface, mark)).unwrap();
    (dir, path)
}

/// The mark of `class_ports[{6, 80}]` in the kernel.
fn mark80(env: &Env) -> Option<u32> {
    let r = MapRef { program: "classify".into(), map: "class_ports".into() };
    let mut k = env.kernel();
    let s = k.observe(&Scope { maps: [r.clone()].into(), ..Default::default() }).ok()?;
    let v = s.maps.get(&r)?.entries.get(&[6, 0, 80, 0])?.to_vec();
    Some(u32::from_le_bytes(v[..4].try_into().unwrap()))
}

#[test]
fn edits_in_place_and_renamed_over_are_applied() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    let (dir, path) = spec_file(&sb.host_if, 1);
    let agent = Agent::start(&env, &path, "30s");
    assert_eq!(mark80(&env), Some(1));

    std::fs::write(&path, spec(&sb.host_if, 5)).unwrap(); // in place
    wait("the in-place edit", Duration::from_secs(10), || mark80(&env) == Some(5));

    let tmp = dir.path().join(".spec.yaml.swp");
    std::fs::write(&tmp, spec(&sb.host_if, 9)).unwrap();
    std::fs::rename(&tmp, &path).unwrap(); // an editor's atomic save
    wait("the rename-over", Duration::from_secs(10), || mark80(&env) == Some(9));
    let st = agent.status();
    assert_eq!(st["agent"]["last_result"], "applied");
    assert_eq!(st["drift"]["in_sync"], true);
    agent.stop();
}

#[test]
fn a_configmap_symlink_swap_is_applied() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    let cm = TempDir::create("bpfsync-configmap").unwrap();
    let write_version = |name: &str, mark: u32| {
        let d = cm.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("spec.yaml"), spec(&sb.host_if, mark)).unwrap();
    };
    // The layout kubelet gives a ConfigMap volume.
    write_version("..2026_11_21_10_00_00.1", 1);
    std::os::unix::fs::symlink("..2026_11_21_10_00_00.1", cm.path().join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/spec.yaml", cm.path().join("spec.yaml")).unwrap();
    let agent = Agent::start(&env, &cm.path().join("spec.yaml"), "30s");
    assert_eq!(mark80(&env), Some(1));

    // kubelet's update: a new directory, a new `..data_tmp` link renamed over `..data`.
    write_version("..2026_11_21_10_05_00.2", 7);
    std::os::unix::fs::symlink("..2026_11_21_10_05_00.2", cm.path().join("..data_tmp")).unwrap();
    std::fs::rename(cm.path().join("..data_tmp"), cm.path().join("..data")).unwrap();
    std::fs::remove_dir_all(cm.path().join("..2026_11_21_10_00_00.1")).unwrap();
    wait("the ConfigMap update", Duration::from_secs(10), || mark80(&env) == Some(7));
    agent.stop();
}

#[test]
fn an_invalid_or_deleted_spec_keeps_the_last_good_state_and_says_why() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    let (_dir, path) = spec_file(&sb.host_if, 1);
    let agent = Agent::start(&env, &path, "1s");

    std::fs::write(&path, spec(&sb.host_if, 1).replace("builtin: classifier", "builtin: classifer")).unwrap();
    wait("the validation error to be reported", Duration::from_secs(10), || {
        agent.metric("bpfsync_spec_validation_errors_total") == Some(1.0)
    });
    assert_eq!(agent.metric("bpfsync_spec_valid "), Some(0.0));
    let err = agent.status()["agent"]["spec_error"].as_str().unwrap_or_default().to_string();
    assert!(err.contains("keeping the last good state") && err.contains("programs[1].builtin"), "{err}");
    assert_eq!(mark80(&env), Some(1), "the running state is kept");
    assert_eq!(agent.get("/readyz").0, 200, "still serving the last good state");

    std::fs::remove_file(&path).unwrap();
    std::thread::sleep(Duration::from_millis(1500)); // past a resync
    assert_eq!(mark80(&env), Some(1), "a deleted spec never means remove everything");
    let err = agent.status()["agent"]["spec_error"].as_str().unwrap_or_default().to_string();
    assert!(err.contains("cannot read spec"), "{err}");

    std::fs::write(&path, spec(&sb.host_if, 3)).unwrap();
    wait("the fixed spec", Duration::from_secs(10), || mark80(&env) == Some(3));
    assert_eq!(agent.metric("bpfsync_spec_valid "), Some(1.0));
    assert_eq!(agent.status()["agent"]["spec_error"], Value::Null);
    agent.stop();
}

#[test]
fn every_kind_of_drift_is_repaired_within_one_resync() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    let (_dir, path) = spec_file(&sb.host_if, 1);
    let agent = Agent::start(&env, &path, "1s");
    let root = env.bpffs.root();
    let bt = |args: &[&str]| {
        let out = Command::new("bpftool").args(args).output().unwrap();
        assert!(out.status.success(), "bpftool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let repairs = |kind: &str| agent.metric(&format!("bpfsync_drift_repairs_total{{kind=\"{kind}\"}}")).unwrap_or(0.0);
    let ports = root.join("maps/classify/class_ports");
    let ports = ports.to_str().unwrap();

    // A map entry changed, another deleted, with bpftool.
    bt(&[
        "map", "update", "pinned", ports, "key", "6", "0", "80", "0", "value", "9", "0", "0", "0", "0", "0", "0", "0",
    ]);
    bt(&["map", "delete", "pinned", ports, "key", "6", "0", "0xbb", "1"]);
    wait("map entries repaired", Duration::from_secs(5), || {
        mark80(&env) == Some(1) && repairs("map-entry-create") >= 1.0
    });
    assert!(repairs("map-entry-update") >= 1.0);

    // An entry the spec does not have, added by hand.
    bt(&[
        "map", "update", "pinned", ports, "key", "17", "0", "53", "0", "value", "5", "0", "0", "0", "0", "0", "0", "0",
    ]);
    wait("the extra entry removed", Duration::from_secs(5), || repairs("map-entry-delete") >= 1.0);

    // A program's pin removed while its link still runs it: loaded again and
    // the link pointed at it.
    let prog_dir = root.join("programs/counter");
    for p in std::fs::read_dir(&prog_dir).unwrap() {
        std::fs::remove_file(p.unwrap().path()).unwrap();
    }
    wait("the program pinned again", Duration::from_secs(5), || {
        std::fs::read_dir(&prog_dir).is_ok_and(|d| d.count() == 1) && repairs("program-create") >= 1.0
    });
    // Repairs are counted when planned: let that apply finish (a later
    // resync finds nothing to do) before the next drift, or the two race.
    let no_change = || agent.metric("bpfsync_reconciles_total{result=\"no_change\"}").unwrap_or(0.0);
    let before = no_change();
    wait("the repair finished", Duration::from_secs(5), || no_change() > before);

    // The XDP link detached by hand (its program is no longer attached).
    let ifindex = sys::ifindex(&sb.host_if).unwrap();
    let xdp_pin = root.join(format!("links/xdp:{}:skb", sb.host_if));
    bt(&["link", "detach", "pinned", xdp_pin.to_str().unwrap()]);
    assert_eq!(xdp_state(ifindex).unwrap().skb_prog, None);
    wait("the XDP program re-attached", Duration::from_secs(5), || xdp_state(ifindex).unwrap().skb_prog.is_some());
    assert!(repairs("attachment-replace") >= 1.0);

    // A map unpinned while its program still holds it: pinned again with
    // its contents, and the agent goes on repairing afterwards.
    std::fs::remove_file(ports).unwrap();
    wait("the map pinned again", Duration::from_secs(5), || {
        std::path::Path::new(ports).exists() && repairs("map-create") >= 1.0
    });
    assert_eq!(mark80(&env), Some(1), "the map kept its contents");
    bt(&[
        "map", "update", "pinned", ports, "key", "6", "0", "80", "0", "value", "7", "0", "0", "0", "0", "0", "0", "0",
    ]);
    wait("a later drift repaired too", Duration::from_secs(5), || mark80(&env) == Some(1));
    // The value is in the kernel before the apply has verified and ended:
    // its journal goes right after.
    let journal = env.state.path().join("journal.json");
    wait("no journal left behind", Duration::from_secs(5), || !journal.exists());

    // A link unpinned (and so released).
    let tc_pin = root.join(format!("links/tcx:{}:ingress:0", sb.host_if));
    std::fs::remove_file(&tc_pin).unwrap();
    wait("the TCX link re-created", Duration::from_secs(5), || tc_pin.exists());
    assert!(repairs("attachment-create") >= 1.0);

    // A foreign program on an owned hook: reported, not touched.
    common::attach_foreign_tcx(&sb.host_if, &env.bpffs.mount.join("foreign"));
    wait("the conflict reported", Duration::from_secs(5), || agent.metric("bpfsync_conflicts ") == Some(1.0));
    assert!(env.bpffs.mount.join("foreign").exists());
    let st = agent.status();
    assert_eq!(st["drift"]["in_sync"], true, "{}", st["drift"]);
    assert_eq!(st["foreign"].as_array().unwrap().len(), 1);
    agent.stop();
}

#[test]
fn a_restarted_agent_adopts_the_datapath_without_reloading_or_losing_traffic() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    let (_dir, path) = spec_file(&sb.host_if, 1);
    let agent = Agent::start(&env, &path, "30s");
    let before = agent.status();
    let stats = MapRef { program: "counter".into(), map: "packet_stats".into() };
    let udp = |env: &Env| {
        let mut k = env.kernel();
        let s = k.observe(&Scope { maps: [stats.clone()].into(), ..Default::default() }).unwrap();
        bpfsync::datapath::proto_counters(&s.maps[&stats].entries).get("udp").map_or(0, |c| c.packets)
    };
    let start = udp(&env);
    let sender = std::thread::spawn({
        let (netns, host_ip, peer_ip) = (sb.netns.clone(), sb.host_ip, sb.peer_ip);
        move || {
            let probe = Sandbox { netns, host_if: String::new(), peer_if: String::new(), host_ip, peer_ip };
            let sent = probe.send_udp(9, 2000, Duration::from_micros(500));
            std::mem::forget(probe);
            sent
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    agent.stop();
    let ifindex = sys::ifindex(&sb.host_if).unwrap();
    assert!(xdp_state(ifindex).unwrap().skb_prog.is_some(), "stopping the agent leaves the datapath running");
    let agent = Agent::start(&env, &path, "30s");
    let sent = sender.join().unwrap().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(udp(&env) - start, sent, "no packet went uncounted across the restart");
    let after = agent.status();
    assert_eq!(before["programs"], after["programs"], "no program was reloaded");
    assert_eq!(before["attachments"], after["attachments"], "no link was re-created");
    assert_eq!(after["agent"]["last_result"], "no_change");
    assert_eq!(agent.metric("bpfsync_reconciles_total{result=\"applied\"}"), Some(0.0));
    agent.stop();
}

#[test]
fn endpoints_serve_openmetrics_health_readiness_and_status() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    let (dir, path) = spec_file(&sb.host_if, 1);
    let agent = Agent::start(&env, &path, "30s");
    sb.send_udp(9, 20, Duration::ZERO).unwrap();
    let openmetrics = "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text; version=1.0.0\r\n\r\n";
    let (code, text) = agent.request(openmetrics);
    assert_eq!(code, 200);
    assert!(text.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
    for name in [
        "bpfsync_reconciles_total{result=\"applied\"} 1",
        "bpfsync_reconcile_duration_seconds_count",
        "bpfsync_managed_objects{kind=\"map_entry\"} 3",
        "bpfsync_last_successful_apply_timestamp_seconds",
        "bpfsync_spec_validation_errors_total 0",
        "bpfsync_datapath_packets_total{program=\"counter\",protocol=\"udp\"}",
        "bpfsync_datapath_bytes_total{program=\"counter\",protocol=\"udp\"}",
    ] {
        assert!(text.contains(name), "/metrics lacks `{name}`:\n{text}");
    }
    // A strict OpenMetrics parser (Python prometheus_client) takes it…
    let metrics_file = dir.path().join("metrics.txt");
    std::fs::write(&metrics_file, &text).unwrap();
    let out = Command::new("python3")
        .args(["-c", "import sys\nfrom prometheus_client.openmetrics.parser import text_string_to_metric_families as p\nprint(len(list(p(open(sys.argv[1]).read()))))", metrics_file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "OpenMetrics parse failed: {}", String::from_utf8_lossy(&out.stderr));
    // …and a scraper that does not ask for OpenMetrics gets the classic text
    // format, which promtool checks clean (exit 0: no lint notes either).
    let (code, classic) = agent.get("/metrics");
    assert_eq!(code, 200);
    assert!(!classic.contains("# EOF") && classic.contains("# TYPE bpfsync_reconciles_total counter"), "{classic}");
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(classic.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    assert_eq!(agent.get("/healthz"), (200, "ok\n".into()));
    assert_eq!(agent.get("/readyz").0, 200);
    assert_eq!(agent.get("/nope").0, 404);
    let st = agent.status();
    assert_eq!(st["agent"]["ready"], true);
    assert!(st["agent"]["spec_sha256"].as_str().is_some_and(|s| s.len() == 64));
    assert!(st["programs"].as_array().is_some_and(|p| p.len() == 2));
    agent.stop();
}

#[test]
fn a_failure_the_kernel_repeats_is_retried_with_backoff_not_at_every_resync() {
    let env = Env::new();
    let dir = TempDir::create("bpfsync-agent-spec").unwrap();
    let path = dir.path().join("spec.yaml");
    // Native XDP on a bridge (no driver support): the kernel refuses, and
    // will keep refusing.
    struct Bridge(String);
    impl Drop for Bridge {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["link", "del", &self.0]).output();
        }
    }
    let bridge = Bridge(format!("bb{}", std::process::id() % 100_000));
    assert!(Command::new("ip").args(["link", "add", &bridge.0, "type", "bridge"]).status().unwrap().success());
    let ifname = bridge.0.clone();
    let bad = format!(
        "{HEAD}programs:\n  - {{ name: counter, builtin: counter, type: xdp }}\ninterfaces:\n  - {{ name: {ifname}, xdp: {{ program: counter, mode: driver }} }}\n"
    );
    std::fs::write(&path, &bad).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(env!("CARGO_BIN_EXE_bpfsync"))
        .args(["--bpffs-root", env.bpffs.root().to_str().unwrap(), "--state-dir", env.state.path().to_str().unwrap()])
        .args(["agent", "--spec", path.to_str().unwrap(), "--resync", "300ms", "--debounce", "50ms"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let agent = Agent { child, port };
    wait("the failure", Duration::from_secs(10), || {
        agent.metric("bpfsync_reconciles_total{result=\"error\"}") == Some(1.0)
    });
    std::thread::sleep(Duration::from_millis(1500)); // several resyncs
    assert_eq!(agent.metric("bpfsync_reconciles_total{result=\"error\"}"), Some(1.0), "not retried at every resync");
    assert_eq!(agent.get("/readyz").0, 503);
    // …but retried after the backoff (5 s first): never deaf for good.
    wait("the retry after the backoff", Duration::from_secs(10), || {
        agent.metric("bpfsync_reconciles_total{result=\"error\"}").is_some_and(|n| n >= 2.0)
    });
    let err = agent.status()["agent"]["last_error"].as_str().unwrap_or_default().to_string();
    assert!(err.contains("attach") && err.contains(&ifname), "{err}");
    assert!(xdp_state(sys::ifindex(&ifname).unwrap()).unwrap().drv_prog.is_none());

    std::fs::write(&path, bad.replace("mode: driver", "mode: skb")).unwrap();
    wait("the fixed spec", Duration::from_secs(10), || agent.get("/readyz").0 == 200);
    assert!(xdp_state(sys::ifindex(&ifname).unwrap()).unwrap().skb_prog.is_some());
    agent.stop();
}

#[test]
fn an_agent_started_on_an_invalid_spec_prunes_nothing() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    let (_dir, path) = spec_file(&sb.host_if, 4);
    env.run_ok(&["apply", path.to_str().unwrap(), "--auto-approve"]);
    std::fs::write(&path, "apiVersion: bpfsync/v1\nkind: NodeSpec\nprograms: [oops\n").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(env!("CARGO_BIN_EXE_bpfsync"))
        .args(["--bpffs-root", env.bpffs.root().to_str().unwrap(), "--state-dir", env.state.path().to_str().unwrap()])
        .args([
            "agent",
            "--spec",
            path.to_str().unwrap(),
            "--resync",
            "300ms",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let agent = Agent { child, port };
    wait("the agent to answer", Duration::from_secs(10), || agent.get("/healthz").0 == 200);
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(agent.get("/readyz").0, 503, "not ready without a valid spec");
    assert_eq!(mark80(&env), Some(4), "what was running is still running");
    assert!(xdp_state(sys::ifindex(&sb.host_if).unwrap()).unwrap().skb_prog.is_some());
    agent.stop();
}

/// Attaches the built-in counter to `iface`'s generic XDP slot the way
/// `ip link set … xdpgeneric` does (netlink, no bpf link): someone else's
/// program.
fn attach_foreign_xdp(iface: &str) {
    use std::os::fd::{AsFd, AsRawFd};
    let mut ebpf = aya::Ebpf::load(&std::fs::read(common::repo().join("bpf/counter.bpf.o")).unwrap()).unwrap();
    let prog: &mut aya::programs::Xdp = ebpf.program_mut("xdp_counter").unwrap().try_into().unwrap();
    prog.load().unwrap();
    let fd = prog.fd().unwrap().as_fd().as_raw_fd();
    let idx = sys::ifindex(iface).unwrap();
    bpfsync::kernel::netlink::xdp_set(idx, fd, bpfsync::kernel::netlink::XDP_FLAGS_SKB_MODE).unwrap();
}

#[test]
fn a_foreign_program_on_a_detached_hook_is_left_alone_and_ours_returns_once_it_goes() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    let (_dir, path) = spec_file(&sb.host_if, 1);
    env.run_ok(&["apply", path.to_str().unwrap(), "--auto-approve"]);
    let ifindex = sys::ifindex(&sb.host_if).unwrap();
    let ours = xdp_state(ifindex).unwrap().skb_prog.unwrap();
    // Our link detached by hand, and someone else's program takes the slot.
    let xdp_pin = env.bpffs.root().join(format!("links/xdp:{}:skb", sb.host_if));
    let out = Command::new("bpftool").args(["link", "detach", "pinned", xdp_pin.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success());
    attach_foreign_xdp(&sb.host_if);
    let foreign = xdp_state(ifindex).unwrap().skb_prog.unwrap();
    assert_ne!(foreign, ours);

    let plan = env.run(&["plan", path.to_str().unwrap(), "--detailed-exitcode"]);
    assert_eq!(plan.status.code(), Some(2), "{}", common::stdout(&plan));
    assert!(common::stdout(&plan).contains("Pending"), "{}", common::stdout(&plan));

    let agent = Agent::start(&env, &path, "1s");
    wait("the conflict reported", Duration::from_secs(5), || agent.metric("bpfsync_conflicts ") == Some(1.0));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(xdp_state(ifindex).unwrap().skb_prog, Some(foreign), "the foreign program is left alone");
    let errors = agent.metric("bpfsync_reconciles_total{result=\"error\"}").unwrap_or(0.0);
    assert_eq!(errors, 0.0, "no attach was tried");
    let st = agent.status();
    assert_eq!(st["drift"]["in_sync"], false, "{}", st["drift"]);
    assert_eq!(st["drift"]["pending"].as_array().map(Vec::len), Some(1), "{}", st["drift"]);

    // The foreign program goes: ours is attached again without a restart.
    bpfsync::kernel::netlink::xdp_set(ifindex, -1, bpfsync::kernel::netlink::XDP_FLAGS_SKB_MODE).unwrap();
    wait("ours attached again", Duration::from_secs(5), || {
        xdp_state(ifindex).unwrap().skb_prog.is_some_and(|id| id != foreign)
    });
    wait("in sync", Duration::from_secs(5), || agent.status()["drift"]["in_sync"] == true);
    agent.stop();
}

#[test]
fn a_hook_on_a_missing_interface_is_pending_and_attached_as_soon_as_it_appears() {
    let env = Env::new();
    let name = format!("bsp{}", std::process::id() % 100_000);
    let (_dir, path) = spec_file(&name, 1);
    let p = path.to_str().unwrap();
    let out = env.run_ok(&["apply", p, "--auto-approve"]);
    assert!(out.contains("pending") && !out.contains("Apply complete!"), "{out}");
    let plan = env.run(&["plan", p, "--detailed-exitcode"]);
    assert_eq!(plan.status.code(), Some(2), "a CI gate does not pass over it");
    assert!(common::stdout(&plan).contains(&format!("waiting for interface `{name}`")));
    let status = env.run_ok(&["status"]);
    assert!(status.contains("are not in place") && !status.contains("DRIFT: none"), "{status}");

    // A long resync: only the interface event can attach it in time.
    let agent = Agent::start(&env, &path, "60s");
    assert_eq!(agent.status()["drift"]["in_sync"], false);
    struct Veth(String);
    impl Drop for Veth {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["link", "del", &self.0]).output();
        }
    }
    let veth = Veth(name.clone());
    let peer = format!("{name}p");
    let ok = Command::new("ip").args(["link", "add", &veth.0, "type", "veth", "peer", "name", &peer]).status().unwrap();
    assert!(ok.success());
    wait("the hook attached on the new interface", Duration::from_secs(5), || {
        sys::ifindex(&name).and_then(|i| xdp_state(i).ok()).and_then(|x| x.skb_prog).is_some()
    });
    wait("in sync", Duration::from_secs(5), || agent.status()["drift"]["in_sync"] == true);
    let plan = env.run(&["plan", p, "--detailed-exitcode"]);
    assert_eq!(plan.status.code(), Some(0), "{}", common::stdout(&plan));

    // The interface deleted and created again: our link died with it (it is
    // defunct); the agent attaches again on the new interface at once.
    let first = sys::ifindex(&name).unwrap();
    assert!(Command::new("ip").args(["link", "del", &name]).status().unwrap().success());
    let ok = Command::new("ip").args(["link", "add", &name, "type", "veth", "peer", "name", &peer]).status().unwrap();
    assert!(ok.success());
    let second = sys::ifindex(&name).unwrap();
    assert_ne!(first, second);
    wait("the hook attached on the re-created interface", Duration::from_secs(5), || {
        xdp_state(second).ok().and_then(|x| x.skb_prog).is_some()
    });
    wait("in sync again", Duration::from_secs(5), || agent.status()["drift"]["in_sync"] == true);
    agent.stop();
}

#[test]
fn no_cli_write_runs_beside_the_agent_even_from_another_state_directory() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    let (_dir, path) = spec_file(&sb.host_if, 1);
    let agent = Agent::start(&env, &path, "30s");
    let p = path.to_str().unwrap();
    let out = env.run(&["apply", p, "--auto-approve"]);
    assert_eq!(out.status.code(), Some(1));
    let err = common::stderr(&out);
    assert!(err.contains("another bpfsync is changing this node") && err.contains("agent"), "{err}");
    // Another state directory on the same bpffs root: the root's lock.
    let other = TempDir::create("bpfsync-other-state").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bpfsync"))
        .args(["--bpffs-root", env.bpffs.root().to_str().unwrap(), "--state-dir", other.path().to_str().unwrap()])
        .args(["down", "--auto-approve"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", common::stdout(&out));
    assert!(common::stderr(&out).contains(env.bpffs.root().to_str().unwrap()), "{}", common::stderr(&out));
    // Read-only commands still work beside it.
    env.run_ok(&["plan", p]);
    env.run_ok(&["status"]);
    agent.stop();
    // The agent gone, the lock is free.
    env.run_ok(&["apply", p, "--auto-approve"]);
}

#[test]
fn a_panicking_reconcile_is_caught_counted_and_the_next_one_runs() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    let (_dir, path) = spec_file(&sb.host_if, 3);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(env!("CARGO_BIN_EXE_bpfsync"))
        .args(["--bpffs-root", env.bpffs.root().to_str().unwrap(), "--state-dir", env.state.path().to_str().unwrap()])
        .args(["agent", "--spec", path.to_str().unwrap(), "--resync", "30s", "--debounce", "50ms"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("BPFSYNC_PANIC_AT", "reconcile:1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let agent = Agent { child, port };
    // The first reconcile panics; the retry applies the spec.
    wait("ready after the panic", Duration::from_secs(10), || agent.get("/readyz").0 == 200);
    assert_eq!(mark80(&env), Some(3));
    assert_eq!(agent.metric("bpfsync_reconciles_total{result=\"panic\"}"), Some(1.0));
    assert_eq!(agent.get("/healthz").0, 200);
    // Later edits are still followed: nothing stayed poisoned.
    std::fs::write(&path, spec(&sb.host_if, 8)).unwrap();
    wait("the edit after the panic", Duration::from_secs(10), || mark80(&env) == Some(8));
    agent.stop();
}

#[test]
fn slow_floods_and_oversized_requests_cannot_take_the_listener() {
    use std::io::Read;
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    let (_dir, path) = spec_file(&sb.host_if, 1);
    let agent = Agent::start(&env, &path, "30s");
    // A client sending a byte now and then is cut off once the head timeout
    // (5 s) passes, whatever it sends.
    let mut slow = std::net::TcpStream::connect(("127.0.0.1", agent.port)).unwrap();
    slow.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let started = std::time::Instant::now();
    let closed = std::thread::spawn(move || {
        for b in b"GET /metrics HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
            if slow.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(700));
            let mut buf = [0u8; 256];
            match slow.read(&mut buf) {
                Ok(0) => return,
                Err(e) if !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => return,
                _ => {}
            }
        }
    });
    // A flood of idle connections, far past the limit: the agent's own
    // descriptors stay bounded and probes are still answered.
    let flood: Vec<_> = (0..300).filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", agent.port)).ok()).collect();
    let fds = || std::fs::read_dir(format!("/proc/{}/fd", agent.child.id())).unwrap().count();
    assert!(fds() < 300 + 100, "the agent holds {} descriptors", fds());
    let probe = std::time::Instant::now();
    assert_eq!(agent.get("/healthz").0, 200);
    assert!(probe.elapsed() < Duration::from_secs(2), "probe took {:?}", probe.elapsed());
    drop(flood);
    closed.join().unwrap();
    assert!(started.elapsed() < Duration::from_secs(12), "the slow client was held {:?}", started.elapsed());

    // Oversized heads, bodies and other methods are refused with their codes.
    let huge = format!("GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(64 << 10));
    assert_eq!(agent.request(&huge).0, 431);
    assert_eq!(agent.request("GET /status HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello").0, 413);
    assert_eq!(agent.request("POST /status HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").0, 405);
    assert_eq!(agent.get("/readyz").0, 200, "still serving");
    agent.stop();
}

/// SIGTERM as soon as the agent listens, while its first reconcile still
/// loads programs: it stops cleanly after that reconcile instead of being
/// killed by the signal mid-apply (its handler used to be installed only
/// once the first reconcile was done).
#[test]
fn a_sigterm_during_start_up_stops_the_agent_cleanly() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    let (_dir, path) = spec_file(&sb.host_if, 1);
    for _ in 0..3 {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut child = Command::new(env!("CARGO_BIN_EXE_bpfsync"))
            .args(["--bpffs-root", env.bpffs.root().to_str().unwrap()])
            .args(["--state-dir", env.state.path().to_str().unwrap()])
            .args(["agent", "--spec", path.to_str().unwrap(), "--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait("the agent to listen", Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().unwrap();
        assert!(status.success(), "SIGTERM during start-up: {status}");
        // Down between rounds, so each start has programs to load.
        env.run_ok(&["down", "--auto-approve"]);
    }
}

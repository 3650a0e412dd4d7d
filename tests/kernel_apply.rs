//! Real-kernel tests of apply, each in its own network namespace sandbox
//! with its own bpffs root and state directory (removed even on failure).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use bpfsync::apply::journal::MemJournal;
use bpfsync::apply::{self, Retry, scope_for};
use bpfsync::compile::Desired;
use bpfsync::datapath::proto_counters;
use bpfsync::kernel::netlink::xdp_state;
use bpfsync::kernel::{Kernel, Scope, sys};
use bpfsync::model::MapRef;
use bpfsync::plan;
use common::{Env, Sandbox, repo, stderr, stdout, write_spec};
use serde_json::Value;

const HEAD: &str = "apiVersion: bpfsync/v1\nkind: NodeSpec\n";

fn full_spec(iface: &str, mode: &str, counter_source: &str) -> String {
    format!(
        r#"{HEAD}programs:
  - name: counter
    {counter_source}
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
  - name: syscall_enter
    builtin: syscall_enter
    type: tracepoint
  - name: syscall_exit
    builtin: syscall_exit
    type: tracepoint
    share-maps: syscall_enter
interfaces:
  - name: {iface}
    xdp: {{ program: counter, mode: {mode} }}
    tc: {{ ingress: [classify], egress: [classify] }}
tracepoints:
  - {{ event: raw_syscalls/sys_enter, program: syscall_enter }}
  - {{ event: raw_syscalls/sys_exit, program: syscall_exit }}
"#
    )
}

const BUILTIN_COUNTER: &str = "builtin: counter";

fn v2_counter() -> String {
    format!("object: {}/tests/fixtures/counter_v2.bpf.o\n    function: xdp_counter", repo().display())
}

fn status(env: &Env) -> Value {
    serde_json::from_str(&env.run_ok(&["status", "-o", "json"])).unwrap()
}

fn program_id(st: &Value, name: &str) -> u64 {
    st["programs"].as_array().unwrap().iter().find(|p| p["name"] == name).unwrap()["id"].as_u64().unwrap()
}

fn link_id(st: &Value, hook: &str) -> u64 {
    st["attachments"].as_array().unwrap().iter().find(|a| a["hook"] == hook).unwrap()["link_id"].as_u64().unwrap()
}

fn bpftool(args: &[&str]) -> Value {
    let out = Command::new("bpftool").arg("-j").args(args).output().expect("bpftool is installed");
    assert!(out.status.success(), "bpftool {args:?}: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// TCX programs on an interface (this bpftool predates TCX: ask the kernel).
fn tcx_ids(iface: &str) -> (Vec<u32>, Vec<u32>) {
    use aya::programs::tc::{SchedClassifier, TcAttachType};
    let ids = |t| SchedClassifier::query_tcx(iface, t).unwrap().1.iter().map(|p| p.id()).collect();
    (ids(TcAttachType::Ingress), ids(TcAttachType::Egress))
}

/// Whether a program id still exists, waiting for the kernel's deferred
/// release of programs whose last reference went away.
fn program_gone(id: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if sys::prog_fd_by_id(id as u32).is_err() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn link_gone(id: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if sys::link_fd_by_id(id as u32).is_err() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn desired(path: &str) -> Desired {
    common::compile_text(path, &std::fs::read_to_string(path).unwrap())
}

#[test]
fn apply_then_observe_equals_desired_and_bpftool_agrees() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    let spec = write_spec(env.state.path(), "spec.yaml", &full_spec(&sb.host_if, "skb", BUILTIN_COUNTER));
    let out = env.run_ok(&["apply", &spec, "--auto-approve"]);
    assert!(out.contains("Apply complete!"), "{out}");

    // bpfsync's own view: nothing left to do.
    let d = desired(&spec);
    let mut k = env.kernel();
    let observed = k.observe(&scope_for(&d.state)).unwrap();
    assert!(plan::plan(&d.state, &observed).is_empty());
    let st = status(&env);
    assert_eq!(st["drift"]["in_sync"], true);

    // bpftool's view agrees.
    let counter = &observed.programs["counter"];
    let pin = env.bpffs.root().join("programs/counter").join(&counter.digest);
    let prog = bpftool(&["prog", "show", "pinned", pin.to_str().unwrap()]);
    assert_eq!(prog["id"].as_u64(), counter.id.map(u64::from));
    assert_eq!(prog["type"], "xdp");
    let link_pin = env.bpffs.root().join(format!("links/xdp:{}:skb", sb.host_if));
    let link = bpftool(&["link", "show", "pinned", link_pin.to_str().unwrap()]);
    assert_eq!(link["prog_id"].as_u64(), counter.id.map(u64::from));
    let ifindex = sys::ifindex(&sb.host_if).unwrap();
    assert_eq!(xdp_state(ifindex).unwrap().skb_prog, counter.id);
    let net = bpftool(&["net", "show", "dev", &sb.host_if]);
    let xdp = net[0]["xdp"].to_string();
    assert!(xdp.contains(&format!("\"id\":{}", counter.id.unwrap())) && xdp.contains("generic"), "{xdp}");
    let classify_id = observed.programs["classify"].id.unwrap();
    assert_eq!(tcx_ids(&sb.host_if), (vec![classify_id], vec![classify_id]), "ingress and egress");
    let ports_pin = env.bpffs.root().join("maps/classify/class_ports");
    let dump = bpftool(&["map", "dump", "pinned", ports_pin.to_str().unwrap()]);
    let entries = dump.as_array().unwrap();
    assert_eq!(entries.len(), 1);
    let key: Vec<u64> = entries[0]["key"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| u64::from_str_radix(b.as_str().unwrap().trim_start_matches("0x"), 16).unwrap())
        .collect();
    assert_eq!(key, vec![17, 0, 0x92, 0x10], "protocol 17, port 4242 little-endian");
    // The tracepoint pair shares its maps.
    let enter = bpftool(&["prog", "show", "id", &observed.programs["syscall_enter"].id.unwrap().to_string()]);
    let exit = bpftool(&["prog", "show", "id", &observed.programs["syscall_exit"].id.unwrap().to_string()]);
    let owned: Vec<Value> = std::fs::read_dir(env.bpffs.root().join("maps/syscall_enter"))
        .unwrap()
        .map(|e| bpftool(&["map", "show", "pinned", e.unwrap().path().to_str().unwrap()])["id"].clone())
        .collect();
    for p in [&enter, &exit] {
        for id in p["map_ids"].as_array().unwrap() {
            assert!(owned.contains(id), "map {id} of {} is not one of syscall_enter's pinned maps", p["name"]);
        }
    }
    assert!(!env.bpffs.root().join("maps/syscall_exit").exists(), "the sharer owns no maps");
    assert_eq!(observed.programs["syscall_exit"].share_maps.as_deref(), Some("syscall_enter"));
}

#[test]
fn applying_the_same_spec_twice_changes_nothing_and_keeps_ids() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    let spec = write_spec(env.state.path(), "spec.yaml", &full_spec(&sb.host_if, "auto", BUILTIN_COUNTER));
    env.run_ok(&["apply", &spec, "--auto-approve"]);
    let before = status(&env);
    let out = env.run_ok(&["apply", &spec, "--auto-approve"]);
    assert!(out.contains("No changes."), "{out}");
    let plan = env.run(&["plan", &spec, "--detailed-exitcode"]);
    assert_eq!(plan.status.code(), Some(0), "{}", stdout(&plan));
    let after = status(&env);
    assert_eq!(before["programs"], after["programs"], "program ids and digests are unchanged");
    assert_eq!(before["attachments"], after["attachments"], "link ids are unchanged");

    // Library level: the second apply makes no kernel write at all.
    let d = desired(&spec);
    let mut k = env.kernel();
    let observed = k.observe(&scope_for(&d.state)).unwrap();
    let p = plan::plan(&d.state, &observed);
    let report = apply::apply(&mut k, &p, &d, &observed, &mut MemJournal::default(), Retry::none()).unwrap();
    assert_eq!(report.kernel_writes, 0);
    assert_eq!(k.writes(), 0);
}

#[test]
fn one_changed_entry_of_ten_thousand_is_one_kernel_write() {
    let env = Env::new();
    let entries: String = (0..10_000).map(|i| format!("          - {{ key: {i}, value: {i} }}\n")).collect();
    let spec_text = |e: &str| {
        format!(
            "{HEAD}programs:\n  - name: big\n    object: {}/tests/fixtures/bigmap.bpf.o\n    type: xdp\n    maps:\n      - name: table\n        entries:\n{e}",
            repo().display()
        )
    };
    let a = write_spec(env.state.path(), "a.yaml", &spec_text(&entries));
    env.run_ok(&["apply", &a, "--auto-approve"]);
    let b = write_spec(
        env.state.path(),
        "b.yaml",
        &spec_text(&entries.replace("{ key: 5000, value: 5000 }", "{ key: 5000, value: 1 }")),
    );
    let d = desired(&b);
    let mut k = env.kernel();
    let observed = k.observe(&scope_for(&d.state)).unwrap();
    assert_eq!(observed.maps[&MapRef { program: "big".into(), map: "table".into() }].entries.len(), 10_000);
    let p = plan::plan(&d.state, &observed);
    assert_eq!(p.changes.len(), 1);
    let report = apply::apply(&mut k, &p, &d, &observed, &mut MemJournal::default(), Retry::none()).unwrap();
    assert_eq!((report.steps, report.kernel_writes), (1, 1));
    let pin = env.bpffs.root().join("maps/big/table");
    let v = bpftool(&["map", "lookup", "pinned", pin.to_str().unwrap(), "key", "0x88", "0x13", "0", "0"]);
    assert_eq!(v["value"], serde_json::json!(["0x01", "0x00", "0x00", "0x00"]));
}

/// A write of 50,000 entries is split across CPUs (concurrent batched
/// updates of slices) and verified by a sample: every entry is there with
/// its value, read back whole here.
#[test]
fn a_large_fresh_map_is_written_in_parallel_slices_and_holds_every_entry() {
    let env = Env::new();
    let n = 50_000u32;
    let entries: String = (0..n).map(|i| format!("          - {{ key: {i}, value: {} }}\n", i ^ 0x5a5a)).collect();
    let text = format!(
        "{HEAD}programs:\n  - name: big\n    object: {}/tests/fixtures/bigmap.bpf.o\n    type: xdp\n    maps:\n      - name: table\n        entries:\n{entries}",
        repo().display()
    );
    let path = write_spec(env.state.path(), "big.yaml", &text);
    let d = desired(&path);
    let mut k = env.kernel();
    let observed = k.observe(&scope_for(&d.state)).unwrap();
    let p = plan::plan(&d.state, &observed);
    let report = apply::apply(&mut k, &p, &d, &observed, &mut MemJournal::default(), Retry::none()).unwrap();
    let cpus = std::thread::available_parallelism().map_or(1, |c| c.get()).min(4) as u64;
    // The load, then one batched call per slice.
    assert_eq!(report.kernel_writes, 1 + cpus, "{report:?}");
    let table = MapRef { program: "big".into(), map: "table".into() };
    let after = k.observe(&Scope { maps: [table.clone()].into(), ..Default::default() }).unwrap();
    let got = &after.maps[&table].entries;
    assert_eq!(got.len(), n as usize);
    for i in 0..n {
        assert_eq!(got.get(&i.to_ne_bytes()), Some(&(i ^ 0x5a5a).to_ne_bytes()[..]), "entry {i}");
    }
}

/// LPM tries (policy peers, routes) are written in batched calls too:
/// 2,000 peer prefixes take a handful of kernel writes, not 2,000.
#[test]
fn lpm_trie_entries_are_written_in_batches() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    let peers: Vec<String> = (0..2_000).map(|i| format!("10.{}.{}.0/24", i / 256, i % 256)).collect();
    let text = format!(
        "{HEAD}interfaces:\n  - name: {iface}\n    mesh: {{ mode: skb }}\npolicies:\n  - name: p\n    interfaces: [{iface}]\n    ingress:\n      - from: [{peers}]\n        ports: [{{ port: 80, protocol: tcp }}]\n",
        iface = sb.host_if,
        peers = peers.join(", ")
    );
    let path = write_spec(env.state.path(), "peers.yaml", &text);
    let d = desired(&path);
    let mut k = env.kernel();
    let observed = k.observe(&scope_for(&d.state)).unwrap();
    let p = plan::plan(&d.state, &observed);
    let report = apply::apply(&mut k, &p, &d, &observed, &mut MemJournal::default(), Retry::none()).unwrap();
    assert!(report.kernel_writes < 40, "{report:?}");
    let observed = k.observe(&scope_for(&d.state)).unwrap();
    let peers_map = MapRef { program: "mesh".into(), map: "policy_peers".into() };
    assert!(observed.maps[&peers_map].entries.len() >= 2_000);
    assert!(plan::plan(&d.state, &observed).is_empty(), "every entry is there");
    env.run_ok(&["down", "--auto-approve"]);
}

#[test]
fn replacing_a_running_program_swaps_the_link_without_missing_a_packet() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    let v1 = write_spec(env.state.path(), "v1.yaml", &full_spec(&sb.host_if, "skb", BUILTIN_COUNTER));
    let v2 = write_spec(env.state.path(), "v2.yaml", &full_spec(&sb.host_if, "skb", &v2_counter()));
    env.run_ok(&["apply", &v1, "--auto-approve"]);
    let before = status(&env);
    let stats = MapRef { program: "counter".into(), map: "packet_stats".into() };
    let udp_count = |env: &Env| {
        let mut k = env.kernel();
        let s = k.observe(&Scope { maps: [stats.clone()].into(), ..Default::default() }).unwrap();
        proto_counters(&s.maps[&stats].entries).get("udp").map_or(0, |c| c.packets)
    };
    let start = udp_count(&env);

    // Continuous traffic from the namespace while the program is replaced.
    let sender = std::thread::spawn({
        let (netns, host_if, host_ip, peer_ip) = (sb.netns.clone(), sb.host_if.clone(), sb.host_ip, sb.peer_ip);
        move || {
            let sb2 = Sandbox { netns, host_if: host_if.clone(), peer_if: String::new(), host_ip, peer_ip };
            let sent = sb2.send_udp(9, 3000, Duration::from_micros(500));
            std::mem::forget(sb2); // owned by the test body
            sent
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let out = env.run_ok(&["apply", &v2, "--auto-approve"]);
    assert!(out.contains("will be replaced"), "{out}");
    eprintln!("replace took {:?}", t.elapsed());
    let sent = sender.join().unwrap().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let counted = udp_count(&env) - start;
    assert_eq!(counted, sent, "every packet was seen by the old or the new program");

    let after = status(&env);
    assert_ne!(program_id(&before, "counter"), program_id(&after, "counter"), "a new program was loaded");
    let hook = format!("xdp/{}", sb.host_if);
    assert_eq!(link_id(&before, &hook), link_id(&after, &hook), "the same link now runs it");
    assert_eq!(after["drift"]["in_sync"], true);
    // The old version is gone from bpffs, nothing is left in the trash.
    let versions = std::fs::read_dir(env.bpffs.root().join("programs/counter")).unwrap().count();
    assert_eq!(versions, 1);
    assert_eq!(std::fs::read_dir(env.bpffs.root().join("trash")).unwrap().count(), 0);
}

fn attach_foreign(env: &Env, iface: &str) -> u32 {
    let pin = env.bpffs.mount.join("foreign");
    let obj = repo().join("tests/fixtures/bigmap.bpf.o");
    let out = Command::new("bpftool")
        .args(["prog", "load", obj.to_str().unwrap(), pin.to_str().unwrap(), "type", "xdp"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let out = Command::new("bpftool")
        .args(["net", "attach", "xdpgeneric", "pinned", pin.to_str().unwrap(), "dev", iface])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    xdp_state(sys::ifindex(iface).unwrap()).unwrap().skb_prog.expect("foreign program attached")
}

#[test]
fn a_foreign_program_is_a_conflict_until_the_spec_takes_the_hook_over() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    let foreign = attach_foreign(&env, &sb.host_if);
    let spec = write_spec(env.state.path(), "spec.yaml", &full_spec(&sb.host_if, "skb", BUILTIN_COUNTER));

    let out = env.run_ok(&["plan", &spec]);
    assert!(out.contains("Pending"), "the blocked hook is pending: {out}");
    assert!(out.contains(&format!("id {foreign}")), "{out}");
    assert!(!out.contains(&format!("attachment.xdp/{}", sb.host_if)), "no attach is planned: {out}");
    env.run_ok(&["apply", &spec, "--auto-approve"]);
    let ifindex = sys::ifindex(&sb.host_if).unwrap();
    assert_eq!(xdp_state(ifindex).unwrap().skb_prog, Some(foreign), "the foreign program is untouched");
    let json: Value = serde_json::from_str(&env.run_ok(&["plan", &spec, "-o", "json"])).unwrap();
    assert_eq!(json["conflicts"][0]["kind"], "foreign-program");
    assert_eq!(json["conflicts"][0]["program_id"].as_u64(), Some(foreign as u64));
    assert_eq!(json["conflicts"][0]["pending"], true);
    let gate = env.run(&["plan", &spec, "--detailed-exitcode"]);
    assert_eq!(gate.status.code(), Some(2), "ours is attached nowhere: the gate does not pass");

    let takeover = full_spec(&sb.host_if, "skb", BUILTIN_COUNTER).replace("mode: skb }", "mode: skb, takeover: true }");
    let spec2 = write_spec(env.state.path(), "takeover.yaml", &takeover);
    let out = env.run_ok(&["apply", &spec2, "--auto-approve"]);
    assert!(out.contains("`takeover: true` replaces foreign program"), "{out}");
    let st = status(&env);
    let counter = program_id(&st, "counter") as u32;
    assert_eq!(xdp_state(ifindex).unwrap().skb_prog, Some(counter), "ours replaced it");
    assert_eq!(st["drift"]["in_sync"], true);
}

#[test]
fn down_removes_everything_bpfsync_owns_and_nothing_else() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    let other = Sandbox::create().unwrap();
    let foreign = attach_foreign(&env, &other.host_if);
    let spec = write_spec(env.state.path(), "spec.yaml", &full_spec(&sb.host_if, "skb", BUILTIN_COUNTER));
    env.run_ok(&["apply", &spec, "--auto-approve"]);
    let st = status(&env);
    let ids: Vec<u64> = st["programs"].as_array().unwrap().iter().map(|p| p["id"].as_u64().unwrap()).collect();
    let links: Vec<u64> =
        st["attachments"].as_array().unwrap().iter().map(|a| a["link_id"].as_u64().unwrap()).collect();

    let out = env.run_ok(&["down", "--auto-approve"]);
    assert!(out.contains("Down complete"), "{out}");
    assert!(!env.bpffs.root().exists(), "bpfsync's root is gone");
    assert_eq!(env.pins(), vec!["foreign".to_string()], "only the foreign pin is left");
    for id in links {
        assert!(link_gone(id), "link {id} still exists");
    }
    for id in ids {
        assert!(program_gone(id), "program {id} is still loaded");
    }
    let ifindex = sys::ifindex(&sb.host_if).unwrap();
    assert_eq!(xdp_state(ifindex).unwrap(), Default::default());
    assert_eq!(tcx_ids(&sb.host_if), (vec![], vec![]));
    assert_eq!(
        xdp_state(sys::ifindex(&other.host_if).unwrap()).unwrap().skb_prog,
        Some(foreign),
        "not ours: untouched"
    );
    // A second down is a no-op.
    env.run_ok(&["down", "--auto-approve"]);
}

#[test]
fn kill_9_in_the_middle_of_an_apply_is_rolled_back_and_the_next_apply_converges() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    let entries: String = (0..100_000).map(|i| format!("          - {{ key: {i}, value: {i} }}\n")).collect();
    let text = format!(
        "{}  - name: big\n    object: {}/tests/fixtures/bigmap.bpf.o\n    type: xdp\n    maps:\n      - name: table\n        entries:\n{entries}",
        full_spec(&sb.host_if, "skb", BUILTIN_COUNTER).split("interfaces:").next().unwrap(),
        repo().display()
    ) + &format!(
        "interfaces:{}",
        full_spec(&sb.host_if, "skb", BUILTIN_COUNTER).split("interfaces:").nth(1).unwrap()
    );
    let spec = write_spec(env.state.path(), "spec.yaml", &text);
    let progress = env.state.path().join("journal.progress");

    let mut child = Command::new(env!("CARGO_BIN_EXE_bpfsync"))
        .args(["--bpffs-root", env.bpffs.root().to_str().unwrap(), "--state-dir", env.state.path().to_str().unwrap()])
        .args(["apply", &spec, "--auto-approve"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let p = std::fs::read_to_string(&progress).unwrap_or_default();
        if p.contains("done 1") {
            break;
        }
        assert!(Instant::now() < deadline, "the apply never started its steps");
        assert!(child.try_wait().unwrap().is_none(), "the apply finished before it could be killed");
        std::thread::sleep(Duration::from_micros(200));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
    assert!(env.state.path().join("journal.json").exists(), "killed mid-apply: the journal is left");
    assert!(env.bpffs.root().join("programs").read_dir().unwrap().count() > 0, "some programs were loaded");

    let out = env.run(&["apply", &spec, "--auto-approve"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("Rolled back"), "{}", stderr(&out));
    assert!(!env.state.path().join("journal.json").exists());
    let plan = env.run(&["plan", &spec, "--detailed-exitcode"]);
    assert_eq!(plan.status.code(), Some(0), "{}", stdout(&plan));
    assert_eq!(std::fs::read_dir(env.bpffs.root().join("trash")).unwrap().count(), 0);
    for p in std::fs::read_dir(env.bpffs.root().join("programs")).unwrap() {
        assert_eq!(std::fs::read_dir(p.unwrap().path()).unwrap().count(), 1, "one version per program");
    }
}

#[test]
fn a_foreign_tcx_program_is_reported_and_taken_over_only_when_asked() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    // Someone else's TCX link, pinned outside bpfsync's root.
    common::attach_foreign_tcx(&sb.host_if, &env.bpffs.mount.join("foreign_tcx"));
    let foreign = tcx_ids(&sb.host_if).0[0];

    let spec = write_spec(env.state.path(), "spec.yaml", &full_spec(&sb.host_if, "skb", BUILTIN_COUNTER));
    let out = env.run_ok(&["apply", &spec, "--auto-approve"]);
    assert!(out.contains(&format!("tc/{}/ingress[0]: program `tc_classify` (id {foreign}", sb.host_if)), "{out}");
    let st = status(&env);
    let ours = program_id(&st, "classify") as u32;
    // Ours is added beside it; the foreign one stays.
    assert_eq!(tcx_ids(&sb.host_if).0, vec![foreign, ours]);
    let text = env.run_ok(&["status"]);
    assert!(text.contains("FOREIGN PROGRAMS ON DECLARED HOOKS") && text.contains(&format!("id {foreign}")), "{text}");

    let takeover = full_spec(&sb.host_if, "skb", BUILTIN_COUNTER)
        .replace("egress: [classify] }", "egress: [classify], takeover: true }");
    let spec2 = write_spec(env.state.path(), "takeover.yaml", &takeover);
    let out = env.run_ok(&["apply", &spec2, "--auto-approve"]);
    assert!(out.contains("evict") || out.contains("takeover"), "{out}");
    assert_eq!(tcx_ids(&sb.host_if).0, vec![ours], "the foreign link was detached");
}

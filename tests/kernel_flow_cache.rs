//! The established-flow fast path of the mesh datapath, on the real kernel
//! (`BPF_PROG_TEST_RUN`): a connection's decision is cached in its
//! conntrack entry, and every apply that changes policy or route entries
//! retires the cached decisions (`datapath_generation`), so the packet after
//! an apply gets the new verdict and the new next hop — also when the change
//! was rolled back by the recovery of a killed apply.
//!
//! Each test first shows the cache is really used: the same table change
//! written without a generation bump leaves an established flow on its old
//! decision while a new flow already gets the new one. Without that, these
//! tests would pass with no fast path at all.

mod common;

use std::path::PathBuf;

use bpfsync::apply::journal::{JournalStep, JournalStore, MemJournal};
use bpfsync::apply::{self, KernelOp, Retry, scope_for};
use bpfsync::kernel::Kernel;
use bpfsync::kernel::testrun::run_pinned_on;
use bpfsync::model::MapRef;
use bpfsync::packet::{Packet, Transport};
use bpfsync::plan::{self, Op};
use bpfsync::spec::ProgramType;
use common::{Env, Sandbox, compile_text, write_spec};

const XDP_DROP: u32 = 1;
const XDP_REDIRECT: u32 = 4;
const TC_SHOT: u32 = 2;
const TCX_NEXT: u32 = u32::MAX;

fn ifindex(name: &str) -> u32 {
    std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex")).unwrap().trim().parse().unwrap()
}

fn pin(env: &Env, program: &str) -> PathBuf {
    let dir = env.bpffs.root().join("programs").join(program);
    std::fs::read_dir(dir).unwrap().next().unwrap().unwrap().path()
}

fn udp(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<u8> {
    Packet::new(src.parse().unwrap(), dst.parse().unwrap(), Transport::Udp { sport, dport }).build()
}

/// A spec: ingress on `iface` allows UDP 8080 from `from`, egress allows
/// UDP 53 to `to` and what is routed; 10.9.0.0/16 is routed via `iface`
/// to `mac`.
fn spec(iface: &str, peer: &str, from: &str, to: &str, mac: &str) -> String {
    format!(
        r#"apiVersion: bpfsync/v1
kind: NodeSpec
interfaces:
  - name: {iface}
    mesh: {{ mode: skb }}
policies:
  - name: api
    interfaces: [{iface}]
    ingress:
      - from: [{from}]
        ports: [{{ port: 8080, protocol: udp }}]
    egress:
      - to: [{to}]
        ports: [{{ port: 53, protocol: udp }}]
      - to: [10.9.0.0/16]
        ports: [{{ port: 8080, protocol: udp }}]
routes:
  - prefix: 10.9.0.0/16
    via: {{ interface: {iface}, neighbor: {peer}, mac: "{mac}" }}
"#
    )
}

/// `bpfsync apply` of a spec text; its output.
fn apply(env: &Env, text: &str) -> String {
    let path = write_spec(env.state.path(), "spec.yaml", text);
    env.run_ok(&["apply", &path, "--auto-approve"])
}

fn generation(env: &Env) -> u64 {
    let map = MapRef { program: "mesh".into(), map: "datapath_generation".into() };
    let got = env.kernel().lookup_entries(&map, &[0u32.to_ne_bytes().to_vec()]).unwrap();
    got[0].as_ref().map_or(0, |v| u64::from_ne_bytes(v[..8].try_into().unwrap()))
}

/// Writes the entry changes from the kernel's state to `text` straight into
/// the maps, as the executor would but without its generation bumps.
fn write_without_bump(env: &Env, text: &str) {
    let mut k = env.kernel();
    let desired = compile_text("spec.yaml", text);
    let observed = k.observe(&scope_for(&desired.state)).unwrap();
    for c in plan::plan(&desired.state, &observed).changes {
        match c.op {
            Op::WriteEntry { map, key, value, .. } => k.write_entries(&map, &[(key, value)]).unwrap(),
            Op::DeleteEntry { map, key, .. } => k.delete_entries(&map, &[key]).unwrap(),
            other => panic!("only entries change: {other:?}"),
        }
    }
}

#[test]
fn established_flows_get_the_new_verdict_and_next_hop_right_after_an_apply() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    let (iface, peer) = (sb.host_if.clone(), sb.peer_ip.to_string());
    let allowing = spec(&iface, &peer, "10.1.0.0/16", "10.7.0.0/16", "02:aa:bb:cc:dd:01");
    let denying = spec(&iface, &peer, "10.2.0.0/16", "10.7.0.0/16", "02:aa:bb:cc:dd:01");
    let rerouted = spec(&iface, &peer, "10.1.0.0/16", "10.7.0.0/16", "02:aa:bb:cc:dd:02");
    apply(&env, &allowing);
    let ingress = pin(&env, "mesh");
    let idx = ifindex(&iface);
    let run = |sport: u16| {
        run_pinned_on(&ingress, ProgramType::Xdp, &udp("10.1.2.3", "10.9.9.9", sport, 8080), 1, Some(idx)).unwrap()
    };
    let dst_mac = |r: &bpfsync::kernel::testrun::RunResult| r.data_out[..6].to_vec();
    // The first packet makes the conntrack entry, the second caches the
    // decision, the rest use it.
    for _ in 0..4 {
        let r = run(40000);
        assert_eq!(r.return_value, XDP_REDIRECT);
        assert_eq!(dst_mac(&r), [2, 0xaa, 0xbb, 0xcc, 0xdd, 1]);
    }

    // The cache is used: tables changed without a bump leave the
    // established flow on its cached decision; a new flow is dropped.
    let before = generation(&env);
    write_without_bump(&env, &denying);
    assert_eq!(run(40000).return_value, XDP_REDIRECT, "the established flow still uses its cached decision");
    assert_eq!(run(40001).return_value, XDP_DROP, "a new flow is decided by the new tables");
    env.kernel().bump_generation(&MapRef { program: "mesh".into(), map: "datapath_generation".into() }).unwrap();
    assert_eq!(run(40000).return_value, XDP_DROP, "the bump retires the cached decision");
    assert_eq!(generation(&env), before + 1);

    // Through `apply`, the bump is part of the apply: the next packet of an
    // established flow has the new verdict...
    apply(&env, &allowing);
    for _ in 0..3 {
        assert_eq!(run(40000).return_value, XDP_REDIRECT);
    }
    apply(&env, &denying);
    assert_eq!(run(40000).return_value, XDP_DROP, "denied from the first packet after the apply");

    // ... and the new next hop.
    apply(&env, &allowing);
    for _ in 0..3 {
        assert_eq!(dst_mac(&run(40000)), [2, 0xaa, 0xbb, 0xcc, 0xdd, 1]);
    }
    let out = apply(&env, &rerouted);
    assert!(out.contains("Plan: 0 to add, 1 to change, 0 to destroy."), "{out}");
    let r = run(40000);
    assert_eq!(r.return_value, XDP_REDIRECT);
    assert_eq!(dst_mac(&r), [2, 0xaa, 0xbb, 0xcc, 0xdd, 2], "the new next hop from the first packet");

    // Egress (TCX) caches its decisions the same way.
    let egress = pin(&env, "mesh_egress");
    let out_run = || {
        run_pinned_on(&egress, ProgramType::Tc, &udp("10.0.0.1", "10.7.1.1", 41000, 53), 1, Some(idx))
            .unwrap()
            .return_value
    };
    for _ in 0..3 {
        assert_eq!(out_run(), TCX_NEXT);
    }
    let closed = rerouted.replace("10.7.0.0/16", "10.8.0.0/16");
    write_without_bump(&env, &closed);
    assert_eq!(out_run(), TCX_NEXT, "egress: the cached decision without a bump");
    apply(&env, &rerouted);
    for _ in 0..3 {
        assert_eq!(out_run(), TCX_NEXT);
    }
    apply(&env, &closed);
    assert_eq!(out_run(), TC_SHOT, "egress: denied from the first packet after the apply");

    env.run_ok(&["down", "--auto-approve"]);
}

/// A kill between a step's table write and its bump: the recovery's
/// rollback bumps the generation, so decisions cached from the
/// half-applied tables are not used after it.
#[test]
fn the_recovery_of_a_killed_apply_retires_decisions_cached_meanwhile() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    let (iface, peer) = (sb.host_if.clone(), sb.peer_ip.to_string());
    let denying = spec(&iface, &peer, "10.2.0.0/16", "10.7.0.0/16", "02:aa:bb:cc:dd:01");
    let allowing = spec(&iface, &peer, "10.1.0.0/16", "10.7.0.0/16", "02:aa:bb:cc:dd:01");
    apply(&env, &denying);
    let ingress = pin(&env, "mesh");
    let idx = ifindex(&iface);
    let run = || {
        run_pinned_on(&ingress, ProgramType::Xdp, &udp("10.1.2.3", "10.9.9.9", 40000, 8080), 1, Some(idx))
            .unwrap()
            .return_value
    };
    assert_eq!(run(), XDP_DROP);

    // The apply to `allowing`, killed after its steps' writes but before
    // any bump: the journal says every step started.
    let mut k = env.kernel();
    let desired = compile_text("spec.yaml", &allowing);
    let observed = k.observe(&scope_for(&desired.state)).unwrap();
    let p = plan::plan(&desired.state, &observed);
    let steps = apply::steps(&p, &desired, &observed);
    assert!(
        steps.iter().any(|s| s.forward.iter().any(|op| matches!(op, KernelOp::BumpGeneration { .. }))),
        "policy steps bump the generation"
    );
    let mut journal = MemJournal::default();
    let jsteps: Vec<JournalStep> =
        steps.iter().map(|s| JournalStep { what: s.what.clone(), undo: s.undo.clone() }).collect();
    journal.begin(&jsteps).unwrap();
    for (i, s) in steps.iter().enumerate() {
        journal.started(i).unwrap();
        for op in &s.forward {
            match op {
                KernelOp::WriteEntries { map, entries } => k.write_entries(map, entries).unwrap(),
                KernelOp::DeleteEntries { map, keys } => k.delete_entries(map, keys).unwrap(),
                KernelOp::BumpGeneration { .. } => {}
                other => panic!("only entries change: {other:?}"),
            }
        }
    }
    // Meanwhile the flow is allowed and its decision cached.
    for _ in 0..3 {
        assert_eq!(run(), XDP_REDIRECT);
    }
    let before = generation(&env);
    let undone = apply::recover(&mut k, &mut journal, Retry::none()).unwrap();
    assert_eq!(undone, steps.len());
    assert!(generation(&env) > before, "the rollback bumped the generation");
    assert_eq!(run(), XDP_DROP, "the rolled-back policy decides the established flow again");

    env.run_ok(&["down", "--auto-approve"]);
}

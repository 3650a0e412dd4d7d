//! Transition safety of policy changes, on the real kernel: while a plan is
//! applied, every packet gets its old or its new verdict, never a third.
//!
//! For randomised pairs of policies, the plan from the old to the new one
//! is replayed one map entry at a time, in the executor's order (a batched
//! map update is applied by the kernel entry by entry, so any prefix of it
//! can meet a packet), and after every entry a set of probe packets runs
//! through the `mesh` program with `BPF_PROG_TEST_RUN`. The same replay in
//! a naive order (removals first) must produce third verdicts, or the test
//! would prove nothing.

mod common;

use std::collections::BTreeSet;

use bpfsync::apply::journal::MemJournal;
use bpfsync::apply::{self, Retry, scope_for};
use bpfsync::kernel::testrun::run_pinned_on;
use bpfsync::kernel::{Kernel, real::RealKernel};
use bpfsync::packet::{Packet, Transport};
use bpfsync::plan::{self, Op};
use bpfsync::sandbox::Sandbox;
use bpfsync::spec::ProgramType;
use common::{Env, Rng, compile_text};

const PEERS: &[&str] = &["0.0.0.0/0", "10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3/32", "10.2.0.0/16"];
const HOLES: &[&str] = &["10.1.2.0/24", "10.1.2.3/32", "10.1.3.0/24", "10.2.1.0/24"];
const PORTS: &[&str] = &[
    "{ port: 80, protocol: tcp }",
    "{ port: 80, end-port: 443, protocol: tcp }",
    "{ port: 443, protocol: tcp }",
    "{ port: 8080, protocol: udp }",
    "{ port: 1, end-port: 1023, protocol: udp }",
];

fn random_rule(rng: &mut Rng, key: &str) -> String {
    let peer = *rng.pick(PEERS);
    let mut rule = format!("      - {key}: [{peer}]\n");
    if rng.chance(30) {
        let hole = rng.pick(HOLES);
        let (p, h): (bpfsync::net::Cidr, bpfsync::net::Cidr) = (peer.parse().unwrap(), hole.parse().unwrap());
        if p.contains(&h) && p != h {
            rule.push_str(&format!("        except: [{hole}]\n"));
        }
    }
    match rng.next() % 4 {
        0 => rule.push_str("        protocol: icmp\n"),
        1 => {}
        _ => rule.push_str(&format!("        ports: [{}]\n", rng.pick(PORTS))),
    }
    rule
}

fn random_policy(rng: &mut Rng, iface: &str) -> String {
    let mut s = format!("apiVersion: bpfsync/v1\nkind: NodeSpec\npolicies:\n  - name: p\n    interfaces: [{iface}]\n");
    if rng.chance(85) {
        s.push_str("    ingress:\n");
        for _ in 0..1 + rng.next() % 3 {
            s.push_str(&random_rule(rng, "from"));
        }
    }
    if rng.chance(50) {
        s.push_str("    deny:\n");
        for _ in 0..1 + rng.next() % 2 {
            s.push_str(&random_rule(rng, "from"));
        }
    }
    s
}

fn probes() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for src in ["10.1.2.3", "10.1.2.4", "10.1.3.1", "10.2.1.1", "10.2.2.2", "10.3.0.1", "192.168.0.1"] {
        let src = src.parse().unwrap();
        let dst = "10.9.9.9".parse().unwrap();
        for dport in [22, 80, 200, 443, 8080] {
            out.push(Packet::new(src, dst, Transport::Tcp { sport: 40000, dport, flags: 2 }).build());
            out.push(Packet::new(src, dst, Transport::Udp { sport: 40000, dport }).build());
        }
        out.push(Packet::new(src, dst, Transport::Icmp { kind: 8, code: 0 }).build());
    }
    out
}

fn verdicts(pin: &std::path::Path, ifindex: u32, probes: &[Vec<u8>]) -> Vec<u32> {
    probes.iter().map(|p| run_pinned_on(pin, ProgramType::Xdp, p, 1, Some(ifindex)).unwrap().return_value).collect()
}

fn apply_spec(k: &mut RealKernel, text: &str) {
    let desired = compile_text("spec.yaml", text);
    let observed = k.observe(&scope_for(&desired.state)).unwrap();
    let p = plan::plan(&desired.state, &observed);
    apply::apply(k, &p, &desired, &observed, &mut MemJournal::default(), Retry::none()).unwrap();
}

/// Replays old → new entry by entry; returns the number of probe results
/// that were neither the old nor the new verdict.
fn replay(k: &mut RealKernel, pin: &std::path::Path, ifindex: u32, old: &str, new: &str, naive: bool) -> usize {
    let probes = probes();
    apply_spec(k, old);
    let before = verdicts(pin, ifindex, &probes);
    let desired = compile_text("spec.yaml", new);
    let observed = k.observe(&scope_for(&desired.state)).unwrap();
    let p = plan::plan(&desired.state, &observed);
    assert!(p.errors.is_empty() && p.conflicts.is_empty(), "{:?} {:?}", p.errors, p.conflicts);
    let mut ops: Vec<&Op> = p.changes.iter().map(|c| &c.op).collect();
    assert!(ops.iter().all(|o| matches!(o, Op::WriteEntry { .. } | Op::DeleteEntry { .. })), "only entries change");
    if naive {
        ops.sort_by_key(|o| !matches!(o, Op::DeleteEntry { .. }));
    }
    let mut seen: Vec<Vec<u32>> = Vec::new();
    for op in ops {
        match op {
            Op::WriteEntry { map, key, value, .. } => k.write_entries(map, &[(key.clone(), value.clone())]).unwrap(),
            Op::DeleteEntry { map, key, .. } => k.delete_entries(map, std::slice::from_ref(key)).unwrap(),
            _ => unreachable!(),
        }
        seen.push(verdicts(pin, ifindex, &probes));
    }
    let after = verdicts(pin, ifindex, &probes);
    let mut third = 0;
    for v in &seen {
        for i in 0..probes.len() {
            if v[i] != before[i] && v[i] != after[i] {
                if !naive && std::env::var("BPFSYNC_DEBUG").is_ok() {
                    eprintln!("probe {i}: before {} after {} mid {}", before[i], after[i], v[i]);
                }
                third += 1;
            }
        }
    }
    // Leave the node exactly at `new` for the next round.
    let observed = k.observe(&scope_for(&desired.state)).unwrap();
    assert!(plan::plan(&desired.state, &observed).is_empty(), "the replay reached the new policy");
    third
}

#[test]
fn every_packet_gets_its_old_or_new_verdict_while_policies_change() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    let ifindex: u32 =
        std::fs::read_to_string(format!("/sys/class/net/{}/ifindex", sb.host_if)).unwrap().trim().parse().unwrap();
    let seed = std::env::var("BPFSYNC_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_1234_u64);
    let mut rng = Rng(seed);
    let mut k = env.kernel();
    let first = random_policy(&mut rng, &sb.host_if);
    apply_spec(&mut k, &first);
    let pin = {
        let dir = env.bpffs.root().join("programs/mesh");
        std::fs::read_dir(dir).unwrap().next().unwrap().unwrap().path()
    };

    let mut current = first;
    let mut naive_third = 0;
    let mut verdict_kinds = BTreeSet::new();
    for round in 0..24 {
        let next = random_policy(&mut rng, &sb.host_if);
        let third = replay(&mut k, &pin, ifindex, &current, &next, false);
        assert_eq!(
            third, 0,
            "round {round} (seed {seed:#x}): {third} third verdicts going from\n{current}\nto\n{next}"
        );
        verdict_kinds.extend(verdicts(&pin, ifindex, &probes()));
        // The same change in the naive order, back and forth.
        naive_third += replay(&mut k, &pin, ifindex, &next, &current, true);
        let _ = replay(&mut k, &pin, ifindex, &current, &next, false);
        current = next;
    }
    assert!(verdict_kinds.len() == 2, "the probes saw both pass and drop: {verdict_kinds:?}");
    assert!(
        naive_third > 0,
        "removing before adding should have produced third verdicts (the test would prove nothing)"
    );
}

//! The heal loop on the real kernel: a router R (the root namespace, where
//! the agent runs) with two links to the same destination namespace B —
//! the primary and the fallback — and a source namespace A sending UDP
//! through R's mesh datapath to a prefix B holds. Link failures are made
//! with `ip link set down`, partial loss with an nft `numgen random` drop
//! rule in B (this kernel has no netem). Probes run every 100 ms.

mod common;

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bpfsync::sandbox::TwoPaths;
use common::{Agent, Env, wait};
use serde_json::Value;

/// UDP from A to B's prefix, one datagram per millisecond, counted where
/// it arrives; stopped on drop.
struct Traffic {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Traffic {
    fn start(t: &TwoPaths) -> Traffic {
        Traffic::start_sized(t, 8)
    }

    /// UDP datagrams of `size` bytes from A to B, one a millisecond.
    fn start_sized(t: &TwoPaths, size: usize) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let (sent, received) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let dest = t.dest_ip();
        let (st, rc) = (stop.clone(), received.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let sink = TwoPaths::spawn_in(&t.b, move || {
            let s = UdpSocket::bind(SocketAddrV4::new(dest, 7000)).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
            ready_tx.send(()).unwrap();
            let mut buf = [0u8; 64];
            while !st.load(Ordering::Relaxed) {
                if s.recv(&mut buf).is_ok() {
                    rc.fetch_add(1, Ordering::Relaxed);
                }
            }
            // Drain what is still in flight.
            while s.recv(&mut buf).is_ok() {
                rc.fetch_add(1, Ordering::Relaxed);
            }
        });
        ready_rx.recv().unwrap();
        let (st, sn) = (stop.clone(), sent.clone());
        let src = t.ip(2).parse::<Ipv4Addr>().unwrap();
        let source = TwoPaths::spawn_in(&t.a, move || {
            let s = UdpSocket::bind(SocketAddrV4::new(src, 0)).unwrap();
            let mut i = 0u64;
            let mut payload = vec![0u8; size.max(8)];
            while !st.load(Ordering::Relaxed) {
                payload[..8].copy_from_slice(&i.to_be_bytes());
                if s.send_to(&payload, SocketAddrV4::new(dest, 7000)).is_ok() {
                    sn.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        Traffic { stop, sent, received, threads: vec![source, sink] }
    }

    fn counts(&self) -> (u64, u64) {
        (self.sent.load(Ordering::Relaxed), self.received.load(Ordering::Relaxed))
    }

    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.counts()
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn proposals(env: &Env) -> Vec<Value> {
    let out = env.run_ok(&["proposals", "list", "--all", "-o", "json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    v["proposals"].as_array().cloned().unwrap_or_default()
}

fn with_status<'a>(ps: &'a [Value], status: &str) -> Vec<&'a Value> {
    ps.iter().filter(|p| p["status"] == status).collect()
}

/// Waits until the agent's heal loop reports both hops answering.
fn wait_hops_healthy(agent: &Agent) {
    wait("both hops to answer probes", Duration::from_secs(20), || {
        let v: Value = serde_json::from_str(&agent.get("/proposals").1).unwrap_or(Value::Null);
        let hops = v["heal"]["hops"].as_array().cloned().unwrap_or_default();
        hops.len() == 2 && hops.iter().all(|h| h["loss"].as_f64() == Some(0.0))
    });
}

fn start_agent(env: &Env, spec: &Path) -> Agent {
    Agent::start_with(env, spec, "30s", &[])
}

#[test]
fn a_link_failure_switches_at_once_traffic_keeps_flowing_and_recovery_reverts() {
    let t = TwoPaths::create().unwrap();
    let env = Env::new();
    let rule = t.rule("primary-down", "{ metric: link-down }", "{ below: 0.05, for: 1s }", true);
    let spec_text = t.spec("", &rule);
    let spec = env.state.path().join("spec.yaml");
    std::fs::write(&spec, &spec_text).unwrap();
    let agent = start_agent(&env, &spec);
    wait_hops_healthy(&agent);
    let (rx1, rx2) = (t.rx(1), t.rx(2));
    let traffic = Traffic::start(&t);
    std::thread::sleep(Duration::from_millis(500));
    let (rx1, rx2) = (t.rx(1) - rx1, t.rx(2) - rx2);
    assert!(rx1 > 300 && rx2 < 20, "traffic runs on the primary first: {rx1} / {rx2} (probes included)");

    let failed = Instant::now();
    t.primary_down(true).unwrap();
    wait("the switch to the fallback", Duration::from_secs(5), || with_status(&proposals(&env), "applied").len() == 1);
    let detected = failed.elapsed();
    // The datapath follows once the agent reconciled the overlay.
    let before = t.rx(2);
    wait("traffic on the fallback link", Duration::from_secs(5), || t.rx(2) > before + 100);
    let switched = failed.elapsed();
    let (sent_at_switch, received_at_switch) = traffic.counts();
    std::thread::sleep(Duration::from_millis(500));
    let (sent, received) = traffic.counts();
    assert!(
        received - received_at_switch + 20 >= sent - sent_at_switch,
        "after the switch traffic flows: {} of {} arrived",
        received - received_at_switch,
        sent - sent_at_switch
    );
    eprintln!(
        "link down: proposal applied after {detected:?}, traffic on the fallback after {switched:?}, {} datagrams lost",
        sent.saturating_sub(received)
    );
    // down-after (3) × 100 ms + one interval, with room for a loaded machine.
    assert!(detected < Duration::from_millis(400) + Duration::from_secs(1), "{detected:?}");
    let p = &with_status(&proposals(&env), "applied")[0].clone();
    assert_eq!(p["source"], "rule primary-down");
    assert_eq!(p["action"]["to"]["interface"], t.h2.as_str());
    assert!(p["evidence"]["reason"].as_str().unwrap().contains("link down"), "{p}");

    // `status` shows the route on its fallback; `plan` shows the overlay.
    let status = env.run_ok(&["status"]);
    assert!(status.contains("SELF-HEALING"), "{status}");
    let plan = env.run_ok(&["plan", spec.to_str().unwrap()]);
    assert!(plan.contains("Overlay:") && plan.contains(p["id"].as_str().unwrap()), "{plan}");
    assert!(plan.contains("No changes"), "the kernel already runs the overlay: {plan}");

    // Recovery: the primary answers again for `recover.for` → back.
    t.primary_down(false).unwrap();
    wait("the revert to the primary", Duration::from_secs(10), || with_status(&proposals(&env), "reverted").len() == 1);
    let before = t.rx(1);
    wait("traffic back on the primary", Duration::from_secs(5), || t.rx(1) > before + 100);
    let (sent, received) = traffic.finish();
    eprintln!("whole run: {sent} sent, {received} received");
    assert!(agent.metric("bpfsync_route_switches_total{").is_some(), "switches are counted");
    assert_eq!(std::fs::read_to_string(&spec).unwrap(), spec_text, "the spec file is never written");
    agent.stop();
}

#[test]
fn partial_loss_switches_only_after_for_and_flapping_locks_the_route() {
    let t = TwoPaths::create().unwrap();
    let env = Env::new();
    let rule = t.rule("lossy", "{ metric: probe-loss, above: 0.2, for: 2s }", "{ below: 0.05, for: 1s }", true);
    // 50 % loss: a window of 20 probes judges it; 15 misses in a row (a
    // hard failure) are too unlikely to pre-empt the rule's `for`.
    let spec_text = t.spec("{ down-after: 15, window: 2s }", &rule);
    let spec = env.state.path().join("spec.yaml");
    std::fs::write(&spec, &spec_text).unwrap();
    let agent = start_agent(&env, &spec);
    wait_hops_healthy(&agent);

    // Three cycles of loss on until switched, off until reverted; the
    // third revert becomes a flap lock.
    let mut cycle_times = Vec::new();
    for cycle in 1..=3usize {
        let started = Instant::now();
        t.primary_loss(50).unwrap();
        wait("the switch", Duration::from_secs(20), || {
            let ps = proposals(&env);
            ps.len() == cycle && with_status(&ps, "applied").len() == 1
        });
        let took = started.elapsed();
        cycle_times.push(took);
        assert!(took >= Duration::from_secs(2), "cycle {cycle}: switched after {took:?}, before `for` (2 s)");
        t.primary_loss(0).unwrap();
        if cycle < 3 {
            wait("the revert", Duration::from_secs(30), || with_status(&proposals(&env), "reverted").len() == cycle);
        } else {
            wait("the flap lock", Duration::from_secs(30), || {
                proposals(&env).iter().any(|p| p["action"]["kind"] == "lock")
            });
        }
    }
    eprintln!("loss 50 %: switched after {cycle_times:?}");
    // The third cycle locks: the route stays on its fallback, a person decides.
    let ps = proposals(&env);
    let lock = ps.iter().find(|p| p["action"]["kind"] == "lock").unwrap();
    assert_eq!(lock["status"], "pending");
    assert_eq!(with_status(&ps, "applied").len(), 1, "the route stays on its fallback: {ps:?}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(with_status(&proposals(&env), "applied").len(), 1, "locked: no revert when the loss clears");
    assert_eq!(agent.metric("bpfsync_route_flap_locked{"), Some(1.0));

    // Rejecting the lock sends the route back and unlocks it.
    let id = lock["id"].as_str().unwrap();
    let out = env.run_ok(&["proposals", "reject", id]);
    assert!(out.contains("goes back to its primary"), "{out}");
    wait("the route back on its primary", Duration::from_secs(5), || {
        with_status(&proposals(&env), "applied").is_empty()
    });
    assert_eq!(std::fs::read_to_string(&spec).unwrap(), spec_text);
    agent.stop();
}

#[test]
fn review_mode_waits_for_a_person_survives_restarts_and_stale_proposals_are_refused() {
    let t = TwoPaths::create().unwrap();
    let env = Env::new();
    let rule = t.rule("review", "{ metric: link-down }", "{ below: 0.05, for: 1s }", false);
    let spec_text = t.spec("", &rule);
    let spec = env.state.path().join("spec.yaml");
    std::fs::write(&spec, &spec_text).unwrap();
    let agent = start_agent(&env, &spec);
    wait_hops_healthy(&agent);

    t.primary_down(true).unwrap();
    wait("a pending proposal", Duration::from_secs(5), || with_status(&proposals(&env), "pending").len() == 1);
    let p = with_status(&proposals(&env), "pending")[0].clone();
    let id = p["id"].as_str().unwrap().to_string();
    assert!(p["queued-because"].as_str().unwrap_or_default().contains("auto-apply"), "{p}");
    // Pending changes nothing: the kernel still routes over the primary.
    let plan = env.run_ok(&["plan", spec.to_str().unwrap()]);
    assert!(plan.contains("No changes") && !plan.contains("Overlay:"), "{plan}");
    let shown = env.run_ok(&["proposals", "show", &id]);
    assert!(shown.contains("Evidence: primary: link down") && shown.contains("via:"), "{shown}");
    // The plan it leads to, against the kernel now: one route entry.
    assert!(shown.contains("Plan, if approved, against the kernel now:"), "{shown}");
    assert!(shown.contains(&format!("mesh/mesh_routes[{}] will be updated in-place", t.prefix())), "{shown}");
    assert!(shown.contains("Plan: 0 to add, 1 to change, 0 to destroy."), "{shown}");
    let exported = env.run_ok(&["proposals", "export", &id]);
    assert!(exported.contains("--- a/spec.yaml") && exported.contains("\"op\": \"test\""), "{exported}");
    // `GET /proposals` is read-only; nothing else is accepted.
    let (code, body) = agent.get("/proposals");
    assert_eq!(code, 200);
    assert!(body.contains(&id));
    let (code, _) = agent.request("POST /proposals HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(code, 405);

    // Approve: the agent applies it, traffic moves to the fallback.
    env.run_ok(&["proposals", "approve", &id, "--spec", spec.to_str().unwrap()]);
    let traffic = Traffic::start(&t);
    let before = t.rx(2);
    wait("traffic on the fallback after approval", Duration::from_secs(5), || t.rx(2) > before + 100);

    // A restart with the overlay active touches nothing.
    agent.stop();
    let agent = start_agent(&env, &spec);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(agent.metric("bpfsync_reconciles_total{result=\"applied\"}"), Some(0.0), "no kernel writes");
    assert_eq!(with_status(&proposals(&env), "applied").len(), 1, "the overlay survives the restart");
    let before = t.rx(2);
    wait("traffic still on the fallback", Duration::from_secs(5), || t.rx(2) > before + 100);
    drop(traffic);

    // A spec edit that removes the route supersedes the overlay entry.
    let without_route = spec_text.split("routes:").next().unwrap().to_string();
    std::fs::write(&spec, &without_route).unwrap();
    wait("the overlay entry superseded", Duration::from_secs(10), || {
        with_status(&proposals(&env), "superseded").len() == 1
    });

    // A proposal made stale by an edit cannot be approved.
    std::fs::write(&spec, &spec_text).unwrap();
    t.primary_down(false).unwrap();
    // The restored route's hops must be seen healthy again before the
    // next failure: a fixed second was not always enough on a loaded
    // machine (a CI-like full run timed out here once).
    wait_hops_healthy(&agent);
    t.primary_down(true).unwrap();
    wait("a new pending proposal", Duration::from_secs(10), || with_status(&proposals(&env), "pending").len() == 1);
    let stale = with_status(&proposals(&env), "pending")[0]["id"].as_str().unwrap().to_string();
    let edited = spec_text.replace(&t.ip(10), &t.ip(11)); // a different fallback neighbour
    std::fs::write(&spec, &edited).unwrap();
    let out = env.run(&["proposals", "approve", &stale, "--spec", spec.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = common::stderr(&out);
    assert!(err.contains("stale") && err.contains("`test` failed"), "{err}");
    let p = proposals(&env).into_iter().find(|p| p["id"] == stale.as_str()).unwrap();
    assert_eq!(p["status"], "superseded", "a refused stale proposal is superseded: {p}");

    // Reject: recorded, nothing changes.
    std::fs::write(&spec, &spec_text).unwrap();
    let next_pending = |env: &Env, seen: usize| {
        wait("a new pending proposal", Duration::from_secs(10), || with_status(&proposals(env), "pending").len() == 1);
        let ps = proposals(env);
        assert_eq!(ps.len(), seen + 1, "{ps:?}");
        with_status(&ps, "pending")[0]["id"].as_str().unwrap().to_string()
    };
    let rejected = next_pending(&env, 2);
    let out = env.run_ok(&["proposals", "reject", &rejected, "--note", "not now"]);
    assert!(out.contains("nothing changes"), "{out}");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(proposals(&env).len(), 3, "the same condition is not asked about again after a rejection");
    let shown = env.run_ok(&["proposals", "show", &rejected]);
    assert!(shown.contains("rejected") && shown.contains("not now"), "{shown}");
    assert!(with_status(&proposals(&env), "applied").is_empty());
    let listed = env.run_ok(&["proposals", "list"]);
    assert!(!listed.contains(&rejected), "final ones only with --all: {listed}");
    assert!(env.run_ok(&["proposals", "list", "--all"]).contains(&rejected));

    // Approve, then revert by hand: the route goes back to its primary.
    t.primary_down(false).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    t.primary_down(true).unwrap();
    let approved = next_pending(&env, 3);
    env.run_ok(&["proposals", "approve", &approved]);
    wait("the overlay applied", Duration::from_secs(5), || with_status(&proposals(&env), "applied").len() == 1);
    t.primary_down(false).unwrap();
    let out = env.run_ok(&["proposals", "revert", &approved, "--note", "primary is fine"]);
    assert!(out.contains("goes back to its primary"), "{out}");
    let plan = env.run_ok(&["plan", spec.to_str().unwrap()]);
    assert!(!plan.contains("Overlay:"), "{plan}");
    let history = std::fs::read_to_string(env.state.path().join("heal/history.jsonl")).unwrap();
    assert!(history.lines().count() >= 10, "every transition is logged: {history}");
    assert!(history.contains("primary is fine"));
    assert_eq!(std::fs::read_to_string(&spec).unwrap(), spec_text);
    agent.stop();
}

#[test]
fn clean_probes_and_a_route_without_traffic_make_no_switch_and_no_proposal() {
    let t = TwoPaths::create().unwrap();
    let env = Env::new();
    // One route with a rule, and (the same route's hops) the baseline
    // detector for a rule-less one would also run: none may fire.
    let rule = t.rule("clean", "{ metric: probe-loss, above: 0.2, for: 1s }", "{ below: 0.05, for: 1s }", true);
    let spec = env.state.path().join("spec.yaml");
    std::fs::write(&spec, t.spec("", &rule)).unwrap();
    let agent = start_agent(&env, &spec);
    wait_hops_healthy(&agent);
    std::thread::sleep(Duration::from_secs(8));
    assert!(proposals(&env).is_empty(), "{:?}", proposals(&env));
    let answered = agent.metric("bpfsync_probes_total{").unwrap_or(0.0);
    assert!(answered > 50.0, "probes ran: {answered}");
    agent.stop();
}

#[test]
fn a_redirect_to_an_interface_that_is_down_is_counted_for_its_route() {
    let t = TwoPaths::create().unwrap();
    let env = Env::new();
    let spec = env.state.path().join("spec.yaml");
    std::fs::write(&spec, t.spec("", "")).unwrap();
    env.run_ok(&["apply", spec.to_str().unwrap(), "--auto-approve"]);
    let failed = |env: &Env| -> u64 {
        let v: Value = serde_json::from_str(&env.run_ok(&["status", "-o", "json"])).unwrap();
        v["mesh"]["redirect_errors"][t.prefix()]["packets"].as_u64().unwrap_or(0)
    };
    let traffic = Traffic::start(&t);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(failed(&env), 0, "redirects to an interface that is up succeed");
    // R's own end of the primary link administratively down: the kernel
    // refuses the redirect after the program returned.
    std::process::Command::new("ip").args(["link", "set", &t.h1, "down"]).status().unwrap();
    wait("failed redirects counted for the route", Duration::from_secs(5), || failed(&env) > 100);
    let (sent, received) = traffic.finish();
    assert!(received < sent, "those packets were lost: {received} of {sent}");
    let status = env.run_ok(&["status"]);
    assert!(status.contains("failed redirects"), "{status}");
    env.run_ok(&["down", "--auto-approve"]);
}

#[test]
fn a_path_that_answers_probes_but_fails_the_routes_packets_is_left_on_drop_rate() {
    let t = TwoPaths::create().unwrap();
    let env = Env::new();
    let rule = t.rule("delivery", "{ metric: drop-rate, above: 0.5, for: 1s }", "{ below: 0.05, for: 60s }", true);
    let spec = env.state.path().join("spec.yaml");
    std::fs::write(&spec, t.spec("", &rule)).unwrap();
    let agent = start_agent(&env, &spec);
    wait_hops_healthy(&agent);
    let traffic = Traffic::start_sized(&t, 1200);
    let before = t.rx(1);
    wait("traffic on the primary", Duration::from_secs(5), || t.rx(1) > before + 300);
    std::thread::sleep(Duration::from_secs(2));
    assert!(with_status(&proposals(&env), "applied").is_empty(), "a path that delivers is kept");

    // R's end of the primary link now takes frames of 1,000 bytes at most:
    // the probes (small) still pass both ways, the route's 1,242-byte
    // frames cannot be redirected there. Only the datapath sees it.
    let mtu = |m: &str| std::process::Command::new("ip").args(["link", "set", &t.h1, "mtu", m]).status().unwrap();
    assert!(mtu("1000").success());
    wait("the switch on drop-rate", Duration::from_secs(10), || with_status(&proposals(&env), "applied").len() == 1);
    let p = with_status(&proposals(&env), "applied")[0].clone();
    let reason = p["evidence"]["reason"].as_str().unwrap();
    assert!(reason.contains("the datapath failed to deliver"), "{p}");
    assert_eq!(p["evidence"]["hops"][0]["loss"].as_f64(), Some(0.0), "the probes saw nothing: {p}");
    let before = t.rx(2);
    wait("traffic on the fallback link", Duration::from_secs(5), || t.rx(2) > before + 300);
    let (sent, received) = traffic.finish();
    assert!(received > 0 && received < sent, "{received} of {sent}");
    assert!(mtu("1500").success());
    agent.stop();
}

#[test]
fn a_neighbour_that_stops_answering_fails_its_hop_through_rtnetlink() {
    let t = TwoPaths::create().unwrap();
    let env = Env::new();
    // Misses alone would take 1,000 probes: only the neighbour table's
    // FAILED state (an rtnetlink event) can make this switch.
    let rule = t.rule("neigh", "{ metric: neighbor-unreachable }", "{ below: 0.05, for: 1s }", true);
    let spec = env.state.path().join("spec.yaml");
    std::fs::write(&spec, t.spec("{ down-after: 1000 }", &rule)).unwrap();
    // Fast neighbour aging on R's end of the primary, so FAILED comes in
    // about a second instead of a minute.
    for (k, v) in [("base_reachable_time_ms", "300"), ("delay_first_probe_time", "0"), ("retrans_time_ms", "100")] {
        let set = format!("net.ipv4.neigh.{}.{k}={v}", t.h1);
        assert!(std::process::Command::new("sysctl").args(["-qw", &set]).status().unwrap().success());
    }
    let agent = start_agent(&env, &spec);
    wait_hops_healthy(&agent);
    // B forgets the primary neighbour's address: ARP goes unanswered.
    let gone = format!("{}/30", t.ip(6));
    let ok = std::process::Command::new("ip").args(["-n", &t.b, "addr", "del", &gone, "dev", "b1"]).status().unwrap();
    assert!(ok.success());
    wait("the switch on neighbour FAILED", Duration::from_secs(20), || {
        with_status(&proposals(&env), "applied").len() == 1
    });
    let p = with_status(&proposals(&env), "applied")[0].clone();
    assert!(p["evidence"]["reason"].as_str().unwrap().contains("neighbour unreachable"), "{p}");
    agent.stop();
}

//! The heal loop on the real kernel: a router R (the root namespace, where
//! the agent runs) with two links to the same destination namespace B —
//! the primary and the fallback — and a source namespace A sending UDP
//! through R's mesh datapath to a prefix B holds. Link failures are made
//! with `ip link set down`, partial loss with an nft `numgen random` drop
//! rule in B (this kernel has no netem). Probes run every 100 ms.

mod common;

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Agent, Env, wait};
use serde_json::Value;

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "`{}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

fn sh_quiet(args: &[&str]) {
    let _ = Command::new(args[0]).args(&args[1..]).output();
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A — R — B with two links R–B. Removed on drop.
struct Topology {
    a: String,
    b: String,
    /// R's ends: towards A, the primary link, the fallback link.
    ha: String,
    h1: String,
    h2: String,
    /// B's ends of the two links.
    b1_mac: String,
    b2_mac: String,
    net: [u8; 2],
    /// The destination prefix B holds (`.1` on its loopback).
    dest: [u8; 3],
}

impl Topology {
    fn new() -> Topology {
        let pid = std::process::id();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}{n}", pid % 10_000);
        let net = [200 + (pid % 50) as u8, (n * 16 % 256) as u8];
        let t = Topology {
            a: format!("bhA{tag}"),
            b: format!("bhB{tag}"),
            ha: format!("hA{tag}"),
            h1: format!("h1x{tag}"),
            h2: format!("h2x{tag}"),
            b1_mac: String::new(),
            b2_mac: String::new(),
            net,
            dest: [172, 16 + (pid % 16) as u8, n as u8],
        };
        t.setup()
    }

    fn ip(&self, last: u8) -> String {
        format!("10.{}.{}.{last}", self.net[0], self.net[1])
    }

    fn dest_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.dest[0], self.dest[1], self.dest[2], 1)
    }

    fn prefix(&self) -> String {
        format!("{}.{}.{}.0/24", self.dest[0], self.dest[1], self.dest[2])
    }

    fn setup(mut self) -> Topology {
        let (a, b) = (self.a.clone(), self.b.clone());
        sh(&["ip", "netns", "add", &a]);
        sh(&["ip", "netns", "add", &b]);
        for (host, peer, ns, host_ip, peer_ip) in [
            (&self.ha, "pa", &a, self.ip(1), self.ip(2)),
            (&self.h1, "b1", &b, self.ip(5), self.ip(6)),
            (&self.h2, "b2", &b, self.ip(9), self.ip(10)),
        ] {
            sh(&["ip", "link", "add", host, "type", "veth", "peer", "name", peer, "netns", ns]);
            sh(&["sysctl", "-qw", &format!("net.ipv6.conf.{host}.disable_ipv6=1")]);
            sh(&["ip", "netns", "exec", ns, "sysctl", "-qw", &format!("net.ipv6.conf.{peer}.disable_ipv6=1")]);
            sh(&["ip", "addr", "add", &format!("{host_ip}/30"), "dev", host]);
            sh(&["ip", "link", "set", host, "up"]);
            sh(&["ip", "-n", ns, "addr", "add", &format!("{peer_ip}/30"), "dev", peer]);
            sh(&["ip", "-n", ns, "link", "set", peer, "up"]);
        }
        sh(&["ip", "-n", &a, "link", "set", "lo", "up"]);
        sh(&["ip", "-n", &b, "link", "set", "lo", "up"]);
        sh(&["ip", "-n", &a, "route", "add", &self.prefix(), "via", &self.ip(1)]);
        sh(&["ip", "-n", &b, "addr", "add", &format!("{}/32", self.dest_ip()), "dev", "lo"]);
        // Traffic from A arrives on either link: no reverse-path filter.
        for k in ["all", "default", "b1", "b2"] {
            sh(&["ip", "netns", "exec", &b, "sysctl", "-qw", &format!("net.ipv4.conf.{k}.rp_filter=0")]);
        }
        self.b1_mac = mac(&b, "b1");
        self.b2_mac = mac(&b, "b2");
        for h in [&self.ha, &self.h1, &self.h2] {
            wait("links up", Duration::from_secs(5), || {
                std::fs::read_to_string(format!("/sys/class/net/{h}/operstate")).unwrap_or_default().trim() == "up"
            });
        }
        self
    }

    /// The spec: the mesh datapath on R's three ends, the route with its
    /// fallback, probes every 100 ms (the route's own `health` overrides
    /// when not empty), and `rules` (YAML list items under `fallback:`).
    fn spec(&self, route_health: &str, rules: &str) -> String {
        let (p, ha, h1, h2) = (self.prefix(), &self.ha, &self.h1, &self.h2);
        let (n1, n2) = (self.ip(6), self.ip(10));
        let (m1, m2) = (&self.b1_mac, &self.b2_mac);
        let mut s = format!(
            "apiVersion: bpfsync/v1\nkind: NodeSpec\n\
interfaces:\n  - {{ name: {ha}, mesh: {{ mode: skb }} }}\n  - {{ name: {h1}, mesh: {{ mode: skb }} }}\n  - {{ name: {h2}, mesh: {{ mode: skb }} }}\n\
health: {{ probe-interval: 100ms, probe-timeout: 80ms, down-after: 3, window: 1s, min-samples: 5 }}\n\
routes:\n  - prefix: {p}\n    via: {{ interface: {h1}, neighbor: {n1}, mac: \"{m1}\" }}\n    fallback:\n      - {{ interface: {h2}, neighbor: {n2}, mac: \"{m2}\" }}\n"
        );
        if !route_health.is_empty() {
            s.push_str(&format!("    health: {route_health}\n"));
        }
        if !rules.is_empty() {
            s.push_str("fallback:\n");
            s.push_str(rules);
        }
        s
    }

    fn rule(&self, name: &str, when: &str, recover: &str, auto: bool) -> String {
        format!(
            "  - name: {name}\n    route: {}\n    when: {when}\n    recover: {recover}\n    auto-apply: {auto}\n",
            self.prefix()
        )
    }

    fn primary_down(&self, down: bool) {
        sh(&["ip", "-n", &self.b, "link", "set", "b1", if down { "down" } else { "up" }]);
    }

    /// Drops `percent` % of what arrives on B's end of the primary link.
    fn primary_loss(&self, percent: u32) {
        sh_quiet(&["ip", "netns", "exec", &self.b, "nft", "delete", "table", "ip", "bpfsync_loss"]);
        if percent > 0 {
            let nft = |cmd: &str| sh(&["ip", "netns", "exec", &self.b, "nft", cmd]);
            nft("add table ip bpfsync_loss");
            nft("add chain ip bpfsync_loss pre { type filter hook prerouting priority -300; }");
            nft(&format!("add rule ip bpfsync_loss pre iifname \"b1\" numgen random mod 100 < {percent} drop"));
        }
    }

    /// Packets B received on its end of link 1 or 2 so far.
    fn rx(&self, link: u8) -> u64 {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.b, "cat", &format!("/sys/class/net/b{link}/statistics/rx_packets")])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for h in [&self.ha, &self.h1, &self.h2] {
            sh_quiet(&["ip", "link", "del", h]);
        }
        sh_quiet(&["ip", "netns", "del", &self.a]);
        sh_quiet(&["ip", "netns", "del", &self.b]);
    }
}

fn mac(ns: &str, dev: &str) -> String {
    let out = Command::new("ip").args(["-n", ns, "-j", "link", "show", "dev", dev]).output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v[0]["address"].as_str().unwrap().to_string()
}

/// UDP from A to B's prefix, one datagram per millisecond, counted where
/// it arrives; stopped on drop.
struct Traffic {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

fn in_netns(ns: &str, f: impl FnOnce() + Send + 'static) -> std::thread::JoinHandle<()> {
    let path = PathBuf::from("/var/run/netns").join(ns);
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let f0 = std::fs::File::open(&path).unwrap();
        assert_eq!(unsafe { libc::setns(f0.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        f()
    })
}

impl Traffic {
    fn start(t: &Topology) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let (sent, received) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let dest = t.dest_ip();
        let (st, rc) = (stop.clone(), received.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let sink = in_netns(&t.b, move || {
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
        let source = in_netns(&t.a, move || {
            let s = UdpSocket::bind(SocketAddrV4::new(src, 0)).unwrap();
            let mut i = 0u64;
            while !st.load(Ordering::Relaxed) {
                if s.send_to(&i.to_be_bytes(), SocketAddrV4::new(dest, 7000)).is_ok() {
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
    let t = Topology::new();
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
    t.primary_down(true);
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
    t.primary_down(false);
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
    let t = Topology::new();
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
        t.primary_loss(50);
        wait("the switch", Duration::from_secs(20), || {
            let ps = proposals(&env);
            ps.len() == cycle && with_status(&ps, "applied").len() == 1
        });
        let took = started.elapsed();
        cycle_times.push(took);
        assert!(took >= Duration::from_secs(2), "cycle {cycle}: switched after {took:?}, before `for` (2 s)");
        t.primary_loss(0);
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
    let t = Topology::new();
    let env = Env::new();
    let rule = t.rule("review", "{ metric: link-down }", "{ below: 0.05, for: 1s }", false);
    let spec_text = t.spec("", &rule);
    let spec = env.state.path().join("spec.yaml");
    std::fs::write(&spec, &spec_text).unwrap();
    let agent = start_agent(&env, &spec);
    wait_hops_healthy(&agent);

    t.primary_down(true);
    wait("a pending proposal", Duration::from_secs(5), || with_status(&proposals(&env), "pending").len() == 1);
    let p = with_status(&proposals(&env), "pending")[0].clone();
    let id = p["id"].as_str().unwrap().to_string();
    assert!(p["queued-because"].as_str().unwrap_or_default().contains("auto-apply"), "{p}");
    // Pending changes nothing: the kernel still routes over the primary.
    let plan = env.run_ok(&["plan", spec.to_str().unwrap()]);
    assert!(plan.contains("No changes") && !plan.contains("Overlay:"), "{plan}");
    let shown = env.run_ok(&["proposals", "show", &id]);
    assert!(shown.contains("Evidence: primary: link down") && shown.contains("via:"), "{shown}");
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
    t.primary_down(false);
    std::thread::sleep(Duration::from_secs(1));
    t.primary_down(true);
    wait("a new pending proposal", Duration::from_secs(10), || with_status(&proposals(&env), "pending").len() == 1);
    let stale = with_status(&proposals(&env), "pending")[0]["id"].as_str().unwrap().to_string();
    let edited = spec_text.replace(&t.ip(10), &t.ip(11)); // a different fallback neighbour
    std::fs::write(&spec, &edited).unwrap();
    let out = env.run(&["proposals", "approve", &stale, "--spec", spec.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = common::stderr(&out);
    assert!(err.contains("stale") && err.contains("`test` failed"), "{err}");
    // Reject works on pending ones; the node is untouched.
    std::fs::write(&spec, &spec_text).unwrap();
    t.primary_down(false);
    agent.stop();
}

#[test]
fn clean_probes_and_a_route_without_traffic_make_no_switch_and_no_proposal() {
    let t = Topology::new();
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

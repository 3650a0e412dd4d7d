//! Heal loop benchmarks (root; real kernel except where said):
//! - time to detect and time to switch over 20 link failures and 20 loss
//!   injections (A — R — B with two links, the agent binary on R, UDP at
//!   1,000 datagrams a second; probes every 100 ms);
//! - false switches and proposals per hour on clean, noisy probe series,
//!   replayed at compressed time through the controller (controlled clock);
//! - CPU and memory of probing 1,000 hops at 1 s (the runner in-process,
//!   in namespaces of its own).
//!
//!     cargo bench --bench heal [-- failover noise probing]

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bpfsync::heal::controller::{Command as HealCommand, Controller, ProbeSettings, WatchedRoute, view};
use bpfsync::heal::health::HopHealth;
use bpfsync::heal::proposal::{HopId, Proposal, Status};
use bpfsync::heal::runner::{HealSnapshot, Observer, RoutesCell, Runner};
use bpfsync::heal::store::Store;
use bpfsync::sandbox::{TempBpffs, TempDir, TwoPaths};
use bpfsync::spec::{NextHopSpec, RouteSpec};

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "`{}`: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

fn start_agent(bpffs: &TempBpffs, state: &TempDir, spec: &std::path::Path) -> Child {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    Command::new(env!("CARGO_BIN_EXE_bpfsync"))
        .args(["--bpffs-root", bpffs.root().to_str().unwrap(), "--state-dir", state.path().to_str().unwrap()])
        .args(["agent", "--spec", spec.to_str().unwrap(), "--resync", "30s", "--debounce", "50ms"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("BPFSYNC_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn applied(store: &Store) -> bool {
    store.list().map(|l| l.proposals.iter().any(|p| p.status == Status::Applied)).unwrap_or(false)
}

/// A UDP sink in B bound to one link's device: when its last datagram came.
fn sink(t: &TwoPaths, dev: &'static str, stop: Arc<AtomicBool>, last: Arc<AtomicU64>, origin: Instant) {
    let dest = t.dest_ip();
    let (tx, rx) = std::sync::mpsc::channel();
    TwoPaths::spawn_in(&t.b, move || {
        let s = socket2_like_bind(dest, dev);
        tx.send(()).unwrap();
        let mut buf = [0u8; 64];
        while !stop.load(Ordering::Relaxed) {
            if s.recv(&mut buf).is_ok() {
                last.store(origin.elapsed().as_nanos() as u64, Ordering::Relaxed);
            }
        }
    });
    rx.recv().unwrap();
}

/// A UDP socket on `dest:7000` that only hears `dev` (two may share the port).
fn socket2_like_bind(dest: Ipv4Addr, dev: &str) -> UdpSocket {
    // SAFETY: plain socket(2), owned by the UdpSocket right after.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0);
    let s: UdpSocket = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    unsafe {
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, &one as *const _ as *const _, 4);
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_BINDTODEVICE, dev.as_ptr() as *const _, dev.len() as u32);
        let mut sin: libc::sockaddr_in = std::mem::zeroed();
        sin.sin_family = libc::AF_INET as u16;
        sin.sin_port = 7000u16.to_be();
        sin.sin_addr.s_addr = u32::from_ne_bytes(dest.octets());
        assert_eq!(libc::bind(fd, &sin as *const _ as *const _, std::mem::size_of::<libc::sockaddr_in>() as u32), 0);
    }
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    s
}

/// Link failures or loss injections: (time to detect, time to switch).
fn failovers(loss: bool, runs: usize) -> (Vec<Duration>, Vec<Duration>, u64) {
    let t = TwoPaths::create().unwrap();
    let bpffs = TempBpffs::create().unwrap();
    let state = TempDir::create("bpfsync-bench-heal").unwrap();
    let spec = state.path().join("spec.yaml");
    let text = if loss {
        let rule = t.rule("lossy", "{ metric: probe-loss, above: 0.2, for: 1s }", "{ below: 0.05, for: 1s }", true);
        t.spec("{ down-after: 15, window: 2s }", &rule)
    } else {
        t.spec("", &t.rule("down", "{ metric: link-down }", "{ below: 0.05, for: 1s }", true))
    };
    std::fs::write(&spec, text).unwrap();
    let origin = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let (last1, last2) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    sink(&t, "b1", stop.clone(), last1.clone(), origin);
    sink(&t, "b2", stop.clone(), last2.clone(), origin);
    let (sent, st) = (Arc::new(AtomicU64::new(0)), stop.clone());
    let (src, dest, sent2) = (t.ip(2).parse::<Ipv4Addr>().unwrap(), t.dest_ip(), sent.clone());
    TwoPaths::spawn_in(&t.a, move || {
        let s = UdpSocket::bind(SocketAddrV4::new(src, 0)).unwrap();
        while !st.load(Ordering::Relaxed) {
            if s.send_to(b"x", SocketAddrV4::new(dest, 7000)).is_ok() {
                sent2.fetch_add(1, Ordering::Relaxed);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    let store = Store::new(state.path());
    let (mut detect, mut switch) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        // A fresh heal state each run: no doubling hold, no flap lock.
        let _ = std::fs::remove_dir_all(state.path().join("heal"));
        let mut agent = start_agent(&bpffs, &state, &spec);
        let now_ns = || origin.elapsed().as_nanos() as u64;
        wait_for("traffic on the primary", Duration::from_secs(20), || {
            now_ns() - last1.load(Ordering::Relaxed) < 5_000_000
        });
        std::thread::sleep(Duration::from_millis(if loss { 2500 } else { 1200 })); // windows full of clean probes
        let t0 = Instant::now();
        let t0_ns = now_ns();
        if loss {
            t.primary_loss(50).unwrap();
        } else {
            t.primary_down(true).unwrap();
        }
        wait_for("the switch", Duration::from_secs(20), || applied(&store));
        detect.push(t0.elapsed());
        wait_for("traffic on the fallback", Duration::from_secs(10), || last2.load(Ordering::Relaxed) > t0_ns);
        switch.push(Duration::from_nanos(last2.load(Ordering::Relaxed) - t0_ns));
        if loss {
            t.primary_loss(0).unwrap();
        } else {
            t.primary_down(false).unwrap();
        }
        unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
        let _ = agent.wait();
    }
    stop.store(true, Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(100));
    detect.sort();
    switch.sort();
    (detect, switch, sent.load(Ordering::Relaxed))
}

/// A deterministic noise source (xorshift64*).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn route(n: u32, with_rule: bool) -> WatchedRoute {
    let hop = |i: String, a: String| NextHopSpec { interface: i, neighbor: a, mac: None };
    let settings = ProbeSettings {
        interval: Duration::from_secs(1),
        timeout: Duration::from_millis(500),
        down_after: 3,
        window: Duration::from_secs(10),
        min_samples: 5,
    };
    let rule = with_rule.then(|| bpfsync::heal::controller::BoundRule {
        name: format!("r{n}"),
        metric: bpfsync::spec::FallbackMetric::ProbeLoss,
        rule: bpfsync::heal::detector::Rule {
            metric: bpfsync::heal::detector::Metric::Loss,
            above: 0.2,
            trigger_for: Duration::from_secs(30),
            below: 0.05,
            recover_for: Duration::from_secs(60),
            down_after: 3,
            window: Duration::from_secs(10),
            min_samples: 5,
        },
        auto_apply: true,
    });
    WatchedRoute {
        index: n as usize,
        route: RouteSpec {
            prefix: format!("10.{}.{}.0/24", n / 256, n % 256),
            via: hop(format!("p{n}"), format!("10.0.{}.{}", n / 256, n % 256)),
            fallback: vec![hop(format!("f{n}"), format!("10.1.{}.{}", n / 256, n % 256))],
            health: None,
        },
        settings,
        rule,
    }
}

/// Clean probes with noise: RTT 1–3 ms with a long tail (1 in 500 probes
/// ten times slower) and `loss` independent loss. Replayed at compressed
/// time through the controller: switches and review proposals, by reason.
fn false_positives(
    routes: u32,
    hours: u32,
    loss: f64,
) -> (usize, usize, std::collections::BTreeMap<String, usize>, f64) {
    let mut c = Controller::default();
    let watched: Vec<WatchedRoute> = (0..routes).map(|n| route(n, n % 2 == 0)).collect();
    c.set_routes(watched, &Default::default());
    let mut health: std::collections::HashMap<HopId, HopHealth> = Default::default();
    let hops: Vec<HopId> = c.hops().iter().map(|(h, _)| h.clone()).collect();
    // Every hop has news every second: the routes are evaluated as the
    // agent evaluates them (on news, not in full passes).
    let all: Vec<usize> = (0..hops.len()).collect();
    let mut rng = Rng(0x5eed);
    let mut store: Vec<Proposal> = Vec::new();
    let (mut switches, mut proposals) = (0, 0);
    let mut reasons = std::collections::BTreeMap::new();
    let started = Instant::now();
    for t in 1..=(hours * 3600) {
        let now = Duration::from_secs(t as u64);
        for h in &hops {
            let r = if rng.unit() < loss {
                None
            } else {
                let base = 1.0 + 2.0 * rng.unit();
                let ms = if rng.unit() < 0.002 { base * 10.0 } else { base };
                Some(Duration::from_secs_f64(ms / 1e3))
            };
            health.entry(h.clone()).or_default().record_probe(now, r);
        }
        for cmd in c.tick(now, now.as_millis() as u64, &health, &view(&store), Some(&all)) {
            if let HealCommand::Create(mut p) = cmd {
                if p.status == Status::Applied {
                    switches += 1;
                } else {
                    proposals += 1;
                }
                let reason: String =
                    p.evidence.reason.split(" against").next().unwrap_or("").chars().take(48).collect();
                *reasons.entry(format!("{} ({})", reason, p.source)).or_insert(0) += 1;
                // As a person would: decided at once, so the next finding
                // can be made.
                let to = if p.status == Status::Applied { Status::Reverted } else { Status::Rejected };
                p.transition(to, "bench", 0, "").unwrap();
                store.push(*p);
            }
        }
    }
    (switches, proposals, reasons, started.elapsed().as_secs_f64())
}

struct Counting {
    answered: Arc<AtomicU64>,
    lost: Arc<AtomicU64>,
    snapshot: Arc<Mutex<HealSnapshot>>,
}

impl Observer for Counting {
    fn probe(&self, _: &HopId, rtt: Option<Duration>) {
        let c = if rtt.is_some() { &self.answered } else { &self.lost };
        c.fetch_add(1, Ordering::Relaxed);
    }
    fn event(&self, _: &str, _: &str, _: &str) {}
    fn snapshot(&self, s: HealSnapshot) {
        *self.snapshot.lock().unwrap() = s;
    }
    fn overlay_changed(&self) {}
}

/// User and system CPU time of this process.
fn rusage_cpu() -> (Duration, Duration) {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    (tv(u.ru_utime), tv(u.ru_stime))
}

/// Runs this thread (and the threads it starts) on one CPU.
fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:").map(|v| v.trim().trim_end_matches(" kB").parse().unwrap()))
        .unwrap()
}

/// 500 routes × (primary + fallback) = 1,000 hops behind two links, every
/// neighbour a real address answering in namespace Q.
fn probing_cost(seconds: u64) {
    let tag = std::process::id() % 10_000;
    let (p, q) = (format!("bhP{tag}"), format!("bhQ{tag}"));
    /// Deletes the namespaces however the bench ends.
    struct Netns(Vec<String>);
    impl Drop for Netns {
        fn drop(&mut self) {
            for n in &self.0 {
                let _ = Command::new("ip").args(["netns", "del", n]).output();
            }
        }
    }
    drop(Netns(vec![p.clone(), q.clone()])); // a run killed earlier
    let _netns = Netns(vec![p.clone(), q.clone()]);
    sh(&["ip", "netns", "add", &p]);
    sh(&["ip", "netns", "add", &q]);
    for (i, (pe, qe)) in [("l1", "m1"), ("l2", "m2")].iter().enumerate() {
        sh(&["ip", "-n", &p, "link", "add", pe, "type", "veth", "peer", "name", qe, "netns", &q]);
        sh(&["ip", "-n", &p, "addr", "add", &format!("10.{}.255.254/16", 60 + i), "dev", pe]);
        sh(&["ip", "-n", &p, "link", "set", pe, "up"]);
        sh(&["ip", "-n", &q, "link", "set", qe, "up"]);
        let mut batch = String::new();
        for n in 0..500u32 {
            batch.push_str(&format!("addr add 10.{}.{}.{}/32 dev {qe}\n", 60 + i, n / 250, n % 250 + 1));
        }
        // Q answers from its /32s; its replies go back over the same link.
        batch.push_str(&format!("route add 10.{}.0.0/16 dev {qe}\n", 60 + i));
        let mut child = Command::new("ip").args(["-n", &q, "-batch", "-"]).stdin(Stdio::piped()).spawn().unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(batch.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success());
    }
    // 1,000 neighbours: past the default garbage-collection thresholds,
    // which this kernel keeps for all namespaces at once; restored after.
    let thresholds: Vec<(String, String)> = ["gc_thresh1", "gc_thresh2", "gc_thresh3"]
        .iter()
        .map(|k| {
            let path = format!("/proc/sys/net/ipv4/neigh/default/{k}");
            let old = std::fs::read_to_string(&path).unwrap().trim().to_string();
            (path, old)
        })
        .collect();
    for ((path, _), v) in thresholds.iter().zip(["2048", "4096", "8192"]) {
        std::fs::write(path, v).unwrap();
    }
    let hop = |i: usize, n: u32| NextHopSpec {
        interface: format!("l{}", i + 1),
        neighbor: format!("10.{}.{}.{}", 60 + i, n / 250, n % 250 + 1),
        mac: None,
    };
    let routes: Vec<WatchedRoute> = (0..500u32)
        .map(|n| WatchedRoute {
            index: n as usize,
            route: RouteSpec {
                prefix: format!("10.200.{}.{}/32", n / 250, n % 250),
                via: hop(0, n),
                fallback: vec![hop(1, n)],
                health: None,
            },
            settings: ProbeSettings {
                interval: Duration::from_secs(1),
                timeout: Duration::from_millis(500),
                down_after: 3,
                window: Duration::from_secs(10),
                min_samples: 5,
            },
            rule: None,
        })
        .collect();
    let state = TempDir::create("bpfsync-bench-probe").unwrap();
    let cell = Arc::new(RoutesCell::default());
    cell.set(routes);
    let (answered, lost) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let snapshot = Arc::new(Mutex::new(HealSnapshot::default()));
    let observer = Counting { answered: answered.clone(), lost: lost.clone(), snapshot: snapshot.clone() };
    let stop = Arc::new(AtomicBool::new(false));
    let rss_before = rss_kib();
    let (ns, st, dir) = (format!("/var/run/netns/{p}"), stop.clone(), state.path().to_path_buf());
    // The far end answers on the other CPU: Q's ends steer received
    // packets there (RPS), and the whole bench process runs on CPU 0 — so
    // the kernel time measured is ours (sending, receiving), not the echo
    // replies veth would otherwise run in the sender's context.
    pin_to_cpu(0);
    for i in 1..=2 {
        sh(&["ip", "netns", "exec", &q, "sh", "-c", &format!("echo 2 > /sys/class/net/m{i}/queues/rx-0/rps_cpus")]);
        sh(&["ip", "netns", "exec", &p, "sh", "-c", &format!("echo 2 > /sys/class/net/l{i}/queues/rx-0/rps_cpus")]);
    }
    let runner = std::thread::spawn(move || {
        let f = std::fs::File::open(ns).unwrap();
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        Runner::new(&dir, cell, Box::new(observer)).run(st);
    });
    std::thread::sleep(Duration::from_secs(5)); // ARP resolved, windows filling
    let (cpu0, wall0, a0, l0) =
        (rusage_cpu(), Instant::now(), answered.load(Ordering::Relaxed), lost.load(Ordering::Relaxed));
    std::thread::sleep(Duration::from_secs(seconds));
    let (cpu1, wall) = (rusage_cpu(), wall0.elapsed());
    let (user, sys) = (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1);
    let (a, l) = (answered.load(Ordering::Relaxed) - a0, lost.load(Ordering::Relaxed) - l0);
    let rss_after = rss_kib();
    stop.store(true, Ordering::Relaxed);
    runner.join().unwrap();
    let hops = snapshot.lock().unwrap().hops.len();
    println!(
        "probing {hops} hops at 1 s for {:.0} s: {a} answered, {l} lost; CPU {:.2} % of a core ({:.2} % user, {:.2} % system; the far end answers on the other CPU); RSS +{} KiB",
        wall.as_secs_f64(),
        (user + sys).as_secs_f64() / wall.as_secs_f64() * 100.0,
        user.as_secs_f64() / wall.as_secs_f64() * 100.0,
        sys.as_secs_f64() / wall.as_secs_f64() * 100.0,
        rss_after.saturating_sub(rss_before)
    );
    for (path, old) in &thresholds {
        let _ = std::fs::write(path, old);
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` lists benches; nothing to list
    }
    // `cargo bench --bench heal -- noise probing` runs only those parts.
    let parts: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let run = |part: &str| parts.is_empty() || parts.iter().any(|p| p == part);
    if run("failover") {
        failover_figures();
    }
    if run("noise") {
        noise_figures();
    }
    if run("probing") {
        println!("== the cost of probing ==");
        probing_cost(30);
    }
}

fn failover_figures() {
    println!("== time to detect / time to switch (probes every 100 ms, down-after 3) ==");
    for (name, loss, runs) in [("link down", false, 20), ("50 % loss, rule above 0.2 for 1 s", true, 20)] {
        let (detect, switch, sent) = failovers(loss, runs);
        println!(
            "{name:<36} over {runs}: detect p50 {} p99 {}; traffic on the fallback p50 {} p99 {} ({sent} datagrams sent)",
            ms(percentile(&detect, 0.5)),
            ms(percentile(&detect, 0.99)),
            ms(percentile(&switch, 0.5)),
            ms(percentile(&switch, 0.99)),
        );
    }
}

fn noise_figures() {
    println!("== false positives on clean, noisy probes (controlled clock) ==");
    let (routes, hours) = (100, 24);
    for loss in [0.001, 0.005] {
        let (switches, proposals, reasons, took) = false_positives(routes, hours, loss);
        println!(
            "{routes} routes × {hours} h at {:.1} % loss (half with a rule, half baseline only): {switches} switches ({:.5} per route-hour), {proposals} review proposals (replayed in {took:.1} s)",
            loss * 100.0,
            switches as f64 / (routes * hours) as f64
        );
        for (r, n) in reasons {
            println!("    {n} × {r}");
        }
    }
}

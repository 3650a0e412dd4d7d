//! The same allow/deny decision made by iptables and by bpfsync's mesh
//! datapath, side by side with real traffic: UDP round trips A → R → B → R
//! → A between namespaces, R (the root namespace) holding N rules for
//! traffic from A, the allowed one last (iptables walks its chain; the
//! mesh datapath looks up two LPM tries). Reports the median round trip
//! and its ratio to the 10-rule case of the same tool.
//!
//!     cargo bench --bench firewall      (needs root and `iptables`)
//!
//! For the iptables side R forwards in the stack: the bench turns
//! `net.ipv4.ip_forward` on for its duration and restores it, and keeps its
//! rules in its own chain, jumped to only for its own interface.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bpfsync::apply::Retry;
use bpfsync::apply::journal::MemJournal;
use bpfsync::kernel::real::RealKernel;
use bpfsync::sandbox::{Sandbox, TempBpffs};

const ROUND_TRIPS: usize = 5_000;
const CHAIN: &str = "BPFSYNC_BENCH";

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Peers that never match: 10.250.0.0 upwards, one /32 per rule.
fn decoy(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0afa_0000 + i as u32)
}

/// Median round trip in µs of UDP from A to B's echo on port 9000.
fn median_rtt(a: &Sandbox, b: &Sandbox) -> f64 {
    let (src, dst) = (a.peer_ip, b.peer_ip);
    let (tx, rx) = std::sync::mpsc::channel();
    let echo = b.spawn_in_netns(move || {
        let s = UdpSocket::bind(SocketAddrV4::new(dst, 9000)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        tx.send(()).unwrap();
        let mut buf = [0u8; 64];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(&buf[..n], from);
        }
    });
    rx.recv().unwrap();
    let mut rtts = a
        .in_netns(move || {
            let s = UdpSocket::bind(SocketAddrV4::new(src, 0)).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
            let mut out = Vec::with_capacity(ROUND_TRIPS);
            let mut buf = [0u8; 64];
            for i in 0..ROUND_TRIPS + 200 {
                let t = Instant::now();
                s.send_to(&(i as u64).to_be_bytes(), SocketAddrV4::new(dst, 9000)).unwrap();
                if s.recv(&mut buf).is_ok() && i >= 200 {
                    out.push(t.elapsed().as_secs_f64() * 1e6);
                }
            }
            out
        })
        .unwrap();
    echo.join().unwrap().unwrap();
    assert!(rtts.len() > ROUND_TRIPS * 9 / 10, "lost round trips: {} of {ROUND_TRIPS}", rtts.len());
    rtts.sort_by(f64::total_cmp);
    rtts[rtts.len() / 2]
}

fn iptables_rules(a: &Sandbox, n: usize) {
    let mut rules = format!("*filter\n:{CHAIN} - [0:0]\n");
    for i in 0..n - 1 {
        rules.push_str(&format!("-A {CHAIN} -s {}/32 -p udp --dport 9000 -j ACCEPT\n", decoy(i)));
    }
    rules.push_str(&format!("-A {CHAIN} -s {}/32 -p udp --dport 9000 -j ACCEPT\n", a.peer_ip));
    rules.push_str(&format!("-A {CHAIN} -j DROP\nCOMMIT\n"));
    let mut child = Command::new("iptables-restore").arg("--noflush").stdin(Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), rules.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success());
    sh(&["iptables", "-I", "FORWARD", "-i", &a.host_if, "-j", CHAIN]);
}

fn iptables_clear(a: &Sandbox) {
    let _ = Command::new("iptables").args(["-D", "FORWARD", "-i", &a.host_if, "-j", CHAIN]).output();
    let _ = Command::new("iptables").args(["-F", CHAIN]).output();
    let _ = Command::new("iptables").args(["-X", CHAIN]).output();
}

fn mesh_spec(a: &Sandbox, b: &Sandbox, n: usize) -> String {
    let peers: Vec<String> =
        (0..n - 1).map(|i| format!("{}/32", decoy(i))).chain([format!("{}/32", a.peer_ip)]).collect();
    format!(
        "apiVersion: bpfsync/v1\nkind: NodeSpec\ninterfaces:\n  - {{ name: {ai}, mesh: {{ mode: skb }} }}\n  - {{ name: {bi}, mesh: {{ mode: skb }} }}\nroutes:\n  - {{ prefix: {bp}/32, via: {{ interface: {bi}, neighbor: {bp} }} }}\n  - {{ prefix: {ap}/32, via: {{ interface: {ai}, neighbor: {ap} }} }}\npolicies:\n  - name: bench\n    interfaces: [{ai}]\n    ingress:\n{rules}",
        ai = a.host_if,
        bi = b.host_if,
        ap = a.peer_ip,
        bp = b.peer_ip,
        rules = peers
            .iter()
            .map(|p| format!("      - {{ from: [{p}], ports: [{{ port: 9000, protocol: udp }}] }}\n"))
            .collect::<String>()
    )
}

fn apply_text(k: &mut RealKernel, text: &str) {
    let loaded = bpfsync::spec::load(std::path::Path::new("bench.yaml"), text).unwrap();
    let desired = bpfsync::compile::compile(&loaded, &mut Default::default()).unwrap();
    let done = bpfsync::engine::reconcile(k, &mut MemJournal::default(), &desired, Retry::none()).unwrap();
    let p = &done.prepared.plan;
    assert!(p.conflicts.is_empty(), "{:?}", p.conflicts);
}

fn main() {
    if unsafe { libc::geteuid() } != 0 || Command::new("iptables").arg("-V").output().is_err() {
        println!("the firewall benchmark needs root and `iptables`");
        return;
    }
    let (a, b) = (Sandbox::create().unwrap(), Sandbox::create().unwrap());
    Sandbox::route_through_host(&a, &b).unwrap();
    let forward = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    println!("| rules | iptables µs (median RTT) | ratio | bpfsync mesh µs | ratio |");
    println!("|---:|---:|---:|---:|---:|");
    let mut base = (0.0, 0.0);
    for n in [10usize, 1_000, 10_000] {
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").unwrap();
        iptables_rules(&a, n);
        let ipt = median_rtt(&a, &b);
        iptables_clear(&a);
        std::fs::write("/proc/sys/net/ipv4/ip_forward", &forward).unwrap();

        let bpffs = TempBpffs::create().unwrap();
        let mut k = RealKernel::open(bpffs.root()).unwrap();
        apply_text(&mut k, &mesh_spec(&a, &b, n));
        let mesh = median_rtt(&a, &b);
        apply_text(&mut k, "apiVersion: bpfsync/v1\nkind: NodeSpec\n");
        if n == 10 {
            base = (ipt, mesh);
        }
        println!("| {n} | {ipt:.1} | {:.2} | {mesh:.1} | {:.2} |", ipt / base.0, mesh / base.1);
    }
}

//! The same allow decision made by the peers a user would pick instead
//! of bpfsync's mesh datapath, side by side with real traffic A → R → B
//! between namespaces, R (the root namespace) holding N rules for traffic
//! from A, the allowed peer among N peers:
//!
//! - the kernel forwarding with no filter at all (the floor);
//! - nftables with sets (`ip saddr @peers udp dport @ports accept`: a hash
//!   lookup, O(1) like bpfsync's LPM tries);
//! - iptables, one rule per peer, the allowed one last (O(n); up to
//!   10,000 rules — a 100,000-rule chain takes minutes to load);
//! - bpfsync's mesh datapath, one rule with N peers: generic XDP on the
//!   veths for the round trips; for the packet rate the generator hands
//!   its frames to the mesh program by tail call, so the program meets
//!   them as it meets frames in driver mode on a NIC (the veths' own
//!   driver-mode XDP needs both ends in XDP, which the round trips'
//!   sockets are not).
//!
//! Two figures per cell: the median UDP round trip A → B → A (5,000 round
//! trips), and forwarded packets per second — frames generated at kernel
//! speed by a program run with `BPF_PROG_TEST_RUN` in live-frames mode
//! (`tests/fixtures/trafficgen.bpf.c`, 1,024 concurrent flows) entering R
//! as if received from A, counted as they leave R towards B (`tx_packets`
//! of R's end of B's link) over the generator's wall time. One CPU
//! generates and forwards, so the figure is per core; B drops them in XDP
//! (`tests/fixtures/sink_xdp.bpf.c`) so its cost is the same little for
//! every forwarder.
//!
//!     cargo bench --bench firewall      (needs root, `nft` and `iptables`)
//!
//! For the stack's side R forwards in the stack: the bench turns
//! `net.ipv4.ip_forward` on for those cells and restores it, and keeps its
//! rules in its own table and chain.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use std::net::IpAddr;
use std::sync::Arc;

use bpfsync::apply::Retry;
use bpfsync::apply::journal::MemJournal;
use bpfsync::kernel::real::RealKernel;
use bpfsync::kernel::sys;
use bpfsync::kernel::testrun::run_live_frames;
use bpfsync::kernel::{Kernel, LoadRequest};
use bpfsync::model::{Hook, MapRef};
use bpfsync::packet::{Packet, Transport};
use bpfsync::sandbox::{Sandbox, TempBpffs};
use bpfsync::spec::{ProgramType, XdpMode};

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
    pipe(&["iptables-restore", "--noflush"], &rules);
    sh(&["iptables", "-I", "FORWARD", "-i", &a.host_if, "-j", CHAIN]);
}

fn iptables_clear(a: &Sandbox) {
    let _ = Command::new("iptables").args(["-D", "FORWARD", "-i", &a.host_if, "-j", CHAIN]).output();
    let _ = Command::new("iptables").args(["-F", CHAIN]).output();
    let _ = Command::new("iptables").args(["-X", CHAIN]).output();
}

const NFT_TABLE: &str = "bpfsync_bench";

/// nftables with sets: the N peers in one set, the port in another.
fn nft_rules(a: &Sandbox, n: usize) {
    let peers: Vec<String> = (0..n - 1).map(|i| decoy(i).to_string()).chain([a.peer_ip.to_string()]).collect();
    let text = format!(
        "table ip {NFT_TABLE} {{\n  set peers {{ type ipv4_addr; elements = {{ {} }} }}\n  set ports {{ type inet_service; elements = {{ 9000 }} }}\n  chain forward {{\n    type filter hook forward priority filter; policy accept;\n    iifname \"{ai}\" ip saddr @peers udp dport @ports accept\n    iifname \"{ai}\" drop\n  }}\n}}\n",
        peers.join(", "),
        ai = a.host_if
    );
    pipe(&["nft", "-f", "-"], &text);
}

fn nft_clear() {
    let _ = Command::new("nft").args(["delete", "table", "ip", NFT_TABLE]).output();
}

fn pipe(args: &[&str], input: &str) {
    let mut child = Command::new(args[0]).args(&args[1..]).stdin(Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), input.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success(), "{args:?} failed");
}

fn mesh_spec(a: &Sandbox, b: &Sandbox, n: usize) -> String {
    let peers: Vec<String> =
        (0..n - 1).map(|i| format!("{}/32", decoy(i))).chain([format!("{}/32", a.peer_ip)]).collect();
    format!(
        "apiVersion: bpfsync/v1\nkind: NodeSpec\ninterfaces:\n  - {{ name: {ai}, mesh: {{ mode: skb }} }}\n  - {{ name: {bi}, mesh: {{ mode: skb }} }}\nroutes:\n  - {{ prefix: {bp}/32, via: {{ interface: {bi}, neighbor: {bp} }} }}\n  - {{ prefix: {ap}/32, via: {{ interface: {ai}, neighbor: {ap} }} }}\npolicies:\n  - name: bench\n    interfaces: [{ai}]\n    ingress:\n      - from: [{peers}]\n        ports: [{{ port: 9000, protocol: udp }}]\n",
        ai = a.host_if,
        bi = b.host_if,
        ap = a.peer_ip,
        bp = b.peer_ip,
        peers = peers.join(", ")
    )
}

fn apply_text(k: &mut RealKernel, text: &str) {
    let loaded = bpfsync::spec::load(std::path::Path::new("bench.yaml"), text).unwrap();
    let desired = bpfsync::compile::compile(&loaded, &mut Default::default()).unwrap();
    let done = bpfsync::engine::reconcile(k, &mut MemJournal::default(), &desired, Retry::none()).unwrap();
    let p = &done.prepared.plan;
    assert!(p.conflicts.is_empty(), "{:?}", p.conflicts);
}

const FRAMES: u32 = 2_000_000;
const MEASURE: Duration = Duration::from_secs(2);
const FLOWS: u32 = 1_024;

/// The live-frames generator, loaded once: frames from A to B's port 9000
/// entering R on A's link.
struct Generator {
    bpffs: TempBpffs,
    pin: std::path::PathBuf,
    template: Vec<u8>,
    ifindex: u32,
}

impl Generator {
    fn new(a: &Sandbox, b: &Sandbox) -> Generator {
        let bpffs = TempBpffs::create().unwrap();
        let mut k = RealKernel::open(bpffs.root()).unwrap();
        k.load_program(&LoadRequest {
            name: "trafficgen".into(),
            digest: "bench".into(),
            function: "trafficgen".into(),
            program_type: ProgramType::Xdp,
            bytes: Arc::from(&include_bytes!("../tests/fixtures/trafficgen.bpf.o")[..]),
            map_owner: "trafficgen".into(),
            fresh_maps: vec![],
        })
        .unwrap();
        let mut p =
            Packet::new(IpAddr::V4(a.peer_ip), IpAddr::V4(b.peer_ip), Transport::Udp { sport: 10000, dport: 9000 });
        p.ttl = 64;
        p.dst_mac = mac(&a.host_if);
        p.src_mac = bpfsync::net::parse_mac(a.peer_mac().unwrap().trim()).unwrap();
        let mut template = p.build();
        // No UDP checksum (IPv4 allows it): the generator changes the port.
        template[40] = 0;
        template[41] = 0;
        let mut config = vec![0u8; 56];
        config[0..4].copy_from_slice(&FLOWS.to_ne_bytes());
        config[4..8].copy_from_slice(&10_000u32.to_ne_bytes());
        config[8..50].copy_from_slice(&template[..42]);
        let map = MapRef { program: "trafficgen".into(), map: "gen_config".into() };
        k.write_entries(&map, &[(0u32.to_ne_bytes().to_vec(), config)]).unwrap();
        let pin = bpffs.root().join("programs/trafficgen/bench");
        Generator { bpffs, pin, template, ifindex: sysfs_counter(&a.host_if, "ifindex") as u32 }
    }

    /// Forwarded packets per second: frames that left R towards B over the
    /// time the generator ran.
    fn forwarded_pps(&self, b: &Sandbox) -> f64 {
        with_sink(b, || {
            // A short warm-up makes the flows' state (neighbours, conntrack).
            run_live_frames(&self.pin, &self.template, 5_000, 64, self.ifindex).unwrap();
            let before = sysfs_counter(&b.host_if, "statistics/tx_packets");
            // Chunks that double until MEASURE has passed or FRAMES went
            // out: a slow forwarder (iptables at 10,000 rules) is measured
            // in seconds too.
            let (mut frames, mut chunk, mut took) = (0u64, 10_000u32, Duration::ZERO);
            while took < MEASURE && frames < FRAMES as u64 {
                took += run_live_frames(&self.pin, &self.template, chunk, 64, self.ifindex).unwrap();
                frames += chunk as u64;
                chunk = (chunk * 2).min(FRAMES / 4);
            }
            let sent = sysfs_counter(&b.host_if, "statistics/tx_packets") - before;
            assert!(sent > frames / 2, "only {sent} of {frames} frames were forwarded");
            sent as f64 / took.as_secs_f64()
        })
    }

    /// Makes the generator hand its frames to `program` (an XDP program
    /// pinned there) instead of the stack, or to the stack again (None).
    fn hand_to(&self, program: Option<&std::path::Path>) {
        let map = sys::obj_get(&self.bpffs.root().join("maps/trafficgen/gen_next")).unwrap();
        let key = 0u32.to_ne_bytes();
        match program {
            Some(pin) => {
                let prog = sys::obj_get(pin).unwrap();
                let fd = std::os::fd::AsRawFd::as_raw_fd(&prog) as u32;
                sys::map_update(std::os::fd::AsFd::as_fd(&map), &key, &fd.to_ne_bytes()).unwrap();
            }
            None => sys::map_delete(std::os::fd::AsFd::as_fd(&map), &key).unwrap(),
        }
    }
}

/// Runs `f` with `sink_xdp` (native XDP, drops everything) on B's end of
/// its link: B costs the same little behind every forwarder, so the figure
/// is the forwarder's. (Not during the round trips, which need B's stack.)
fn with_sink<T>(b: &Sandbox, f: impl FnOnce() -> T) -> T {
    let bpffs = TempBpffs::create().unwrap();
    let root = bpffs.root().to_path_buf();
    let hook = Hook::Xdp { interface: b.peer_if.clone() };
    let (r, h) = (root.clone(), hook.clone());
    b.in_netns(move || {
        let mut k = RealKernel::open(&r).unwrap();
        k.load_program(&LoadRequest {
            name: "sink".into(),
            digest: "bench".into(),
            function: "sink_xdp".into(),
            program_type: ProgramType::Xdp,
            bytes: Arc::from(&include_bytes!("../tests/fixtures/sink_xdp.bpf.o")[..]),
            map_owner: "sink".into(),
            fresh_maps: vec![],
        })
        .unwrap();
        k.attach(&h, "sink", "bench", Some(XdpMode::Driver)).unwrap();
    })
    .unwrap();
    let out = f();
    b.in_netns(move || RealKernel::open(&root).unwrap().detach(&hook).unwrap()).unwrap();
    out
}

fn mac(iface: &str) -> [u8; 6] {
    let text = std::fs::read_to_string(format!("/sys/class/net/{iface}/address")).unwrap();
    bpfsync::net::parse_mac(text.trim()).unwrap()
}

fn sysfs_counter(iface: &str, name: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/class/net/{iface}/{name}")).unwrap().trim().parse().unwrap()
}

/// What R runs between A and B.
#[derive(Clone, Copy, PartialEq)]
enum Filter {
    /// The kernel forwarding, no rules: the floor.
    Unfiltered,
    NftSets,
    Iptables,
    Mesh,
}

const FILTERS: [Filter; 4] = [Filter::Unfiltered, Filter::NftSets, Filter::Iptables, Filter::Mesh];

/// Round trips are measured in this many rounds per cell, the filters
/// taking turns, and the median of the rounds' medians is shown: the
/// round-trip time through three namespaces drifts by ±20 % over a minute
/// here, which one round per filter would read as a difference.
const ROUNDS: usize = 3;

/// Runs `f` with `filter` holding `n` rules on R, and the generator
/// handing its frames to R as that filter meets them; removes it after.
fn with_filter<T>(
    filter: Filter,
    a: &Sandbox,
    b: &Sandbox,
    n: usize,
    generator: &Generator,
    f: impl FnOnce() -> T,
) -> T {
    match filter {
        Filter::Unfiltered => forwarding(f),
        Filter::NftSets => {
            nft_rules(a, n);
            let out = forwarding(f);
            nft_clear();
            out
        }
        Filter::Iptables => {
            iptables_rules(a, n);
            let out = forwarding(f);
            iptables_clear(a);
            out
        }
        Filter::Mesh => {
            let bpffs = TempBpffs::create().unwrap();
            let mut k = RealKernel::open(bpffs.root()).unwrap();
            apply_text(&mut k, &mesh_spec(a, b, n));
            let pin = std::fs::read_dir(bpffs.root().join("programs/mesh")).unwrap().next().unwrap().unwrap().path();
            generator.hand_to(Some(&pin));
            let out = f();
            generator.hand_to(None);
            apply_text(&mut k, "apiVersion: bpfsync/v1\nkind: NodeSpec\n");
            out
        }
    }
}

/// Runs `f` with `ip_forward` on, restoring it after.
fn forwarding<T>(f: impl FnOnce() -> T) -> T {
    let before = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").unwrap();
    let out = f();
    std::fs::write("/proc/sys/net/ipv4/ip_forward", before).unwrap();
    out
}

fn pps_text(pps: f64) -> String {
    if pps >= 100_000.0 { format!("{:.2} M", pps / 1e6) } else { format!("{:.1} k", pps / 1e3) }
}

fn main() {
    let tools = ["nft", "iptables"].iter().all(|t| Command::new(t).arg("--version").output().is_ok());
    if unsafe { libc::geteuid() } != 0 || !tools {
        println!("the firewall benchmark needs root, `nft` and `iptables` (apt-get install nftables iptables)");
        return;
    }
    // iptables-nft makes the `ip filter` table when it is missing; it goes
    // again at the end if it was not there before.
    let filter_table =
        || Command::new("nft").args(["list", "table", "ip", "filter"]).output().is_ok_and(|o| o.status.success());
    let had_filter_table = filter_table();
    let (a, b) = (Sandbox::create().unwrap(), Sandbox::create().unwrap());
    Sandbox::route_through_host(&a, &b).unwrap();
    let generator = Generator::new(&a, &b);
    let ipt_version = Command::new("iptables").arg("-V").output().unwrap();
    println!("iptables: {}", String::from_utf8_lossy(&ipt_version.stdout).trim());
    println!(
        "forwarded packets/s: live frames over {FLOWS} flows, ≥ {} s per cell; RTT: median of {ROUNDS} rounds' medians of {ROUND_TRIPS} UDP round trips",
        MEASURE.as_secs()
    );
    println!();
    println!(
        "| rules | no filter µs / pps | nftables sets µs / pps | iptables µs / pps | bpfsync mesh µs / pps | pps vs nft | pps vs iptables | RTT vs nft |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for n in [10usize, 1_000, 10_000, 100_000] {
        let runs = |f: Filter| f != Filter::Iptables || n <= 10_000;
        let mut rtts: Vec<Vec<f64>> = vec![Vec::new(); FILTERS.len()];
        let mut pps = [0.0f64; 4];
        for round in 0..ROUNDS {
            for (i, filter) in FILTERS.iter().enumerate().filter(|(_, f)| runs(**f)) {
                with_filter(*filter, &a, &b, n, &generator, || {
                    rtts[i].push(median_rtt(&a, &b));
                    if round == 0 {
                        pps[i] = generator.forwarded_pps(&b);
                    }
                });
            }
        }
        let rtt: Vec<f64> = rtts
            .iter_mut()
            .map(|r| {
                r.sort_by(f64::total_cmp);
                r.get(r.len() / 2).copied().unwrap_or(f64::NAN)
            })
            .collect();
        let cell = |i: usize| {
            if runs(FILTERS[i]) { format!("{:.1} / {}", rtt[i], pps_text(pps[i])) } else { "—".into() }
        };
        let (nft, ipt, mesh) = (1, 2, 3);
        println!(
            "| {n} | {} | {} | {} | {} | {:.2}× | {} | {:.2}× |",
            cell(0),
            cell(nft),
            cell(ipt),
            cell(mesh),
            pps[mesh] / pps[nft],
            if runs(Filter::Iptables) { format!("{:.0}×", pps[mesh] / pps[ipt]) } else { "—".into() },
            rtt[mesh] / rtt[nft],
        );
    }
    if !had_filter_table && filter_table() {
        let _ = Command::new("nft").args(["delete", "table", "ip", "filter"]).output();
    }
}

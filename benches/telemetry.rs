//! What the telemetry programs cost (root; real kernel):
//! - `drops`: `skb:kfree_skb` at 100,000 frees a second (UDP datagrams
//!   to a closed port on loopback, paced), rounds with and without
//!   `skb_drops` attached, alternating: the program's own run time from
//!   the kernel's BPF statistics (`kernel.bpf_stats_enabled`, which adds
//!   two clock reads per run to what it measures), as ns per event and %
//!   of one core; and the sending thread's CPU time per datagram, with
//!   and without, measured in the same run (what the tracepoint dispatch
//!   and the program add to the path that frees).
//! - `tcp`: a bulk TCP transfer over loopback with the TCP programs on:
//!   each program's events and ns per event, and the transfer's rate
//!   with and without them.
//!
//!     cargo bench --bench telemetry [-- drops tcp]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bpfsync::kernel::real::RealKernel;
use bpfsync::kernel::{Kernel, Scope, sys};
use bpfsync::sandbox::{TempBpffs, TempDir};

const RATE: u64 = 100_000;
const ROUND: Duration = Duration::from_secs(4);
const ROUNDS: usize = 3;

struct Node {
    bpffs: TempBpffs,
    state: TempDir,
}

impl Node {
    fn bpfsync(&self, args: &[&str]) {
        let out = Command::new(env!("CARGO_BIN_EXE_bpfsync"))
            .args(["--bpffs-root", self.bpffs.root().to_str().unwrap()])
            .args(["--state-dir", self.state.path().to_str().unwrap()])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "bpfsync {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn apply(&self, spec: &str) {
        let path = self.state.path().join("spec.yaml");
        std::fs::write(&path, spec).unwrap();
        self.bpfsync(&["apply", path.to_str().unwrap(), "--auto-approve"]);
    }

    fn down(&self) {
        self.bpfsync(&["down", "--auto-approve"]);
    }

    /// (run count, run time in ns) of each loaded program, by name.
    fn program_stats(&self) -> Vec<(String, u64, u64)> {
        let mut kernel = RealKernel::open_read_only(self.bpffs.root()).unwrap();
        let state = kernel.observe(&Scope::default()).unwrap();
        state
            .programs
            .values()
            .filter_map(|p| {
                let fd = sys::prog_fd_by_id(p.id?).ok()?;
                let (info, _) = sys::prog_info(std::os::fd::AsFd::as_fd(&fd)).ok()?;
                Some((p.name.clone(), info.run_cnt, info.run_time_ns))
            })
            .collect()
    }
}

/// Enables the kernel's BPF run-time statistics while alive.
struct BpfStats(String);

impl BpfStats {
    fn enable() -> BpfStats {
        let path = "/proc/sys/kernel/bpf_stats_enabled";
        let before = std::fs::read_to_string(path).unwrap().trim().to_string();
        std::fs::write(path, "1").unwrap();
        BpfStats(before)
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", &self.0);
    }
}

/// This thread's CPU time (user + system).
fn thread_cpu() -> Duration {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// Sends datagrams to a closed loopback port at `RATE` a second for
/// `ROUND`: each is freed as a drop (`NO_SOCKET`). Returns (sent, this
/// thread's CPU time).
fn closed_port_frees() -> (u64, Duration) {
    let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).unwrap();
    // A port nothing listens on: the one just released.
    let closed = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).unwrap().local_addr().unwrap();
    let cpu = thread_cpu();
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < ROUND {
        // Bursts of 100 every millisecond.
        let due = (start.elapsed().as_secs_f64() * RATE as f64) as u64;
        while sent < due {
            let _ = sock.send_to(b"x", closed);
            sent += 1;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    (sent, thread_cpu() - cpu)
}

fn drops(node: &Node) {
    println!("drops: skb:kfree_skb at {RATE} frees/s, {ROUNDS} rounds of {ROUND:?} each way");
    let spec = "apiVersion: bpfsync/v1\nkind: NodeSpec\ntelemetry:\n  drops: {}\n";
    let (mut off, mut on) = (Vec::new(), Vec::new());
    let (mut events, mut run_ns, mut secs) = (0u64, 0u64, 0f64);
    for _ in 0..ROUNDS {
        node.down();
        let (n, cpu) = closed_port_frees();
        off.push(cpu.as_nanos() as f64 / n as f64);
        node.apply(spec);
        let before = node.program_stats();
        let started = Instant::now();
        let (n, cpu) = closed_port_frees();
        secs += started.elapsed().as_secs_f64();
        let after = node.program_stats();
        on.push(cpu.as_nanos() as f64 / n as f64);
        let get = |v: &[(String, u64, u64)]| v.iter().find(|p| p.0 == "skb_drops").map(|p| (p.1, p.2)).unwrap();
        let (b, a) = (get(&before), get(&after));
        events += a.0 - b.0;
        run_ns += a.1 - b.1;
    }
    node.down();
    let per_event = run_ns as f64 / events as f64;
    println!("  program: {events} events, {per_event:.0} ns per event (with the statistics' own clock reads)");
    println!(
        "  program cost: {:.2} % of one core at the measured {:.0} events/s; {:.2} % at 100,000/s (goal < 5 %)",
        run_ns as f64 / secs / 1e7,
        events as f64 / secs,
        per_event * 100_000.0 / 1e7
    );
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (off_ns, on_ns) = (mean(&off), mean(&on));
    println!(
        "  sender CPU per datagram: {off_ns:.0} ns without, {on_ns:.0} ns with ({:.3}x); the difference at 100,000/s: {:.2} % of one core",
        on_ns / off_ns,
        (on_ns - off_ns) * 100_000.0 / 1e7
    );
    println!("  rounds without: {off:.0?} ns; with: {on:.0?} ns");
}

/// Sends `bytes` over one loopback connection; the rate in MB/s.
fn bulk(bytes: usize) -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let reader = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0;
        while let Ok(n) = c.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n;
        }
        total
    });
    let started = Instant::now();
    let mut c = TcpStream::connect(addr).unwrap();
    let chunk = vec![1u8; 1 << 16];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        c.write_all(&chunk[..n]).unwrap();
        left -= n;
    }
    drop(c);
    assert_eq!(reader.join().unwrap(), bytes);
    bytes as f64 / started.elapsed().as_secs_f64() / 1e6
}

fn tcp(node: &Node) {
    let bytes = 2 << 30;
    println!("tcp: 2 GiB over one loopback connection, {ROUNDS} rounds each way");
    let spec = "apiVersion: bpfsync/v1\nkind: NodeSpec\ntelemetry:\n  tcp:\n    watch:\n      - { name: loopback, prefixes: [127.0.0.0/8] }\n";
    let (mut off, mut on) = (Vec::new(), Vec::new());
    let mut per_program: Vec<(String, u64, u64)> = Vec::new();
    for _ in 0..ROUNDS {
        node.down();
        off.push(bulk(bytes));
        node.apply(spec);
        let before = node.program_stats();
        on.push(bulk(bytes));
        for (name, cnt, ns) in node.program_stats() {
            let (bc, bn) = before.iter().find(|p| p.0 == name).map_or((0, 0), |p| (p.1, p.2));
            match per_program.iter_mut().find(|p| p.0 == name) {
                Some(p) => {
                    p.1 += cnt - bc;
                    p.2 += ns - bn;
                }
                None => per_program.push((name, cnt - bc, ns - bn)),
            }
        }
    }
    node.down();
    for (name, cnt, ns) in &per_program {
        let per = if *cnt == 0 { 0.0 } else { *ns as f64 / *cnt as f64 };
        println!("  {name:<20} {cnt:>10} events  {per:>6.0} ns per event");
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    println!(
        "  transfer: {:.0} MB/s without, {:.0} MB/s with ({:.3}x); rounds {off:.0?} / {on:.0?}",
        mean(&off),
        mean(&on),
        mean(&on) / mean(&off)
    );
}

fn main() {
    let wanted: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let run = |name: &str| wanted.is_empty() || wanted.iter().any(|w| w == name);
    let node = Node { bpffs: TempBpffs::create().unwrap(), state: TempDir::create("bpfsync-bench-telemetry").unwrap() };
    assert!(Path::new("/sys/kernel/btf/vmlinux").exists(), "the telemetry programs need kernel BTF");
    let _stats = BpfStats::enable();
    if run("drops") {
        drops(&node);
    }
    if run("tcp") {
        tcp(&node);
    }
}

//! Network namespaces and veth pairs: the demo's sandbox and the tests'.
//!
//! A sandbox is one network namespace holding the peer end of a veth pair
//! whose host end stays in the root namespace, where bpfsync attaches (XDP
//! and TCX attach by ifindex in the caller's namespace). Traffic flows only
//! between the two ends. A bpffs mounted on a temporary directory gives
//! each test its own bpfsync root. Everything is removed on drop, also when
//! a test fails.

use std::fs;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

fn run(args: &[&str]) -> io::Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("`{}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())))
    }
}

/// A namespace with one veth pair to the root namespace.
#[derive(Debug)]
pub struct Sandbox {
    pub netns: String,
    /// The end in the root namespace (where programs attach).
    pub host_if: String,
    /// The end inside the namespace.
    pub peer_if: String,
    pub host_ip: Ipv4Addr,
    pub peer_ip: Ipv4Addr,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl Sandbox {
    /// A sandbox with fixed names (the demo's).
    pub fn create_named(netns: &str, host_if: &str, subnet: [u8; 3]) -> io::Result<Sandbox> {
        let sb = Sandbox {
            netns: netns.to_string(),
            host_if: host_if.to_string(),
            peer_if: format!("{host_if}p"),
            host_ip: Ipv4Addr::new(subnet[0], subnet[1], subnet[2], 1),
            peer_ip: Ipv4Addr::new(subnet[0], subnet[1], subnet[2], 2),
        };
        sb.setup().inspect_err(|_| sb.teardown())?;
        Ok(sb)
    }

    /// A sandbox with names and a /30 unique to this process and call, for
    /// tests running in parallel.
    pub fn create() -> io::Result<Sandbox> {
        let pid = std::process::id();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}{}", pid % 100_000, n);
        Self::create_named(
            &format!("bpfsync-t{tag}"),
            &format!("bt{tag}"),
            [10, 100 + (pid % 100) as u8, (n * 4 % 256) as u8],
        )
    }

    fn setup(&self) -> io::Result<()> {
        run(&["ip", "netns", "add", &self.netns])?;
        run(&[
            "ip",
            "link",
            "add",
            &self.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &self.peer_if,
            "netns",
            &self.netns,
        ])?;
        run(&["ip", "addr", "add", &format!("{}/30", self.host_ip), "dev", &self.host_if])?;
        run(&["ip", "link", "set", &self.host_if, "up"])?;
        run(&["ip", "-n", &self.netns, "addr", "add", &format!("{}/30", self.peer_ip), "dev", &self.peer_if])?;
        run(&["ip", "-n", &self.netns, "link", "set", &self.peer_if, "up"])?;
        run(&["ip", "-n", &self.netns, "link", "set", "lo", "up"])?;
        // Wait for the link to come up both ways (IPv6 DAD and carrier).
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let oper = fs::read_to_string(format!("/sys/class/net/{}/operstate", self.host_if)).unwrap_or_default();
            if oper.trim() == "up" {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn teardown(&self) {
        let _ = run(&["ip", "link", "del", &self.host_if]);
        let _ = run(&["ip", "netns", "del", &self.netns]);
    }

    /// Runs `f` on a thread that has entered the sandbox's namespace.
    pub fn in_netns<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
        self.spawn_in_netns(f).join().map_err(|_| io::Error::other("sandbox thread panicked"))?
    }

    /// Starts `f` on a thread inside the sandbox's namespace, without
    /// waiting (servers, concurrent senders).
    pub fn spawn_in_netns<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<io::Result<T>> {
        let path = PathBuf::from("/var/run/netns").join(&self.netns);
        std::thread::spawn(move || {
            let ns = fs::File::open(&path)?;
            // SAFETY: setns on a namespace fd changes only this thread.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(f())
        })
    }

    /// The MAC of the namespace's end of the pair.
    pub fn peer_mac(&self) -> io::Result<String> {
        ns_mac(&self.netns, &self.peer_if)
    }

    /// Makes the root namespace the router between two sandboxes (A — R —
    /// B): each namespace routes the other's address via its host end, and
    /// the root namespace knows both peers' MACs (permanent neighbours).
    pub fn route_through_host(a: &Sandbox, b: &Sandbox) -> io::Result<()> {
        for (from, to) in [(a, b), (b, a)] {
            let dest = format!("{}/32", to.peer_ip);
            run(&["ip", "-n", &from.netns, "route", "add", &dest, "via", &from.host_ip.to_string()])?;
        }
        for sb in [a, b] {
            let mac = sb.peer_mac()?;
            let ip = sb.peer_ip.to_string();
            run(&["ip", "neigh", "replace", &ip, "lladdr", &mac, "dev", &sb.host_if, "nud", "permanent"])?;
        }
        Ok(())
    }

    /// Turns IPv6 off on both ends of the pair: no router solicitations or
    /// MLD reports, so the only traffic is what a test sends.
    pub fn disable_ipv6(&self) -> io::Result<()> {
        let host = format!("net.ipv6.conf.{}.disable_ipv6=1", self.host_if);
        run(&["sysctl", "-qw", &host])?;
        let peer = format!("net.ipv6.conf.{}.disable_ipv6=1", self.peer_if);
        run(&["ip", "netns", "exec", &self.netns, "sysctl", "-qw", &peer])
    }

    /// Sends `count` UDP datagrams from the namespace to `host_ip:port`, one
    /// every `interval`. Returns how many were sent.
    pub fn send_udp(&self, port: u16, count: u64, interval: Duration) -> io::Result<u64> {
        let (src, dst) = (self.peer_ip, self.host_ip);
        self.in_netns(move || -> io::Result<u64> {
            let sock = UdpSocket::bind(SocketAddrV4::new(src, 0))?;
            let mut sent = 0;
            for i in 0..count {
                sock.send_to(&i.to_be_bytes(), SocketAddrV4::new(dst, port))?;
                sent += 1;
                if !interval.is_zero() {
                    std::thread::sleep(interval);
                }
            }
            Ok(sent)
        })?
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Two paths to one destination, for the heal loop: a source namespace A,
/// the router R (the root namespace, where bpfsync runs), and a
/// destination namespace B reached from R over two links — the primary
/// (`h1`) and the fallback (`h2`). B holds `.1` of [`TwoPaths::prefix`] on
/// its loopback; A routes that prefix via R. Removed on drop.
#[derive(Debug)]
pub struct TwoPaths {
    pub a: String,
    pub b: String,
    /// R's ends: towards A, the primary link, the fallback link.
    pub ha: String,
    pub h1: String,
    pub h2: String,
    /// MACs of B's ends of the two links (`b1`, `b2`).
    pub b1_mac: String,
    pub b2_mac: String,
    net: [u8; 2],
    dest: [u8; 3],
}

impl TwoPaths {
    pub fn create() -> io::Result<TwoPaths> {
        let pid = std::process::id();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}{n}", pid % 10_000);
        let mut t = TwoPaths {
            a: format!("bhA{tag}"),
            b: format!("bhB{tag}"),
            ha: format!("hA{tag}"),
            h1: format!("h1x{tag}"),
            h2: format!("h2x{tag}"),
            b1_mac: String::new(),
            b2_mac: String::new(),
            net: [200 + (pid % 50) as u8, (n * 16 % 256) as u8],
            dest: [172, 16 + (pid % 16) as u8, n as u8],
        };
        // On failure `t` is dropped, which tears down what was made.
        t.setup()?;
        Ok(t)
    }

    /// `10.x.y.last` in this topology's /24 (A link .1/.2, primary .5/.6,
    /// fallback .9/.10).
    pub fn ip(&self, last: u8) -> String {
        format!("10.{}.{}.{last}", self.net[0], self.net[1])
    }

    pub fn dest_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.dest[0], self.dest[1], self.dest[2], 1)
    }

    pub fn prefix(&self) -> String {
        format!("{}.{}.{}.0/24", self.dest[0], self.dest[1], self.dest[2])
    }

    fn setup(&mut self) -> io::Result<()> {
        let (a, b) = (self.a.clone(), self.b.clone());
        run(&["ip", "netns", "add", &a])?;
        run(&["ip", "netns", "add", &b])?;
        for (host, peer, ns, host_ip, peer_ip) in [
            (&self.ha, "pa", &a, self.ip(1), self.ip(2)),
            (&self.h1, "b1", &b, self.ip(5), self.ip(6)),
            (&self.h2, "b2", &b, self.ip(9), self.ip(10)),
        ] {
            run(&["ip", "link", "add", host, "type", "veth", "peer", "name", peer, "netns", ns])?;
            // IPv6 off: no solicitations, only what tests send and probes.
            run(&["sysctl", "-qw", &format!("net.ipv6.conf.{host}.disable_ipv6=1")])?;
            run(&["ip", "netns", "exec", ns, "sysctl", "-qw", &format!("net.ipv6.conf.{peer}.disable_ipv6=1")])?;
            run(&["ip", "addr", "add", &format!("{host_ip}/30"), "dev", host])?;
            run(&["ip", "link", "set", host, "up"])?;
            run(&["ip", "-n", ns, "addr", "add", &format!("{peer_ip}/30"), "dev", peer])?;
            run(&["ip", "-n", ns, "link", "set", peer, "up"])?;
        }
        run(&["ip", "-n", &a, "link", "set", "lo", "up"])?;
        run(&["ip", "-n", &b, "link", "set", "lo", "up"])?;
        run(&["ip", "-n", &a, "route", "add", &self.prefix(), "via", &self.ip(1)])?;
        run(&["ip", "-n", &b, "addr", "add", &format!("{}/32", self.dest_ip()), "dev", "lo"])?;
        // Traffic from A arrives on either link: no reverse-path filter.
        for k in ["all", "default", "b1", "b2"] {
            run(&["ip", "netns", "exec", &b, "sysctl", "-qw", &format!("net.ipv4.conf.{k}.rp_filter=0")])?;
        }
        self.b1_mac = ns_mac(&b, "b1")?;
        self.b2_mac = ns_mac(&b, "b2")?;
        for h in [&self.ha, &self.h1, &self.h2] {
            let deadline = Instant::now() + Duration::from_secs(5);
            while fs::read_to_string(format!("/sys/class/net/{h}/operstate")).unwrap_or_default().trim() != "up"
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// A spec: the mesh datapath on R's three ends, the route with its
    /// fallback, probes every 100 ms (`route_health` overrides, when not
    /// empty), and `rules` (YAML list items under `fallback:`).
    pub fn spec(&self, route_health: &str, rules: &str) -> String {
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

    /// One `fallback` rule for the route, as a YAML list item.
    pub fn rule(&self, name: &str, when: &str, recover: &str, auto_apply: bool) -> String {
        format!(
            "  - name: {name}\n    route: {}\n    when: {when}\n    recover: {recover}\n    auto-apply: {auto_apply}\n",
            self.prefix()
        )
    }

    /// Takes B's end of the primary link down (R sees its carrier go).
    pub fn primary_down(&self, down: bool) -> io::Result<()> {
        run(&["ip", "-n", &self.b, "link", "set", "b1", if down { "down" } else { "up" }])
    }

    /// Drops `percent` % of what arrives on B's end of the primary link
    /// (an nft `numgen random` rule: this kernel has no netem); 0 removes it.
    pub fn primary_loss(&self, percent: u32) -> io::Result<()> {
        let nft = |cmd: &str| run(&["ip", "netns", "exec", &self.b, "nft", cmd]);
        let _ = nft("delete table ip bpfsync_loss");
        if percent > 0 {
            nft("add table ip bpfsync_loss")?;
            nft("add chain ip bpfsync_loss pre { type filter hook prerouting priority -300; }")?;
            nft(&format!("add rule ip bpfsync_loss pre iifname \"b1\" numgen random mod 100 < {percent} drop"))?;
        }
        Ok(())
    }

    /// Packets B received on its end of link 1 or 2 so far.
    pub fn rx(&self, link: u8) -> u64 {
        Command::new("ip")
            .args(["netns", "exec", &self.b, "cat", &format!("/sys/class/net/b{link}/statistics/rx_packets")])
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(0)
    }

    /// Runs `f` on a thread inside namespace `ns` (A or B).
    pub fn spawn_in<T: Send + 'static>(
        ns: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<io::Result<T>> {
        let path = PathBuf::from("/var/run/netns").join(ns);
        std::thread::spawn(move || {
            let f0 = fs::File::open(&path)?;
            // SAFETY: setns on a namespace fd changes only this thread.
            if unsafe { libc::setns(f0.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(f())
        })
    }
}

impl Drop for TwoPaths {
    fn drop(&mut self) {
        for h in [&self.ha, &self.h1, &self.h2] {
            let _ = run(&["ip", "link", "del", h]);
        }
        let _ = run(&["ip", "netns", "del", &self.a]);
        let _ = run(&["ip", "netns", "del", &self.b]);
    }
}

fn ns_mac(ns: &str, dev: &str) -> io::Result<String> {
    let out = Command::new("ip").args(["-n", ns, "-j", "link", "show", "dev", dev]).output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(io::Error::other)?;
    v[0]["address"].as_str().map(str::to_string).ok_or_else(|| io::Error::other("no MAC in `ip -j link`"))
}

/// A bpf filesystem mounted on a fresh temporary directory: an isolated
/// bpfsync root. Unmounting releases every pin under it.
#[derive(Debug)]
pub struct TempBpffs {
    pub mount: PathBuf,
}

impl TempBpffs {
    pub fn create() -> io::Result<TempBpffs> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("bpfsync-bpffs-{}-{n}", std::process::id()));
        fs::create_dir_all(&dir)?;
        run(&["mount", "-t", "bpf", "bpf", &dir.to_string_lossy()]).inspect_err(|_| {
            let _ = fs::remove_dir(&dir);
        })?;
        Ok(TempBpffs { mount: dir })
    }

    /// The bpfsync root inside this bpffs.
    pub fn root(&self) -> PathBuf {
        self.mount.join("bpfsync")
    }
}

impl Drop for TempBpffs {
    fn drop(&mut self) {
        let _ = run(&["umount", "-l", &self.mount.to_string_lossy()]);
        let _ = fs::remove_dir(&self.mount);
    }
}

/// A temporary directory removed on drop (state directories in tests).
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn create(prefix: &str) -> io::Result<TempDir> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()));
        fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

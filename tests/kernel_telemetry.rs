//! The telemetry programs on the real kernel, with real traffic between
//! the node and a namespace: TCP per watched prefix (RTT, connect
//! latency, opens, closes, failed connects, resets, and retransmits and
//! congestion forced by an nft rule that drops a share of the segments),
//! stack drops by the kernel's reason name with the filter applied in the
//! program both ways, and XDP exceptions and redirect errors by interface
//! — through `status`, `stats` and the agent's `/metrics`.
//!
//! The tracepoints see the whole node, so every test watches its own
//! sandbox's /30 and asserts on that watch, or on what a filter must keep
//! out whatever else runs.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::time::Duration;

use common::{Agent, Env, Sandbox, wait, write_spec};
use serde_json::Value;

fn nft_in(sb: &Sandbox, cmd: &str) {
    let out = Command::new("ip").args(["netns", "exec", &sb.netns, "nft", cmd]).output().unwrap();
    assert!(out.status.success(), "nft {cmd}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The sandbox's /30.
fn subnet(sb: &Sandbox) -> String {
    let o = sb.peer_ip.octets();
    format!("{}.{}.{}.{}/30", o[0], o[1], o[2], o[3] & !3)
}

/// A server in the namespace on `peer_ip:port`: reads each connection to
/// its end and answers with the byte count.
fn serve(sb: &Sandbox, port: u16) -> std::thread::JoinHandle<std::io::Result<()>> {
    let ip = sb.peer_ip;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = sb.spawn_in_netns(move || {
        let listener = TcpListener::bind(SocketAddrV4::new(ip, port)).unwrap();
        ready_tx.send(()).unwrap();
        for conn in listener.incoming() {
            let mut c = conn.unwrap();
            let mut buf = Vec::new();
            if c.read_to_end(&mut buf).is_err() {
                continue;
            }
            if buf == b"stop" {
                break;
            }
            let _ = c.write_all(buf.len().to_string().as_bytes());
        }
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).expect("the server listens");
    handle
}

/// Sends `bytes` to the server and reads its answer.
fn transfer(sb: &Sandbox, port: u16, bytes: usize) {
    let mut c =
        TcpStream::connect_timeout(&SocketAddrV4::new(sb.peer_ip, port).into(), Duration::from_secs(5)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    c.write_all(&vec![7u8; bytes]).unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = String::new();
    c.read_to_string(&mut answer).unwrap();
    assert_eq!(answer, bytes.to_string());
}

fn status(env: &Env) -> Value {
    serde_json::from_str(&env.run_ok(&["status", "-o", "json"])).unwrap()
}

fn watch<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["telemetry"]["tcp"]
        .as_array()
        .and_then(|w| w.iter().find(|w| w["name"] == name))
        .unwrap_or_else(|| panic!("no watch `{name}` in {}", status["telemetry"]))
}

fn drops(status: &Value, reason: &str) -> u64 {
    status["telemetry"]["drops"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d["reason"] == reason)
        .map_or(0, |d| d["count"].as_u64().unwrap())
}

#[test]
fn tcp_to_a_watched_prefix_is_measured_and_forced_retransmits_are_counted() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    sb.disable_ipv6().unwrap();
    let spec = format!(
        "apiVersion: bpfsync/v1\nkind: NodeSpec\ntelemetry:\n  tcp:\n    watch:\n      - name: sandbox\n        prefixes: [{}]\n      - name: nobody\n        prefixes: [192.0.2.0/24, 2001:db8::/32]\n  drops: {{}}\n",
        subnet(&sb)
    );
    let path = write_spec(env.state.path(), "spec.yaml", &spec);
    env.run_ok(&["apply", &path, "--auto-approve"]);

    let server = serve(&sb, 7301);
    for _ in 0..5 {
        transfer(&sb, 7301, 20_000);
    }
    // A port nobody listens on: the namespace answers the SYN with a reset.
    let refused = TcpStream::connect_timeout(&SocketAddrV4::new(sb.peer_ip, 7302).into(), Duration::from_secs(5));
    assert!(refused.is_err());

    let s = status(&env);
    let w = watch(&s, "sandbox");
    assert_eq!(w["prefixes"], serde_json::json!([subnet(&sb)]));
    let c = &w["connections"];
    // Both ends are on this node: the client's opens are active, the
    // server's passive; every connection closes on both ends.
    assert_eq!(c["opened_active"], 5, "{w}");
    assert_eq!(c["opened_passive"], 5, "{w}");
    assert_eq!(c["connect_failed"], 1, "{w}");
    assert_eq!(c["reset_received"], 1, "{w}");
    assert_eq!(c["reset_sent"], 1, "{w}");
    wait("every connection to close on both ends", Duration::from_secs(10), || {
        watch(&status(&env), "sandbox")["connections"]["closed"] == 10
    });
    assert!(w["rtt"]["samples"].as_u64().unwrap() > 0, "{w}");
    assert!(w["rtt"]["p50_ms"].as_f64().unwrap() > 0.0, "{w}");
    assert_eq!(w["connect_latency"]["samples"], 5, "{w}");
    assert_eq!(w["retransmits"], 0, "no loss yet: {w}");
    let nobody = watch(&s, "nobody");
    assert_eq!(nobody["connections"]["opened_active"], 0, "{nobody}");
    assert_eq!(nobody["rtt"]["samples"], 0, "{nobody}");

    // A fifth of the segments reaching the server is dropped by netfilter:
    // the client retransmits and enters recovery or loss; the stack counts
    // the drops under the kernel's own reason.
    let drops_before = drops(&s, "NETFILTER_DROP");
    nft_in(&sb, "add table ip bpfsync_loss");
    nft_in(&sb, "add chain ip bpfsync_loss pre { type filter hook prerouting priority -300; }");
    nft_in(&sb, "add rule ip bpfsync_loss pre tcp dport 7301 numgen random mod 100 < 20 drop");
    for _ in 0..3 {
        transfer(&sb, 7301, 300_000);
    }
    nft_in(&sb, "delete table ip bpfsync_loss");
    let s = status(&env);
    let w = watch(&s, "sandbox");
    assert!(w["retransmits"].as_u64().unwrap() > 0, "{w}");
    let cong = &w["congestion"];
    assert!(cong["recovery"].as_u64().unwrap() + cong["loss"].as_u64().unwrap() > 0, "{w}");
    assert!(drops(&s, "NETFILTER_DROP") > drops_before, "{}", s["telemetry"]["drops"]);
    assert_eq!(watch(&s, "nobody")["retransmits"], 0);

    // `stats` reads twice: what happened in between, with percentiles of
    // that interval's samples only.
    let stats = std::thread::scope(|scope| {
        // Well inside the interval: the first reading is taken ~50 ms in.
        let run = scope.spawn(|| env.run_ok(&["stats", "--interval", "3s", "-o", "json"]));
        std::thread::sleep(Duration::from_secs(1));
        transfer(&sb, 7301, 10_000);
        run.join().unwrap()
    });
    let stats: Value = serde_json::from_str(&stats).unwrap();
    let interval = stats["telemetry"]["interval"]["tcp"].as_array().unwrap();
    let w = interval.iter().find(|w| w["name"] == "sandbox").unwrap();
    assert_eq!(w["connections"]["opened_active"], 1, "{w}");
    assert_eq!(w["connect_latency"]["samples"], 1, "{w}");
    let text = env.run_ok(&["status"]);
    assert!(text.contains("TELEMETRY") && text.contains(&format!("sandbox ({})", subnet(&sb))), "{text}");

    // The agent exports them as Prometheus histograms and counters.
    let agent = Agent::start(&env, std::path::Path::new(&path), "1h");
    let metrics = agent.get("/metrics").1;
    let line = |prefix: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no `{prefix}` in /metrics"))
    };
    let count = line("bpfsync_tcp_rtt_seconds_count{watch=\"sandbox\"}");
    assert!(count > 0.0);
    assert_eq!(line("bpfsync_tcp_rtt_seconds_bucket{le=\"+Inf\",watch=\"sandbox\"}"), count);
    assert!(line("bpfsync_tcp_rtt_seconds_sum{watch=\"sandbox\"}") > 0.0);
    assert!(line("bpfsync_tcp_retransmits_total{watch=\"sandbox\"}") > 0.0);
    assert_eq!(line("bpfsync_tcp_connections_total{watch=\"sandbox\",event=\"connect_failed\"}"), 1.0);
    assert!(line("bpfsync_stack_drops_total{reason=\"NETFILTER_DROP\"}") > 0.0);
    agent.stop();

    let _ = TcpStream::connect(SocketAddrV4::new(sb.peer_ip, 7301)).and_then(|mut c| c.write_all(b"stop"));
    server.join().unwrap().unwrap();
    env.run_ok(&["down", "--auto-approve"]);
}

/// Sends `n` datagrams from the namespace to the node's `port`.
fn udp_from_namespace(sb: &Sandbox, port: u16, n: u64) {
    sb.send_udp(port, n, Duration::ZERO).unwrap();
}

/// Sends `n` datagrams from the namespace to the node's port 7399, which
/// the namespace's netfilter drops on the way out (the rule the test adds).
fn dropped_on_the_way_out(sb: &Sandbox, n: u64) {
    let dst = sb.host_ip;
    sb.in_netns(move || {
        let s = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        for _ in 0..n {
            // EPERM: netfilter dropped it, which is the point.
            let _ = s.send_to(b"x", SocketAddrV4::new(dst, 7399));
        }
    })
    .unwrap();
}

#[test]
fn the_drop_filter_counts_only_the_named_reasons_in_the_program() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    sb.disable_ipv6().unwrap();
    let spec = |filter: &str| format!("apiVersion: bpfsync/v1\nkind: NodeSpec\ntelemetry:\n  drops: {{ {filter} }}\n");
    let path = write_spec(env.state.path(), "spec.yaml", &spec("only: [NO_SOCKET]"));
    env.run_ok(&["apply", &path, "--auto-approve"]);
    // Datagrams to a closed port on the node (NO_SOCKET), and datagrams
    // the namespace's netfilter drops on the way out (NETFILTER_DROP).
    nft_in(&sb, "add table ip bpfsync_drop");
    nft_in(&sb, "add chain ip bpfsync_drop out { type filter hook output priority 0; }");
    nft_in(&sb, "add rule ip bpfsync_drop out udp dport 7399 drop");
    udp_from_namespace(&sb, 7398, 50);
    dropped_on_the_way_out(&sb, 50);
    let s = status(&env);
    assert!(drops(&s, "NO_SOCKET") >= 50, "{}", s["telemetry"]);
    assert_eq!(drops(&s, "NETFILTER_DROP"), 0, "filtered out in the program: {}", s["telemetry"]);
    let no_socket = drops(&s, "NO_SOCKET");

    // The other way round: one map update, the program stays.
    write_spec(env.state.path(), "spec.yaml", &spec("ignore: [NO_SOCKET]"));
    let plan = env.run_ok(&["plan", &path]);
    assert!(plan.contains("skb_drops/drop_filter") && !plan.contains("program.skb_drops"), "{plan}");
    env.run_ok(&["apply", &path, "--auto-approve"]);
    udp_from_namespace(&sb, 7398, 50);
    dropped_on_the_way_out(&sb, 50);
    let s = status(&env);
    assert_eq!(drops(&s, "NO_SOCKET"), no_socket, "ignored now: {}", s["telemetry"]);
    assert!(drops(&s, "NETFILTER_DROP") >= 50, "{}", s["telemetry"]);

    // A reason this kernel does not have is refused, with the close ones.
    write_spec(env.state.path(), "spec.yaml", &spec("ignore: [NO_SOKET]"));
    let out = env.run(&["validate", &path]);
    assert_eq!(out.status.code(), Some(1));
    assert!(common::stderr(&out).contains("this kernel has no drop reason `NO_SOKET`: did you mean `NO_SOCKET`?"));
    // Away from the node, the names are resolved against the node's BTF
    // file when given one; one that cannot be read is said so.
    write_spec(env.state.path(), "spec.yaml", &spec("ignore: [NO_SOCKET]"));
    let validate = |btf: &str| {
        Command::new(env!("CARGO_BIN_EXE_bpfsync"))
            .args(["validate", &path])
            .env("BPFSYNC_KERNEL_BTF", btf)
            .output()
            .unwrap()
    };
    assert!(validate("/sys/kernel/btf/vmlinux").status.success());
    let out = validate("/nonexistent/vmlinux");
    assert_eq!(out.status.code(), Some(1));
    assert!(common::stderr(&out).contains("cannot name drop reasons: cannot read kernel BTF `/nonexistent/vmlinux`"));
    env.run_ok(&["down", "--auto-approve"]);
}

#[test]
fn xdp_exceptions_and_redirect_errors_are_counted_by_interface() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    sb.disable_ipv6().unwrap();
    let object = common::repo().join("tests/fixtures/xdp_faults.bpf.o");
    let spec = |function: &str| {
        format!(
            "apiVersion: bpfsync/v1\nkind: NodeSpec\nprograms:\n  - {{ name: faulty, object: {}, function: {function}, type: xdp }}\ninterfaces:\n  - {{ name: {}, xdp: {{ program: faulty, mode: skb }} }}\ntelemetry:\n  xdp-errors: true\n",
            object.display(),
            sb.host_if
        )
    };
    // The faulty programs drop ARP too: the namespace knows the node's MAC.
    let mac = std::fs::read_to_string(format!("/sys/class/net/{}/address", sb.host_if)).unwrap();
    let host = sb.host_ip.to_string();
    let neigh =
        ["-n", &sb.netns, "neigh", "replace", &host, "lladdr", mac.trim(), "dev", &sb.peer_if, "nud", "permanent"];
    assert!(Command::new("ip").args(neigh).status().unwrap().success());
    let path = write_spec(env.state.path(), "spec.yaml", &spec("xdp_abort"));
    env.run_ok(&["apply", &path, "--auto-approve"]);
    udp_from_namespace(&sb, 7400, 20);
    write_spec(env.state.path(), "spec.yaml", &spec("xdp_bad_redirect"));
    env.run_ok(&["apply", &path, "--auto-approve"]);
    udp_from_namespace(&sb, 7400, 30);

    let s = status(&env);
    let errors = s["telemetry"]["xdp_errors"].as_array().unwrap();
    let on = |kind: &str| -> Vec<&Value> {
        errors.iter().filter(|e| e["interface"] == sb.host_if.as_str() && e["kind"] == kind).collect()
    };
    let aborted = on("exception");
    assert_eq!(aborted.len(), 1, "{errors:?}");
    assert_eq!(aborted[0]["code"], "ABORTED");
    assert_eq!(aborted[0]["count"], 20, "{errors:?}");
    let redirect = on("redirect");
    assert_eq!(redirect.len(), 1, "{errors:?}");
    // A target that does not exist: EINVAL from the generic path here
    // (drivers' paths may say ENODEV).
    assert!(["EINVAL", "ENODEV"].contains(&redirect[0]["code"].as_str().unwrap()), "{errors:?}");
    // The namespace knows the MAC and has no IPv6: every frame is ours.
    assert_eq!(redirect[0]["count"], 30, "{errors:?}");
    let text = env.run_ok(&["status"]);
    assert!(text.contains("XDP errors by interface") && text.contains(&sb.host_if), "{text}");
    env.run_ok(&["down", "--auto-approve"]);
}

#[test]
fn ipv6_peers_and_ipv4_mapped_peers_are_charged_to_their_own_family_watch() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    // IPv6 on the pair too, unique to this sandbox like its /30.
    let o = sb.peer_ip.octets();
    let v6 = |last: u8| format!("fd00:bf:{}:{}::{last}", o[1], o[2] & !3);
    let prefix6 = format!("fd00:bf:{}:{}::/126", o[1], o[2] & !3);
    let ip = |args: &[&str]| assert!(Command::new("ip").args(args).status().unwrap().success(), "ip {args:?}");
    ip(&["addr", "add", &format!("{}/126", v6(1)), "dev", &sb.host_if, "nodad"]);
    ip(&["-n", &sb.netns, "addr", "add", &format!("{}/126", v6(2)), "dev", &sb.peer_if, "nodad"]);
    let spec = format!(
        "apiVersion: bpfsync/v1\nkind: NodeSpec\ntelemetry:\n  tcp:\n    watch:\n      - name: sandbox-v6\n        prefixes: [\"{}\"]\n      - name: sandbox-v4\n        prefixes: [{}]\n",
        prefix6,
        subnet(&sb)
    );
    let path = write_spec(env.state.path(), "spec.yaml", &spec);
    env.run_ok(&["apply", &path, "--auto-approve"]);

    // A dual-stack server in the namespace: IPv4 peers reach its sockets
    // as IPv4-mapped IPv6 addresses.
    let (tx, rx) = std::sync::mpsc::channel();
    let server = sb.spawn_in_netns(move || {
        let listener = TcpListener::bind("[::]:7311").unwrap();
        tx.send(()).unwrap();
        for _ in 0..3 {
            let (mut c, _) = listener.accept().unwrap();
            let mut buf = Vec::new();
            let _ = c.read_to_end(&mut buf);
        }
    });
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
    // Over IPv6; as a mapped address from an IPv6 socket; over IPv4.
    for addr in [format!("[{}]:7311", v6(2)), format!("[::ffff:{}]:7311", sb.peer_ip), format!("{}:7311", sb.peer_ip)] {
        let mut c = TcpStream::connect(&addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        c.write_all(b"hello").unwrap();
    }
    server.join().unwrap().unwrap();

    let s = status(&env);
    let (v6w, v4w) = (watch(&s, "sandbox-v6"), watch(&s, "sandbox-v4"));
    assert_eq!(v6w["prefixes"], serde_json::json!([prefix6]));
    assert_eq!(v6w["connections"]["opened_active"], 1, "{v6w}");
    assert_eq!(v6w["connections"]["opened_passive"], 1, "{v6w}");
    // Both IPv4 connections, whichever family their sockets have.
    assert_eq!(v4w["connections"]["opened_active"], 2, "{v4w}");
    assert_eq!(v4w["connections"]["opened_passive"], 2, "{v4w}");
    env.run_ok(&["down", "--auto-approve"]);
}

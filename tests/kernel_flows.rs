//! Flow records on the real kernel: real traffic across A — R — B read by
//! the agent and filtered by `bpfsync flows`; `--follow`; a ring buffer
//! overflow reported as lost records; the drop record rate limit; export to
//! a local HTTP collector that goes down and comes back, and to rotated
//! files.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bpfsync::datapath::{FlowConfig, Plain};
use bpfsync::kernel::sys;
use bpfsync::kernel::testrun::run_pinned_on;
use bpfsync::packet::{Packet, Transport, checksum};
use bpfsync::spec::ProgramType;
use common::{Agent, Env, Sandbox, TempDir, edge_spec, wait, write_spec};
use serde_json::Value;

/// `bpfsync flows -o json` against `agent`, parsed.
fn flows(env: &Env, agent: &Agent, args: &[&str]) -> Vec<Value> {
    let addr = format!("127.0.0.1:{}", agent.port);
    let mut full = vec!["flows", "--agent", &addr, "-o", "json"];
    full.extend_from_slice(args);
    env.run_ok(&full).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn seqs(records: &[Value]) -> Vec<u64> {
    records.iter().map(|r| r["seq"].as_u64().unwrap()).collect()
}

fn metric(agent: &Agent, line_prefix: &str) -> f64 {
    agent.metric(line_prefix).unwrap_or_else(|| panic!("no metric line `{line_prefix}`"))
}

/// Sends one ICMP echo request with identifier `id` from inside `sb`
/// (from `src` when given, an address of the namespace).
fn ping(sb: &Sandbox, src: Option<Ipv4Addr>, dst: Ipv4Addr, id: u16) {
    sb.in_netns(move || {
        let mut msg = vec![8u8, 0, 0, 0];
        msg.extend_from_slice(&id.to_be_bytes());
        msg.extend_from_slice(&1u16.to_be_bytes());
        msg.extend_from_slice(b"bpfsync-ping");
        let sum = checksum(&msg, 0);
        msg[2..4].copy_from_slice(&sum.to_be_bytes());
        // SAFETY: plain socket calls on a socket this closure owns.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP);
            assert!(fd >= 0, "raw ICMP socket");
            let addr = |ip: Ipv4Addr| libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: 0,
                sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
                sin_zero: [0; 8],
            };
            if let Some(src) = src {
                let from = addr(src);
                let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
                assert_eq!(libc::bind(fd, (&from as *const libc::sockaddr_in).cast(), len), 0, "bind {src}");
            }
            let sa = addr(dst);
            let n = libc::sendto(
                fd,
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&sa as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            );
            assert_eq!(n, msg.len() as isize);
            libc::close(fd);
        }
    })
    .unwrap();
}

#[test]
fn real_traffic_makes_named_flow_records_that_filters_select_exactly() {
    let env = Env::new();
    let (a, b) = (Sandbox::create().unwrap(), Sandbox::create().unwrap());
    Sandbox::route_through_host(&a, &b).unwrap();
    let (ai, bi, ap, bp) = (a.host_if.clone(), b.host_if.clone(), a.peer_ip, b.peer_ip);
    let spec = edge_spec(
        &a,
        &b,
        &["ports: [{ port: 8080, protocol: tcp }]", "ports: [{ port: 9000, protocol: udp }]", "protocol: icmp"],
    );
    let dir = TempDir::create("bpfsync-flows-spec").unwrap();
    let path = write_spec(dir.path(), "spec.yaml", &spec);
    let agent = Agent::start(&env, std::path::Path::new(&path), "30s");

    // A follower streams what comes after it started: probe flows (a new
    // source port each) until it prints one, however long it takes to
    // connect.
    let mut follower = Command::new(env!("CARGO_BIN_EXE_bpfsync"))
        .args(["flows", "--agent", &format!("127.0.0.1:{}", agent.port), "--follow", "-o", "json"])
        .args(["--to-port", "9000", "--not", "--from-port", "40000"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (line_tx, line_rx) = std::sync::mpsc::channel();
    let follower_out = follower.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(follower_out).lines().map_while(Result::ok) {
            let _ = line_tx.send(line);
        }
    });
    let mut probes = 0u64;
    let followed: Value = loop {
        assert!(probes < 50, "--follow never streamed the probe flow");
        let port = 41000 + probes as u16;
        a.in_netns(move || {
            let s = UdpSocket::bind(SocketAddrV4::new(ap, port)).unwrap();
            s.send_to(b"probe", SocketAddrV4::new(bp, 9000)).unwrap();
        })
        .unwrap();
        probes += 1;
        if let Ok(line) = line_rx.recv_timeout(Duration::from_millis(200)) {
            break serde_json::from_str(&line).unwrap();
        }
    };
    assert_eq!(followed["kind"].as_str(), Some("new"));
    assert!((41000..41000 + probes).contains(&followed["source"]["port"].as_u64().unwrap()), "{followed}");
    let _ = follower.kill();
    let _ = follower.wait();

    // UDP: five datagrams allowed (one flow), five denied fast, then one
    // more denied after the aggregation window.
    a.in_netns(move || {
        // Drop aggregation is per CPU (a flow stays on one CPU under RSS); on
        // veth the sender's CPU is the receiver's, so keep the sender on one.
        pin_to_cpu0();
        let allowed = UdpSocket::bind(SocketAddrV4::new(ap, 40000)).unwrap();
        let denied = UdpSocket::bind(SocketAddrV4::new(ap, 40001)).unwrap();
        for i in 0u8..5 {
            allowed.send_to(&[i], SocketAddrV4::new(bp, 9000)).unwrap();
            denied.send_to(&[i], SocketAddrV4::new(bp, 9999)).unwrap();
        }
        std::thread::sleep(Duration::from_millis(1200));
        denied.send_to(&[9], SocketAddrV4::new(bp, 9999)).unwrap();
    })
    .unwrap();

    // TCP: an allowed connection, closed; a SYN to a port nobody allows.
    let (tx, rx) = std::sync::mpsc::channel();
    let server = b.spawn_in_netns(move || {
        let l = TcpListener::bind(SocketAddrV4::new(bp, 8080)).unwrap();
        tx.send(()).unwrap();
        let (mut c, _) = l.accept().unwrap();
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf).unwrap();
        c.write_all(&buf).unwrap();
    });
    rx.recv().unwrap();
    a.in_netns(move || {
        let mut c = TcpStream::connect_timeout(&SocketAddrV4::new(bp, 8080).into(), Duration::from_secs(5)).unwrap();
        c.write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf).unwrap();
        drop(c);
        let refused = TcpStream::connect_timeout(&SocketAddrV4::new(bp, 7777).into(), Duration::from_millis(300));
        assert!(refused.is_err(), "port 7777 is not allowed");
    })
    .unwrap();
    server.join().unwrap().unwrap();
    // ICMP echo: allowed by protocol from A's address, denied from another
    // address of A's that no rule allows.
    ping(&a, None, bp, 0x1234);
    let other = Ipv4Addr::new(10, 77, 0, 1);
    let status = Command::new("ip").args(["-n", &a.netns, "addr", "add", "10.77.0.1/32", "dev", &a.peer_if]).status();
    assert!(status.unwrap().success());
    ping(&a, Some(other), bp, 0x4321);

    // Wait for the closing records, the echo reply and the denied echo.
    wait("the TCP close and ICMP records", Duration::from_secs(10), || {
        let all = flows(&env, &agent, &["--all"]);
        let fin = all.iter().any(|r| r["kind"] == "update" && r["tcp_flags"].to_string().contains("FIN"));
        let reply = all.iter().any(|r| r["protocol"] == "icmp" && r["destination"]["port"] == 0x1234);
        let denied_echo = all.iter().any(|r| r["protocol"] == "icmp" && r["verdict"] == "DROPPED");
        fin && reply && denied_echo
    });
    let all = flows(&env, &agent, &["--all"]);
    let (ap_s, bp_s) = (ap.to_string(), bp.to_string());
    let default_deny = format!("default deny ingress on {ai} (edge)");

    // What the datapath recorded, flow by flow.
    let udp_new: Vec<&Value> = all.iter().filter(|r| r["source"]["port"] == 40000).collect();
    assert_eq!(udp_new.len(), 1, "one record for the allowed UDP flow: {udp_new:#?}");
    let r = udp_new[0];
    assert_eq!(
        (
            r["kind"].as_str(),
            r["verdict"].as_str(),
            r["rule"].as_str(),
            r["interface"].as_str(),
            r["direction"].as_str()
        ),
        (Some("new"), Some("REDIRECTED"), Some("edge ingress[1]"), Some(ai.as_str()), Some("ingress"))
    );
    assert_eq!(
        (r["source"]["port"].as_u64(), r["packets"].as_u64(), r["ip_version"].as_u64()),
        (Some(40000), Some(1), Some(4))
    );
    let udp_drops: Vec<&Value> = all.iter().filter(|r| r["destination"]["port"] == 9999).collect();
    assert_eq!(
        udp_drops.iter().map(|r| r["packets"].as_u64().unwrap()).collect::<Vec<_>>(),
        [1, 5],
        "the first drop, then four aggregated with the one after the window: {udp_drops:#?}"
    );
    for d in &udp_drops {
        assert_eq!((d["verdict"].as_str(), d["drop_reason"].as_str()), (Some("DROPPED"), Some("default-deny")));
        assert_eq!(d["rule"].as_str(), Some(default_deny.as_str()));
        assert_eq!(d["policies"], serde_json::json!(["edge"]));
    }
    let syn: Vec<&Value> = all
        .iter()
        .filter(|r| r["kind"] == "new" && r["destination"]["port"] == 8080 && r["protocol"] == "tcp")
        .collect();
    assert_eq!(syn.len(), 1, "{syn:#?}");
    assert_eq!(
        (syn[0]["tcp_flags"].clone(), syn[0]["rule"].as_str()),
        (serde_json::json!(["SYN"]), Some("edge ingress[0]"))
    );
    let synack: Vec<&Value> = all.iter().filter(|r| r["kind"] == "new" && r["source"]["port"] == 8080).collect();
    assert_eq!(synack.len(), 1, "the reply direction has its own record: {synack:#?}");
    assert_eq!(
        (synack[0]["interface"].as_str(), synack[0]["rule"].is_null()),
        (Some(bi.as_str()), true),
        "no policy on B's side"
    );
    let closing: Vec<&Value> = all
        .iter()
        .filter(|r| r["kind"] == "update" && r["destination"]["port"] == 8080 && r["protocol"] == "tcp")
        .collect();
    assert!(
        !closing.is_empty() && closing[0]["packets"].as_u64().unwrap() >= 2,
        "FIN reports the connection: {closing:#?}"
    );
    let syn_drop: Vec<&Value> = all.iter().filter(|r| r["destination"]["port"] == 7777).collect();
    assert_eq!(syn_drop.len(), 1, "{syn_drop:#?}");
    assert_eq!(syn_drop[0]["tcp_flags"], serde_json::json!(["SYN"]));
    // (B also answers the UDP to 9000, where nothing listens, with ICMP
    // port unreachable: those records have no echo identifier.)
    let icmp: Vec<&Value> = all
        .iter()
        .filter(|r| r["protocol"] == "icmp" && (r["source"]["port"] == 0x1234 || r["destination"]["port"] == 0x1234))
        .collect();
    assert_eq!(icmp.len(), 2, "the echo and its reply: {icmp:#?}");
    assert_eq!((icmp[0]["rule"].as_str(), icmp[0]["source"]["port"].as_u64()), (Some("edge ingress[2]"), Some(0x1234)));
    let icmp_drop: Vec<&Value> = all.iter().filter(|r| r["protocol"] == "icmp" && r["verdict"] == "DROPPED").collect();
    assert_eq!(icmp_drop.len(), 1, "{icmp_drop:#?}");
    assert_eq!(
        (
            icmp_drop[0]["source"]["ip"].as_str(),
            icmp_drop[0]["source"]["port"].as_u64(),
            icmp_drop[0]["drop_reason"].as_str()
        ),
        (Some("10.77.0.1"), Some(0x4321), Some("default-deny"))
    );

    // Filters return exactly the records that match.
    let expect = |pred: &dyn Fn(&Value) -> bool| -> Vec<u64> {
        seqs(&all.iter().filter(|r| pred(r)).cloned().collect::<Vec<_>>())
    };
    type Predicate<'a> = Box<dyn Fn(&Value) -> bool + 'a>;
    let cases: Vec<(Vec<String>, Predicate)> = vec![
        (vec!["--verdict".into(), "DROPPED".into()], Box::new(|r| r["verdict"] == "DROPPED")),
        (
            vec!["--protocol".into(), "udp".into(), "--to-port".into(), "9000".into()],
            Box::new(|r| r["protocol"] == "udp" && r["destination"]["port"] == 9000),
        ),
        (
            vec!["--not".into(), "--protocol".into(), "udp".into(), "--verdict".into(), "dropped".into()],
            Box::new(|r| r["protocol"] != "udp" && r["verdict"] == "DROPPED"),
        ),
        (
            vec!["--port".into(), "8080".into(), "--port".into(), "9000".into()],
            Box::new(|r| [8080, 9000].iter().any(|p| r["source"]["port"] == *p || r["destination"]["port"] == *p)),
        ),
        (vec!["--from-ip".into(), format!("{bp_s}/32")], Box::new(|r| r["source"]["ip"] == bp_s.as_str())),
        (
            vec!["--ip".into(), format!("{}/24", Ipv4Addr::from(u32::from(bp) & 0xffff_ff00))],
            Box::new(|r| {
                let net = u32::from(bp) & 0xffff_ff00;
                let inside = |v: &Value| {
                    v.as_str()
                        .and_then(|s| s.parse::<Ipv4Addr>().ok())
                        .is_some_and(|x| u32::from(x) & 0xffff_ff00 == net)
                };
                inside(&r["source"]["ip"]) || inside(&r["destination"]["ip"])
            }),
        ),
        (vec!["--to-ip".into(), ap_s.clone()], Box::new(|r| r["destination"]["ip"] == ap_s.as_str())),
        (vec!["--interface".into(), bi.clone()], Box::new(|r| r["interface"] == bi.as_str())),
        (
            vec!["--policy".into(), "edge".into()],
            Box::new(|r| r["policies"].as_array().is_some_and(|p| p.contains(&"edge".into()))),
        ),
        (vec!["--type".into(), "update".into()], Box::new(|r| r["kind"] == "update")),
        (vec!["--from-port".into(), "40001".into()], Box::new(|r| r["source"]["port"] == 40001)),
    ];
    for (args, pred) in &cases {
        let mut full: Vec<&str> = args.iter().map(String::as_str).collect();
        full.push("--all");
        // Records may still come (late closing segments): compare up to the snapshot.
        let upto = seqs(&all).last().copied().unwrap();
        let got: Vec<u64> = seqs(&flows(&env, &agent, &full)).into_iter().filter(|s| *s <= upto).collect();
        let want = expect(pred.as_ref());
        assert!(!want.is_empty(), "{args:?} should match something");
        assert_eq!(got, want, "bpfsync flows {args:?}");
    }
    let now_all = seqs(&flows(&env, &agent, &["--all"]));
    let last2 = seqs(&flows(&env, &agent, &["--last", "2"]));
    assert_eq!(last2, now_all[now_all.len() - 2..]);
    assert!(flows(&env, &agent, &["--since", "2100-01-01T00:00:00Z"]).is_empty());
    let since: Vec<u64> = seqs(&flows(&env, &agent, &["--since", "10m"]));
    assert_eq!(since[..all.len()], seqs(&all)[..], "everything so far is within the last 10 minutes");

    // The compact and table outputs.
    let addr = format!("127.0.0.1:{}", agent.port);
    let compact = env.run_ok(&["flows", "--agent", &addr, "--from-port", "40000"]);
    assert!(
        compact
            .trim_end()
            .ends_with(&format!("{ai} ingress {ap}:40000 -> {bp}:9000 udp REDIRECTED by edge ingress[1]")),
        "{compact}"
    );
    let table = env.run_ok(&["flows", "--agent", &addr, "-o", "table", "--verdict", "DROPPED"]);
    assert!(table.starts_with("TIME") && table.contains("DROPPED (default-deny)"), "{table}");
    let bad = env.run(&["flows", "--agent", &addr, "--port", "http"]);
    assert!(!bad.status.success() && common::stderr(&bad).contains("--port http"), "{}", common::stderr(&bad));

    // Metrics: flows by verdict/direction/protocol, drops by reason, rule hits.
    assert_eq!(metric(&agent, r#"bpfsync_flows_total{verdict="DROPPED",direction="ingress",protocol="udp"}"#), 2.0);
    assert_eq!(
        metric(&agent, r#"bpfsync_flow_packets_total{verdict="DROPPED",direction="ingress",protocol="udp"}"#),
        6.0
    );
    let icmp_flows = all.iter().filter(|r| r["protocol"] == "icmp" && r["kind"] == "new").count();
    assert_eq!(
        metric(&agent, r#"bpfsync_flows_total{verdict="REDIRECTED",direction="ingress",protocol="icmp"}"#),
        icmp_flows as f64
    );
    assert!(metric(&agent, r#"bpfsync_drops_total{reason="default-deny",direction="ingress"}"#) >= 8.0);
    assert_eq!(metric(&agent, r#"bpfsync_rule_hits_total{rule="edge ingress[1]"}"#), (5 + probes) as f64);
    assert_eq!(metric(&agent, r#"bpfsync_lost_events_total{kind="new"}"#), 0.0);
    agent.stop();
}

fn pin(env: &Env, program: &str) -> std::path::PathBuf {
    let dir = env.bpffs.root().join("programs").join(program);
    std::fs::read_dir(dir).unwrap().next().unwrap().unwrap().path()
}

fn set_flow_config(env: &Env, c: FlowConfig) {
    let fd = sys::obj_get(&env.bpffs.root().join("maps/mesh/flow_config")).unwrap();
    sys::map_update(fd.as_fd(), &0u32.to_ne_bytes(), c.as_bytes()).unwrap();
}

/// UDP from 10.200.x.y:port to 10.99.0.1:`dport`, distinct per `i`.
fn distinct_udp(i: u32, dport: u16) -> Vec<u8> {
    let src = Ipv4Addr::new(10, 200, (i >> 16) as u8, (i >> 8) as u8);
    let sport = 1024 + (i & 0xff) as u16;
    Packet::new(IpAddr::V4(src), "10.99.0.1".parse().unwrap(), Transport::Udp { sport, dport }).build()
}

/// Pins the calling thread to CPU 0: the drop rate limit is per CPU.
fn pin_to_cpu0() {
    // SAFETY: a zeroed cpu_set_t with one bit set, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set), 0);
    }
}

/// Drops waiting in `drop_slots` for their flow's next record, all CPUs.
fn pending_drops(env: &Env) -> u64 {
    const SLOT: usize = 80; // struct drop_slot; packets at offset 56
    let fd = sys::obj_get(&env.bpffs.root().join("maps/mesh/drop_slots")).unwrap();
    let cpus = sys::possible_cpus();
    let mut value = vec![0u8; SLOT * cpus];
    (0u32..4096)
        .map(|i| {
            sys::map_lookup(fd.as_fd(), &i.to_ne_bytes(), &mut value).unwrap();

            (0..cpus).map(|c| u64::from_ne_bytes(value[c * SLOT + 56..c * SLOT + 64].try_into().unwrap())).sum::<u64>()
        })
        .sum()
}

fn stats_json(env: &Env) -> Value {
    serde_json::from_str(&env.run_ok(&["stats", "--interval", "10ms", "-o", "json"])).unwrap()
}

#[test]
fn a_ring_buffer_overflow_is_counted_as_lost_and_drop_records_are_rate_limited() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    sb.disable_ipv6().unwrap(); // nothing but the test's packets
    let iface = sb.host_if.clone();
    let spec = format!(
        "apiVersion: bpfsync/v1\nkind: NodeSpec\ninterfaces:\n  - {{ name: {iface}, mesh: {{ mode: skb }} }}\npolicies:\n  - name: only\n    interfaces: [{iface}]\n    ingress:\n      - from: [10.9.9.9/32]\n"
    );
    let path = write_spec(env.state.path(), "spec.yaml", &spec);
    env.run_ok(&["apply", &path, "--auto-approve"]);
    let prog = pin(&env, "mesh");

    // No reader yet: 60,000 new flows on `lo` (no policy there) overflow the
    // 4 MiB ring buffer (88 bytes a record: 47,662 fit).
    const FLOWS: u32 = 60_000;
    for i in 0..FLOWS {
        let r = run_pinned_on(&prog, ProgramType::Xdp, &distinct_udp(i, 9000), 1, None).unwrap();
        assert_eq!(r.return_value, 2, "XDP_PASS");
    }
    let lost = stats_json(&env)["flow_records"]["lost-new"].as_u64().unwrap();
    assert_eq!(lost, (FLOWS - 47_662) as u64, "the records that did not fit are counted");

    // The agent drains what fit; read + lost = every flow, exactly.
    let dir = TempDir::create("bpfsync-flows-spec").unwrap();
    let spec_path = write_spec(dir.path(), "spec.yaml", &spec);
    let agent = Agent::start_with(&env, std::path::Path::new(&spec_path), "30s", &["--flow-history", "100000"]);
    wait("the ring buffer drained", Duration::from_secs(20), || {
        agent.metric("bpfsync_flow_records_total").unwrap_or(0.0) >= 47_662.0
    });
    assert_eq!(metric(&agent, "bpfsync_flow_records_total") as u64 + lost, FLOWS as u64);
    assert_eq!(metric(&agent, r#"bpfsync_lost_events_total{kind="new"}"#) as u64, lost);
    let drained = flows(&env, &agent, &["--all", "--interface", "lo", "--to-port", "9000"]);
    assert_eq!(drained.len(), 47_662);

    // Drops on the policy's interface from 3,000 distinct peers in a burst:
    // at most 100 records a second on this CPU; the rest wait in their
    // flow's slot, and the records not made are counted.
    set_flow_config(&env, FlowConfig { drop_records_per_sec: 100, ..Default::default() });
    pin_to_cpu0();
    let ifindex = sys::ifindex(&iface).unwrap();
    const DROPS: u32 = 3_000;
    let started = std::time::Instant::now();
    for i in 0..DROPS {
        let r = run_pinned_on(&prog, ProgramType::Xdp, &distinct_udp(100_000 + i, 53), 1, Some(ifindex)).unwrap();
        assert_eq!(r.return_value, 1, "XDP_DROP by default deny");
    }
    let windows = started.elapsed().as_secs() + 1;
    // Every drop is in a record, waits in its flow's slot, or is counted as
    // in no record (its slot went to another flow while the limit was spent).
    let drop_query = ["--all", "--verdict", "DROPPED", "--to-port", "53"];
    let in_records = || flows(&env, &agent, &drop_query).iter().map(|r| r["packets"].as_u64().unwrap()).sum::<u64>();
    wait("the drop records", Duration::from_secs(10), || {
        let unrecorded = stats_json(&env)["flow_records"]["unrecorded-drop"].as_u64().unwrap();
        in_records() + pending_drops(&env) + unrecorded == DROPS as u64
    });
    let made = flows(&env, &agent, &drop_query).len() as u64;
    assert!(made >= 100 && made <= 100 * (windows + 1), "{made} records in {windows} one-second windows");
    let suppressed = stats_json(&env)["flow_records"]["suppressed-drop"].as_u64().unwrap();
    assert!(suppressed > 0);
    // The next drop record, a window later, says how many were not made.
    std::thread::sleep(Duration::from_millis(1100));
    run_pinned_on(&prog, ProgramType::Xdp, &distinct_udp(999_999, 53), 1, Some(ifindex)).unwrap();
    wait("the record after the burst", Duration::from_secs(10), || {
        flows(&env, &agent, &drop_query).len() as u64 > made
    });
    let records = flows(&env, &agent, &["--all", "--verdict", "DROPPED"]);
    let carried: u64 = records.iter().map(|r| r["suppressed"].as_u64().unwrap_or(0)).sum();
    let suppressed_since = stats_json(&env)["flow_records"]["suppressed-drop"].as_u64().unwrap();
    assert_eq!(carried, suppressed_since, "every record not made is accounted for by the next record");
    assert_eq!(metric(&agent, "bpfsync_flow_records_suppressed_total") as u64, suppressed_since);
    agent.stop();
}

/// A collector on a loopback port that stores every JSON line POSTed to
/// it; `up` off closes the listener (connections are refused).
struct Collector {
    port: u16,
    lines: Arc<Mutex<Vec<String>>>,
    up: Arc<AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Collector {
    fn start() -> Collector {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let c =
            Collector { port, lines: Arc::default(), up: Arc::new(AtomicBool::new(false)), thread: Mutex::new(None) };
        c.bring_up();
        c
    }

    fn bring_up(&self) {
        let listener = (0..100)
            .find_map(|_| {
                let l = TcpListener::bind(("127.0.0.1", self.port));
                if l.is_err() {
                    std::thread::sleep(Duration::from_millis(50));
                }
                l.ok()
            })
            .expect("the collector's port comes back");
        listener.set_nonblocking(true).unwrap();
        self.up.store(true, Ordering::SeqCst);
        let (lines, up) = (self.lines.clone(), self.up.clone());
        let thread = std::thread::spawn(move || {
            while up.load(Ordering::SeqCst) {
                let Ok((mut s, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut len = 0usize;
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0u8; len];
                if r.read_exact(&mut body).is_err() {
                    continue;
                }
                lines.lock().unwrap().extend(String::from_utf8(body).unwrap().lines().map(str::to_string));
                let _ = s.write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n");
            }
            // Dropping the listener refuses new connections.
        });
        *self.thread.lock().unwrap() = Some(thread);
    }

    fn take_down(&self) {
        self.up.store(false, Ordering::SeqCst);
        if let Some(t) = self.thread.lock().unwrap().take() {
            t.join().unwrap();
        }
    }

    fn received(&self) -> BTreeSet<u64> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["seq"].as_u64().unwrap())
            .collect()
    }
}

#[test]
fn export_reaches_a_collector_that_goes_down_and_comes_back_and_rotated_files() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    sb.disable_ipv6().unwrap();
    let spec = format!(
        "apiVersion: bpfsync/v1\nkind: NodeSpec\ninterfaces:\n  - {{ name: {}, mesh: {{ mode: skb }} }}\n",
        sb.host_if
    );
    let dir = TempDir::create("bpfsync-flows-export").unwrap();
    let spec_path = write_spec(dir.path(), "spec.yaml", &spec);
    let collector = Collector::start();
    let file = dir.path().join("out/flows.jsonl");
    let agent = Agent::start_with(
        &env,
        std::path::Path::new(&spec_path),
        "30s",
        &[
            "--flow-export-http",
            &format!("http://127.0.0.1:{}/ingest", collector.port),
            "--flow-export-file",
            file.to_str().unwrap(),
            "--flow-export-file-max-size",
            "64k",
            "--flow-export-file-keep",
            "100",
            "--flow-export-buffer",
            "400",
            "--flow-export-batch",
            "100",
        ],
    );
    let prog = pin(&env, "mesh");
    let send = |from: u32, n: u32| {
        for i in from..from + n {
            run_pinned_on(&prog, ProgramType::Xdp, &distinct_udp(i, 7000), 1, None).unwrap();
        }
    };
    let exported =
        |sink: &str| agent.metric(&format!("bpfsync_flow_exported_total{{sink=\"{sink}\"}}")).unwrap_or(0.0) as u64;

    send(0, 300);
    wait("300 flows at the collector", Duration::from_secs(20), || collector.received().len() == 300);

    // Down: batches fail and are retried; the queue (400) plus the batch in
    // flight (at most 100) hold at most 500 of the next 700: the oldest
    // 200 or more are dropped, and counted.
    collector.take_down();
    for chunk in 0..7 {
        send(300 + chunk * 100, 100); // in steps the file sink keeps up with
        std::thread::sleep(Duration::from_millis(100));
    }
    wait("a failed export attempt", Duration::from_secs(20), || {
        agent.metric(r#"bpfsync_flow_export_errors_total{sink="http"}"#).unwrap_or(0.0) >= 1.0
    });
    wait("the queue to overflow", Duration::from_secs(20), || {
        agent.metric(r#"bpfsync_flow_export_dropped_total{sink="http"}"#).unwrap_or(0.0) >= 200.0
    });
    collector.bring_up();
    let dropped = || agent.metric(r#"bpfsync_flow_export_dropped_total{sink="http"}"#).unwrap_or(0.0) as u64;
    wait("the backlog delivered", Duration::from_secs(40), || exported("http") + dropped() == 1000);
    let got = collector.received();
    assert!((200..=300).contains(&dropped()), "queue 400 + at most one batch of 100 in flight: {} dropped", dropped());
    assert_eq!(got.len() as u64 + dropped(), 1000, "every flow is delivered or counted as dropped");
    assert!((1..=300).all(|s| got.contains(&s)), "everything before the outage arrived");
    assert!((601..=1000).all(|s| got.contains(&s)), "the newest records are kept, the oldest dropped");

    // The file sink never failed: all 1,000 records, across rotated files.
    wait("the file export", Duration::from_secs(20), || exported("file") == 1000);
    let mut in_files = BTreeSet::new();
    let mut files = 0;
    for e in std::fs::read_dir(file.parent().unwrap()).unwrap() {
        let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
        files += 1;
        for l in text.lines() {
            in_files.insert(serde_json::from_str::<Value>(l).unwrap()["seq"].as_u64().unwrap());
        }
    }
    assert!(files >= 3, "rotated at 64 KiB: {files} files");
    assert_eq!(in_files, (1..=1000).collect::<BTreeSet<u64>>());
    assert_eq!(metric(&agent, r#"bpfsync_flow_export_dropped_total{sink="file"}"#), 0.0);
    agent.stop();
}

#[test]
fn spec_flow_settings_reach_the_datapath_and_long_lived_flows_get_updates() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    sb.disable_ipv6().unwrap();
    let head = format!(
        "apiVersion: bpfsync/v1\nkind: NodeSpec\ninterfaces:\n  - {{ name: {}, mesh: {{ mode: skb }} }}\n",
        sb.host_if
    );
    let dir = TempDir::create("bpfsync-flows-settings").unwrap();
    let spec_path = write_spec(dir.path(), "spec.yaml", &format!("{head}flows:\n  report-interval: 1s\n"));
    let agent = Agent::start(&env, std::path::Path::new(&spec_path), "30s");
    let prog = pin(&env, "mesh");
    let config = || {
        let fd = sys::obj_get(&env.bpffs.root().join("maps/mesh/flow_config")).unwrap();
        let mut v = [0u8; 24];
        sys::map_lookup(fd.as_fd(), &0u32.to_ne_bytes(), &mut v).unwrap();
        v
    };
    assert_eq!(u64::from_ne_bytes(config()[8..16].try_into().unwrap()), 1_000_000_000, "report interval from the spec");

    // A long-lived flow: five packets, then one more after the interval.
    let packet = distinct_udp(1, 7000);
    for _ in 0..5 {
        run_pinned_on(&prog, ProgramType::Xdp, &packet, 1, None).unwrap();
    }
    std::thread::sleep(Duration::from_millis(1100));
    run_pinned_on(&prog, ProgramType::Xdp, &packet, 1, None).unwrap();
    let query = ["--all", "--to-port", "7000"];
    wait("the update record", Duration::from_secs(10), || flows(&env, &agent, &query).len() == 2);
    let records = flows(&env, &agent, &query);
    assert_eq!(records[0]["kind"], "new");
    assert_eq!(
        (records[1]["kind"].as_str(), records[1]["packets"].as_u64()),
        (Some("update"), Some(5)),
        "{records:#?}"
    );
    assert_eq!(records[1]["bytes"].as_u64(), Some(5 * packet.len() as u64));

    // `enabled: false`: no records, the counters still count.
    std::fs::write(&spec_path, format!("{head}flows:\n  enabled: false\n")).unwrap();
    wait("records turned off", Duration::from_secs(10), || u32::from_ne_bytes(config()[..4].try_into().unwrap()) == 1);
    let udp_before = stats_json(&env)["protocols"]["ingress/udp"]["packets"].as_u64().unwrap();
    run_pinned_on(&prog, ProgramType::Xdp, &distinct_udp(2, 7001), 1, None).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(flows(&env, &agent, &["--all", "--to-port", "7001"]).is_empty());
    assert_eq!(stats_json(&env)["protocols"]["ingress/udp"]["packets"].as_u64().unwrap(), udp_before + 1);
    agent.stop();
}

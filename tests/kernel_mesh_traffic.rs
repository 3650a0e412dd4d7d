//! Real traffic across three namespaces, A — R — B: R is the root
//! namespace running the `mesh` datapath on both veth ends. Routes forward
//! UDP and TCP from A to B and back; a port the policy does not allow is
//! really dropped; `bpfsync status` counts what was sent.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::thread::JoinHandle;
use std::time::Duration;

use common::{Env, Sandbox, edge_spec, write_spec};
use serde_json::Value;

/// Counts UDP datagrams arriving on `port` until `quiet` passes without one.
fn udp_sink(sb: &Sandbox, addr: Ipv4Addr, port: u16) -> JoinHandle<std::io::Result<u64>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = sb.spawn_in_netns(move || {
        let s = UdpSocket::bind(SocketAddrV4::new(addr, port)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(1500))).unwrap();
        tx.send(()).unwrap();
        let mut n = 0;
        let mut buf = [0u8; 2048];
        while s.recv(&mut buf).is_ok() {
            n += 1;
        }
        n
    });
    rx.recv().unwrap();
    h
}

#[test]
fn routes_forward_udp_and_tcp_between_namespaces_and_policy_drops_a_port() {
    let env = Env::new();
    let (a, b) = (Sandbox::create().unwrap(), Sandbox::create().unwrap());
    // A and B reach each other through R, which knows both as neighbours
    // (bpfsync reads their MACs from that table).
    Sandbox::route_through_host(&a, &b).unwrap();
    let spec = edge_spec(&a, &b, &["ports: [{ port: 8080, protocol: tcp }]", "ports: [{ port: 9000, protocol: udp }]"]);
    let path = write_spec(env.state.path(), "spec.yaml", &spec);
    let out = env.run_ok(&["apply", &path, "--auto-approve"]);
    assert!(!out.contains("Conflicts"), "{out}");

    // UDP: an allowed port and a denied one.
    const N: u64 = 20;
    let allowed = udp_sink(&b, b.peer_ip, 9000);
    let denied = udp_sink(&b, b.peer_ip, 9999);
    let (src, dst) = (a.peer_ip, b.peer_ip);
    a.in_netns(move || {
        let s = UdpSocket::bind(SocketAddrV4::new(src, 0)).unwrap();
        for i in 0..N {
            s.send_to(&i.to_be_bytes(), SocketAddrV4::new(dst, 9000)).unwrap();
            s.send_to(&i.to_be_bytes(), SocketAddrV4::new(dst, 9999)).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
    })
    .unwrap();
    assert_eq!(allowed.join().unwrap().unwrap(), N, "every datagram to the allowed port arrives");
    assert_eq!(denied.join().unwrap().unwrap(), 0, "the port the policy does not allow is dropped");

    // TCP: a connection from A to B, both directions through R.
    let (tx, rx) = std::sync::mpsc::channel();
    let server = b.spawn_in_netns(move || {
        let l = TcpListener::bind(SocketAddrV4::new(dst, 8080)).unwrap();
        tx.send(()).unwrap();
        let (mut c, _) = l.accept().unwrap();
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf).unwrap();
        c.write_all(&buf).unwrap();
        buf
    });
    rx.recv().unwrap();
    let echoed = a
        .in_netns(move || {
            let mut c =
                TcpStream::connect_timeout(&SocketAddrV4::new(dst, 8080).into(), Duration::from_secs(5)).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            c.write_all(b"hello").unwrap();
            let mut buf = [0u8; 5];
            c.read_exact(&mut buf).unwrap();
            buf
        })
        .unwrap();
    assert_eq!(&server.join().unwrap().unwrap(), b"hello");
    assert_eq!(&echoed, b"hello");
    std::thread::sleep(Duration::from_millis(200)); // the closing segments

    // The counters in `bpfsync status` match the traffic.
    let status: Value = serde_json::from_str(&env.run_ok(&["status", "-o", "json"])).unwrap();
    let mesh = &status["mesh"];
    let packets = |section: &str, name: &str| mesh[section][name]["packets"].as_u64().unwrap_or(0);
    assert_eq!(packets("rules", "edge ingress[1]"), N, "{mesh:#}");
    let tcp_from_a = packets("rules", "edge ingress[0]");
    assert!(tcp_from_a >= 4, "SYN, ACK, data, FIN at least: {mesh:#}");
    let default_deny = format!("default deny ingress on {} (edge)", a.host_if);
    assert!(packets("rules", &default_deny) >= N, "{mesh:#}");
    assert_eq!(packets("routes", &format!("{}/32", b.peer_ip)), N + tcp_from_a, "A → B forwarded: {mesh:#}");
    assert!(packets("routes", &format!("{}/32", a.peer_ip)) >= 3, "B → A forwarded: {mesh:#}");
    assert_eq!(packets("verdicts", "ingress/drop-default"), packets("rules", &default_deny), "{mesh:#}");
    // Per interface: every policy drop was on A's end, on the way in.
    let on_a = format!("{}/ingress", a.host_if);
    assert_eq!(packets("interface_drops", &on_a), packets("rules", &default_deny), "{mesh:#}");
    assert_eq!(mesh["interface_drops"].as_object().map(|m| m.len()), Some(1), "{mesh:#}");
    for feature in ["lpm_trie", "lru_hash", "tcx"] {
        assert_eq!(status["features"][feature], Value::Bool(true), "{feature} probed: {:#}", status["features"]);
    }
    let text = env.run_ok(&["status"]);
    assert!(text.contains("MESH DATAPATH") && text.contains("edge ingress[1]"), "{text}");

    // `stats`: A's end drops what arrives for the denied port — its drop
    // rate against the interface's own packet counter.
    let sender = a.spawn_in_netns(move || {
        let s = UdpSocket::bind(SocketAddrV4::new(src, 0)).unwrap();
        for i in 0..600u64 {
            s.send_to(&i.to_be_bytes(), SocketAddrV4::new(dst, 9999)).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    std::thread::sleep(Duration::from_millis(100));
    let stats: Value = serde_json::from_str(&env.run_ok(&["stats", "--interval", "500ms", "-o", "json"])).unwrap();
    sender.join().unwrap().unwrap();
    let on_a = &stats["interfaces"][format!("{}/ingress", a.host_if)];
    assert!(on_a["drops_per_second"].as_f64().unwrap() > 100.0, "{stats:#}");
    let ratio = on_a["drop_ratio"].as_f64().unwrap();
    assert!(ratio > 0.8 && ratio <= 1.0, "nearly every packet A sends now is dropped: {stats:#}");

    // The UDP rule goes (and with it the ids of its set): the counters of
    // rules that are gone go with them, after the apply.
    let spec = edge_spec(&a, &b, &["ports: [{ port: 8080, protocol: tcp }]"]);
    let path = write_spec(env.state.path(), "spec.yaml", &spec);
    env.run_ok(&["apply", &path, "--auto-approve"]);
    let status: Value = serde_json::from_str(&env.run_ok(&["status", "-o", "json"])).unwrap();
    let rules = status["mesh"]["rules"].as_object().unwrap();
    let stale: Vec<&String> = rules.keys().filter(|k| k.contains("no longer in the spec")).collect();
    assert!(stale.is_empty(), "counters of rules that are gone: {stale:?}");
    assert!(!rules.contains_key("edge ingress[1]"), "{rules:?}");
    // The routes stay, and so do their counters.
    let forwarded = status["mesh"]["routes"][format!("{}/32", b.peer_ip)]["packets"].as_u64().unwrap_or(0);
    assert!(forwarded > 0, "{status:#}");

    env.run_ok(&["down", "--auto-approve"]);
}

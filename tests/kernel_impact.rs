//! `plan --impact` on the real kernel: traffic between namespaces under one
//! policy is recorded by the agent; for a spec that tightens the policy,
//! the impact names exactly the flows that the new policy, once applied,
//! really drops — checked by sending the same traffic again.

mod common;

use std::net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use common::{Agent, Env, Sandbox, wait, write_spec};
use serde_json::Value;

const TCP_PORTS: [u16; 2] = [7001, 7002];
const UDP_PORTS: [u16; 2] = [7101, 7105];

fn spec(sb: &Sandbox, rules: &str) -> String {
    format!(
        "apiVersion: bpfsync/v1\nkind: NodeSpec\ninterfaces:\n  - {{ name: {iface}, mesh: {{ mode: skb }} }}\npolicies:\n  - name: api\n    interfaces: [{iface}]\n    ingress:\n      - from: [{peer}/32]\n        ports: [{rules}]\n",
        iface = sb.host_if,
        peer = sb.peer_ip
    )
}

/// Which of the test's connections get through now: (service, reached).
fn traffic(sb: &Sandbox, udp: &[UdpSocket]) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    for port in TCP_PORTS {
        let to = SocketAddr::V4(SocketAddrV4::new(sb.host_ip, port));
        let ok = sb.in_netns(move || TcpStream::connect_timeout(&to, Duration::from_millis(700)).is_ok()).unwrap();
        out.push((format!("tcp/{port}"), ok));
    }
    for (port, socket) in UDP_PORTS.iter().zip(udp) {
        sb.send_udp(*port, 1, Duration::ZERO).unwrap();
        let mut buf = [0u8; 64];
        out.push((format!("udp/{port}"), socket.recv(&mut buf).is_ok()));
    }
    out
}

fn services(groups: &Value) -> Vec<String> {
    let mut out: Vec<String> =
        groups.as_array().unwrap().iter().map(|g| g["service"].as_str().unwrap().to_string()).collect();
    out.sort();
    out
}

#[test]
fn impact_names_exactly_the_flows_a_tightened_policy_then_drops() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    sb.disable_ipv6().unwrap();
    let _listeners: Vec<TcpListener> =
        TCP_PORTS.iter().map(|p| TcpListener::bind(SocketAddrV4::new(sb.host_ip, *p)).unwrap()).collect();
    let udp: Vec<UdpSocket> = UDP_PORTS
        .iter()
        .map(|p| {
            let s = UdpSocket::bind(SocketAddrV4::new(sb.host_ip, *p)).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(700))).unwrap();
            s
        })
        .collect();

    let loose =
        spec(&sb, "{ port: 7001, end-port: 7002, protocol: tcp }, { port: 7101, end-port: 7110, protocol: udp }");
    let tight = spec(&sb, "{ port: 7001, protocol: tcp }, { port: 7101, protocol: udp }");
    let loose_path = write_spec(env.state.path(), "spec.yaml", &loose);
    let tight_path = write_spec(env.state.path(), "tight.yaml", &tight);
    let agent = Agent::start(&env, std::path::Path::new(&loose_path), "30s");
    let addr = format!("127.0.0.1:{}", agent.port);

    let before = traffic(&sb, &udp);
    assert!(before.iter().all(|(_, ok)| *ok), "everything gets through the loose policy: {before:?}");
    // The agent has read every connection's record.
    wait("the flow records", Duration::from_secs(10), || {
        let out = env.run(&["flows", "--agent", &addr, "--all", "-o", "json"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        TCP_PORTS.iter().chain(&UDP_PORTS).all(|p| text.contains(&format!("\"port\":{p}}}")))
    });

    // From the agent's history.
    let out = env.run(&["plan", &tight_path, "--impact", "--agent", &addr, "-o", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", common::stderr(&out));
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["format_version"], "1.3");
    let impact = &plan["impact"];
    assert_eq!(services(&impact["newly_dropped"]), ["tcp/7002", "udp/7105"], "{impact:#}");
    assert_eq!(services(&impact["newly_allowed"]), Vec::<String>::new());
    for g in impact["newly_dropped"].as_array().unwrap() {
        assert_eq!(g["source"], format!("{}/32", sb.peer_ip));
        assert_eq!(g["before"], "api ingress[0]");
        assert_eq!(g["after"], format!("default deny ingress on {} (api)", sb.host_if));
    }
    assert!(impact["unchanged"].as_u64().unwrap() >= 2, "{impact:#}");

    // The same from a file, as a CI job would run it; the gate's exit code.
    let exported = env.run_ok(&["flows", "--agent", &addr, "--all", "-o", "json"]);
    let flows_file = write_spec(env.state.path(), "flows.jsonl", &exported);
    let out = env.run(&["plan", &tight_path, "--impact", "--flows", &flows_file, "-o", "json"]);
    let from_file: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(from_file["impact"]["newly_dropped"], impact["newly_dropped"]);
    let gate = env.run(&["plan", &tight_path, "--impact", "--flows", &flows_file, "--fail-on-new-drops"]);
    assert_eq!(gate.status.code(), Some(3), "{}", common::stdout(&gate));
    let text = common::stdout(&gate);
    eprintln!("{text}");
    assert!(text.contains("2 flows newly dropped"), "{text}");
    assert!(text.contains(&format!("tcp/7002 {}/32 -> {}", sb.peer_ip, sb.host_ip)), "{text}");
    // Offline, as a CI job runs it: a snapshot of the node beside the flows.
    let snapshot = write_spec(env.state.path(), "observed.yaml", &env.run_ok(&["status", "--snapshot"]));
    let offline = std::process::Command::new(env!("CARGO_BIN_EXE_bpfsync"))
        .args(["--bpffs-root", "/nonexistent", "plan", &tight_path, "--observed", &snapshot])
        .args(["--impact", "--flows", &flows_file, "-o", "json"])
        .output()
        .unwrap();
    let offline: Value = serde_json::from_slice(&offline.stdout).unwrap();
    assert_eq!(offline["impact"]["newly_dropped"], impact["newly_dropped"]);
    // Loosening back drops nothing: the gate passes.
    let gate = env.run(&["plan", &loose_path, "--impact", "--flows", &flows_file, "--fail-on-new-drops"]);
    assert_eq!(gate.status.code(), Some(0), "{}", common::stdout(&gate));

    // A file naming more interfaces than it may is refused before any
    // lookup, saying why.
    let line = exported.lines().next().unwrap().to_string();
    let many: String = (0..1_025).map(|i| line.replace(&sb.host_if, &format!("x{i}")) + "\n").collect();
    let many_file = write_spec(env.state.path(), "many.jsonl", &many);
    let out = env.run(&["plan", &tight_path, "--impact", "--flows", &many_file]);
    assert_eq!(out.status.code(), Some(1));
    assert!(common::stderr(&out).contains("name 1025 interfaces, more than 1024"), "{}", common::stderr(&out));

    // Applied, the tight policy drops exactly what the impact named.
    agent.stop();
    env.run_ok(&["apply", &tight_path, "--auto-approve"]);
    let after = traffic(&sb, &udp);
    let dropped: Vec<&str> = after.iter().filter(|(_, ok)| !ok).map(|(s, _)| s.as_str()).collect();
    assert_eq!(dropped, services(&impact["newly_dropped"]), "{after:?}");
    env.run_ok(&["down", "--auto-approve"]);
}

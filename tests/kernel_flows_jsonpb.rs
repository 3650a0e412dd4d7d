//! Hubble's `jsonpb` shape end to end: flow records of real traffic, from
//! `bpfsync flows -o jsonpb` and from an export file written with
//! `--flow-export-file-format jsonpb`, decoded as Hubble's
//! `GetFlowsResponse` by protobuf's own parser (`tests/fixtures/hubble_decode.py`).

mod common;

use std::time::Duration;

use common::{Agent, Env, Sandbox, wait, write_spec};
use serde_json::Value;

fn decode(text: &str) -> Vec<Value> {
    common::hubble_decode(text).unwrap_or_else(|e| panic!("the decoder refused a line: {e}"))
}

#[test]
fn real_flows_print_and_export_as_hubble_jsonpb() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    sb.disable_ipv6().unwrap();
    let spec = format!(
        "apiVersion: bpfsync/v1\nkind: NodeSpec\ninterfaces:\n  - {{ name: {i}, mesh: {{ mode: skb }} }}\npolicies:\n  - name: api\n    interfaces: [{i}]\n    ingress:\n      - from: [{p}/32]\n        ports: [{{ port: 7301, protocol: udp }}]\n",
        i = sb.host_if,
        p = sb.peer_ip
    );
    let path = write_spec(env.state.path(), "spec.yaml", &spec);
    let export = env.state.path().join("flows.jsonpb");
    let export_arg = export.display().to_string();
    let agent = Agent::start_with(
        &env,
        std::path::Path::new(&path),
        "30s",
        &["--flow-export-file", &export_arg, "--flow-export-file-format", "jsonpb", "--flow-export-batch", "1"],
    );
    sb.send_udp(7301, 1, Duration::ZERO).unwrap();
    sb.send_udp(7399, 1, Duration::ZERO).unwrap();
    let addr = format!("127.0.0.1:{}", agent.port);
    wait("both records exported", Duration::from_secs(10), || {
        std::fs::read_to_string(&export).unwrap_or_default().lines().count() >= 2
    });

    let printed = env.run_ok(&["flows", "--agent", &addr, "--all", "-o", "jsonpb"]);
    let exported = std::fs::read_to_string(&export).unwrap();
    eprintln!("flows -o jsonpb:\n{printed}");
    for text in [printed, exported] {
        let decoded = decode(&text);
        let by_port = |port: u64| {
            decoded
                .iter()
                .map(|d| &d["flow"])
                .find(|f| f["l4"]["UDP"]["destination_port"] == port)
                .unwrap_or_else(|| panic!("no flow to {port}: {decoded:#?}"))
        };
        let allowed = by_port(7301);
        assert_eq!(allowed["verdict"], "FORWARDED");
        assert_eq!(allowed["IP"]["source"], sb.peer_ip.to_string());
        assert_eq!(allowed["IP"]["destination"], sb.host_ip.to_string());
        assert_eq!(allowed["traffic_direction"], "INGRESS");
        assert_eq!(allowed["interface"]["name"], sb.host_if.as_str());
        assert_eq!(allowed["node_name"], bpfsync::flows::host_name());
        let dropped = by_port(7399);
        assert_eq!(dropped["verdict"], "DROPPED");
        assert_eq!(dropped["drop_reason_desc"], "POLICY_DENIED");
    }
    agent.stop();
    env.run_ok(&["down", "--auto-approve"]);
}

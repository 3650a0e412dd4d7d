//! Flow records exported to OpenTelemetry (OTLP/HTTP, JSON): real traffic
//! between a namespace and the node, read by the agent and sent to a
//! receiver that decodes every request with the official OpenTelemetry
//! protobuf definitions (`tests/fixtures/otlp_receiver.py`, PyPI
//! `opentelemetry-proto`). The receiver refuses gzip once (415), is busy
//! once (503 with `Retry-After: 1`) and rejects one record of a batch
//! (partial success): the exporter must fall back, wait, and count.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Agent, Env, Sandbox, TempDir, wait, write_spec};
use serde_json::Value;

struct Receiver {
    child: Child,
    port: u16,
    out: std::path::PathBuf,
}

impl Receiver {
    fn start(dir: &TempDir, answers: &str) -> Receiver {
        let out = dir.path().join("otlp.jsonl");
        let script = common::repo().join("tests/fixtures/otlp_receiver.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(&out)
            .arg(answers)
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 with opentelemetry-proto (pip install opentelemetry-proto)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port = line.trim().parse().unwrap_or_else(|_| panic!("the receiver did not start: {line:?}"));
        Receiver { child, port, out }
    }

    fn requests(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An OTLP `KeyValue` list as a map of key → the value's JSON.
fn attributes(list: &Value) -> std::collections::BTreeMap<String, Value> {
    list.as_array()
        .into_iter()
        .flatten()
        .map(|kv| (kv["key"].as_str().unwrap().to_string(), kv["value"].clone()))
        .collect()
}

#[test]
fn flow_records_reach_an_opentelemetry_receiver_that_decodes_them_with_the_official_definitions() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    sb.disable_ipv6().unwrap();
    let dir = TempDir::create("bpfsync-otlp").unwrap();
    let receiver = Receiver::start(&dir, "415,503,partial");
    let spec = format!(
        "apiVersion: bpfsync/v1\nkind: NodeSpec\ninterfaces:\n  - {{ name: {i}, mesh: {{ mode: skb }} }}\npolicies:\n  - name: api\n    interfaces: [{i}]\n    ingress:\n      - from: [{p}/32]\n        ports: [{{ port: 7201, protocol: udp }}]\n",
        i = sb.host_if,
        p = sb.peer_ip
    );
    let path = write_spec(env.state.path(), "spec.yaml", &spec);
    let endpoint = format!("http://127.0.0.1:{}", receiver.port);
    let agent = Agent::start_with(
        &env,
        std::path::Path::new(&path),
        "30s",
        &["--flow-export-otlp", &endpoint, "--flow-export-batch", "1"],
    );
    sb.send_udp(7201, 1, Duration::ZERO).unwrap();
    sb.send_udp(7299, 1, Duration::ZERO).unwrap();
    sb.send_udp(7201, 1, Duration::ZERO).unwrap();

    // Every log record the receiver took, decoded.
    let records = || -> Vec<Value> {
        receiver
            .requests()
            .iter()
            .filter(|r| r["status"] == 200)
            .flat_map(|r| {
                let logs = &r["request"]["resourceLogs"][0]["scopeLogs"][0]["logRecords"];
                logs.as_array().cloned().unwrap_or_default()
            })
            .collect()
    };
    wait("records of both ports", Duration::from_secs(20), || {
        let ports: Vec<String> = records()
            .iter()
            .map(|r| attributes(&r["attributes"])["destination.port"]["intValue"].as_str().unwrap_or("").to_string())
            .collect();
        ports.iter().any(|p| p == "7201") && ports.iter().any(|p| p == "7299")
    });

    let requests = receiver.requests();
    assert!(requests.iter().all(|r| r.get("error").is_none()), "every body decodes: {requests:#?}");
    assert!(requests.iter().all(|r| r["path"] == "/v1/logs" && r["content_type"] == "application/json"));
    // gzip refused once → uncompressed from then on; busy once → retried
    // after its Retry-After; then a partial success.
    assert_eq!((requests[0]["gzip"].as_bool(), requests[0]["status"].as_u64()), (Some(true), Some(415)));
    assert_eq!((requests[1]["gzip"].as_bool(), requests[1]["status"].as_u64()), (Some(false), Some(503)));
    let waited = requests[2]["time"].as_f64().unwrap() - requests[1]["time"].as_f64().unwrap();
    assert!(waited >= 0.9, "Retry-After: 1 honoured, waited {waited:.3} s");
    assert_eq!(requests[2]["status"], 200);
    assert!(requests[3..].iter().all(|r| r["gzip"] == false));

    let resource = attributes(&requests[2]["request"]["resourceLogs"][0]["resource"]["attributes"]);
    assert_eq!(resource["service.name"]["stringValue"], "bpfsync");
    assert_eq!(resource["service.version"]["stringValue"], env!("CARGO_PKG_VERSION"));
    assert!(!resource["host.name"]["stringValue"].as_str().unwrap().is_empty());

    let all = records();
    let find = |port: &str| {
        all.iter()
            .map(|r| (r, attributes(&r["attributes"])))
            .find(|(_, a)| a["destination.port"]["intValue"] == port)
            .unwrap_or_else(|| panic!("no record to port {port}: {all:#?}"))
    };
    let (record, a) = find("7201");
    assert_eq!(a["source.address"]["stringValue"], sb.peer_ip.to_string());
    assert_eq!(a["destination.address"]["stringValue"], sb.host_ip.to_string());
    assert_eq!(a["network.transport"]["stringValue"], "udp");
    assert_eq!(a["network.type"]["stringValue"], "ipv4");
    assert_eq!(a["bpfsync.verdict"]["stringValue"], "FORWARDED");
    assert_eq!(a["bpfsync.rule"]["stringValue"], "api ingress[0]");
    assert_eq!(a["bpfsync.interface"]["stringValue"], sb.host_if.as_str());
    assert_eq!(a["bpfsync.direction"]["stringValue"], "ingress");
    assert!(a["source.port"]["intValue"].as_str().unwrap().parse::<u16>().unwrap() > 0);
    assert_eq!(record["severityText"], "INFO");
    assert!(record["timeUnixNano"].as_str().unwrap().parse::<u64>().unwrap() > 1_700_000_000_000_000_000);
    eprintln!("a decoded log record: {}", serde_json::to_string_pretty(record).unwrap());
    let (record, a) = find("7299");
    assert_eq!(a["bpfsync.verdict"]["stringValue"], "DROPPED");
    assert_eq!(a["bpfsync.drop_reason"]["stringValue"], "default-deny");
    assert_eq!(record["severityNumber"], "SEVERITY_NUMBER_WARN");

    wait("the rejected record counted", Duration::from_secs(5), || {
        agent.metric("bpfsync_flow_export_rejected_total{sink=\"otlp\"}") == Some(1.0)
    });
    assert!(agent.metric("bpfsync_flow_export_errors_total{sink=\"otlp\"}").unwrap() >= 2.0);

    // A self-healing event (a proposal transition, as `bpfsync proposals
    // approve` logs it) goes the same way, as a log record of its own scope.
    let heal = env.state.path().join("heal");
    std::fs::create_dir_all(&heal).unwrap();
    let entry =
        r#"{"id":"p-42","status":"applied","by":"user:alice","at-unix-ms":1796225193539,"note":"approved in review"}"#;
    std::fs::write(heal.join("history.jsonl"), format!("{entry}\n")).unwrap();
    let heal_record = || {
        receiver.requests().iter().filter(|r| r["status"] == 200).find_map(|r| {
            let scope = &r["request"]["resourceLogs"][0]["scopeLogs"][0];
            (scope["scope"]["name"] == "bpfsync.heal").then(|| scope["logRecords"][0].clone())
        })
    };
    wait("the heal event", Duration::from_secs(10), || heal_record().is_some());
    let event = heal_record().unwrap();
    let a = attributes(&event["attributes"]);
    assert_eq!(a["bpfsync.event"]["stringValue"], "proposal");
    assert_eq!(a["bpfsync.proposal.id"]["stringValue"], "p-42");
    assert_eq!(a["bpfsync.proposal.status"]["stringValue"], "applied");
    assert_eq!(a["bpfsync.proposal.by"]["stringValue"], "user:alice");
    assert_eq!(event["body"]["stringValue"], "proposal p-42 applied by user:alice: approved in review");
    assert_eq!(event["timeUnixNano"], "1796225193539000000");
    assert!(receiver.requests().iter().all(|r| r.get("error").is_none()));

    agent.stop();
    env.run_ok(&["down", "--auto-approve"]);
}

//! Flow export to OpenTelemetry: OTLP over HTTP with JSON bodies
//! (`POST /v1/logs`, the collector's port 4318), one log record per flow
//! record.
//!
//! The body is an `ExportLogsServiceRequest` in the protobuf JSON mapping
//! the OTLP specification prescribes (lowerCamelCase names; 64-bit
//! integers as strings; enums as numbers). Attributes use OpenTelemetry's
//! semantic conventions where they exist — `source.address`,
//! `source.port`, `destination.address`, `destination.port`,
//! `network.transport`, `network.type` — and `bpfsync.*` for the rest.
//!
//! As the specification asks of an exporter: only 429, 502, 503 and 504
//! (and a connection that failed) are retried, after the server's
//! `Retry-After` when it gives one; any other answer drops the batch,
//! counted. A `partialSuccess` in the answer is read and its rejected
//! records counted. Bodies are gzip-compressed; a collector that answers
//! 415 to that gets them uncompressed from then on.

use std::io::{Read as _, Write as _};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use super::export::{SendError, Sent, Sink};
use super::record::{FlowRecord, Verdict};

/// Resource attributes: who sends.
#[derive(Debug, Clone)]
pub struct Resource {
    pub service_name: String,
    pub service_version: String,
    pub host_name: String,
}

impl Resource {
    /// `bpfsync`, this build's version, the node's host name.
    pub fn this_node() -> Resource {
        Resource {
            service_name: "bpfsync".into(),
            service_version: env!("CARGO_PKG_VERSION").into(),
            host_name: super::host_name(),
        }
    }
}

/// A string attribute (`KeyValue`).
pub fn string(key: &str, value: &str) -> Value {
    json!({ "key": key, "value": { "stringValue": value } })
}

/// An integer attribute (`KeyValue`).
pub fn int(key: &str, value: u64) -> Value {
    // int64 in the protobuf JSON mapping: a decimal string.
    json!({ "key": key, "value": { "intValue": value.min(i64::MAX as u64).to_string() } })
}

/// `SeverityNumber`: INFO (9) for traffic let through, WARN (13) for drops.
fn severity(r: &FlowRecord) -> (u8, &'static str) {
    if r.verdict == Verdict::Dropped { (13, "WARN") } else { (9, "INFO") }
}

/// One flow record as an OTLP `LogRecord`.
pub fn log_record(r: &FlowRecord) -> Value {
    let mut attributes = vec![
        string("source.address", &r.source.ip.to_string()),
        int("source.port", r.source.port as u64),
        string("destination.address", &r.destination.ip.to_string()),
        int("destination.port", r.destination.port as u64),
        string("network.type", if r.ip_version == 6 { "ipv6" } else { "ipv4" }),
    ];
    // `network.transport` names OSI transport protocols; ICMP is not one.
    if r.protocol.has_ports() {
        attributes.push(string("network.transport", &r.protocol.to_string()));
    }
    attributes.extend([
        string("bpfsync.protocol", &r.protocol.to_string()),
        string("bpfsync.kind", r.kind.as_str()),
        string("bpfsync.verdict", r.verdict.as_str()),
        string("bpfsync.interface", &r.interface),
        string("bpfsync.direction", r.direction.as_str()),
        int("bpfsync.packets", r.packets),
        int("bpfsync.bytes", r.bytes),
    ]);
    if let Some(reason) = r.drop_reason {
        attributes.push(string("bpfsync.drop_reason", reason.as_str()));
    }
    if let Some(rule) = &r.rule {
        attributes.push(string("bpfsync.rule", rule));
    }
    if !r.tcp_flags.is_empty() {
        attributes.push(string("bpfsync.tcp_flags", &r.tcp_flags.join("|")));
    }
    if r.suppressed > 0 {
        attributes.push(int("bpfsync.suppressed", r.suppressed as u64));
    }
    let (number, text) = severity(r);
    json!({
        "timeUnixNano": r.time.to_string(),
        "observedTimeUnixNano": crate::time::now_unix_ns().to_string(),
        "severityNumber": number,
        "severityText": text,
        "body": { "stringValue": r.compact() },
        "attributes": attributes,
    })
}

/// A batch as an `ExportLogsServiceRequest`.
pub fn request(resource: &Resource, batch: &[Arc<FlowRecord>]) -> Value {
    request_of(resource, FLOW_SCOPE, batch.iter().map(|r| log_record(r)).collect())
}

/// The instrumentation scope of flow records.
pub const FLOW_SCOPE: &str = "bpfsync.flows";
/// The instrumentation scope of self-healing events.
pub const HEAL_SCOPE: &str = "bpfsync.heal";

/// An `ExportLogsServiceRequest` of `records` under `scope`.
pub fn request_of(resource: &Resource, scope: &str, records: Vec<Value>) -> Value {
    json!({
        "resourceLogs": [{
            "resource": { "attributes": [
                string("service.name", &resource.service_name),
                string("service.version", &resource.service_version),
                string("host.name", &resource.host_name),
            ]},
            "scopeLogs": [{
                "scope": { "name": scope, "version": resource.service_version },
                "logRecords": records,
            }],
        }],
    })
}

/// Longest `Retry-After` honoured (longer ones wait this long).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// `Retry-After` in seconds (the HTTP-date form is not used by collectors
/// and is treated as absent).
fn retry_after(value: Option<&str>) -> Option<Duration> {
    value?.trim().parse::<u64>().ok().map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER))
}

/// Records a `partialSuccess` says were rejected (absent: none).
fn rejected(body: &str) -> u64 {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let n = &v["partialSuccess"]["rejectedLogRecords"];
    n.as_u64().or_else(|| n.as_str().and_then(|s| s.parse().ok())).unwrap_or(0)
}

/// Largest answer read from a collector.
const MAX_RESPONSE: u64 = 64 * 1024;

/// POSTs batches to `<endpoint>/v1/logs`.
#[derive(Debug)]
pub struct OtlpSink {
    url: String,
    agent: ureq::Agent,
    resource: Resource,
    gzip: bool,
}

impl OtlpSink {
    /// `endpoint`: the collector's base URL (`http://host:4318`), or the
    /// full logs URL (a path other than `/` is kept as given).
    pub fn new(endpoint: &str, resource: Resource) -> Result<OtlpSink, String> {
        let mut url = url::Url::parse(endpoint).map_err(|e| format!("OTLP endpoint `{endpoint}`: {e}"))?;
        if url.scheme() != "http" {
            return Err(format!("OTLP endpoint `{endpoint}`: only http:// is supported (put a TLS proxy in front)"));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(format!("OTLP endpoint `{endpoint}` has no host"));
        }
        if url.path() == "/" || url.path().is_empty() {
            url.set_path("/v1/logs");
        }
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .redirects(0)
            .build();
        Ok(OtlpSink { url: url.to_string(), agent, resource, gzip: true })
    }

    pub fn url(&self) -> &str {
        &self.url
    }
}

fn gzip(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut e = flate2::write::GzEncoder::new(Vec::with_capacity(bytes.len() / 4), flate2::Compression::fast());
    e.write_all(bytes)?;
    e.finish()
}

impl OtlpSink {
    /// Sends log records made elsewhere (self-healing events) under `scope`.
    pub fn send_records(&mut self, scope: &str, records: Vec<Value>) -> Result<Sent, SendError> {
        let request = request_of(&self.resource, scope, records);
        self.post(&request)
    }

    fn post(&mut self, request: &Value) -> Result<Sent, SendError> {
        let body = serde_json::to_vec(request).expect("a JSON value serialises");
        let mut req = self.agent.post(&self.url).set("Content-Type", "application/json");
        let response = if self.gzip {
            req = req.set("Content-Encoding", "gzip");
            req.send_bytes(&gzip(&body)?)
        } else {
            req.send_bytes(&body)
        };
        match response {
            Ok(r) => {
                let mut text = String::new();
                let _ = r.into_reader().take(MAX_RESPONSE).read_to_string(&mut text);
                Ok(Sent { rejected: rejected(&text) })
            }
            Err(ureq::Error::Status(415, _)) if self.gzip => {
                tracing::warn!(url = %self.url, "the OTLP collector does not take gzip; sending uncompressed");
                self.gzip = false;
                Err(SendError::Retry { error: "collector answered 415 to gzip".into(), after: Some(Duration::ZERO) })
            }
            Err(ureq::Error::Status(code @ (429 | 502 | 503 | 504), r)) => Err(SendError::Retry {
                error: format!("collector answered {code}"),
                after: retry_after(r.header("Retry-After")),
            }),
            Err(ureq::Error::Status(code, r)) => {
                let mut text = String::new();
                let _ = r.into_reader().take(1024).read_to_string(&mut text);
                Err(SendError::Reject { error: format!("collector answered {code}: {}", text.trim()) })
            }
            Err(e) => Err(SendError::Retry { error: e.to_string(), after: None }),
        }
    }
}

impl Sink for OtlpSink {
    fn send(&mut self, batch: &[Arc<FlowRecord>]) -> Result<Sent, SendError> {
        let request = request(&self.resource, batch);
        self.post(&request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_get_the_logs_path_and_are_checked() {
        let r = Resource::this_node();
        assert_eq!(OtlpSink::new("http://127.0.0.1:4318", r.clone()).unwrap().url(), "http://127.0.0.1:4318/v1/logs");
        assert_eq!(OtlpSink::new("http://c:4318/custom/logs", r.clone()).unwrap().url(), "http://c:4318/custom/logs");
        assert!(OtlpSink::new("https://c:4318", r.clone()).unwrap_err().contains("only http://"));
        assert!(OtlpSink::new("nonsense", r).is_err());
    }

    #[test]
    fn retry_after_and_partial_success_are_read() {
        assert_eq!(retry_after(Some("3")), Some(Duration::from_secs(3)));
        assert_eq!(retry_after(Some("99999")), Some(MAX_RETRY_AFTER));
        assert_eq!(retry_after(Some("Wed, 21 Oct 2015 07:28:00 GMT")), None);
        assert_eq!(rejected(r#"{"partialSuccess":{"rejectedLogRecords":"2","errorMessage":"x"}}"#), 2);
        assert_eq!(rejected(r#"{"partialSuccess":{}}"#), 0);
        assert_eq!(rejected("{}"), 0);
        assert_eq!(rejected("not json"), 0);
    }
}

//! The agent's one HTTP listener (loopback by default): `/metrics`,
//! `/healthz`, `/readyz`, `/status` and `/flows`. GET only; a few requests
//! a second from a scraper, probes and `bpfsync flows`, so a small HTTP/1.1
//! responder is enough.
//!
//! `/flows` answers JSON lines, one flow record each. Query parameters:
//! `f=flag:value` (repeated; `!` in front negates; see
//! [`crate::flows::filter`]), `since`/`until` (Unix nanoseconds), `last=N`,
//! and `follow=1`, which keeps the response open and streams new matching
//! records (a `{"skipped": N}` line says the reader outran this client).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use tokio::sync::broadcast::error::RecvError;

use super::Shared;
use crate::flows::hub::Query;
use crate::flows::record::FlowRecord;

pub const NDJSON: &str = "application/x-ndjson";
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, shared).await {
                tracing::debug!(error = %e, "http connection ended");
            }
        });
    }
}

async fn handle(mut stream: TcpStream, shared: Arc<Shared>) -> std::io::Result<()> {
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    // Read the request head (bodies are not used).
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf[len..]))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        if n == 0 {
            return Ok(());
        }
        len += n;
        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") || len == buf.len() {
            break;
        }
    }
    let head = String::from_utf8_lossy(&buf[..len]).into_owned();
    let mut parts = head.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
    let path = target.split('?').next().unwrap_or("/");
    if path == "/flows" && method == "GET" {
        return flows(stream, target, &shared).await;
    }
    let (status, content_type, body) = if method != "GET" && method != "HEAD" {
        (405, "text/plain", "only GET\n".to_string())
    } else {
        route(path, &shared).await
    };
    respond(&mut stream, method, status, content_type, body).await
}

async fn respond(
    stream: &mut TcpStream,
    method: &str,
    status: u16,
    content_type: &str,
    body: String,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    };
    let body = if method == "HEAD" { String::new() } else { body };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

async fn route(path: &str, shared: &Arc<Shared>) -> (u16, &'static str, String) {
    match path {
        "/metrics" => {
            let s = shared.clone();
            let text = tokio::task::spawn_blocking(move || s.metrics.encode()).await.unwrap_or_default();
            (200, OPENMETRICS, text)
        }
        "/healthz" => match shared.unhealthy() {
            None => (200, "text/plain", "ok\n".into()),
            Some(why) => (503, "text/plain", format!("unhealthy: {why}\n")),
        },
        "/readyz" => {
            if shared.state().ready {
                (200, "text/plain", "ready\n".into())
            } else {
                (503, "text/plain", "not ready: no successful reconcile yet\n".into())
            }
        }
        "/status" => {
            let s = shared.clone();
            match tokio::task::spawn_blocking(move || s.status_json()).await {
                Ok(v) => (200, "application/json", serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"),
                Err(e) => (500, "text/plain", format!("{e}\n")),
            }
        }
        _ => (404, "text/plain", "not found: try /metrics, /healthz, /readyz, /status, /flows\n".into()),
    }
}

/// Decodes `%XX` and `+` of a query component.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The `/flows` query, or what is wrong with it.
fn flows_query(target: &str) -> Result<(Query, bool), String> {
    let mut q = Query::default();
    let mut follow = false;
    let params = target.split_once('?').map(|(_, p)| p).unwrap_or("");
    for pair in params.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v);
        let number = |v: &str| v.parse::<u64>().map_err(|_| format!("`{k}={v}`: not a number"));
        match k {
            "f" => q.filter.push_wire(&v)?,
            "since" => q.since = Some(number(&v)?),
            "until" => q.until = Some(number(&v)?),
            "last" => q.last = Some(number(&v)? as usize),
            "follow" => follow = v == "1" || v == "true",
            _ => return Err(format!("unknown parameter `{k}`")),
        }
    }
    Ok((q, follow))
}

fn json_line(r: &FlowRecord) -> String {
    let mut s = serde_json::to_string(r).unwrap_or_default();
    s.push('\n');
    s
}

async fn flows(mut stream: TcpStream, target: &str, shared: &Arc<Shared>) -> std::io::Result<()> {
    let (mut query, follow) = match flows_query(target) {
        Ok(q) => q,
        Err(e) => return respond(&mut stream, "GET", 400, "text/plain", format!("{e}\n")).await,
    };
    let hub = &shared.flows;
    if !follow {
        let body: String = hub.query(&query).iter().map(|r| json_line(r)).collect();
        return respond(&mut stream, "GET", 200, NDJSON, body).await;
    }
    // Subscribe first, then send the history up to the subscription point:
    // nothing falls between the two, and nothing comes twice.
    let (mut live, upto) = hub.subscribe();
    let backlog: String = match query.last {
        Some(_) => hub.query(&query).iter().filter(|r| r.seq <= upto).map(|r| json_line(r)).collect(),
        None => String::new(),
    };
    query.last = None;
    let head =
        format!("HTTP/1.1 200 OK\r\nContent-Type: {NDJSON}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(backlog.as_bytes()).await?;
    let mut probe = [0u8; 64];
    loop {
        tokio::select! {
            got = live.recv() => match got {
                Ok(r) => {
                    if r.seq > upto && query.matches(&r) {
                        stream.write_all(json_line(&r).as_bytes()).await?;
                    }
                }
                Err(RecvError::Lagged(n)) => {
                    stream.write_all(format!("{{\"skipped\":{n}}}\n").as_bytes()).await?;
                }
                Err(RecvError::Closed) => return Ok(()),
            },
            // The client closing its end ends the stream.
            n = stream.read(&mut probe) => {
                if n.unwrap_or(0) == 0 {
                    return Ok(());
                }
            }
        }
    }
}

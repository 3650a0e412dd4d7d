//! The agent's one HTTP listener (loopback by default): `/metrics`,
//! `/healthz`, `/readyz` and `/status`. GET only; a few requests a second
//! from a scraper and probes, so a small HTTP/1.1 responder is enough.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::Shared;

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
    let head = String::from_utf8_lossy(&buf[..len]);
    let mut parts = head.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
    let path = target.split('?').next().unwrap_or("/");
    let (status, content_type, body) = if method != "GET" && method != "HEAD" {
        (405, "text/plain", "only GET\n".to_string())
    } else {
        route(path, &shared).await
    };
    let reason = match status {
        200 => "OK",
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
        "/healthz" => (200, "text/plain", "ok\n".into()),
        "/readyz" => {
            if shared.state.lock().unwrap().ready {
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
        _ => (404, "text/plain", "not found: try /metrics, /healthz, /readyz, /status\n".into()),
    }
}

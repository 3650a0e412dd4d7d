//! The agent's one HTTP listener (loopback by default): `/metrics`,
//! `/healthz`, `/readyz`, `/status` and `/flows`, on hyper's HTTP/1.1
//! server. GET (and HEAD) only.
//!
//! Limits, so that no client can take the agent's descriptors or memory:
//! at most [`MAX_CONNECTIONS`] connections at once (the next wait in the
//! listen backlog), of which [`MAX_FOLLOWS`] may be `/flows` streams; the
//! whole request head within [`HEAD_TIMEOUT`] (a client sending a byte
//! every few seconds is cut off) and at most [`MAX_HEAD_BYTES`] (431
//! past it); no request body (413); one request per connection; and when
//! `accept` fails (EMFILE) the loop backs off instead of spinning.
//!
//! `/flows` answers JSON lines, one flow record each. Query parameters:
//! `f=flag:value` (repeated; `!` in front negates; see
//! [`crate::flows::filter`]), `since`/`until` (Unix nanoseconds), `last=N`,
//! and `follow=1`, which keeps the response open and streams new matching
//! records (a `{"skipped": N}` line says the reader outran this client).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use http_body_util::combinators::BoxBody;
use hyper::body::{Body, Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{Semaphore, mpsc};

use super::Shared;
use crate::flows::hub::Query;
use crate::flows::record::FlowRecord;

pub const NDJSON: &str = "application/x-ndjson";
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The classic Prometheus text format, for scrapers that do not ask for
/// OpenMetrics.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Connections served at once; more wait in the kernel's listen backlog.
/// High enough that idle connections (each dropped after [`HEAD_TIMEOUT`])
/// do not queue probes behind them, low enough to keep descriptors for the
/// kernel work (the agent raises its own descriptor limit at start).
pub const MAX_CONNECTIONS: usize = 512;
/// Of those, long-lived `/flows?follow=1` streams.
pub const MAX_FOLLOWS: usize = 16;
/// Time a client has to send its whole request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head (request line and headers).
pub const MAX_HEAD_BYTES: usize = 16 << 10;
/// Time to answer a request that is not a stream.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

type ResponseBody = BoxBody<Bytes, Infallible>;

pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let follows = Arc::new(Semaphore::new(MAX_FOLLOWS));
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let Ok(permit) = connections.clone().acquire_owned().await else { return };
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                backoff = ACCEPT_BACKOFF_MIN;
                stream
            }
            Err(e) => {
                // EMFILE and the like: a retry right away fails the same way.
                tracing::warn!(error = %e, "http accept failed; backing off");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        let (shared, follows) = (shared.clone(), follows.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req| answer(req, shared.clone(), follows.clone()));
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_buf_size(MAX_HEAD_BYTES)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "http connection ended");
            }
        });
    }
}

fn text(status: u16, content_type: &str, body: String) -> Response<ResponseBody> {
    let mut r = Response::new(BoxBody::new(Full::new(Bytes::from(body))));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

async fn answer(
    req: Request<Incoming>,
    shared: Arc<Shared>,
    follows: Arc<Semaphore>,
) -> Result<Response<ResponseBody>, Infallible> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(text(405, "text/plain", "only GET\n".into()));
    }
    // GET has no body; one announced (or streamed) is refused unread.
    let announced = req.body().size_hint().lower();
    if announced > 0 || req.headers().contains_key(hyper::header::TRANSFER_ENCODING) {
        return Ok(text(413, "text/plain", "requests take no body\n".into()));
    }
    let path = req.uri().path().to_string();
    if path == "/flows" {
        return Ok(flows(req.uri().query().unwrap_or(""), &shared, &follows));
    }
    let accept = req.headers().get(hyper::header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let routed = tokio::time::timeout(ANSWER_TIMEOUT, route(&path, &accept, &shared)).await;
    Ok(match routed {
        Ok((status, content_type, body)) => text(status, content_type, body),
        Err(_) => text(503, "text/plain", "timed out\n".into()),
    })
}

async fn route(path: &str, accept: &str, shared: &Arc<Shared>) -> (u16, &'static str, String) {
    match path {
        "/metrics" => {
            // Like the official clients: OpenMetrics when the scraper asks
            // for it, the classic text format otherwise.
            let openmetrics = accept.contains("application/openmetrics-text");
            let s = shared.clone();
            let text = tokio::task::spawn_blocking(move || s.metrics.encode()).await.unwrap_or_default();
            if openmetrics {
                (200, OPENMETRICS, text)
            } else {
                (200, PROMETHEUS_TEXT, super::metrics::to_classic_text(&text))
            }
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
        // Read-only: deciding a proposal is `bpfsync proposals approve` on
        // the node, never an unauthenticated request.
        "/proposals" => {
            let s = shared.clone();
            match tokio::task::spawn_blocking(move || s.proposals_json()).await {
                Ok(v) => (200, "application/json", serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"),
                Err(e) => (500, "text/plain", format!("{e}\n")),
            }
        }
        _ => (404, "text/plain", "not found: try /metrics, /healthz, /readyz, /status, /flows, /proposals\n".into()),
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
fn flows_query(params: &str) -> Result<(Query, bool), String> {
    let mut q = Query::default();
    let mut follow = false;
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

/// A response body fed from a channel: the `/flows` stream. Dropped when
/// the client goes, which closes the channel and ends the feeding task.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}

fn flows(query: &str, shared: &Arc<Shared>, follows: &Arc<Semaphore>) -> Response<ResponseBody> {
    let (mut query, follow) = match flows_query(query) {
        Ok(q) => q,
        Err(e) => return text(400, "text/plain", format!("{e}\n")),
    };
    let hub = shared.flows.clone();
    if !follow {
        let body: String = hub.query(&query).iter().map(|r| json_line(r)).collect();
        return text(200, NDJSON, body);
    }
    let Ok(permit) = follows.clone().try_acquire_owned() else {
        return text(503, "text/plain", format!("at most {MAX_FOLLOWS} `/flows` streams at once\n"));
    };
    // Subscribe first, then send the history up to the subscription point:
    // nothing falls between the two, and nothing comes twice.
    let (mut live, upto) = hub.subscribe();
    let backlog: String = match query.last {
        Some(_) => hub.query(&query).iter().filter(|r| r.seq <= upto).map(|r| json_line(r)).collect(),
        None => String::new(),
    };
    query.last = None;
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    tokio::spawn(async move {
        let _permit = permit;
        if tx.send(Bytes::from(backlog)).await.is_err() {
            return;
        }
        loop {
            let line = tokio::select! {
                got = live.recv() => match got {
                    Ok(r) if r.seq > upto && query.matches(&r) => json_line(&r),
                    Ok(_) => continue,
                    Err(RecvError::Lagged(n)) => format!("{{\"skipped\":{n}}}\n"),
                    Err(RecvError::Closed) => return,
                },
                // The client is gone.
                _ = tx.closed() => return,
            };
            if tx.send(Bytes::from(line)).await.is_err() {
                return;
            }
        }
    });
    let mut r = Response::new(BoxBody::new(ChannelBody(rx)));
    if let Ok(v) = NDJSON.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    if let Ok(v) = "no-store".parse() {
        r.headers_mut().insert(hyper::header::CACHE_CONTROL, v);
    }
    r
}

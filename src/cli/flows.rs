//! `bpfsync flows`: flow records from the agent's `/flows`, filtered with
//! Hubble's flags, as compact lines, JSON lines or a table.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use super::Exit;
use crate::flows::filter::Filter;
use crate::flows::record::FlowRecord;
use crate::flows::time;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FlowOutput {
    /// One line per flow: `10.0.0.1:45678 -> 10.0.0.2:8080 tcp SYN FORWARDED by api ingress[0]`.
    Compact,
    /// One JSON object per line.
    Json,
    /// One object per line in the shape `hubble observe -o jsonpb` prints
    /// (Cilium's `flow.Flow` in a `GetFlowsResponse`), for tools that read Hubble.
    Jsonpb,
    /// Aligned columns.
    Table,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The agent's listener.
    #[arg(long, env = "BPFSYNC_AGENT", default_value = "127.0.0.1:9464")]
    pub agent: SocketAddr,
    /// FORWARDED, DROPPED or REDIRECTED.
    #[arg(long)]
    pub verdict: Vec<String>,
    /// tcp, udp, icmp, icmpv6 or a protocol number.
    #[arg(long)]
    pub protocol: Vec<String>,
    /// Source or destination port.
    #[arg(long)]
    pub port: Vec<String>,
    /// Source port is this (repeatable: any of them).
    #[arg(long)]
    pub from_port: Vec<String>,
    /// Destination port is this (repeatable: any of them).
    #[arg(long)]
    pub to_port: Vec<String>,
    /// Source or destination address, or a CIDR.
    #[arg(long)]
    pub ip: Vec<String>,
    /// Source address is this address or in this CIDR (repeatable).
    #[arg(long)]
    pub from_ip: Vec<String>,
    /// Destination address is this address or in this CIDR (repeatable).
    #[arg(long)]
    pub to_ip: Vec<String>,
    /// The interface the record was made on.
    #[arg(long)]
    pub interface: Vec<String>,
    /// Flows decided by a rule of this policy (default deny included).
    #[arg(long)]
    pub policy: Vec<String>,
    /// ingress or egress.
    #[arg(long)]
    pub traffic_direction: Vec<String>,
    /// Record type: new, update or drop.
    #[arg(long = "type")]
    pub kind: Vec<String>,
    /// Negates the filter flag that follows.
    #[arg(long, action = clap::ArgAction::Count)]
    pub not: u8,
    /// Only flows at or after this time: RFC 3339, or a duration ago (`5m`).
    #[arg(long)]
    pub since: Option<String>,
    /// Only flows at or before this time: RFC 3339, or a duration ago.
    #[arg(long)]
    pub until: Option<String>,
    /// The last N matching flows of the agent's history (default 20 unless
    /// --since, --until, --all or --follow).
    #[arg(long)]
    pub last: Option<usize>,
    /// Every matching flow of the history.
    #[arg(long, conflicts_with = "last")]
    pub all: bool,
    /// Keep printing new flows as they come.
    #[arg(short, long)]
    pub follow: bool,
    /// Output format: one line per flow, JSON lines (bpfsync's, or Hubble's
    /// `jsonpb`), or a table.
    #[arg(short, long, value_enum, default_value = "compact")]
    pub output: FlowOutput,
}

/// A point in time from `--since`/`--until`.
pub fn parse_time(s: &str, now_ns: u64) -> Result<u64, String> {
    if let Some(t) = time::parse_rfc3339(s) {
        return Ok(t);
    }
    crate::spec::DurationSpec::Text(s.to_string())
        .to_duration()
        .map(|d| now_ns.saturating_sub(d.as_nanos() as u64))
        .ok_or_else(|| format!("`{s}` is neither an RFC 3339 time nor a duration (`5m`, `1h`)"))
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The `/flows` request target for these arguments; `tokens` are the
/// command line (the order of `--not` and the filter flags).
pub fn request_target<S: AsRef<str>>(args: &Args, tokens: &[S], now_ns: u64) -> Result<String, String> {
    let filter = Filter::from_cli_tokens(tokens)?;
    let mut params: Vec<String> = filter.to_wire().iter().map(|w| format!("f={}", encode(w))).collect();
    if let Some(s) = &args.since {
        params.push(format!("since={}", parse_time(s, now_ns)?));
    }
    if let Some(u) = &args.until {
        params.push(format!("until={}", parse_time(u, now_ns)?));
    }
    let last = match (args.last, args.all, args.follow || args.since.is_some() || args.until.is_some()) {
        (Some(n), _, _) => Some(n),
        (None, false, false) => Some(20),
        _ => None,
    };
    if let Some(n) = last {
        params.push(format!("last={n}"));
    }
    if args.follow {
        params.push("follow=1".into());
    }
    Ok(format!("/flows?{}", params.join("&")))
}

fn print_table(records: &[FlowRecord], out: &mut impl Write) -> std::io::Result<()> {
    let rows: Vec<[String; 11]> = records.iter().map(FlowRecord::table_row).collect();
    let mut widths = FlowRecord::TABLE_HEADER.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| -> String {
        cells.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect::<Vec<_>>().join("  ").trim_end().to_string()
    };
    writeln!(out, "{}", line(FlowRecord::TABLE_HEADER.to_vec()))?;
    for row in &rows {
        writeln!(out, "{}", line(row.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}

/// Asks the agent's `/flows` (`target`: path and query); the response as
/// lines. A stream (`follow`) may stay quiet for long: no read timeout then.
pub fn query(agent: SocketAddr, target: &str, follow: bool) -> anyhow::Result<BufReader<Box<dyn Read + Send>>> {
    let mut client = ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(3)).redirects(0);
    if !follow {
        client = client.timeout_read(Duration::from_secs(30));
    }
    let url = format!("http://{agent}{target}");
    match client.build().get(&url).call() {
        Ok(r) => Ok(BufReader::new(r.into_reader())),
        Err(ureq::Error::Status(code, r)) => {
            let body = r.into_string().unwrap_or_default();
            anyhow::bail!("the agent refused the query ({code}): {}", body.trim());
        }
        Err(e) => anyhow::bail!("cannot reach the agent at `{agent}`: {e} (is `bpfsync agent` running? see --agent)"),
    }
}

pub fn run(args: &Args) -> anyhow::Result<Exit> {
    // clap gives each flag's values but not how `--not` interleaves with
    // them: the filter is read from the command line in order.
    let tokens: Vec<String> = std::env::args().collect();
    let target = request_target(args, &tokens, time::now_unix_ns()).map_err(|e| anyhow::anyhow!(e))?;
    let reader = query(args.agent, &target, args.follow)?;
    let node = crate::flows::host_name();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut table = Vec::new();
    let mut header_done = false;
    for line in reader.lines() {
        let line = line?;
        if line.is_empty() {
            continue;
        }
        let record: FlowRecord = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(_) => {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && let Some(n) = v["skipped"].as_u64()
                {
                    eprintln!("warning: {n} flows skipped: this client fell behind the agent's reader");
                    continue;
                }
                anyhow::bail!("the agent sent a line that is not a flow record: {line}");
            }
        };
        match args.output {
            FlowOutput::Json => writeln!(out, "{line}")?,
            FlowOutput::Jsonpb => writeln!(out, "{}", crate::flows::hubble::to_jsonpb(&record, &node))?,
            FlowOutput::Compact => writeln!(out, "{}", record.compact())?,
            FlowOutput::Table if args.follow => {
                // Streaming: fixed widths instead of measured ones.
                if !header_done {
                    writeln!(out, "{}", FlowRecord::TABLE_HEADER.join("\t"))?;
                    header_done = true;
                }
                writeln!(out, "{}", record.table_row().join("\t"))?;
            }
            FlowOutput::Table => table.push(record),
        }
        if args.follow {
            out.flush()?;
        }
    }
    if args.output == FlowOutput::Table && !args.follow {
        print_table(&table, &mut out)?;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn target(argv: &[&str]) -> Result<String, String> {
        let mut full = vec!["flows"];
        full.extend_from_slice(argv);
        let cli = Cli::try_parse_from(&full).map_err(|e| e.to_string())?;
        request_target(&cli.args, &full, 10_000_000_000)
    }

    #[test]
    fn filters_go_to_the_agent_in_order_with_negation() {
        assert_eq!(
            target(&["--verdict", "dropped", "--not", "--ip", "10.0.0.0/8", "-o", "json"]).unwrap(),
            "/flows?f=verdict%3ADROPPED&f=%21ip%3A10.0.0.0%2F8&last=20"
        );
    }

    #[test]
    fn follow_and_time_windows_drop_the_default_last() {
        assert_eq!(target(&["--follow"]).unwrap(), "/flows?follow=1");
        assert_eq!(target(&["--since", "5s"]).unwrap(), "/flows?since=5000000000");
        assert_eq!(target(&["--all"]).unwrap(), "/flows?");
        assert_eq!(target(&["--last", "3", "-f"]).unwrap(), "/flows?last=3&follow=1");
        assert_eq!(
            target(&["--until", "1970-01-01T00:00:01Z"]).unwrap(),
            "/flows?until=1000000000",
            "RFC 3339 times are taken as they are"
        );
        assert!(target(&["--since", "yesterday"]).unwrap_err().contains("neither an RFC 3339 time nor a duration"));
    }
}

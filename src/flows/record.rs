//! A flow record as users see it: decoded from the datapath's
//! `struct flow_event`, named (interface, spec rule), and rendered as JSON
//! (one object per line), a compact line or a table row.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use super::time;
use crate::datapath::FlowEvent;
use crate::model::Direction;

/// What a record stands for (`struct flow_event`'s `kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordKind {
    /// A connection's first packet.
    New,
    /// The traffic since the connection's previous record.
    Update,
    /// Drops, aggregated over the drop window.
    Drop,
}

/// What the datapath did with the flow's packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Verdict {
    /// Let through (to the stack, or out by the egress hook).
    Forwarded,
    Dropped,
    /// Sent to a mesh route's next hop from XDP.
    Redirected,
}

/// Why packets were dropped (`enum drop_reason` in `bpf/bpfsync.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DropReason {
    /// An explicit `deny` rule.
    PolicyDeny,
    /// No rule allowed it where a policy selects the interface.
    DefaultDeny,
    /// The peer's rule set had no entry (cannot happen with compiled tables).
    NoRuleSet,
    /// The packet could not be classified where a policy applies.
    Unparseable,
}

/// The IP protocol; named `tcp`, `udp`, `icmp`, `icmpv6`, else its number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Protocol(pub u8);

impl Protocol {
    pub const ICMP: Protocol = Protocol(1);
    pub const TCP: Protocol = Protocol(6);
    pub const UDP: Protocol = Protocol(17);
    pub const ICMPV6: Protocol = Protocol(58);

    /// `tcp`, `udp`, `icmp`, `icmpv6`, or a protocol number.
    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "icmp" => Some(Protocol::ICMP),
            "tcp" => Some(Protocol::TCP),
            "udp" => Some(Protocol::UDP),
            "icmpv6" => Some(Protocol::ICMPV6),
            n => n.parse().ok().map(Protocol),
        }
    }

    /// Whether its records carry ports (TCP and UDP).
    pub fn has_ports(self) -> bool {
        self == Protocol::TCP || self == Protocol::UDP
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&protocol_name(self.0))
    }
}

impl Serialize for Protocol {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Protocol, D::Error> {
        let s = String::deserialize(d)?;
        Protocol::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!("`{s}` is not a protocol (tcp, udp, icmp, icmpv6 or a number)"))
        })
    }
}

/// `Display` and `as_str` through serde's names, so the JSON, the text and
/// the filters spell a value the same way.
macro_rules! named {
    ($t:ty { $($v:ident => $s:literal),* $(,)? }) => {
        impl $t {
            pub fn as_str(self) -> &'static str {
                match self { $(<$t>::$v => $s),* }
            }
            /// From its name, as filters and files give it.
            pub fn from_name(s: &str) -> Option<$t> {
                match s { $($s => Some(<$t>::$v),)* _ => None }
            }
        }
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
named!(RecordKind { New => "new", Update => "update", Drop => "drop" });
named!(Verdict { Forwarded => "FORWARDED", Dropped => "DROPPED", Redirected => "REDIRECTED" });
named!(DropReason {
    PolicyDeny => "policy-deny",
    DefaultDeny => "default-deny",
    NoRuleSet => "no-rule-set",
    Unparseable => "unparseable",
});

/// One end of a flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub ip: IpAddr,
    /// TCP/UDP port; the echo identifier for ICMP echo; 0 otherwise.
    pub port: u16,
}

/// A flow record. `packets` and `bytes` are what this record stands for:
/// the first packet (`new`), the traffic since the flow's previous record
/// (`update`), or the drops aggregated into it (`drop`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// Order of arrival at the agent (1, 2, …), for `--follow` resumption.
    pub seq: u64,
    #[serde(with = "rfc3339")]
    pub time: u64,
    pub kind: RecordKind,
    pub verdict: Verdict,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_reason: Option<DropReason>,
    pub interface: String,
    pub direction: Direction,
    pub ip_version: u8,
    pub protocol: Protocol,
    pub source: Endpoint,
    pub destination: Endpoint,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcp_flags: Vec<String>,
    pub packets: u64,
    pub bytes: u64,
    /// The spec rule that decided (`api ingress[0]`, `default deny ingress
    /// on veth0 (api)`); absent when no policy covers the hook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
    /// Drop records this CPU did not make (rate limit) since its previous one.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub suppressed: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

mod rfc3339 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::time::format_rfc3339(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let s = String::deserialize(d)?;
        super::time::parse_rfc3339(&s).ok_or_else(|| serde::de::Error::custom(format!("`{s}` is not an RFC 3339 time")))
    }
}

/// TCP flag names, low bit first, as Hubble spells them.
const TCP_FLAG_NAMES: [&str; 8] = ["FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"];

pub fn tcp_flag_names(flags: u8) -> Vec<String> {
    TCP_FLAG_NAMES.iter().enumerate().filter(|(i, _)| flags & (1 << i) != 0).map(|(_, n)| n.to_string()).collect()
}

pub fn protocol_name(protocol: u8) -> String {
    match protocol {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "icmpv6".into(),
        n => n.to_string(),
    }
}

/// The policies a rule name belongs to: `api ingress[0]` → api;
/// `default deny ingress on veth0 (api, web)` → api, web.
pub fn policies_of_rule(rule: &str) -> Vec<String> {
    if rule.starts_with("default deny")
        && let (Some(open), true) = (rule.rfind('('), rule.ends_with(')'))
    {
        return rule[open + 1..rule.len() - 1].split(", ").map(str::to_string).collect();
    }
    rule.split(' ').next().filter(|p| !p.is_empty()).map(|p| vec![p.to_string()]).unwrap_or_default()
}

fn addr(family: u8, bytes: &[u8; 16]) -> IpAddr {
    if family == 4 {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*bytes))
    }
}

/// Names the reader knows: interfaces by index, rules by id.
pub trait Names {
    fn interface(&mut self, ifindex: u32) -> String;
    fn rule(&mut self, rule_id: u32) -> Option<String>;
}

impl FlowRecord {
    /// Decodes a datapath record; `time` is already in Unix nanoseconds.
    /// `None` when a field holds a value the datapath does not define (the
    /// reader counts the record as malformed).
    pub fn from_event(e: &FlowEvent, seq: u64, time: u64, names: &mut impl Names) -> Option<FlowRecord> {
        // The codes of `bpf/bpfsync.h` (`enum flow_kind`, `flow_verdict`,
        // `drop_reason`, `direction`).
        let kind = [RecordKind::New, RecordKind::Update, RecordKind::Drop].get(e.kind as usize).copied()?;
        let verdict = [Verdict::Forwarded, Verdict::Dropped, Verdict::Redirected].get(e.verdict as usize).copied()?;
        let drop_reason = match e.drop_reason {
            0 => None,
            n => Some(
                [DropReason::PolicyDeny, DropReason::DefaultDeny, DropReason::NoRuleSet, DropReason::Unparseable]
                    .get(n as usize - 1)
                    .copied()?,
            ),
        };
        let direction = [Direction::Ingress, Direction::Egress].get(e.dir as usize).copied()?;
        let rule = if e.rule_id == 0 {
            None
        } else {
            Some(names.rule(e.rule_id).unwrap_or_else(|| format!("rule {:#010x}", e.rule_id)))
        };
        Some(FlowRecord {
            seq,
            time,
            kind,
            verdict,
            drop_reason,
            interface: names.interface(e.ifindex),
            direction,
            ip_version: e.tuple.family,
            protocol: Protocol(e.tuple.protocol),
            source: Endpoint { ip: addr(e.tuple.family, &e.tuple.saddr), port: u16::from_be(e.tuple.sport_be) },
            destination: Endpoint { ip: addr(e.tuple.family, &e.tuple.daddr), port: u16::from_be(e.tuple.dport_be) },
            tcp_flags: if e.tuple.protocol == 6 { tcp_flag_names(e.tcp_flags) } else { vec![] },
            packets: e.packets as u64,
            bytes: e.bytes,
            policies: rule.as_deref().map(policies_of_rule).unwrap_or_default(),
            rule,
            suppressed: e.suppressed,
        })
    }

    /// The record as policy impact reads it (`plan --impact`); the error
    /// says why it cannot be evaluated.
    pub fn to_recorded(&self) -> Result<crate::plan::impact::RecordedFlow, String> {
        if self.drop_reason == Some(DropReason::Unparseable) {
            return Err("packets the datapath could not parse".into());
        }
        Ok(crate::plan::impact::RecordedFlow {
            interface: self.interface.clone(),
            direction: self.direction,
            protocol: self.protocol.0,
            source: self.source.ip,
            source_port: self.source.port,
            destination: self.destination.ip,
            destination_port: self.destination.port,
            time: self.time,
            packets: self.packets,
            bytes: self.bytes,
        })
    }

    fn has_ports(&self) -> bool {
        self.protocol.has_ports()
    }

    fn endpoint(&self, e: &Endpoint) -> String {
        match (e.ip, self.has_ports()) {
            (IpAddr::V6(ip), true) => format!("[{ip}]:{}", e.port),
            (ip, true) => format!("{ip}:{}", e.port),
            (ip, false) => ip.to_string(),
        }
    }

    /// `11:49:23.123 veth0 ingress 10.0.0.1:45678 -> 10.0.0.2:8080 tcp SYN FORWARDED by api ingress[0]`
    pub fn compact(&self) -> String {
        let mut s = format!(
            "{} {} {} {} -> {} {}",
            time::format_clock(self.time),
            self.interface,
            self.direction.as_str(),
            self.endpoint(&self.source),
            self.endpoint(&self.destination),
            self.protocol
        );
        if !self.tcp_flags.is_empty() {
            let _ = write!(s, " {}", self.tcp_flags.join("|"));
        }
        let _ = write!(s, " {}", self.verdict);
        if let Some(reason) = &self.drop_reason {
            let _ = write!(s, " ({reason})");
        }
        if let Some(rule) = &self.rule {
            let _ = write!(s, " by {rule}");
        }
        if self.kind == RecordKind::Update {
            let _ = write!(s, " [update: {} packets, {} bytes]", self.packets, self.bytes);
        } else if self.packets > 1 {
            let _ = write!(s, " [{} packets, {} bytes]", self.packets, self.bytes);
        }
        if self.suppressed > 0 {
            let _ = write!(s, " [{} drop records suppressed before this]", self.suppressed);
        }
        s
    }

    pub const TABLE_HEADER: [&'static str; 11] =
        ["TIME", "INTERFACE", "DIR", "SOURCE", "DESTINATION", "PROTO", "FLAGS", "VERDICT", "RULE", "PACKETS", "BYTES"];

    pub fn table_row(&self) -> [String; 11] {
        let verdict = match &self.drop_reason {
            Some(r) => format!("{} ({r})", self.verdict),
            None => self.verdict.to_string(),
        };
        [
            time::format_clock(self.time),
            self.interface.clone(),
            self.direction.as_str().to_string(),
            self.endpoint(&self.source),
            self.endpoint(&self.destination),
            self.protocol.to_string(),
            self.tcp_flags.join("|"),
            verdict,
            self.rule.clone().unwrap_or_else(|| "-".into()),
            self.packets.to_string(),
            self.bytes.to_string(),
        ]
    }
}

/// Longest line [`read_json_lines`] takes (a record is ~500 bytes).
pub const MAX_LINE: usize = 64 * 1024;

/// What a JSON-lines source of flow records held.
#[derive(Debug, Default)]
pub struct ReadRecords {
    pub records: Vec<FlowRecord>,
    /// `{"skipped": N}` markers: records the writer fell behind on.
    pub skipped: u64,
}

/// Reads flow records, one JSON object per line (`bpfsync flows -o json`,
/// the file exporter, the agent's `/flows`), at most `max` of them. Errors
/// name the line: `origin:LINE: …`.
pub fn read_json_lines(input: impl std::io::BufRead, origin: &str, max: usize) -> Result<ReadRecords, String> {
    let mut records = Vec::new();
    let skipped = for_each_json_line(input, origin, max, |r| records.push(r))?;
    Ok(ReadRecords { records, skipped })
}

/// [`read_json_lines`], handing each record to `each` as it is read (so a
/// caller that keeps less than a whole record holds less); returns the
/// records the writer said it skipped.
pub fn for_each_json_line(
    mut input: impl std::io::BufRead,
    origin: &str,
    max: usize,
    mut each: impl FnMut(FlowRecord),
) -> Result<u64, String> {
    let (mut read, mut skipped) = (0usize, 0u64);
    let mut line = Vec::new();
    for number in 1.. {
        line.clear();
        let n =
            std::io::BufRead::read_until(&mut std::io::Read::take(&mut input, MAX_LINE as u64 + 1), b'\n', &mut line)
                .map_err(|e| format!("{origin}:{number}: cannot read: {e}"))?;
        if n == 0 {
            break;
        }
        if line.len() > MAX_LINE && line.last() != Some(&b'\n') {
            return Err(format!("{origin}:{number}: a line longer than {MAX_LINE} bytes is not a flow record"));
        }
        let text = std::str::from_utf8(&line).map_err(|_| format!("{origin}:{number}: not UTF-8"))?.trim();
        if text.is_empty() {
            continue;
        }
        match serde_json::from_str::<FlowRecord>(text) {
            Ok(_) if read >= max => {
                return Err(format!("{origin}: more than {max} flow records: narrow the window with --since/--until"));
            }
            Ok(r) => {
                read += 1;
                each(r);
            }
            Err(e) => match serde_json::from_str::<serde_json::Value>(text).ok().and_then(|v| v["skipped"].as_u64()) {
                Some(n) => skipped = skipped.saturating_add(n),
                None => return Err(format!("{origin}:{number}: not a flow record: {e}")),
            },
        }
    }
    Ok(skipped)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::datapath::CtKey;

    #[test]
    fn json_lines_name_the_bad_line_and_keep_to_their_limits() {
        let good = r#"{"seq":1,"time":"2026-12-01T10:00:00Z","kind":"new","verdict":"FORWARDED","interface":"veth0","direction":"ingress","ip_version":4,"protocol":"tcp","source":{"ip":"10.0.0.1","port":1},"destination":{"ip":"10.0.0.2","port":2},"packets":1,"bytes":60}"#;
        let read = |text: &str, max: usize| read_json_lines(text.as_bytes(), "f.jsonl", max);
        let ok = read(&format!("{good}\n\n{{\"skipped\": 7}}\n{good}"), 10).unwrap();
        assert_eq!((ok.records.len(), ok.skipped), (2, 7));
        assert_eq!(ok.records[0].to_recorded().unwrap().destination_port, 2);
        let err = read(&format!("{good}\nnot json\n"), 10).unwrap_err();
        assert!(err.starts_with("f.jsonl:2: not a flow record"), "{err}");
        let err = read(&format!("{good}\n{{\"seq\": 1}}\n"), 10).unwrap_err();
        assert!(err.starts_with("f.jsonl:2:"), "{err}");
        let err = read(&format!("{good}\n{good}\n{good}\n"), 2).unwrap_err();
        assert!(err.contains("more than 2 flow records"), "{err}");
        // A line without end is refused after MAX_LINE bytes, not read whole.
        let long = "x".repeat(MAX_LINE * 4);
        let err = read(&long, 10).unwrap_err();
        assert!(err.contains("longer than"), "{err}");
        // Typed fields refuse what they do not define, naming it.
        let gre = good.replace(r#""protocol":"tcp""#, r#""protocol":"gre""#);
        let err = read(&gre, 10).unwrap_err();
        assert!(err.contains("`gre` is not a protocol"), "{err}");
        let numbered = read(&good.replace(r#""protocol":"tcp""#, r#""protocol":"47""#), 10).unwrap();
        assert_eq!(numbered.records[0].to_recorded().unwrap().protocol, 47);
        let err = read(&good.replace("FORWARDED", "MAYBE"), 10).unwrap_err();
        assert!(err.contains("MAYBE"), "{err}");
    }

    #[test]
    fn an_event_with_a_code_the_datapath_does_not_define_makes_no_record() {
        assert!(FlowRecord::from_event(&event(0, 0, 6, 1, 2, 0), 1, 0, &mut FixedNames).is_some());
        assert!(FlowRecord::from_event(&event(3, 0, 6, 1, 2, 0), 1, 0, &mut FixedNames).is_none(), "kind");
        assert!(FlowRecord::from_event(&event(0, 3, 6, 1, 2, 0), 1, 0, &mut FixedNames).is_none(), "verdict");
        let mut e = event(2, 1, 6, 1, 2, 0);
        e.drop_reason = 5;
        assert!(FlowRecord::from_event(&e, 1, 0, &mut FixedNames).is_none(), "drop reason");
        e.drop_reason = 2;
        assert_eq!(
            FlowRecord::from_event(&e, 1, 0, &mut FixedNames).unwrap().drop_reason,
            Some(DropReason::DefaultDeny)
        );
        e.dir = 2;
        assert!(FlowRecord::from_event(&e, 1, 0, &mut FixedNames).is_none(), "direction");
    }

    pub struct FixedNames;
    impl Names for FixedNames {
        fn interface(&mut self, ifindex: u32) -> String {
            format!("veth{ifindex}")
        }
        fn rule(&mut self, rule_id: u32) -> Option<String> {
            match rule_id {
                7 => Some("api ingress[0]".into()),
                0x8000_0001 => Some("default deny ingress on veth3 (api, web)".into()),
                _ => None,
            }
        }
    }

    pub fn event(kind: u8, verdict: u8, proto: u8, sport: u16, dport: u16, rule_id: u32) -> FlowEvent {
        let mut t = CtKey {
            family: 4,
            protocol: proto,
            sport_be: sport.to_be(),
            dport_be: dport.to_be(),
            ..Default::default()
        };
        t.saddr[..4].copy_from_slice(&[10, 0, 0, 1]);
        t.daddr[..4].copy_from_slice(&[10, 0, 0, 2]);
        FlowEvent {
            kind,
            verdict,
            packets: 1,
            bytes: 74,
            ifindex: 3,
            rule_id,
            tcp_flags: 0x02,
            tuple: t,
            ..Default::default()
        }
    }

    #[test]
    fn a_new_tcp_flow_reads_like_hubble() {
        let r = FlowRecord::from_event(&event(0, 0, 6, 45678, 8080, 7), 1, 1_795_261_763_123_000_000, &mut FixedNames)
            .unwrap();
        assert_eq!(
            r.compact(),
            "11:49:23.123 veth3 ingress 10.0.0.1:45678 -> 10.0.0.2:8080 tcp SYN FORWARDED by api ingress[0]"
        );
        assert_eq!(r.policies, ["api"]);
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains(r#""time":"2026-11-21T11:49:23.123000000Z""#), "{json}");
        assert_eq!(serde_json::from_str::<FlowRecord>(&json).unwrap(), r, "JSON lines read back as they were");
    }

    #[test]
    fn an_aggregated_default_deny_drop_names_its_policies_and_counts() {
        let mut e = event(2, 1, 17, 5000, 53, 0x8000_0001);
        e.drop_reason = 2;
        e.packets = 12;
        e.bytes = 1200;
        e.suppressed = 3;
        let r = FlowRecord::from_event(&e, 2, 0, &mut FixedNames).unwrap();
        assert_eq!(r.policies, ["api", "web"]);
        assert!(r.tcp_flags.is_empty());
        assert_eq!(
            r.compact(),
            "00:00:00.000 veth3 ingress 10.0.0.1:5000 -> 10.0.0.2:53 udp DROPPED (default-deny) by default deny ingress on veth3 (api, web) [12 packets, 1200 bytes] [3 drop records suppressed before this]"
        );
    }

    #[test]
    fn unknown_rules_and_icmp_are_shown_plainly() {
        let r = FlowRecord::from_event(&event(0, 2, 1, 9, 0, 99), 3, 0, &mut FixedNames).unwrap();
        assert_eq!(r.rule.as_deref(), Some("rule 0x00000063"));
        assert!(r.compact().contains("10.0.0.1 -> 10.0.0.2 icmp REDIRECTED"), "{}", r.compact());
    }
}

//! Flow filters with Hubble's flag names and semantics.
//!
//! Each `--flag value` is one criterion; `--not` negates the criterion that
//! follows it. Criteria of the same flag (and negation) are alternatives
//! (`--port 53 --port 853`: either); different flags must all hold. A
//! negated group holds when none of its values match.
//!
//! On the wire (`/flows?f=…`) a criterion is `flag:value`, with a leading
//! `!` when negated.

use std::net::IpAddr;

use super::record::{FlowRecord, Protocol, RecordKind, Verdict};
use crate::model::Direction;
use crate::net::Cidr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Criterion {
    Verdict(Verdict),
    Protocol(Protocol),
    Port(u16),
    FromPort(u16),
    ToPort(u16),
    Ip(Cidr),
    FromIp(Cidr),
    ToIp(Cidr),
    Interface(String),
    Policy(String),
    Direction(Direction),
    Kind(RecordKind),
}

/// The filter flags, as the CLI spells them (without `--`).
pub const FLAGS: [&str; 12] = [
    "verdict",
    "protocol",
    "port",
    "from-port",
    "to-port",
    "ip",
    "from-ip",
    "to-ip",
    "interface",
    "policy",
    "traffic-direction",
    "type",
];

impl Criterion {
    /// Parses one `flag`, `value` pair (`flag` without `--`).
    pub fn parse(flag: &str, value: &str) -> Result<Criterion, String> {
        let port = |v: &str| v.parse::<u16>().map_err(|_| format!("`--{flag} {v}`: not a port (0-65535)"));
        let cidr = |v: &str| v.parse::<Cidr>().map_err(|e| format!("`--{flag}`: {e}"));
        let one_of = |v: &str, allowed: &[&str], upper: bool| {
            let v = if upper { v.to_ascii_uppercase() } else { v.to_ascii_lowercase() };
            if allowed.contains(&v.as_str()) {
                Ok(v)
            } else {
                Err(format!("`--{flag} {v}`: expected one of {}", allowed.join(", ")))
            }
        };
        Ok(match flag {
            "verdict" => Criterion::Verdict(
                Verdict::from_name(&one_of(value, &["FORWARDED", "DROPPED", "REDIRECTED"], true)?).expect("a verdict"),
            ),
            "protocol" => Criterion::Protocol(Protocol::parse(&value.to_ascii_lowercase()).ok_or_else(|| {
                format!("`--protocol {value}`: expected tcp, udp, icmp, icmpv6 or a protocol number")
            })?),
            "port" => Criterion::Port(port(value)?),
            "from-port" => Criterion::FromPort(port(value)?),
            "to-port" => Criterion::ToPort(port(value)?),
            "ip" => Criterion::Ip(cidr(value)?),
            "from-ip" => Criterion::FromIp(cidr(value)?),
            "to-ip" => Criterion::ToIp(cidr(value)?),
            "interface" => Criterion::Interface(value.to_string()),
            "policy" => Criterion::Policy(value.to_string()),
            "traffic-direction" => Criterion::Direction(match one_of(value, &["ingress", "egress"], false)?.as_str() {
                "ingress" => Direction::Ingress,
                _ => Direction::Egress,
            }),
            "type" => Criterion::Kind(
                RecordKind::from_name(&one_of(value, &["new", "update", "drop"], false)?).expect("a kind"),
            ),
            _ => return Err(format!("`--{flag}` is not a flow filter")),
        })
    }

    fn flag(&self) -> &'static str {
        match self {
            Criterion::Verdict(_) => "verdict",
            Criterion::Protocol(_) => "protocol",
            Criterion::Port(_) => "port",
            Criterion::FromPort(_) => "from-port",
            Criterion::ToPort(_) => "to-port",
            Criterion::Ip(_) => "ip",
            Criterion::FromIp(_) => "from-ip",
            Criterion::ToIp(_) => "to-ip",
            Criterion::Interface(_) => "interface",
            Criterion::Policy(_) => "policy",
            Criterion::Direction(_) => "traffic-direction",
            Criterion::Kind(_) => "type",
        }
    }

    fn value(&self) -> String {
        match self {
            Criterion::Verdict(v) => v.to_string(),
            Criterion::Protocol(p) => p.to_string(),
            Criterion::Direction(d) => d.as_str().to_string(),
            Criterion::Kind(k) => k.to_string(),
            Criterion::Interface(v) | Criterion::Policy(v) => v.clone(),
            Criterion::Port(p) | Criterion::FromPort(p) | Criterion::ToPort(p) => p.to_string(),
            Criterion::Ip(c) | Criterion::FromIp(c) | Criterion::ToIp(c) => c.to_string(),
        }
    }

    pub fn matches(&self, r: &FlowRecord) -> bool {
        let within = |c: &Cidr, ip: IpAddr| c.contains(&Cidr { addr: ip, len: Cidr::max_len(&ip) });
        match self {
            Criterion::Verdict(v) => r.verdict == *v,
            Criterion::Protocol(p) => r.protocol == *p,
            Criterion::Port(p) => r.source.port == *p || r.destination.port == *p,
            Criterion::FromPort(p) => r.source.port == *p,
            Criterion::ToPort(p) => r.destination.port == *p,
            Criterion::Ip(c) => within(c, r.source.ip) || within(c, r.destination.ip),
            Criterion::FromIp(c) => within(c, r.source.ip),
            Criterion::ToIp(c) => within(c, r.destination.ip),
            Criterion::Interface(i) => r.interface == *i,
            Criterion::Policy(p) => r.policies.iter().any(|x| x == p),
            Criterion::Direction(d) => r.direction == *d,
            Criterion::Kind(k) => r.kind == *k,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Term {
    pub negated: bool,
    pub criterion: Criterion,
}

/// All criteria given, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub terms: Vec<Term>,
}

impl Filter {
    pub fn matches(&self, r: &FlowRecord) -> bool {
        // Group by (flag, negation): alternatives within a group, all groups ANDed.
        let mut groups: Vec<((&str, bool), bool)> = Vec::new();
        for t in &self.terms {
            let key = (t.criterion.flag(), t.negated);
            let hit = t.criterion.matches(r);
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, any)) => *any |= hit,
                None => groups.push((key, hit)),
            }
        }
        groups.iter().all(|((_, negated), any)| *any != *negated)
    }

    /// Reads filter flags from command-line tokens in order (`--flag value`
    /// or `--flag=value`, `--not` before a flag); other tokens are skipped.
    pub fn from_cli_tokens<S: AsRef<str>>(tokens: &[S]) -> Result<Filter, String> {
        let mut terms = Vec::new();
        let mut negate = false;
        let mut i = 0;
        while i < tokens.len() {
            let tok = tokens[i].as_ref();
            i += 1;
            if tok == "--" {
                break;
            }
            if tok == "--not" {
                negate = true;
                continue;
            }
            let Some(body) = tok.strip_prefix("--") else { continue };
            let (flag, inline) = match body.split_once('=') {
                Some((f, v)) => (f, Some(v.to_string())),
                None => (body, None),
            };
            if !FLAGS.contains(&flag) {
                continue;
            }
            let value = match inline {
                Some(v) => v,
                None => {
                    let v = tokens.get(i).map(|s| s.as_ref().to_string()).ok_or(format!("`--{flag}` needs a value"))?;
                    i += 1;
                    v
                }
            };
            terms.push(Term { negated: negate, criterion: Criterion::parse(flag, &value)? });
            negate = false;
        }
        if negate {
            return Err("`--not` must come before a filter flag".into());
        }
        Ok(Filter { terms })
    }

    /// `flag:value` strings (`!` in front when negated) for the wire.
    pub fn to_wire(&self) -> Vec<String> {
        self.terms
            .iter()
            .map(|t| format!("{}{}:{}", if t.negated { "!" } else { "" }, t.criterion.flag(), t.criterion.value()))
            .collect()
    }

    pub fn push_wire(&mut self, s: &str) -> Result<(), String> {
        let (negated, body) = match s.strip_prefix('!') {
            Some(b) => (true, b),
            None => (false, s),
        };
        let (flag, value) = body.split_once(':').ok_or_else(|| format!("filter `{s}` is not `flag:value`"))?;
        self.terms.push(Term { negated, criterion: Criterion::parse(flag, value)? });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::record::{Endpoint, FlowRecord};

    fn rec(verdict: &str, proto: &str, src: &str, sport: u16, dst: &str, dport: u16, rule: Option<&str>) -> FlowRecord {
        FlowRecord {
            seq: 0,
            time: 0,
            kind: RecordKind::New,
            verdict: Verdict::from_name(verdict).unwrap(),
            drop_reason: None,
            interface: "veth0".into(),
            direction: Direction::Ingress,
            ip_version: if src.contains(':') { 6 } else { 4 },
            protocol: Protocol::parse(proto).unwrap(),
            source: Endpoint { ip: src.parse().unwrap(), port: sport },
            destination: Endpoint { ip: dst.parse().unwrap(), port: dport },
            tcp_flags: vec![],
            packets: 1,
            bytes: 60,
            rule: rule.map(str::to_string),
            policies: rule.map(crate::flows::record::policies_of_rule).unwrap_or_default(),
            suppressed: 0,
        }
    }

    fn filter(args: &[&str]) -> Filter {
        Filter::from_cli_tokens(args).unwrap()
    }

    #[test]
    fn flags_of_one_kind_are_alternatives_and_kinds_are_anded() {
        let f = filter(&["--port", "53", "--port=853", "--protocol", "udp"]);
        assert!(f.matches(&rec("FORWARDED", "udp", "10.0.0.1", 5000, "10.0.0.2", 53, None)));
        assert!(f.matches(&rec("FORWARDED", "udp", "10.0.0.1", 853, "10.0.0.2", 9, None)), "--port matches either end");
        assert!(!f.matches(&rec("FORWARDED", "tcp", "10.0.0.1", 5000, "10.0.0.2", 53, None)));
        assert!(!f.matches(&rec("FORWARDED", "udp", "10.0.0.1", 5000, "10.0.0.2", 54, None)));
    }

    #[test]
    fn not_negates_only_the_next_flag() {
        let f = filter(&["--not", "--verdict", "dropped", "--ip", "10.0.0.0/24"]);
        assert!(f.matches(&rec("FORWARDED", "tcp", "10.0.0.1", 1, "192.168.0.1", 2, None)));
        assert!(!f.matches(&rec("DROPPED", "tcp", "10.0.0.1", 1, "192.168.0.1", 2, None)));
        assert!(!f.matches(&rec("FORWARDED", "tcp", "10.1.0.1", 1, "192.168.0.1", 2, None)), "--ip is not negated");
        let two = filter(&["--not", "--port", "22", "--not", "--port", "53"]);
        assert!(!two.matches(&rec("FORWARDED", "udp", "10.0.0.1", 1, "10.0.0.2", 53, None)), "neither 22 nor 53");
        assert!(two.matches(&rec("FORWARDED", "udp", "10.0.0.1", 1, "10.0.0.2", 80, None)));
    }

    #[test]
    fn directional_ip_and_port_filters_look_at_one_end() {
        let r = rec("FORWARDED", "tcp", "10.0.0.1", 45678, "fd00::2", 8080, None);
        assert!(filter(&["--from-ip", "10.0.0.1"]).matches(&r));
        assert!(!filter(&["--to-ip", "10.0.0.1"]).matches(&r));
        assert!(filter(&["--to-ip", "fd00::/64", "--to-port", "8080", "--from-port", "45678"]).matches(&r));
        assert!(!filter(&["--from-port", "8080"]).matches(&r));
    }

    #[test]
    fn policy_matches_rules_and_default_deny_of_that_policy() {
        let allowed = rec("FORWARDED", "tcp", "10.0.0.1", 1, "10.0.0.2", 2, Some("api ingress[0]"));
        let denied =
            rec("DROPPED", "tcp", "10.0.0.1", 1, "10.0.0.2", 3, Some("default deny ingress on veth0 (web, api)"));
        let other = rec("FORWARDED", "tcp", "10.0.0.1", 1, "10.0.0.2", 4, Some("apis ingress[0]"));
        let f = filter(&["--policy", "api"]);
        assert!(f.matches(&allowed) && f.matches(&denied) && !f.matches(&other));
    }

    #[test]
    fn the_wire_form_round_trips() {
        let f = filter(&["--not", "--ip", "fd00::/8", "--verdict", "REDIRECTED", "-o", "json", "--interface", "veth0"]);
        let mut back = Filter::default();
        for w in f.to_wire() {
            back.push_wire(&w).unwrap();
        }
        assert_eq!(back, f);
    }

    #[test]
    fn bad_values_say_which_flag() {
        for (args, want) in [
            (vec!["--port", "99999"], "--port 99999"),
            (vec!["--verdict", "lost"], "expected one of FORWARDED"),
            (vec!["--ip", "10.0.0.300"], "--ip"),
            (vec!["--not"], "--not"),
            (vec!["--ip"], "needs a value"),
        ] {
            let e = Filter::from_cli_tokens(&args).unwrap_err();
            assert!(e.contains(want), "{args:?}: {e}");
        }
    }
}

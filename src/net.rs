//! Addresses and prefixes, shared by the spec checks and the codecs.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An IPv4 or IPv6 prefix. A bare address is a host prefix (/32, /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    pub fn max_len(addr: &IpAddr) -> u8 {
        if addr.is_ipv4() { 32 } else { 128 }
    }

    /// Whether `other` lies entirely inside `self`.
    pub fn contains(&self, other: &Cidr) -> bool {
        if self.addr.is_ipv4() != other.addr.is_ipv4() || other.len < self.len {
            return false;
        }
        let a = addr_bits(&self.addr);
        let b = addr_bits(&other.addr);
        let width = Cidr::max_len(&self.addr) as u32;
        let shift = width - self.len as u32;
        shift >= 128 || (a >> shift) == (b >> shift)
    }

    /// Address bytes in network order.
    pub fn addr_bytes(&self) -> Vec<u8> {
        ip_bytes(&self.addr)
    }
}

pub fn ip_bytes(addr: &IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn addr_bits(addr: &IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u32::from(*a) as u128,
        IpAddr::V6(a) => u128::from(*a),
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr_text, len_text) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr_text.parse().map_err(|_| format!("`{s}` is not an IP address or CIDR"))?;
        let max = Cidr::max_len(&addr);
        let len = match len_text {
            None => max,
            Some(l) => match l.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("prefix length in `{s}` must be 0..={max}")),
            },
        };
        let cidr = Cidr { addr, len };
        // Host bits set (10.0.0.1/24) usually means a typo; say so.
        let canonical = Cidr { addr: mask(&addr, len), len };
        if canonical.addr != addr {
            return Err(format!("`{s}` has host bits set: did you mean `{canonical}`?"));
        }
        Ok(cidr)
    }
}

fn mask(addr: &IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = if len == 0 { 0 } else { u32::MAX << (32 - len as u32) };
            IpAddr::V4((u32::from(*a) & m).into())
        }
        IpAddr::V6(a) => {
            let m = if len == 0 { 0 } else { u128::MAX << (128 - len as u32) };
            IpAddr::V6((u128::from(*a) & m).into())
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in out.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_contains() {
        let net: Cidr = "10.0.0.0/24".parse().unwrap();
        let host: Cidr = "10.0.0.66".parse().unwrap();
        assert_eq!(host.len, 32);
        assert!(net.contains(&host));
        assert!(!host.contains(&net));
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains(&host));
        assert!("fd00::/64".parse::<Cidr>().unwrap().contains(&"fd00::1".parse().unwrap()));
    }

    #[test]
    fn rejects_host_bits_and_bad_lengths() {
        assert!("10.0.0.1/24".parse::<Cidr>().unwrap_err().contains("did you mean `10.0.0.0/24`"));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nope".parse::<Cidr>().is_err());
    }

    #[test]
    fn parses_macs() {
        assert_eq!(parse_mac("02:00:00:00:00:0a"), Some([2, 0, 0, 0, 0, 10]));
        assert_eq!(parse_mac("02:00:00:00:00"), None);
    }
}

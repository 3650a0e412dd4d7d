//! Crafted packets for `BPF_PROG_TEST_RUN`: Ethernet + IPv4/IPv6 +
//! TCP/UDP/ICMP with correct checksums, and readers for the fields a
//! datapath rewrites (MACs, TTL, checksums).

use std::net::IpAddr;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;

/// The transport part of a crafted packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    Icmp {
        kind: u8,
        code: u8,
    },
    Icmpv6 {
        kind: u8,
        code: u8,
    },
    /// Any other IP protocol, no header.
    Other(u8),
}

impl Transport {
    fn protocol(&self) -> u8 {
        match self {
            Transport::Tcp { .. } => 6,
            Transport::Udp { .. } => 17,
            Transport::Icmp { .. } => 1,
            Transport::Icmpv6 { .. } => 58,
            Transport::Other(p) => *p,
        }
    }
}

/// A packet to build: `Packet::new(src, dst, transport).build()`.
#[derive(Debug, Clone)]
pub struct Packet {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: IpAddr,
    pub dst: IpAddr,
    pub ttl: u8,
    pub transport: Transport,
    pub payload: Vec<u8>,
}

impl Packet {
    pub fn new(src: IpAddr, dst: IpAddr, transport: Transport) -> Packet {
        Packet {
            src_mac: [0x02, 0, 0, 0, 0, 0x01],
            dst_mac: [0x02, 0, 0, 0, 0, 0x02],
            src,
            dst,
            ttl: 64,
            transport,
            payload: b"bpfsync".to_vec(),
        }
    }

    pub fn build(&self) -> Vec<u8> {
        let l4 = self.l4();
        let mut p = Vec::with_capacity(14 + 40 + l4.len());
        p.extend_from_slice(&self.dst_mac);
        p.extend_from_slice(&self.src_mac);
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                p.extend_from_slice(&ETH_P_IP.to_be_bytes());
                let total = (20 + l4.len()) as u16;
                let mut ip = vec![0x45, 0];
                ip.extend_from_slice(&total.to_be_bytes());
                ip.extend_from_slice(&[0, 1, 0x40, 0]); // id 1, don't fragment
                ip.extend_from_slice(&[self.ttl, self.transport.protocol(), 0, 0]);
                ip.extend_from_slice(&s.octets());
                ip.extend_from_slice(&d.octets());
                let c = checksum(&ip, 0);
                ip[10..12].copy_from_slice(&c.to_be_bytes());
                p.extend_from_slice(&ip);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                p.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
                p.extend_from_slice(&[0x60, 0, 0, 0]);
                p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
                p.extend_from_slice(&[self.transport.protocol(), self.ttl]);
                p.extend_from_slice(&s.octets());
                p.extend_from_slice(&d.octets());
            }
            _ => panic!("source and destination of different IP versions"),
        }
        p.extend_from_slice(&l4);
        p
    }

    fn pseudo_sum(&self, len: usize) -> u32 {
        let mut sum = 0u32;
        let mut add = |b: &[u8]| sum = ones_add(sum, b);
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                add(&s.octets());
                add(&d.octets());
                add(&[0, self.transport.protocol()]);
                add(&(len as u16).to_be_bytes());
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                add(&s.octets());
                add(&d.octets());
                add(&(len as u32).to_be_bytes());
                add(&[0, 0, 0, self.transport.protocol()]);
            }
            _ => {}
        }
        sum
    }

    fn l4(&self) -> Vec<u8> {
        let (mut h, csum_at, pseudo) = match self.transport {
            Transport::Tcp { sport, dport, flags } => {
                let mut h = Vec::new();
                h.extend_from_slice(&sport.to_be_bytes());
                h.extend_from_slice(&dport.to_be_bytes());
                h.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
                (h, Some(16), true)
            }
            Transport::Udp { sport, dport } => {
                let mut h = Vec::new();
                h.extend_from_slice(&sport.to_be_bytes());
                h.extend_from_slice(&dport.to_be_bytes());
                h.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                h.extend_from_slice(&[0, 0]);
                (h, Some(6), true)
            }
            Transport::Icmp { kind, code } => (vec![kind, code, 0, 0, 0, 1, 0, 1], Some(2), false),
            Transport::Icmpv6 { kind, code } => (vec![kind, code, 0, 0, 0, 1, 0, 1], Some(2), true),
            Transport::Other(_) => (Vec::new(), None, false),
        };
        h.extend_from_slice(&self.payload);
        if let Some(at) = csum_at {
            let start = if pseudo { self.pseudo_sum(h.len()) } else { 0 };
            let mut c = checksum(&h, start);
            if c == 0 && matches!(self.transport, Transport::Udp { .. }) {
                c = 0xffff;
            }
            h[at..at + 2].copy_from_slice(&c.to_be_bytes());
        }
        h
    }
}

/// An ARP request: a frame that is not IP.
pub fn arp() -> Vec<u8> {
    let mut p = vec![0xff; 6];
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    p.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    p.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01, 10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 10, 0, 0, 2]);
    p
}

fn ones_add(mut sum: u32, bytes: &[u8]) -> u32 {
    for chunk in bytes.chunks(2) {
        let word = if chunk.len() == 2 { u16::from_be_bytes([chunk[0], chunk[1]]) } else { (chunk[0] as u16) << 8 };
        sum += word as u32;
    }
    sum
}

/// The Internet checksum of `bytes`, starting from a partial `sum`.
pub fn checksum(bytes: &[u8], sum: u32) -> u16 {
    let mut s = ones_add(sum, bytes);
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// Whether the IPv4 header checksum of an Ethernet frame is right.
pub fn ipv4_header_checksum_ok(frame: &[u8]) -> bool {
    frame.len() >= 34 && checksum(&frame[14..34], 0) == 0
}

pub fn ipv4_ttl(frame: &[u8]) -> u8 {
    frame[22]
}

/// (source, destination) MACs of an Ethernet frame.
pub fn macs(frame: &[u8]) -> ([u8; 6], [u8; 6]) {
    (frame[6..12].try_into().unwrap(), frame[0..6].try_into().unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_valid_ipv4_udp() {
        let p = Packet::new(
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            Transport::Udp { sport: 1, dport: 53 },
        )
        .build();
        assert!(ipv4_header_checksum_ok(&p));
        assert_eq!(ipv4_ttl(&p), 64);
        assert_eq!(&p[12..14], &[0x08, 0x00]);
        assert_eq!(p[23], 17);
        // UDP checksum over the pseudo header verifies to zero.
        let pk = Packet::new(
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            Transport::Udp { sport: 1, dport: 53 },
        );
        let l4 = &p[34..];
        assert_eq!(checksum(l4, pk.pseudo_sum(l4.len())), 0);
    }

    #[test]
    fn builds_ipv6_tcp_with_a_valid_checksum() {
        let pk = Packet::new(
            "fd00::1".parse().unwrap(),
            "fd00::2".parse().unwrap(),
            Transport::Tcp { sport: 4000, dport: 8080, flags: 0x02 },
        );
        let p = pk.build();
        assert_eq!(&p[12..14], &[0x86, 0xdd]);
        let l4 = &p[54..];
        assert_eq!(checksum(l4, pk.pseudo_sum(l4.len())), 0);
    }
}

//! Active probes of a next hop: ICMP echo (ICMPv6 for IPv6 neighbours)
//! sent through the hop's own interface (`SO_BINDTODEVICE`), so the answer
//! says whether that path works, not whether some other route does. Each
//! prober has its own identifier and counts sequence numbers; answers that
//! are not its own (other probers, other pings) are skipped. A socket edge
//! of the heal loop: the decisions stay pure ([`super::detector`]).
//!
//! Needs `CAP_NET_RAW` (raw sockets), which the agent has as root.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

const ICMP_ECHO: u8 = 8;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMPV6_ECHO: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;

/// Identifiers handed out so far (two probers never share one).
static NEXT_ID: AtomicU16 = AtomicU16::new(0);

pub struct Prober {
    fd: OwnedFd,
    target: IpAddr,
    id: u16,
    seq: u16,
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

/// The Internet checksum (RFC 1071) of `data`.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32).sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

impl Prober {
    /// A prober of `target` through `interface`.
    pub fn new(interface: &str, target: IpAddr) -> io::Result<Prober> {
        let (domain, proto) = match target {
            IpAddr::V4(_) => (libc::AF_INET, libc::IPPROTO_ICMP),
            IpAddr::V6(_) => (libc::AF_INET6, libc::IPPROTO_ICMPV6),
        };
        // SAFETY: plain socket(2); the descriptor is owned right after.
        let raw = check(unsafe { libc::socket(domain, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) })?;
        // SAFETY: `raw` is a new descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let name = interface.as_bytes();
        // SAFETY: `name` is valid for its length.
        check(unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_BINDTODEVICE,
                name.as_ptr() as *const libc::c_void,
                name.len() as libc::socklen_t,
            )
        })?;
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed) ^ (std::process::id() as u16);
        Ok(Prober { fd, target, id, seq: 0 })
    }

    fn send_echo(&self, seq: u16) -> io::Result<()> {
        let v6 = self.target.is_ipv6();
        let mut pkt = vec![if v6 { ICMPV6_ECHO } else { ICMP_ECHO }, 0, 0, 0];
        pkt.extend_from_slice(&self.id.to_be_bytes());
        pkt.extend_from_slice(&seq.to_be_bytes());
        pkt.extend_from_slice(b"bpfsync-probe");
        if !v6 {
            // The kernel computes ICMPv6 checksums itself, not ICMP ones.
            let c = checksum(&pkt);
            pkt[2..4].copy_from_slice(&c.to_be_bytes());
        }
        // SAFETY: a zeroed sockaddr_storage is valid and large enough for
        // either family; only the family's fields are set below.
        let mut sa: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = match self.target {
            IpAddr::V4(a) => {
                // SAFETY: sockaddr_storage is aligned and sized for sockaddr_in.
                let sin = unsafe { &mut *(&mut sa as *mut _ as *mut libc::sockaddr_in) };
                sin.sin_family = libc::AF_INET as libc::sa_family_t;
                sin.sin_addr.s_addr = u32::from_ne_bytes(a.octets());
                std::mem::size_of::<libc::sockaddr_in>()
            }
            IpAddr::V6(a) => {
                // SAFETY: sockaddr_storage is aligned and sized for sockaddr_in6.
                let sin6 = unsafe { &mut *(&mut sa as *mut _ as *mut libc::sockaddr_in6) };
                sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                sin6.sin6_addr.s6_addr = a.octets();
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        // SAFETY: `pkt` and `sa` are valid for the lengths given.
        let rc = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                pkt.as_ptr() as *const libc::c_void,
                pkt.len(),
                0,
                &sa as *const _ as *const libc::sockaddr,
                len as libc::socklen_t,
            )
        };
        if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    /// The sequence number of `buf` (as the socket returned it) if it is
    /// an echo reply to this prober.
    fn answer_seq(&self, buf: &[u8]) -> Option<u16> {
        let icmp = match self.target {
            // Raw IPv4 sockets return the IP header too; check the source.
            IpAddr::V4(a) => {
                let ihl = ((buf.first()? & 0x0f) as usize) * 4;
                if buf.len() < ihl + 8 || buf.get(12..16) != Some(&a.octets()[..]) {
                    return None;
                }
                &buf[ihl..]
            }
            IpAddr::V6(_) => buf,
        };
        let reply = if self.target.is_ipv6() { ICMPV6_ECHO_REPLY } else { ICMP_ECHO_REPLY };
        (icmp.len() >= 8 && icmp[0] == reply && u16::from_be_bytes([icmp[4], icmp[5]]) == self.id)
            .then(|| u16::from_be_bytes([icmp[6], icmp[7]]))
    }

    /// The socket, to wait on with poll(2) beside other probers.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }

    /// Sends the next echo without waiting: its sequence number, or None
    /// when the path is down right now (a lost probe, not a failure to
    /// probe: rtnetlink says why, as link or neighbour state). An error is a
    /// probe that could not be made (no interface, no permission).
    pub fn send(&mut self) -> io::Result<Option<u16>> {
        self.seq = self.seq.wrapping_add(1);
        match self.send_echo(self.seq) {
            Ok(()) => Ok(Some(self.seq)),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENETDOWN) | Some(libc::ENETUNREACH) | Some(libc::EHOSTUNREACH) | Some(libc::ENOBUFS)
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// The sequence numbers of our answers waiting on the socket (reads
    /// without blocking until it is empty; at most 64 datagrams a call).
    pub fn answers(&self) -> io::Result<Vec<u16>> {
        let mut out = Vec::new();
        let mut buf = [0u8; 1500];
        for _ in 0..64 {
            // SAFETY: `buf` is writable for its whole length.
            let n = unsafe {
                libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len(), libc::MSG_DONTWAIT)
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(out),
                    _ => Err(e),
                };
            }
            if let Some(seq) = self.answer_seq(&buf[..n as usize]) {
                out.push(seq);
            }
        }
        Ok(out)
    }

    /// Sends one echo and waits up to `timeout` for its answer: the
    /// round-trip time, or None when it did not come.
    pub fn probe(&mut self, timeout: Duration) -> io::Result<Option<Duration>> {
        let started = Instant::now();
        let Some(seq) = self.send()? else { return Ok(None) };
        loop {
            let left = timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Ok(None);
            }
            let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            let rc = unsafe { libc::poll(&mut pfd, 1, left.as_millis().clamp(1, i32::MAX as u128) as i32) };
            if rc < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                return Err(io::Error::last_os_error());
            }
            if self.answers()?.contains(&seq) {
                return Ok(Some(started.elapsed()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checksum_is_rfc_1071() {
        // An echo request, id 1, seq 1, no payload: 0x0800 + 0x0001 + 0x0001.
        let pkt = [8, 0, 0, 0, 0, 1, 0, 1];
        assert_eq!(checksum(&pkt), !0x0802);
        let mut with = pkt;
        with[2..4].copy_from_slice(&checksum(&pkt).to_be_bytes());
        assert_eq!(checksum(&with), 0, "a packet with its checksum sums to zero");
    }
}

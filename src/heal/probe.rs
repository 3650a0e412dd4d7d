//! Active probes of a next hop: ICMP echo (ICMPv6 for IPv6 neighbours)
//! sent through the hop's own interface (`SO_BINDTODEVICE`), so the answer
//! says whether that path works, not whether some other route does.
//!
//! One raw socket per interface and family ([`ProbeSocket`]) serves every
//! hop behind that interface: the kernel hands each raw socket a copy of
//! every ICMP packet it may see, so a socket per hop would cost hops²
//! copies (a million a second for 1,000 hops behind one link). Answers are
//! told apart by their source, identifier and sequence number; answers to
//! anyone else (other agents, `ping`) are skipped. A socket edge of the
//! heal loop: the decisions stay pure ([`super::detector`]).
//!
//! Needs `CAP_NET_RAW` (raw sockets), which the agent has as root.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

const ICMP_ECHO: u8 = 8;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMPV6_ECHO: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;

/// The receive buffer of a probe socket, bytes.
const RECEIVE_BUFFER: libc::c_int = 4 << 20;

/// Identifiers handed out so far (two hops never share one).
static NEXT_ID: AtomicU16 = AtomicU16::new(0);

/// A fresh echo identifier, unique within this process.
pub fn new_id() -> u16 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed) ^ (std::process::id() as u16).rotate_left(8)
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

/// Echoes sent or read per system call.
const MAX_BATCH: usize = 64;
/// What a probe carries after the ICMP header.
const PAYLOAD: &[u8; 13] = b"bpfsync-probe";
const ECHO_LEN: usize = 8 + PAYLOAD.len();
/// Room for an answer: an IPv4 header with options and the echo; longer
/// datagrams are truncated (only the first bytes are read).
const ANSWER_ROOM: usize = 60 + ECHO_LEN;

/// One echo to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Echo {
    pub target: IpAddr,
    pub id: u16,
    pub seq: u16,
}

/// The socket address of `target`.
fn sockaddr(target: IpAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: a zeroed sockaddr_storage is valid and large enough for
    // either family; only the family's fields are set below.
    let mut sa: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match target {
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
    (sa, len as libc::socklen_t)
}

/// An echo reply: who answered, to which identifier and sequence number,
/// and when the kernel received it (wall clock, `SO_TIMESTAMPNS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    pub from: IpAddr,
    pub id: u16,
    pub seq: u16,
    pub received: Option<std::time::SystemTime>,
}

/// A raw ICMP (or ICMPv6) socket bound to one interface.
pub struct ProbeSocket {
    fd: OwnedFd,
    v6: bool,
}

/// Errors that mean "the path does not work right now": a lost probe, not
/// a failure to probe (rtnetlink says why, as link or neighbour state).
fn path_down(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENETDOWN) | Some(libc::ENETUNREACH) | Some(libc::EHOSTUNREACH) | Some(libc::ENOBUFS)
    )
}

impl ProbeSocket {
    pub fn new(interface: &str, v6: bool) -> io::Result<ProbeSocket> {
        let (domain, proto) =
            if v6 { (libc::AF_INET6, libc::IPPROTO_ICMPV6) } else { (libc::AF_INET, libc::IPPROTO_ICMP) };
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
        // Answers of every hop behind this interface arrive within a
        // moment of each other: room for a few thousand (the default
        // ~200 KiB holds ~170). FORCE needs CAP_NET_ADMIN, which the agent
        // has; without it the kernel's `rmem_max` caps the plain request.
        let size: libc::c_int = RECEIVE_BUFFER;
        for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
            // SAFETY: `size` is a valid c_int for its length.
            let rc = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    &size as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc == 0 {
                break;
            }
        }
        // The kernel's receive time on every answer: the agent reads
        // answers when it wakes for other reasons, and the RTT stays exact.
        let on: libc::c_int = 1;
        // SAFETY: `on` is a valid c_int for its length.
        check(unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_TIMESTAMPNS,
                &on as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        })?;
        Ok(ProbeSocket { fd, v6 })
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Sends one echo without waiting. `Ok(false)`: the path is down right
    /// now (count the probe lost). An error is a probe that could not be
    /// made (no interface, no permission, a target of the other family).
    pub fn send(&self, target: IpAddr, id: u16, seq: u16) -> io::Result<bool> {
        self.send_all(&[Echo { target, id, seq }]).pop().unwrap_or(Ok(false))
    }

    /// Sends every echo of `batch` with as few system calls as the kernel
    /// allows (sendmmsg(2): one per batch unless one of them fails), and
    /// says for each what [`ProbeSocket::send`] would have.
    pub fn send_all(&self, batch: &[Echo]) -> Vec<io::Result<bool>> {
        let mut results: Vec<io::Result<bool>> = Vec::with_capacity(batch.len());
        let mut packets: Vec<[u8; ECHO_LEN]> = Vec::with_capacity(batch.len());
        let mut addrs: Vec<(libc::sockaddr_storage, libc::socklen_t)> = Vec::with_capacity(batch.len());
        let mut ready = Vec::with_capacity(batch.len());
        for (i, e) in batch.iter().enumerate() {
            if e.target.is_ipv6() != self.v6 {
                results.push(Err(io::Error::new(io::ErrorKind::InvalidInput, "target of the other address family")));
                continue;
            }
            results.push(Ok(true));
            packets.push(self.echo(e.id, e.seq));
            addrs.push(sockaddr(e.target));
            ready.push(i);
        }
        let mut iovs: Vec<libc::iovec> = packets
            .iter_mut()
            .map(|p| libc::iovec { iov_base: p.as_mut_ptr() as *mut libc::c_void, iov_len: p.len() })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = iovs
            .iter_mut()
            .zip(addrs.iter_mut())
            .map(|(iov, (sa, len))| {
                // SAFETY: a zeroed mmsghdr is valid; its pointers are set here.
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_name = sa as *mut _ as *mut libc::c_void;
                m.msg_hdr.msg_namelen = *len;
                m.msg_hdr.msg_iov = iov;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        let mut at = 0;
        while at < msgs.len() {
            let rest = &mut msgs[at..];
            let chunk = rest.len().min(MAX_BATCH) as libc::c_uint;
            // SAFETY: every header points at a packet and an address that
            // live until the call returns.
            let rc = unsafe { libc::sendmmsg(self.fd.as_raw_fd(), rest.as_mut_ptr(), chunk, 0) };
            if rc > 0 {
                at += rc as usize;
                continue;
            }
            // The first message of the rest failed: it alone carries the error.
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            results[ready[at]] = if path_down(&e) { Ok(false) } else { Err(e) };
            at += 1;
        }
        results
    }

    /// An echo request with its checksum.
    fn echo(&self, id: u16, seq: u16) -> [u8; ECHO_LEN] {
        let mut pkt = [0u8; ECHO_LEN];
        pkt[0] = if self.v6 { ICMPV6_ECHO } else { ICMP_ECHO };
        pkt[4..6].copy_from_slice(&id.to_be_bytes());
        pkt[6..8].copy_from_slice(&seq.to_be_bytes());
        pkt[8..].copy_from_slice(PAYLOAD);
        if !self.v6 {
            // The kernel computes ICMPv6 checksums itself, not ICMP ones.
            let c = checksum(&pkt);
            pkt[2..4].copy_from_slice(&c.to_be_bytes());
        }
        pkt
    }

    /// The echo replies waiting on the socket, read without blocking, up
    /// to [`MAX_BATCH`] a system call (recvmmsg(2)) and at most 256 a call,
    /// so one busy link cannot starve others.
    pub fn answers(&self) -> io::Result<Vec<Answer>> {
        let mut out = Vec::new();
        let mut bufs = vec![[0u8; ANSWER_ROOM]; MAX_BATCH];
        // SAFETY: zeroed sockaddr_storage values are valid out-parameters.
        let mut addrs: Vec<libc::sockaddr_storage> = vec![unsafe { std::mem::zeroed() }; MAX_BATCH];
        let mut controls = vec![[0u64; 8]; MAX_BATCH]; // aligned room for one timespec cmsg
        let mut read = 0;
        while read < 256 {
            let mut iovs: Vec<libc::iovec> = bufs
                .iter_mut()
                .map(|b| libc::iovec { iov_base: b.as_mut_ptr() as *mut libc::c_void, iov_len: b.len() })
                .collect();
            let mut msgs: Vec<libc::mmsghdr> = iovs
                .iter_mut()
                .zip(addrs.iter_mut())
                .zip(controls.iter_mut())
                .map(|((iov, sa), control)| {
                    // SAFETY: a zeroed mmsghdr is valid; its pointers are set here.
                    let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                    m.msg_hdr.msg_name = sa as *mut _ as *mut libc::c_void;
                    m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                    m.msg_hdr.msg_iov = iov;
                    m.msg_hdr.msg_iovlen = 1;
                    m.msg_hdr.msg_control = control.as_mut_ptr() as *mut libc::c_void;
                    m.msg_hdr.msg_controllen = std::mem::size_of_val(control) as _;
                    m
                })
                .collect();
            // SAFETY: every header points at buffers that live across the
            // call; MSG_DONTWAIT never blocks, and no timeout is passed.
            let n = unsafe {
                libc::recvmmsg(
                    self.fd.as_raw_fd(),
                    msgs.as_mut_ptr(),
                    MAX_BATCH as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(out),
                    _ if !out.is_empty() => Ok(out), // the error comes back on the next call
                    _ => Err(e),
                };
            }
            let n = n as usize;
            for (i, m) in msgs.iter().enumerate().take(n) {
                let len = (m.msg_len as usize).min(ANSWER_ROOM);
                if let Some(mut a) = self.parse(&bufs[i][..len], &addrs[i]) {
                    a.received = received_at(&m.msg_hdr);
                    out.push(a);
                }
            }
            read += n;
            if n < MAX_BATCH {
                return Ok(out); // the queue is empty
            }
        }
        Ok(out)
    }

    fn parse(&self, buf: &[u8], sa: &libc::sockaddr_storage) -> Option<Answer> {
        let (from, icmp, reply) = if self.v6 {
            // SAFETY: the kernel filled a sockaddr_in6 for this AF_INET6 socket.
            let sin6 = unsafe { &*(sa as *const _ as *const libc::sockaddr_in6) };
            (IpAddr::from(sin6.sin6_addr.s6_addr), buf, ICMPV6_ECHO_REPLY)
        } else {
            // Raw IPv4 sockets return the IP header too.
            let ihl = ((buf.first()? & 0x0f) as usize) * 4;
            let src: [u8; 4] = buf.get(12..16)?.try_into().ok()?;
            (IpAddr::from(src), buf.get(ihl..)?, ICMP_ECHO_REPLY)
        };
        (icmp.len() >= 8 && icmp[0] == reply).then(|| Answer {
            from,
            id: u16::from_be_bytes([icmp[4], icmp[5]]),
            seq: u16::from_be_bytes([icmp[6], icmp[7]]),
            received: None,
        })
    }
}

/// The `SCM_TIMESTAMPNS` control message of a received datagram.
fn received_at(msg: &libc::msghdr) -> Option<std::time::SystemTime> {
    // SAFETY: CMSG_* walk the control buffer recvmsg filled, within
    // `msg_controllen`.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::timespec);
                return Some(std::time::UNIX_EPOCH + Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32));
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    None
}

/// One hop probed on a socket of its own, one echo at a time: for tools
/// and tests. The agent shares sockets between hops ([`ProbeSocket`]).
pub struct Prober {
    socket: ProbeSocket,
    target: IpAddr,
    id: u16,
    seq: u16,
}

impl Prober {
    /// A prober of `target` through `interface`.
    pub fn new(interface: &str, target: IpAddr) -> io::Result<Prober> {
        Ok(Prober { socket: ProbeSocket::new(interface, target.is_ipv6())?, target, id: new_id(), seq: 0 })
    }

    /// Sends one echo and waits up to `timeout` for its answer: the
    /// round-trip time, or None when it did not come.
    pub fn probe(&mut self, timeout: Duration) -> io::Result<Option<Duration>> {
        self.seq = self.seq.wrapping_add(1);
        let started = Instant::now();
        if !self.socket.send(self.target, self.id, self.seq)? {
            return Ok(None);
        }
        loop {
            let left = timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Ok(None);
            }
            let mut pfd = libc::pollfd { fd: self.socket.raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            let rc = unsafe { libc::poll(&mut pfd, 1, left.as_millis().clamp(1, i32::MAX as u128) as i32) };
            if rc < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                return Err(io::Error::last_os_error());
            }
            let mine = |a: &Answer| a.from == self.target && a.id == self.id && a.seq == self.seq;
            if self.socket.answers()?.iter().any(mine) {
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

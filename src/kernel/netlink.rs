//! rtnetlink where bpf links do not reach: which XDP programs an interface
//! runs in which mode (also those attached by `ip link set … xdp`),
//! detaching or re-attaching such a program, an interface's MAC, and the
//! neighbour table (next-hop MACs of mesh routes).

use std::io;
use std::mem::size_of;

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_SETLINK: u16 = 19;
const RTM_GETNEIGH: u16 = 30;
const RTM_NEWNEIGH: u16 = 28;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_DUMP: u16 = 0x300;
const IFLA_ADDRESS: u16 = 1;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
/// Neighbour states whose link-layer address is not usable
/// (`NUD_INCOMPLETE`, `NUD_FAILED`, `NUD_NONE`).
const NUD_UNUSABLE: u16 = 0x01 | 0x20;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const IFLA_XDP: u16 = 43;
const IFLA_XDP_FD: u16 = 1;
const IFLA_XDP_ATTACHED: u16 = 2;
const IFLA_XDP_FLAGS: u16 = 3;
const IFLA_XDP_PROG_ID: u16 = 4;
const IFLA_XDP_DRV_PROG_ID: u16 = 5;
const IFLA_XDP_SKB_PROG_ID: u16 = 6;
const NLA_F_NESTED: u16 = 1 << 15;

pub const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
pub const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

/// XDP programs on one interface, by mode.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct XdpState {
    pub skb_prog: Option<u32>,
    pub drv_prog: Option<u32>,
}

#[repr(C)]
struct NlMsgHdr {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

#[repr(C)]
struct IfInfoMsg {
    family: u8,
    _pad: u8,
    kind: u16,
    index: i32,
    flags: u32,
    change: u32,
}

struct Socket(i32);

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: we own this descriptor.
        unsafe { libc::close(self.0) };
    }
}

fn socket() -> io::Result<Socket> {
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
    if fd < 0 { Err(io::Error::last_os_error()) } else { Ok(Socket(fd)) }
}

fn push_attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

fn request(kind: u16, flags: u16, ifindex: u32, attrs: &[u8]) -> Vec<u8> {
    let mut msg = Vec::new();
    let total = size_of::<NlMsgHdr>() + size_of::<IfInfoMsg>() + attrs.len();
    let hdr = NlMsgHdr { len: total as u32, kind, flags, seq: 1, pid: 0 };
    let ifi = IfInfoMsg { family: libc::AF_UNSPEC as u8, _pad: 0, kind: 0, index: ifindex as i32, flags: 0, change: 0 };
    // SAFETY: both are repr(C) plain structs viewed as bytes.
    unsafe {
        msg.extend_from_slice(std::slice::from_raw_parts(&hdr as *const _ as *const u8, size_of::<NlMsgHdr>()));
        msg.extend_from_slice(std::slice::from_raw_parts(&ifi as *const _ as *const u8, size_of::<IfInfoMsg>()));
    }
    msg.extend_from_slice(attrs);
    msg
}

fn roundtrip(msg: &[u8]) -> io::Result<Vec<u8>> {
    let s = socket()?;
    // SAFETY: `msg` is a valid buffer of the given length.
    let sent = unsafe { libc::send(s.0, msg.as_ptr() as *const libc::c_void, msg.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 65536];
    // SAFETY: `buf` is writable for its whole length.
    let n = unsafe { libc::recv(s.0, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_ne_bytes([b[o], b[o + 1]])
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_ne_bytes(b[o..o + 4].try_into().unwrap())
}

/// Iterates netlink attributes in `b`: (type without flags, payload).
fn attrs(b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut off = 0;
    std::iter::from_fn(move || {
        if off + 4 > b.len() {
            return None;
        }
        let len = u16_at(b, off) as usize;
        let kind = u16_at(b, off + 2) & !NLA_F_NESTED;
        if len < 4 || off + len > b.len() {
            return None;
        }
        let payload = &b[off + 4..off + len];
        off += (len + 3) & !3;
        Some((kind, payload))
    })
}

fn check_error(reply: &[u8]) -> io::Result<()> {
    if reply.len() >= 20 && u16_at(reply, 4) == NLMSG_ERROR {
        let errno = i32::from_ne_bytes(reply[16..20].try_into().unwrap());
        if errno != 0 {
            return Err(io::Error::from_raw_os_error(-errno));
        }
    }
    Ok(())
}

/// The attributes of interface `ifindex` (RTM_GETLINK).
fn link_attrs(ifindex: u32) -> io::Result<Vec<u8>> {
    let mut reply = roundtrip(&request(RTM_GETLINK, NLM_F_REQUEST, ifindex, &[]))?;
    check_error(&reply)?;
    if reply.len() < 32 || u16_at(&reply, 4) != RTM_NEWLINK {
        return Err(io::Error::other("unexpected rtnetlink reply"));
    }
    let len = (u32_at(&reply, 0) as usize).min(reply.len());
    reply.truncate(len);
    Ok(reply.split_off(32))
}

/// The MAC address of interface `ifindex` (None for interfaces without an
/// Ethernet address).
pub fn link_mac(ifindex: u32) -> io::Result<Option<[u8; 6]>> {
    let a = link_attrs(ifindex)?;
    Ok(attrs(&a).find(|(k, _)| *k == IFLA_ADDRESS).and_then(|(_, p)| p.try_into().ok()))
}

/// The name of interface `ifindex` in this namespace, if it exists.
pub fn interface_name(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has room for IF_NAMESIZE bytes, as if_indextoname needs.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    Some(unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
}

/// One usable entry of the kernel's neighbour table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Neighbor {
    pub ifindex: u32,
    pub addr: std::net::IpAddr,
    pub mac: [u8; 6],
}

/// The neighbour table (IPv4 ARP and IPv6 NDP) of this network namespace,
/// without entries that are still resolving or have failed.
pub fn neighbors() -> io::Result<Vec<Neighbor>> {
    let mut out = Vec::new();
    dump_neighbors(|m| {
        if u16_at(m, 4) == RTM_NEWNEIGH
            && let Some(n) = parse_neighbor(m)
            && n.state & NUD_UNUSABLE == 0
            && n.state != 0
            && let Some(mac) = n.mac
        {
            out.push(Neighbor { ifindex: n.ifindex, addr: n.addr, mac });
        }
    })?;
    Ok(out)
}

/// The netlink messages in a buffer the kernel filled, each whole (a
/// truncated or malformed one ends the walk).
fn messages(b: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut off = 0;
    std::iter::from_fn(move || {
        if off + 16 > b.len() {
            return None;
        }
        let len = u32_at(b, off) as usize;
        if len < 16 || off + len > b.len() {
            return None;
        }
        let m = &b[off..off + len];
        off += (len + 3) & !3;
        Some(m)
    })
}

/// Dumps the whole neighbour table (every family, every state), handing
/// each message to `each`.
fn dump_neighbors(mut each: impl FnMut(&[u8])) -> io::Result<()> {
    let s = socket()?;
    let mut msg = Vec::new();
    let hdr = NlMsgHdr {
        len: (size_of::<NlMsgHdr>() + 12) as u32,
        kind: RTM_GETNEIGH,
        flags: NLM_F_REQUEST | NLM_F_DUMP,
        seq: 1,
        pid: 0,
    };
    // SAFETY: repr(C) plain struct viewed as bytes.
    msg.extend_from_slice(unsafe { std::slice::from_raw_parts(&hdr as *const _ as *const u8, size_of::<NlMsgHdr>()) });
    msg.extend_from_slice(&[0u8; 12]); // struct ndmsg, family AF_UNSPEC: all families
    // SAFETY: `msg` is a valid buffer of the given length.
    if unsafe { libc::send(s.0, msg.as_ptr() as *const libc::c_void, msg.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 1 << 16];
    loop {
        // SAFETY: `buf` is writable for its whole length.
        let n = unsafe { libc::recv(s.0, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        for m in messages(&buf[..n as usize]) {
            match u16_at(m, 4) {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => check_error(m)?,
                _ => each(m),
            }
        }
    }
}

/// A neighbour table message, whatever its state.
struct NeighborMessage {
    ifindex: u32,
    addr: std::net::IpAddr,
    state: u16,
    mac: Option<[u8; 6]>,
}

/// Reads an RTM_NEWNEIGH / RTM_DELNEIGH message (`struct ndmsg` at 16:
/// family, pads, ifindex at 20, state at 24, flags, type; attributes at 28).
fn parse_neighbor(m: &[u8]) -> Option<NeighborMessage> {
    if m.len() < 28 {
        return None;
    }
    let (ifindex, state) = (u32_at(m, 20), u16_at(m, 24));
    let (mut addr, mut mac) = (None, None);
    for (k, p) in attrs(&m[28..]) {
        match (k, p.len()) {
            (NDA_DST, 4) => addr = <[u8; 4]>::try_from(p).ok().map(std::net::IpAddr::from),
            (NDA_DST, 16) => addr = <[u8; 16]>::try_from(p).ok().map(std::net::IpAddr::from),
            (NDA_LLADDR, 6) => mac = <[u8; 6]>::try_from(p).ok(),
            _ => {}
        }
    }
    Some(NeighborMessage { ifindex, addr: addr?, state, mac })
}

/// The XDP programs attached to interface `ifindex`, whoever attached them.
pub fn xdp_state(ifindex: u32) -> io::Result<XdpState> {
    let a = link_attrs(ifindex)?;
    let mut state = XdpState::default();
    for (kind, payload) in attrs(&a) {
        if kind != IFLA_XDP {
            continue;
        }
        let mut attached = 0u8;
        let mut single = None;
        for (k, p) in attrs(payload) {
            match k {
                IFLA_XDP_ATTACHED if !p.is_empty() => attached = p[0],
                IFLA_XDP_PROG_ID if p.len() >= 4 => single = Some(u32_at(p, 0)),
                IFLA_XDP_DRV_PROG_ID if p.len() >= 4 => state.drv_prog = Some(u32_at(p, 0)),
                IFLA_XDP_SKB_PROG_ID if p.len() >= 4 => state.skb_prog = Some(u32_at(p, 0)),
                _ => {}
            }
        }
        // XDP_ATTACHED_DRV = 1, XDP_ATTACHED_SKB = 2: one program, one id.
        match (attached, single) {
            (1, Some(id)) => state.drv_prog = Some(id),
            (2, Some(id)) => state.skb_prog = Some(id),
            _ => {}
        }
    }
    Ok(state)
}

/// Sets (or with `prog_fd` -1, clears) the netlink-attached XDP program of
/// one mode.
pub fn xdp_set(ifindex: u32, prog_fd: i32, mode_flags: u32) -> io::Result<()> {
    let mut inner = Vec::new();
    push_attr(&mut inner, IFLA_XDP_FD, &prog_fd.to_ne_bytes());
    push_attr(&mut inner, IFLA_XDP_FLAGS, &mode_flags.to_ne_bytes());
    let mut outer = Vec::new();
    push_attr(&mut outer, IFLA_XDP | NLA_F_NESTED, &inner);
    let reply = roundtrip(&request(RTM_SETLINK, NLM_F_REQUEST | NLM_F_ACK, ifindex, &outer))?;
    check_error(&reply)
}

const RTM_DELLINK: u16 = 17;
const IFLA_IFNAME: u16 = 3;
/// `RTMGRP_LINK`: multicast group of link (interface) changes.
const RTMGRP_LINK: u32 = 1;

/// A subscription to the kernel's interface events (created, deleted,
/// changed), for reacting at once instead of at the next poll.
pub struct LinkEvents(Socket);

impl LinkEvents {
    /// Subscribes to link events of this network namespace. `recv` waits at
    /// most `timeout` for events.
    pub fn subscribe(timeout: std::time::Duration) -> io::Result<LinkEvents> {
        Ok(LinkEvents(subscribe_groups(RTMGRP_LINK, timeout)?))
    }

    /// Names of the interfaces that changed since the last call (empty after
    /// the timeout). ENOBUFS (events were lost: the socket overflowed) is
    /// reported as an error so the caller can resynchronise.
    pub fn recv(&mut self) -> io::Result<Vec<String>> {
        Ok(recv_events(&self.0)?.map(|b| link_names(&b)).unwrap_or_default())
    }
}

const RTM_DELNEIGH: u16 = 29;
/// `RTMGRP_NEIGH`: multicast group of neighbour table changes.
const RTMGRP_NEIGH: u32 = 4;
const NUD_FAILED: u16 = 0x20;
/// Usable states: REACHABLE, STALE, DELAY, PROBE, NOARP, PERMANENT.
const NUD_VALID: u16 = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80;

/// What the heal loop hears from rtnetlink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthEvent {
    /// An interface changed or went away: read its state again.
    Link(String),
    /// A neighbour's entry: `Some(true)` usable, `Some(false)` FAILED,
    /// None resolving or deleted (no verdict).
    Neighbor { ifindex: u32, addr: std::net::IpAddr, reachable: Option<bool> },
}

/// Link and neighbour events (RTMGRP_LINK | RTMGRP_NEIGH), for the hop
/// health of the heal loop: pushed by the kernel, not polled.
pub struct HealthEvents(Socket);

impl HealthEvents {
    pub fn subscribe(timeout: std::time::Duration) -> io::Result<HealthEvents> {
        Ok(HealthEvents(subscribe_groups(RTMGRP_LINK | RTMGRP_NEIGH, timeout)?))
    }

    pub fn raw_fd(&self) -> i32 {
        self.0.0
    }

    /// The events since the last call (empty after the timeout); ENOBUFS
    /// (events lost) is an error, so the caller reads the state again.
    pub fn recv(&mut self) -> io::Result<Vec<HealthEvent>> {
        Ok(recv_events(&self.0)?.map(|b| health_events(&b)).unwrap_or_default())
    }
}

fn health_events(b: &[u8]) -> Vec<HealthEvent> {
    let mut out: Vec<HealthEvent> = link_names(b).into_iter().map(HealthEvent::Link).collect();
    for m in messages(b) {
        let kind = u16_at(m, 4);
        if matches!(kind, RTM_NEWNEIGH | RTM_DELNEIGH)
            && let Some(n) = parse_neighbor(m)
        {
            let reachable = if kind == RTM_DELNEIGH {
                None
            } else if n.state & NUD_FAILED != 0 {
                Some(false)
            } else if n.state & NUD_VALID != 0 {
                Some(true)
            } else {
                None
            };
            out.push(HealthEvent::Neighbor { ifindex: n.ifindex, addr: n.addr, reachable });
        }
    }
    out
}

/// Every neighbour entry's state now, by (ifindex, address): as
/// [`HealthEvent::Neighbor`]'s `reachable` (an absent entry: no verdict).
pub fn neighbor_states() -> io::Result<std::collections::HashMap<(u32, std::net::IpAddr), Option<bool>>> {
    let mut found = std::collections::HashMap::new();
    dump_neighbors(|m| {
        for ev in health_events(m) {
            if let HealthEvent::Neighbor { ifindex, addr, reachable } = ev {
                found.insert((ifindex, addr), reachable);
            }
        }
    })?;
    Ok(found)
}

/// One read of an event subscription: the messages, or None after the
/// timeout. ENOBUFS (events were lost: the socket overflowed) is an error,
/// so the caller can read the state again.
fn recv_events(s: &Socket) -> io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; 1 << 16];
    // SAFETY: `buf` is writable for its whole length.
    let n = unsafe { libc::recv(s.0, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
            _ => Err(e),
        };
    }
    buf.truncate(n as usize);
    Ok(Some(buf))
}

fn subscribe_groups(groups: u32, timeout: std::time::Duration) -> io::Result<Socket> {
    let s = socket()?;
    // SAFETY: zeroed sockaddr_nl is valid; we fill family and groups.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    addr.nl_groups = groups;
    // SAFETY: `addr` is a valid sockaddr_nl of the given size.
    let rc =
        unsafe { libc::bind(s.0, &addr as *const _ as *const libc::sockaddr, size_of::<libc::sockaddr_nl>() as u32) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let tv = libc::timeval { tv_sec: timeout.as_secs() as _, tv_usec: timeout.subsec_micros() as _ };
    // SAFETY: `tv` is a valid timeval of the given size.
    let rc = unsafe {
        libc::setsockopt(
            s.0,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const _ as *const libc::c_void,
            size_of::<libc::timeval>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(s)
}

/// Interface names in a batch of RTM_NEWLINK / RTM_DELLINK messages.
fn link_names(b: &[u8]) -> Vec<String> {
    let mut names = Vec::new();
    for m in messages(b) {
        if matches!(u16_at(m, 4), RTM_NEWLINK | RTM_DELLINK) && m.len() >= 32 {
            for (k, p) in attrs(&m[32..]) {
                if k == IFLA_IFNAME {
                    let p = p.split(|c| *c == 0).next().unwrap_or_default();
                    names.push(String::from_utf8_lossy(p).into_owned());
                }
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_names_are_read_from_newlink_and_dellink_and_nothing_else() {
        let msg = |kind: u16, name: &str| {
            let mut attrs = Vec::new();
            push_attr(&mut attrs, IFLA_IFNAME, format!("{name}\0").as_bytes());
            let mut m = request(kind, 0, 7, &attrs);
            let len = m.len() as u32;
            m[..4].copy_from_slice(&len.to_ne_bytes());
            m
        };
        let mut batch = msg(RTM_NEWLINK, "veth0");
        batch.extend(msg(RTM_DELLINK, "mesh1"));
        batch.extend(msg(RTM_GETLINK, "other"));
        assert_eq!(link_names(&batch), vec!["veth0".to_string(), "mesh1".to_string()]);
        // Truncated input ends the walk without panicking.
        assert!(link_names(&batch[..20]).is_empty());
    }

    /// An RTM_*NEIGH message: header, `struct ndmsg` (ifindex at 20, state
    /// at 24), NDA_DST and NDA_LLADDR.
    fn neigh(kind: u16, ifindex: u32, state: u16, addr: [u8; 4]) -> Vec<u8> {
        let mut m = vec![0u8; 28];
        m[4..6].copy_from_slice(&kind.to_ne_bytes());
        m[16] = libc::AF_INET as u8;
        m[20..24].copy_from_slice(&ifindex.to_ne_bytes());
        m[24..26].copy_from_slice(&state.to_ne_bytes());
        push_attr(&mut m, NDA_DST, &addr);
        push_attr(&mut m, NDA_LLADDR, &[2, 0, 0, 0, 0, 1]);
        let len = m.len() as u32;
        m[..4].copy_from_slice(&len.to_ne_bytes());
        m
    }

    #[test]
    fn neighbour_events_say_reachable_failed_or_unknown() {
        let ip = std::net::IpAddr::from([10, 0, 0, 2]);
        let ev = |m: Vec<u8>| health_events(&m);
        let of = |reachable| vec![HealthEvent::Neighbor { ifindex: 3, addr: ip, reachable }];
        assert_eq!(ev(neigh(RTM_NEWNEIGH, 3, 0x02, [10, 0, 0, 2])), of(Some(true)), "REACHABLE");
        assert_eq!(ev(neigh(RTM_NEWNEIGH, 3, 0x04, [10, 0, 0, 2])), of(Some(true)), "STALE still forwards");
        assert_eq!(ev(neigh(RTM_NEWNEIGH, 3, 0x20, [10, 0, 0, 2])), of(Some(false)), "FAILED");
        assert_eq!(ev(neigh(RTM_NEWNEIGH, 3, 0x01, [10, 0, 0, 2])), of(None), "INCOMPLETE: no verdict yet");
        assert_eq!(ev(neigh(RTM_DELNEIGH, 3, 0x02, [10, 0, 0, 2])), of(None), "deleted");
        let mut both = neigh(RTM_NEWNEIGH, 3, 0x20, [10, 0, 0, 2]);
        both.extend(neigh(RTM_NEWNEIGH, 3, 0x02, [10, 0, 0, 2]));
        assert_eq!(ev(both).len(), 2, "a batch carries several");
        assert!(health_events(&neigh(RTM_NEWNEIGH, 3, 0x02, [10, 0, 0, 2])[..30]).is_empty(), "truncated");
    }
}

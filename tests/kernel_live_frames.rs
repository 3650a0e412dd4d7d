//! `testrun::run_live_frames` on the real kernel: the firewall benchmark's
//! load generator (`tests/fixtures/trafficgen.bpf.o`) run in live-frames
//! mode makes one frame per repetition, and a passed frame enters the stack
//! of the interface as if it had been received there — here it reaches a
//! UDP socket of the root namespace, addressed to a sandbox's host end.

mod common;

use std::net::{IpAddr, SocketAddrV4, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use bpfsync::kernel::testrun::run_live_frames;
use bpfsync::kernel::{Kernel, LoadRequest};
use bpfsync::model::MapRef;
use bpfsync::packet::{Packet, Transport};
use bpfsync::spec::ProgramType;
use common::{Env, Sandbox};

#[test]
fn live_frames_enter_the_stack_as_received_frames() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    let mut k = env.kernel();
    k.load_program(&LoadRequest {
        name: "trafficgen".into(),
        digest: "test".into(),
        function: "trafficgen".into(),
        program_type: ProgramType::Xdp,
        bytes: Arc::from(std::fs::read(common::repo().join("tests/fixtures/trafficgen.bpf.o")).unwrap()),
        map_owner: "trafficgen".into(),
        fresh_maps: vec![],
    })
    .unwrap();
    let host_mac = std::fs::read_to_string(format!("/sys/class/net/{}/address", sb.host_if)).unwrap();
    let mut p =
        Packet::new(IpAddr::V4(sb.peer_ip), IpAddr::V4(sb.host_ip), Transport::Udp { sport: 10_000, dport: 9_999 });
    p.dst_mac = bpfsync::net::parse_mac(host_mac.trim()).unwrap();
    let mut frame = p.build();
    frame[40..42].copy_from_slice(&[0, 0]); // no UDP checksum: the generator changes the port
    let mut config = vec![0u8; 56];
    config[0..4].copy_from_slice(&4u32.to_ne_bytes()); // four flows
    config[4..8].copy_from_slice(&10_000u32.to_ne_bytes());
    config[8..50].copy_from_slice(&frame[..42]);
    let map = |name: &str| MapRef { program: "trafficgen".into(), map: name.into() };
    k.write_entries(&map("gen_config"), &[(0u32.to_ne_bytes().to_vec(), config)]).unwrap();

    let socket = UdpSocket::bind(SocketAddrV4::new(sb.host_ip, 9_999)).unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    // A live frame is a page: 100 of them are more than the default
    // receive buffer holds.
    let size: libc::c_int = 8 << 20;
    // SAFETY: a valid socket, an int option of the right size.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    let ifindex: u32 =
        std::fs::read_to_string(format!("/sys/class/net/{}/ifindex", sb.host_if)).unwrap().trim().parse().unwrap();
    let pin = env.bpffs.root().join("programs/trafficgen/test");
    run_live_frames(&pin, &frame, 100, 16, ifindex).unwrap();

    // One run per frame, on the test's CPU: the per-CPU copies add up to 100.
    let seq = k.observe(&bpfsync::kernel::Scope { map_names: ["gen_sequence".into()].into(), ..Default::default() });
    let seq = seq.unwrap();
    let total: u64 = seq.maps[&map("gen_sequence")]
        .entries
        .iter()
        .map(|(_, v)| v.chunks(8).map(|c| u64::from_ne_bytes(c.try_into().unwrap())).sum::<u64>())
        .sum();
    assert_eq!(total, 100, "one run per frame");
    // The frames were received: the socket gets them, from the four ports.
    let mut ports = std::collections::BTreeSet::new();
    let mut buf = [0u8; 256];
    let mut got = 0;
    while let Ok((_, from)) = socket.recv_from(&mut buf) {
        got += 1;
        ports.insert(from.port());
        if got == 100 {
            break;
        }
    }
    assert_eq!(got, 100, "every frame reached the socket");
    assert_eq!(ports.into_iter().collect::<Vec<_>>(), vec![10_000, 10_001, 10_002, 10_003]);
}

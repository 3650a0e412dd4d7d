//! ICMP probes through a hop's own interface, on the real kernel: an
//! answered probe has its RTT; a hop whose far end is down loses its
//! probes (None), never an error; probes of two probers and other pings
//! are not mixed up.

mod common;

use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

use bpfsync::heal::probe::Prober;
use common::Sandbox;

#[test]
fn probes_through_the_hops_interface_answer_and_are_lost_when_the_far_end_goes_down() {
    let sb = Sandbox::create().unwrap();
    let target = IpAddr::V4(sb.peer_ip);
    let mut a = Prober::new(&sb.host_if, target).unwrap();
    let mut b = Prober::new(&sb.host_if, target).unwrap();
    // Two probers at once: each sees its own answers only.
    for _ in 0..5 {
        let rtt = a.probe(Duration::from_secs(1)).unwrap().expect("an answer");
        assert!(rtt < Duration::from_millis(500), "{rtt:?}");
        assert!(b.probe(Duration::from_secs(1)).unwrap().is_some());
    }
    // Bound to the interface: the same address through loopback is not
    // this path.
    let mut wrong = Prober::new("lo", target).unwrap();
    assert_eq!(wrong.probe(Duration::from_millis(300)).unwrap(), None);

    let down = Command::new("ip").args(["-n", &sb.netns, "link", "set", &sb.peer_if, "down"]).status().unwrap();
    assert!(down.success());
    let started = std::time::Instant::now();
    assert_eq!(a.probe(Duration::from_millis(300)).unwrap(), None, "the far end is down: lost");
    assert!(started.elapsed() < Duration::from_millis(600), "bounded by the timeout");
    let up = Command::new("ip").args(["-n", &sb.netns, "link", "set", &sb.peer_if, "up"]).status().unwrap();
    assert!(up.success());
    common::wait("answers again", Duration::from_secs(10), || {
        a.probe(Duration::from_millis(300)).ok().flatten().is_some()
    });
}

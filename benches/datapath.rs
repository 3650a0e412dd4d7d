//! Datapath cost of the built-in programs, from `BPF_PROG_TEST_RUN` (the
//! kernel's own timing, 1,000,000 runs per figure).
//!
//!     cargo bench --bench datapath

use std::net::IpAddr;

use bpfsync::kernel::real::RealKernel;
use bpfsync::kernel::testrun::run_pinned;
use bpfsync::kernel::{Kernel, LoadRequest};
use bpfsync::model::MapRef;
use bpfsync::packet::{Packet, Transport};
use bpfsync::sandbox::TempBpffs;

fn main() {
    if unsafe { libc::geteuid() } != 0 {
        println!("datapath benchmarks need root");
        return;
    }
    let bpffs = TempBpffs::create().unwrap();
    let mut k = RealKernel::open(bpffs.root()).unwrap();
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let udp = Packet::new(ip("10.1.0.1"), ip("10.2.0.1"), Transport::Udp { sport: 5000, dport: 9 }).build();
    let tcp6 =
        Packet::new(ip("fd00::1"), ip("fd00::2"), Transport::Tcp { sport: 5000, dport: 443, flags: 0x10 }).build();
    println!("| program | packet | ns/packet |");
    println!("|---|---|---:|");
    for name in ["counter", "classifier"] {
        let req = LoadRequest::builtin(name, "bench").unwrap();
        k.load_program(&req).unwrap();
        if name == "counter" {
            // Counting on, as a deployment would have it.
            let config = MapRef { program: name.into(), map: "counter_config".into() };
            k.write_entries(&config, &[(0u32.to_le_bytes().to_vec(), 1u32.to_le_bytes().to_vec())]).unwrap();
        }
        let pin = bpffs.root().join("programs").join(name).join("bench");
        for (label, packet) in [("IPv4 UDP", &udp), ("IPv6 TCP", &tcp6)] {
            let r = run_pinned(&pin, req.program_type, packet, 1_000_000).unwrap();
            println!("| {name} | {label} | {} |", r.per_run.as_nanos());
        }
    }
}

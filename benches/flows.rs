//! Flow records: what emitting them costs the datapath, and how many the
//! agent's reader drains per second without loss.
//!
//! 1. ns/packet from `BPF_PROG_TEST_RUN` with flow records on and off
//!    (`flow_config.disabled`), for an established flow, a new flow per
//!    packet, and a dropped packet (goal: records add under 30%).
//! 2. The reader (the agent's code: ring buffer → records → history and
//!    counters) against a load generator (tests/fixtures/flowgen.bpf.c)
//!    filling the same ring buffer: live, with the generator at full speed
//!    (records drained per second, records lost), and the reader's ceiling,
//!    timing it as it drains a full ring (goal: 1,000,000/s without loss).
//!
//!     cargo bench --bench flows

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bpfsync::datapath::{FlowConfig, Plain};
use bpfsync::flows::hub::FlowHub;
use bpfsync::flows::reader;
use bpfsync::kernel::real::RealKernel;
use bpfsync::kernel::testrun::run_pinned_on;
use bpfsync::kernel::{Kernel, LoadRequest, sys};
use bpfsync::mesh::policy::{Action, Decision, PeerEntry, Scope, encode_decision, encode_peer};
use bpfsync::mesh::{self};
use bpfsync::model::Direction;
use bpfsync::packet::{Packet, Transport};
use bpfsync::sandbox::{Sandbox, TempBpffs};
use bpfsync::spec::ProgramType;

const SET: u32 = 7;

fn tcp(src: u32, sport: u16, dport: u16) -> Vec<u8> {
    Packet::new(
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + src)),
        IpAddr::V4(Ipv4Addr::new(10, 250, 0, 1)),
        Transport::Tcp { sport, dport, flags: 0x10 },
    )
    .build()
}

struct Bench {
    pin: PathBuf,
    ifindex: u32,
    config: OwnedFd,
}

impl Bench {
    fn configure(&self, c: FlowConfig) {
        sys::map_update(self.config.as_fd(), &0u32.to_ne_bytes(), c.as_bytes()).unwrap();
    }

    /// Mean ns/packet over `batches` runs of `repeat`.
    fn ns(&self, packet: &[u8], repeat: u32, batches: u32, want: u32) -> f64 {
        let mut total = 0.0;
        for _ in 0..batches {
            let r = run_pinned_on(&self.pin, ProgramType::Xdp, packet, repeat, Some(self.ifindex)).unwrap();
            assert_eq!(r.return_value, want);
            total += r.per_run.as_nanos() as f64;
        }
        total / batches as f64
    }

    /// Mean ns/packet over `n` packets of distinct flows (one run each).
    fn ns_new_flows(&self, first: u32, n: u32) -> f64 {
        let mut total = 0.0;
        for i in first..first + n {
            let p = tcp(i, 1024 + (i % 50_000) as u16, 8080);
            total += run_pinned_on(&self.pin, ProgramType::Xdp, &p, 1, Some(self.ifindex)).unwrap().per_run.as_nanos()
                as f64;
        }
        total / n as f64
    }
}

fn load(root: &Path, ifindex: u32) -> Bench {
    let mut k = RealKernel::open(root).unwrap();
    k.load_program(&LoadRequest::builtin(mesh::PROGRAM, "bench").unwrap()).unwrap();
    // Every peer is in one set: TCP 8080 allowed (rule 1), the rest denied
    // by default.
    let peers = vec![encode_peer(
        ifindex,
        Direction::Ingress,
        &PeerEntry { prefix: "0.0.0.0/0".parse().unwrap(), set_id: SET },
    )];
    let deny = Decision { scope: Scope::All, rule_id: 0x8000_0001, action: Action::Deny };
    let allow =
        Decision { scope: Scope::Port { protocol: 6, port: 8080, bits: 16 }, rule_id: 1, action: Action::Allow };
    k.write_entries(&mesh::map_ref(mesh::ACTIONS_MAP), &[encode_decision(SET, &deny), encode_decision(SET, &allow)])
        .unwrap();
    k.write_entries(&mesh::map_ref(mesh::PEERS_MAP), &peers).unwrap();
    let map = |name: &str| sys::obj_get(&reader::mesh_map_pin(root, name)).unwrap();
    Bench { pin: root.join("programs").join(mesh::PROGRAM).join("bench"), ifindex, config: map("flow_config") }
}

fn main() {
    if unsafe { libc::geteuid() } != 0 {
        println!("flow benchmarks need root");
        return;
    }
    let sb = Sandbox::create().unwrap();
    sb.disable_ipv6().unwrap();
    let ifindex = sys::ifindex(&sb.host_if).unwrap();
    let bpffs = TempBpffs::create().unwrap();
    let bench = load(&bpffs.root(), ifindex);

    // The reader runs throughout, as in the agent, so the ring never fills.
    let hub = Arc::new(FlowHub::new(10_000, vec![]));
    let stop = Arc::new(AtomicBool::new(false));
    let reader_thread = reader::spawn(bpffs.root(), hub.clone(), stop.clone());
    std::thread::sleep(Duration::from_millis(300));

    println!("## Emission cost (BPF_PROG_TEST_RUN, ns/packet)\n");
    println!("| packet | records off | records on | ratio |");
    println!("|---|---:|---:|---:|");
    let on = FlowConfig::default();
    let off = FlowConfig { disabled: 1, ..Default::default() };
    let established = tcp(1, 40000, 8080);
    let dropped = tcp(2, 40001, 9999);
    let mut rows = Vec::new();
    for (name, packet, want) in
        [("established flow (allowed)", &established, 2u32), ("dropped (default deny)", &dropped, 1)]
    {
        bench.configure(off);
        bench.ns(packet, 1, 1, want); // the conntrack entry (or drop aggregate) exists
        let t_off = bench.ns(packet, 1000, 500, want);
        bench.configure(on);
        bench.ns(packet, 1, 1, want);
        let t_on = bench.ns(packet, 1000, 500, want);
        rows.push((name, t_off, t_on));
    }
    bench.configure(off);
    let new_off = bench.ns_new_flows(100_000, 20_000);
    bench.configure(on);
    let new_on = bench.ns_new_flows(200_000, 20_000);
    rows.push(("new flow (first packet)", new_off, new_on));
    for (name, t_off, t_on) in rows {
        println!("| {name} | {t_off:.0} | {t_on:.0} | {:.2} |", t_on / t_off);
    }

    // The producer: a load generator writing records into the same ring
    // buffer (a test run of the mesh program itself costs microseconds of
    // setup per call, far slower than the reader).
    let mut k = RealKernel::open(bpffs.root()).unwrap();
    k.load_program(&LoadRequest {
        name: "flowgen".into(),
        digest: "bench".into(),
        function: "flowgen".into(),
        program_type: ProgramType::Xdp,
        bytes: Arc::from(&include_bytes!("../tests/fixtures/flowgen.bpf.o")[..]),
        map_owner: mesh::PROGRAM.into(),
        fresh_maps: vec![],
    })
    .unwrap();
    let generator = bpffs.root().join("programs/flowgen/bench");
    let gen_config = sys::obj_get(&reader::mesh_map_pin(&bpffs.root(), "flowgen_config")).unwrap();
    let gen_lost = sys::obj_get(&reader::mesh_map_pin(&bpffs.root(), "flowgen_lost")).unwrap();
    const PER_RUN: u32 = 100;
    const REPEAT: u32 = 50; // 5,000 records per test run
    sys::map_update(gen_config.as_fd(), &0u32.to_ne_bytes(), &PER_RUN.to_ne_bytes()).unwrap();
    let lost = || {
        let mut v = [0u8; 8];
        sys::map_lookup(gen_lost.as_fd(), &0u32.to_ne_bytes(), &mut v).unwrap();
        u64::from_ne_bytes(v)
    };

    const BATCH: u64 = (PER_RUN * REPEAT) as u64;
    let packet = tcp(1, 1, 1);

    // Live: the agent's reader thread against the generator at full speed.
    println!("\n## Reader throughput\n");
    let lost_before = lost();
    let read_before = hub.counters.records.load(Ordering::Relaxed);
    const LIVE: u64 = 3_000_000;
    let started = Instant::now();
    for _ in 0..LIVE / BATCH {
        run_pinned_on(&generator, ProgramType::Xdp, &packet, REPEAT, None).unwrap();
    }
    let produced_for = started.elapsed().as_secs_f64();
    let live_lost = lost() - lost_before;
    while hub.counters.records.load(Ordering::Relaxed) - read_before < LIVE - live_lost {
        std::thread::sleep(Duration::from_millis(1));
    }
    let drained_for = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    reader_thread.join().unwrap();

    // Ceiling: the same reader code draining a ring filled while it slept.
    let mut reader = reader::Reader::open(&bpffs.root()).unwrap();
    reader.drain(&hub);
    let (mut drained, mut draining) = (0u64, Duration::ZERO);
    for _ in 0..40 {
        for _ in 0..9 {
            run_pinned_on(&generator, ProgramType::Xdp, &packet, REPEAT, None).unwrap(); // 45,000 < 47,662
        }
        let t = Instant::now();
        drained += reader.drain(&hub) as u64;
        draining += t.elapsed();
    }
    assert_eq!(lost(), lost_before + live_lost, "the filled ring never overflowed");
    println!("| measurement | records | records/s | lost |");
    println!("|---|---:|---:|---:|");
    println!(
        "| live: generator at full speed (produced {:.0}/s) | {LIVE} | {:.0} | {live_lost} |",
        LIVE as f64 / produced_for,
        (LIVE - live_lost) as f64 / drained_for
    );
    println!(
        "| ceiling: draining a full ring (40 × 45,000) | {drained} | {:.0} | 0 |",
        drained as f64 / draining.as_secs_f64()
    );
}

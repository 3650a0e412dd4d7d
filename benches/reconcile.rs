//! Reconcile benchmarks: plan time, full apply time and one-change apply
//! for 1k, 10k and 100k map entries.
//!
//!     cargo bench --bench reconcile
//!
//! Planning runs on the pure planner; applying runs on the real kernel
//! (root, a bpffs mounted on a temporary directory). Figures are medians of
//! several runs on this machine; read them as orders of magnitude.

use std::time::{Duration, Instant};

use bpfsync::apply::journal::MemJournal;
use bpfsync::apply::{self, Retry, scope_for};
use bpfsync::compile::{Desired, ObjectLoader, compile};
use bpfsync::kernel::real::RealKernel;
use bpfsync::kernel::{Kernel, LoadRequest};
use bpfsync::model::MapRef;
use bpfsync::plan;
use bpfsync::sandbox::TempBpffs;
use bpfsync::spec;

fn spec_with(n: usize, changed: Option<usize>) -> Desired {
    let text = spec_text(n, changed);
    let path = std::path::Path::new("bench.yaml");
    let loaded = spec::load(path, &text).unwrap_or_else(|d| panic!("{d}"));
    compile(&loaded, &mut ObjectLoader::default()).unwrap_or_else(|d| panic!("{d}"))
}

/// Where compiling a spec of `n` entries spends its time: the YAML parse
/// (with positions), schema validation, deserialising, the whole load
/// (those and the semantic checks), and compiling (entry encoding).
fn compile_phases(n: usize) {
    let text = spec_text(n, None);
    let path = std::path::Path::new("bench.yaml");
    let time = |f: &mut dyn FnMut()| {
        median(
            (0..5)
                .map(|_| {
                    let t = Instant::now();
                    f();
                    t.elapsed()
                })
                .collect(),
        )
    };
    // The YAML library's own event stream, with nothing built from it: the
    // floor under any parse that uses it.
    let tokenize = time(&mut || {
        struct Count(usize);
        impl yaml_rust2::parser::MarkedEventReceiver for Count {
            fn on_event(&mut self, _: yaml_rust2::Event, _: yaml_rust2::scanner::Marker) {
                self.0 += 1;
            }
        }
        let mut events = Count(0);
        yaml_rust2::parser::Parser::new_from_str(&text).load(&mut events, false).unwrap();
        assert!(events.0 > n);
    });
    let parse = time(&mut || drop(spec::yaml::parse(&text).unwrap()));
    let doc = spec::yaml::parse(&text).unwrap();
    let validator = spec::schema_validator();
    let schema = time(&mut || assert!(validator.iter_errors(&doc.value).next().is_none()));
    let deserialise = time(&mut || drop(serde_json::from_value::<spec::NodeSpec>(doc.value.clone()).unwrap()));
    let load = time(&mut || drop(spec::load(path, &text).unwrap()));
    let loaded = spec::load(path, &text).unwrap();
    let encode = time(&mut || drop(compile(&loaded, &mut ObjectLoader::default()).unwrap()));
    println!(
        "
compiling {n} entries: YAML parse {} (of which the YAML library's events alone {}), schema {}, deserialise {} (whole load {}); compile (encoding) {}; total {}",
        ms(parse),
        ms(tokenize),
        ms(schema),
        ms(deserialise),
        ms(load),
        ms(encode),
        ms(load + encode)
    );
}

fn spec_text(n: usize, changed: Option<usize>) -> String {
    let mut text = String::from(
        "apiVersion: bpfsync/v1\nkind: NodeSpec\nprograms:\n  - name: big\n    object: tests/fixtures/bigmap.bpf.o\n    type: xdp\n    maps:\n      - name: table\n        entries:\n",
    );
    for i in 0..n {
        let v = if Some(i) == changed { i + 1 } else { i };
        text.push_str(&format!("          - {{ key: {i}, value: {v} }}\n"));
    }
    text
}

/// The map write alone: 100k entries into a fresh map in one batch call.
fn batch_write_rate() {
    let bytes: std::sync::Arc<[u8]> = std::fs::read("tests/fixtures/bigmap.bpf.o").unwrap().into();
    let entries: Vec<(Vec<u8>, Vec<u8>)> =
        (0u32..100_000).map(|i| (i.to_le_bytes().to_vec(), i.to_le_bytes().to_vec())).collect();
    let table = MapRef { program: "big".into(), map: "table".into() };
    let times: Vec<Duration> = (0..3)
        .map(|_| {
            let bpffs = TempBpffs::create().expect("mount a bpffs");
            let mut k = RealKernel::open(bpffs.root()).unwrap();
            k.load_program(&LoadRequest {
                name: "big".into(),
                digest: "bench".into(),
                function: "xdp_bigmap".into(),
                program_type: bpfsync::spec::ProgramType::Xdp,
                bytes: bytes.clone(),
                map_owner: "big".into(),
                fresh_maps: vec![],
            })
            .unwrap();
            let t = Instant::now();
            k.write_entries(&table, &entries).unwrap();
            t.elapsed()
        })
        .collect();
    let t = median(times);
    println!(
        "\nbatched write alone: 100000 entries in {} = {:.0} entries/s (one BPF_MAP_UPDATE_BATCH call)",
        ms(t),
        100_000.0 / t.as_secs_f64()
    );
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    if std::env::args().any(|a| a == "phases") {
        compile_phases(100_000);
        return;
    }
    let sizes = [1_000usize, 10_000, 100_000];
    println!("bpfsync reconcile benchmarks (medians)\n");
    println!(
        "| entries | compile spec | plan, 1 change | full apply | entries/s | observe | 1-change apply | kernel writes |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    let root_ok = unsafe { libc::geteuid() } == 0;
    for n in sizes {
        let t = Instant::now();
        let desired = spec_with(n, None);
        let compile_time = t.elapsed();
        let changed = spec_with(n, Some(n / 2));

        // Plan: desired with one change against the observed full map.
        let plan_time = median(
            (0..7)
                .map(|_| {
                    let t = Instant::now();
                    let p = plan::plan(&changed.state, &desired.state);
                    let d = t.elapsed();
                    assert_eq!(p.changes.len(), 1);
                    d
                })
                .collect(),
        );

        let (apply_time, rate, observe_time, one_time, writes) = if root_ok {
            let mut full = Vec::new();
            let mut one = Vec::new();
            let mut observes = Vec::new();
            let mut writes = 0;
            for _ in 0..3 {
                let bpffs = TempBpffs::create().expect("mount a bpffs");
                let mut k = RealKernel::open(bpffs.root()).unwrap();
                let observed = k.observe(&scope_for(&desired.state)).unwrap();
                let p = plan::plan(&desired.state, &observed);
                let t = Instant::now();
                apply::apply(&mut k, &p, &desired, &observed, &mut MemJournal::default(), Retry::none()).unwrap();
                full.push(t.elapsed());

                // One change: observe (reads the whole map), plan, then
                // apply (one write) and verify (one read-back).
                let before = k.writes();
                let t = Instant::now();
                let observed = k.observe(&scope_for(&changed.state)).unwrap();
                observes.push(t.elapsed());
                let p = plan::plan(&changed.state, &observed);
                let t = Instant::now();
                let r =
                    apply::apply(&mut k, &p, &changed, &observed, &mut MemJournal::default(), Retry::none()).unwrap();
                one.push(t.elapsed());
                writes = r.kernel_writes;
                assert_eq!(k.writes() - before, writes);
                let table = MapRef { program: "big".into(), map: "table".into() };
                assert_eq!(observed.maps[&table].entries.len(), n);
            }
            let full = median(full);
            let rate = n as f64 / full.as_secs_f64();
            (ms(full), format!("{:.0}", rate), ms(median(observes)), ms(median(one)), writes.to_string())
        } else {
            ("(needs root)".into(), "-".into(), "-".into(), "-".into(), "-".into())
        };
        println!(
            "| {n} | {} | {} | {apply_time} | {rate} | {observe_time} | {one_time} | {writes} |",
            ms(compile_time),
            ms(plan_time)
        );
    }
    compile_phases(100_000);
    if root_ok {
        batch_write_rate();
    }
    println!("\nfull apply includes the program load, the batched map writes and the verifying re-observation;");
    println!("observe reads the program, its link and all entries of the map (batched lookups);");
    println!("1-change apply is apply + verify of one changed entry (after observe and plan).");
}

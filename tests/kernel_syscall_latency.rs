//! The syscall-latency tracepoints on the real kernel: every thread's last
//! system call (`exit`) enters and never returns, so the entry times they
//! leave behind must not fill `syscall_start` and stop the measurement.

mod common;

use common::Env;
use serde_json::Value;

fn spec(tgid: u32) -> String {
    format!(
        r#"apiVersion: bpfsync/v1
kind: NodeSpec
programs:
  - name: syscall_enter
    builtin: syscall_enter
    type: tracepoint
    maps:
      - name: latency_config
        entries: [{{ key: 0, value: {tgid} }}]
  - name: syscall_exit
    builtin: syscall_exit
    type: tracepoint
    share-maps: syscall_enter
tracepoints:
  - {{ event: raw_syscalls/sys_enter, program: syscall_enter }}
  - {{ event: raw_syscalls/sys_exit, program: syscall_exit }}
"#
    )
}

/// The syscalls measured so far, and `syscall_start`'s (entries, capacity).
fn measured(env: &Env) -> (u64, (u64, u64)) {
    let v: Value = serde_json::from_str(&env.run_ok(&["status", "-o", "json"])).unwrap();
    let maps = v["maps"].as_array().unwrap();
    let map = |name: &str| maps.iter().find(|m| m["map"].as_str().is_some_and(|n| n.ends_with(name))).unwrap();
    let hist = map("latency_hist")["histogram_log2_ns"].as_array().unwrap();
    let total = hist.iter().filter_map(|x| x[1].as_u64()).sum();
    let start = map("syscall_start");
    (total, (start["entries"].as_u64().unwrap(), start["max_entries"].as_u64().unwrap()))
}

#[test]
fn threads_that_end_inside_a_syscall_do_not_stop_the_measurement() {
    let env = Env::new();
    let path = env.state.path().join("spec.yaml");
    std::fs::write(&path, spec(std::process::id())).unwrap();
    env.run_ok(&["apply", path.to_str().unwrap(), "--auto-approve"]);
    let (_, (_, capacity)) = measured(&env);
    // More threads than `syscall_start` holds, each leaving its `exit`.
    let threads = capacity as usize + 4000;
    for _ in 0..threads / 500 {
        let batch: Vec<_> = (0..500).map(|_| std::thread::spawn(|| ())).collect();
        for t in batch {
            t.join().unwrap();
        }
    }
    let (before, (entries, _)) = measured(&env);
    assert!(entries <= capacity);
    for _ in 0..2000 {
        // SAFETY: getppid(2) takes no arguments and cannot fail.
        unsafe { libc::getppid() };
    }
    let (after, _) = measured(&env);
    assert!(after - before >= 2000, "still measured after {threads} threads ended: {before} → {after}");
    env.run_ok(&["down", "--auto-approve"]);
}

//! The agent's loop driven in-process on the in-memory kernel and a paused
//! clock (tokio's test clock: time moves only when every task waits): spec
//! edits and their debounce, resyncs repairing drift, backoff after
//! failures, invalid specs, a panic, and shutdown. What only the kernel can
//! show stays in `tests/kernel_agent.rs`.

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bpfsync::agent::driver::{self, Hints, Timing};
use bpfsync::agent::{AgentConfig, FlowOptions, KernelOpener, Outcome, Reconciler, Shared, Trigger};
use bpfsync::applied::Context;
use bpfsync::flows::hub::FlowHub;
use bpfsync::kernel::memory::MemoryKernel;
use bpfsync::kernel::{Kernel, Scope};
use bpfsync::model::MapRef;
use common::TempDir;
use tokio::sync::{mpsc, oneshot};

const RESYNC: Duration = Duration::from_secs(30);
const DEBOUNCE: Duration = Duration::from_millis(200);

fn spec(value: u32) -> String {
    format!(
        "apiVersion: bpfsync/v1\nkind: NodeSpec\nprograms:\n  - name: counter\n    builtin: counter\n    type: xdp\n    maps:\n      - name: counter_config\n        entries: [{{ key: 0, value: {value} }}]\ninterfaces:\n  - name: veth0\n    xdp: {{ program: counter, mode: skb }}\n"
    )
}

fn config_map() -> MapRef {
    MapRef { program: "counter".into(), map: "counter_config".into() }
}

/// An agent on a memory kernel: the loop runs in a task; the test holds
/// the kernel, the hint senders, the trigger log and the shutdown switch.
struct Harness {
    _dir: TempDir,
    spec: PathBuf,
    kernel: Arc<Mutex<MemoryKernel>>,
    shared: Arc<Shared>,
    spec_tx: mpsc::Sender<()>,
    _link_tx: mpsc::Sender<()>,
    _overlay_tx: mpsc::Sender<()>,
    runs: Arc<Mutex<Vec<(Trigger, Outcome)>>>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    /// Fails every kernel open while set (a kernel that cannot be reached).
    unreachable: Arc<Mutex<bool>>,
}

impl Harness {
    fn start(text: &str) -> Harness {
        let dir = TempDir::create("bpfsync-agent-loop").unwrap();
        let spec = dir.path().join("spec.yaml");
        std::fs::write(&spec, text).unwrap();
        let config = AgentConfig {
            spec: spec.clone(),
            ctx: Context {
                bpffs_root: dir.path().join("unused-bpffs"),
                state_dir: dir.path().join("state"),
                color: false,
                max_spec_bytes: 1 << 20,
            },
            resync: RESYNC,
            debounce: DEBOUNCE,
            listen: "127.0.0.1:0".parse().unwrap(),
            flows: FlowOptions::default(),
        };
        let shared = Arc::new(Shared::new(config, Arc::new(FlowHub::new(0, vec![]))));
        let kernel = Arc::new(Mutex::new(MemoryKernel::with_interfaces(&["veth0"])));
        let unreachable = Arc::new(Mutex::new(false));
        let open: KernelOpener<Arc<Mutex<MemoryKernel>>> = {
            let (kernel, unreachable) = (kernel.clone(), unreachable.clone());
            Box::new(move || {
                if *unreachable.lock().unwrap() {
                    Err("unreachable".to_string().into())
                } else {
                    Ok((kernel.clone(), None))
                }
            })
        };
        let reconciler = Arc::new(Mutex::new(Reconciler::new(shared.clone(), open)));
        let runs = Arc::new(Mutex::new(Vec::new()));
        let (spec_tx, spec_rx) = mpsc::channel(1);
        let (link_tx, link_rx) = mpsc::channel(1);
        let (overlay_tx, overlay_rx) = mpsc::channel(1);
        let (stop, stopped) = oneshot::channel::<()>();
        let log = runs.clone();
        let reconcile = move |trigger: Trigger| {
            let outcome = bpfsync::agent::reconcile_catching_panics(&reconciler, trigger);
            log.lock().unwrap().push((trigger, outcome.clone()));
            async move { outcome }
        };
        let task = tokio::spawn(driver::drive(
            reconcile,
            Hints { spec: spec_rx, interfaces: link_rx, overlay: overlay_rx },
            Timing { resync: RESYNC, debounce: DEBOUNCE },
            async move {
                let _ = stopped.await;
            },
        ));
        Harness {
            _dir: dir,
            spec,
            kernel,
            shared,
            spec_tx,
            _link_tx: link_tx,
            _overlay_tx: overlay_tx,
            runs,
            stop: Some(stop),
            task,
            unreachable,
        }
    }

    /// The value of `counter_config[0]` in the memory kernel.
    fn config_value(&self) -> Option<u32> {
        let mut k = self.kernel.lock().unwrap();
        let s = k.observe(&Scope { maps: [config_map()].into(), ..Default::default() }).ok()?;
        let v = s.maps.get(&config_map())?.entries.get(&[0, 0, 0, 0])?.to_vec();
        Some(u32::from_le_bytes(v[..4].try_into().unwrap()))
    }

    fn runs(&self) -> Vec<(Trigger, Outcome)> {
        self.runs.lock().unwrap().clone()
    }

    async fn edit(&self, text: &str) {
        std::fs::write(&self.spec, text).unwrap();
        let _ = self.spec_tx.try_send(());
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(1), self.task).await.expect("the loop stops").unwrap();
    }
}

async fn wait(d: Duration) {
    tokio::time::sleep(d).await;
}

#[tokio::test(start_paused = true)]
async fn the_spec_is_applied_at_start_and_edits_are_debounced_into_one_reconcile() {
    let h = Harness::start(&spec(1));
    wait(Duration::from_millis(10)).await;
    assert_eq!(h.config_value(), Some(1));
    assert_eq!(h.runs(), vec![(Trigger::Start, Outcome::Applied)]);
    // A burst of hints (an editor's save makes several) within the debounce.
    for v in [2, 3, 4] {
        h.edit(&spec(v)).await;
        wait(DEBOUNCE / 4).await;
    }
    assert_eq!(h.config_value(), Some(1), "nothing before the directory is quiet");
    wait(DEBOUNCE * 2).await;
    assert_eq!(h.config_value(), Some(4));
    let runs = h.runs();
    assert_eq!(runs.iter().filter(|(t, _)| *t == Trigger::SpecChanged).count(), 1, "{runs:?}");
    // A hint without a change (a touch) changes nothing.
    let _ = h.spec_tx.try_send(());
    wait(DEBOUNCE * 2).await;
    assert_eq!(h.runs().last(), Some(&(Trigger::SpecChanged, Outcome::Skipped)));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn drift_is_repaired_at_the_next_resync_and_counted() {
    let h = Harness::start(&spec(1));
    wait(Duration::from_millis(10)).await;
    h.kernel.lock().unwrap().write_entries(&config_map(), &[(vec![0; 4], vec![9, 0, 0, 0])]).unwrap();
    assert_eq!(h.config_value(), Some(9));
    wait(RESYNC - Duration::from_secs(1)).await;
    assert_eq!(h.config_value(), Some(9), "not before the resync");
    wait(Duration::from_secs(2)).await;
    assert_eq!(h.config_value(), Some(1), "repaired at the resync");
    assert_eq!(h.runs().last(), Some(&(Trigger::Resync, Outcome::Applied)));
    let text = h.shared.metrics.encode();
    assert!(text.contains("bpfsync_drift_repairs_total{kind=\"map-entry-update\"} 1"), "{text}");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn failures_back_off_exponentially_and_resyncs_wait_for_the_retry() {
    let h = Harness::start(&spec(1));
    wait(Duration::from_millis(10)).await;
    // Every map write fails from now on (the kernel refuses, for a while).
    h.kernel.lock().unwrap().fail_op = Some("write_entries".into());
    h.edit(&spec(2)).await;
    // Retries at 100, 200, 400, 800 ms, … doubling to a minute; over 5
    // minutes with a 30 s resync that is about a dozen tries, not hundreds.
    wait(Duration::from_secs(300)).await;
    let runs = h.runs();
    let failures = runs.iter().filter(|(_, o)| *o == Outcome::Retry).count();
    assert!((8..=16).contains(&failures), "{failures} tries: {runs:?}");
    assert!(!runs.iter().any(|(t, _)| *t == Trigger::Resync), "resyncs wait for the retry: {runs:?}");
    assert_eq!(h.config_value(), Some(1));
    // The kernel takes writes again: the next retry applies.
    h.kernel.lock().unwrap().fail_op = None;
    wait(Duration::from_secs(61)).await;
    assert_eq!(h.config_value(), Some(2));
    assert!(h.shared.state().ready);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_kernel_that_cannot_be_opened_is_retried_with_backoff() {
    let h = Harness::start(&spec(1));
    *h.unreachable.lock().unwrap() = true;
    wait(Duration::from_secs(10)).await;
    let tries = h.runs().len();
    assert!((5..=10).contains(&tries), "{tries} tries in 10 s: {:?}", h.runs());
    *h.unreachable.lock().unwrap() = false;
    wait(Duration::from_secs(11)).await;
    assert_eq!(h.config_value(), Some(1));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_invalid_spec_keeps_the_last_good_state_running_and_says_why() {
    let h = Harness::start(&spec(1));
    wait(Duration::from_millis(10)).await;
    h.edit("apiVersion: bpfsync/v1\nkind: NodeSpec\nprograms: [oops\n").await;
    wait(DEBOUNCE * 2).await;
    assert_eq!(h.config_value(), Some(1));
    let err = h.shared.state().spec_error.clone().unwrap_or_default();
    assert!(err.contains("invalid") && err.contains("spec.yaml:4:1"), "{err}");
    // Drift is still repaired against the last good spec.
    h.kernel.lock().unwrap().write_entries(&config_map(), &[(vec![0; 4], vec![7, 0, 0, 0])]).unwrap();
    wait(RESYNC + Duration::from_secs(1)).await;
    assert_eq!(h.config_value(), Some(1));
    // A fixed spec is followed again.
    h.edit(&spec(5)).await;
    wait(DEBOUNCE * 2).await;
    assert_eq!(h.config_value(), Some(5));
    assert!(h.shared.state().spec_error.is_none());
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_spec_that_is_never_valid_touches_nothing_and_is_not_ready() {
    let h = Harness::start("apiVersion: bpfsync/v1\nkind: NodeSpec\nprograms: 3\n");
    wait(Duration::from_secs(5)).await;
    assert!(h.runs().iter().all(|(_, o)| *o == Outcome::NotReady), "{:?}", h.runs());
    assert!(!h.shared.state().ready);
    assert_eq!(h.kernel.lock().unwrap().writes(), 0, "nothing was written");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_stops_the_loop_and_leaves_the_datapath() {
    let h = Harness::start(&spec(3));
    wait(Duration::from_millis(10)).await;
    let kernel = h.kernel.clone();
    h.stop().await;
    let mut k = kernel.lock().unwrap();
    assert_eq!(k.observe(&Scope::default()).unwrap().attachments.len(), 1, "still attached");
}

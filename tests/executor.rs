//! The executor against the in-memory kernel: idempotence, minimality,
//! rollback after a failure at every step, crash recovery from the journal,
//! verification. (Each behaviour the model stands in for also has a
//! real-kernel test in `tests/kernel_apply.rs`.)

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};

use bpfsync::apply::journal::{JournalStore, MemJournal};
use bpfsync::apply::{self, ApplyError, Retry, scope_for};
use bpfsync::compile::Desired;
use bpfsync::kernel::memory::MemoryKernel;
use bpfsync::kernel::{Kernel, KernelError, LoadRequest, Scope};
use bpfsync::model::{ForeignProgram, Hook, MapRef, State};
use bpfsync::plan;
use bpfsync::spec::XdpMode;

const HEAD: &str = "apiVersion: bpfsync/v1\nkind: NodeSpec\n";

fn desired(body: &str) -> Desired {
    common::compile_text("tests/inline.yaml", &format!("{HEAD}{body}"))
}

const SPEC_A: &str = r#"
programs:
  - name: counter
    builtin: counter
    type: xdp
    maps:
      - name: counter_config
        entries: [{ key: 0, value: 1 }, { key: 1, value: 1 }]
  - name: classify
    builtin: classifier
    type: tc
    maps:
      - name: class_ports
        entries:
          - { key: { protocol: 6, port: 80 }, value: { mark: 1 } }
          - { key: { protocol: 6, port: 443 }, value: { mark: 2 } }
  - name: syscall_enter
    builtin: syscall_enter
    type: tracepoint
interfaces:
  - name: veth0
    xdp: { program: counter, mode: skb }
    tc: { ingress: [classify] }
tracepoints:
  - { event: raw_syscalls/sys_enter, program: syscall_enter }
"#;

/// Differs from A in every way a plan can: replaced bytecode, entries
/// added/changed/removed, a mode change, a new hook, a removed hook and
/// program, a takeover.
const SPEC_B: &str = r#"
programs:
  - name: counter
    object: ../tests/fixtures/counter_v2.bpf.o
    function: xdp_counter
    type: xdp
    maps:
      - name: counter_config
        entries: [{ key: 0, value: 7 }]
  - name: classify
    builtin: classifier
    type: tc
    maps:
      - name: class_ports
        entries:
          - { key: { protocol: 6, port: 80 }, value: { mark: 9 } }
          - { key: { protocol: 17, port: 53 }, value: { mark: 3 } }
interfaces:
  - name: veth0
    xdp: { program: counter, mode: driver }
    tc: { ingress: [classify], egress: [classify] }
  - name: veth1
    xdp: { program: counter, mode: skb, takeover: true }
"#;

fn kernel() -> MemoryKernel {
    let mut k = MemoryKernel::with_interfaces(&["veth0", "veth1"]);
    k.events = vec!["raw_syscalls/sys_enter".into()];
    k.foreign.push(ForeignProgram {
        hook: Hook::Xdp { interface: "veth1".into() },
        program_id: 7,
        program_name: "xdp_pass".into(),
        detail: "skb mode, netlink".into(),
        mode: Some(XdpMode::Skb),
        link_id: None,
    });
    k
}

fn converge(k: &mut dyn Kernel, d: &Desired) -> apply::ApplyReport {
    let observed = k.observe(&scope_for(&d.state)).unwrap();
    let p = plan::plan(&d.state, &observed);
    apply::apply(k, &p, d, &observed, &mut MemJournal::default(), Retry::none()).unwrap()
}

/// A snapshot without link ids (a rolled-back detach re-creates its link).
fn normal(k: &mut MemoryKernel) -> State {
    let mut s = k.snapshot();
    for a in s.attachments.values_mut() {
        a.link_id = None;
    }
    s
}

#[test]
fn applying_the_same_spec_twice_writes_nothing_the_second_time() {
    let mut k = kernel();
    let a = desired(SPEC_A);
    let first = converge(&mut k, &a);
    assert!(first.kernel_writes > 0);
    let before = k.snapshot();
    let writes = k.writes();
    let observed = k.observe(&scope_for(&a.state)).unwrap();
    assert!(plan::plan(&a.state, &observed).is_empty());
    let second = converge(&mut k, &a);
    assert_eq!(second.kernel_writes, 0);
    assert_eq!(k.writes(), writes);
    assert_eq!(k.snapshot(), before, "program and link ids are unchanged");
}

/// Fails every kernel call of the apply `base` → `target` in turn: each
/// failure must roll the node back to where it started.
fn sweep_failures(base: &MemoryKernel, target: &Desired) {
    let mut base = base.clone();
    let start = normal(&mut base);
    let mut failed_at = 0;
    loop {
        let mut k = base.clone();
        k.fail_call = Some(k.calls() + failed_at);
        let observed = k.observe(&scope_for(&target.state)).unwrap();
        let p = plan::plan(&target.state, &observed);
        match apply::apply(&mut k, &p, target, &observed, &mut MemJournal::default(), Retry::none()) {
            Err(ApplyError::RolledBack { .. }) => {
                assert_eq!(normal(&mut k), start, "failure at call {failed_at} did not roll back cleanly");
            }
            Err(e) => panic!("failure at call {failed_at}: unexpected {e}"),
            Ok(_) => break,
        }
        failed_at += 1;
    }
    assert!(failed_at >= 3, "the sweep should cover every step, covered {failed_at}");
}

#[test]
fn every_failing_step_rolls_the_node_back_to_where_it_started() {
    let empty = kernel();
    let mut at_a = kernel();
    converge(&mut at_a, &desired(SPEC_A));
    // From empty (array entries written fresh are undone by zeroing them),
    // a change of everything, and a teardown.
    sweep_failures(&empty, &desired(SPEC_A));
    sweep_failures(&at_a, &desired(SPEC_B));
    sweep_failures(&at_a, &Desired::default());
}

#[test]
fn a_retryable_failure_is_retried() {
    let mut k = kernel();
    let a = desired(SPEC_A);
    k.fail_call = Some(3);
    let observed = k.observe(&scope_for(&a.state)).unwrap();
    let p = plan::plan(&a.state, &observed);
    let retry = Retry { attempts: 3, first_delay: std::time::Duration::from_millis(1), ..Default::default() };
    apply::apply(&mut k, &p, &a, &observed, &mut MemJournal::default(), retry).expect("the retry succeeds");
}

#[test]
fn a_failed_rollback_is_reported_beside_the_original_error() {
    let mut k = kernel();
    let a = desired(SPEC_A);
    // Loading works, the first attach fails, and so does undoing loads.
    k.fail_op = Some("attach".into());
    let observed = k.observe(&scope_for(&a.state)).unwrap();
    let p = plan::plan(&a.state, &observed);
    let err = {
        let mut j = MemJournal::default();
        // Wrap: discards fail too.
        let mut w = FailDiscard(&mut k);
        apply::apply(&mut w, &p, &a, &observed, &mut j, Retry::none()).unwrap_err()
    };
    match &err {
        ApplyError::RollbackFailed { cause, rollback, .. } => {
            assert!(cause.to_string().contains("attach"), "{cause}");
            assert!(rollback.iter().any(|r| apply::error_chain(r).contains("discard")), "{rollback:?}");
        }
        other => panic!("expected RollbackFailed, got {other}"),
    }
    let text = err.to_string();
    assert!(text.contains("injected failure in `attach`") && text.contains("discard"), "{text}");
}

/// A kernel whose `discard_program` always fails.
struct FailDiscard<'a>(&'a mut MemoryKernel);

impl Kernel for FailDiscard<'_> {
    fn observe(&mut self, s: &Scope) -> Result<State, KernelError> {
        self.0.observe(s)
    }
    fn load_program(&mut self, r: &LoadRequest) -> Result<(), KernelError> {
        self.0.load_program(r)
    }
    fn unload_program(&mut self, n: &str, d: &str) -> Result<(), KernelError> {
        self.0.unload_program(n, d)
    }
    fn restore_program(&mut self, n: &str, d: &str) -> Result<(), KernelError> {
        self.0.restore_program(n, d)
    }
    fn discard_program(&mut self, _: &str, _: &str) -> Result<(), KernelError> {
        Err(KernelError::Injected { op: "discard_program".into() })
    }
    fn write_entries(&mut self, m: &MapRef, e: &[(Vec<u8>, Vec<u8>)]) -> Result<(), KernelError> {
        self.0.write_entries(m, e)
    }
    fn delete_entries(&mut self, m: &MapRef, k: &[Vec<u8>]) -> Result<(), KernelError> {
        self.0.delete_entries(m, k)
    }
    fn attach(&mut self, h: &Hook, p: &str, d: &str, m: Option<XdpMode>) -> Result<(), KernelError> {
        self.0.attach(h, p, d, m)
    }
    fn update_link(&mut self, h: &Hook, p: &str, d: &str) -> Result<(), KernelError> {
        self.0.update_link(h, p, d)
    }
    fn detach(&mut self, h: &Hook) -> Result<(), KernelError> {
        self.0.detach(h)
    }
    fn evict(&mut self, f: &ForeignProgram) -> Result<(), KernelError> {
        self.0.evict(f)
    }
    fn unevict(&mut self, f: &ForeignProgram) -> Result<(), KernelError> {
        self.0.unevict(f)
    }
    fn pin_map(&mut self, m: &MapRef, id: u32) -> Result<(), KernelError> {
        self.0.pin_map(m, id)
    }
    fn unpin_map(&mut self, m: &MapRef) -> Result<(), KernelError> {
        self.0.unpin_map(m)
    }
    fn commit(&mut self) -> Result<(), KernelError> {
        self.0.commit()
    }
    fn lookup_entries(&mut self, m: &MapRef, k: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, KernelError> {
        self.0.lookup_entries(m, k)
    }
    fn writes(&self) -> u64 {
        self.0.writes()
    }
}

/// A kernel that "dies" (panics, like a `kill -9`) at a given call, and
/// one that silently ignores the next one-entry write (for verification).
struct Crashing {
    inner: MemoryKernel,
    crash_at: u64,
    drop_writes: bool,
    /// Non-zero: a batch write quietly loses every Nth entry.
    lose_every: usize,
    /// The maps each observation read entries of.
    scopes: Vec<std::collections::BTreeSet<MapRef>>,
}

impl Crashing {
    fn tick(&mut self) {
        if self.inner.calls() >= self.crash_at {
            panic!("simulated crash");
        }
    }
}

impl Kernel for Crashing {
    fn observe(&mut self, s: &Scope) -> Result<State, KernelError> {
        self.scopes.push(s.maps.clone());
        self.inner.observe(s)
    }
    fn load_program(&mut self, r: &LoadRequest) -> Result<(), KernelError> {
        self.tick();
        self.inner.load_program(r)
    }
    fn unload_program(&mut self, n: &str, d: &str) -> Result<(), KernelError> {
        self.tick();
        self.inner.unload_program(n, d)
    }
    fn restore_program(&mut self, n: &str, d: &str) -> Result<(), KernelError> {
        self.inner.restore_program(n, d)
    }
    fn discard_program(&mut self, n: &str, d: &str) -> Result<(), KernelError> {
        self.inner.discard_program(n, d)
    }
    fn write_entries(&mut self, m: &MapRef, e: &[(Vec<u8>, Vec<u8>)]) -> Result<(), KernelError> {
        self.tick();
        if self.drop_writes && e.len() == 1 {
            self.drop_writes = false;
            return Ok(()); // claims success, writes nothing (once)
        }
        if self.lose_every > 0 && e.len() > 1 {
            let kept: Vec<_> =
                e.iter().enumerate().filter(|(i, _)| i % self.lose_every != 0).map(|(_, x)| x.clone()).collect();
            return self.inner.write_entries(m, &kept);
        }
        self.inner.write_entries(m, e)
    }
    fn delete_entries(&mut self, m: &MapRef, k: &[Vec<u8>]) -> Result<(), KernelError> {
        self.tick();
        self.inner.delete_entries(m, k)
    }
    fn attach(&mut self, h: &Hook, p: &str, d: &str, m: Option<XdpMode>) -> Result<(), KernelError> {
        self.tick();
        self.inner.attach(h, p, d, m)
    }
    fn update_link(&mut self, h: &Hook, p: &str, d: &str) -> Result<(), KernelError> {
        self.tick();
        self.inner.update_link(h, p, d)
    }
    fn detach(&mut self, h: &Hook) -> Result<(), KernelError> {
        self.tick();
        self.inner.detach(h)
    }
    fn evict(&mut self, f: &ForeignProgram) -> Result<(), KernelError> {
        self.tick();
        self.inner.evict(f)
    }
    fn unevict(&mut self, f: &ForeignProgram) -> Result<(), KernelError> {
        self.inner.unevict(f)
    }
    fn pin_map(&mut self, m: &MapRef, id: u32) -> Result<(), KernelError> {
        self.tick();
        self.inner.pin_map(m, id)
    }
    fn unpin_map(&mut self, m: &MapRef) -> Result<(), KernelError> {
        self.inner.unpin_map(m)
    }
    fn commit(&mut self) -> Result<(), KernelError> {
        self.tick();
        self.inner.commit()
    }
    fn lookup_entries(&mut self, m: &MapRef, k: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, KernelError> {
        self.inner.lookup_entries(m, k)
    }
    fn writes(&self) -> u64 {
        self.inner.writes()
    }
}

/// Crashes the apply `base` → `target` after every kernel call in turn: the
/// next run rolls it back from the journal, then converges.
fn sweep_crashes(base: &MemoryKernel, target: &Desired) {
    let mut base = base.clone();
    let start = normal(&mut base);
    for crash_after in 1..60 {
        let mut c = Crashing {
            inner: base.clone(),
            crash_at: base.calls() + crash_after,
            drop_writes: false,
            lose_every: 0,
            scopes: vec![],
        };
        let observed = c.observe(&scope_for(&target.state)).unwrap();
        let p = plan::plan(&target.state, &observed);
        let mut journal = MemJournal::default();
        let outcome =
            catch_unwind(AssertUnwindSafe(|| apply::apply(&mut c, &p, target, &observed, &mut journal, Retry::none())));
        if let Ok(result) = outcome {
            result.expect("without a crash the apply succeeds");
            assert!(crash_after > 2, "the crash sweep ended too early");
            return;
        }
        // The next run finds the journal and rolls back…
        let mut k = c.inner;
        let undone = apply::recover(&mut k, &mut journal, Retry::none())
            .unwrap_or_else(|e| panic!("crash after {crash_after} calls: {e}"));
        if undone == 0 {
            // Killed once the journal was gone (while removing set-aside
            // objects): the apply is complete.
            let observed = k.observe(&scope_for(&target.state)).unwrap();
            assert!(plan::plan(&target.state, &observed).is_empty(), "crash after {crash_after} calls");
            return;
        }
        assert_eq!(normal(&mut k), start, "crash after {crash_after} calls was not rolled back");
        // …then converges.
        converge(&mut k, target);
        let observed = k.observe(&scope_for(&target.state)).unwrap();
        assert!(plan::plan(&target.state, &observed).is_empty());
    }
    panic!("the apply never completed within the sweep");
}

#[test]
fn a_crash_at_any_step_is_rolled_back_from_the_journal_and_then_converges() {
    let empty = kernel();
    let mut at_a = kernel();
    converge(&mut at_a, &desired(SPEC_A));
    sweep_crashes(&empty, &desired(SPEC_A));
    sweep_crashes(&at_a, &desired(SPEC_B));
    sweep_crashes(&at_a, &Desired::default());
}

#[test]
fn a_kernel_that_does_not_take_a_write_fails_verification_and_rolls_back() {
    let mut base = kernel();
    let a = desired(SPEC_A);
    converge(&mut base, &a);
    let start = normal(&mut base);
    let changed = desired(&SPEC_A.replace("{ key: 1, value: 1 }", "{ key: 1, value: 2 }"));
    let mut c = Crashing { inner: base, crash_at: u64::MAX, drop_writes: true, lose_every: 0, scopes: vec![] };
    let observed = c.observe(&scope_for(&changed.state)).unwrap();
    let p = plan::plan(&changed.state, &observed);
    assert_eq!(p.changes.len(), 1);
    let err = apply::apply(&mut c, &p, &changed, &observed, &mut MemJournal::default(), Retry::none()).unwrap_err();
    assert!(matches!(err, ApplyError::Verify { count: 1, .. }), "{err}");
    assert_eq!(normal(&mut c.inner), start);
}

#[test]
fn a_failed_verification_whose_rollback_fails_reports_both_and_keeps_the_journal() {
    let mut base = kernel();
    let a = desired(SPEC_A);
    converge(&mut base, &a);
    let changed = desired(&SPEC_A.replace("{ key: 1, value: 1 }", "{ key: 1, value: 2 }"));
    // The one-entry write is dropped, so verification fails; then every
    // write fails, so the rollback's write of the old value does too.
    let mut c = Crashing { inner: base, crash_at: u64::MAX, drop_writes: true, lose_every: 0, scopes: vec![] };
    let observed = c.observe(&scope_for(&changed.state)).unwrap();
    let p = plan::plan(&changed.state, &observed);
    c.inner.fail_op = Some("write_entries".into());
    let mut journal = MemJournal::default();
    let err = apply::apply(&mut c, &p, &changed, &observed, &mut journal, Retry::none()).unwrap_err();
    match &err {
        ApplyError::VerifyRollbackFailed { count: 1, rollback, .. } => {
            assert!(rollback.iter().any(|r| apply::error_chain(r).contains("write_entries")), "{rollback:?}");
        }
        other => panic!("expected VerifyRollbackFailed, got {other}"),
    }
    let text = err.to_string();
    assert!(text.contains("verification") && text.contains("rolling back failed too"), "{text}");
    assert!(!text.contains("was rolled back"), "it does not claim a rollback that did not happen: {text}");
    assert!(journal.pending().unwrap().is_some(), "the journal is kept for `bpfsync recover`");
}

#[test]
fn one_changed_entry_of_ten_thousand_is_one_step_and_one_write() {
    let entries: String = (0..10_000).map(|i| format!("          - {{ key: {i}, value: {i} }}\n")).collect();
    let spec = |entries: &str| {
        format!(
            "programs:\n  - name: big\n    object: ../tests/fixtures/bigmap.bpf.o\n    type: xdp\n    maps:\n      - name: table\n        entries:\n{entries}"
        )
    };
    let a = desired(&spec(&entries));
    let mut k = MemoryKernel::new();
    converge(&mut k, &a);
    let b = desired(&spec(&entries.replace("{ key: 5000, value: 5000 }", "{ key: 5000, value: 1 }")));
    let observed = k.observe(&scope_for(&b.state)).unwrap();
    let p = plan::plan(&b.state, &observed);
    assert_eq!(p.changes.len(), 1);
    let report = converge(&mut k, &b);
    assert_eq!((report.steps, report.kernel_writes), (1, 1));
}

fn class_ports(ports: std::ops::Range<u32>) -> Desired {
    let entries: String =
        ports.map(|p| format!("          - {{ key: {{ protocol: 6, port: {p} }}, value: {{ mark: 1 }} }}\n")).collect();
    desired(&format!(
        "programs:\n  - name: classify\n    builtin: classifier\n    type: tc\n    maps:\n      - name: class_ports\n        entries:\n{entries}"
    ))
}

#[test]
fn a_map_that_would_overflow_mid_apply_fails_the_plan_before_touching_the_kernel() {
    let mut k = MemoryKernel::new();
    converge(&mut k, &class_ports(1..3001));
    // 3000 entries fit `class_ports` (4096), but adding 3000 new keys before
    // removing the old ones would need 6000.
    let d = class_ports(10001..13001);
    let observed = k.observe(&scope_for(&d.state)).unwrap();
    let p = plan::plan(&d.state, &observed);
    assert_eq!(p.errors.len(), 1, "{:?}", p.errors);
    let e = &p.errors[0];
    assert!(e.contains("`classify/class_ports`") && e.contains("6000 entries") && e.contains("3000 now"), "{e}");
    assert!(e.contains("at most 4096"), "{e}");
    assert!(plan::text::render(&p, Default::default()).contains("Errors (the plan cannot be applied):"));
    let writes = k.writes();
    let r = apply::apply(&mut k, &p, &d, &observed, &mut MemJournal::default(), Retry::none());
    assert!(matches!(r, Err(ApplyError::Refused { .. })), "{r:?}");
    assert_eq!(k.writes(), writes, "nothing was written");
    // A change that fits passes.
    let fits = class_ports(1001..4001);
    let observed = k.observe(&scope_for(&fits.state)).unwrap();
    assert!(plan::plan(&fits.state, &observed).errors.is_empty());
}

/// A map the apply made itself (its program loaded, the map new) holds
/// only what the apply wrote, with every write confirmed: it is verified by
/// reading back a sample of the written keys, not by reading it whole — and
/// a kernel that quietly loses part of a big batch is still caught.
#[test]
fn a_map_made_by_the_apply_is_verified_by_a_sample_that_catches_lost_writes() {
    let entries: String = (0..5_000).map(|i| format!("          - {{ key: {i}, value: {i} }}\n")).collect();
    let big = desired(&format!(
        "programs:\n  - name: big\n    object: ../tests/fixtures/bigmap.bpf.o\n    type: xdp\n    maps:\n      - name: table\n        entries:\n{entries}"
    ));
    let table = MapRef { program: "big".into(), map: "table".into() };
    let run = |lose_every: usize| {
        let mut c = Crashing { inner: kernel(), crash_at: u64::MAX, drop_writes: false, lose_every, scopes: vec![] };
        let observed = c.observe(&scope_for(&big.state)).unwrap();
        let p = plan::plan(&big.state, &observed);
        let result = apply::apply(&mut c, &p, &big, &observed, &mut MemJournal::default(), Retry::none());
        (result, c)
    };
    let (result, mut honest) = run(0);
    result.unwrap();
    assert!(!honest.scopes.last().unwrap().contains(&table), "the verification did not read the map whole");
    assert_eq!(honest.inner.snapshot().maps[&table].entries.len(), 5_000);

    let (result, mut lying) = run(7);
    let err = result.unwrap_err();
    assert!(matches!(err, ApplyError::Verify { .. }), "{err}");
    assert!(lying.inner.snapshot().programs.is_empty(), "rolled back: {:?}", lying.inner.snapshot().programs);
}

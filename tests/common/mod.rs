//! Shared helpers for integration tests: the built binary, isolated bpffs
//! roots and state directories, and sandboxes (all removed on drop).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

#[allow(unused_imports)]
pub use bpfsync::sandbox::{Sandbox, TempBpffs, TempDir};

/// An isolated bpfsync installation: its own bpffs and state directory.
pub struct Env {
    pub bpffs: TempBpffs,
    pub state: TempDir,
}

impl Env {
    pub fn new() -> Env {
        Env {
            bpffs: TempBpffs::create().expect("mount a test bpffs"),
            state: TempDir::create("bpfsync-state").unwrap(),
        }
    }

    /// Runs the `bpfsync` binary with this environment's root and state.
    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_bpfsync"))
            .arg("--bpffs-root")
            .arg(self.bpffs.root())
            .arg("--state-dir")
            .arg(self.state.path())
            .arg("--no-color")
            .args(args)
            .output()
            .expect("run bpfsync")
    }

    pub fn run_ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "bpfsync {args:?} failed: {}\n{}", stderr(&out), stdout(&out));
        stdout(&out)
    }

    pub fn kernel(&self) -> bpfsync::kernel::real::RealKernel {
        bpfsync::kernel::real::RealKernel::open(self.bpffs.root()).unwrap()
    }

    /// Every file under the bpffs mount, relative, sorted; without the
    /// `maps.debug`/`progs.debug` iterators the kernel's bpf_preload puts in
    /// every new bpffs.
    pub fn pins(&self) -> Vec<String> {
        let mut out = Vec::new();
        walk(&self.bpffs.mount, &self.bpffs.mount, &mut out);
        out.retain(|p| p != "maps.debug" && p != "progs.debug");
        out.sort();
        out
    }
}

fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        out.push(p.strip_prefix(base).unwrap().display().to_string());
        if p.is_dir() {
            walk(base, &p, out);
        }
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Writes `text` as a spec file in `dir` and returns its path.
pub fn write_spec(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

/// The repository root (tests run there).
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Validates and compiles spec text as if it were the file `path` (relative
/// object paths resolve against its directory).
pub fn compile_text(path: &str, text: &str) -> bpfsync::compile::Desired {
    let loaded = bpfsync::spec::load(Path::new(path), text).unwrap_or_else(|d| panic!("{d}"));
    bpfsync::compile::compile(&loaded, &mut bpfsync::compile::ObjectLoader::default()).unwrap_or_else(|d| panic!("{d}"))
}

/// Loads the built-in classifier and attaches it to `iface`'s TCX ingress
/// as someone else would (a link pinned at `pin`, outside bpfsync's root).
pub fn attach_foreign_tcx(iface: &str, pin: &Path) {
    use aya::programs::links::{FdLink, LinkOrder};
    use aya::programs::tc::{SchedClassifier, TcAttachOptions, TcAttachType};
    let mut ebpf = aya::Ebpf::load(&std::fs::read(repo().join("bpf/classifier.bpf.o")).unwrap()).unwrap();
    let prog: &mut SchedClassifier = ebpf.program_mut("tc_classify").unwrap().try_into().unwrap();
    prog.load().unwrap();
    let id = prog
        .attach_with_options(iface, TcAttachType::Ingress, TcAttachOptions::TcxOrder(LinkOrder::default()))
        .unwrap();
    let link: FdLink = prog.take_link(id).unwrap().try_into().unwrap();
    link.pin(pin).unwrap();
}

/// A `bpfsync agent` child process on a free loopback port, killed on drop.
pub struct Agent {
    pub child: Child,
    pub port: u16,
}

impl Agent {
    pub fn start(env: &Env, spec: &Path, resync: &str) -> Agent {
        Agent::start_with(env, spec, resync, &[])
    }

    /// Starts an agent with more arguments and waits until it is ready.
    pub fn start_with(env: &Env, spec: &Path, resync: &str, extra: &[&str]) -> Agent {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(env!("CARGO_BIN_EXE_bpfsync"))
            .args([
                "--bpffs-root",
                env.bpffs.root().to_str().unwrap(),
                "--state-dir",
                env.state.path().to_str().unwrap(),
            ])
            .args(["agent", "--spec", spec.to_str().unwrap(), "--resync", resync, "--debounce", "50ms"])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(extra)
            .env("BPFSYNC_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let a = Agent { child, port };
        wait("the agent to be ready", Duration::from_secs(20), || a.get("/readyz").0 == 200);
        a
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        self.request(&format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n"))
    }

    /// Sends `raw` as the whole request; the status code and body.
    pub fn request(&self, raw: &str) -> (u16, String) {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else { return (0, String::new()) };
        let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
        let _ = s.write_all(raw.as_bytes());
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        (code, body)
    }

    pub fn status(&self) -> Value {
        serde_json::from_str(&self.get("/status").1).unwrap_or(Value::Null)
    }

    pub fn metric(&self, line_prefix: &str) -> Option<f64> {
        self.get("/metrics")
            .1
            .lines()
            .find(|l| l.starts_with(line_prefix))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    pub fn stop(mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "the agent exits cleanly on SIGTERM: {status}");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for `cond`, failing the test after `timeout`.
pub fn wait(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The spec of A — R — B (see `Sandbox::route_through_host`): the mesh
/// datapath on both of R's ends, routes to A and B through them, and a
/// policy `edge` on A's end whose ingress rules each allow A's address
/// and what `allow` adds (`ports: [...]` or `protocol: ...`).
pub fn edge_spec(a: &Sandbox, b: &Sandbox, allow: &[&str]) -> String {
    let (ai, bi, ap, bp) = (&a.host_if, &b.host_if, a.peer_ip, b.peer_ip);
    let mut spec = format!(
        "apiVersion: bpfsync/v1\nkind: NodeSpec\ninterfaces:\n  - {{ name: {ai}, mesh: {{ mode: skb }} }}\n  - {{ name: {bi}, mesh: {{ mode: skb }} }}\nroutes:\n  - prefix: {bp}/32\n    via: {{ interface: {bi}, neighbor: {bp} }}\n  - prefix: {ap}/32\n    via: {{ interface: {ai}, neighbor: {ap} }}\npolicies:\n  - name: edge\n    interfaces: [{ai}]\n    ingress:\n"
    );
    for rule in allow {
        spec.push_str(&format!("      - from: [{ap}/32]\n        {rule}\n"));
    }
    spec
}

/// xorshift64*: small, seeded, reproducible (the seed is printed on
/// failure by the tests that use it).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// Decodes JSON lines as Hubble's `GetFlowsResponse` with protobuf's own
/// parser (`tests/fixtures/hubble_decode.py`, unknown fields refused): the
/// decoded messages, or what the decoder said about the first bad line.
pub fn hubble_decode(text: &str) -> Result<Vec<Value>, String> {
    let mut child = Command::new("python3")
        .arg(repo().join("tests/fixtures/hubble_decode.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 with grpcio-tools (pip install grpcio-tools)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect())
}

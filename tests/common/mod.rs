//! Shared helpers for integration tests: the built binary, isolated bpffs
//! roots and state directories, and sandboxes (all removed on drop).

#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

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

//! A read that fails for lack of resources is not an object that is
//! absent: with every file descriptor taken, observing the kernel fails
//! instead of reporting programs, links and interfaces as gone (which would
//! plan to load and attach everything again). One test in its own process:
//! it exhausts the process's descriptors.

mod common;

use bpfsync::apply::scope_for;
use bpfsync::kernel::Kernel;
use common::{Env, Sandbox, write_spec};

#[test]
fn observing_without_free_descriptors_fails_instead_of_seeing_nothing() {
    let env = Env::new();
    let sb = Sandbox::create().unwrap();
    let text = format!(
        "apiVersion: bpfsync/v1\nkind: NodeSpec\nprograms:\n  - {{ name: counter, builtin: counter, type: xdp }}\ninterfaces:\n  - {{ name: {}, xdp: {{ program: counter, mode: skb }} }}\n",
        sb.host_if
    );
    let spec = write_spec(env.state.path(), "spec.yaml", &text);
    env.run_ok(&["apply", &spec, "--auto-approve"]);
    let desired = common::compile_text(&spec, &text);
    let mut kernel = env.kernel();
    assert!(kernel.observe(&scope_for(&desired.state)).is_ok());

    // Take every descriptor left (under a lowered limit, so this is quick).
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    let saved = limit;
    limit.rlim_cur = 256;
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
    let mut hogs = Vec::new();
    while let Ok(f) = std::fs::File::open("/dev/null") {
        hogs.push(f);
    }
    let seen = kernel.observe(&scope_for(&desired.state));
    drop(hogs);
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &saved) };

    match seen {
        Err(e) => {
            let text = bpfsync::apply::error_chain(&e);
            assert!(text.contains("Too many open files"), "{text}");
        }
        Ok(state) => panic!(
            "observed without descriptors: {} programs, {} attachments, {} interfaces",
            state.programs.len(),
            state.attachments.len(),
            state.interfaces.len()
        ),
    }
    assert!(kernel.observe(&scope_for(&desired.state)).is_ok(), "fine again once descriptors are free");
}

//! `BPF_PROG_TEST_RUN` on pinned programs: run a datapath program on a
//! crafted packet and get its verdict, the packet as it left, and the time
//! per run. Minimum kernel version: 4.12 (XDP, TC); context in/out for TC
//! (mark, priority): 5.0.

use std::path::Path;
use std::time::Duration;

use aya::programs::tc::SchedClassifier;
use aya::programs::xdp::Xdp;
use aya::programs::{TestRun, TestRunOptions};

use super::KernelError;
use crate::spec::ProgramType;

/// What one test run returned.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub return_value: u32,
    pub data_out: Vec<u8>,
    /// Mean duration of one run, as the kernel measured it.
    pub per_run: Duration,
    /// TC only: `skb->mark` and `skb->priority` after the run.
    pub mark: Option<u32>,
    pub priority: Option<u32>,
}

/// Size of `struct __sk_buff` as the kernel's test run takes it.
const SKB_CTX_SIZE: usize = 192;
const SKB_MARK: usize = 8;
const SKB_PRIORITY: usize = 32;

const SKB_IFINDEX: usize = 40;

/// Runs the program pinned at `pin` on `packet`, `repeat` times.
pub fn run_pinned(pin: &Path, program_type: ProgramType, packet: &[u8], repeat: u32) -> Result<RunResult, KernelError> {
    run_pinned_on(pin, program_type, packet, repeat, None)
}

/// [`run_pinned`] as if the packet arrived on (XDP: `ingress_ifindex`) or
/// left by (TC: `skb->ifindex`) interface `ifindex`, which must exist in
/// the caller's network namespace. Minimum kernel version: 5.15 (XDP
/// `ingress_ifindex` in the test-run context).
pub fn run_pinned_on(
    pin: &Path,
    program_type: ProgramType,
    packet: &[u8],
    repeat: u32,
    ifindex: Option<u32>,
) -> Result<RunResult, KernelError> {
    let what = format!("test-run the program pinned at `{}`", pin.display());
    let mut out = vec![0u8; packet.len() + 256];
    match program_type {
        ProgramType::Xdp => {
            let prog = Xdp::from_pin(pin, aya_obj::programs::XdpAttachType::Interface)
                .map_err(|e| KernelError::aya(what.clone(), e))?;
            // struct xdp_md: data, data_end, data_meta, ingress_ifindex, …
            let mut ctx = [0u8; 24];
            ctx[4..8].copy_from_slice(&(packet.len() as u32).to_ne_bytes());
            ctx[12..16].copy_from_slice(&ifindex.unwrap_or(0).to_ne_bytes());
            let r = prog
                .test_run(TestRunOptions {
                    data_in: Some(packet),
                    data_out: Some(&mut out),
                    ctx_in: ifindex.map(|_| &ctx[..]),
                    repeat,
                    ..Default::default()
                })
                .map_err(|e| KernelError::aya(what.clone(), e))?;
            out.truncate(r.data_size_out as usize);
            Ok(RunResult {
                return_value: r.return_value,
                data_out: out,
                per_run: r.duration,
                mark: None,
                priority: None,
            })
        }
        ProgramType::Tc => {
            let prog = SchedClassifier::from_pin(pin).map_err(|e| KernelError::aya(what.clone(), e))?;
            let mut ctx_in = [0u8; SKB_CTX_SIZE];
            ctx_in[SKB_IFINDEX..SKB_IFINDEX + 4].copy_from_slice(&ifindex.unwrap_or(0).to_ne_bytes());
            let mut ctx_out = [0u8; SKB_CTX_SIZE];
            let r = prog
                .test_run(TestRunOptions {
                    data_in: Some(packet),
                    data_out: Some(&mut out),
                    ctx_in: Some(&ctx_in),
                    ctx_out: Some(&mut ctx_out),
                    repeat,
                    ..Default::default()
                })
                .map_err(|e| KernelError::aya(what.clone(), e))?;
            out.truncate(r.data_size_out as usize);
            let word = |at: usize| u32::from_ne_bytes(ctx_out[at..at + 4].try_into().unwrap());
            Ok(RunResult {
                return_value: r.return_value,
                data_out: out,
                per_run: r.duration,
                mark: Some(word(SKB_MARK)),
                priority: Some(word(SKB_PRIORITY)),
            })
        }
        ProgramType::Tracepoint => {
            Err(KernelError::Unsupported { what: "tracepoint programs cannot be test-run on packets".into() })
        }
    }
}

/// Runs the XDP program pinned at `pin` on `frames` copies of `frame` in
/// live-frames mode (`BPF_F_TEST_XDP_LIVE_FRAMES`): the verdicts are acted
/// on — a passed frame enters the stack of interface `ifindex` as if
/// received there, a redirected one is sent — in batches of `batch`.
/// Returns the time the kernel took for all of them. A load generator at
/// kernel speed. Minimum kernel version: 5.18.
pub fn run_live_frames(
    pin: &Path,
    frame: &[u8],
    frames: u32,
    batch: u32,
    ifindex: u32,
) -> Result<Duration, KernelError> {
    let what = format!("send live frames through the program pinned at `{}`", pin.display());
    let prog = Xdp::from_pin(pin, aya_obj::programs::XdpAttachType::Interface)
        .map_err(|e| KernelError::aya(what.clone(), e))?;
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    let started = std::time::Instant::now();
    prog.test_run(TestRunOptions {
        data_in: Some(frame),
        ctx_in: Some(&ctx),
        repeat: frames,
        attrs: aya::programs::TestRunAttrs::new().xdp_live_frames(batch),
        ..Default::default()
    })
    .map_err(|e| KernelError::aya(what, e))?;
    Ok(started.elapsed())
}

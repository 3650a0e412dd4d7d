//! The programs shipped in `bpf/`, compiled objects embedded in the binary.

use crate::spec::ProgramType;

/// A built-in program: one function of one committed object.
#[derive(Debug, Clone, Copy)]
pub struct Builtin {
    pub name: &'static str,
    /// Object file name under `bpf/`.
    pub object: &'static str,
    pub function: &'static str,
    pub program_type: ProgramType,
    pub bytes: &'static [u8],
    pub summary: &'static str,
}

static COUNTER: &[u8] = include_bytes!("../bpf/counter.bpf.o");
static CLASSIFIER: &[u8] = include_bytes!("../bpf/classifier.bpf.o");
static SYSCALL_LATENCY: &[u8] = include_bytes!("../bpf/syscall_latency.bpf.o");
static MESH: &[u8] = include_bytes!("../bpf/mesh.bpf.o");
static TCP_TELEMETRY: &[u8] = include_bytes!("../bpf/tcp_telemetry.bpf.o");
static SKB_DROPS: &[u8] = include_bytes!("../bpf/skb_drops.bpf.o");
static XDP_ERRORS: &[u8] = include_bytes!("../bpf/xdp_errors.bpf.o");

pub const BUILTINS: &[Builtin] = &[
    Builtin {
        name: "counter",
        object: "counter.bpf.o",
        function: "xdp_counter",
        program_type: ProgramType::Xdp,
        bytes: COUNTER,
        summary: "XDP per-protocol packet and byte counts (`packet_stats`), switches in `counter_config`",
    },
    Builtin {
        name: "classifier",
        object: "classifier.bpf.o",
        function: "tc_classify",
        program_type: ProgramType::Tc,
        bytes: CLASSIFIER,
        summary: "TC classifier: marks and prioritises by destination prefix and port",
    },
    Builtin {
        name: "syscall_enter",
        object: "syscall_latency.bpf.o",
        function: "syscall_enter",
        program_type: ProgramType::Tracepoint,
        bytes: SYSCALL_LATENCY,
        summary: "`raw_syscalls/sys_enter`: records syscall entry times",
    },
    Builtin {
        name: "syscall_exit",
        object: "syscall_latency.bpf.o",
        function: "syscall_exit",
        program_type: ProgramType::Tracepoint,
        bytes: SYSCALL_LATENCY,
        summary: "`raw_syscalls/sys_exit`: log2 syscall latency histogram (`latency_hist`)",
    },
    Builtin {
        name: "mesh",
        object: "mesh.bpf.o",
        function: "mesh_ingress",
        program_type: ProgramType::Xdp,
        bytes: MESH,
        summary: "XDP mesh datapath: ingress policy, conntrack, route lookup and forwarding (from `policies`, `routes`)",
    },
    Builtin {
        name: "mesh_egress",
        object: "mesh.bpf.o",
        function: "mesh_egress",
        program_type: ProgramType::Tc,
        bytes: MESH,
        summary: "TCX egress half of the mesh datapath: egress policy, conntrack (maps shared with `mesh`)",
    },
    Builtin {
        name: "mesh_redirect_err",
        object: "mesh.bpf.o",
        function: "mesh_redirect_err",
        program_type: ProgramType::Tracepoint,
        bytes: MESH,
        summary: "`xdp/xdp_redirect_err`: counts the mesh routes' failed redirects per route (maps shared with `mesh`)",
    },
    Builtin {
        name: "tcp_rtt",
        object: "tcp_telemetry.bpf.o",
        function: "tcp_rtt",
        program_type: ProgramType::Tracepoint,
        bytes: TCP_TELEMETRY,
        summary: "`tcp/tcp_probe`: smoothed TCP RTT histogram per watched prefix (`tcp_stats`, `watch_prefixes`)",
    },
    Builtin {
        name: "tcp_retransmits",
        object: "tcp_telemetry.bpf.o",
        function: "tcp_retransmits",
        program_type: ProgramType::Tracepoint,
        bytes: TCP_TELEMETRY,
        summary: "`tcp/tcp_retransmit_skb`: retransmitted segments per watched prefix (maps shared with `tcp_rtt`)",
    },
    Builtin {
        name: "tcp_congestion",
        object: "tcp_telemetry.bpf.o",
        function: "tcp_congestion",
        program_type: ProgramType::Tracepoint,
        bytes: TCP_TELEMETRY,
        summary: "`tcp/tcp_cong_state_set`: entries into CWR, recovery and loss per watched prefix (maps shared with `tcp_rtt`)",
    },
    Builtin {
        name: "tcp_lifecycle",
        object: "tcp_telemetry.bpf.o",
        function: "tcp_lifecycle",
        program_type: ProgramType::Tracepoint,
        bytes: TCP_TELEMETRY,
        summary: "`sock/inet_sock_set_state`: TCP opens, closes, failed connects and connect latency per watched prefix (maps shared with `tcp_rtt`)",
    },
    Builtin {
        name: "tcp_resets_received",
        object: "tcp_telemetry.bpf.o",
        function: "tcp_resets_received",
        program_type: ProgramType::Tracepoint,
        bytes: TCP_TELEMETRY,
        summary: "`tcp/tcp_receive_reset`: resets received per watched prefix (maps shared with `tcp_rtt`)",
    },
    Builtin {
        name: "tcp_resets_sent",
        object: "tcp_telemetry.bpf.o",
        function: "tcp_resets_sent",
        program_type: ProgramType::Tracepoint,
        bytes: TCP_TELEMETRY,
        summary: "`tcp/tcp_send_reset`: resets sent per watched prefix (maps shared with `tcp_rtt`)",
    },
    Builtin {
        name: "skb_drops",
        object: "skb_drops.bpf.o",
        function: "skb_drops",
        program_type: ProgramType::Tracepoint,
        bytes: SKB_DROPS,
        summary: "`skb/kfree_skb`: packets the stack dropped, by drop reason (`drop_reasons`, filter `drop_filter`)",
    },
    Builtin {
        name: "xdp_redirect_errors",
        object: "xdp_errors.bpf.o",
        function: "xdp_redirect_errors",
        program_type: ProgramType::Tracepoint,
        bytes: XDP_ERRORS,
        summary: "`xdp/xdp_redirect_err`: failed XDP redirects by interface and errno (`xdp_errors`)",
    },
    Builtin {
        name: "xdp_exceptions",
        object: "xdp_errors.bpf.o",
        function: "xdp_exceptions",
        program_type: ProgramType::Tracepoint,
        bytes: XDP_ERRORS,
        summary: "`xdp/xdp_exception`: XDP aborts and invalid actions by interface (maps shared with `xdp_redirect_errors`)",
    },
];

pub fn find(name: &str) -> Option<&'static Builtin> {
    BUILTINS.iter().find(|b| b.name == name)
}

/* Layouts shared between the datapath and bpfsync (user space).
 *
 * Every struct here is mirrored by a #[repr(C)] type in src/datapath.rs
 * with a size assertion; change both together. */
#ifndef BPFSYNC_H
#define BPFSYNC_H

#include <linux/types.h>

/* Protocol slots of the `packet_stats` counter array. */
enum bpfsync_proto {
	PROTO_OTHER = 0,
	PROTO_ICMP = 1,
	PROTO_TCP = 2,
	PROTO_UDP = 3,
	PROTO_ICMPV6 = 4,
	PROTO_NON_IP = 5,
	PROTO_MAX = 6,
};

/* Value of `packet_stats` and `class_stats`. */
struct proto_stats {
	__u64 packets;
	__u64 bytes;
};

/* Keys of `counter_config`. */
enum counter_config_key {
	CONFIG_COUNTING = 0, /* COUNTING_DEFAULT (0, unset) or COUNTING_ON = count; COUNTING_OFF = do not */
	CONFIG_DROP_NON_IP = 1, /* non-zero = XDP_DROP frames that are not IP */
	CONFIG_MAX = 2,
};

/* Values of counter_config[CONFIG_COUNTING]: an empty spec counts. */
enum counting {
	COUNTING_DEFAULT = 0,
	COUNTING_ON = 1,
	COUNTING_OFF = 2,
};

/* Key of `class_ports`: a transport protocol and a destination port. */
struct class_port_key {
	__u8 protocol; /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 pad;
	__u16 port; /* host byte order */
};

/* Value of `class_ports` and `class_prefixes`. */
struct class_action {
	__u32 mark; /* written to skb->mark; 0 leaves it */
	__u32 priority; /* written to skb->priority; 0 leaves it */
};

/* Key of `class_prefixes`: an LPM trie key over IPv4 destinations. */
struct class_prefix_key {
	__u32 prefixlen;
	__u8 addr[4];
};

/* Number of log2 buckets of `latency_hist`: bucket i counts latencies in
 * [2^i, 2^(i+1)) nanoseconds. */
#define LATENCY_BUCKETS 64

/* ---- The mesh datapath (`mesh` XDP, `mesh_egress` TCX egress) ---- */

enum mesh_dir {
	DIR_INGRESS = 0,
	DIR_EGRESS = 1,
	DIR_MAX = 2,
};

/* Actions of `policy_actions` values. */
enum policy_action {
	ACTION_ALLOW = 1,
	ACTION_DENY = 2,
};

/* Outcome slots of `verdict_stats` (per direction). */
enum mesh_verdict {
	VERDICT_PASS = 0, /* allowed (or no policy), up the stack / on the wire */
	VERDICT_FORWARD = 1, /* routed: MACs rewritten, TTL decremented, redirected */
	VERDICT_DROP_RULE = 2, /* dropped by an explicit deny rule */
	VERDICT_DROP_DEFAULT = 3, /* dropped by default deny */
	VERDICT_REPLY = 4, /* default deny, passed as a reply of a tracked connection */
	VERDICT_TTL_EXCEEDED = 5, /* route matched but TTL/hop limit expired: to the stack */
	VERDICT_DROP_UNPARSEABLE = 6, /* IP, but its headers could not be read, where a policy applies */
	VERDICT_MAX = 7,
};

/* Stage one of the policy lookup, `policy_peers` (LPM trie): the peer
 * address (source on ingress, destination on egress) of a packet on an
 * interface and direction → the set of rules that apply to that peer.
 * prefixlen counts from `ifindex`: 64 + address bits. IPv4 addresses use
 * addr[0..4]. */
struct policy_peer_key {
	__u32 prefixlen;
	__u32 ifindex;
	__u8 dir; /* enum mesh_dir */
	__u8 family; /* 4 or 6 */
	__u8 pad[2];
	__u8 addr[16];
};

struct policy_peer_value {
	__u32 set_id; /* key of the rule set in `policy_actions` */
};

/* Stage two, `policy_actions` (LPM trie): (rule set, protocol, destination
 * port prefix) → decision. prefixlen 32 = the whole set (any protocol),
 * 40 = one protocol, 48 + n = a port prefix of n bits. Every set has a
 * /32 entry, so a lookup with a set id from stage one always finds one. */
struct policy_action_key {
	__u32 prefixlen;
	__u32 set_id;
	__u8 protocol; /* IPPROTO_* */
	__u8 pad;
	__be16 port; /* network byte order: prefixes are numeric ranges */
};

struct policy_action_value {
	__u32 rule_id; /* the spec rule that decides; names in `rule_names` */
	__u8 action; /* enum policy_action */
	__u8 pad[3];
};

/* Value of `rule_names`: the spec name of a rule id, NUL-padded. */
#define RULE_NAME_LEN 96
struct rule_name {
	char name[RULE_NAME_LEN];
};

/* `mesh_routes` (LPM trie): destination prefix → next hop. prefixlen
 * counts from `family`: 32 + address bits. */
struct route_key {
	__u32 prefixlen;
	__u8 family;
	__u8 pad[3];
	__u8 addr[16];
};

struct route_value {
	__u32 ifindex; /* egress interface */
	__u32 route_id; /* key of `route_stats` */
	__u8 src_mac[6]; /* the egress interface's MAC */
	__u8 dst_mac[6]; /* the next hop's MAC */
};

/* `conntrack` (LRU hash): a connection as first seen. ICMP echo uses the
 * identifier as source port (request) or destination port (reply). */
struct ct_key {
	__u8 family;
	__u8 protocol;
	__be16 sport;
	__be16 dport;
	__u8 pad[2];
	__u8 saddr[16];
	__u8 daddr[16];
};

/* A hook's cached decision for a connection: the established-flow fast
 * path (`mesh.bpf.c`). One per direction (a packet crosses at most one
 * ingress and one egress hook of the node), for the interface in `ifindex`.
 * `generation` is CT_DECISION_EMPTY, CT_DECISION_WRITING while one CPU
 * writes it, or the `datapath_generation` it was decided under plus
 * CT_DECISION_GEN_BASE: bpfsync bumps the generation after every write to
 * the policy or route maps, which retires every cached decision at once. */
struct ct_decision {
	__u64 generation;
	__u32 ifindex; /* the hook's interface */
	__u32 rule_id; /* the rule counted in `rule_stats` (0: none) */
	__u32 out_rule_id; /* forwarded: the outgoing interface's egress rule counted (0: none) */
	struct route_value route; /* forwarded: the next hop */
	__u8 verdict; /* enum mesh_verdict: VERDICT_PASS, VERDICT_REPLY or VERDICT_FORWARD */
	__u8 reply; /* allowed as a reply of a tracked connection: re-checked every tick */
	__u8 pad[6];
};

#define CT_DECISION_EMPTY 0
#define CT_DECISION_WRITING 1
#define CT_DECISION_GEN_BASE 2

struct ct_value {
	__u64 last_seen_ns;
	__u64 report_ns; /* time of the connection's last flow record */
	__u64 packets; /* since first seen, where first seen */
	__u64 bytes;
	__u64 reported_packets; /* as of the last flow record */
	__u64 reported_bytes;
	__u32 rule_id; /* the rule that allowed the first packet */
	__u32 ifindex; /* where it was first seen: counted only there */
	__u32 tcp_flags; /* OR of the TCP flags since the last record */
	__u8 dir; /* enum mesh_dir it was first seen in */
	__u8 flags; /* CT_F_* */
	__u8 pad[2];
	__u64 check_jiffies; /* the tick of the last time-based check (refresh, report) */
	struct ct_decision decision[DIR_MAX]; /* [enum mesh_dir] */
};

/* A conntrack entry made for the reply direction of a connection (for its
 * flow records): it never makes the other direction a reply. */
#define CT_F_REPLY 1

/* ---- Flow records (`flow_events` ring buffer) ---- */

enum flow_kind {
	FLOW_NEW = 0, /* first packet of a connection */
	FLOW_UPDATE = 1, /* periodic, or on TCP FIN/RST: packets and bytes since the last record */
	FLOW_DROP = 2, /* dropped packets, aggregated per flow (see flow_event.packets) */
	FLOW_KIND_MAX = 3,
};

enum flow_verdict {
	FLOW_FORWARDED = 0, /* up the stack or on the wire */
	FLOW_DROPPED = 1,
	FLOW_REDIRECTED = 2, /* by a mesh route */
};

enum drop_reason {
	DROP_NONE = 0,
	DROP_POLICY_DENY = 1, /* an explicit deny rule */
	DROP_DEFAULT_DENY = 2, /* no rule allows it on an interface a policy selects */
	DROP_NO_RULE_SET = 3, /* a peer entry without its rule set: fail closed */
	DROP_UNPARSEABLE = 4, /* IP headers truncated or beyond the walk: fail closed */
};

/* One record in `flow_events`. A drop record stands for `packets` drops of
 * its flow (the ones aggregated since the flow's previous drop record);
 * `suppressed` counts drop records this CPU did not make, because of the
 * rate limit, since its previous one. */
struct flow_event {
	__u64 time_ns; /* bpf_ktime_get_ns (CLOCK_MONOTONIC) */
	__u64 bytes;
	__u32 packets;
	__u32 ifindex;
	__u32 rule_id; /* names in `rule_names`; 0 = no policy decided */
	__u32 suppressed;
	__u8 kind; /* enum flow_kind */
	__u8 verdict; /* enum flow_verdict */
	__u8 dir; /* enum mesh_dir */
	__u8 drop_reason; /* enum drop_reason */
	__u8 tcp_flags; /* this packet's (NEW, DROP), or their OR since the last record (UPDATE) */
	__u8 pad[3];
	struct ct_key tuple;
};

/* The one value of `flow_config`; 0 in a field means its default. */
struct flow_config {
	__u32 disabled; /* non-zero: no flow records (counters still count) */
	__u32 drop_records_per_sec; /* per CPU; default 1000 */
	__u64 report_interval_ns; /* UPDATE records of long-lived flows; default 10 s */
	__u64 drop_window_ns; /* drops of one flow within this make one record; default 1 s */
};

/* Slots of `flow_counters`. */
enum flow_counter {
	FLOW_LOST_NEW = 0, /* records lost because the ring buffer was full, by kind */
	FLOW_LOST_UPDATE = 1,
	FLOW_LOST_DROP = 2,
	FLOW_SUPPRESSED_DROP = 3, /* drop records not made because of the rate limit */
	FLOW_UNRECORDED_DROP = 4, /* dropped packets no record will carry (their slot
				     went to another flow while the rate limit was spent) */
	FLOW_COUNTER_MAX = 5,
};

/* A flow at a hook, for drop aggregation (`drop_slots`). */
struct drop_key {
	struct ct_key tuple;
	__u32 ifindex;
	__u8 dir;
	__u8 pad[3];
};

/* Value of `drop_slots` (per CPU): drops of one flow since its last record. */
struct drop_slot {
	struct drop_key key;
	__u64 last_record_ns; /* coarse clock */
	__u64 packets;
	__u64 bytes;
	__u32 rule_id;
	__u8 drop_reason;
	__u8 tcp_flags;
	__u8 pad[2];
};

/* Per-CPU state of the drop record rate limit (`drop_budget`). */
struct drop_budget {
	__u64 window_start_ns;
	__u32 used;
	__u32 suppressed;
	__u32 last_slot; /* the slot of this CPU's last drop: floods skip the hash */
	__u32 pad;
};

/* ---- Network telemetry (tracepoints; `telemetry:` in the spec) ---- */

/* Slots of `tcp_stats`: slot 0 counts remote addresses no watched prefix
 * covers ("other"), slots 1.. the spec's `telemetry.tcp.watch` in order. */
#define WATCH_SLOTS 256

/* Log2 histogram buckets of microseconds: bucket i counts values in
 * [2^i, 2^(i+1)) us (bucket 0 also counts 0); the last is open-ended. */
#define TELEMETRY_BUCKETS 32

/* `watch_prefixes` (LPM trie): remote prefix → slot. IPv4 is stored as
 * IPv4-mapped IPv6 (::ffff:a.b.c.d, prefixlen + 96), so one trie answers
 * for both families and a mapped address on an IPv6 socket matches its
 * IPv4 prefix. */
struct watch_key {
	__u32 prefixlen;
	__u8 addr[16];
};

/* Value of `watch_names`: the spec name of a slot, NUL-padded. */
#define WATCH_NAME_LEN 64
struct watch_name {
	char name[WATCH_NAME_LEN];
};

/* Value of `tcp_stats` (per CPU, per slot). */
struct tcp_watch_stats {
	__u64 rtt_buckets[TELEMETRY_BUCKETS]; /* smoothed RTT per received segment (`tcp_probe`) */
	__u64 rtt_sum_us;
	__u64 rtt_samples;
	__u64 connect_buckets[TELEMETRY_BUCKETS]; /* SYN sent → established */
	__u64 connect_sum_us;
	__u64 connect_samples;
	__u64 retransmits;
	__u64 cong_cwr; /* congestion-state entries, by state */
	__u64 cong_recovery;
	__u64 cong_loss;
	__u64 opened_active; /* SYN_SENT → ESTABLISHED */
	__u64 opened_passive; /* SYN_RECV → ESTABLISHED */
	__u64 closed; /* an established connection reached CLOSE (any way) */
	__u64 connects_failed; /* SYN_SENT → CLOSE */
	__u64 resets_received;
	__u64 resets_sent;
};

/* Slots of `drop_reasons`: the kernel's `enum skb_drop_reason` value, or
 * DROP_REASON_SLOTS - 1 for a subsystem's own reasons (upper 16 bits set)
 * and anything beyond the table. */
#define DROP_REASON_SLOTS 1024

/* Value of `drop_filter` (array by slot): non-zero = do not count. */
struct drop_filter {
	__u32 skip;
};

/* Key of `xdp_errors` (hash): an interface and what went wrong on it. */
enum xdp_error_kind {
	XDP_ERR_REDIRECT = 0, /* `xdp:xdp_redirect_err`; code = -errno */
	XDP_ERR_EXCEPTION = 1, /* `xdp:xdp_exception`; code = the XDP action */
};

struct xdp_error_key {
	__u32 ifindex;
	__u16 kind;
	__u16 code;
};

#endif

// SPDX-License-Identifier: GPL-2.0
/* The mesh datapath: network policies and mesh routes.
 *
 * `mesh_ingress` (XDP, ingress of mesh interfaces):
 *   1. ingress policy of the interface (two LPM lookups, see bpfsync.h);
 *      default deny passes replies of tracked connections;
 *   2. route lookup (`mesh_routes`); on a match the egress policy of the
 *      outgoing interface, then MAC rewrite, TTL / hop limit decrement and
 *      redirect. Non-matching packets, and expiring TTLs, go up the stack.
 * `mesh_egress` (TCX egress): egress policy for what the stack sends.
 *
 * Both share the maps of this object (`conntrack` among them), so a
 * connection allowed in one direction lets its replies through the other.
 * Policy entries are compiled by bpfsync; see src/mesh/policy.rs.
 *
 * Flow records go to the `flow_events` ring buffer: one when a connection
 * is first seen (a `conntrack` entry is made), one per report interval
 * and on TCP FIN/RST for connections that go on, and one per drop, with
 * drops of one flow within a window aggregated into one record and drop
 * records rate-limited per CPU (both visible in the record). A full ring
 * buffer loses records; `flow_counters` counts them. Needs -mcpu=v3
 * (atomic exchange and compare-and-swap). */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/in.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "bpfsync.h"

/* ICMP echo types (linux/icmp.h pulls in libc headers). */
#define ICMP_ECHOREPLY 0
#define ICMP_ECHO 8
#define ICMPV6_ECHO_REQUEST 128
#define ICMPV6_ECHO_REPLY 129

/* Drop aggregation slots per CPU (a power of two). */
#define DROP_SLOTS 4096

/* A conntrack entry older than this no longer lets replies in. */
#define CT_TIMEOUT_NS (300ULL * 1000000000ULL)
/* Refresh an entry's timestamp at most this often (saves LRU writes). */
#define CT_REFRESH_NS (1000000000ULL)

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1 << 20);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct policy_peer_key);
	__type(value, struct policy_peer_value);
} policy_peers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1 << 20);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct policy_action_key);
	__type(value, struct policy_action_value);
} policy_actions SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1 << 16);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct rule_name);
} rule_names SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1 << 21);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct route_key);
	__type(value, struct route_value);
} mesh_routes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1 << 16);
	__type(key, struct ct_key);
	__type(value, struct ct_value);
} conntrack SEC(".maps");

/* The generation of the policy and route tables: bpfsync adds one after
 * every write to `policy_peers`, `policy_actions` or `mesh_routes`, and a
 * decision cached under an older one is not used (see struct ct_decision). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} datapath_generation SEC(".maps");

/* Counters on the per-packet path are per CPU: a CPU adds to its own copy
 * without a locked instruction (no cache line bouncing between CPUs);
 * bpfsync sums the copies when it reads them. */

/* [dir * PROTO_MAX + proto] */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, DIR_MAX * PROTO_MAX);
	__type(key, __u32);
	__type(value, struct proto_stats);
} mesh_stats SEC(".maps");

/* [dir * VERDICT_MAX + verdict] */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, DIR_MAX * VERDICT_MAX);
	__type(key, __u32);
	__type(value, struct proto_stats);
} verdict_stats SEC(".maps");

/* Rule id → packets and bytes the rule decided. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 1 << 16);
	__type(key, __u32);
	__type(value, struct proto_stats);
} rule_stats SEC(".maps");

/* Route id → packets and bytes forwarded by the route. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 1 << 16);
	__type(key, __u32);
	__type(value, struct proto_stats);
} route_stats SEC(".maps");

/* (ifindex, direction) → packets the policy dropped there. Counted on the
 * drop path only (no cost to packets that pass); the interface's own
 * packet counters are the denominator of its drop rate. */
struct iface_key {
	__u32 ifindex;
	__u32 dir;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 1 << 12);
	__type(key, struct iface_key);
	__type(value, struct proto_stats);
} iface_drops SEC(".maps");

/* Route id → packets whose redirect failed (the target interface down
 * or gone, a frame over its MTU): counted by `mesh_redirect_err`. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 1 << 16);
	__type(key, __u32);
	__type(value, struct proto_stats);
} route_redirect_errors SEC(".maps");

/* The last redirect this CPU's `mesh_ingress` asked for. A redirect fails
 * after the program returned, in the kernel's xdp_do_redirect on the same
 * CPU, which then fires `xdp:xdp_redirect_err`: the tracepoint program
 * finds here which route it was. */
struct redirect_slot {
	__u32 in_ifindex; /* 0: none pending */
	__u32 to_ifindex;
	__u32 route_id;
	__u32 len;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct redirect_slot);
} redirect_slot SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 22); /* 4 MiB: ~47,000 records */
} flow_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct flow_config);
} flow_config SEC(".maps");

/* [enum flow_counter] */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, FLOW_COUNTER_MAX);
	__type(key, __u32);
	__type(value, __u64);
} flow_counters SEC(".maps");

/* Drop aggregation: per CPU, a flow's slot is a hash of its key (a flow
 * stays on one CPU under RSS; no atomics, no LRU lookup on the drop path). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, DROP_SLOTS);
	__type(key, __u32);
	__type(value, struct drop_slot);
} drop_slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct drop_budget);
} drop_budget SEC(".maps");

/* What the policy and the router need from a packet. */
struct pkt {
	struct ct_key t; /* the 5-tuple as seen on the wire */
	__u32 len;
	__u32 proto_slot; /* enum bpfsync_proto */
	__u8 ttl;
	__u8 tcp_flags;
};

/* Adds a packet of `len` bytes to this CPU's proto_stats at `key` of a
 * per-CPU array. Plain adds: a program runs to completion on its CPU, so
 * only a program of another hook interrupting this one on the same CPU
 * (XDP in softirq over TC egress in process context) could lose an
 * increment — the trade Cilium's per-CPU metrics make too. */
static __always_inline void add_stats(void *map, __u32 key, __u32 len)
{
	struct proto_stats *s = bpf_map_lookup_elem(map, &key);
	if (s) {
		s->packets++;
		s->bytes += len;
	}
}

/* Adds a packet of `len` bytes to this CPU's proto_stats at `key` of a
 * per-CPU hash map, creating the entry (zero on every CPU) first. */
static __always_inline void add_stats_at(void *map, const void *key, __u32 len)
{
	struct proto_stats *s = bpf_map_lookup_elem(map, key);
	if (!s) {
		struct proto_stats init = {};
		bpf_map_update_elem(map, key, &init, BPF_NOEXIST);
		s = bpf_map_lookup_elem(map, key);
		if (!s)
			return;
	}
	s->packets++;
	s->bytes += len;
}

static __always_inline void add_keyed_stats(void *map, __u32 id, __u32 len)
{
	add_stats_at(map, &id, len);
}

static __always_inline void add_iface_drop(__u32 ifindex, __u8 dir, __u32 len)
{
	struct iface_key k = { .ifindex = ifindex, .dir = dir };
	add_stats_at(&iface_drops, &k, len);
}

/* What parse() found. */
enum { PARSED = 0, NOT_IP = -1, UNPARSEABLE = -2 };

/* Reads the ports (or ICMP echo id) of the transport header at `l4`:
 * PARSED, or UNPARSEABLE when the header the policy needs is not all
 * there. */
static __always_inline int l4_ports(struct pkt *p, void *l4, void *data_end)
{
	switch (p->t.protocol) {
	case IPPROTO_TCP: {
		struct tcphdr *th = l4;
		if ((void *)(th + 1) > data_end)
			return UNPARSEABLE;
		p->t.sport = th->source;
		p->t.dport = th->dest;
		p->tcp_flags = ((__u8 *)th)[13];
		break;
	}
	case IPPROTO_UDP: {
		struct udphdr *uh = l4;
		if ((void *)(uh + 1) > data_end)
			return UNPARSEABLE;
		p->t.sport = uh->source;
		p->t.dport = uh->dest;
		break;
	}
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6: {
		/* type, code, checksum, then the echo identifier */
		__u8 *ic = l4;
		if ((void *)(ic + 8) > data_end)
			return UNPARSEABLE;
		__u8 type = ic[0];
		__be16 id = *(__be16 *)(ic + 4);
		if (type == ICMP_ECHO || type == ICMPV6_ECHO_REQUEST)
			p->t.sport = id;
		else if (type == ICMP_ECHOREPLY || type == ICMPV6_ECHO_REPLY)
			p->t.dport = id;
		break;
	}
	}
	return PARSED;
}

/* IPv6 extension headers (RFC 8200 4.1) walked to find the transport
 * header; a chain longer than this is not classified. */
#define IPV6_EXT_MAX 8
#define NEXTHDR_HOP 0
#define NEXTHDR_ROUTING 43
#define NEXTHDR_FRAGMENT 44
#define NEXTHDR_AUTH 51
#define NEXTHDR_DEST 60

/* Walks the extension headers after the IPv6 header at `ip6`: the
 * transport protocol in *protocol and its header in *l4; *later_fragment
 * when this is not a first fragment (no transport header to read). */
static __always_inline int ipv6_transport(struct ipv6hdr *ip6, void *data_end, __u8 *protocol, void **l4,
					  int *later_fragment)
{
	__u8 next = ip6->nexthdr;
	void *cur = ip6 + 1;
#pragma unroll
	for (int i = 0; i < IPV6_EXT_MAX; i++) {
		__u8 *h = cur;
		switch (next) {
		case NEXTHDR_HOP:
		case NEXTHDR_ROUTING:
		case NEXTHDR_DEST:
			/* next header, length in 8-octet units beyond the first 8 */
			if ((void *)(h + 2) > data_end)
				return UNPARSEABLE;
			next = h[0];
			cur += ((__u32)h[1] + 1) * 8;
			break;
		case NEXTHDR_FRAGMENT:
			/* next header, reserved, offset and flags, identification */
			if ((void *)(h + 8) > data_end)
				return UNPARSEABLE;
			next = h[0];
			if (*(__be16 *)(h + 2) & bpf_htons(0xfff8))
				*later_fragment = 1;
			cur += 8;
			break;
		case NEXTHDR_AUTH:
			/* length in 4-octet units, minus 2 */
			if ((void *)(h + 2) > data_end)
				return UNPARSEABLE;
			next = h[0];
			cur += ((__u32)h[1] + 2) * 4;
			break;
		default:
			*protocol = next;
			*l4 = cur;
			return PARSED;
		}
		if (*later_fragment) {
			*protocol = next;
			*l4 = cur;
			return PARSED;
		}
	}
	return UNPARSEABLE;
}

static __always_inline __u32 proto_slot(__u8 protocol)
{
	switch (protocol) {
	case IPPROTO_ICMP: return PROTO_ICMP;
	case IPPROTO_TCP: return PROTO_TCP;
	case IPPROTO_UDP: return PROTO_UDP;
	case IPPROTO_ICMPV6: return PROTO_ICMPV6;
	default: return PROTO_OTHER;
	}
}

/* Fills `p`: PARSED; NOT_IP for frames that are not IP (not the policy's
 * business); UNPARSEABLE for IP packets whose headers are cut short or
 * beyond the extension-header walk (`p->t.family` is set: the caller
 * fails closed where a policy applies). */
static __always_inline int parse(void *data, void *data_end, struct pkt *p)
{
	struct ethhdr *eth = data;
	p->proto_slot = PROTO_NON_IP;
	if ((void *)(eth + 1) > data_end)
		return NOT_IP;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		p->t.family = 4;
		p->proto_slot = PROTO_OTHER;
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > data_end || ip->ihl < 5)
			return UNPARSEABLE;
		p->t.protocol = ip->protocol;
		__builtin_memcpy(p->t.saddr, &ip->saddr, 4);
		__builtin_memcpy(p->t.daddr, &ip->daddr, 4);
		p->ttl = ip->ttl;
		p->proto_slot = proto_slot(p->t.protocol);
		/* Later fragments carry no transport header: ports stay 0. */
		if (!(ip->frag_off & bpf_htons(0x1fff)))
			return l4_ports(p, (void *)ip + ip->ihl * 4, data_end);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		p->t.family = 6;
		p->proto_slot = PROTO_OTHER;
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > data_end)
			return UNPARSEABLE;
		__builtin_memcpy(p->t.saddr, &ip6->saddr, 16);
		__builtin_memcpy(p->t.daddr, &ip6->daddr, 16);
		p->ttl = ip6->hop_limit;
		__u8 protocol = 0;
		void *l4 = 0;
		int later_fragment = 0;
		if (ipv6_transport(ip6, data_end, &protocol, &l4, &later_fragment) != PARSED)
			return UNPARSEABLE;
		p->t.protocol = protocol;
		p->proto_slot = proto_slot(protocol);
		if (!later_fragment)
			return l4_ports(p, l4, data_end);
	} else {
		return NOT_IP;
	}
	return PARSED;
}

/* The policy decision for a packet on (ifindex, dir). Returns 0 when no
 * policy covers that interface and direction, else ACTION_ALLOW or
 * ACTION_DENY with the deciding rule in *rule_id. */
static __always_inline int policy_decide(__u32 ifindex, __u8 dir, struct pkt *p, __u32 *rule_id)
{
	struct policy_peer_key pk = {};
	pk.prefixlen = 64 + (p->t.family == 4 ? 32 : 128);
	pk.ifindex = ifindex;
	pk.dir = dir;
	pk.family = p->t.family;
	if (dir == DIR_INGRESS)
		__builtin_memcpy(pk.addr, p->t.saddr, 16);
	else
		__builtin_memcpy(pk.addr, p->t.daddr, 16);
	struct policy_peer_value *peer = bpf_map_lookup_elem(&policy_peers, &pk);
	if (!peer)
		return 0;
	struct policy_action_key ak = {
		.prefixlen = 64,
		.set_id = peer->set_id,
		.protocol = p->t.protocol,
		.port = p->t.dport,
	};
	struct policy_action_value *a = bpf_map_lookup_elem(&policy_actions, &ak);
	if (!a) {
		/* Cannot happen with entries compiled by bpfsync (every set has a
		 * /32 entry); fail closed. */
		*rule_id = 0;
		return ACTION_DENY;
	}
	*rule_id = a->rule_id;
	return a->action;
}

/* A reply: the reverse of a connection tracked recently (entries made for
 * replies themselves do not count). */
static __always_inline int is_reply(struct pkt *p)
{
	struct ct_key rev = {
		.family = p->t.family,
		.protocol = p->t.protocol,
		.sport = p->t.dport,
		.dport = p->t.sport,
	};
	__builtin_memcpy(rev.saddr, p->t.daddr, 16);
	__builtin_memcpy(rev.daddr, p->t.saddr, 16);
	struct ct_value *v = bpf_map_lookup_elem(&conntrack, &rev);
	return v && !(v->flags & CT_F_REPLY) && bpf_ktime_get_ns() - v->last_seen_ns < CT_TIMEOUT_NS;
}

static __always_inline int tracked_protocol(__u8 protocol)
{
	return protocol == IPPROTO_TCP || protocol == IPPROTO_UDP || protocol == IPPROTO_ICMP ||
	       protocol == IPPROTO_ICMPV6;
}

#define TCP_FIN 0x01
#define TCP_RST 0x04

/* Unread ring buffer data at which the reader is woken (1/16 of the ring). */
#define WAKEUP_BYTES (1 << 18)

#define DEFAULT_REPORT_INTERVAL_NS (10ULL * 1000000000ULL)
#define DEFAULT_DROP_WINDOW_NS (1000000000ULL)
#define DEFAULT_DROP_RECORDS_PER_SEC 1000
#define DROP_BUDGET_WINDOW_NS (1000000000ULL)

static __always_inline struct flow_config *flow_config_get(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&flow_config, &zero);
}

static __always_inline void count_flow(__u32 slot)
{
	__u64 *c = bpf_map_lookup_elem(&flow_counters, &slot);
	if (c)
		__sync_fetch_and_add(c, 1);
}

/* What a flow record says besides the packet's 5-tuple. */
struct record {
	__u64 now;
	__u64 bytes;
	__u32 packets;
	__u32 ifindex;
	__u32 rule_id;
	__u32 suppressed;
	__u8 kind;
	__u8 verdict;
	__u8 dir;
	__u8 drop_reason;
	__u8 tcp_flags;
};

/* Fills a reserved record. Not inlined on purpose: a function taking a
 * `struct flow_event *` puts the record's type into the object's BTF (a
 * ring buffer has no value type), where tests/datapath_layouts.rs checks
 * it against the Rust mirror. One call per record, not per packet. */
static __noinline void fill_record(struct flow_event *e, const struct ct_key *tuple, const struct record *r)
{
	e->time_ns = r->now;
	e->bytes = r->bytes;
	e->packets = r->packets;
	e->ifindex = r->ifindex;
	e->rule_id = r->rule_id;
	e->suppressed = r->suppressed;
	e->kind = r->kind;
	e->verdict = r->verdict;
	e->dir = r->dir;
	e->drop_reason = r->drop_reason;
	e->tcp_flags = r->tcp_flags;
	e->pad[0] = e->pad[1] = e->pad[2] = 0;
	__builtin_memcpy(&e->tuple, tuple, sizeof(e->tuple));
}

static __always_inline void emit(const struct ct_key *tuple, struct record *r)
{
	struct flow_event *e = bpf_ringbuf_reserve(&flow_events, sizeof(*e), 0);
	if (!e) {
		count_flow(FLOW_LOST_NEW + r->kind);
		return;
	}
	fill_record(e, tuple, r);
	/* A wakeup is an irq_work (an IPI, a VM exit under virtualisation):
	 * microseconds. Wake the reader only when the unread data crosses
	 * WAKEUP_BYTES; it also polls every few milliseconds. */
	__u64 unread = bpf_ringbuf_query(&flow_events, BPF_RB_AVAIL_DATA);
	__u64 flags = unread >= WAKEUP_BYTES && unread < WAKEUP_BYTES + sizeof(*e) + 8 ? BPF_RB_FORCE_WAKEUP
										      : BPF_RB_NO_WAKEUP;
	bpf_ringbuf_submit(e, flags);
}

/* The connection's `conntrack` entry as the caller found it. */
struct ct_found {
	struct ct_value *v;
	int looked_up; /* v is the lookup's answer (NULL: none) */
};

/* Tracks an allowed packet (a `conntrack` entry per direction of a
 * connection) and makes its flow records: NEW for the first packet, UPDATE
 * with the packets and bytes since the last record once per report interval
 * or on FIN/RST. A connection is counted at the hook that first saw it, so a
 * packet crossing two hooks (XDP in, TCX out) is counted once. The clock is
 * read once per tick per connection (jiffies, inlined by the verifier, tell
 * when; a clock read is a helper call): last-seen refreshes and reports are
 * at most a tick late. Returns the entry, or NULL when it was just made (or
 * is not tracked). */
static __always_inline struct ct_value *flow_allowed(struct pkt *p, __u32 ifindex, __u8 dir, __u8 verdict,
						     __u32 rule_id, int reply, struct ct_found found)
{
	if (!tracked_protocol(p->t.protocol))
		return 0;
	struct flow_config *cfg = flow_config_get();
	if (!cfg)
		return 0;
	struct ct_value *v = found.looked_up ? found.v : bpf_map_lookup_elem(&conntrack, &p->t);
	if (!v) {
		__u64 now = bpf_ktime_get_ns();
		struct record r = {
			.now = now,
			.ifindex = ifindex,
			.rule_id = rule_id,
			.verdict = verdict,
			.dir = dir,
			.tcp_flags = p->tcp_flags,
		};
		struct ct_value nv = {
			.last_seen_ns = now,
			.report_ns = now,
			.packets = 1,
			.bytes = p->len,
			.reported_packets = 1,
			.reported_bytes = p->len,
			.rule_id = rule_id,
			.ifindex = ifindex,
			.dir = dir,
			.flags = reply ? CT_F_REPLY : 0,
			.check_jiffies = bpf_jiffies64(),
		};
		if (bpf_map_update_elem(&conntrack, &p->t, &nv, BPF_NOEXIST) == 0) {
			if (!cfg->disabled) {
				r.kind = FLOW_NEW;
				r.packets = 1;
				r.bytes = p->len;
				emit(&p->t, &r);
			}
			return 0;
		}
		/* Another CPU made it first. */
		v = bpf_map_lookup_elem(&conntrack, &p->t);
		if (!v)
			return 0;
	}
	if (!reply && (v->flags & CT_F_REPLY))
		v->flags = 0; /* the policy now allows this direction by itself */
	int fin = p->tcp_flags & (TCP_FIN | TCP_RST);
	__u64 tick = bpf_jiffies64();
	int timed = fin || tick != v->check_jiffies;
	__u64 now = 0;
	if (timed) {
		v->check_jiffies = tick;
		now = bpf_ktime_get_ns();
		if (now - v->last_seen_ns >= CT_REFRESH_NS)
			v->last_seen_ns = now;
	}
	/* Without flow records, conntrack is only for replies: no accounting. */
	if (cfg->disabled || v->ifindex != ifindex || v->dir != dir)
		return v;
	__sync_fetch_and_add(&v->packets, 1);
	__sync_fetch_and_add(&v->bytes, p->len);
	if (p->tcp_flags)
		__sync_fetch_and_or(&v->tcp_flags, p->tcp_flags);
	if (!timed)
		return v;
	__u64 interval = cfg->report_interval_ns ? cfg->report_interval_ns : DEFAULT_REPORT_INTERVAL_NS;
	__u64 last = v->report_ns;
	if (!fin && now - last < interval)
		return v;
	/* One CPU makes the record. */
	if (__sync_val_compare_and_swap(&v->report_ns, last, now) != last)
		return v;
	__u64 packets = v->packets, bytes = v->bytes;
	struct record r = {
		.now = now,
		.ifindex = ifindex,
		.verdict = verdict,
		.dir = dir,
	};
	r.kind = FLOW_UPDATE;
	r.packets = packets - v->reported_packets;
	r.bytes = bytes - v->reported_bytes;
	v->reported_packets = packets;
	v->reported_bytes = bytes;
	r.tcp_flags = __sync_lock_test_and_set(&v->tcp_flags, 0);
	r.rule_id = v->rule_id;
	emit(&p->t, &r);
	return v;
}

static __always_inline __u32 rotl32(__u32 x, int r)
{
	return (x << r) | (x >> (32 - r));
}

/* MurmurHash3 (x86, 32-bit) over the words of a drop key: its slot in
 * `drop_slots`. (A word-wise FNV is not enough: a multiply only carries
 * differences upwards, so the ports and the address's last byte, all in
 * the top bytes of their words, would share 256 slots.) */
static __always_inline __u32 drop_slot_of(const struct drop_key *k)
{
	const __u32 *w = (const __u32 *)k;
	__u32 h = 0;
#pragma unroll
	for (int i = 0; i < (int)(sizeof(*k) / 4); i++) {
		__u32 x = w[i] * 0xcc9e2d51;
		x = rotl32(x, 15) * 0x1b873593;
		h = rotl32(h ^ x, 13) * 5 + 0xe6546b64;
	}
	h ^= sizeof(*k);
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h & (DROP_SLOTS - 1);
}

static __always_inline int same_drop_key(const struct drop_key *a, const struct drop_key *b)
{
	const __u32 *x = (const __u32 *)a, *y = (const __u32 *)b;
	__u32 diff = 0;
#pragma unroll
	for (int i = 0; i < (int)(sizeof(*a) / 4); i++)
		diff |= x[i] ^ y[i];
	return diff == 0;
}

/* Takes one drop record from this CPU's budget; false (and counted) when
 * the rate limit is spent. `*suppressed` gets the records not made since
 * this CPU's last one. */
static __always_inline int take_drop_budget(struct flow_config *cfg, __u64 now, __u32 *suppressed)
{
	__u32 zero = 0;
	struct drop_budget *b = bpf_map_lookup_elem(&drop_budget, &zero);
	if (!b)
		return 0;
	if (now - b->window_start_ns >= DROP_BUDGET_WINDOW_NS) {
		b->window_start_ns = now;
		b->used = 0;
	}
	__u32 limit = cfg->drop_records_per_sec ? cfg->drop_records_per_sec : DEFAULT_DROP_RECORDS_PER_SEC;
	if (b->used >= limit) {
		b->suppressed++;
		count_flow(FLOW_SUPPRESSED_DROP);
		return 0;
	}
	b->used++;
	*suppressed = b->suppressed;
	b->suppressed = 0;
	return 1;
}

/* Makes the drop records of a packet: drops of one flow within the window
 * are added to the flow's next record; drop records are limited per CPU
 * per second (the next record says how many were not made). Windows use
 * the coarse clock (a tick is plenty for a one-second window). */
static __always_inline void flow_dropped(struct pkt *p, __u32 ifindex, __u8 dir, __u32 rule_id, __u8 reason)
{
	struct flow_config *cfg = flow_config_get();
	if (!cfg || cfg->disabled)
		return;
	__u64 now = bpf_ktime_get_coarse_ns();
	struct drop_key k = { .ifindex = ifindex, .dir = dir };
	__builtin_memcpy(&k.tuple, &p->t, sizeof(k.tuple));
	/* A flood repeats one flow: try this CPU's last slot before hashing. */
	__u32 zero = 0;
	struct drop_budget *b = bpf_map_lookup_elem(&drop_budget, &zero);
	if (!b)
		return;
	__u32 idx = b->last_slot & (DROP_SLOTS - 1);
	struct drop_slot *s = bpf_map_lookup_elem(&drop_slots, &idx);
	if (!s)
		return;
	int same = same_drop_key(&s->key, &k);
	if (!same) {
		idx = drop_slot_of(&k);
		b->last_slot = idx;
		s = bpf_map_lookup_elem(&drop_slots, &idx);
		if (!s)
			return;
		same = same_drop_key(&s->key, &k);
	}
	__u64 window = cfg->drop_window_ns ? cfg->drop_window_ns : DEFAULT_DROP_WINDOW_NS;
	if (same && now - s->last_record_ns < window) {
		s->packets++;
		s->bytes += p->len;
		return;
	}
	struct record r = {
		.now = bpf_ktime_get_ns(),
		.kind = FLOW_DROP,
		.verdict = FLOW_DROPPED,
	};
	if (!same && s->packets) {
		/* Another flow's drops still wait in this slot: they get their
		 * record before the slot changes hands. */
		if (!take_drop_budget(cfg, now, &r.suppressed)) {
			__u32 slot = FLOW_UNRECORDED_DROP;
			__u64 *c = bpf_map_lookup_elem(&flow_counters, &slot);
			if (c)
				__sync_fetch_and_add(c, s->packets);
		} else {
			r.packets = s->packets;
			r.bytes = s->bytes;
			r.ifindex = s->key.ifindex;
			r.dir = s->key.dir;
			r.rule_id = s->rule_id;
			r.drop_reason = s->drop_reason;
			r.tcp_flags = s->tcp_flags;
			emit(&s->key.tuple, &r);
		}
	}
	if (!same) {
		__builtin_memcpy(&s->key, &k, sizeof(k));
		s->last_record_ns = 0;
		s->packets = 0;
		s->bytes = 0;
	}
	s->rule_id = rule_id;
	s->drop_reason = reason;
	s->tcp_flags = p->tcp_flags;
	if (!take_drop_budget(cfg, now, &r.suppressed)) {
		/* Over the limit: the drop waits in the flow's slot. */
		s->packets++;
		s->bytes += p->len;
		return;
	}
	r.packets = 1 + s->packets;
	r.bytes = p->len + s->bytes;
	r.ifindex = ifindex;
	r.dir = dir;
	r.rule_id = rule_id;
	r.drop_reason = reason;
	r.tcp_flags = p->tcp_flags;
	s->last_record_ns = now;
	s->packets = 0;
	s->bytes = 0;
	emit(&p->t, &r);
}

/* Results of policy_check. */
enum { CHECK_DROP = 0, CHECK_ALLOW = 1, CHECK_REPLY = 2 };

/* Rule ids with this bit set name a default deny (see src/mesh/policy.rs). */
#define RULE_DEFAULT_BIT 0x80000000u

/* Runs the policy of (ifindex, dir) on `p`, counting drops and rule hits
 * and making drop records. The deciding rule goes to *rule_id. */
static __always_inline int policy_check(__u32 ifindex, __u8 dir, struct pkt *p, __u32 *rule_id)
{
	*rule_id = 0;
	int action = policy_decide(ifindex, dir, p, rule_id);
	if (action == ACTION_DENY) {
		int by_default = *rule_id & RULE_DEFAULT_BIT;
		/* Default deny lets replies of tracked connections through;
		 * an explicit deny does not. */
		if (by_default && is_reply(p))
			return CHECK_REPLY;
		add_stats(&verdict_stats, dir * VERDICT_MAX + (by_default ? VERDICT_DROP_DEFAULT : VERDICT_DROP_RULE),
			  p->len);
		add_keyed_stats(&rule_stats, *rule_id, p->len);
		add_iface_drop(ifindex, dir, p->len);
		__u8 reason = !*rule_id ? DROP_NO_RULE_SET : by_default ? DROP_DEFAULT_DENY : DROP_POLICY_DENY;
		flow_dropped(p, ifindex, dir, *rule_id, reason);
		return CHECK_DROP;
	}
	if (action == ACTION_ALLOW && *rule_id)
		add_keyed_stats(&rule_stats, *rule_id, p->len);
	return CHECK_ALLOW;
}

static __always_inline void count_pass(__u8 dir, int check, __u32 len)
{
	add_stats(&verdict_stats, dir * VERDICT_MAX + (check == CHECK_REPLY ? VERDICT_REPLY : VERDICT_PASS), len);
}

/* Decrements the TTL of the IPv4 header at `ip`, fixing its checksum
 * incrementally (RFC 1624; the kernel's ip_decrease_ttl). */
static __always_inline void ipv4_decrease_ttl(struct iphdr *ip)
{
	__u32 check = ip->check;
	check += bpf_htons(0x0100);
	ip->check = (__u16)(check + (check >= 0xFFFF));
	ip->ttl--;
}

/* Whether a policy applies to `family` packets on (ifindex, dir): every
 * policy has a /0 entry per family there (its default), which a lookup
 * of the key's first 64 bits finds. */
static __always_inline int policy_applies(__u32 ifindex, __u8 dir, __u8 family)
{
	struct policy_peer_key pk = {};
	pk.prefixlen = 64;
	pk.ifindex = ifindex;
	pk.dir = dir;
	pk.family = family;
	return bpf_map_lookup_elem(&policy_peers, &pk) != 0;
}

/* An IP packet that could not be classified: dropped (and counted under
 * its own reason) where a policy applies — never passed unseen by the
 * policy — and passed where none does. Returns 1 to drop. */
static __always_inline int unclassified(__u32 ifindex, __u8 dir, struct pkt *p)
{
	if (!policy_applies(ifindex, dir, p->t.family)) {
		count_pass(dir, CHECK_ALLOW, p->len);
		return 0;
	}
	add_stats(&verdict_stats, dir * VERDICT_MAX + VERDICT_DROP_UNPARSEABLE, p->len);
	add_iface_drop(ifindex, dir, p->len);
	flow_dropped(p, ifindex, dir, 0, DROP_UNPARSEABLE);
	return 1;
}

/* ---- The established-flow fast path ----
 *
 * A connection's `conntrack` entry caches, per direction, what the hook
 * decided for it: the verdict, the rules counted and the route's next hop.
 * A packet of a known connection that opens or closes nothing takes that
 * decision with one hash lookup instead of up to five LPM walks. The
 * decision is used only under the generation it was made under: bpfsync
 * bumps `datapath_generation` after every write to the policy or route
 * tables, so a packet gets the decision of the tables as they were before or
 * after a change (never a stale one once the change is complete). SYN, FIN
 * and RST, new connections, untracked protocols and expiring TTLs take the
 * full path; a decision that rested on a tracked reply is re-checked every
 * tick. */

#define TCP_SYN 0x02

static __always_inline __u64 datapath_generation_now(void)
{
	__u32 zero = 0;
	__u64 *g = bpf_map_lookup_elem(&datapath_generation, &zero);
	return g ? *g : 0;
}

/* Whether a packet may use a cached decision at all. */
static __always_inline int fast_path_candidate(struct pkt *p)
{
	if (!tracked_protocol(p->t.protocol))
		return 0;
	return p->t.protocol != IPPROTO_TCP || !(p->tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST));
}

/* Copies the decision cached for (dir, ifindex) under generation `gen` to
 * *out: 1 when there is one. A seqlock read: the slot's generation before
 * and after the copy must agree (atomic reads, full barriers on every
 * architecture, keep the copy between them). */
static __always_inline int decision_get(struct ct_value *v, __u8 dir, __u32 ifindex, __u64 gen,
					struct ct_decision *out)
{
	struct ct_decision *d = &v->decision[dir & 1];
	__u64 want = gen + CT_DECISION_GEN_BASE;
	if (__sync_fetch_and_add(&d->generation, 0) != want)
		return 0;
	__builtin_memcpy(out, d, sizeof(*out));
	if (__sync_fetch_and_add(&d->generation, 0) != want)
		return 0;
	return out->ifindex == ifindex;
}

/* Caches `nd` as the decision of its direction under `gen` (read before the
 * tables were). One writer at a time takes the slot (compare-and-swap to
 * CT_DECISION_WRITING); another that finds it taken leaves it. */
static __always_inline void decision_put(struct ct_value *v, __u8 dir, __u64 gen, const struct ct_decision *nd)
{
	if (!v)
		return;
	struct ct_decision *d = &v->decision[dir & 1];
	__u64 old = d->generation;
	if (old == CT_DECISION_WRITING || __sync_val_compare_and_swap(&d->generation, old, CT_DECISION_WRITING) != old)
		return;
	d->ifindex = nd->ifindex;
	d->rule_id = nd->rule_id;
	d->out_rule_id = nd->out_rule_id;
	__builtin_memcpy(&d->route, &nd->route, sizeof(d->route));
	d->verdict = nd->verdict;
	d->reply = nd->reply;
	__sync_lock_test_and_set(&d->generation, gen + CT_DECISION_GEN_BASE);
}

/* A cached decision that let a reply through holds while the connection it
 * replies to is tracked: checked once per tick. */
static __always_inline int reply_still_holds(struct ct_value *v, struct pkt *p)
{
	return bpf_jiffies64() == v->check_jiffies || is_reply(p);
}

/* Looks for the cached decision of a packet on (ifindex, dir): 1 and *d
 * when it can be used; `found` gets the conntrack lookup either way. */
static __always_inline int cached_decision(struct pkt *p, __u32 ifindex, __u8 dir, __u64 gen, struct ct_found *found,
					   struct ct_decision *d)
{
	if (!fast_path_candidate(p))
		return 0;
	found->v = bpf_map_lookup_elem(&conntrack, &p->t);
	found->looked_up = 1;
	if (!found->v || !decision_get(found->v, dir, ifindex, gen, d))
		return 0;
	if (d->verdict == VERDICT_FORWARD && p->ttl <= 1)
		return 0;
	return !d->reply || reply_still_holds(found->v, p);
}

/* Routes a packet allowed on both interfaces: TTL / hop limit, MACs,
 * counters, flow record, redirect. *v gets the conntrack entry. */
static __always_inline int forward(struct xdp_md *ctx, struct pkt *p, __u32 in_ifindex, const struct route_value *r,
				   __u32 record_rule_id, int reply, struct ct_found found, struct ct_value **v)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return XDP_PASS;
	if (p->t.family == 4) {
		struct iphdr *iph = (void *)(eth + 1);
		if ((void *)(iph + 1) > data_end)
			return XDP_PASS;
		ipv4_decrease_ttl(iph);
	} else {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > data_end)
			return XDP_PASS;
		ip6->hop_limit--;
	}
	__builtin_memcpy(eth->h_dest, r->dst_mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, r->src_mac, ETH_ALEN);
	add_stats(&verdict_stats, DIR_INGRESS * VERDICT_MAX + VERDICT_FORWARD, p->len);
	add_keyed_stats(&route_stats, r->route_id, p->len);
	*v = flow_allowed(p, in_ifindex, DIR_INGRESS, FLOW_REDIRECTED, record_rule_id, reply, found);
	__u32 zero = 0;
	struct redirect_slot *slot = bpf_map_lookup_elem(&redirect_slot, &zero);
	if (slot) {
		slot->in_ifindex = in_ifindex;
		slot->to_ifindex = r->ifindex;
		slot->route_id = r->route_id;
		slot->len = p->len;
	}
	return bpf_redirect(r->ifindex, 0);
}

/* The fast path of `mesh_ingress`: what the full path below does for the
 * same decision. */
static __always_inline int ingress_cached(struct xdp_md *ctx, struct pkt *p, __u32 in_ifindex,
					  const struct ct_decision *d, struct ct_found found)
{
	if (d->rule_id)
		add_keyed_stats(&rule_stats, d->rule_id, p->len);
	if (d->verdict != VERDICT_FORWARD) {
		count_pass(DIR_INGRESS, d->verdict == VERDICT_REPLY ? CHECK_REPLY : CHECK_ALLOW, p->len);
		flow_allowed(p, in_ifindex, DIR_INGRESS, FLOW_FORWARDED, 0, d->reply, found);
		return XDP_PASS;
	}
	if (d->out_rule_id)
		add_keyed_stats(&rule_stats, d->out_rule_id, p->len);
	struct ct_value *v = 0;
	return forward(ctx, p, in_ifindex, &d->route, 0, d->reply, found, &v);
}

/* The rule a check counted in `rule_stats` (policy_check): an allowing
 * rule, not a default deny a reply passed. */
static __always_inline __u32 counted_rule(int check, __u32 rule_id)
{
	return check == CHECK_ALLOW ? rule_id : 0;
}

SEC("xdp")
int mesh_ingress(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct pkt p = {};
	p.len = data_end - data;
	int parsed = parse(data, data_end, &p);
	add_stats(&mesh_stats, DIR_INGRESS * PROTO_MAX + p.proto_slot, p.len);
	__u32 in_ifindex = ctx->ingress_ifindex, rule_id = 0;
	if (parsed == NOT_IP) {
		count_pass(DIR_INGRESS, CHECK_ALLOW, p.len);
		return XDP_PASS;
	}
	/* XDP frames are linear: what is not there is not in the packet. */
	if (parsed == UNPARSEABLE)
		return unclassified(in_ifindex, DIR_INGRESS, &p) ? XDP_DROP : XDP_PASS;
	/* Read before any table: a decision made from tables that change
	 * meanwhile is cached under the generation they are leaving. */
	__u64 gen = datapath_generation_now();
	struct ct_found found = {};
	struct ct_decision d;
	if (cached_decision(&p, in_ifindex, DIR_INGRESS, gen, &found, &d))
		return ingress_cached(ctx, &p, in_ifindex, &d, found);

	int check = policy_check(in_ifindex, DIR_INGRESS, &p, &rule_id);
	if (check == CHECK_DROP)
		return XDP_DROP;
	struct ct_decision nd = {
		.ifindex = in_ifindex,
		.rule_id = counted_rule(check, rule_id),
		.verdict = check == CHECK_REPLY ? VERDICT_REPLY : VERDICT_PASS,
		.reply = check == CHECK_REPLY,
	};

	struct route_key rk = { .prefixlen = 32 + (p.t.family == 4 ? 32 : 128), .family = p.t.family };
	__builtin_memcpy(rk.addr, p.t.daddr, 16);
	struct route_value *r = bpf_map_lookup_elem(&mesh_routes, &rk);
	if (!r || p.ttl <= 1) {
		/* No route, or the TTL expires here (the stack sends the ICMP
		 * time exceeded). */
		if (r)
			add_stats(&verdict_stats, DIR_INGRESS * VERDICT_MAX + VERDICT_TTL_EXCEEDED, p.len);
		else
			count_pass(DIR_INGRESS, check, p.len);
		struct ct_value *v =
			flow_allowed(&p, in_ifindex, DIR_INGRESS, FLOW_FORWARDED, rule_id, check == CHECK_REPLY, found);
		if (!r)
			decision_put(v, DIR_INGRESS, gen, &nd);
		return XDP_PASS;
	}
	/* The redirect bypasses the stack's egress (and `mesh_egress`): the
	 * outgoing interface's egress policy is checked here. */
	__u32 out_rule_id = 0;
	int out_check = policy_check(r->ifindex, DIR_EGRESS, &p, &out_rule_id);
	if (out_check == CHECK_DROP)
		return XDP_DROP;
	nd.out_rule_id = counted_rule(out_check, out_rule_id);
	nd.verdict = VERDICT_FORWARD;
	nd.reply = check == CHECK_REPLY || out_check == CHECK_REPLY;
	__builtin_memcpy(&nd.route, r, sizeof(nd.route));
	struct ct_value *v = 0;
	/* The record names the rule that let it in, else the one that let it out. */
	int action = forward(ctx, &p, in_ifindex, &nd.route, rule_id ? rule_id : out_rule_id, nd.reply, found, &v);
	decision_put(v, DIR_INGRESS, gen, &nd);
	return action;
}

/* `xdp:xdp_redirect_err` (include/trace/events/xdp.h): for a redirect
 * without a map, `to_ifindex` is the target. */
struct xdp_redirect_err_args {
	__u64 common;
	int prog_id;
	__u32 act;
	int ifindex;
	int err;
	int to_ifindex;
	__u32 map_id;
	int map_index;
};

SEC("tracepoint/xdp/xdp_redirect_err")
int mesh_redirect_err(struct xdp_redirect_err_args *ctx)
{
	__u32 zero = 0;
	struct redirect_slot *slot = bpf_map_lookup_elem(&redirect_slot, &zero);
	/* Another program's failed redirect on this CPU does not match ours. */
	if (!slot || !slot->in_ifindex || slot->in_ifindex != (__u32)ctx->ifindex ||
	    slot->to_ifindex != (__u32)ctx->to_ifindex)
		return 0;
	add_keyed_stats(&route_redirect_errors, slot->route_id, slot->len);
	slot->in_ifindex = 0;
	return 0;
}

/* Bytes pulled into the linear area when the headers are not all there:
 * Ethernet, IPv6 and a chain of extension headers, the transport header. */
#define EGRESS_PULL_LEN 256

/* The TCX section name (libbpf >= 1.3): a TC program for the egress hook.
 * bpfsync's loader hands it to aya under aya's name for it
 * (`object::for_aya`). */
SEC("tcx/egress")
int mesh_egress(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct pkt p = {};
	p.len = skb->len;
	int parsed = parse(data, data_end, &p);
	if (parsed == UNPARSEABLE && skb->len > data_end - data) {
		/* The headers may lie beyond the linear part of the skb (GSO,
		 * fragments in pages): pull them in and read again. */
		__u32 want = skb->len < EGRESS_PULL_LEN ? skb->len : EGRESS_PULL_LEN;
		if (bpf_skb_pull_data(skb, want) == 0) {
			data = (void *)(long)skb->data;
			data_end = (void *)(long)skb->data_end;
			__builtin_memset(&p, 0, sizeof(p));
			p.len = skb->len;
			parsed = parse(data, data_end, &p);
		}
	}
	add_stats(&mesh_stats, DIR_EGRESS * PROTO_MAX + p.proto_slot, p.len);
	if (parsed == NOT_IP) {
		count_pass(DIR_EGRESS, CHECK_ALLOW, p.len);
		return TC_ACT_UNSPEC;
	}
	if (parsed == UNPARSEABLE)
		return unclassified(skb->ifindex, DIR_EGRESS, &p) ? TC_ACT_SHOT : TC_ACT_UNSPEC;
	__u64 gen = datapath_generation_now();
	struct ct_found found = {};
	struct ct_decision d;
	/* TCX_NEXT (TC_ACT_UNSPEC): later programs of the chain still run. */
	if (cached_decision(&p, skb->ifindex, DIR_EGRESS, gen, &found, &d)) {
		if (d.rule_id)
			add_keyed_stats(&rule_stats, d.rule_id, p.len);
		count_pass(DIR_EGRESS, d.verdict == VERDICT_REPLY ? CHECK_REPLY : CHECK_ALLOW, p.len);
		flow_allowed(&p, skb->ifindex, DIR_EGRESS, FLOW_FORWARDED, 0, d.reply, found);
		return TC_ACT_UNSPEC;
	}
	__u32 rule_id = 0;
	int check = policy_check(skb->ifindex, DIR_EGRESS, &p, &rule_id);
	if (check == CHECK_DROP)
		return TC_ACT_SHOT;
	count_pass(DIR_EGRESS, check, p.len);
	struct ct_value *v =
		flow_allowed(&p, skb->ifindex, DIR_EGRESS, FLOW_FORWARDED, rule_id, check == CHECK_REPLY, found);
	struct ct_decision nd = {
		.ifindex = skb->ifindex,
		.rule_id = counted_rule(check, rule_id),
		.verdict = check == CHECK_REPLY ? VERDICT_REPLY : VERDICT_PASS,
		.reply = check == CHECK_REPLY,
	};
	decision_put(v, DIR_EGRESS, gen, &nd);
	return TC_ACT_UNSPEC;
}

char LICENSE[] SEC("license") = "GPL";

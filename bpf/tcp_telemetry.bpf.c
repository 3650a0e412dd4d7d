// SPDX-License-Identifier: GPL-2.0
/* TCP telemetry of locally terminated connections, per watched prefix.
 *
 * Six tracepoint programs share `tcp_rtt`'s maps (`share-maps:`):
 *   tcp_rtt             tcp:tcp_probe            smoothed RTT histogram
 *   tcp_retransmits     tcp:tcp_retransmit_skb   retransmitted segments
 *   tcp_congestion      tcp:tcp_cong_state_set   CWR / recovery / loss entries
 *   tcp_lifecycle       sock:inet_sock_set_state opened, closed, failed
 *                                                connects, connect latency
 *   tcp_resets_received tcp:tcp_receive_reset
 *   tcp_resets_sent     tcp:tcp_send_reset
 * Every event is charged to the slot of its remote address in
 * `watch_prefixes` (slot 0 when no prefix covers it) in the per-CPU
 * `tcp_stats`. Nothing goes to user space per event.
 *
 * The tracepoints' records are read through CO-RE: the structs below name
 * the kernel's `trace_event_raw_*` types and the loader relocates each
 * field to its offset in the running kernel (they moved between
 * versions: `kfree_skb` grew `rx_sk` in 6.12, for one). */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "bpfsync.h"

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6

/* include/net/tcp_states.h */
enum {
	TCP_ESTABLISHED = 1,
	TCP_SYN_SENT = 2,
	TCP_SYN_RECV = 3,
	TCP_CLOSE = 7,
	TCP_LISTEN = 10,
};

/* include/net/inet_connection_sock.h, enum tcp_ca_state */
enum {
	TCP_CA_CWR = 2,
	TCP_CA_RECOVERY = 3,
	TCP_CA_LOSS = 4,
};

/* include/trace/events/tcp.h: addresses as `struct sockaddr_in6`-sized
 * storage (family first; IPv4 at byte 4, IPv6 at byte 8). */
struct trace_event_raw_tcp_probe {
	__u8 saddr[28];
	__u8 daddr[28];
	__u32 srtt; /* tp->srtt_us >> 3: microseconds */
} __attribute__((preserve_access_index));

struct trace_event_raw_tcp_retransmit_skb {
	__u16 family;
	__u8 daddr[4];
	__u8 daddr_v6[16];
} __attribute__((preserve_access_index));

struct trace_event_raw_tcp_cong_state_set {
	__u16 family;
	__u8 daddr[4];
	__u8 daddr_v6[16];
	__u8 cong_state;
} __attribute__((preserve_access_index));

/* `tcp_receive_reset` is of the `tcp_event_sk` class. */
struct trace_event_raw_tcp_event_sk {
	__u16 family;
	__u8 daddr[4];
	__u8 daddr_v6[16];
} __attribute__((preserve_access_index));

struct trace_event_raw_tcp_send_reset {
	__u8 daddr[28];
} __attribute__((preserve_access_index));

/* include/trace/events/sock.h */
struct trace_event_raw_inet_sock_set_state {
	const void *skaddr;
	int oldstate;
	int newstate;
	__u16 family;
	__u16 protocol;
	__u8 daddr[4];
	__u8 daddr_v6[16];
} __attribute__((preserve_access_index));

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct watch_key);
	__type(value, __u32);
} watch_prefixes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, WATCH_SLOTS);
	__type(key, __u32);
	__type(value, struct watch_name);
} watch_names SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, WATCH_SLOTS);
	__type(key, __u32);
	__type(value, struct tcp_watch_stats);
} tcp_stats SEC(".maps");

/* Socket → when its SYN left. LRU: a socket whose close the program
 * misses (a full map elsewhere, a kernel path without the tracepoint)
 * must not keep its entry for ever. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, __u64);
} connect_start SEC(".maps");

static __always_inline struct tcp_watch_stats *slot_of(struct watch_key *key)
{
	__u32 slot = 0;
	__u32 *found = bpf_map_lookup_elem(&watch_prefixes, key);
	if (found && *found < WATCH_SLOTS)
		slot = *found;
	return bpf_map_lookup_elem(&tcp_stats, &slot);
}

/* A key for an IPv4 address: ::ffff:a.b.c.d, all 128 bits. */
static __always_inline void key_v4(struct watch_key *key, const __u8 *addr4)
{
	__builtin_memset(key, 0, sizeof(*key));
	key->prefixlen = 128;
	key->addr[10] = 0xff;
	key->addr[11] = 0xff;
	bpf_probe_read_kernel(&key->addr[12], 4, addr4);
}

static __always_inline void key_v6(struct watch_key *key, const __u8 *addr6)
{
	key->prefixlen = 128;
	bpf_probe_read_kernel(key->addr, 16, addr6);
}

/* The remote end of a `family, daddr, daddr_v6` record. */
static __always_inline struct tcp_watch_stats *remote_slot(__u16 family, const __u8 *daddr, const __u8 *daddr_v6)
{
	struct watch_key key = {};
	if (family == AF_INET)
		key_v4(&key, daddr);
	else if (family == AF_INET6)
		key_v6(&key, daddr_v6);
	else
		return 0;
	return slot_of(&key);
}

/* The remote end of a sockaddr-shaped record. */
static __always_inline struct tcp_watch_stats *sockaddr_slot(const __u8 *storage)
{
	__u16 family = 0;
	bpf_probe_read_kernel(&family, sizeof(family), storage);
	struct watch_key key = {};
	if (family == AF_INET)
		key_v4(&key, storage + 4);
	else if (family == AF_INET6)
		key_v6(&key, storage + 8);
	else
		return 0;
	return slot_of(&key);
}

static __always_inline __u32 log2_bucket(__u64 v)
{
	__u32 r = 0;
#pragma unroll
	for (int shift = 32; shift > 0; shift /= 2) {
		if (v >= ((__u64)1 << shift)) {
			v >>= shift;
			r += shift;
		}
	}
	return r < TELEMETRY_BUCKETS ? r : TELEMETRY_BUCKETS - 1;
}

SEC("tracepoint/tcp/tcp_probe")
int tcp_rtt(struct trace_event_raw_tcp_probe *ctx)
{
	__u32 srtt = ctx->srtt;
	if (srtt == 0) /* no RTT sample yet */
		return 0;
	struct tcp_watch_stats *s = sockaddr_slot(ctx->daddr);
	if (!s)
		return 0;
	/* Per-CPU and tracing programs do not nest on one CPU: plain adds. */
	s->rtt_buckets[log2_bucket(srtt)] += 1;
	s->rtt_sum_us += srtt;
	s->rtt_samples += 1;
	return 0;
}

SEC("tracepoint/tcp/tcp_retransmit_skb")
int tcp_retransmits(struct trace_event_raw_tcp_retransmit_skb *ctx)
{
	struct tcp_watch_stats *s = remote_slot(ctx->family, ctx->daddr, ctx->daddr_v6);
	if (s)
		s->retransmits += 1;
	return 0;
}

SEC("tracepoint/tcp/tcp_cong_state_set")
int tcp_congestion(struct trace_event_raw_tcp_cong_state_set *ctx)
{
	__u8 state = ctx->cong_state;
	if (state != TCP_CA_CWR && state != TCP_CA_RECOVERY && state != TCP_CA_LOSS)
		return 0;
	struct tcp_watch_stats *s = remote_slot(ctx->family, ctx->daddr, ctx->daddr_v6);
	if (!s)
		return 0;
	if (state == TCP_CA_CWR)
		s->cong_cwr += 1;
	else if (state == TCP_CA_RECOVERY)
		s->cong_recovery += 1;
	else
		s->cong_loss += 1;
	return 0;
}

SEC("tracepoint/sock/inet_sock_set_state")
int tcp_lifecycle(struct trace_event_raw_inet_sock_set_state *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return 0;
	int old = ctx->oldstate, new = ctx->newstate;
	__u64 sk = (__u64)ctx->skaddr;
	if (new == TCP_SYN_SENT) {
		__u64 now = bpf_ktime_get_ns();
		bpf_map_update_elem(&connect_start, &sk, &now, BPF_ANY);
		return 0;
	}
	int opened_active = old == TCP_SYN_SENT && new == TCP_ESTABLISHED;
	int opened_passive = old == TCP_SYN_RECV && new == TCP_ESTABLISHED;
	int failed = old == TCP_SYN_SENT && new == TCP_CLOSE;
	/* Every connection that was established reaches CLOSE once: from
	 * FIN_WAIT2/CLOSING (into TIME_WAIT), LAST_ACK, or straight from
	 * ESTABLISHED/CLOSE_WAIT on a reset. Listeners and half-open
	 * requests are not connections. */
	int closed = new == TCP_CLOSE && old != TCP_SYN_SENT && old != TCP_SYN_RECV && old != TCP_LISTEN &&
		     old != TCP_CLOSE;
	if (!opened_active && !opened_passive && !failed && !closed)
		return 0;
	struct tcp_watch_stats *s = remote_slot(ctx->family, ctx->daddr, ctx->daddr_v6);
	if (old == TCP_SYN_SENT) {
		__u64 *start = bpf_map_lookup_elem(&connect_start, &sk);
		if (start) {
			__u64 us = (bpf_ktime_get_ns() - *start) / 1000;
			bpf_map_delete_elem(&connect_start, &sk);
			if (s && opened_active) {
				s->connect_buckets[log2_bucket(us)] += 1;
				s->connect_sum_us += us;
				s->connect_samples += 1;
			}
		}
	}
	if (!s)
		return 0;
	if (opened_active)
		s->opened_active += 1;
	else if (opened_passive)
		s->opened_passive += 1;
	else if (failed)
		s->connects_failed += 1;
	else
		s->closed += 1;
	return 0;
}

SEC("tracepoint/tcp/tcp_receive_reset")
int tcp_resets_received(struct trace_event_raw_tcp_event_sk *ctx)
{
	struct tcp_watch_stats *s = remote_slot(ctx->family, ctx->daddr, ctx->daddr_v6);
	if (s)
		s->resets_received += 1;
	return 0;
}

SEC("tracepoint/tcp/tcp_send_reset")
int tcp_resets_sent(struct trace_event_raw_tcp_send_reset *ctx)
{
	struct tcp_watch_stats *s = sockaddr_slot(ctx->daddr);
	if (s)
		s->resets_sent += 1;
	return 0;
}

char LICENSE[] SEC("license") = "GPL";

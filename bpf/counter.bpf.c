// SPDX-License-Identifier: GPL-2.0
/* `counter`: XDP per-protocol packet and byte counter.
 *
 * Counts every frame into `packet_stats[proto]` (unless
 * `counter_config[CONFIG_COUNTING]` is COUNTING_OFF: an empty spec counts)
 * and passes it, unless `counter_config[CONFIG_DROP_NON_IP]` asks to drop
 * frames that are not IP. */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "bpfsync.h"

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, PROTO_MAX);
	__type(key, __u32);
	__type(value, struct proto_stats);
} packet_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, CONFIG_MAX);
	__type(key, __u32);
	__type(value, __u32);
} counter_config SEC(".maps");

static __always_inline __u32 config(__u32 key)
{
	__u32 *v = bpf_map_lookup_elem(&counter_config, &key);
	return v ? *v : 0;
}

static __always_inline __u32 classify(void *data, void *data_end)
{
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return PROTO_NON_IP;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > data_end)
			return PROTO_OTHER;
		switch (ip->protocol) {
		case IPPROTO_ICMP: return PROTO_ICMP;
		case IPPROTO_TCP: return PROTO_TCP;
		case IPPROTO_UDP: return PROTO_UDP;
		default: return PROTO_OTHER;
		}
	}
	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > data_end)
			return PROTO_OTHER;
		switch (ip6->nexthdr) {
		case IPPROTO_ICMPV6: return PROTO_ICMPV6;
		case IPPROTO_TCP: return PROTO_TCP;
		case IPPROTO_UDP: return PROTO_UDP;
		default: return PROTO_OTHER;
		}
	}
	return PROTO_NON_IP;
}

SEC("xdp")
int xdp_counter(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 proto = classify(data, data_end);

	if (config(CONFIG_COUNTING) != COUNTING_OFF) {
		struct proto_stats *s = bpf_map_lookup_elem(&packet_stats, &proto);
		if (s) {
			__sync_fetch_and_add(&s->packets, 1);
			__sync_fetch_and_add(&s->bytes, (__u64)(data_end - data));
		}
	}
#ifdef COUNTER_VARIANT
	/* A second build of the same program with different bytecode, used by
	 * tests that replace a running program. Never true at run time. */
	if (bpf_ktime_get_ns() == 0)
		return XDP_ABORTED;
#endif
	if (proto == PROTO_NON_IP && config(CONFIG_DROP_NON_IP))
		return XDP_DROP;
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";

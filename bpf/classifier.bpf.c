// SPDX-License-Identifier: GPL-2.0
/* `classifier`: TC (TCX) classifier.
 *
 * Looks up the destination prefix in `class_prefixes`, then the protocol and
 * destination port in `class_ports` (the port wins), and writes the action's
 * mark and priority into the skb. Counts classified packets per protocol in
 * `class_stats`. Never drops: it returns TCX_NEXT so later programs and the
 * stack still see the packet. */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "bpfsync.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct class_port_key);
	__type(value, struct class_action);
} class_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct class_prefix_key);
	__type(value, struct class_action);
} class_prefixes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, PROTO_MAX);
	__type(key, __u32);
	__type(value, struct proto_stats);
} class_stats SEC(".maps");

#ifndef TCX_NEXT
#define TCX_NEXT -1
#endif

static __always_inline void apply(struct __sk_buff *skb, struct class_action *a)
{
	if (a->mark)
		skb->mark = a->mark;
	if (a->priority)
		skb->priority = a->priority;
}

/* `classifier`, not `tcx/ingress` or `tcx/egress`: the one program runs
 * on both hooks (`tc: { ingress: [classify], egress: [classify] }`), and
 * a TCX section name states one direction. */
SEC("classifier")
int tc_classify(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	__u32 slot = PROTO_OTHER;

	if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return TCX_NEXT;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return TCX_NEXT;

	struct class_prefix_key pk = { .prefixlen = 32 };
	__builtin_memcpy(pk.addr, &ip->daddr, 4);
	struct class_action *a = bpf_map_lookup_elem(&class_prefixes, &pk);
	int classified = 0;
	if (a) {
		apply(skb, a);
		classified = 1;
	}

	struct class_port_key k = { .protocol = ip->protocol };
	void *l4 = (void *)ip + ip->ihl * 4;
	if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *th = l4;
		if ((void *)(th + 1) > data_end)
			goto out;
		k.port = bpf_ntohs(th->dest);
		slot = PROTO_TCP;
	} else if (ip->protocol == IPPROTO_UDP) {
		struct udphdr *uh = l4;
		if ((void *)(uh + 1) > data_end)
			goto out;
		k.port = bpf_ntohs(uh->dest);
		slot = PROTO_UDP;
	} else if (ip->protocol == IPPROTO_ICMP) {
		slot = PROTO_ICMP;
		goto out;
	} else {
		goto out;
	}
	a = bpf_map_lookup_elem(&class_ports, &k);
	if (a) {
		apply(skb, a);
		classified = 1;
	}
out:
	if (classified) {
		struct proto_stats *s = bpf_map_lookup_elem(&class_stats, &slot);
		if (s) {
			__sync_fetch_and_add(&s->packets, 1);
			__sync_fetch_and_add(&s->bytes, skb->len);
		}
	}
	return TCX_NEXT;
}

char LICENSE[] SEC("license") = "GPL";

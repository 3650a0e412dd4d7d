// SPDX-License-Identifier: GPL-2.0
/* `skb_drops`: packets the kernel's stack dropped, by drop reason.
 *
 * `skb:kfree_skb` fires for every skb freed as a drop (a consumed skb
 * fires `skb:consume_skb` instead, on kernels >= 6.3), so it can fire at
 * the packet rate: the program does one array lookup for the filter and
 * one per-CPU add, and sends nothing to user space. User space names the
 * slots from the running kernel's BTF (`enum skb_drop_reason`), which is
 * also where the spec's reason names are resolved into `drop_filter`. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "bpfsync.h"

/* A local twin of the kernel's enum: CO-RE matches enums by name. */
enum skb_drop_reason {
	SKB_DROP_REASON_LOCAL_TWIN,
};

struct trace_event_raw_kfree_skb {
	enum skb_drop_reason reason;
} __attribute__((preserve_access_index));

/* Reasons of a subsystem carry its id in the upper 16 bits
 * (SKB_DROP_REASON_SUBSYS_MASK, include/net/dropreason.h). */
#define SUBSYS_MASK 0xffff0000

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, DROP_REASON_SLOTS);
	__type(key, __u32);
	__type(value, struct drop_filter);
} drop_filter SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, DROP_REASON_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} drop_reasons SEC(".maps");

SEC("tracepoint/skb/kfree_skb")
int skb_drops(struct trace_event_raw_kfree_skb *ctx)
{
	__u32 reason = ctx->reason;
	__u32 slot = (reason & SUBSYS_MASK) || reason >= DROP_REASON_SLOTS ? DROP_REASON_SLOTS - 1 : reason;
	struct drop_filter *f = bpf_map_lookup_elem(&drop_filter, &slot);
	if (!f || f->skip)
		return 0;
	__u64 *count = bpf_map_lookup_elem(&drop_reasons, &slot);
	if (count)
		*count += 1; /* per CPU; tracing programs do not nest on one CPU */
	return 0;
}

char LICENSE[] SEC("license") = "GPL";

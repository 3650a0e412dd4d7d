// SPDX-License-Identifier: GPL-2.0
/* XDP redirect errors and exceptions by interface.
 *
 *   xdp_redirect_errors  xdp:xdp_redirect_err  a redirect the kernel could not
 *                                              do (target gone or down, no
 *                                              XDP support, frame too big):
 *                                              by errno
 *   xdp_exceptions       xdp:xdp_exception     XDP_ABORTED or an invalid
 *                                              action: by action
 * Both count into `xdp_errors` (`xdp_exceptions` shares its maps). These
 * fire rarely on a healthy node; one hash update per event. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "bpfsync.h"

struct trace_event_raw_xdp_redirect_template {
	__u32 act;
	int ifindex;
	int err;
} __attribute__((preserve_access_index));

struct trace_event_raw_xdp_exception {
	__u32 act;
	int ifindex;
} __attribute__((preserve_access_index));

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct xdp_error_key);
	__type(value, __u64);
} xdp_errors SEC(".maps");

static __always_inline void count(__u32 ifindex, __u16 kind, __u16 code)
{
	struct xdp_error_key key = { .ifindex = ifindex, .kind = kind, .code = code };
	__u64 *n = bpf_map_lookup_elem(&xdp_errors, &key);
	if (n) {
		__sync_fetch_and_add(n, 1);
		return;
	}
	__u64 one = 1;
	/* Another CPU may have made it meanwhile: then add to theirs. A full
	 * map (4,096 interface × error pairs) loses the count. */
	if (bpf_map_update_elem(&xdp_errors, &key, &one, BPF_NOEXIST) != 0) {
		n = bpf_map_lookup_elem(&xdp_errors, &key);
		if (n)
			__sync_fetch_and_add(n, 1);
	}
}

SEC("tracepoint/xdp/xdp_redirect_err")
int xdp_redirect_errors(struct trace_event_raw_xdp_redirect_template *ctx)
{
	int err = ctx->err;
	count((__u32)ctx->ifindex, XDP_ERR_REDIRECT, (__u16)(err < 0 ? -err : err));
	return 0;
}

SEC("tracepoint/xdp/xdp_exception")
int xdp_exceptions(struct trace_event_raw_xdp_exception *ctx)
{
	count((__u32)ctx->ifindex, XDP_ERR_EXCEPTION, (__u16)ctx->act);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";

// SPDX-License-Identifier: GPL-2.0
/* `syscall_enter` / `syscall_exit`: syscall latency histogram.
 *
 * `raw_syscalls/sys_enter` stores the entry time per thread; `sys_exit`
 * takes it out and counts the latency into the log2 histogram
 * `latency_hist`. When `latency_config[0]` is non-zero only that process
 * (tgid) is measured. Both programs must share maps (`share-maps:`). */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "bpfsync.h"

/* Thread id → when its current syscall entered. LRU: a thread's last
 * syscall (`exit`) enters and never returns, so every thread that ends
 * leaves its entry behind; a plain hash would fill after 16,384 of them
 * and measure nothing more. The least recently used entries go first. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, __u64);
} syscall_start SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, LATENCY_BUCKETS);
	__type(key, __u32);
	__type(value, __u64);
} latency_hist SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} latency_config SEC(".maps");

static __always_inline int wanted(__u64 pid_tgid)
{
	__u32 zero = 0;
	__u32 *tgid = bpf_map_lookup_elem(&latency_config, &zero);
	return !tgid || *tgid == 0 || *tgid == (__u32)(pid_tgid >> 32);
}

static __always_inline __u32 log2_u64(__u64 v)
{
	__u32 r = 0;
#pragma unroll
	for (int shift = 32; shift > 0; shift /= 2) {
		if (v >= ((__u64)1 << shift)) {
			v >>= shift;
			r += shift;
		}
	}
	return r;
}

SEC("tracepoint/raw_syscalls/sys_enter")
int syscall_enter(void *ctx)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	if (!wanted(pid_tgid))
		return 0;
	__u32 tid = (__u32)pid_tgid;
	__u64 now = bpf_ktime_get_ns();
	bpf_map_update_elem(&syscall_start, &tid, &now, BPF_ANY);
	return 0;
}

SEC("tracepoint/raw_syscalls/sys_exit")
int syscall_exit(void *ctx)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)pid_tgid;
	__u64 *start = bpf_map_lookup_elem(&syscall_start, &tid);
	if (!start)
		return 0;
	__u64 delta = bpf_ktime_get_ns() - *start;
	bpf_map_delete_elem(&syscall_start, &tid);
	__u32 bucket = log2_u64(delta);
	if (bucket >= LATENCY_BUCKETS)
		bucket = LATENCY_BUCKETS - 1;
	__u64 *count = bpf_map_lookup_elem(&latency_hist, &bucket);
	if (count)
		__sync_fetch_and_add(count, 1);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";

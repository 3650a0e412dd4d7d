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
	CONFIG_ENABLED = 0, /* 0 = stop counting, anything else = count */
	CONFIG_DROP_NON_IP = 1, /* non-zero = XDP_DROP frames that are not IP */
	CONFIG_MAX = 2,
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

#endif

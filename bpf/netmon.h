/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* The one record shared by the BPF programs (netmon.bpf.c) and the extension (ext/).
 * No includes: the includer provides __u8..__u64 (vmlinux types in BPF, <linux/types.h>
 * in user space). Fixed-width fields, largest first, explicit padding. */
#ifndef NETMON_H
#define NETMON_H

#define NETMON_COMM_LEN 16
#define NETMON_ADDR_LEN 64 /* inet: 4/16 address bytes; unix: the first 64 path bytes */

/* flags */
#define NETMON_F_TRUNCATED 0x1 /* unix path longer than NETMON_ADDR_LEN: cut */
#define NETMON_F_NO_ADDR   0x2 /* the sockaddr could not be read from user memory */

/* per-CPU counters of records the kernel could not deliver */
enum netmon_drop {
	NETMON_DROP_RINGBUF_FULL = 0, /* bpf_ringbuf_reserve() failed */
	NETMON_DROP_INFLIGHT_FULL = 1, /* enter could not store its pending sockaddr */
	NETMON_DROP_NO_ENTER = 2, /* exit without a matching enter */
	NETMON_DROP_MAX = 3,
};

struct netmon_event {
	__u64 ts_ns;      /* bpf_ktime_get_boot_ns() at syscall exit */
	__u64 cgroup_id;  /* cgroup v2 id of the caller */
	__u32 pid;        /* tgid */
	__u32 tid;
	__u32 uid;
	__s32 ret;        /* connect() return value: 0 or -errno */
	__u16 family;     /* sa_family as given by the caller */
	__u16 port;       /* host byte order (inet/inet6) */
	__u16 sock_type;  /* SOCK_STREAM=1, SOCK_DGRAM=2, SOCK_RAW=3, SOCK_SEQPACKET=5; 0 unknown */
	__u16 protocol;   /* sk->sk_protocol: IPPROTO_TCP=6, IPPROTO_UDP=17, ... */
	__u16 flags;      /* NETMON_F_* */
	__u16 addr_len;   /* bytes of addr used (unix: path bytes kept) */
	__u32 _pad;
	char comm[NETMON_COMM_LEN];
	__u8 addr[NETMON_ADDR_LEN];
};

_Static_assert(sizeof(struct netmon_event) == 128, "netmon_event must be 128 bytes");

#endif

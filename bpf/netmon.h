/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* The one record shared by the BPF programs (netmon.bpf.c) and the extension (ext/), and
 * the configuration the loader writes before load.
 * No includes: the includer provides __u8..__u64 (<linux/types.h> on both sides).
 * Fixed-width fields, largest first, explicit padding; 128 bytes. */
#ifndef NETMON_H
#define NETMON_H

#define NETMON_COMM_LEN 16
#define NETMON_ADDR_LEN 48 /* inet: 4/16 address bytes, then the source; unix: the first
			     48 path bytes */

/* flags */
#define NETMON_F_TRUNCATED 0x1 /* unix: more path bytes followed the kept ones (for a
				  pathname, only if the kept bytes hold no NUL) */
#define NETMON_F_NO_ADDR   0x2 /* the sockaddr could not be read from user memory */
#define NETMON_F_NO_RESULT 0x4 /* the hook cannot know what connect() returned: ret is
				  meaningless until a TCP outcome supplies it */
#define NETMON_F_INPROGRESS 0x8 /* connect() returned -EINPROGRESS: ret then follows the
				   handshake (the store sets this flag; see ret) */
#define NETMON_F_NO_OWNER  0x10 /* accept: no process is known to own the listener (it
				   listened before netmon started and was not found then) */

enum netmon_kind {
	NETMON_KIND_CONNECT = 1,     /* a connect() attempt */
	NETMON_KIND_UDP_SEND = 2,    /* unconnected UDP datagrams to one destination */
	NETMON_KIND_TCP_OUTCOME = 3, /* how the handshake of socket sock_id ended: an update
					to that connect event, not an event of its own */
	NETMON_KIND_ACCEPT = 4,      /* a TCP handshake a listener on this host completed:
					addr/port the local service, src_* the remote client,
					pid/comm/uid/cgroup_id the process that called listen() */
};

enum netmon_backend {
	NETMON_BACKEND_SYSCALL = 1, /* syscalls:sys_{enter,exit}_connect tracepoints */
	NETMON_BACKEND_CGROUP = 2,  /* cgroup/connect{4,6,_unix} hooks on the cgroup v2 root */
};

enum netmon_outcome {
	NETMON_OUTCOME_NONE = 0,        /* not TCP, or not known by this hook */
	NETMON_OUTCOME_PENDING = 1,     /* handshake still running */
	NETMON_OUTCOME_ESTABLISHED = 2,
	NETMON_OUTCOME_FAILED = 3,      /* ret / the outcome record's ret says why */
};

/* per-CPU counters of records the kernel could not deliver */
enum netmon_drop {
	NETMON_DROP_RINGBUF_FULL = 0, /* bpf_ringbuf_reserve() failed */
	NETMON_DROP_INFLIGHT_FULL = 1, /* enter could not get task storage for its sockaddr */
	NETMON_DROP_NO_ENTER = 2, /* exit without a matching enter */
	NETMON_DROP_OUTCOME = 3, /* a TCP outcome found the ring full (its event stays pending) */
	NETMON_DROP_UDP_FLOWS_FULL = 4, /* a UDP send's (process, destination) found no room */
	NETMON_DROP_DNS_FULL = 5, /* a DNS answer found the dns ring full */
	NETMON_DROP_MAX = 6,
};

/* per-CPU counters of inbound TCP handshakes that never completed: counted, not stored,
 * so a SYN flood cannot evict real events */
enum netmon_inbound {
	NETMON_INBOUND_CLOSED_PORT = 0, /* a SYN answered with RST: no socket for its port */
	NETMON_INBOUND_LISTENERS_FULL = 1, /* a listen() found the owner map full: its
					       accepts carry no process */
	NETMON_INBOUND_MAX = 2,
};

/* Set by the loader, by field name through the generated skeleton, before load: the
 * programs read it as `const volatile` rodata in its own section (.rodata.cfg). */
struct netmon_config {
	__u64 wakeup_bytes; /* wake the consumer once this many bytes wait; 0: every record */
	__u64 scoped;       /* only tasks in the cgroup in scope[0] (and below it) */
	__u64 backend;      /* enum netmon_backend: stamped on accept events, which come from
			       a program both backends share */
};

/* key and value of the listeners map: who called listen() on (netns, local port). Set by
 * the CLOSE -> LISTEN transition (in the caller's context), removed by LISTEN -> CLOSE of
 * the same socket; the loader seeds listeners that existed before it attached (sk 0). */
struct netmon_listener_key {
	__u32 net_ns;
	__u32 port; /* host byte order */
};

struct netmon_listener {
	__u64 sk;        /* the listening struct sock; 0: seeded from /proc */
	__u64 cgroup_id;
	__u32 pid;
	__u32 tid;
	__u32 uid;
	__u32 pad;
	char comm[NETMON_COMM_LEN];
};

/* key of the udp_flows map the consumer sweeps: one entry per (process, destination) */
struct netmon_udp_key {
	__u32 pid;
	__u16 family;
	__u16 port;
	__u32 addr[4];
};

struct netmon_event {
	__u64 ts_ns;      /* bpf_ktime_get_boot_ns(): syscall exit / hook / state change */
	__u64 cgroup_id;  /* cgroup v2 id of the caller */
	__u64 sock_id;    /* kernel address of the struct sock: joins a TCP outcome to its
			     connect; 0 if unknown */
	__u32 pid;        /* tgid */
	__u32 tid;
	__u32 uid;
	__s32 ret;        /* connect() return value: 0 or -errno. Once the store has set
			     NETMON_F_INPROGRESS: the attempt so far, -EINPROGRESS while the
			     handshake runs, 0 once established, -errno once it failed.
			     (outcome record: 0 or -sk_err, -ECONNABORTED if none) */
	__u32 net_ns;     /* network namespace inode number; 0 if unknown */
	__u16 family;     /* sa_family as given by the caller */
	__u16 port;       /* host byte order (inet/inet6) */
	__u16 protocol;   /* sk->sk_protocol: IPPROTO_TCP=6, IPPROTO_UDP=17, ... */
	__u8 sock_type;   /* SOCK_STREAM=1, SOCK_DGRAM=2, SOCK_RAW=3, SOCK_SEQPACKET=5; 0 unknown */
	__u8 flags;       /* NETMON_F_* */
	__u8 kind;        /* enum netmon_kind */
	__u8 backend;     /* enum netmon_backend */
	__u8 outcome;     /* enum netmon_outcome */
	__u8 addr_len;    /* bytes of addr used */
	char comm[NETMON_COMM_LEN];
	/* A unix path needs all 48 bytes, an inet address 16: inet events keep their source
	 * in the rest (valid only when family is AF_INET or AF_INET6), so every record stays
	 * 128 bytes (growing it costs every full-store scan ~13 %). */
	union {
		__u8 addr[NETMON_ADDR_LEN]; /* accept: the local address */
		struct {
			__u8 addr_inet[16];
			__u8 src_addr[16]; /* 4 (AF_INET) or 16 bytes; all zero if unknown */
			__u16 src_port;    /* host byte order: a connect's local port, an accept's
					      client port; 0 if unknown */
			__u8 inet_pad[14];
		};
	};
	/* last: the fields no hook fills before a connect (a short record leaves them out) */
	__u32 latency_us; /* TCP outcome: SYN sent -> established/failed */
	__u32 packets;    /* udp_send: datagrams in this record's second */
};

_Static_assert(sizeof(struct netmon_event) == 128, "netmon_event must be 128 bytes");

/* A cgroup hook's connect record goes on the ring cut short after its address: the rest
 * (the source, the latency and packet count: unknown before the connect) is zero, and the
 * consumer stores it as a full 128-byte record with those bytes zero. Each ring record
 * costs its size + an 8-byte header in ring cache lines the CPU must fetch: 88 bytes
 * (IPv4) instead of 136 cut the connect4 hook's kernel time by a third. Only
 * NETMON_KIND_CONNECT records may be short. */
#define NETMON_EVENT_INET4_LEN (__builtin_offsetof(struct netmon_event, addr) + 8)
#define NETMON_EVENT_INET6_LEN (__builtin_offsetof(struct netmon_event, addr) + 16)
_Static_assert(__builtin_offsetof(struct netmon_event, inet_pad) + 14 ==
	       __builtin_offsetof(struct netmon_event, addr) + NETMON_ADDR_LEN,
	       "the inet source must lie within addr");

/* DNS answers: the payload of a UDP datagram or TCP segment from source port 53, as a
 * socket on the host received it, on a ring of its own (dns_rb). Variable size: this
 * header, then min(len, NETMON_DNS_MAX) payload bytes. */
#define NETMON_DNS_MAX 4096

struct netmon_dns {
	__u64 ts_ns;     /* bpf_ktime_get_boot_ns() when the socket received it */
	__u32 net_ns;    /* network namespace inode of the receiving socket; 0 if unknown */
	__u32 len;       /* payload bytes in the packet (more than follow: cut at NETMON_DNS_MAX) */
	__u16 family;    /* AF_INET / AF_INET6 of the packet */
	__u16 protocol;  /* IPPROTO_UDP=17 or IPPROTO_TCP=6 */
	__u32 seq;       /* TCP: the segment's sequence number (host order); UDP: 0 */
	__u64 cookie;    /* the receiving socket's cookie: a TCP stream's identity, never
			    reused (a socket's address is, by the next connection) */
};

_Static_assert(sizeof(struct netmon_dns) == 32, "netmon_dns must be 32 bytes");

#endif

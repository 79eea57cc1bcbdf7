// SPDX-License-Identifier: GPL-2.0
/* netmon capture programs: every connect() of every process.
 *
 * sys_enter_connect copies the caller's sockaddr into a per-thread pending slot;
 * sys_exit_connect turns it and the return value into one netmon_event on the ring
 * buffer. A raw tracepoint on inet_sock_set_state times each TCP handshake (SYN sent -> established or
 * closed) and sends its outcome, which the store joins to the connect by socket.
 * The cgroup backend replaces the two syscall tracepoints with cgroup/connect4, connect6
 * and connect_unix hooks on the cgroup v2 root: no cost to other syscalls, and connects
 * made through io_uring are seen; the hooks run before the connect, so they know what it
 * returns only for a TCP socket whose file is non-blocking (EINPROGRESS, unless it fails
 * before the handshake starts); a blocking TCP connect returns what its handshake came
 * to, which the TCP outcome supplies; unix and UDP stay unknown. Optional cgroup/sendmsg4/6 hooks count
 * unconnected UDP datagrams per (process, destination) in a map the consumer sweeps.
 * Inbound: the same inet_sock_set_state tracepoint sees listen() (CLOSE -> LISTEN, in the
 * caller's context: who owns (netns, port) goes into the listeners map) and every
 * handshake a listener completes (the child's SYN_RECV -> ESTABLISHED, in softirq: the
 * accept event takes its process from that map). A raw tracepoint on tcp_send_reset
 * counts SYNs answered with RST because no socket wanted them (closed ports).
 * Wake-ups are batched: a record is submitted without waking the consumer unless
 * wakeup_bytes are already waiting; the consumer drains on a short timer. */
#include "kernel.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include "netmon.h"

#define AF_UNIX 1
#define AF_INET 2
#define AF_INET6 10
#define S_IFMT 00170000
#define S_IFSOCK 0140000
#define SA_MAX 112 /* sizeof(struct sockaddr_un) = 110, rounded up */
#define IPPROTO_TCP 6
#define TCP_ESTABLISHED 1
#define TCP_SYN_SENT 2
#define TCP_SYN_RECV 3
#define TCP_CLOSE 7
#define TCP_LISTEN 10
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_ACK 0x10
#define SOCK_STREAM 1
#define EEXIST 17
#define ECONNABORTED 103
#define EINPROGRESS 115
#define O_NONBLOCK 04000

char LICENSE[] SEC("license") = "GPL";

/* struct netmon_config (netmon.h), in its own section: the skeleton names it rodata_cfg */
const volatile struct netmon_config netmon_cfg SEC(".rodata.cfg") = { .wakeup_bytes = 65536 };

/* the cgroup netmon watches when netmon_cfg.scoped (syscall backend; the cgroup backend
 * attaches to it instead) */
struct {
	__uint(type, BPF_MAP_TYPE_CGROUP_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} scope SEC(".maps");

static __always_inline int out_of_scope(void)
{
	return netmon_cfg.scoped && bpf_current_task_under_cgroup(&scope, 0) != 1;
}

struct pending {
	__u8 sa[SA_MAX];
	__u32 salen; /* bytes of sa read from the caller (0: unreadable) */
	__u32 addrlen; /* addrlen the caller passed */
	__s32 fd;
	__u32 active; /* set at enter, cleared at exit */
};

/* the connect in progress on each thread: task storage, filled in place at enter and
 * marked used at exit, no hash insert or delete per connect */
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct pending);
} inflight SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 8 << 20); /* resized by the loader */
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, NETMON_DROP_MAX);
	__type(key, __u32);
	__type(value, __u64);
} drops SEC(".maps");

/* generic kfunc (6.2+): a program's ctx -> the kernel struct behind it */
extern void *bpf_cast_to_kern_ctx(void *obj) __ksym;

/* unconnected UDP sends: one entry per (process, destination), swept by the consumer */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct netmon_udp_key);
	__type(value, struct netmon_event); /* packets counts; ts_ns = the first datagram */
} udp_flows SEC(".maps");

/* TCP sockets in SYN_SENT: when the SYN went out */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64); /* struct sock * */
	__type(value, __u64);
} syn_sent SEC(".maps");

/* who called listen() on each (netns, port): see struct netmon_listener */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct netmon_listener_key);
	__type(value, struct netmon_listener);
} listeners SEC(".maps");

/* inbound handshakes that never completed, by reason (enum netmon_inbound) */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, NETMON_INBOUND_MAX);
	__type(key, __u32);
	__type(value, __u64);
} inbound SEC(".maps");

/* a udp_flows value is built here: too large for the 512-byte stack with the rest */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct netmon_event);
} scratch_event SEC(".maps");


static __always_inline void count_drop(__u32 reason)
{
	__u64 *v = bpf_map_lookup_elem(&drops, &reason);

	if (v)
		*v += 1; /* per-CPU slot; the program cannot migrate while it runs */
}

static __always_inline void count_inbound(__u32 reason)
{
	__u64 *v = bpf_map_lookup_elem(&inbound, &reason);

	if (v)
		*v += 1;
}

/* the local address and port of an inet socket, as far as the kernel has chosen them */
static __always_inline void source_of(struct sock *sk, struct netmon_event *e)
{
	__u16 fam = BPF_CORE_READ(sk, __sk_common.skc_family);

	if (fam != AF_INET && fam != AF_INET6)
		return; /* the source's bytes are the rest of a unix path */
	e->src_port = BPF_CORE_READ(sk, __sk_common.skc_num);
	if (!e->src_port)
		return;
	if (fam == AF_INET)
		*(__u32 *)e->src_addr = BPF_CORE_READ(sk, __sk_common.skc_rcv_saddr);
	else
		bpf_core_read(e->src_addr, 16, &sk->__sk_common.skc_v6_rcv_saddr);
}

/* the fields every record made in a task's context shares; the rest of its first size
 * bytes (sizeof(*e), or a short connect record's length: netmon.h) is zeroed */
static __always_inline void fill_event(struct netmon_event *e, __u32 size, __u8 kind,
				       __u8 backend)
{
	__u64 id = bpf_get_current_pid_tgid();

	__builtin_memset(e, 0, size);
	e->ts_ns = bpf_ktime_get_boot_ns();
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->pid = id >> 32;
	e->tid = (__u32)id;
	e->uid = (__u32)bpf_get_current_uid_gid();
	e->kind = kind;
	e->backend = backend;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
}

/* bcc's bpf_map_lookup_or_try_init: key's entry, created from *init if absent; if another
 * CPU creates it first, that entry. NULL only when the map is full. */
static __always_inline void *lookup_or_try_init(void *map, const void *key, const void *init)
{
	void *val = bpf_map_lookup_elem(map, key);
	long err;

	if (val)
		return val;
	err = bpf_map_update_elem(map, key, init, BPF_NOEXIST);
	if (err && err != -EEXIST)
		return NULL;
	return bpf_map_lookup_elem(map, key);
}

static __always_inline void submit(struct netmon_event *e)
{
	if (bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) >= netmon_cfg.wakeup_bytes)
		bpf_ringbuf_submit(e, BPF_RB_FORCE_WAKEUP);
	else
		bpf_ringbuf_submit(e, BPF_RB_NO_WAKEUP);
}

SEC("tracepoint/syscalls/sys_enter_connect")
int netmon_connect_enter(struct trace_event_raw_sys_enter *ctx)
{
	const void *uaddr = (const void *)ctx->args[1];
	__u64 len = (__u32)ctx->args[2];
	struct pending *p;

	if (out_of_scope())
		return 0;
	p = bpf_task_storage_get(&inflight, bpf_get_current_task_btf(), 0,
				 BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!p) {
		count_drop(NETMON_DROP_INFLIGHT_FULL);
		return 0;
	}
	p->active = 1;
	p->fd = ctx->args[0];
	p->addrlen = len;
	if (len > SA_MAX)
		len = SA_MAX;
	/* clang 14 drops a C-level mask after the clamp and the verifier then sees an
	 * unbounded length: force it in asm */
	asm volatile("%0 &= 0x7f" : "+r"(len));
	p->salen = len;
	if (len < 2 || bpf_probe_read_user(p->sa, len, uaddr) < 0)
		p->salen = 0;
	return 0;
}

/* fd -> file -> socket: type, protocol, socket id and netns, only if the fd really is
 * a socket */
static __always_inline void socket_info(int fd, struct netmon_event *e)
{
	struct task_struct *t = (struct task_struct *)bpf_get_current_task();
	struct fdtable *fdt = BPF_CORE_READ(t, files, fdt);
	struct file **fds;
	struct file *f = NULL;
	struct socket *s;
	struct sock *sk;

	if (fd < 0 || !fdt || fd >= BPF_CORE_READ(fdt, max_fds))
		return;
	fds = BPF_CORE_READ(fdt, fd);
	if (bpf_probe_read_kernel(&f, sizeof(f), &fds[fd]) < 0 || !f)
		return;
	if ((BPF_CORE_READ(f, f_inode, i_mode) & S_IFMT) != S_IFSOCK)
		return;
	s = BPF_CORE_READ(f, private_data);
	if (!s)
		return;
	sk = BPF_CORE_READ(s, sk);
	e->sock_type = BPF_CORE_READ(s, type);
	if (!sk)
		return;
	e->sock_id = (__u64)sk;
	e->protocol = BPF_CORE_READ(sk, sk_protocol);
	e->net_ns = BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
	source_of(sk, e); /* after the syscall: TCP and UDP have their source by now */
}

SEC("tracepoint/syscalls/sys_exit_connect")
int netmon_connect_exit(struct trace_event_raw_sys_exit *ctx)
{
	struct pending *p = bpf_task_storage_get(&inflight, bpf_get_current_task_btf(), 0, 0);
	struct netmon_event *e;

	if (!p || !p->active) {
		if (out_of_scope())
			return 0;
		count_drop(NETMON_DROP_NO_ENTER);
		return 0;
	}
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	p->active = 0;
	if (!e) {
		count_drop(NETMON_DROP_RINGBUF_FULL);
		return 0;
	}
	fill_event(e, sizeof(*e), NETMON_KIND_CONNECT, NETMON_BACKEND_SYSCALL);
	e->ret = ctx->ret;
	if (p->salen < 2)
		e->flags = NETMON_F_NO_ADDR;
	else
		e->family = *(__u16 *)p->sa;
	if (e->family == AF_INET && p->salen >= 8) {
		e->port = bpf_ntohs(*(__u16 *)&p->sa[2]);
		__builtin_memcpy(e->addr, &p->sa[4], 4);
		e->addr_len = 4;
	} else if (e->family == AF_INET6 && p->salen >= 24) {
		e->port = bpf_ntohs(*(__u16 *)&p->sa[2]);
		__builtin_memcpy(e->addr, &p->sa[8], 16);
		e->addr_len = 16;
	} else if (e->family == AF_UNIX) {
		__u32 n = p->salen - 2;

		if (n > NETMON_ADDR_LEN) {
			n = NETMON_ADDR_LEN;
			/* more bytes followed; for a pathname that matters only if the
			 * kept bytes hold no NUL (user space decides) */
			if (p->sa[2 + NETMON_ADDR_LEN] != 0 || p->sa[2] == 0)
				e->flags |= NETMON_F_TRUNCATED;
		}
		__builtin_memcpy(e->addr, &p->sa[2], NETMON_ADDR_LEN);
		e->addr_len = n;
	}
	socket_info(p->fd, e);
	if (e->protocol == IPPROTO_TCP && e->sock_type) /* the handshake as connect() saw it */
		e->outcome = e->ret == 0 ? NETMON_OUTCOME_ESTABLISHED :
			     e->ret == -EINPROGRESS ? NETMON_OUTCOME_PENDING : NETMON_OUTCOME_FAILED;
	submit(e);
	return 0;
}

/* listen(), in the caller's context: remember who owns (netns, port) */
static __always_inline void remember_listener(__u64 skp, struct netmon_listener_key *k)
{
	struct netmon_listener v = {};
	__u64 id = bpf_get_current_pid_tgid();

	if (out_of_scope())
		return;
	v.sk = skp;
	v.cgroup_id = bpf_get_current_cgroup_id();
	v.pid = id >> 32;
	v.tid = (__u32)id;
	v.uid = (__u32)bpf_get_current_uid_gid();
	bpf_get_current_comm(v.comm, sizeof(v.comm));
	if (bpf_map_update_elem(&listeners, k, &v, BPF_ANY))
		count_inbound(NETMON_INBOUND_LISTENERS_FULL);
}

/* listen(): remember the owner; the listener's close: forget it; a child's SYN_RECV ->
 * ESTABLISHED (softirq): one accept event */
static __always_inline int tcp_inbound(__u64 skp, int oldstate, int newstate)
{
	struct sock *sk = (struct sock *)skp;
	struct netmon_listener_key k = {};
	struct netmon_listener *o;
	struct netmon_event *e;

	k.net_ns = BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
	k.port = BPF_CORE_READ(sk, __sk_common.skc_num);
	if (newstate == TCP_LISTEN) {
		remember_listener(skp, &k);
		return 0;
	}
	o = bpf_map_lookup_elem(&listeners, &k);
	if (newstate != TCP_ESTABLISHED) { /* LISTEN -> CLOSE */
		if (o && (o->sk == skp || o->sk == 0))
			bpf_map_delete_elem(&listeners, &k);
		return 0;
	}
	if (!o && netmon_cfg.scoped)
		return 0; /* not listened to from inside the scope */
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count_drop(NETMON_DROP_RINGBUF_FULL);
		return 0;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->ts_ns = bpf_ktime_get_boot_ns();
	e->sock_id = skp;
	e->net_ns = k.net_ns;
	e->port = k.port;
	e->src_port = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	e->family = BPF_CORE_READ(sk, __sk_common.skc_family);
	if (e->family == AF_INET) {
		*(__u32 *)e->addr = BPF_CORE_READ(sk, __sk_common.skc_rcv_saddr);
		*(__u32 *)e->src_addr = BPF_CORE_READ(sk, __sk_common.skc_daddr);
		e->addr_len = 4;
	} else {
		bpf_core_read(e->addr, 16, &sk->__sk_common.skc_v6_rcv_saddr);
		bpf_core_read(e->src_addr, 16, &sk->__sk_common.skc_v6_daddr);
		e->addr_len = 16;
	}
	e->protocol = IPPROTO_TCP;
	e->sock_type = SOCK_STREAM;
	e->kind = NETMON_KIND_ACCEPT;
	e->backend = netmon_cfg.backend;
	e->outcome = NETMON_OUTCOME_ESTABLISHED;
	if (o) {
		e->cgroup_id = o->cgroup_id;
		e->pid = o->pid;
		e->tid = o->tid;
		e->uid = o->uid;
		__builtin_memcpy(e->comm, o->comm, sizeof(e->comm));
	} else {
		e->flags = NETMON_F_NO_OWNER;
	}
	submit(e);
	return 0;
}

/* a raw tracepoint: the kernel does not format a trace record for each of the ~8 state
 * changes of a loopback connection (both ends) before the program can say "not mine" */
SEC("raw_tp/inet_sock_set_state")
int netmon_tcp_state(struct bpf_raw_tracepoint_args *ctx)
{
	/* (const struct sock *sk, const int oldstate, const int newstate) */
	__u64 sk = ctx->args[0], now, *sent;
	int oldstate = ctx->args[1], newstate = ctx->args[2];
	struct netmon_event *e;

	if (newstate == TCP_LISTEN || (oldstate == TCP_LISTEN && newstate == TCP_CLOSE) ||
	    (oldstate == TCP_SYN_RECV && newstate == TCP_ESTABLISHED)) {
		if (BPF_CORE_READ((struct sock *)sk, sk_protocol) != IPPROTO_TCP)
			return 0;
		return tcp_inbound(sk, oldstate, newstate);
	}
	if (newstate != TCP_SYN_SENT && oldstate != TCP_SYN_SENT)
		return 0;
	if (BPF_CORE_READ((struct sock *)sk, sk_protocol) != IPPROTO_TCP)
		return 0;
	if (newstate == TCP_SYN_SENT) { /* in the connecting task: scope applies here */
		if (out_of_scope())
			return 0;
		now = bpf_ktime_get_boot_ns();
		bpf_map_update_elem(&syn_sent, &sk, &now, BPF_ANY);
		return 0;
	}
	sent = bpf_map_lookup_elem(&syn_sent, &sk);
	if (!sent)
		return 0; /* the SYN went out before we attached */
	now = bpf_ktime_get_boot_ns();
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count_drop(NETMON_DROP_OUTCOME);
		bpf_map_delete_elem(&syn_sent, &sk);
		return 0;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->ts_ns = now;
	e->sock_id = sk;
	e->latency_us = (now - *sent) / 1000 ?: 1;
	e->kind = NETMON_KIND_TCP_OUTCOME;
	e->protocol = IPPROTO_TCP;
	source_of((struct sock *)sk, e); /* chosen by now: the cgroup hooks could not know it */
	if (newstate == TCP_ESTABLISHED) {
		e->outcome = NETMON_OUTCOME_ESTABLISHED;
	} else {
		e->outcome = NETMON_OUTCOME_FAILED;
		e->ret = -BPF_CORE_READ((struct sock *)sk, sk_err);
		if (!e->ret) /* closed during the handshake without an error: abandoned */
			e->ret = -ECONNABORTED;
	}
	submit(e);
	bpf_map_delete_elem(&syn_sent, &sk);
	return 0;
}

/* A SYN that no socket wanted is answered with RST from no socket (sk NULL): count it.
 * RSTs from sockets (aborts, bad segments) are not handshakes and are left alone. */
SEC("raw_tp/tcp_send_reset")
int netmon_tcp_reset(struct bpf_raw_tracepoint_args *ctx)
{
	/* (const struct sock *sk, const struct sk_buff *skb[, enum sk_rst_reason]) */
	struct sk_buff *skb = (struct sk_buff *)ctx->args[1];
	unsigned char *head;
	__u8 flags = 0;

	if (ctx->args[0] || !skb || netmon_cfg.scoped) /* scoped: no process to scope by */
		return 0;
	head = BPF_CORE_READ(skb, head);
	bpf_probe_read_kernel(&flags, 1, head + BPF_CORE_READ(skb, transport_header) + 13);
	if ((flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN)
		count_inbound(NETMON_INBOUND_CLOSED_PORT);
	return 0;
}

/* ---- cgroup backend ---- */

/* size: sizeof(struct netmon_event), or NETMON_EVENT_INET{4,6}_LEN for an inet connect,
 * whose source the hook cannot know (the verifier rejects a write past it) */
static __always_inline struct netmon_event *hook_event(struct bpf_sock_addr *ctx,
						       const __u32 size)
{
	struct bpf_sock_addr_kern *kctx = bpf_cast_to_kern_ctx(ctx);
	struct netmon_event *e = bpf_ringbuf_reserve(&events, size, 0);
	struct sock *sk;

	if (!e) {
		count_drop(NETMON_DROP_RINGBUF_FULL);
		return NULL;
	}
	fill_event(e, size, NETMON_KIND_CONNECT, NETMON_BACKEND_CGROUP);
	e->family = ctx->user_family;
	e->sock_type = ctx->type;
	e->protocol = ctx->protocol;
	e->flags = NETMON_F_NO_RESULT; /* the connect has not happened yet */
	/* Plain loads through the kernel context's BTF pointers, not BPF_CORE_READ: each
	 * of those is a bpf_probe_read_kernel() call (six here), together ~10 % of the
	 * hook's time; the verifier turns these into fault-safe loads (NULL reads 0). */
	sk = kctx->sk;
	e->sock_id = (__u64)sk;
	e->net_ns = sk->__sk_common.skc_net.net->ns.inum;
	if (e->protocol == IPPROTO_TCP) {
		struct socket *sock = sk->sk_socket;
		struct file *f = sock ? sock->file : NULL;

		e->outcome = NETMON_OUTCOME_PENDING;
		/* the hook runs only for a socket that starts connecting: on a non-blocking
		 * file, connect() returns EINPROGRESS unless it fails before the SYN (a
		 * route lookup); no file (a kernel socket): unknown */
		if (f && (f->f_flags & O_NONBLOCK)) {
			e->ret = -EINPROGRESS;
			e->flags = 0;
		}
	}
	return e;
}

SEC("cgroup/connect4")
int netmon_cg_connect4(struct bpf_sock_addr *ctx)
{
	struct netmon_event *e = hook_event(ctx, NETMON_EVENT_INET4_LEN);

	if (e) {
		e->port = bpf_ntohs(ctx->user_port);
		*(__u32 *)e->addr = ctx->user_ip4;
		e->addr_len = 4;
		submit(e);
	}
	return 1; /* allow: 0 would fail every connect() on the host */
}

SEC("cgroup/connect6")
int netmon_cg_connect6(struct bpf_sock_addr *ctx)
{
	struct netmon_event *e = hook_event(ctx, NETMON_EVENT_INET6_LEN);

	if (e) {
		e->port = bpf_ntohs(ctx->user_port);
		/* user_ip6 may only be read in 4-byte words */
		((__u32 *)e->addr)[0] = ctx->user_ip6[0];
		((__u32 *)e->addr)[1] = ctx->user_ip6[1];
		((__u32 *)e->addr)[2] = ctx->user_ip6[2];
		((__u32 *)e->addr)[3] = ctx->user_ip6[3];
		e->addr_len = 16;
		submit(e);
	}
	return 1;
}

/* libbpf 1.1 does not know this section: the loader sets the program type and the
 * expected attach type BPF_CGROUP_UNIX_CONNECT (Linux 6.7+) itself */
SEC("cgroup/connect_unix")
int netmon_cg_connect_unix(struct bpf_sock_addr *ctx)
{
	struct bpf_sock_addr_kern *kctx = bpf_cast_to_kern_ctx(ctx);
	struct netmon_event *e = hook_event(ctx, sizeof(*e));
	__u8 more = 0;
	__u32 n;

	if (!e)
		return 1;
	e->family = AF_UNIX;
	n = kctx->uaddrlen;
	n = n > 2 ? n - 2 : 0;
	/* uaddr is the kernel's copy in a sockaddr_storage (128 bytes): reads past the
	 * caller's length stay inside it; bytes beyond n are ignored via addr_len */
	bpf_probe_read_kernel(e->addr, NETMON_ADDR_LEN, (void *)kctx->uaddr + 2);
	if (n > NETMON_ADDR_LEN) {
		n = NETMON_ADDR_LEN;
		bpf_probe_read_kernel(&more, 1, (void *)kctx->uaddr + 2 + NETMON_ADDR_LEN);
		if (more || e->addr[0] == 0)
			e->flags |= NETMON_F_TRUNCATED;
	}
	e->addr_len = n;
	submit(e);
	return 1;
}

static __always_inline void udp_send(struct bpf_sock_addr *ctx, int v6)
{
	struct bpf_sock_addr_kern *kctx = bpf_cast_to_kern_ctx(ctx);
	struct netmon_udp_key k = {};
	struct netmon_event *v;

	k.pid = bpf_get_current_pid_tgid() >> 32;
	k.family = ctx->user_family;
	k.port = bpf_ntohs(ctx->user_port);
	if (v6) {
		k.addr[0] = ctx->user_ip6[0];
		k.addr[1] = ctx->user_ip6[1];
		k.addr[2] = ctx->user_ip6[2];
		k.addr[3] = ctx->user_ip6[3];
	} else {
		k.addr[0] = ctx->user_ip4;
	}
	v = bpf_map_lookup_elem(&udp_flows, &k);
	if (!v) { /* the first datagram of this window: build the entry (packets 0) */
		struct netmon_event *init = bpf_map_lookup_elem(&scratch_event, &(__u32){0});

		if (!init)
			return;
		fill_event(init, sizeof(*init), NETMON_KIND_UDP_SEND, NETMON_BACKEND_CGROUP);
		init->family = k.family;
		init->port = k.port;
		init->sock_type = ctx->type;
		init->protocol = ctx->protocol;
		init->flags = NETMON_F_NO_RESULT;
		init->net_ns = BPF_CORE_READ(kctx, sk, __sk_common.skc_net.net, ns.inum);
		__builtin_memcpy(init->addr, k.addr, 16);
		init->addr_len = v6 ? 16 : 4;
		v = lookup_or_try_init(&udp_flows, &k, init);
		if (!v) {
			count_drop(NETMON_DROP_UDP_FLOWS_FULL);
			return;
		}
	}
	__sync_fetch_and_add(&v->packets, 1);
}

SEC("cgroup/sendmsg4")
int netmon_cg_sendmsg4(struct bpf_sock_addr *ctx)
{
	udp_send(ctx, 0);
	return 1;
}

SEC("cgroup/sendmsg6")
int netmon_cg_sendmsg6(struct bpf_sock_addr *ctx)
{
	udp_send(ctx, 1);
	return 1;
}

/* ---- DNS answers (optional) ----
 * A cgroup_skb/ingress program on the same cgroup as the hooks runs for every packet a
 * socket in it receives. It looks only at the IP and transport headers (already pulled
 * into the linear area by the time a socket receives the packet) and lets everything
 * through; only UDP/TCP payloads from source port 53 go to user space, on a ring of their
 * own, without waking the reader (user space drains it on a timer and before queries). */
#define IPPROTO_UDP 17
#define DNS_PORT_BE 0x3500 /* htons(53) */

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 2 << 20);
} dns_rb SEC(".maps");

/* header + payload are assembled here (too large for the stack); twice NETMON_DNS_MAX
 * so the verifier's view of the masked length stays inside it */
struct dns_scratch {
	struct netmon_dns h;
	__u8 data[2 * NETMON_DNS_MAX];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct dns_scratch);
} dns_scratch SEC(".maps");

static __always_inline int dns_to_user(struct __sk_buff *skb, __u32 off, __u16 family,
				       __u16 protocol, __u32 seq)
{
	struct sk_buff *kskb = bpf_cast_to_kern_ctx(skb);
	struct dns_scratch *s = bpf_map_lookup_elem(&dns_scratch, &(__u32){0});
	__u64 n;

	if (!s || skb->len <= off)
		return 1; /* no payload: a bare TCP ACK/FIN */
	s->h.ts_ns = bpf_ktime_get_boot_ns();
	s->h.net_ns = BPF_CORE_READ(kskb, sk, __sk_common.skc_net.net, ns.inum);
	s->h.len = skb->len - off;
	s->h.family = family;
	s->h.protocol = protocol;
	s->h.seq = seq;
	s->h.cookie = bpf_get_socket_cookie(skb);
	n = s->h.len > NETMON_DNS_MAX ? NETMON_DNS_MAX : s->h.len;
	asm volatile("%0 &= 0x1fff" : "+r"(n)); /* see netmon_connect_enter */
	if (n == 0 || bpf_skb_load_bytes(skb, off, s->data, n) < 0)
		return 1;
	if (bpf_ringbuf_output(&dns_rb, s, sizeof(s->h) + n, BPF_RB_NO_WAKEUP) < 0)
		count_drop(NETMON_DROP_DNS_FULL);
	return 1;
}

SEC("cgroup_skb/ingress")
int netmon_dns_ingress(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
	__u8 *ip = data, *l4;
	__u32 hlen;
	__u16 family;
	__u8 proto;

	if (data + 40 > end) /* IPv6's header; IPv4's is checked below */
		if (data + 20 > end || (ip[0] >> 4) != 4)
			return 1;
	if ((ip[0] >> 4) == 4) {
		hlen = (ip[0] & 0xf) * 4;
		proto = ip[9];
		family = AF_INET;
	} else if ((ip[0] >> 4) == 6) {
		hlen = 40; /* extension headers before UDP/TCP are not followed */
		proto = ip[6];
		family = AF_INET6;
	} else {
		return 1;
	}
	if (proto != IPPROTO_UDP && proto != IPPROTO_TCP)
		return 1;
	l4 = data + hlen;
	if ((void *)(l4 + 8) > end) /* a UDP header */
		return 1;
	if (*(__u16 *)l4 != DNS_PORT_BE) /* the source port */
		return 1;
	if (proto == IPPROTO_UDP)
		return dns_to_user(skb, hlen + 8, family, proto, 0);
	if ((void *)(l4 + 13) > end) /* TCP's data offset */
		return 1;
	/* the sequence number: user space puts an answer split across segments together */
	return dns_to_user(skb, hlen + (l4[12] >> 4) * 4, family, proto,
			   bpf_ntohl(*(__u32 *)(l4 + 4)));
}

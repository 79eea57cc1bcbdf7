// SPDX-License-Identifier: GPL-2.0
/* The benchmark's yardstick for netmon's cgroup connect hooks: the same attach points
 * (cgroup/connect4 and connect6 on the cgroup v2 root), one bare 64-byte record per
 * connect (who, when, where; nothing read through the socket), submitted with the same
 * batched wake-up as netmon. Built by bench_netmon.py with the system headers only. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "bare.h"

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 8 << 20); /* netmon's default ring */
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} drops SEC(".maps");

static __always_inline struct bare_event *reserve(struct bpf_sock_addr *ctx)
{
	struct bare_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	__u64 id = bpf_get_current_pid_tgid();

	if (!e) {
		__u64 *n = bpf_map_lookup_elem(&drops, &(__u32){0});

		if (n)
			*n += 1;
		return NULL;
	}
	e->ts_ns = bpf_ktime_get_boot_ns();
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->pid = id >> 32;
	e->tid = (__u32)id;
	e->uid = (__u32)bpf_get_current_uid_gid();
	e->family = ctx->user_family;
	e->sock_type = ctx->type;
	e->protocol = ctx->protocol;
	e->port = bpf_ntohs(ctx->user_port);
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	return e;
}

/* the same batching as netmon: wake the reader only once BARE_WAKEUP_BYTES wait */
static __always_inline void submit(struct bare_event *e)
{
	if (bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) >= BARE_WAKEUP_BYTES)
		bpf_ringbuf_submit(e, BPF_RB_FORCE_WAKEUP);
	else
		bpf_ringbuf_submit(e, BPF_RB_NO_WAKEUP);
}

SEC("cgroup/connect4")
int bare_connect4(struct bpf_sock_addr *ctx)
{
	struct bare_event *e = reserve(ctx);

	if (e) {
		e->addr[0] = ctx->user_ip4;
		e->addr[1] = e->addr[2] = e->addr[3] = 0;
		submit(e);
	}
	return 1; /* allow */
}

SEC("cgroup/connect6")
int bare_connect6(struct bpf_sock_addr *ctx)
{
	struct bare_event *e = reserve(ctx);

	if (e) {
		e->addr[0] = ctx->user_ip6[0];
		e->addr[1] = ctx->user_ip6[1];
		e->addr[2] = ctx->user_ip6[2];
		e->addr[3] = ctx->user_ip6[3];
		submit(e);
	}
	return 1;
}

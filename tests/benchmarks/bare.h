/* SPDX-License-Identifier: GPL-2.0 */
/* The bare benchmark consumer's record (bare.bpf.c -> bare.c): 72 bytes, no includes
 * (the includer provides __u8..__u64). */
#ifndef BARE_H
#define BARE_H

#define BARE_WAKEUP_BYTES (512 << 10) /* netmon's default wake-up batch (of its 8 MiB ring) */

struct bare_event {
	__u64 ts_ns;
	__u64 cgroup_id;
	__u32 pid;
	__u32 tid;
	__u32 uid;
	__u16 family;
	__u16 port; /* host byte order */
	__u8 sock_type;
	__u8 protocol;
	__u8 pad[6];
	__u32 addr[4]; /* v4: addr[0]; v6: all four, as the caller gave them */
	char comm[16];
};

_Static_assert(sizeof(struct bare_event) == 72, "bare_event must be 72 bytes");

#endif

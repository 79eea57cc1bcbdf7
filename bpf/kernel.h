/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* The few kernel types netmon.bpf.c reads, hand-written instead of a multi-megabyte
 * vmlinux.h dump. preserve_access_index makes every field access a CO-RE relocation,
 * resolved against the running kernel's BTF at load time; only the fields named here
 * must exist, at whatever offset the running kernel has them. */
#ifndef NETMON_KERNEL_H
#define NETMON_KERNEL_H

#include <linux/types.h>
#include <linux/bpf.h>

#pragma clang attribute push (__attribute__((preserve_access_index)), apply_to = record)

struct trace_entry {
	unsigned short type;
	unsigned char flags;
	unsigned char preempt_count;
	int pid;
};

/* context of syscalls:sys_enter_* / sys_exit_* (same layout as raw_syscalls) */
struct trace_event_raw_sys_enter {
	struct trace_entry ent;
	long id;
	unsigned long args[6];
};

struct trace_event_raw_sys_exit {
	struct trace_entry ent;
	long id;
	long ret;
};

struct inode {
	unsigned short i_mode;
};

struct file {
	struct inode *f_inode;
	void *private_data;
	unsigned int f_flags;
};

struct fdtable {
	unsigned int max_fds;
	struct file **fd;
};

struct files_struct {
	struct fdtable *fdt;
};

struct task_struct {
	struct files_struct *files;
};

struct ns_common {
	unsigned int inum;
};

struct net {
	struct ns_common ns;
};

typedef struct {
	struct net *net;
} possible_net_t;

struct in6_addr {
	__u8 s6_addr[16];
};

/* the address fields live in anonymous unions in the kernel; CO-RE finds them by name */
struct sock_common {
	__be32 skc_daddr;      /* remote IPv4 address */
	__be32 skc_rcv_saddr;  /* local IPv4 address */
	__be16 skc_dport;      /* remote port */
	__u16 skc_num;         /* local port, host byte order */
	unsigned short skc_family;
	possible_net_t skc_net;
	struct in6_addr skc_v6_daddr;
	struct in6_addr skc_v6_rcv_saddr;
};

struct sock;

/* a TCP reset's packet (head, transport_header); what a cgroup_skb program's context
 * points at in the kernel (sk) */
struct sk_buff {
	unsigned char *head;
	__u16 transport_header;
	struct sock *sk;
};

struct socket;

struct sock {
	struct sock_common __sk_common;
	__u16 sk_protocol; /* a plain u16 since Linux 5.6 */
	int sk_err;
	struct socket *sk_socket;
};

struct socket {
	short type;
	struct file *file;
	struct sock *sk;
};

struct sockaddr;

/* what a cgroup sock_addr program's context points at in the kernel */
struct bpf_sock_addr_kern {
	struct sock *sk;
	struct sockaddr *uaddr;
	__u32 uaddrlen;
};

#pragma clang attribute pop

#endif

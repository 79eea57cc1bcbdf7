// SPDX-License-Identifier: GPL-2.0
/* The benchmark's bare C consumer: what netmon's cgroup backend is compared against.
 *
 *   bare OBJECT CGROUP2_DIR CAPACITY
 *
 * Loads OBJECT (bare.bpf.o, built by bench_netmon.py), attaches its cgroup/connect4 and
 * connect6 programs to CGROUP2_DIR as bpf links, and drains the ring buffer the way
 * netmon does (epoll with a 10 ms timer, then consume) into a store of CAPACITY records
 * that wraps: each record is copied into the next slot, nothing else. The store's pages
 * are touched before attaching, so its CPU per record is the steady state.
 * Prints `READY` once attached; on SIGUSR1 one JSON line (records so far, drops, and
 * each program's run_cnt and run_time_ns from the kernel: bpf_stats); exits on SIGTERM. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <unistd.h>
#include <linux/types.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include "bare.h"

static volatile sig_atomic_t stop, report;
static struct bare_event *store;
static unsigned long long capacity, records;

static void on_sig(int sig)
{
	if (sig == SIGUSR1)
		report = 1;
	else
		stop = 1;
}

static int on_record(void *ctx, void *data, size_t size)
{
	(void)ctx;
	if (size != sizeof(*store))
		return 0;
	memcpy(&store[records++ % capacity], data, sizeof(*store));
	return 0;
}

static void print_report(struct bpf_object *obj)
{
	struct bpf_program *prog;
	struct bpf_map *drops = bpf_object__find_map_by_name(obj, "drops");
	int ncpu = libbpf_num_possible_cpus();
	__u64 *per_cpu = calloc(ncpu, sizeof(*per_cpu)), dropped = 0;
	const char *sep = "";

	if (per_cpu && bpf_map_lookup_elem(bpf_map__fd(drops), &(__u32){0}, per_cpu) == 0)
		for (int i = 0; i < ncpu; i++)
			dropped += per_cpu[i];
	free(per_cpu);
	printf("{\"records\": %llu, \"dropped\": %llu, \"progs\": {", records,
	       (unsigned long long)dropped);
	bpf_object__for_each_program(prog, obj) {
		struct bpf_prog_info info = {0};
		__u32 len = sizeof(info);

		if (bpf_obj_get_info_by_fd(bpf_program__fd(prog), &info, &len))
			continue;
		printf("%s\"%s\": [%llu, %llu]", sep, bpf_program__name(prog),
		       (unsigned long long)info.run_cnt, (unsigned long long)info.run_time_ns);
		sep = ", ";
	}
	printf("}}\n");
	fflush(stdout);
}

int main(int argc, char **argv)
{
	struct bpf_object *obj;
	struct bpf_program *prog;
	struct bpf_link *links[2] = {0};
	struct ring_buffer *rb;
	int cg, n = 0, err;

	if (argc != 4 || (capacity = strtoull(argv[3], NULL, 10)) == 0) {
		fprintf(stderr, "usage: %s OBJECT CGROUP2_DIR CAPACITY\n", argv[0]);
		return 2;
	}
	store = malloc(capacity * sizeof(*store));
	if (!store)
		return 1;
	memset(store, 0, capacity * sizeof(*store)); /* committed up front: steady state */
	cg = open(argv[2], O_RDONLY | O_DIRECTORY);
	obj = bpf_object__open_file(argv[1], NULL);
	if (cg < 0 || !obj || bpf_object__load(obj)) {
		fprintf(stderr, "bare: cannot open %s or load %s: %s\n", argv[2], argv[1],
			strerror(errno));
		return 1;
	}
	bpf_object__for_each_program(prog, obj) {
		if (n == 2 || !(links[n++] = bpf_program__attach_cgroup(prog, cg))) {
			fprintf(stderr, "bare: attach %s: %s\n", bpf_program__name(prog),
				strerror(errno));
			return 1;
		}
	}
	rb = ring_buffer__new(bpf_map__fd(bpf_object__find_map_by_name(obj, "events")),
			      on_record, NULL, NULL);
	if (!rb)
		return 1;
	signal(SIGTERM, on_sig);
	signal(SIGINT, on_sig);
	signal(SIGUSR1, on_sig);
	printf("READY\n");
	fflush(stdout);
	while (!stop) {
		err = ring_buffer__poll(rb, 10);
		if (err < 0 && err != -EINTR)
			break;
		/* records submitted without a wake-up are read on the timer (libbpf 1.1's poll
		 * reads only rings epoll reported) */
		ring_buffer__consume(rb);
		if (report) {
			report = 0;
			print_report(obj);
		}
	}
	for (int i = 0; i < n; i++)
		bpf_link__destroy(links[i]);
	ring_buffer__consume(rb);
	print_report(obj);
	ring_buffer__free(rb);
	bpf_object__close(obj);
	return 0;
}

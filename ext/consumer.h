/* The consumer side of the ring buffer: the poll loop the poll thread runs without the
 * GIL, and capture of libbpf's messages so errors can quote the verifier log. */
#ifndef NETMON_CONSUMER_H
#define NETMON_CONSUMER_H

#include <stddef.h>
#include <stdint.h>
#include <bpf/libbpf.h>
#include "store.h"

struct nm_poll_state {
	volatile int stop;            /* set by another thread: leave the loop */
	volatile int paused;          /* tests: leave records in the ring */
	volatile uint64_t last_poll_ns; /* CLOCK_BOOTTIME of the last completed drain */
	volatile int error;           /* -errno that ended the loop, 0 if none */
	int udp_fd;                   /* the udp_flows map to sweep into store; -1: none */
	struct nm_store *store;
	uint64_t udp_swept_ns;        /* when the last sweep ran */
};

/* Drain `rb` until state->stop: wait up to timeout_ms for a wake-up, then consume
 * whatever waits (records are submitted without wake-ups, so poll alone would miss
 * them with libbpf 1.1). Returns 0 or the -errno that ended it. */
int nm_poll_loop(struct ring_buffer *rb, struct nm_poll_state *state, int timeout_ms);
uint64_t nm_boot_ns(void);

void nm_log_install(int keep_debug);
size_t nm_log_tail(char *buf, size_t size);
void nm_log_clear(void);

#endif

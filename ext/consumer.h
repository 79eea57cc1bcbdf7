/* The consumer side of the ring buffer: the poll loop the poll thread runs without the
 * GIL, the read-your-writes sync a query runs first, and capture of libbpf's messages so
 * errors can quote the verifier log. */
#ifndef NETMON_CONSUMER_H
#define NETMON_CONSUMER_H

#include <pthread.h>
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
	/* libbpf's ring_buffer consumer is single-threaded: the poll thread and queries take
	 * `lock` around ring_buffer__consume; rb is NULL once closed */
	struct ring_buffer *rb;
	pthread_mutex_t lock;
	/* a read-only mapping of the ring's first two pages: the consumer position, then the
	 * producer position. Kept until nm_state_destroy, so a query that still holds the
	 * probe can read it after close (the mapping holds the map) */
	void *pages;
	size_t pages_len;
	const unsigned long *cons_pos, *prod_pos;
};

void nm_state_init(struct nm_poll_state *st);
void nm_state_destroy(struct nm_poll_state *st);

/* Set up the consumer of ring buffer map `map_fd` (records go to cb(ctx, ...)) and map
 * its positions. Returns 0 or -errno. */
int nm_ring_open(struct nm_poll_state *st, int map_fd, ring_buffer_sample_fn cb, void *ctx);

/* Whether the kernel has reserved records the consumer has not read: two memory reads,
 * no syscall, no lock. */
static inline int nm_ring_pending(const struct nm_poll_state *st)
{
	return st->pages && __atomic_load_n(st->prod_pos, __ATOMIC_ACQUIRE) !=
			    __atomic_load_n(st->cons_pos, __ATOMIC_ACQUIRE);
}

/* Read your writes: consume every record the kernel has already submitted into the
 * store, serialised with the poll thread; nothing while paused or after close. Returns
 * the records consumed or -errno. */
int nm_ring_sync(struct nm_poll_state *st);

/* Free the consumer (under the lock, so no sync is inside it); the mapping stays. */
void nm_ring_close(struct nm_poll_state *st);

/* Drain state->rb until state->stop: wait up to timeout_ms for a wake-up (epoll, without
 * the lock), then consume whatever waits (records are submitted without wake-ups, so a
 * wake-up alone would miss them). Returns 0 or the -errno that ended it. */
int nm_poll_loop(struct nm_poll_state *state, int timeout_ms);
/* CLOCK_BOOTTIME in ns on the kernel's (the host's) clock, the clock of every record:
 * less the time namespace's boot-clock offset, nm_boot_offset_ns() */
uint64_t nm_boot_ns(void);
int64_t nm_boot_offset_ns(void);

void nm_log_install(int keep_debug);
size_t nm_log_tail(char *buf, size_t size);
void nm_log_clear(void);

#endif

/* Poll loop and libbpf log capture: see consumer.h. */
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <bpf/bpf.h>
#include "consumer.h"

#define POLL_IDLE_MAX_MS 40 /* the longest a record waits after an idle spell */
#define UDP_SWEEP_NS 100000000ull /* sweep udp_flows every 100 ms */
#define UDP_WINDOW_NS 1000000000ull /* one udp_send event per destination per second */

static int64_t timens_boot_offset;
static pthread_once_t timens_once = PTHREAD_ONCE_INIT;

/* In a time namespace CLOCK_BOOTTIME reads the host's boot clock plus the namespace's
 * offset, while BPF programs stamp with the host's: read the offset (a line "boottime
 * <s> <ns>", or the clock's number on older kernels) to take it back off. No file (no
 * time namespaces, or an old kernel): no offset. */
static void read_timens_offset(void)
{
	char name[32];
	long long sec;
	long nsec;
	FILE *f = fopen("/proc/self/timens_offsets", "re");

	if (!f)
		return;
	while (fscanf(f, "%31s %lld %ld", name, &sec, &nsec) == 3) {
		if (!strcmp(name, "boottime") || atoi(name) == CLOCK_BOOTTIME)
			timens_boot_offset = sec * 1000000000ll + nsec;
	}
	fclose(f);
}

int64_t nm_boot_offset_ns(void)
{
	pthread_once(&timens_once, read_timens_offset);
	return timens_boot_offset;
}

uint64_t nm_boot_ns(void)
{
	struct timespec ts;
	int64_t off = nm_boot_offset_ns();

	clock_gettime(CLOCK_BOOTTIME, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec - (uint64_t)off;
}

void nm_state_init(struct nm_poll_state *st)
{
	memset(st, 0, sizeof(*st));
	st->udp_fd = -1;
	pthread_mutex_init(&st->lock, NULL);
}

void nm_state_destroy(struct nm_poll_state *st)
{
	nm_ring_close(st);
	if (st->pages)
		munmap(st->pages, st->pages_len);
	st->pages = NULL;
	pthread_mutex_destroy(&st->lock);
}

int nm_ring_open(struct nm_poll_state *st, int map_fd, ring_buffer_sample_fn cb, void *ctx)
{
	long page = sysconf(_SC_PAGESIZE);
	void *pages;

	/* read-only: the kernel lets any page of a ringbuf be mapped so, and the consumer
	 * page only be mapped writable (libbpf's own mapping) */
	pages = mmap(NULL, 2 * page, PROT_READ, MAP_SHARED, map_fd, 0);
	if (pages == MAP_FAILED)
		return -errno;
	st->rb = ring_buffer__new(map_fd, cb, ctx, NULL);
	if (!st->rb) {
		int err = -errno;

		munmap(pages, 2 * page);
		return err;
	}
	st->pages = pages;
	st->pages_len = 2 * page;
	st->cons_pos = pages;
	st->prod_pos = (const unsigned long *)((char *)pages + page);
	return 0;
}

/* ring_buffer__consume under the lock, unless paused or closed; the store's lock is
 * taken once for the whole batch (the callback pushes with nm_store_push_batch), not
 * once a record */
static int consume_locked(struct nm_poll_state *st)
{
	int got = 0;

	pthread_mutex_lock(&st->lock);
	if (st->rb && !st->paused) {
		nm_store_lock(st->store);
		got = ring_buffer__consume(st->rb);
		nm_store_unlock(st->store);
	}
	pthread_mutex_unlock(&st->lock);
	return got;
}

int nm_ring_sync(struct nm_poll_state *st)
{
	return nm_ring_pending(st) ? consume_locked(st) : 0;
}

void nm_ring_close(struct nm_poll_state *st)
{
	pthread_mutex_lock(&st->lock);
	ring_buffer__free(st->rb); /* NULL: a no-op */
	st->rb = NULL;
	pthread_mutex_unlock(&st->lock);
}

/* Move every udp_flows entry whose first datagram is at least min_age_ns old into the
 * store as one udp_send event (packets = the count). Returns events made or -errno. */
static int nm_udp_sweep(int fd, struct nm_store *store, uint64_t min_age_ns)
{
	struct netmon_udp_key *keys = malloc(4096 * sizeof(*keys)), *prev = NULL;
	struct netmon_event ev;
	uint64_t now = nm_boot_ns();
	int n = 0, made = 0;

	if (!keys)
		return -ENOMEM;
	/* collect first: deleting while walking would restart the walk */
	while (n < 4096 && bpf_map_get_next_key(fd, prev, &keys[n]) == 0) {
		prev = &keys[n];
		n++;
	}
	for (int i = 0; i < n; i++) {
		if (bpf_map_lookup_elem(fd, &keys[i], &ev) || now - ev.ts_ns < min_age_ns)
			continue;
		/* atomic: a datagram counted after this lands in a new entry */
		if (bpf_map_lookup_and_delete_elem(fd, &keys[i], &ev) == 0) {
			ev.ts_ns = nm_boot_ns(); /* stamped when its window closes, so the ring's
						    timestamps keep rising */
			nm_store_push(store, &ev, sizeof(ev));
			made++;
		}
	}
	free(keys);
	return made;
}

int nm_poll_loop(struct nm_poll_state *st, int timeout_ms)
{
	int err = 0, wait = timeout_ms;
	int epfd = st->rb ? ring_buffer__epoll_fd(st->rb) : -EBADF;
	struct epoll_event ready;

	if (epfd < 0)
		return epfd;

	st->last_poll_ns = nm_boot_ns();
	while (!st->stop) {
		if (st->paused) {
			struct timespec d = {0, timeout_ms * 1000000L};

			nanosleep(&d, NULL);
		} else {
			/* wait without the lock, so a query's sync never waits for a wake-up */
			int woken = epoll_wait(epfd, &ready, 1, wait);
			int got;

			woken = woken < 0 ? -errno : woken;
			got = woken >= 0 || woken == -EINTR ? consume_locked(st) : woken;

			if (got < 0 && got != -EINTR) {
				err = got;
				break;
			}
			/* idle: wake less often (each wake-up costs tens of µs here), up to
			 * POLL_IDLE_MAX_MS; as soon as records flow, back to timeout_ms */
			wait = woken > 0 || got > 0 ? timeout_ms
			       : wait * 2 < POLL_IDLE_MAX_MS ? wait * 2 : POLL_IDLE_MAX_MS;
		}
		st->last_poll_ns = nm_boot_ns();
		if (st->udp_fd >= 0 && st->last_poll_ns - st->udp_swept_ns >= UDP_SWEEP_NS) {
			nm_udp_sweep(st->udp_fd, st->store, UDP_WINDOW_NS);
			st->udp_swept_ns = st->last_poll_ns;
		}
	}
	if (!err)
		consume_locked(st); /* what arrived before detach */
	if (st->udp_fd >= 0)
		nm_udp_sweep(st->udp_fd, st->store, 0); /* and every open UDP window */
	st->error = err;
	return err;
}

static char log_buf[16384];
static size_t log_len;
static int log_keep_debug;
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;

static int nm_log_print(enum libbpf_print_level level, const char *fmt, va_list ap)
{
	char line[1024];
	int len;

	if (level == LIBBPF_DEBUG && !log_keep_debug)
		return 0;
	len = vsnprintf(line, sizeof(line), fmt, ap);
	if (len < 0)
		return 0;
	if ((size_t)len >= sizeof(line))
		len = sizeof(line) - 1;
	pthread_mutex_lock(&log_lock);
	if (log_len + len > sizeof(log_buf)) { /* keep the tail */
		size_t drop = log_len + len - sizeof(log_buf);

		memmove(log_buf, log_buf + drop, log_len - drop);
		log_len -= drop;
	}
	memcpy(log_buf + log_len, line, len);
	log_len += len;
	pthread_mutex_unlock(&log_lock);
	return len;
}

void nm_log_install(int keep_debug)
{
	log_keep_debug = keep_debug;
	libbpf_set_print(nm_log_print);
}

size_t nm_log_tail(char *buf, size_t size)
{
	size_t n;

	pthread_mutex_lock(&log_lock);
	n = log_len < size ? log_len : size;
	memcpy(buf, log_buf + log_len - n, n);
	pthread_mutex_unlock(&log_lock);
	return n;
}

void nm_log_clear(void)
{
	pthread_mutex_lock(&log_lock);
	log_len = 0;
	pthread_mutex_unlock(&log_lock);
}

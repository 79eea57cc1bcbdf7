/* The event store: see store.h. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <sys/mman.h>
#include <sched.h>
#include <sys/socket.h>
#include "hash.h"
#include "store.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23 /* Linux 5.14; older libc headers lack it */
#endif

#define NM_SCAN_CHUNK 1024 /* records a query visits per hold of the lock */
#define NM_ROLL_BYTES_PER_RECORD 32 /* the rollups' memory bound: a quarter of the ring's */
#define NM_ROLL_BYTES_MIN (4u << 20)

static size_t group_key(const struct nm_filter *f, int by, const struct netmon_event *e,
			uint8_t *key);
static int nm_failed(const struct netmon_event *e);

/* Locking. Writers (the ring-buffer callback, sweeps, tests) announce themselves when
 * they find the lock taken; a query scanning in chunks lets an announced writer in
 * before taking its next chunk, so capture waits for at most one chunk of a scan
 * (NM_SCAN_CHUNK records: a few µs), never for a whole query. Without the handoff a
 * releasing reader would take the lock straight back before the sleeping writer woke. */
void nm_store_lock(struct nm_store *s)
{
	if (pthread_mutex_trylock(&s->lock) == 0)
		return;
	__atomic_add_fetch(&s->writers_waiting, 1, __ATOMIC_RELAXED);
	pthread_mutex_lock(&s->lock);
	__atomic_sub_fetch(&s->writers_waiting, 1, __ATOMIC_RELAXED);
}

void nm_store_unlock(struct nm_store *s)
{
	pthread_mutex_unlock(&s->lock);
}

static void reader_lock(struct nm_store *s);

/* a reader between two chunks: release, let any announced writer through, retake. The
 * wait is bounded: a writer that keeps the lock longer (a whole ring-buffer batch) is
 * waited for on the mutex itself. */
static void reader_pause(struct nm_store *s)
{
	pthread_mutex_unlock(&s->lock);
	for (unsigned i = 0; i < 1000 && __atomic_load_n(&s->writers_waiting, __ATOMIC_RELAXED);
	     i++)
		sched_yield();
	reader_lock(s);
}

/* a writer holding the lock over a batch: every NM_SCAN_CHUNK records, if a reader
 * waits, give it one chunk */
void nm_store_writer_pause(struct nm_store *s)
{
	if (!__atomic_load_n(&s->readers_waiting, __ATOMIC_RELAXED))
		return;
	pthread_mutex_unlock(&s->lock);
	for (unsigned i = 0; i < 1000 && __atomic_load_n(&s->readers_waiting, __ATOMIC_RELAXED);
	     i++)
		sched_yield();
	nm_store_lock(s);
}

/* a reader's first lock, announced so a writer in a batch can let it in */
static void reader_lock(struct nm_store *s)
{
	if (pthread_mutex_trylock(&s->lock) == 0)
		return;
	__atomic_add_fetch(&s->readers_waiting, 1, __ATOMIC_RELAXED);
	pthread_mutex_lock(&s->lock);
	__atomic_sub_fetch(&s->readers_waiting, 1, __ATOMIC_RELAXED);
}

/* Zeroed memory committed up front, in 4 KiB pages. Measured on a fresh 1M-record store
 * (UDP connect loop, netmon's CPU per event, medians of 7 runs): pages touched lazily as
 * the ring fills cost ~310 ns/event until it is full (the kernel zeroing each new page in
 * the consumer's path), lazily in transparent huge pages 760 ns and erratic (150–2650:
 * each first touch zeroes 2 MiB), committed at start ~215 ns, the wrapping steady state;
 * start-up time did not change measurably. The RSS is the configured bound from the
 * start instead of growing to it, and a store the host cannot hold fails here, with
 * ENOMEM, not later under load. */
static void *big_alloc(size_t size)
{
	void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED)
		return NULL;
	if (madvise(p, size, MADV_POPULATE_WRITE) == 0)
		return p;
	if (errno != EINVAL) { /* EINVAL: before Linux 5.14, which has no populate advice */
		munmap(p, size);
		return NULL;
	}
	for (size_t i = 0; i < size; i += 4096)
		((volatile char *)p)[i] = 0;
	return p;
}

int nm_store_init(struct nm_store *s, uint64_t capacity)
{
	memset(s, 0, sizeof(*s));
	if (capacity == 0 || capacity > (1ull << 40) / sizeof(*s->ring))
		return -EINVAL;
	s->ring = big_alloc(capacity * sizeof(*s->ring));
	s->keys = big_alloc(capacity * sizeof(*s->keys));
	s->waiting = calloc(NM_JOIN_SLOTS, sizeof(*s->waiting));
	s->early = calloc(NM_JOIN_SLOTS, sizeof(*s->early));
	s->capacity = capacity;
	s->use_rollups = 1;
	if (nm_roll_init(&s->roll, capacity * NM_ROLL_BYTES_PER_RECORD > NM_ROLL_BYTES_MIN ?
			 capacity * NM_ROLL_BYTES_PER_RECORD : NM_ROLL_BYTES_MIN) ||
	    !s->ring || !s->keys || !s->waiting || !s->early) {
		nm_store_free(s);
		return -ENOMEM;
	}
	pthread_mutex_init(&s->lock, NULL);
	pthread_mutex_init(&s->top_cache_lock, NULL);
	return 0;
}

static void top_cache_free(struct nm_top_cache *c);

void nm_store_free(struct nm_store *s)
{
	if (!s->capacity)
		return;
	if (s->ring && s->keys && s->waiting && s->early) {
		pthread_mutex_destroy(&s->lock);
		pthread_mutex_destroy(&s->top_cache_lock);
	}
	for (int k = 0; k < NM_RK_N; k++)
		top_cache_free(s->top_cache[k]);
	if (s->ring)
		munmap(s->ring, s->capacity * sizeof(*s->ring));
	if (s->keys)
		munmap(s->keys, s->capacity * sizeof(*s->keys));
	free(s->waiting);
	free(s->early);
	nm_roll_free(&s->roll);
	memset(s, 0, sizeof(*s));
}

static inline uint32_t comm_tag(const char *comm)
{
	uint64_t a, b;

	_Static_assert(NETMON_COMM_LEN == 16, "comm_tag reads comm as two words");
	memcpy(&a, comm, 8);
	memcpy(&b, comm + 8, 8);
	return (uint32_t)(mix(mix(a) ^ b) >> 32) & ~0xffu;
}

static inline uint64_t held(const struct nm_store *s)
{
	return s->head < s->capacity ? s->head : s->capacity;
}

static inline uint64_t join_slot(uint64_t sock_id)
{
	return mix(sock_id >> 4) & (NM_JOIN_SLOTS - 1);
}

/* the handshake histogram's bounds, µs: 50 µs (loopback) to 5 s (SYN retries) */
static const uint32_t lat_bounds_us[NM_LAT_BUCKETS] = {
	50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000, 500000,
	1000000, 2500000, 5000000, UINT32_MAX};

/* caller holds the lock; a few compares, no allocation */
static void count_handshake(struct nm_store *s, const struct netmon_event *o)
{
	int i = 0, failed;

	if (o->outcome != NETMON_OUTCOME_ESTABLISHED && o->outcome != NETMON_OUTCOME_FAILED)
		return;
	failed = o->outcome == NETMON_OUTCOME_FAILED;
	while (o->latency_us > lat_bounds_us[i])
		i++;
	s->handshakes[failed][i]++;
	s->handshake_us[failed] += o->latency_us;
}

struct nm_handshakes nm_store_handshakes(struct nm_store *s)
{
	struct nm_handshakes h;

	memcpy(h.bounds_us, lat_bounds_us, sizeof(h.bounds_us));
	pthread_mutex_lock(&s->lock);
	memcpy(h.established, s->handshakes[0], sizeof(h.established));
	memcpy(h.failed, s->handshakes[1], sizeof(h.failed));
	h.established_us = s->handshake_us[0];
	h.failed_us = s->handshake_us[1];
	pthread_mutex_unlock(&s->lock);
	return h;
}

#define NM_ATTEMPT_PROBES 16

/* caller holds the lock; a bounded probe, so a flood of odd families costs no more */
static void count_key(struct nm_store *s, uint16_t family, uint16_t protocol, int32_t ret)
{
	uint32_t h = mix((uint64_t)family << 48 | (uint64_t)protocol << 32 | (uint32_t)ret) >> 56;

	for (unsigned i = 0; i < NM_ATTEMPT_PROBES; i++) {
		struct nm_attempt *a = &s->attempts[(h + i) % NM_ATTEMPT_SLOTS];

		if (!a->count) {
			a->family = family;
			a->protocol = protocol;
			a->ret = ret;
		} else if (a->family != family || a->protocol != protocol || a->ret != ret) {
			continue;
		}
		a->count++;
		return;
	}
	s->attempts_other++;
}

/* caller holds the lock: count a connect attempt by what happened to it */
static void count_attempt(struct nm_store *s, const struct netmon_event *e)
{
	static const int32_t keys[] = {[NM_R_OK] = 0, [NM_R_PENDING] = NM_RET_PENDING,
				       [NM_R_UNKNOWN] = NM_RET_UNKNOWN};
	int r = nm_result(e);
	int32_t ret = r != NM_R_ERROR ? keys[r] : e->ret < 0 ? e->ret : NM_RET_OTHER;

	count_key(s, e->family, e->protocol, ret);
}

/* the handshake's outcome o, applied to its connect event e. The return code stays what
 * connect() returned, except where it was EINPROGRESS (ret then says how the attempt
 * ended) or unknown (a blocking connect returns what its handshake came to). */
static void apply_outcome(struct netmon_event *e, const struct netmon_event *o)
{
	e->outcome = o->outcome;
	e->latency_us = o->latency_us;
	if ((e->family == AF_INET || e->family == AF_INET6) && !e->src_port && o->src_port) {
		/* the hook ran before the kernel chose it */
		e->src_port = o->src_port;
		memcpy(e->src_addr, o->src_addr, sizeof(e->src_addr));
	}
	if (e->flags & (NETMON_F_NO_RESULT | NETMON_F_INPROGRESS)) {
		e->ret = o->outcome == NETMON_OUTCOME_FAILED ? o->ret : 0;
		e->flags &= ~NETMON_F_NO_RESULT;
	}
}

/* the rollups' keys of a record: its pid, command and destination as top-N groups them */
static void roll_keys(const struct netmon_event *e, uint8_t keys[NM_RK_N][NM_RK_KEY_MAX],
		      uint32_t klen[NM_RK_N])
{
	memset(keys[NM_RK_DEST], 0, NM_RK_KEY_MAX); /* compared padded */
	klen[NM_RK_PID] = group_key(NULL, NM_BY_PID, e, keys[NM_RK_PID]);
	klen[NM_RK_COMM] = group_key(NULL, NM_BY_COMM, e, keys[NM_RK_COMM]);
	klen[NM_RK_DEST] = group_key(NULL, NM_BY_DEST, e, keys[NM_RK_DEST]);
}

static void roll_failed(struct nm_store *s, const struct netmon_event *e, uint64_t seq,
			int delta)
{
	uint8_t keys[NM_RK_N][NM_RK_KEY_MAX];
	uint32_t klen[NM_RK_N];

	roll_keys(e, keys, klen);
	nm_roll_failed(&s->roll, seq, keys, klen, delta);
}

/* a[0..16) == b[0..16), in two loads each (memcmp of a length known only at run time is
 * a library call, ~10 % of the consumer's time in a connect loop) */
_Static_assert(NETMON_COMM_LEN == 16, "roll_push compares comm as 16 bytes");

static inline int same16(const uint8_t *a, const uint8_t *b)
{
	uint64_t x[2], y[2];

	memcpy(x, a, 16);
	memcpy(y, b, 16);
	return x[0] == y[0] && x[1] == y[1];
}

/* the stored record e, sequence number seq, into its bucket; caller holds the lock */
static void roll_push(struct nm_store *s, const struct netmon_event *e, uint64_t seq)
{
	struct nm_bucket *b = nm_roll_bucket(&s->roll, seq, e->ts_ns);
	uint8_t keys[NM_RK_N][NM_RK_KEY_MAX];
	uint32_t klen[NM_RK_N];
	struct nm_roll_last *l = &s->roll_last;
	uint8_t alen = e->addr_len < NETMON_ADDR_LEN ? e->addr_len : NETMON_ADDR_LEN;

	nm_roll_evict(&s->roll, seq > s->capacity ? seq - s->capacity + 1 : 1);
	if (e->kind != NETMON_KIND_CONNECT)
		return;
	/* one process connecting to one place in a loop: the same three entries again. Its
	 * fields compared here cost less than building the keys (the destination's is 56
	 * bytes) and comparing those. An inet address is compared as 16 bytes (the last
	 * record's were all kept): equal then means equal in its addr_len bytes. */
	if (l->bucket == b->id + 1 && l->pid == e->pid && l->family == e->family &&
	    l->port == e->port && l->addr_len == e->addr_len &&
	    same16((const uint8_t *)l->comm, (const uint8_t *)e->comm) &&
	    (alen <= 16 ? same16(l->addr, e->addr) : !memcmp(l->addr, e->addr, alen))) {
		nm_roll_repeat(b, seq, nm_failed(e));
		return;
	}
	roll_keys(e, keys, klen);
	nm_roll_add(&s->roll, b, seq, keys, klen, nm_failed(e));
	*l = (struct nm_roll_last){.bucket = b->id + 1, .pid = e->pid, .family = e->family,
				   .port = e->port, .addr_len = e->addr_len};
	memcpy(l->comm, e->comm, NETMON_COMM_LEN);
	memcpy(l->addr, e->addr, alen <= 16 ? 16 : alen);
}

/* caller holds the lock */
static void push_outcome(struct nm_store *s, const struct netmon_event *o)
{
	struct nm_join *w = &s->waiting[join_slot(o->sock_id)];
	struct netmon_event *early;

	if (w->sock_id == o->sock_id) {
		struct netmon_event *e = &s->ring[(w->seq - 1) % s->capacity];

		w->sock_id = 0;
		s->in_flight--;
		if (w->seq + held(s) > s->head && e->sock_id == o->sock_id) {
			int was = nm_failed(e);

			apply_outcome(e, o);
			count_attempt(s, e);
			if (nm_failed(e) != was) /* the rollups count failures too */
				roll_failed(s, e, w->seq, nm_failed(e) - was);
			return;
		}
		/* its event was overwritten: the attempt is still counted by its outcome */
		count_key(s, w->family, IPPROTO_TCP, o->outcome == NETMON_OUTCOME_FAILED ?
			  o->ret : 0);
		s->unmatched++;
		return;
	}
	/* the connect event is not here yet (a blocking connect's record comes at
	 * syscall exit, after its handshake): keep the outcome for it */
	early = &s->early[join_slot(o->sock_id)];
	if (early->sock_id)
		s->unmatched++;
	*early = *o;
}

/* caller holds the lock; e is the stored copy with sequence seq, a TCP connect with a
 * socket: takes an outcome that came first, else waits for it if the handshake is
 * pending. Counts the attempt once what happened is known. */
static void join_connect(struct nm_store *s, struct netmon_event *e, uint64_t seq)
{
	struct netmon_event *early = &s->early[join_slot(e->sock_id)];
	struct nm_join *w;

	if (early->sock_id == e->sock_id) {
		apply_outcome(e, early);
		early->sock_id = 0;
	}
	if (e->outcome != NETMON_OUTCOME_PENDING) {
		count_attempt(s, e);
		return;
	}
	w = &s->waiting[join_slot(e->sock_id)];
	if (w->sock_id) { /* displaced: its outcome can no longer be joined */
		count_key(s, w->family, IPPROTO_TCP, NM_RET_PENDING);
		s->in_flight--;
	}
	*w = (struct nm_join){e->sock_id, seq, e->family};
	s->in_flight++;
}

uint64_t nm_store_attempts(struct nm_store *s, struct nm_attempt *out, uint64_t *other)
{
	uint64_t n = 0;

	reader_lock(s);
	for (unsigned i = 0; i < NM_ATTEMPT_SLOTS; i++)
		if (s->attempts[i].count)
			out[n++] = s->attempts[i];
	*other = s->attempts_other;
	nm_store_unlock(s);
	return n;
}

int nm_store_push(struct nm_store *s, const void *data, size_t size)
{
	nm_store_lock(s);
	nm_store_push_held(s, data, size);
	nm_store_unlock(s);
	return 0;
}

/* a full record, or a connect cut short after its address (netmon.h) */
static int record_size_ok(const struct netmon_event *in, size_t size)
{
	if (size == sizeof(*in))
		return 1;
	return (size == NETMON_EVENT_INET4_LEN || size == NETMON_EVENT_INET6_LEN) &&
	       in->kind == NETMON_KIND_CONNECT;
}

/* in (size bytes: record_size_ok) into slot e, a short record's missing tail zero; each
 * size a constant, so the copies are inlined moves, not library calls */
static inline void copy_record(struct netmon_event *e, const struct netmon_event *in,
			       size_t size)
{
	if (size == sizeof(*e)) {
		memcpy(e, in, sizeof(*e));
	} else if (size == NETMON_EVENT_INET4_LEN) {
		memcpy(e, in, NETMON_EVENT_INET4_LEN);
		memset((char *)e + NETMON_EVENT_INET4_LEN, 0, sizeof(*e) - NETMON_EVENT_INET4_LEN);
	} else {
		memcpy(e, in, NETMON_EVENT_INET6_LEN);
		memset((char *)e + NETMON_EVENT_INET6_LEN, 0, sizeof(*e) - NETMON_EVENT_INET6_LEN);
	}
}

/* slots this far ahead of the one being written are fetched early: a wrapping store's
 * next slot was last touched a whole ring ago and is never in cache, and reading the
 * record just written stalled on it (~60 % of this function's samples under a loop) */
#define NM_PREFETCH_AHEAD 8

int nm_store_push_held(struct nm_store *s, const void *data, size_t size)
{
	const struct netmon_event *in = data;

	if (!record_size_ok(in, size)) {
		s->malformed++;
	} else if (in->kind == NETMON_KIND_TCP_OUTCOME) {
		count_handshake(s, in);
		if (in->sock_id)
			push_outcome(s, in);
		else
			s->unmatched++;
	} else {
		uint64_t slot = s->head % s->capacity;
		struct netmon_event *e = &s->ring[slot];

		const char *ahead = (const char *)&s->ring[(slot + NM_PREFETCH_AHEAD) % s->capacity];

		__builtin_prefetch(ahead, 1);
		__builtin_prefetch(ahead + 64, 1);
		if (s->head >= s->capacity)
			s->evicted++;
		copy_record(e, in, size);
		s->keys[slot].pid = e->pid;
		s->keys[slot].tag = comm_tag(e->comm) | e->kind;
		if (e->pid != s->tail_pid || e->cgroup_id != s->tail_cgroup) {
			s->runs++;
			s->tail_pid = e->pid;
			s->tail_cgroup = e->cgroup_id;
		}
		__atomic_store_n(&s->head, s->head + 1, __ATOMIC_RELEASE); /* top_result peeks */
		if (e->kind == NETMON_KIND_CONNECT) {
			if (!(e->flags & NETMON_F_NO_RESULT) && e->ret == -EINPROGRESS)
				e->flags |= NETMON_F_INPROGRESS;
			if (e->sock_id && e->protocol == IPPROTO_TCP)
				join_connect(s, e, s->head);
			else
				count_attempt(s, e);
		} else if (e->kind == NETMON_KIND_ACCEPT) {
			s->accepts++;
		}
		roll_push(s, e, s->head); /* after the join: an early outcome counts */
	}
	return 0;
}

int nm_store_push_batch(struct nm_store *s, const void *data, size_t size)
{
	nm_store_push_held(s, data, size);
	if (++s->batch % NM_SCAN_CHUNK == 0)
		nm_store_writer_pause(s);
	return 0;
}

/* logical index i (0 = oldest held) -> record; caller holds the lock */
static inline const struct netmon_event *at(const struct nm_store *s, uint64_t first_seq, uint64_t i)
{
	return &s->ring[(first_seq - 1 + i) % s->capacity];
}

struct nm_counters nm_store_counters(struct nm_store *s)
{
	struct nm_counters c;

	reader_lock(s);
	c = (struct nm_counters){s->head, held(s), s->evicted, s->malformed, s->unmatched,
				 s->in_flight, s->accepts, 0, s->roll.n, s->roll.bytes,
				 s->roll.given_up, s->runs, s->tail_cgroup, s->tail_pid};
	if (c.size)
		c.oldest_ts = at(s, s->head - c.size + 1, 0)->ts_ns;
	nm_store_unlock(s);
	return c;
}

/* first logical index in [0, n) whose ts >= t; timestamps rise along the ring */
static uint64_t lower_bound(const struct nm_store *s, uint64_t first_seq, uint64_t n, uint64_t t)
{
	uint64_t lo = 0, hi = n;

	while (lo < hi) {
		uint64_t mid = lo + (hi - lo) / 2;

		if (at(s, first_seq, mid)->ts_ns < t)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

/* the [lo, hi) logical range a filter's time window and cursor allow */
static void window(const struct nm_store *s, const struct nm_filter *f, uint64_t *first_seq,
		   uint64_t *lo, uint64_t *hi)
{
	uint64_t n = held(s);

	*first_seq = s->head - n + 1;
	*lo = f->since_ns ? lower_bound(s, *first_seq, n, f->since_ns) : 0;
	*hi = f->until_ns ? lower_bound(s, *first_seq, n, f->until_ns) : n;
	if (f->after_seq >= *first_seq) {
		uint64_t skip = f->after_seq - *first_seq + 1;

		if (skip > *lo)
			*lo = skip > n ? n : skip;
	}
	if (*hi < *lo)
		*hi = *lo;
}

/* a failed attempt: the handshake failed, or connect() returned an error */
static inline int nm_failed(const struct netmon_event *e)
{
	return nm_result(e) == NM_R_ERROR;
}

/* the result part of a filter: what happened to the attempt (see nm_result) */
static inline int result_match(uint32_t m, int32_t want, const struct netmon_event *e)
{
	int r = nm_result(e);

	if ((m & NM_Q_OK) && r != NM_R_OK)
		return 0;
	if ((m & NM_Q_ERROR) && r != NM_R_ERROR)
		return 0;
	if ((m & NM_Q_PENDING) && r != NM_R_PENDING)
		return 0;
	if ((m & NM_Q_UNKNOWN) && r != NM_R_UNKNOWN)
		return 0;
	if (m & NM_Q_RET) { /* the errno the event's error field names */
		if (want == 0)
			return r == NM_R_OK;
		return r != NM_R_OK && !(e->flags & NETMON_F_NO_RESULT) && e->ret == want;
	}
	return 1;
}

static int dest_match(const struct nm_filter *f, const struct netmon_event *e)
{
	unsigned bits = f->dest_len, full = bits / 8, rest = bits % 8;

	if (e->family != f->dest_family)
		return 0;
	if (f->dest_family == AF_UNIX) /* a path prefix */
		return e->addr_len >= f->dest_len && memcmp(e->addr, f->dest, f->dest_len) == 0;
	if (memcmp(e->addr, f->dest, full) != 0)
		return 0;
	return !rest || ((e->addr[full] ^ f->dest[full]) & (0xff00 >> rest) & 0xff) == 0;
}

static inline int inet(const struct netmon_event *e)
{
	return e->family == AF_INET || e->family == AF_INET6;
}

/* inet only: the source address within src/src_len, and known (src_port set) */
static int src_match(const struct nm_filter *f, const struct netmon_event *e)
{
	unsigned bits = f->src_len, full = bits / 8, rest = bits % 8;

	if (e->family != f->src_family || !e->src_port)
		return 0;
	if (memcmp(e->src_addr, f->src, full) != 0)
		return 0;
	return !rest || ((e->src_addr[full] ^ f->src[full]) & (0xff00 >> rest) & 0xff) == 0;
}

_Static_assert(sizeof(struct nm_name_window) == 48, "nm_name_window is 48 bytes");

/* the group of the names window e's (net_ns, destination, ts) falls in; 0 if none */
static uint32_t name_group(const struct nm_filter *f, const struct netmon_event *e)
{
	uint8_t key[24] = {0};
	uint16_t family = e->family;
	const uint8_t *addr = e->addr;
	uint64_t lo = 0, hi = f->n_names;
	static const uint8_t v4mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

	if (family == AF_INET6 && e->addr_len == 16 && memcmp(addr, v4mapped, 12) == 0) {
		family = AF_INET;
		addr += 12;
	} else if (!((family == AF_INET && e->addr_len == 4) ||
		     (family == AF_INET6 && e->addr_len == 16))) {
		return 0;
	}
	memcpy(key, &e->net_ns, 4);
	memcpy(key + 4, &family, 2);
	memcpy(key + 8, addr, family == AF_INET ? 4 : 16);
	while (lo < hi) { /* the first window of this (net_ns, address) */
		uint64_t mid = lo + (hi - lo) / 2;

		if (memcmp(&f->names[mid], key, 24) < 0)
			lo = mid + 1;
		else
			hi = mid;
	}
	for (; lo < f->n_names && memcmp(&f->names[lo], key, 24) == 0; lo++)
		if (f->names[lo].from_ns <= e->ts_ns && e->ts_ns < f->names[lo].to_ns)
			return f->names[lo].group;
	return 0;
}

static int has_cgroup(const struct nm_filter *f, uint64_t id)
{
	uint64_t lo = 0, hi = f->n_cgroups;

	while (lo < hi) {
		uint64_t mid = lo + (hi - lo) / 2;

		if (f->cgroups[mid] < id)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo < f->n_cgroups && f->cgroups[lo] == id;
}

/* (pid, seq) within one of the process ranges: the first range of pid by binary search,
 * then its few neighbours (a pid has more than one range only if it was reused) */
static int has_proc(const struct nm_filter *f, uint32_t pid, uint64_t seq)
{
	uint64_t lo = 0, hi = f->n_procs;

	while (lo < hi) {
		uint64_t mid = lo + (hi - lo) / 2;

		if (f->procs[mid].pid < pid)
			lo = mid + 1;
		else
			hi = mid;
	}
	for (; lo < f->n_procs && f->procs[lo].pid == pid; lo++)
		if (seq >= f->procs[lo].lo_seq && seq < f->procs[lo].hi_seq)
			return 1;
	return 0;
}

static inline int match(const struct nm_filter *f, const struct netmon_event *e)
{
	uint32_t m = f->mask;

	if (!m)
		return 1;
	if ((m & NM_Q_PID) && e->pid != f->pid)
		return 0;
	if ((m & NM_Q_COMM) && memcmp(e->comm, f->comm, NETMON_COMM_LEN) != 0)
		return 0;
	if ((m & NM_Q_KIND) && e->kind != f->kind)
		return 0;
	if ((m & NM_Q_FAMILY) && e->family != f->family)
		return 0;
	if ((m & NM_Q_PROTOCOL) && e->protocol != f->protocol)
		return 0;
	if ((m & NM_Q_PORT) && e->port != f->port)
		return 0;
	if ((m & NM_Q_DEST) && !dest_match(f, e))
		return 0;
	if ((m & NM_Q_SPORT) && !(inet(e) && e->src_port == f->sport))
		return 0;
	if ((m & NM_Q_SRC) && !src_match(f, e))
		return 0;
	if ((m & NM_Q_NAME) && !name_group(f, e))
		return 0;
	if ((m & NM_Q_CGROUPS) && !has_cgroup(f, e->cgroup_id))
		return 0;
	return !(m & NM_Q_RESULT) || result_match(m, f->ret, e);
}

/* match(), and the process ranges, which need the record's sequence number */
static inline int match_at(const struct nm_filter *f, const struct netmon_event *e,
			   uint64_t seq)
{
	if ((f->mask & NM_Q_PROCS) && !has_proc(f, e->pid, seq))
		return 0;
	return match(f, e);
}

/* the part of a filter the key column can answer */
struct prefilter {
	uint32_t pid, tag, tagmask;
	int by_pid;
};

static struct prefilter prefilter_of(const struct nm_filter *f)
{
	struct prefilter p = {f->pid, 0, 0, !!(f->mask & NM_Q_PID)};

	if (f->mask & NM_Q_COMM) {
		p.tag |= comm_tag(f->comm);
		p.tagmask |= ~0xffu;
	}
	if (f->mask & NM_Q_KIND) {
		p.tag |= f->kind;
		p.tagmask |= 0xffu;
	}
	return p;
}

static inline int prematch(const struct prefilter *p, const struct nm_key *k)
{
	return (!p->by_pid || k->pid == p->pid) && (k->tag & p->tagmask) == p->tag;
}

/* ---- scanning in chunks ----
 * A scan visits the sequence numbers [lo, hi) of its window, newest first (back) or
 * oldest first, holding the lock for at most NM_SCAN_CHUNK records at a time. Between
 * chunks the consumer may push (records past hi: not this answer's) and evict (the
 * range's old end is clamped to the oldest record still held: a forward scan skips what
 * went, a backward one ends sooner). An answer thus counts each record of its window that
 * was still held when the scan reached it; on a quiet store, exactly the window. */

static inline uint64_t first_held(const struct nm_store *s)
{
	return s->head - held(s) + 1;
}

struct scan {
	uint64_t lo, hi; /* sequence numbers still to visit */
	int back;
	struct prefilter p;
	const struct nm_filter *f;
	int exact; /* the key column answers f alone: the records need not be read */
};

/* 0: go on, 1: stop, < 0: stop with that error */
typedef int (*visit_fn)(void *ctx, struct nm_store *s, uint64_t seq,
			const struct netmon_event *e);

/* the window of f as sequence numbers; caller holds the lock */
static struct scan scan_of(const struct nm_store *s, const struct nm_filter *f, int back)
{
	uint64_t first, lo, hi;

	window(s, f, &first, &lo, &hi);
	return (struct scan){first + lo, first + hi, back, prefilter_of(f), f,
			     !(f->mask & ~(uint32_t)(NM_Q_KIND | NM_Q_PID))};
}

/* visit one chunk (caller holds the lock) and take it off the range */
static int scan_chunk(struct nm_store *s, struct scan *sc, visit_fn fn, void *ctx)
{
	uint64_t n = sc->hi - sc->lo < NM_SCAN_CHUNK ? sc->hi - sc->lo : NM_SCAN_CHUNK;
	uint64_t seq = sc->back ? sc->hi - 1 : sc->lo, slot = (seq - 1) % s->capacity;
	int rc = 0;

	if (sc->back)
		sc->hi -= n;
	else
		sc->lo += n;
	for (; n; n--) {
		if (prematch(&sc->p, &s->keys[slot]) &&
		    (sc->exact || match_at(sc->f, &s->ring[slot], seq)) &&
		    (rc = fn(ctx, s, seq, &s->ring[slot])))
			return rc;
		if (sc->back) {
			seq--;
			slot = slot ? slot - 1 : s->capacity - 1;
		} else {
			seq++;
			slot = slot + 1 == s->capacity ? 0 : slot + 1;
		}
	}
	return 0;
}

/* the whole range, chunk by chunk; the lock is held on entry and on return, but released
 * between chunks (any writer waiting goes first). Returns 0 or the visitor's error. */
static int scan_run(struct nm_store *s, struct scan *sc, visit_fn fn, void *ctx)
{
	int rc = 0;

	while (sc->lo < sc->hi && !(rc = scan_chunk(s, sc, fn, ctx)) && sc->lo < sc->hi) {
		reader_pause(s);
		if (sc->lo < first_held(s))
			sc->lo = first_held(s);
	}
	return rc < 0 ? rc : 0;
}

/* ---- answers from the rollups ----
 * A window walked newest first, as a scan would, but a whole bucket (not the newest one,
 * which is still filling; not one partly evicted) comes from its tables; the rest, at most
 * a partial bucket at each end of the window and the buckets whose table was given up, is
 * scanned. The lock is released every NM_SCAN_CHUNK units of work, as scans do; merging
 * a bucket's table can span several. */

/* merge bucket b's table k from slot *pos on, spending *budget; 1: done, 0: out of
 * budget, < 0: error */
typedef int (*bucket_fn)(void *ctx, struct nm_store *s, const struct nm_bucket *b, int k,
			 uint32_t *pos, int64_t *budget);

/* the table a filter can be answered from with one key a bucket (NM_RK_PID, NM_RK_COMM, or
 * NM_RK_TOTAL for none), or -1 when it asks for anything else (a scan then) */
static int roll_table_for(const struct nm_store *s, const struct nm_filter *f)
{
	uint32_t m = f->mask & ~NM_Q_KIND;

	if (!s->use_rollups || !(f->mask & NM_Q_KIND) || f->kind != NETMON_KIND_CONNECT)
		return -1;
	return m == 0 ? NM_RK_TOTAL : m == NM_Q_PID ? NM_RK_PID : m == NM_Q_COMM ? NM_RK_COMM : -1;
}

/* the bucket that holds seq if a walk down to lo may take it whole from table k: not one
 * partly evicted, nor partly outside the window. The newest bucket, still filling, is
 * whole when the window reaches the newest record. */
static const struct nm_bucket *whole_bucket(const struct nm_store *s, uint64_t seq,
					    uint64_t lo, int k)
{
	const struct nm_rollup *r = &s->roll;
	uint64_t id = nm_roll_find(r, seq);
	const struct nm_bucket *b;
	uint64_t end;

	if (id == UINT64_MAX)
		return NULL;
	b = nm_roll_at(r, id);
	end = id + 1 < r->first + r->n ? nm_roll_at(r, id + 1)->first_seq : s->head + 1;
	if (b->first_seq < lo || b->first_seq < first_held(s) || end != seq + 1 ||
	    (k < NM_RK_N && (b->over & (1u << k))))
		return NULL;
	return b;
}

/* The window sc (newest first) from table k's buckets and scans; lock held on entry and
 * return. Returns 0, an error, or -EAGAIN when the newest bucket's table grew (moved)
 * while it was being merged: the caller starts again. */
static int roll_run(struct nm_store *s, struct scan *sc, int k, visit_fn fn, bucket_fn bfn,
		    void *ctx)
{
	int64_t budget = NM_SCAN_CHUNK;
	uint64_t bid = UINT64_MAX; /* a bucket being merged */
	const void *table = NULL;  /* its table when the merge began */
	uint32_t pos = 0;
	int rc;

	while (sc->lo < sc->hi) {
		if (budget <= 0) {
			reader_pause(s);
			budget = NM_SCAN_CHUNK;
			if (sc->lo < first_held(s))
				sc->lo = first_held(s);
			/* the bucket being merged went: so did everything older */
			if (bid != UINT64_MAX && (bid < s->roll.first ||
						  nm_roll_at(&s->roll, bid)->first_seq < sc->lo))
				break;
			/* records went on filling it (those counted too: they are in the
			 * window, which reaches the newest), but its table moved */
			if (bid != UINT64_MAX && k < NM_RK_N && nm_roll_at(&s->roll, bid)->t[k].v != table)
				return -EAGAIN;
			continue;
		}
		if (bid == UINT64_MAX) {
			const struct nm_bucket *b = whole_bucket(s, sc->hi - 1, sc->lo, k);

			if (!b) { /* scan back to the start of its bucket, or to lo */
				uint64_t id = nm_roll_find(&s->roll, sc->hi - 1);
				uint64_t start = id == UINT64_MAX ? 0 : nm_roll_at(&s->roll, id)->first_seq;
				struct scan part = *sc;

				part.lo = start > sc->lo ? start : sc->lo;
				if (part.hi - part.lo > (uint64_t)budget)
					part.lo = part.hi - budget;
				budget -= part.hi - part.lo;
				if ((rc = scan_chunk(s, &part, fn, ctx)))
					return rc < 0 ? rc : 0;
				sc->hi = part.lo;
				continue;
			}
			bid = b->id;
			table = k < NM_RK_N ? b->t[k].v : NULL;
			pos = 0;
		}
		rc = bfn(ctx, s, nm_roll_at(&s->roll, bid), k, &pos, &budget);
		if (rc < 0)
			return rc;
		if (rc) {
			sc->hi = nm_roll_at(&s->roll, bid)->first_seq;
			bid = UINT64_MAX;
		}
	}
	return 0;
}

struct roll_count {
	uint64_t count;
	uint8_t key[NM_RK_KEY_MAX];
	uint32_t klen;
};

static int visit_count(void *ctx, struct nm_store *s, uint64_t seq, const struct netmon_event *e)
{
	(void)s, (void)seq, (void)e;
	((struct roll_count *)ctx)->count++;
	return 0;
}

static int bucket_count(void *ctx, struct nm_store *s, const struct nm_bucket *b, int k,
			uint32_t *pos, int64_t *budget)
{
	struct roll_count *c = ctx;
	const struct nm_rent *e;

	(void)s, (void)pos;
	*budget -= 16; /* a lookup costs about as much as 16 records' key checks */
	if (k == NM_RK_TOTAL)
		c->count += b->connects;
	else if ((e = nm_roll_get(b, k, c->key, c->klen)))
		c->count += e->count;
	return 1;
}

/* how many records of the window match f, from the rollups (k: roll_table_for(f)) */
static uint64_t roll_count(struct nm_store *s, const struct nm_filter *f, int k)
{
	struct roll_count c = {0};
	struct netmon_event src = {0}; /* a record with the key asked for */
	struct scan sc;

	src.pid = f->pid;
	memcpy(src.comm, f->comm, NETMON_COMM_LEN);
	if (k != NM_RK_TOTAL)
		c.klen = group_key(NULL, k == NM_RK_PID ? NM_BY_PID : NM_BY_COMM, &src, c.key);
	reader_lock(s);
	sc = scan_of(s, f, 1);
	roll_run(s, &sc, k, visit_count, bucket_count, &c);
	nm_store_unlock(s);
	return c.count;
}

/* a growable array of hits */
struct hits {
	struct nm_hit *v;
	uint64_t n, cap;
};

static int hits_add(struct hits *h, uint64_t seq, const struct netmon_event *e)
{
	if (h->n == h->cap) {
		uint64_t cap = h->cap ? h->cap * 2 : 64;
		struct nm_hit *v = realloc(h->v, cap * sizeof(*v));

		if (!v)
			return -ENOMEM;
		h->v = v;
		h->cap = cap;
	}
	h->v[h->n].seq = seq;
	memcpy(&h->v[h->n].ev, e, sizeof(*e));
	h->n++;
	return 0;
}

static void hits_reverse(struct hits *h)
{
	for (uint64_t i = 0, j = h->n ? h->n - 1 : 0; i < j; i++, j--) {
		struct nm_hit t = h->v[i];

		h->v[i] = h->v[j];
		h->v[j] = t;
	}
}

struct query_ctx {
	struct hits h;
	uint64_t count, limit;
	int want, need_count;
};

static int visit_query(void *ctx, struct nm_store *s, uint64_t seq, const struct netmon_event *e)
{
	struct query_ctx *q = ctx;
	int err;

	(void)s;
	q->count++;
	if (q->want && (q->limit == 0 || q->h.n < q->limit) && (err = hits_add(&q->h, seq, e)))
		return err;
	return q->limit && q->h.n == q->limit && !q->need_count; /* enough */
}

int nm_store_query(struct nm_store *s, const struct nm_filter *f, uint64_t limit, int newest,
		   struct nm_hit **out, uint64_t *n, uint64_t *matched)
{
	struct query_ctx q = {{0}, 0, limit, out != NULL, matched != NULL};
	struct scan sc;
	int err, k = roll_table_for(s, f);

	if (!out && k >= 0) { /* a count: from the rollups */
		if (n)
			*n = 0;
		if (matched)
			*matched = roll_count(s, f, k);
		return 0;
	}
	reader_lock(s);
	sc = scan_of(s, f, newest);
	err = scan_run(s, &sc, visit_query, &q);
	nm_store_unlock(s);
	if (err) {
		free(q.h.v);
		return err;
	}
	if (newest)
		hits_reverse(&q.h);
	if (out)
		*out = q.h.v;
	if (n)
		*n = q.h.n;
	if (matched)
		*matched = q.count;
	return 0;
}

struct follow_ctx {
	struct hits h;
	const struct nm_filter *f;
	uint64_t limit, hold_ns, upto, holder;
	int stopped;
};

/* e matches the filter but for its result. It holds the follower back if it is a TCP
 * handshake still pending, recent enough to wait for; else it is a hit if it matches. */
static int visit_follow(void *ctx, struct nm_store *s, uint64_t seq, const struct netmon_event *e)
{
	struct follow_ctx *c = ctx;
	int err;

	(void)s;
	if (c->hold_ns && e->outcome == NETMON_OUTCOME_PENDING && e->ts_ns >= c->hold_ns) {
		c->holder = seq;
		c->upto = seq - 1;
		c->stopped = 1;
		return 1;
	}
	if (match_at(c->f, e, seq) && (err = hits_add(&c->h, seq, e)))
		return err;
	if (c->limit && c->h.n == c->limit) {
		c->upto = seq;
		c->stopped = 1;
		return 1;
	}
	return 0;
}

int nm_store_follow(struct nm_store *s, const struct nm_filter *f, uint64_t limit,
		    uint64_t hold_ns, struct nm_hit **out, uint64_t *n, uint64_t *upto,
		    uint64_t *holder, uint64_t *oldest)
{
	struct follow_ctx c = {{0}, f, limit, hold_ns, 0, 0, 0};
	struct nm_filter any = *f; /* the walk: a record that matches but for its result
				      is a hit or holds the follower back */
	struct scan sc;
	uint64_t end;
	int err;

	any.mask &= ~NM_Q_RESULT;
	reader_lock(s);
	sc = scan_of(s, &any, 0);
	*oldest = first_held(s);
	end = sc.hi - 1; /* complete up to the window's end, or up to its start if empty */
	err = scan_run(s, &sc, visit_follow, &c);
	nm_store_unlock(s);
	if (err) {
		free(c.h.v);
		return err;
	}
	*upto = c.stopped ? c.upto : end;
	*holder = c.holder;
	*out = c.h.v;
	*n = c.h.n;
	return 0;
}

/* pid -> records taken so far, open addressing; pid 0 never occurs in a user connect
 * but is a valid kernel tgid, so slots carry an explicit used flag */
struct pidcount {
	uint32_t pid, used;
	uint64_t count;
};

struct pidmap {
	struct pidcount *v;
	uint64_t cap, n;
};

static struct pidcount *pidmap_get(struct pidmap *m, uint32_t pid)
{
	if ((m->n + 1) * 2 > m->cap) {
		struct pidmap g = {calloc(m->cap ? m->cap * 2 : 1024, sizeof(struct pidcount)),
				   m->cap ? m->cap * 2 : 1024, 0};

		if (!g.v)
			return NULL;
		for (uint64_t i = 0; i < m->cap; i++) {
			if (m->v[i].used) {
				uint64_t j = mix(m->v[i].pid) & (g.cap - 1);

				while (g.v[j].used)
					j = (j + 1) & (g.cap - 1);
				g.v[j] = m->v[i];
				g.n++;
			}
		}
		free(m->v);
		*m = g;
	}
	uint64_t j = mix(pid) & (m->cap - 1);

	while (m->v[j].used && m->v[j].pid != pid)
		j = (j + 1) & (m->cap - 1);
	if (!m->v[j].used) {
		m->v[j].used = 1;
		m->v[j].pid = pid;
		m->n++;
	}
	return &m->v[j];
}

struct latest_ctx {
	struct hits h;
	struct pidmap m;
	uint64_t per_pid, max_total;
	int by_pid, truncated;
	uint32_t full_pid; /* the last pid seen whose answer is complete (0: none) */
};

static int visit_latest(void *ctx, struct nm_store *s, uint64_t seq, const struct netmon_event *e)
{
	struct latest_ctx *l = ctx;
	struct pidcount *c;
	uint32_t pid;

	if (l->max_total && l->h.n >= l->max_total) { /* the answer is full */
		l->truncated = 1;
		return 1;
	}
	/* the pid from the key column (8 bytes a record, not the record's line): most records
	 * are skipped, and reading each from the ring was most of this scan's cost */
	pid = s->keys[e - s->ring].pid;
	if (pid == l->full_pid && pid) { /* a run of one pid's records: no hashing */
		l->truncated = 1;
		return l->by_pid;
	}
	if (!(c = pidmap_get(&l->m, pid)))
		return -ENOMEM;
	if (c->count++ >= l->per_pid) {
		l->truncated = 1;
		l->full_pid = pid;
		return l->by_pid; /* the one pid asked for is complete */
	}
	if (c->count == l->per_pid)
		l->full_pid = pid;
	return hits_add(&l->h, seq, e);
}

int nm_store_latest_per_pid(struct nm_store *s, const struct nm_filter *f, uint64_t per_pid,
			    uint64_t max_total, struct nm_hit **out, uint64_t *n,
			    uint64_t *pids, int *truncated)
{
	struct latest_ctx l = {{0}, {0}, per_pid, max_total, !!(f->mask & NM_Q_PID), 0, 0};
	struct scan sc;
	int err;

	reader_lock(s);
	sc = scan_of(s, f, 1);
	err = scan_run(s, &sc, visit_latest, &l);
	nm_store_unlock(s);
	free(l.m.v);
	if (err) {
		free(l.h.v);
		return err;
	}
	hits_reverse(&l.h);
	*out = l.h.v;
	*n = l.h.n;
	*pids = l.m.n;
	*truncated = l.truncated;
	return 0;
}

/* ---- top-N ---- */

static size_t group_key(const struct nm_filter *f, int by, const struct netmon_event *e,
			uint8_t *key)
{
	uint32_t group;

	switch (by) {
	case NM_BY_NAME:
		group = name_group(f, e);
		memcpy(key, &group, 4);
		return 4;
	case NM_BY_DEST:
		memcpy(key, &e->family, 2);
		memcpy(key + 2, &e->port, 2);
		key[4] = e->addr_len < NETMON_ADDR_LEN ? e->addr_len : NETMON_ADDR_LEN;
		memcpy(key + 5, e->addr, key[4]);
		return 5 + key[4];
	case NM_BY_COMM:
		memcpy(key, e->comm, NETMON_COMM_LEN);
		return NETMON_COMM_LEN;
	case NM_BY_PID:
		memcpy(key, &e->pid, 4);
		return 4;
	case NM_BY_PORT:
		memcpy(key, &e->port, 2);
		return 2;
	case NM_BY_SERVICE:
		memcpy(key, &e->port, 2);
		memcpy(key + 2, e->comm, NETMON_COMM_LEN);
		return 2 + NETMON_COMM_LEN;
	case NM_BY_CLIENT: /* unknown sources (port 0) group together, address zeroed */
		memcpy(key, &e->family, 2);
		memset(key + 2, 0, 16);
		if (inet(e) && e->src_port)
			memcpy(key + 2, e->src_addr, 16);
		return 18;
	case NM_BY_CGROUP:
		memcpy(key, &e->cgroup_id, 8);
		return 8;
	default: /* NM_BY_ERROR */
		memcpy(key, &e->ret, 4);
		return 4;
	}
}

/* 48 bytes a group and its key's bytes: the representative stays in the ring (by
 * sequence number), so even a window where every record is its own group costs a fraction
 * of the store. The key is kept apart from the ring: a scan releases the lock between
 * chunks, and a record it saw may be overwritten by the time the next one compares. */
struct group {
	uint64_t hash; /* 0: empty slot */
	uint64_t count, failed;
	uint64_t seq;  /* the group's newest record */
	uint32_t koff, klen; /* its key in the table's key bytes */
};

struct gtab {
	struct group *g;
	uint64_t cap, used;
	uint8_t *keys;
	uint64_t klen, kcap;
};

/* largest first; ties: the most recently seen first */
static int by_count_desc(const void *a, const void *b)
{
	const struct group *x = a, *y = b;

	if (x->count != y->count)
		return x->count < y->count ? 1 : -1;
	return x->seq < y->seq ? 1 : x->seq > y->seq ? -1 : 0;
}

static int grow(struct gtab *t)
{
	uint64_t ncap = t->cap ? t->cap * 2 : 256, j;
	struct group *ng = calloc(ncap, sizeof(*ng));

	if (!ng)
		return -ENOMEM;
	for (uint64_t k = 0; k < t->cap; k++) {
		if (!t->g[k].hash)
			continue;
		for (j = t->g[k].hash & (ncap - 1); ng[j].hash; j = (j + 1) & (ncap - 1))
			;
		ng[j] = t->g[k];
	}
	free(t->g);
	t->g = ng;
	t->cap = ncap;
	return 0;
}

/* a group's hash: the rollups' 32-bit hash of its key (so a rollup entry's is reused, not
 * recomputed), never 0 (0 marks an empty slot) */
static inline uint64_t group_hash(uint32_t h32)
{
	return (uint64_t)h32 | 1ull << 32;
}

static inline uint64_t key_group_hash(const uint8_t *key, uint32_t klen)
{
	return group_hash((uint32_t)(key_hash(key, klen) >> 32));
}

/* key's group (hash h), or NULL */
static struct group *gtab_find(const struct gtab *t, const uint8_t *key, uint32_t klen,
			       uint64_t h)
{
	if (!t->cap)
		return NULL;
	for (uint64_t j = h & (t->cap - 1); t->g[j].hash; j = (j + 1) & (t->cap - 1)) {
		struct group *g = &t->g[j];

		if (g->hash == h && g->klen == klen && memcmp(t->keys + g->koff, key, klen) == 0)
			return g;
	}
	return NULL;
}

/* the group of key, hash h (new groups start empty), or NULL without memory */
static struct group *gtab_get(struct gtab *t, const uint8_t *key, uint32_t klen, uint64_t h)
{
	uint64_t j;

	if ((t->used + 1) * 2 > t->cap && grow(t))
		return NULL;
	for (j = h & (t->cap - 1); t->g[j].hash; j = (j + 1) & (t->cap - 1)) {
		struct group *g = &t->g[j];

		if (g->hash == h && g->klen == klen && memcmp(t->keys + g->koff, key, klen) == 0)
			return g;
	}
	if (t->klen + klen > t->kcap) {
		uint64_t kcap = t->kcap ? t->kcap * 2 : 4096;
		uint8_t *k = kcap > UINT32_MAX ? NULL : realloc(t->keys, kcap);

		if (!k)
			return NULL;
		t->keys = k;
		t->kcap = kcap;
	}
	memcpy(t->keys + t->klen, key, klen);
	t->g[j] = (struct group){h, 0, 0, 0, (uint32_t)t->klen, klen};
	t->klen += klen;
	t->used++;
	return &t->g[j];
}

static void gtab_free(struct gtab *t)
{
	free(t->g);
	free(t->keys);
}

struct top_ctx {
	struct gtab t;
	int by;
	uint64_t count;
	const struct nm_filter *f; /* by name: the filter's name windows */
};

static int visit_top(void *ctx, struct nm_store *s, uint64_t seq, const struct netmon_event *e)
{
	struct top_ctx *c = ctx;
	uint8_t key[8 + NETMON_ADDR_LEN];
	struct group *g;
	int failed = nm_failed(e);
	size_t klen;

	(void)s;
	if (c->by == NM_BY_ERROR && !failed)
		return 0;
	c->count++;
	klen = group_key(c->f, c->by, e, key);
	if (!(g = gtab_get(&c->t, key, klen, key_group_hash(key, klen))))
		return -ENOMEM;
	if (seq > g->seq) /* the group's newest record */
		g->seq = seq;
	g->count++;
	g->failed += failed;
	return 0;
}

/* the next used entry of table t (of kind k) from *pos on, *pos moved past it, spending
 * *budget; NULL when the table is done (*pos == its cap) or the budget is spent */
static const struct nm_rent *rtab_next(const struct nm_rtab *t, int k, uint32_t *pos,
				       int64_t *budget)
{
	uint32_t stride = nm_roll_stride(k);

	for (; *pos < t->cap && *budget > 0; (*pos)++) {
		const struct nm_rent *e = (const void *)(t->v + (size_t)*pos * stride);

		*budget -= 1;
		if (e->last_seq) {
			*budget -= 3;
			(*pos)++;
			return e;
		}
	}
	return NULL;
}

/* merge bucket b's table k into the groups */
static int bucket_top(void *ctx, struct nm_store *s, const struct nm_bucket *b, int k,
		      uint32_t *pos, int64_t *budget)
{
	struct top_ctx *c = ctx;
	const struct nm_rent *e;
	struct group *g;

	(void)s;
	while ((e = rtab_next(&b->t[k], k, pos, budget))) {
		if (!(g = gtab_get(&c->t, e->key, nm_roll_klen(k, e->key), group_hash(e->hash))))
			return -ENOMEM;
		g->count += e->count;
		g->failed += e->failed;
		if (e->last_seq > g->seq)
			g->seq = e->last_seq;
		c->count += e->count;
	}
	return *pos == b->t[k].cap;
}

/* the largest `limit` of g[0..m) first, in order (0: all); returns how many of g's first
 * entries are in order. Above 4 × limit groups a heap picks them: sorting a window's
 * every destination cost more than the merge that counted them. */
static uint64_t rank_groups(struct group *g, uint64_t m, uint64_t limit)
{
	if (!limit || limit * 4 >= m) {
		qsort(g, m, sizeof(*g), by_count_desc);
		return m;
	}
	/* g[0..limit): a heap whose root is the least of the largest found so far */
	for (uint64_t i = 0; i < m; i++) {
		uint64_t j = i < limit ? i : 0;
		struct group x = g[i];

		if (i < limit) { /* sift up */
			for (; j && by_count_desc(&g[(j - 1) / 2], &x) < 0; j = (j - 1) / 2)
				g[j] = g[(j - 1) / 2];
			g[j] = x;
			continue;
		}
		if (by_count_desc(&x, &g[0]) >= 0) /* not larger than the least kept */
			continue;
		g[i] = g[0];
		for (;;) { /* sift down from the root */
			uint64_t c = 2 * j + 1;

			if (c >= limit)
				break;
			if (c + 1 < limit && by_count_desc(&g[c + 1], &g[c]) > 0)
				c++;
			if (by_count_desc(&g[c], &x) <= 0)
				break;
			g[j] = g[c];
			j = c;
		}
		g[j] = x;
	}
	qsort(g, limit, sizeof(*g), by_count_desc);
	return limit;
}

/* where the failed counts of cached groups are: table k of buckets [a, b); a group's key
 * is in keys[1] if bit 33 of its hash is set, else in keys[0] */
struct failed_from {
	int k;
	uint64_t a, b;
	const uint8_t *keys[2];
};

/* add to g->failed its key's failed counts in the buckets of ff still held; returns the
 * lookups made. Caller holds the lock. */
static uint64_t add_failed(const struct nm_store *s, struct group *g, const struct failed_from *ff)
{
	uint64_t id = ff->a > s->roll.first ? ff->a : s->roll.first;
	uint64_t from = id;
	uint8_t key[NM_RK_KEY_MAX] = {0}; /* the tables compare keys zero-padded */

	memcpy(key, ff->keys[g->hash >> 33 & 1] + g->koff,
	       g->klen < NM_RK_KEY_MAX ? g->klen : NM_RK_KEY_MAX);
	for (; id < ff->b; id++) {
		const struct nm_rent *e = nm_roll_get(nm_roll_at(&s->roll, id), ff->k, key, g->klen);

		if (e)
			g->failed += e->failed;
	}
	return id - from;
}

/* Rank the groups g[0..m) (empty ones: hash or count 0) and copy the largest `limit`
 * representatives out of the ring; with ff, add their failed counts from the rollups. A
 * group whose newest record was evicted while the answer was made has no record left in
 * the store: it is left out, and out of *groups and *matched. Takes and releases the
 * lock. Long: the ranking, the race with eviction and the failed counts' lookups share
 * the one loop over the answer's groups. */
static int top_result(struct nm_store *s, struct group *g, uint64_t cap, uint64_t limit,
		      const struct failed_from *ff, struct nm_top **out, uint64_t *n,
		      uint64_t *groups, uint64_t *matched)
{
	uint64_t m = 0, first, take = 0, gone = 0, sorted;
	uint64_t head = __atomic_load_n(&s->head, __ATOMIC_ACQUIRE);
	int64_t budget = NM_SCAN_CHUNK;
	struct nm_top *res;

	/* a snapshot, without the lock: it only rises */
	first = head > s->capacity ? head - s->capacity + 1 : 1;
	for (uint64_t k = 0; k < cap; k++) { /* compact, leaving out what went */
		if (!g[k].hash || !g[k].count)
			continue;
		if (g[k].seq >= first)
			g[m++] = g[k];
		else
			*matched -= g[k].count;
	}
	sorted = m ? rank_groups(g, m, limit) : 0;
	res = malloc(((limit && limit < m ? limit : m) + 1) * sizeof(*res));
	if (!res)
		return -ENOMEM;
	reader_lock(s);
	first = first_held(s);
	for (uint64_t k = 0; k < m && (!limit || take < limit); k++) {
		if (k == sorted) { /* some of the largest went: rank the rest (rare) */
			qsort(g + k, m - k, sizeof(*g), by_count_desc);
			sorted = m;
		}
		if (g[k].seq < first) { /* went since the snapshot */
			*matched -= g[k].count;
			gone++;
			continue;
		}
		res[take++] = (struct nm_top){g[k].count, g[k].failed, g[k].seq,
					      s->ring[(g[k].seq - 1) % s->capacity]};
		if (!ff)
			continue;
		budget -= 16 * add_failed(s, &g[k], ff); /* a lookup: ~16 records' key checks */
		res[take - 1].failed = g[k].failed;
		if (budget <= 0) {
			reader_pause(s);
			budget = NM_SCAN_CHUNK;
			first = first_held(s);
		}
	}
	nm_store_unlock(s);
	*groups = m - gone;
	*out = res;
	*n = take;
	return 0;
}

/* ---- top-N over many seconds: the cache ----
 * The groups of a run of closed seconds [a, b) (bucket ids) of table k, merged: count and
 * newest record per key, not failed (an outcome can change a closed second's failed
 * counts: those are looked up for the answer's groups only). A closed second's counts
 * never change, so the run slides as the window moves: seconds merged in at either end,
 * subtracted at the old end (a group's newest record is in its newest second, so the
 * subtraction leaves it right; a group down to 0 forgets it). A query merges only what
 * the cache lacks plus the second still filling and the partial seconds at the ends. */
struct nm_top_cache {
	uint64_t a, b;  /* the buckets merged, when valid */
	int valid;
	uint64_t total; /* their records */
	uint64_t live;  /* groups whose count is not 0 */
	uint64_t mark;  /* a query's number: marks (in .failed) the groups it also found */
	struct gtab t;
	/* a query's own groups and its joined array, kept for the next: fresh ones, of a
	 * megabyte or two, cost more in page faults than the merge that fills them */
	struct gtab scratch;
	struct group *all;
	uint64_t all_cap;
};

static void top_cache_free(struct nm_top_cache *c)
{
	if (c) {
		gtab_free(&c->t);
		gtab_free(&c->scratch);
		free(c->all);
	}
	free(c);
}

/* forget the groups (but keep the scratch space) */
static void top_cache_reset(struct nm_top_cache *c, uint64_t at)
{
	gtab_free(&c->t);
	memset(&c->t, 0, sizeof(c->t));
	c->a = c->b = at;
	c->valid = 1;
	c->total = c->live = 0;
}

static uint64_t top_cache_bytes(const struct nm_top_cache *c)
{
	return (c->t.cap + c->scratch.cap + c->all_cap) * sizeof(struct group) + c->t.kcap +
	       c->scratch.kcap;
}

/* the closed buckets, each held whole and with its table k, that a walk of sc's window
 * could take whole: [*a, *b). 0 if fewer than 2 (the cache would not pay) or one was
 * given up (scanned). Caller holds the lock. */
static int closed_run(const struct nm_store *s, const struct scan *sc, int k, uint64_t *a,
		      uint64_t *b)
{
	const struct nm_rollup *r = &s->roll;
	uint64_t lo = sc->lo > first_held(s) ? sc->lo : first_held(s), newest, id, end;

	if (r->n < 3 || sc->hi <= lo + 1)
		return 0;
	newest = r->first + r->n - 1;
	id = nm_roll_find(r, lo);
	*a = id == UINT64_MAX ? r->first : nm_roll_at(r, id)->first_seq < lo ? id + 1 : id;
	id = nm_roll_find(r, sc->hi - 1);
	if (id == UINT64_MAX)
		return 0;
	end = id < newest ? nm_roll_at(r, id + 1)->first_seq : s->head + 1;
	*b = end == sc->hi ? id + 1 : id;
	if (*b > newest)
		*b = newest; /* still filling */
	if (*b < *a + 2)
		return 0;
	for (id = *a; id < *b; id++)
		if (nm_roll_at(r, id)->over & (1u << k))
			return 0;
	return 1;
}

/* merge bucket id's table k into the cache (sign 1) or take it out (-1), from *pos on,
 * spending *budget; 1: done, 0: out of budget, -ENOMEM */
static int top_cache_apply(struct nm_store *s, struct nm_top_cache *c, int k, uint64_t id,
			   int sign, uint32_t *pos, int64_t *budget)
{
	const struct nm_rtab *t = &nm_roll_at(&s->roll, id)->t[k];
	const struct nm_rent *e;
	struct group *g;

	while ((e = rtab_next(t, k, pos, budget))) {
		if (!(g = gtab_get(&c->t, e->key, nm_roll_klen(k, e->key), group_hash(e->hash))))
			return -ENOMEM;
		if (sign > 0) {
			c->live += !g->count;
			g->count += e->count;
			if (e->last_seq > g->seq)
				g->seq = e->last_seq;
		} else if (!(g->count -= e->count)) {
			c->live--;
			g->seq = 0;
		}
	}
	if (*pos < t->cap)
		return 0;
	if (sign > 0)
		c->total += nm_roll_at(&s->roll, id)->connects;
	else
		c->total -= nm_roll_at(&s->roll, id)->connects;
	return 1;
}

/* make the cache hold [a, b) of table k: slide it, or start again when that costs less
 * (or it holds mostly forgotten groups). Lock held on entry and return, released every
 * NM_SCAN_CHUNK units of work; a bucket the work needs going meanwhile leaves the cache
 * invalid (-EAGAIN: the caller looks at the window again). */
static int top_cache_sync(struct nm_store *s, struct nm_top_cache *c, int k, uint64_t a,
			  uint64_t b)
{
	int64_t budget = NM_SCAN_CHUNK;
	uint64_t slide;

	if (!c->valid || b < c->b || a >= c->b || c->a >= b || c->t.used > 2 * c->live + 1024)
		slide = UINT64_MAX;
	else
		slide = (a > c->a ? a - c->a : c->a - a) + (b - c->b);
	if (slide > b - a)
		top_cache_reset(c, a);
	while (c->a != a || c->b != b) {
		/* the next step: out at the old end, in at the old end, in at the new end */
		uint64_t id = c->a < a ? c->a : c->a > a ? c->a - 1 : c->b;
		int sign = c->a < a ? -1 : 1, rc;
		uint32_t pos = 0;

		c->valid = 0; /* until the step is done */
		if (id < s->roll.first) /* went while an earlier step paused */
			return -EAGAIN;
		while (!(rc = top_cache_apply(s, c, k, id, sign, &pos, &budget))) {
			reader_pause(s);
			budget = NM_SCAN_CHUNK;
			if (id < s->roll.first)
				return -EAGAIN;
		}
		if (rc < 0)
			return rc;
		c->valid = 1;
		if (sign < 0)
			c->a++;
		else if (id < c->a)
			c->a--;
		else
			c->b++;
	}
	return 0;
}

/* the groups the window's walk finds outside the cache's buckets: the part after them
 * (the second still filling, merged from its table, or scanned) and the part before. Lock
 * held on entry and return. */
static int top_rest(struct nm_store *s, const struct scan *sc, int k, uint64_t a, uint64_t b,
		    struct top_ctx *d)
{
	struct scan after = *sc, before = *sc;
	int rc;

	after.lo = nm_roll_at(&s->roll, b)->first_seq;
	before.hi = nm_roll_at(&s->roll, a)->first_seq;
	if ((rc = roll_run(s, &after, k, visit_top, bucket_top, d)))
		return rc;
	if (before.lo < first_held(s))
		before.lo = first_held(s);
	return before.lo < before.hi ? roll_run(s, &before, k, visit_top, bucket_top, d) : 0;
}

/* the cache's groups joined with d's (marked in the cache), as one array of groups: a
 * cache group's hash gets bit 33 (its key is in the cache's key bytes) */
static struct group *top_join(struct nm_top_cache *c, struct gtab *d, uint64_t *m)
{
	uint64_t mark = ++c->mark, need = d->used + c->live + 1;
	struct group *out = c->all;

	*m = 0;
	if (need > c->all_cap) {
		free(c->all);
		c->all_cap = 0;
		if (!(out = c->all = malloc(need * 2 * sizeof(*out))))
			return NULL;
		c->all_cap = need * 2;
	}
	for (uint64_t i = 0; i < d->cap; i++) {
		struct group g = d->g[i], *cg;

		if (!g.hash)
			continue;
		cg = gtab_find(&c->t, d->keys + g.koff, g.klen, g.hash);
		if (cg && cg->count) {
			g.count += cg->count;
			if (cg->seq > g.seq)
				g.seq = cg->seq;
			cg->failed = mark;
		}
		out[(*m)++] = g;
	}
	for (uint64_t i = 0; i < c->t.cap; i++) {
		struct group g = c->t.g[i];

		if (g.hash && g.count && g.failed != mark) {
			g.hash |= 1ull << 33;
			g.failed = 0;
			out[(*m)++] = g;
		}
	}
	return out;
}

/* top-N by table k's keys with the cache; -EAGAIN: not this way (the caller walks the
 * window without it) */
static int top_cached(struct nm_store *s, const struct nm_filter *f, int by, int k,
		      uint64_t limit, struct nm_top **out, uint64_t *n, uint64_t *groups,
		      uint64_t *matched)
{
	struct nm_top_cache *c;
	struct top_ctx d = {{0}, by, 0, f};
	struct failed_from ff = {k, 0, 0, {NULL, NULL}};
	struct group *all = NULL;
	struct scan sc;
	uint64_t a = 0, b = 0, m = 0;
	int err = -EAGAIN;

	pthread_mutex_lock(&s->top_cache_lock);
	if (!(c = s->top_cache[k]) && !(c = s->top_cache[k] = calloc(1, sizeof(*c)))) {
		pthread_mutex_unlock(&s->top_cache_lock);
		return -EAGAIN;
	}
	d.t = c->scratch; /* emptied, its memory kept */
	if (d.t.cap)
		memset(d.t.g, 0, d.t.cap * sizeof(*d.t.g));
	d.t.used = d.t.klen = 0;
	memset(&c->scratch, 0, sizeof(c->scratch));
	reader_lock(s);
	/* a few tries: each sync releases the lock, and the window may move meanwhile */
	for (int tries = 0; tries < 4; tries++) {
		sc = scan_of(s, f, 1);
		if (!closed_run(s, &sc, k, &a, &b))
			break;
		if (c->valid && c->a == a && c->b == b) {
			err = 0;
			break;
		}
		if ((err = top_cache_sync(s, c, k, a, b)) && err != -EAGAIN)
			break;
		err = -EAGAIN;
	}
	if (!err)
		err = top_rest(s, &sc, k, a, b, &d);
	nm_store_unlock(s);
	if (!err && !(all = top_join(c, &d.t, &m)))
		err = -ENOMEM;
	if (!err) {
		*matched = d.count + c->total;
		ff.a = a, ff.b = b, ff.keys[0] = d.t.keys, ff.keys[1] = c->t.keys;
		err = top_result(s, all, m, limit, &ff, out, n, groups, matched);
	}
	c->scratch = d.t;
	if (top_cache_bytes(c) > s->roll.max_bytes / 4) { /* bounded: not kept */
		top_cache_free(c);
		s->top_cache[k] = NULL;
	}
	pthread_mutex_unlock(&s->top_cache_lock);
	return err;
}

int nm_store_top(struct nm_store *s, const struct nm_filter *f, int by, uint64_t limit,
		 struct nm_top **out, uint64_t *n, uint64_t *groups, uint64_t *matched)
{
	struct top_ctx c = {{0}, by, 0, f};
	struct scan sc;
	int err, k = by == NM_BY_DEST ? NM_RK_DEST : by == NM_BY_COMM ? NM_RK_COMM
		     : by == NM_BY_PID ? NM_RK_PID : -1;

	if (roll_table_for(s, f) != NM_RK_TOTAL) /* the rollups group every connect attempt */
		k = -1;
	if (k >= 0 && (err = top_cached(s, f, by, k, limit, out, n, groups, matched)) != -EAGAIN)
		return err;
	for (int tries = 0;; tries++) {
		reader_lock(s);
		sc = scan_of(s, f, 1);
		err = k >= 0 ? roll_run(s, &sc, k, visit_top, bucket_top, &c)
			     : scan_run(s, &sc, visit_top, &c);
		nm_store_unlock(s);
		if (err != -EAGAIN)
			break;
		gtab_free(&c.t); /* the newest bucket's table moved: again, and scan after 3 */
		c = (struct top_ctx){{0}, by, 0, f};
		if (tries == 2)
			k = -1;
	}
	*matched = c.count;
	if (!err)
		err = top_result(s, c.t.g, c.t.cap, limit, NULL, out, n, groups, matched);
	gtab_free(&c.t);
	return err;
}

/* The event store: see store.h. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include "store.h"

/* Zeroed memory whose pages are touched (and counted in RSS) only as the ring fills, in
 * transparent huge pages where the kernel allows: a fresh store otherwise spends a
 * quarter of the consumer's time in page faults. */
static void *big_alloc(size_t size)
{
	void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED)
		return NULL;
	madvise(p, size, MADV_HUGEPAGE); /* advice only: fine if refused */
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
	if (!s->ring || !s->keys || !s->waiting || !s->early) {
		nm_store_free(s);
		return -ENOMEM;
	}
	pthread_mutex_init(&s->lock, NULL);
	return 0;
}

void nm_store_free(struct nm_store *s)
{
	if (!s->capacity)
		return;
	if (s->ring && s->keys && s->waiting && s->early)
		pthread_mutex_destroy(&s->lock);
	if (s->ring)
		munmap(s->ring, s->capacity * sizeof(*s->ring));
	if (s->keys)
		munmap(s->keys, s->capacity * sizeof(*s->keys));
	free(s->waiting);
	free(s->early);
	memset(s, 0, sizeof(*s));
}

/* the one hash mixer: a Fibonacci multiply with its high half folded down, so the top
 * bits and the low bits alike depend on every bit a caller's keys vary in */
static inline uint64_t mix(uint64_t x)
{
	x *= 0x9E3779B97F4A7C15ull;
	return x ^ x >> 32;
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
			apply_outcome(e, o);
			count_attempt(s, e);
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

	pthread_mutex_lock(&s->lock);
	for (unsigned i = 0; i < NM_ATTEMPT_SLOTS; i++)
		if (s->attempts[i].count)
			out[n++] = s->attempts[i];
	*other = s->attempts_other;
	pthread_mutex_unlock(&s->lock);
	return n;
}

int nm_store_push(struct nm_store *s, const void *data, size_t size)
{
	const struct netmon_event *in = data;

	pthread_mutex_lock(&s->lock);
	if (size != sizeof(struct netmon_event)) {
		s->malformed++;
	} else if (in->kind == NETMON_KIND_TCP_OUTCOME) {
		if (in->sock_id)
			push_outcome(s, in);
		else
			s->unmatched++;
	} else {
		uint64_t slot = s->head % s->capacity;
		struct netmon_event *e = &s->ring[slot];

		if (s->head >= s->capacity)
			s->evicted++;
		memcpy(e, in, sizeof(*e));
		s->keys[slot].pid = e->pid;
		s->keys[slot].tag = comm_tag(e->comm) | e->kind;
		s->head++;
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
	}
	pthread_mutex_unlock(&s->lock);
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

	pthread_mutex_lock(&s->lock);
	c = (struct nm_counters){s->head, held(s), s->evicted, s->malformed, s->unmatched,
				 s->in_flight, s->accepts, 0};
	if (c.size)
		c.oldest_ts = at(s, s->head - c.size + 1, 0)->ts_ns;
	pthread_mutex_unlock(&s->lock);
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
	return !(m & NM_Q_RESULT) || result_match(m, f->ret, e);
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

/* a walk over the logical range [lo, hi), oldest first or newest first (back) */
struct cursor {
	uint64_t i, slot, left;
	int back;
};

static inline struct cursor walk(const struct nm_store *s, uint64_t first, uint64_t lo,
				 uint64_t hi, int back)
{
	uint64_t i = back && hi > lo ? hi - 1 : lo;

	return (struct cursor){i, (first - 1 + i) % s->capacity, hi - lo, back};
}

static inline void step(const struct nm_store *s, struct cursor *c)
{
	c->left--;
	if (c->back) {
		c->i--;
		c->slot = c->slot ? c->slot - 1 : s->capacity - 1;
	} else {
		c->i++;
		c->slot = c->slot + 1 == s->capacity ? 0 : c->slot + 1;
	}
}

/* the record at c if it matches f (the key column first), else NULL */
static inline const struct netmon_event *hit(const struct nm_store *s, const struct cursor *c,
					      const struct prefilter *p, const struct nm_filter *f)
{
	const struct netmon_event *e;

	if (!prematch(p, &s->keys[c->slot]))
		return NULL;
	e = &s->ring[c->slot];
	return match(f, e) ? e : NULL;
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

int nm_store_query(struct nm_store *s, const struct nm_filter *f, uint64_t limit, int newest,
		   struct nm_hit **out, uint64_t *n, uint64_t *matched)
{
	struct hits h = {0};
	uint64_t first, lo, hi, count = 0;
	int err = 0;

	struct prefilter p = prefilter_of(f);

	pthread_mutex_lock(&s->lock);
	window(s, f, &first, &lo, &hi);
	for (struct cursor c = walk(s, first, lo, hi, newest); c.left; step(s, &c)) {
		const struct netmon_event *e = hit(s, &c, &p, f);

		if (!e)
			continue;
		count++;
		if (out && (limit == 0 || h.n < limit) && (err = hits_add(&h, first + c.i, e)))
			break;
		if (out && limit && h.n == limit && !newest && !matched)
			break;
	}
	pthread_mutex_unlock(&s->lock);
	if (err) {
		free(h.v);
		return err;
	}
	if (newest)
		hits_reverse(&h);
	if (out)
		*out = h.v;
	if (n)
		*n = h.n;
	if (matched)
		*matched = count;
	return 0;
}

/* would the record hold a follower back: a TCP handshake still pending, recent enough to
 * wait for, that matches the filter but for its result */
static inline int holds(const struct nm_filter *f, const struct netmon_event *e,
			uint64_t hold_ns)
{
	struct nm_filter any = *f;

	if (!hold_ns || e->outcome != NETMON_OUTCOME_PENDING || e->ts_ns < hold_ns)
		return 0;
	any.mask &= ~NM_Q_RESULT;
	return match(&any, e);
}

int nm_store_follow(struct nm_store *s, const struct nm_filter *f, uint64_t limit,
		    uint64_t hold_ns, struct nm_hit **out, uint64_t *n, uint64_t *upto,
		    uint64_t *holder, uint64_t *oldest)
{
	struct hits h = {0};
	uint64_t first, lo, hi;
	struct prefilter p = prefilter_of(f); /* no result in the key column: serves holds too */
	int err = 0;

	*holder = 0;
	pthread_mutex_lock(&s->lock);
	window(s, f, &first, &lo, &hi);
	*oldest = first;
	*upto = first + lo - 1; /* complete up to the window's start */
	for (struct cursor c = walk(s, first, lo, hi, 0); c.left; step(s, &c)) {
		const struct netmon_event *e;

		if (!prematch(&p, &s->keys[c.slot])) {
			*upto = first + c.i;
			continue;
		}
		e = &s->ring[c.slot];
		if (holds(f, e, hold_ns)) {
			*holder = first + c.i;
			break;
		}
		*upto = first + c.i;
		if (match(f, e) && (err = hits_add(&h, first + c.i, e)))
			break;
		if (limit && h.n == limit)
			break;
	}
	pthread_mutex_unlock(&s->lock);
	if (err) {
		free(h.v);
		return err;
	}
	*out = h.v;
	*n = h.n;
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

int nm_store_latest_per_pid(struct nm_store *s, const struct nm_filter *f, uint64_t per_pid,
			    uint64_t max_total, struct nm_hit **out, uint64_t *n,
			    uint64_t *pids, int *truncated)
{
	struct hits h = {0};
	struct pidmap m = {0};
	uint64_t first, lo, hi;
	int err = 0;

	struct prefilter p = prefilter_of(f);

	*truncated = 0;
	pthread_mutex_lock(&s->lock);
	window(s, f, &first, &lo, &hi);
	for (struct cursor cur = walk(s, first, lo, hi, 1); cur.left; step(s, &cur)) {
		const struct netmon_event *e = hit(s, &cur, &p, f);
		struct pidcount *c;

		if (!e)
			continue;
		if (max_total && h.n >= max_total) { /* the answer is full */
			*truncated = 1;
			break;
		}
		if (!(c = pidmap_get(&m, e->pid))) {
			err = -ENOMEM;
			break;
		}
		if (c->count++ >= per_pid) {
			*truncated = 1;
			if (p.by_pid) /* the one pid asked for is complete */
				break;
			continue;
		}
		if ((err = hits_add(&h, first + cur.i, e)))
			break;
	}
	pthread_mutex_unlock(&s->lock);
	free(m.v);
	if (err) {
		free(h.v);
		return err;
	}
	hits_reverse(&h);
	*out = h.v;
	*n = h.n;
	*pids = m.n;
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
		key[4] = e->addr_len;
		memcpy(key + 5, e->addr, e->addr_len);
		return 5 + e->addr_len;
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
	default: /* NM_BY_ERROR */
		memcpy(key, &e->ret, 4);
		return 4;
	}
}

/* 40 bytes a group: the representative stays in the ring (by slot), so even a window
 * where every record is its own group costs a fraction of the store */
struct group {
	uint64_t hash; /* 0: empty slot */
	uint64_t count, failed;
	uint64_t slot, ts; /* the group's newest record */
};

/* a group key's hash, a word at a time; never 0 (the empty slot) */
static uint64_t key_hash(const uint8_t *p, size_t n)
{
	uint64_t h = n, w;

	for (; n >= 8; p += 8, n -= 8) {
		memcpy(&w, p, 8);
		h = mix(h ^ w);
	}
	if (n) {
		w = 0;
		memcpy(&w, p, n);
		h = mix(h ^ w);
	}
	return h | 1;
}

static int by_count_desc(const void *a, const void *b)
{
	const struct group *x = a, *y = b;

	if (x->count != y->count)
		return x->count < y->count ? 1 : -1;
	return x->ts < y->ts ? 1 : x->ts > y->ts ? -1 : 0;
}

static int grow(struct group **g, uint64_t *cap)
{
	uint64_t ncap = *cap ? *cap * 2 : 256, j;
	struct group *ng = calloc(ncap, sizeof(*ng));

	if (!ng)
		return -ENOMEM;
	for (uint64_t k = 0; k < *cap; k++) {
		if (!(*g)[k].hash)
			continue;
		for (j = (*g)[k].hash & (ncap - 1); ng[j].hash; j = (j + 1) & (ncap - 1))
			;
		ng[j] = (*g)[k];
	}
	free(*g);
	*g = ng;
	*cap = ncap;
	return 0;
}

int nm_store_top(struct nm_store *s, const struct nm_filter *f, int by, uint64_t limit,
		 struct nm_top **out, uint64_t *n, uint64_t *groups, uint64_t *matched)
{
	uint8_t key[8 + NETMON_ADDR_LEN], other[8 + NETMON_ADDR_LEN];
	struct group *g = NULL;
	uint64_t cap = 0, used = 0, count = 0, first, lo, hi, take;
	struct prefilter p = prefilter_of(f);
	struct nm_top *res = NULL;
	int err = 0;

	pthread_mutex_lock(&s->lock);
	window(s, f, &first, &lo, &hi);
	for (struct cursor cur = walk(s, first, lo, hi, 1); cur.left; step(s, &cur)) {
		const struct netmon_event *e = hit(s, &cur, &p, f);
		size_t klen;
		uint64_t h, j;

		if (!e || (by == NM_BY_ERROR && !nm_failed(e)))
			continue;
		count++;
		if ((used + 1) * 2 > cap && (err = grow(&g, &cap)))
			goto out;
		klen = group_key(f, by, e, key);
		h = key_hash(key, klen);
		for (j = h & (cap - 1); g[j].hash; j = (j + 1) & (cap - 1)) {
			if (g[j].hash == h && group_key(f, by, &s->ring[g[j].slot], other) == klen &&
			    memcmp(key, other, klen) == 0)
				break;
		}
		if (!g[j].hash) { /* newest first: the first record seen is the newest */
			g[j] = (struct group){h, 0, 0, cur.slot, e->ts_ns};
			used++;
		}
		g[j].count++;
		g[j].failed += nm_failed(e);
	}
	for (uint64_t k = 0, m = 0; k < cap; k++) /* compact, then rank */
		if (g[k].hash)
			g[m++] = g[k];
	if (used)
		qsort(g, used, sizeof(*g), by_count_desc);
	take = limit && limit < used ? limit : used;
	res = malloc((take ? take : 1) * sizeof(*res));
	if (!res) {
		err = -ENOMEM;
		goto out;
	}
	for (uint64_t k = 0; k < take; k++) /* copied while the ring still holds them */
		res[k] = (struct nm_top){g[k].count, g[k].failed, s->ring[g[k].slot]};
out:
	pthread_mutex_unlock(&s->lock);
	free(g);
	if (err)
		return err;
	*out = res;
	*n = take;
	*groups = used;
	*matched = count;
	return 0;
}

/* The event store: see store.h. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include "store.h"

int nm_store_init(struct nm_store *s, uint64_t capacity)
{
	memset(s, 0, sizeof(*s));
	if (capacity == 0)
		return -EINVAL;
	/* calloc'd pages are only touched (and counted in RSS) as the ring fills */
	s->ring = calloc(capacity, sizeof(*s->ring));
	if (!s->ring)
		return -ENOMEM;
	s->capacity = capacity;
	pthread_mutex_init(&s->lock, NULL);
	return 0;
}

void nm_store_free(struct nm_store *s)
{
	if (!s->ring)
		return;
	pthread_mutex_destroy(&s->lock);
	free(s->ring);
	s->ring = NULL;
}

int nm_store_push(struct nm_store *s, const void *data, size_t size)
{
	pthread_mutex_lock(&s->lock);
	if (size != sizeof(struct netmon_event)) {
		s->malformed++;
	} else {
		if (s->head >= s->capacity)
			s->evicted++;
		memcpy(&s->ring[s->head % s->capacity], data, sizeof(struct netmon_event));
		s->head++;
	}
	pthread_mutex_unlock(&s->lock);
	return 0;
}

/* logical index i (0 = oldest held) -> record; caller holds the lock */
static inline const struct netmon_event *at(const struct nm_store *s, uint64_t first_seq, uint64_t i)
{
	return &s->ring[(first_seq - 1 + i) % s->capacity];
}

static inline uint64_t held(const struct nm_store *s)
{
	return s->head < s->capacity ? s->head : s->capacity;
}

void nm_store_counters(struct nm_store *s, uint64_t *head, uint64_t *size, uint64_t *evicted,
		       uint64_t *malformed, uint64_t *oldest_ts)
{
	pthread_mutex_lock(&s->lock);
	*head = s->head;
	*size = held(s);
	*evicted = s->evicted;
	*malformed = s->malformed;
	*oldest_ts = *size ? at(s, s->head - *size + 1, 0)->ts_ns : 0;
	pthread_mutex_unlock(&s->lock);
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

static inline int match(const struct nm_filter *f, const struct netmon_event *e)
{
	uint32_t m = f->mask;

	if ((m & NM_Q_PID) && e->pid != f->pid)
		return 0;
	if ((m & NM_Q_COMM) && memcmp(e->comm, f->comm, NETMON_COMM_LEN) != 0)
		return 0;
	if ((m & NM_Q_FAMILY) && e->family != f->family)
		return 0;
	if ((m & NM_Q_PROTOCOL) && e->protocol != f->protocol)
		return 0;
	if ((m & NM_Q_PORT) && e->port != f->port)
		return 0;
	if ((m & NM_Q_OK) && e->ret != 0)
		return 0;
	if ((m & NM_Q_ERROR) && e->ret == 0)
		return 0;
	if ((m & NM_Q_RET) && e->ret != f->ret)
		return 0;
	return 1;
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

	pthread_mutex_lock(&s->lock);
	window(s, f, &first, &lo, &hi);
	for (uint64_t k = 0; k < hi - lo; k++) {
		uint64_t i = newest ? hi - 1 - k : lo + k;
		const struct netmon_event *e = at(s, first, i);

		if (!match(f, e))
			continue;
		count++;
		if (out && (limit == 0 || h.n < limit) && (err = hits_add(&h, first + i, e)))
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
				uint64_t j = (m->v[i].pid * 2654435761u) & (g.cap - 1);

				while (g.v[j].used)
					j = (j + 1) & (g.cap - 1);
				g.v[j] = m->v[i];
				g.n++;
			}
		}
		free(m->v);
		*m = g;
	}
	uint64_t j = (pid * 2654435761u) & (m->cap - 1);

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
			    struct nm_hit **out, uint64_t *n, uint64_t *pids, int *truncated)
{
	struct hits h = {0};
	struct pidmap m = {0};
	uint64_t first, lo, hi;
	int err = 0;

	*truncated = 0;
	pthread_mutex_lock(&s->lock);
	window(s, f, &first, &lo, &hi);
	for (uint64_t i = hi; i-- > lo;) {
		const struct netmon_event *e = at(s, first, i);
		struct pidcount *c;

		if (!match(f, e))
			continue;
		if (!(c = pidmap_get(&m, e->pid))) {
			err = -ENOMEM;
			break;
		}
		if (c->count++ >= per_pid) {
			*truncated = 1;
			continue;
		}
		if ((err = hits_add(&h, first + i, e)))
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

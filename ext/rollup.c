/* Per-second rollups: see rollup.h. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include "hash.h"
#include "rollup.h"

static const uint32_t ksize[NM_RK_N] = {4, 16, NM_RK_KEY_MAX};

uint32_t nm_roll_stride(int k)
{
	return (sizeof(struct nm_rent) + ksize[k] + 7) & ~7u;
}

uint32_t nm_roll_klen(int k, const uint8_t *key)
{
	return k == NM_RK_DEST ? 5u + key[4] : ksize[k];
}

int nm_roll_init(struct nm_rollup *r, uint64_t max_bytes)
{
	memset(r, 0, sizeof(*r));
	r->b = calloc(NM_ROLL_BUCKETS, sizeof(*r->b));
	r->max_bytes = max_bytes;
	return r->b ? 0 : -ENOMEM;
}

static void bucket_free(struct nm_rollup *r, struct nm_bucket *b)
{
	for (int k = 0; k < NM_RK_N; k++) {
		r->bytes -= (uint64_t)b->t[k].cap * nm_roll_stride(k);
		free(b->t[k].v);
	}
	memset(b, 0, sizeof(*b));
}

void nm_roll_free(struct nm_rollup *r)
{
	if (!r->b)
		return;
	for (uint64_t i = 0; i < r->n; i++)
		bucket_free(r, nm_roll_at(r, r->first + i));
	free(r->b);
	memset(r, 0, sizeof(*r));
}

static void drop_oldest(struct nm_rollup *r)
{
	bucket_free(r, nm_roll_at(r, r->first));
	r->first++;
	r->n--;
}

void nm_roll_evict(struct nm_rollup *r, uint64_t first_held)
{
	while (r->n > 1 && nm_roll_at(r, r->first + 1)->first_seq <= first_held)
		drop_oldest(r);
}

/* a new second's tables start as large as the last second needed: growing them again,
 * rehashing each time, cost more than the counting itself */
static void presize(struct nm_rollup *r, struct nm_bucket *b, const struct nm_bucket *prev)
{
	for (int k = 0; k < NM_RK_N; k++) {
		uint32_t cap = prev->t[k].cap, stride = nm_roll_stride(k);

		if (!cap || r->bytes + (uint64_t)cap * stride > r->max_bytes / 2)
			continue; /* the other half of the bound: room to grow */
		if ((b->t[k].v = calloc(cap, stride))) {
			b->t[k].cap = cap;
			r->bytes += (uint64_t)cap * stride;
		}
	}
}

struct nm_bucket *nm_roll_bucket(struct nm_rollup *r, uint64_t seq, uint64_t ts)
{
	uint64_t sec = ts / NM_ROLL_NS, id;
	struct nm_bucket *b;

	if (r->n) {
		b = nm_roll_at(r, r->first + r->n - 1);
		if (sec <= b->sec) /* the same second, or a stamp that went back */
			return b;
	}
	if (r->n == NM_ROLL_BUCKETS)
		drop_oldest(r);
	id = r->first + r->n;
	if (!r->n)
		r->first = id;
	r->n++;
	b = nm_roll_at(r, id);
	*b = (struct nm_bucket){.id = id, .sec = sec, .first_seq = seq};
	if (r->n > 1)
		presize(r, b, nm_roll_at(r, id - 1));
	return b;
}

uint64_t nm_roll_find(const struct nm_rollup *r, uint64_t seq)
{
	uint64_t lo = r->first, hi = r->first + r->n; /* the answer: last id whose first <= seq */

	if (!r->n || seq < nm_roll_at(r, lo)->first_seq)
		return UINT64_MAX;
	while (hi - lo > 1) {
		uint64_t mid = lo + (hi - lo) / 2;

		if (nm_roll_at(r, mid)->first_seq <= seq)
			lo = mid;
		else
			hi = mid;
	}
	return lo;
}

static inline struct nm_rent *slot(const struct nm_rtab *t, int k, uint32_t i)
{
	return (struct nm_rent *)(t->v + (size_t)i * nm_roll_stride(k));
}

/* the key bytes equal: sizes the compiler knows, so no call */
static inline int same_key(int k, const uint8_t *a, const uint8_t *b)
{
	switch (k) {
	case NM_RK_PID:
		return memcmp(a, b, 4) == 0;
	case NM_RK_COMM:
		return memcmp(a, b, 16) == 0;
	default:
		return memcmp(a, b, NM_RK_KEY_MAX) == 0;
	}
}

static inline uint32_t hash_of(const uint8_t *key, uint32_t klen)
{
	return (uint32_t)(key_hash(key, klen) >> 32);
}

/* the slot of key (hash h) in t: its entry, or the free slot where it would go */
static uint32_t probe(const struct nm_rtab *t, int k, const uint8_t *key, uint32_t h)
{
	uint32_t i = h & (t->cap - 1);

	for (;; i = (i + 1) & (t->cap - 1)) {
		struct nm_rent *e = slot(t, k, i);

		if (!e->last_seq || (e->hash == h && same_key(k, e->key, key)))
			return i;
	}
}

const struct nm_rent *nm_roll_get(const struct nm_bucket *b, int k, const uint8_t *key,
				  uint32_t klen)
{
	const struct nm_rtab *t = &b->t[k];
	struct nm_rent *e;

	if (!t->cap)
		return NULL;
	e = slot(t, k, probe(t, k, key, hash_of(key, klen)));
	return e->last_seq ? e : NULL;
}

/* room for one more entry in table k of b: 0, or -1 once it is given up */
static int room(struct nm_rollup *r, struct nm_bucket *b, int k)
{
	struct nm_rtab *t = &b->t[k], g;
	uint32_t stride = nm_roll_stride(k);

	if (b->over & (1u << k))
		return -1;
	if ((uint64_t)(t->n + 1) * 4 <= (uint64_t)t->cap * 3)
		return 0;
	g = (struct nm_rtab){NULL, t->cap ? t->cap * 2 : 16, 0, 0};
	if (r->bytes + (uint64_t)g.cap * stride > r->max_bytes ||
	    !(g.v = calloc(g.cap, stride))) { /* over the bound: scan this bucket instead */
		r->bytes -= (uint64_t)t->cap * stride;
		free(t->v);
		memset(t, 0, sizeof(*t));
		b->over |= 1u << k;
		r->given_up++;
		return -1;
	}
	for (uint32_t i = 0; i < t->cap; i++) {
		struct nm_rent *e = slot(t, k, i);

		if (e->last_seq)
			memcpy(slot(&g, k, probe(&g, k, e->key, e->hash)), e, stride);
	}
	g.n = t->n;
	r->bytes += (uint64_t)g.cap * stride - (uint64_t)t->cap * stride;
	free(t->v);
	*t = g;
	return 0;
}

void nm_roll_add(struct nm_rollup *r, struct nm_bucket *b, uint64_t seq,
		 const uint8_t keys[NM_RK_N][NM_RK_KEY_MAX], const uint32_t klen[NM_RK_N],
		 int failed)
{
	b->connects++;
	b->failed += failed;
	for (int k = 0; k < NM_RK_N; k++) {
		struct nm_rtab *t = &b->t[k];
		struct nm_rent *e = t->cap ? slot(t, k, t->last) : NULL;

		/* a run of one key (one process connecting in a loop) skips the hash */
		if (!e || !e->last_seq || !same_key(k, e->key, keys[k])) {
			uint32_t h = hash_of(keys[k], klen[k]);

			if (room(r, b, k))
				continue;
			t->last = probe(t, k, keys[k], h);
			e = slot(t, k, t->last);
			if (!e->last_seq) {
				memcpy(e->key, keys[k], ksize[k]);
				e->hash = h;
				t->n++;
			}
		}
		e->last_seq = seq;
		e->count++;
		e->failed += failed;
	}
}

void nm_roll_repeat(struct nm_bucket *b, uint64_t seq, int failed)
{
	b->connects++;
	b->failed += failed;
	for (int k = 0; k < NM_RK_N; k++) {
		struct nm_rtab *t = &b->t[k];
		struct nm_rent *e;

		if (!t->cap) /* given up (the last record's nm_roll_add made room or this) */
			continue;
		e = slot(t, k, t->last);
		e->last_seq = seq;
		e->count++;
		e->failed += failed;
	}
}

void nm_roll_failed(struct nm_rollup *r, uint64_t seq,
		    const uint8_t keys[NM_RK_N][NM_RK_KEY_MAX], const uint32_t klen[NM_RK_N],
		    int delta)
{
	uint64_t id = nm_roll_find(r, seq);
	struct nm_bucket *b;

	if (id == UINT64_MAX)
		return;
	b = nm_roll_at(r, id);
	b->failed += delta;
	for (int k = 0; k < NM_RK_N; k++) {
		struct nm_rent *e = (struct nm_rent *)nm_roll_get(b, k, keys[k], klen[k]);

		if (e)
			e->failed += delta;
	}
}

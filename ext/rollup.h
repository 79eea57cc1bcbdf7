/* Per-second rollups of the store's connect attempts, kept by the consumer as it pushes,
 * so that a count or a top-N over a window costs O(seconds in it) instead of a scan of
 * every record in it.
 *
 * A bucket is a contiguous run of sequence numbers: the records pushed while their
 * timestamp's second did not rise past the bucket's (a timestamp that goes back stays in
 * the newest bucket). So a query's window, a range of sequence numbers, splits into whole
 * buckets, answered from their tables, and at most a partial bucket at each end, scanned:
 * the answer equals a scan's by construction. Each bucket counts, for kind connect only,
 * attempts and failed attempts in all and per pid, per command and per destination (with
 * the sequence number of each key's newest record, the representative of a top-N group).
 *
 * Bounded: at most NM_ROLL_BUCKETS buckets, and the tables' bytes at most `max_bytes`; a
 * table that would pass it is given up (its bucket is scanned instead). Buckets whose
 * records were all evicted are freed. The caller (store.c) holds the store's lock. */
#ifndef NETMON_ROLLUP_H
#define NETMON_ROLLUP_H

#include <stdint.h>

#define NM_ROLL_NS 1000000000ull /* a bucket's span */
#define NM_ROLL_BUCKETS 4096     /* buckets kept: more seconds than any window asks for */

/* the tables of a bucket; NM_RK_TOTAL: no table, the bucket's totals */
enum { NM_RK_PID = 0, NM_RK_COMM = 1, NM_RK_DEST = 2, NM_RK_N = 3, NM_RK_TOTAL = 3 };
#define NM_RK_KEY_MAX 56 /* the longest key: a destination (family, port, length, addr) */

/* one key's counts in one bucket; `key` is ksize bytes, zero-padded */
struct nm_rent {
	uint64_t last_seq; /* its newest record in the bucket; 0: free slot */
	uint32_t count, failed;
	uint32_t hash, _pad; /* compared before the key */
	uint8_t key[];
};

struct nm_rtab {
	uint8_t *v; /* cap entries of nm_roll_stride(kind) bytes */
	uint32_t cap, n, last; /* last: the slot hit most recently (runs of one key) */
};

struct nm_bucket {
	uint64_t id;        /* rises by one a bucket, never reused */
	uint64_t sec;       /* ts / NM_ROLL_NS of its first record */
	uint64_t first_seq; /* its records: [first_seq, the next bucket's first_seq) */
	uint64_t connects, failed;
	struct nm_rtab t[NM_RK_N];
	uint8_t over;       /* bit k: table k was given up (over the memory bound) */
};

struct nm_rollup {
	struct nm_bucket *b; /* NM_ROLL_BUCKETS slots; bucket id lives in slot id % that */
	uint64_t first, n;   /* id of the oldest bucket kept, buckets kept */
	uint64_t bytes, max_bytes; /* tables' memory, and its bound */
	uint64_t given_up;   /* tables given up for memory, ever */
};

int nm_roll_init(struct nm_rollup *r, uint64_t max_bytes);
void nm_roll_free(struct nm_rollup *r);

static inline struct nm_bucket *nm_roll_at(const struct nm_rollup *r, uint64_t id)
{
	return &r->b[id % NM_ROLL_BUCKETS];
}

/* the bucket record `seq` (just pushed, stamped ts) goes to, opened if its second is new */
struct nm_bucket *nm_roll_bucket(struct nm_rollup *r, uint64_t seq, uint64_t ts);
/* count a record whose keys equal those of the last one nm_roll_add counted in b: into
 * the entries that one used, without building or hashing keys */
void nm_roll_repeat(struct nm_bucket *b, uint64_t seq, int failed);
/* count one connect attempt of bucket b: keys[k] (klen[k] bytes) in table k */
void nm_roll_add(struct nm_rollup *r, struct nm_bucket *b, uint64_t seq,
		 const uint8_t keys[NM_RK_N][NM_RK_KEY_MAX], const uint32_t klen[NM_RK_N],
		 int failed);
/* a stored attempt became failed (delta 1) or stopped being (delta -1): a TCP outcome */
void nm_roll_failed(struct nm_rollup *r, uint64_t seq,
		    const uint8_t keys[NM_RK_N][NM_RK_KEY_MAX], const uint32_t klen[NM_RK_N],
		    int delta);
/* free the buckets all of whose records are older than first_held */
void nm_roll_evict(struct nm_rollup *r, uint64_t first_held);
/* id of the bucket holding seq; UINT64_MAX if none does (older than the oldest kept) */
uint64_t nm_roll_find(const struct nm_rollup *r, uint64_t seq);
/* key's entry in table k of b, or NULL */
const struct nm_rent *nm_roll_get(const struct nm_bucket *b, int k, const uint8_t *key,
				  uint32_t klen);
uint32_t nm_roll_stride(int k);
/* a table key's length from its bytes (a destination's depends on its address) */
uint32_t nm_roll_klen(int k, const uint8_t *key);

#endif

/* The event store: a fixed-capacity ring of netmon_event records in C, guarded by one
 * mutex, overwriting the oldest and counting what it evicted. Every record gets a
 * sequence number (1, 2, ...); the record with sequence s lives in slot (s-1) % capacity.
 * TCP outcome records are not stored: they update the connect event of the same socket.
 * Queries run without the GIL and copy out only what matched. */
#ifndef NETMON_STORE_H
#define NETMON_STORE_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <linux/types.h>
#include "netmon.h"
#include "rollup.h"

#define NM_JOIN_SLOTS 65536 /* TCP handshakes in flight the join can track */
#define NM_ATTEMPT_SLOTS 256 /* distinct (family, protocol, result) the counters keep */
#define NM_LAT_BUCKETS 17    /* TCP handshake latency histogram: 16 bounds and +Inf */
/* result keys of the attempt counters besides 0 (ok) and -errno (failed with it) */
#define NM_RET_UNKNOWN 1 /* the backend cannot tell what happened */
#define NM_RET_PENDING 2 /* its handshake's outcome can no longer be joined to it */
#define NM_RET_OTHER 3   /* failed with no errno (a malformed record) */

/* What happened to a connect attempt, the same way on both backends: the filters, top's
 * failures and the attempt counters all use this. */
enum nm_result {
	NM_R_OK = 0,      /* connected: 0, or EINPROGRESS and then established */
	NM_R_ERROR = 1,   /* failed: connect() returned an error, or the handshake failed */
	NM_R_PENDING = 2, /* the handshake has no outcome yet */
	NM_R_UNKNOWN = 3, /* the backend cannot tell (cgroup hooks on unix and UDP) */
};

static inline int nm_result(const struct netmon_event *e)
{
	switch (e->outcome) {
	case NETMON_OUTCOME_ESTABLISHED:
		return NM_R_OK;
	case NETMON_OUTCOME_FAILED:
		return NM_R_ERROR;
	case NETMON_OUTCOME_PENDING:
		return NM_R_PENDING;
	}
	/* no handshake tracked: unknown if the hook could not know, or if EINPROGRESS
	 * came from a protocol whose handshake nobody times (SCTP) */
	if (e->flags & (NETMON_F_NO_RESULT | NETMON_F_INPROGRESS))
		return NM_R_UNKNOWN;
	return e->ret ? NM_R_ERROR : NM_R_OK;
}

struct nm_join {
	uint64_t sock_id;
	uint64_t seq;    /* connect event waiting for its outcome */
	uint16_t family; /* its family: counts it even once the ring has forgotten it */
};

/* connect attempts ever counted with this (family, protocol, result key): monotonic,
 * unlike the ring, which forgets; for metrics. An attempt is counted once what happened
 * is known: at once, or when its TCP handshake's outcome joins it (or can no longer).
 * count 0 = free slot */
struct nm_attempt {
	uint16_t family, protocol;
	int32_t ret; /* 0 ok, -errno failed with it, or an NM_RET_* key */
	uint64_t count;
};

/* a column beside the ring: what most queries filter on, 8 bytes instead of 128, so a
 * scan reads the records only where these match */
struct nm_key {
	uint32_t pid;
	uint32_t tag; /* top 24 bits: a hash of comm; low 8: kind */
};

struct nm_store {
	pthread_mutex_t lock;
	unsigned writers_waiting, readers_waiting; /* blocked on lock: see nm_store_lock */
	uint64_t batch;     /* records pushed by nm_store_push_batch */
	struct netmon_event *ring;
	struct nm_key *keys;
	uint64_t capacity;
	uint64_t head;      /* sequence number of the newest record; 0 = none yet */
	uint64_t evicted;   /* records overwritten before anyone could ask for them */
	uint64_t malformed; /* records of the wrong size or kind, not stored */
	uint64_t unmatched; /* TCP outcomes whose connect event was never seen / gone */
	uint64_t in_flight; /* TCP attempts waiting for their outcome: not counted yet */
	uint64_t accepts;   /* accept events ever pushed (monotonic, for metrics) */
	/* runs of records from one (pid, cgroup): a new run starts whenever a record's pid or
	 * cgroup id differs from the one before it. A sweep naming processes that finds the
	 * count unchanged knows every newer record is the last one's process, unread. */
	uint64_t runs;
	uint64_t tail_cgroup;
	uint32_t tail_pid;
	struct nm_join *waiting;          /* sock_id -> connect event awaiting its outcome */
	struct netmon_event *early;       /* sock_id -> outcome that came before its connect */
	struct nm_attempt attempts[NM_ATTEMPT_SLOTS];
	uint64_t attempts_other;          /* attempts whose key found no free slot */
	struct nm_rollup roll;            /* per-second counts: see rollup.h */
	struct nm_roll_last {             /* the rollup keys' fields of the last connect */
		uint64_t bucket;          /* 1 + the bucket id it went to; 0: none */
		uint32_t pid;
		uint16_t family, port;
		uint8_t addr_len;         /* as recorded; addr holds that many bytes (max 48) */
		char comm[NETMON_COMM_LEN];
		uint8_t addr[NETMON_ADDR_LEN];
	} roll_last;
	int use_rollups;                  /* 0: every query scans (tests compare both) */
	/* top-N by pid, command, destination: per table, the groups of a run of closed
	 * seconds merged, kept between queries and slid as the window moves (store.c) */
	pthread_mutex_t top_cache_lock;   /* one top-N query at a time uses them */
	struct nm_top_cache *top_cache[NM_RK_N];
	/* TCP handshakes the kernel timed, counted as each outcome record arrives (joined
	 * to its connect or not): [0] established, [1] failed; per latency bucket (not
	 * cumulative) and the sum of latencies. Monotonic, for metrics. */
	uint64_t handshakes[2][NM_LAT_BUCKETS];
	uint64_t handshake_us[2];
};

/* a snapshot of the handshake histogram; bounds_us[i] is bucket i's upper bound
 * (inclusive), UINT32_MAX for the last (+Inf) */
struct nm_handshakes {
	uint32_t bounds_us[NM_LAT_BUCKETS];
	uint64_t established[NM_LAT_BUCKETS], failed[NM_LAT_BUCKETS];
	uint64_t established_us, failed_us;
};

/* what a query keeps; a zero field in `mask` means "any". A new filter must set a bit of
 * its own in `mask`: queries whose mask asks for no more than kind connect and a pid or a
 * command are answered from the rollups, which know nothing of other fields. */
enum {
	NM_Q_PID = 1 << 0,
	NM_Q_COMM = 1 << 1,
	NM_Q_FAMILY = 1 << 2,
	NM_Q_PROTOCOL = 1 << 3,
	NM_Q_PORT = 1 << 4,
	NM_Q_OK = 1 << 5,    /* nm_result() == NM_R_OK */
	NM_Q_ERROR = 1 << 6, /* nm_result() == NM_R_ERROR */
	NM_Q_RET = 1 << 7,   /* the error field's errno == -filter.ret (0: as NM_Q_OK) */
	NM_Q_DEST = 1 << 8,  /* inet: address within addr/prefix; unix: path starts with addr */
	NM_Q_KIND = 1 << 9,
	NM_Q_PENDING = 1 << 10, /* nm_result() == NM_R_PENDING */
	NM_Q_UNKNOWN = 1 << 11, /* nm_result() == NM_R_UNKNOWN */
	NM_Q_RESULT = NM_Q_OK | NM_Q_ERROR | NM_Q_RET | NM_Q_PENDING | NM_Q_UNKNOWN,
	NM_Q_SRC = 1 << 12,   /* source address within src/src_len (inet only) */
	NM_Q_SPORT = 1 << 13, /* src_port == sport (inet only) */
	NM_Q_NAME = 1 << 14,  /* (net_ns, address, time) falls in one of filter.names */
	NM_Q_CGROUPS = 1 << 15, /* cgroup_id is one of cgroups[] */
	NM_Q_PROCS = 1 << 16,   /* (pid, seq) falls in one of procs[] */
};

/* When an address stood for a name in one network namespace: [from_ns, to_ns) on the
 * records' clock. The name cache (Python) hands a query a table of these sorted by their
 * first 24 bytes as memcmp orders them, so C finds an event's windows by binary search.
 * inet addresses only; an IPv4-mapped IPv6 destination is looked up as IPv4. */
struct nm_name_window {
	uint32_t net_ns;
	uint16_t family;
	uint16_t pad;
	uint8_t addr[16]; /* IPv4: 4 bytes, then zeros */
	uint64_t from_ns, to_ns;
	uint32_t group;   /* top by name: which name (1, 2, ...) */
	uint32_t pad2;
};

#define NM_FILTER_IDS_MAX 65536 /* bound on cgroups[] and procs[] */

/* one process's records: pid, and the sequence numbers [lo_seq, hi_seq) it held that pid
 * for (a reused pid is another range) */
struct nm_proc_range {
	uint32_t pid;
	uint32_t pad;
	uint64_t lo_seq, hi_seq;
};

struct nm_filter {
	uint32_t mask;
	uint32_t pid;
	char comm[NETMON_COMM_LEN]; /* NUL-padded */
	uint16_t family, protocol, port;
	uint8_t kind;
	uint8_t dest_family;  /* AF_INET, AF_INET6 or AF_UNIX */
	uint8_t dest_len;     /* inet: prefix bits; unix: prefix bytes */
	uint8_t dest[NETMON_ADDR_LEN];
	int32_t ret;
	uint16_t sport;
	uint8_t src_family; /* AF_INET or AF_INET6 */
	uint8_t src_len;    /* prefix bits */
	uint8_t src[16];
	uint64_t since_ns; /* keep ts >= since_ns (boot clock); 0: no bound */
	uint64_t until_ns; /* keep ts < until_ns; 0: no bound */
	uint64_t after_seq; /* keep seq > after_seq */
	const struct nm_name_window *names; /* NM_Q_NAME, and top by name */
	uint64_t n_names;
	/* workload filters, names already turned into ids by the caller; n = 0 with the
	 * mask bit set matches nothing */
	const uint64_t *cgroups;             /* ascending */
	uint64_t n_cgroups;
	const struct nm_proc_range *procs;   /* ascending by pid */
	uint64_t n_procs;
};

struct nm_hit {
	uint64_t seq;
	struct netmon_event ev;
};

/* what top-N groups by */
enum { NM_BY_DEST = 0, NM_BY_COMM = 1, NM_BY_PID = 2, NM_BY_PORT = 3, NM_BY_ERROR = 4,
       NM_BY_SERVICE = 5, /* (destination port, comm): for accepts, a local service */
       NM_BY_CLIENT = 6,  /* source address: for accepts, the remote client */
       NM_BY_NAME = 7,    /* the group of the window an event falls in (0: none) */
       NM_BY_CGROUP = 8,  /* cgroup id: names (units, containers, pods) group over it */
};

struct nm_top {
	uint64_t count;
	uint64_t failed;
	uint64_t seq;            /* the representative's sequence number */
	struct netmon_event rep; /* the newest event of the group: renders its key */
};

int nm_store_init(struct nm_store *s, uint64_t capacity);
void nm_store_free(struct nm_store *s);
/* the lock for writers, announced when contended so that scans let them in between
 * their chunks: capture never waits for more than one chunk of a query */
void nm_store_lock(struct nm_store *s);
void nm_store_unlock(struct nm_store *s);
/* a writer holding the lock over a batch calls this every so often: a waiting query
 * gets one chunk in */
void nm_store_writer_pause(struct nm_store *s);
/* one record, taking the lock; the test entry point */
int nm_store_push(struct nm_store *s, const void *data, size_t size);
/* the ring-buffer callback's whole job: one record, the caller holding nm_store_lock */
int nm_store_push_held(struct nm_store *s, const void *data, size_t size);
/* the same, letting a waiting query in every so often (a batch under one lock) */
int nm_store_push_batch(struct nm_store *s, const void *data, size_t size);
/* a consistent snapshot of the store's counters */
struct nm_counters {
	uint64_t head;      /* sequence number of the newest record; 0 = none yet */
	uint64_t size;      /* records held */
	uint64_t evicted, malformed, unmatched, in_flight, accepts; /* as in struct nm_store */
	uint64_t oldest_ts; /* ts_ns of the oldest record held; 0 if none */
	uint64_t roll_buckets, roll_bytes, roll_given_up; /* as in struct nm_rollup */
	uint64_t runs, tail_cgroup, tail_pid; /* as in struct nm_store */
};

struct nm_counters nm_store_counters(struct nm_store *s);
struct nm_handshakes nm_store_handshakes(struct nm_store *s);
/* Copies the attempt counters in use to out (NM_ATTEMPT_SLOTS entries); returns how many;
 * *other = attempts counted in no slot. */
uint64_t nm_store_attempts(struct nm_store *s, struct nm_attempt *out, uint64_t *other);

/* Matching records in the window. newest != 0: the newest `limit` of them, else the
 * oldest `limit` (limit 0 = all). Returns a malloc'd array in sequence order (caller
 * frees) and its length in *n; *matched = all matches, returned or not. out == NULL:
 * count only. Returns 0 or -ENOMEM. */
int nm_store_query(struct nm_store *s, const struct nm_filter *f, uint64_t limit, int newest,
		   struct nm_hit **out, uint64_t *n, uint64_t *matched);

/* Following the store in order: the oldest `limit` (0 = all) records matching f after
 * f->after_seq, stopping before the first one still held: a TCP attempt whose handshake
 * is pending, recorded at or after hold_ns (boot clock; 0 = hold nothing), that matches
 * f but for its result (which can change once the outcome arrives). *upto = the seq up
 * to which the answer is complete: a follower's next cursor. *holder = the seq of the
 * record that stopped the walk, 0 if none. *oldest = the oldest seq the store held:
 * after_seq + 1 below it means records were overwritten before they could be read. */
int nm_store_follow(struct nm_store *s, const struct nm_filter *f, uint64_t limit,
		    uint64_t hold_ns, struct nm_hit **out, uint64_t *n, uint64_t *upto,
		    uint64_t *holder, uint64_t *oldest);

/* For each pid matching f, its newest per_pid records, and no more than max_total
 * records in all (the newest; 0 = no such bound); array in sequence order. *pids =
 * distinct pids seen, *truncated = some matching record was left out. */
int nm_store_latest_per_pid(struct nm_store *s, const struct nm_filter *f, uint64_t per_pid,
			    uint64_t max_total, struct nm_hit **out, uint64_t *n,
			    uint64_t *pids, int *truncated);

/* The `limit` largest groups of matching records by `by`, largest first; *groups = all
 * groups, *matched = all matching records. */
int nm_store_top(struct nm_store *s, const struct nm_filter *f, int by, uint64_t limit,
		 struct nm_top **out, uint64_t *n, uint64_t *groups, uint64_t *matched);

#endif

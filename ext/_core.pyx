# cython: language_level=3, boundscheck=False, wraparound=False
"""netmon._core: the BPF probe (libbpf) and the C event store.

Nothing here runs Python per event: the ring-buffer callback is C that copies the
record into the store under its mutex. Python tuples are made only for what a query
returns, after the store's lock is released.
"""
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memset
from libc.errno cimport EINVAL, errno
from cpython.bytes cimport PyBytes_FromStringAndSize
import struct
cimport libbpf as bpf
cimport netmon as nm
from netmon cimport netmon_event, NETMON_COMM_LEN, NETMON_ADDR_LEN


cdef extern from "store.h" nogil:
    struct nm_store:
        int use_rollups
    enum:
        NM_Q_PID
        NM_Q_COMM
        NM_Q_FAMILY
        NM_Q_PROTOCOL
        NM_Q_PORT
        NM_Q_OK
        NM_Q_ERROR
        NM_Q_RET
        NM_Q_DEST
        NM_Q_KIND
        NM_Q_PENDING
        NM_Q_UNKNOWN
        NM_Q_SRC
        NM_Q_SPORT
        NM_Q_NAME
        NM_Q_CGROUPS
        NM_Q_PROCS
        NM_FILTER_IDS_MAX
    struct nm_name_window:
        pass
    struct nm_proc_range:
        pass
    struct nm_filter:
        uint32_t mask
        uint32_t pid
        char comm[NETMON_COMM_LEN]
        uint16_t family
        uint16_t protocol
        uint16_t port
        uint8_t kind
        uint8_t dest_family
        uint8_t dest_len
        uint8_t dest[NETMON_ADDR_LEN]
        int32_t ret
        uint16_t sport
        uint8_t src_family
        uint8_t src_len
        uint8_t src[16]
        uint64_t since_ns
        uint64_t until_ns
        uint64_t after_seq
        const nm_name_window *names
        uint64_t n_names
        const uint64_t *cgroups
        uint64_t n_cgroups
        const nm_proc_range *procs
        uint64_t n_procs
    struct nm_hit:
        uint64_t seq
        netmon_event ev
    struct nm_top:
        uint64_t count
        uint64_t failed
        uint64_t seq
        netmon_event rep
    enum:
        NM_ATTEMPT_SLOTS
        NM_RET_UNKNOWN
        NM_RET_PENDING
        NM_RET_OTHER
    enum:  # enum nm_result
        NM_R_OK
        NM_R_ERROR
        NM_R_PENDING
        NM_R_UNKNOWN
    int nm_result(const netmon_event *e)
    struct nm_attempt:
        uint16_t family
        uint16_t protocol
        int32_t ret
        uint64_t count
    uint64_t nm_store_attempts(nm_store *s, nm_attempt *out, uint64_t *other)
    int nm_store_init(nm_store *s, uint64_t capacity)
    void nm_store_free(nm_store *s)
    int nm_store_push(nm_store *s, const void *data, size_t size)
    int nm_store_push_batch(nm_store *s, const void *data, size_t size)
    struct nm_counters:
        uint64_t head
        uint64_t size
        uint64_t evicted
        uint64_t malformed
        uint64_t unmatched
        uint64_t in_flight
        uint64_t accepts
        uint64_t oldest_ts
        uint64_t roll_buckets
        uint64_t roll_bytes
        uint64_t roll_given_up
        uint64_t runs
        uint64_t tail_cgroup
        uint64_t tail_pid
    nm_counters nm_store_counters(nm_store *s)
    enum:
        NM_LAT_BUCKETS
    struct nm_handshakes:
        uint32_t bounds_us[NM_LAT_BUCKETS]
        uint64_t established[NM_LAT_BUCKETS]
        uint64_t failed[NM_LAT_BUCKETS]
        uint64_t established_us
        uint64_t failed_us
    nm_handshakes nm_store_handshakes(nm_store *s)
    int nm_store_query(nm_store *s, const nm_filter *f, uint64_t limit, int newest,
                       nm_hit **out, uint64_t *n, uint64_t *matched)
    int nm_store_follow(nm_store *s, const nm_filter *f, uint64_t limit, uint64_t hold_ns,
                        nm_hit **out, uint64_t *n, uint64_t *upto, uint64_t *holder,
                        uint64_t *oldest)
    int nm_store_latest_per_pid(nm_store *s, const nm_filter *f, uint64_t per_pid,
                                uint64_t max_total, nm_hit **out, uint64_t *n, uint64_t *pids,
                                int *truncated)
    int nm_store_top(nm_store *s, const nm_filter *f, int by, uint64_t limit, nm_top **out,
                     uint64_t *n, uint64_t *groups, uint64_t *matched)


cdef extern from "consumer.h" nogil:
    struct nm_poll_state:
        int stop
        int paused
        uint64_t last_poll_ns
        int error
        int udp_fd
        nm_store *store
        bpf.ring_buffer *rb
    void nm_state_init(nm_poll_state *st)
    void nm_state_destroy(nm_poll_state *st)
    int nm_ring_open(nm_poll_state *st, int map_fd, bpf.ring_buffer_sample_fn cb, void *ctx)
    bint nm_ring_pending(const nm_poll_state *st)
    int nm_ring_sync(nm_poll_state *st)
    void nm_ring_close(nm_poll_state *st)
    int nm_poll_loop(nm_poll_state *state, int timeout_ms)
    uint64_t nm_boot_ns()
    int64_t nm_boot_offset_ns()
    void nm_log_install(int keep_debug)
    size_t nm_log_tail(char *buf, size_t size)
    void nm_log_clear()


cdef extern from "netmon.skel.h" nogil:
    # build/gen/netmon.skel.h, generated by setup.py (bpftool gen skeleton). Its member
    # structs are anonymous: named here by their type.
    ctypedef struct netmon_bpf_maps "__typeof__(((struct netmon_bpf *)0)->maps)":
        bpf.bpf_map *events
        bpf.bpf_map *scope
        bpf.bpf_map *drops
        bpf.bpf_map *udp_flows
        bpf.bpf_map *listeners
        bpf.bpf_map *inbound
        bpf.bpf_map *dns_rb
    ctypedef struct netmon_bpf_progs "__typeof__(((struct netmon_bpf *)0)->progs)":
        bpf.bpf_program *netmon_connect_enter
        bpf.bpf_program *netmon_connect_exit
        bpf.bpf_program *netmon_tcp_state
        bpf.bpf_program *netmon_tcp_reset
        bpf.bpf_program *netmon_cg_connect4
        bpf.bpf_program *netmon_cg_connect6
        bpf.bpf_program *netmon_cg_connect_unix
        bpf.bpf_program *netmon_cg_sendmsg4
        bpf.bpf_program *netmon_cg_sendmsg6
        bpf.bpf_program *netmon_dns_ingress
    struct netmon_bpf__rodata_cfg:  # the .rodata.cfg section
        nm.netmon_config netmon_cfg
    struct netmon_bpf:
        bpf.bpf_object_skeleton *skeleton
        netmon_bpf_maps maps
        netmon_bpf_progs progs
        netmon_bpf__rodata_cfg *rodata_cfg
    netmon_bpf *netmon_bpf__open()
    int netmon_bpf__load(netmon_bpf *skel)
    void netmon_bpf__destroy(netmon_bpf *skel)


cdef extern from *:
    """
    #include <stddef.h>
    /* each field of struct netmon_event: its offset and its struct-module format, taken
     * from the compiled header ("s": a byte array of `size` bytes) */
    #define NM_EVENT_FIELDS(X) X(ts_ns) X(cgroup_id) X(sock_id) X(pid) X(tid) X(uid) X(ret) \
        X(net_ns) X(latency_us) X(packets) X(family) X(port) X(protocol) X(sock_type) \
        X(flags) X(kind) X(backend) X(outcome) X(addr_len) X(comm) X(addr)
    /* inet events only: fields that share addr's bytes after the destination's 16 */
    #define NM_OVERLAY_FIELDS(X) X(src_addr) X(src_port)
    #define NM_MEMBER(f) (((struct netmon_event *)0)->f)
    #define NM_FORMAT(x) _Generic((x), __u8: "B", __u16: "H", __u32: "I", __s32: "i", \
                                  __u64: "Q", default: "s")
    #define NM_FIELD(f) {#f, offsetof(struct netmon_event, f), sizeof(NM_MEMBER(f)), \
                         NM_FORMAT(NM_MEMBER(f))},
    #define NM_SIZE(f) + sizeof(NM_MEMBER(f))
    static const struct nm_field {
        const char *name;
        size_t offset, size;
        const char *format;
    } nm_fields[] = {NM_EVENT_FIELDS(NM_FIELD)};
    _Static_assert(0 NM_EVENT_FIELDS(NM_SIZE) == sizeof(struct netmon_event),
                   "NM_EVENT_FIELDS must name every field of struct netmon_event");
    #define NM_NFIELDS (sizeof(nm_fields) / sizeof(nm_fields[0]))
    static const struct nm_field nm_overlays[] = {NM_OVERLAY_FIELDS(NM_FIELD)};
    #define NM_NOVERLAYS (sizeof(nm_overlays) / sizeof(nm_overlays[0]))
    """
    struct nm_field:
        const char *name
        size_t offset
        size_t size
        const char *format
    const nm_field nm_fields[]
    const size_t NM_NFIELDS
    const nm_field nm_overlays[]
    const size_t NM_NOVERLAYS


cdef extern from *:
    """
    #ifndef NETMON_VERSION
    #error "NETMON_VERSION must be defined by setup.py"
    #endif
    """
    const char *NETMON_VERSION


cdef dict _record_fields(const nm_field *table, size_t n):
    """{field: (offset, struct-module format)} of struct netmon_event, in offset order:
    what netmon.testing lays synthetic records out by."""
    cdef size_t i
    fields = []
    for i in range(n):
        fmt = table[i].format.decode()
        fields.append((table[i].offset, table[i].name.decode(),
                       f"{table[i].size}s" if fmt == "s" else fmt))
    return {name: (offset, fmt) for offset, name, fmt in sorted(fields)}


__version__ = NETMON_VERSION.decode()
RECORD_SIZE = sizeof(netmon_event)
RECORD_FIELDS = _record_fields(nm_fields, NM_NFIELDS)
# inet events only: fields laid over addr's bytes after the destination's 16
RECORD_OVERLAYS = _record_fields(nm_overlays, NM_NOVERLAYS)
COMM_LEN = NETMON_COMM_LEN
ADDR_LEN = NETMON_ADDR_LEN
# bpf/netmon.h's values, under their C names
NETMON_F_TRUNCATED, NETMON_F_NO_ADDR, NETMON_F_NO_RESULT, NETMON_F_INPROGRESS = (
    nm.NETMON_F_TRUNCATED, nm.NETMON_F_NO_ADDR, nm.NETMON_F_NO_RESULT, nm.NETMON_F_INPROGRESS)
NETMON_F_NO_OWNER = nm.NETMON_F_NO_OWNER
NETMON_KIND_CONNECT, NETMON_KIND_UDP_SEND, NETMON_KIND_TCP_OUTCOME, NETMON_KIND_ACCEPT = (
    nm.NETMON_KIND_CONNECT, nm.NETMON_KIND_UDP_SEND, nm.NETMON_KIND_TCP_OUTCOME,
    nm.NETMON_KIND_ACCEPT)
NETMON_BACKEND_SYSCALL, NETMON_BACKEND_CGROUP = (
    nm.NETMON_BACKEND_SYSCALL, nm.NETMON_BACKEND_CGROUP)
(NETMON_OUTCOME_NONE, NETMON_OUTCOME_PENDING, NETMON_OUTCOME_ESTABLISHED,
 NETMON_OUTCOME_FAILED) = (nm.NETMON_OUTCOME_NONE, nm.NETMON_OUTCOME_PENDING,
                           nm.NETMON_OUTCOME_ESTABLISHED, nm.NETMON_OUTCOME_FAILED)
DROP_REASONS = ("ringbuf_full", "inflight_full", "no_enter", "outcome_ringbuf_full",
                "udp_flows_full", "dns_ringbuf_full")
BPF_CGROUP_UNIX_CONNECT = 49  # Linux 6.7+; not in libbpf 1.1's headers
TOP_BY = ("destination", "command", "pid", "port", "error", "service", "client", "name",
          "cgroup")
FILTER_IDS_MAX = NM_FILTER_IDS_MAX  # most cgroup ids / process ranges one filter takes
# what happened to an attempt (ext/store.h, nm_result), by the code a row carries
RESULTS = {NM_R_OK: "ok", NM_R_ERROR: "error", NM_R_PENDING: "pending",
           NM_R_UNKNOWN: "unknown"}
# the attempt counters' result keys that are not 0 (ok) or -errno
RET_UNKNOWN, RET_PENDING, RET_OTHER = NM_RET_UNKNOWN, NM_RET_PENDING, NM_RET_OTHER
cdef uint64_t BPF_NOEXIST = 1
# inbound TCP handshakes counted, not stored (enum netmon_inbound)
INBOUND_REASONS = ("closed_port", "listeners_full")
NAME_WINDOW_SIZE = sizeof(nm_name_window)
DNS_HEADER_SIZE = sizeof(nm.netmon_dns)
DNS_MAX = nm.NETMON_DNS_MAX
assert len(DROP_REASONS) == nm.NETMON_DROP_MAX
assert len(INBOUND_REASONS) == nm.NETMON_INBOUND_MAX


def libbpf_version():
    return bpf.libbpf_version_string().decode()


def boot_ns():
    """CLOCK_BOOTTIME in ns on the kernel's clock: the clock of every record's ts_ns (in
    a time namespace, the namespace's boot clock less its offset)."""
    return nm_boot_ns()


def boot_offset_ns():
    """The time namespace's boot-clock offset (/proc/self/timens_offsets), 0 outside one:
    what boot_ns() takes off CLOCK_BOOTTIME."""
    return nm_boot_offset_ns()


def libbpf_log_tail(size_t size=4096):
    """The last `size` bytes libbpf printed (warnings, the verifier log)."""
    cdef char *buf = <char *>malloc(size)
    cdef size_t n
    if buf == NULL:
        raise MemoryError()
    try:
        n = nm_log_tail(buf, size)
        return buf[:n].decode("utf-8", "replace")
    finally:
        free(buf)


cdef tuple _row(uint64_t seq, netmon_event *e):
    cdef size_t comm_len = 0
    while comm_len < NETMON_COMM_LEN and e.comm[comm_len] != 0:
        comm_len += 1
    return (seq, e.ts_ns, e.cgroup_id, e.pid, e.tid, e.uid, e.ret, e.family, e.port,
            e.sock_type, e.protocol, e.flags,
            PyBytes_FromStringAndSize(e.comm, comm_len),
            PyBytes_FromStringAndSize(<char *>e.addr, min(e.addr_len, NETMON_ADDR_LEN)),
            e.kind, e.backend, e.outcome, e.net_ns, e.latency_us, e.packets, nm_result(e),
            e.src_port, PyBytes_FromStringAndSize(<char *>e.src_addr, 16))


cdef list _rows(nm_hit *hits, uint64_t n):
    cdef uint64_t i
    cdef list out = []
    for i in range(n):
        out.append(_row(hits[i].seq, &hits[i].ev))
    return out


cdef int _prefix(tuple value, uint8_t *family, uint8_t *length, uint8_t *buf, size_t cap,
                 str name) except -1:
    """A (family, address bytes, prefix length) filter value into its nm_filter fields."""
    fam, addr, n = value
    if len(addr) > cap:
        raise ValueError(f"{name} longer than a record holds")
    family[0] = fam
    length[0] = n
    memcpy(buf, <char *>addr, len(addr))
    return 0


cdef class Store:
    """Fixed-capacity ring of records; see ext/store.h. Rows are tuples:
    (seq, ts_ns, cgroup_id, pid, tid, uid, ret, family, port, sock_type, protocol, flags,
    comm bytes, addr bytes, kind, backend, outcome, net_ns, latency_us, packets, result
    (a key of RESULTS), src_port, src_addr bytes (16: inet events only))."""
    cdef nm_store s
    cdef readonly uint64_t capacity

    def __cinit__(self, uint64_t capacity):
        cdef int err = nm_store_init(&self.s, capacity)
        if err:
            raise MemoryError(f"cannot allocate a store of {capacity} records") if capacity else \
                ValueError("capacity must be at least 1")
        self.capacity = capacity

    def __dealloc__(self):
        nm_store_free(&self.s)

    def push_raw(self, const unsigned char[:] record not None):
        """Test entry point: the exact call the ring-buffer callback makes."""
        with nogil:
            nm_store_push(&self.s, &record[0] if record.shape[0] else NULL, record.shape[0])

    cdef nm_store *ptr(self):
        return &self.s

    def counters(self):
        cdef nm_counters c
        with nogil:
            c = nm_store_counters(&self.s)
        return {"delivered": c.head, "size": c.size, "evicted": c.evicted,
                "malformed": c.malformed, "outcomes_unmatched": c.unmatched,
                "in_flight": c.in_flight,
                "accepts": c.accepts,
                "oldest_ts_ns": c.oldest_ts if c.size else None, "last_seq": c.head,
                "rollup_buckets": c.roll_buckets, "rollup_bytes": c.roll_bytes,
                "rollup_tables_given_up": c.roll_given_up,
                "runs": c.runs, "tail": (c.tail_pid, c.tail_cgroup)}

    @property
    def use_rollups(self):
        """Whether counts and top-N come from the per-second rollups where their filter
        allows (the default); False: every query scans. Tests compare the two."""
        return bool(self.s.use_rollups)

    @use_rollups.setter
    def use_rollups(self, bint on):
        self.s.use_rollups = on

    def attempts(self):
        """({(family, protocol, key): count}, other): connect attempts ever counted, by what
        happened to them (key: 0 ok, -errno failed, RET_UNKNOWN, RET_PENDING, RET_OTHER),
        never forgotten (monotonic); other = those past the table's size."""
        cdef nm_attempt a[NM_ATTEMPT_SLOTS]
        cdef uint64_t other = 0, n, i
        with nogil:
            n = nm_store_attempts(&self.s, a, &other)
        return {(a[i].family, a[i].protocol, a[i].ret): a[i].count for i in range(n)}, other

    def handshakes(self):
        """The TCP handshake latency histogram, counted in C as outcomes arrive:
        {"bounds_us": the 16 finite upper bounds, "established"/"failed": 17 counts per
        bucket (not cumulative; the last is +Inf), "established_us"/"failed_us": sums}."""
        cdef nm_handshakes h
        cdef int i
        with nogil:
            h = nm_store_handshakes(&self.s)
        return {"bounds_us": [h.bounds_us[i] for i in range(NM_LAT_BUCKETS - 1)],
                "established": [h.established[i] for i in range(NM_LAT_BUCKETS)],
                "failed": [h.failed[i] for i in range(NM_LAT_BUCKETS)],
                "established_us": h.established_us, "failed_us": h.failed_us}

    cdef object _filter(self, nm_filter *f, dict q):
        """q: pid, comm, kind, family, protocol, port, result ("ok", "error", "pending",
        "unknown" or -errno: the errno the error field names), dest ((family, address
        bytes, prefix: bits for inet, bytes for unix)), src ((family, address bytes,
        prefix bits)), sport, since_ns, until_ns, after_seq, cgroups (ids), procs ((pid,
        lo_seq, hi_seq): seq in [lo, hi)); None or absent = any. names: (table,
        is_filter): a bytes table of nm_name_window (sorted; see store.h) that keeps only
        events in one of its windows if is_filter, and that top by "name" groups by. The
        table must outlive the query: q holds it. Returns what else f points into: keep
        it while f is used."""
        cdef const unsigned char[:] table
        memset(f, 0, sizeof(nm_filter))
        pid, comm, family = q.get("pid"), q.get("comm"), q.get("family")
        protocol, port, result = q.get("protocol"), q.get("port"), q.get("result")
        kind, dest = q.get("kind"), q.get("dest")
        src, sport = q.get("src"), q.get("sport")
        if pid is not None:
            f.mask |= NM_Q_PID
            f.pid = pid
        if comm is not None:
            c = comm.encode() if isinstance(comm, str) else bytes(comm)
            if len(c) >= NETMON_COMM_LEN:
                raise ValueError("comm longer than 15 bytes can never match")
            f.mask |= NM_Q_COMM
            memcpy(f.comm, <char *>c, len(c))
        if kind is not None:
            f.mask |= NM_Q_KIND
            f.kind = kind
        if dest is not None:
            _prefix(dest, &f.dest_family, &f.dest_len, f.dest, NETMON_ADDR_LEN, "dest")
            f.mask |= NM_Q_DEST
        if src is not None:
            _prefix(src, &f.src_family, &f.src_len, f.src, 16, "src")
            f.mask |= NM_Q_SRC
        if sport is not None:
            f.mask |= NM_Q_SPORT
            f.sport = sport
        if family is not None:
            f.mask |= NM_Q_FAMILY
            f.family = family
        if protocol is not None:
            f.mask |= NM_Q_PROTOCOL
            f.protocol = protocol
        if port is not None:
            f.mask |= NM_Q_PORT
            f.port = port
        if result == "ok":
            f.mask |= NM_Q_OK
        elif result == "error":
            f.mask |= NM_Q_ERROR
        elif result == "pending":
            f.mask |= NM_Q_PENDING
        elif result == "unknown":
            f.mask |= NM_Q_UNKNOWN
        elif result is not None:
            f.mask |= NM_Q_RET
            f.ret = result
        f.since_ns = q.get("since_ns") or 0
        f.until_ns = q.get("until_ns") or 0
        f.after_seq = q.get("after_seq") or 0
        names = q.get("names")
        if names is not None:
            table, is_filter = names
            if table.shape[0] % sizeof(nm_name_window):
                raise ValueError("names: not a table of nm_name_window")
            f.n_names = table.shape[0] // sizeof(nm_name_window)
            f.names = <const nm_name_window *>&table[0] if f.n_names else NULL
            if is_filter:
                f.mask |= NM_Q_NAME
        return self._id_sets(f, q.get("cgroups"), q.get("procs"))

    cdef tuple _id_sets(self, nm_filter *f, cgroups, procs):
        """The id arrays the C filter searches, packed sorted into bytes f points into."""
        cg = pr = None
        if cgroups is not None:
            ids = sorted(set(cgroups))
            if len(ids) > NM_FILTER_IDS_MAX:
                raise ValueError(f"a filter takes at most {NM_FILTER_IDS_MAX} cgroups")
            cg = struct.pack(f"<{len(ids)}Q", *ids)
            f.mask |= NM_Q_CGROUPS
            f.cgroups = <const uint64_t *><const char *>cg
            f.n_cgroups = len(ids)
        if procs is not None:
            ranges = sorted(set(procs))
            if len(ranges) > NM_FILTER_IDS_MAX:
                raise ValueError(f"a filter takes at most {NM_FILTER_IDS_MAX} processes")
            pr = b"".join([struct.pack("<IIQQ", p, 0, lo, hi) for p, lo, hi in ranges])
            f.mask |= NM_Q_PROCS
            f.procs = <const nm_proc_range *><const char *>pr
            f.n_procs = len(ranges)
        return (cg, pr)

    def query(self, uint64_t limit=0, bint newest=True, **q):
        """(rows, matched): the newest (or oldest) `limit` (0: all) rows matching q (see
        _filter), in sequence order, and how many matched in all."""
        cdef nm_filter f
        cdef nm_hit *hits = NULL
        cdef uint64_t n = 0, matched = 0
        cdef int err
        keep = self._filter(&f, q)  # no-cython-lint (f points into it)
        with nogil:
            err = nm_store_query(&self.s, &f, limit, newest, &hits, &n, &matched)
        if err:
            raise MemoryError()
        try:
            return _rows(hits, n), matched
        finally:
            free(hits)

    def follow(self, uint64_t limit, uint64_t hold_ns, **q):
        """(rows, upto, holder, oldest): the oldest `limit` rows matching q after its
        after_seq, stopping before a pending TCP handshake recorded at or after hold_ns
        (see nm_store_follow); upto: the next cursor; holder: the seq that stopped it or
        0; oldest: the oldest seq held."""
        cdef nm_filter f
        cdef nm_hit *hits = NULL
        cdef uint64_t n = 0, upto = 0, holder = 0, oldest = 0
        cdef int err
        keep = self._filter(&f, q)  # no-cython-lint (f points into it)
        with nogil:
            err = nm_store_follow(&self.s, &f, limit, hold_ns, &hits, &n, &upto, &holder,
                                  &oldest)
        if err:
            raise MemoryError()
        try:
            return _rows(hits, n), upto, holder, oldest
        finally:
            free(hits)

    def count(self, **q):
        cdef nm_filter f
        cdef uint64_t matched = 0
        keep = self._filter(&f, q)  # no-cython-lint (f points into it)
        with nogil:
            nm_store_query(&self.s, &f, 0, 1, NULL, NULL, &matched)
        return matched

    def latest_per_pid(self, uint64_t per_pid, uint64_t max_total=0, **q):
        """(rows, pids, truncated): each pid's newest `per_pid` rows, in sequence order,
        at most `max_total` in all (the newest; 0: no such bound)."""
        cdef nm_filter f
        cdef nm_hit *hits = NULL
        cdef uint64_t n = 0, pids = 0
        cdef int truncated = 0, err
        keep = self._filter(&f, q)  # no-cython-lint (f points into it)
        with nogil:
            err = nm_store_latest_per_pid(&self.s, &f, per_pid, max_total, &hits, &n, &pids,
                                          &truncated)
        if err:
            raise MemoryError()
        try:
            return _rows(hits, n), pids, bool(truncated)
        finally:
            free(hits)

    def top(self, str by, uint64_t limit, **q):
        """([(row of the group's newest event, count, failed)], groups, matched), largest
        group first; by is one of TOP_BY."""
        cdef nm_filter f
        cdef nm_top *tops = NULL
        cdef uint64_t n = 0, groups = 0, matched = 0, i
        cdef int err, by_i = TOP_BY.index(by)
        keep = self._filter(&f, q)  # no-cython-lint (f points into it)
        with nogil:
            err = nm_store_top(&self.s, &f, by_i, limit, &tops, &n, &groups, &matched)
        if err:
            raise MemoryError()
        try:
            return [(_row(tops[i].seq, &tops[i].rep), tops[i].count, tops[i].failed)
                    for i in range(n)], groups, matched
        finally:
            free(tops)


cdef int _on_record(void *ctx, void *data, size_t size) noexcept nogil:
    # the consumer holds the store's lock over the whole batch (consumer.c)
    return nm_store_push_batch(<nm_store *>ctx, data, size)


cdef struct dns_buf:
    # DNS records drained from dns_rb by one dns_read(): each a size_t length, then bytes
    char *p
    size_t n, cap


cdef int _on_dns(void *ctx, void *data, size_t size) noexcept nogil:
    cdef dns_buf *b = <dns_buf *>ctx
    cdef size_t need = b.n + sizeof(size_t) + size, cap
    cdef char *p
    if need > b.cap:
        cap = max(need, 2 * b.cap, <size_t>65536)
        p = <char *>realloc(b.p, cap)
        if p == NULL:
            return 0  # this record is lost; dns_read reports the shortfall
        b.p, b.cap = p, cap
    memcpy(b.p + b.n, &size, sizeof(size_t))
    memcpy(b.p + b.n + sizeof(size_t), data, size)
    b.n = need
    return 0


cdef class Probe:
    """The loaded BPF object (its generated skeleton), its links and its ring buffer,
    feeding one Store.

    open/load: Probe(store, ringbuf_bytes, wakeup_bytes); attach(); run() (blocks
    without the GIL until stop()); detach(); close(). Errors raise OSError(errno, msg).
    The links live in the skeleton: one slot a program, released in one place.
    """
    cdef netmon_bpf *skel
    cdef bpf.ring_buffer *dns_rb
    cdef dns_buf dns
    cdef nm_poll_state st
    cdef Store store

    def __cinit__(self):
        self.skel = NULL
        nm_state_init(&self.st)
        self.dns_rb = NULL
        memset(&self.dns, 0, sizeof(self.dns))

    def __init__(self, Store store not None, uint32_t ringbuf_bytes, uint64_t wakeup_bytes,
                 bint debug=False, str backend="syscall", bint udp_sends=False,
                 bint unix_hook=True, bint scoped=False, bint dns_names=False):
        """Open and load the programs `backend` needs (+ the UDP send hooks); unix_hook:
        the kernel has BPF_CGROUP_UNIX_CONNECT (cgroup backend only); scoped: watch only
        the cgroup given to attach() and below it, not the whole host; dns_names: the
        cgroup_skb program that passes DNS answers to dns_read()."""
        cdef int err
        if backend not in ("syscall", "cgroup"):
            raise ValueError(f"backend must be syscall or cgroup, got {backend!r}")
        self.store = store
        self.st.store = store.ptr()
        nm_log_install(debug)
        nm_log_clear()
        self.skel = netmon_bpf__open()
        if self.skel == NULL:
            raise OSError(errno, "cannot open the embedded BPF object")
        self._autoload(backend == "cgroup", udp_sends, unix_hook)
        bpf.bpf_program__set_autoload(self.skel.progs.netmon_dns_ingress, dns_names)
        err = bpf.bpf_map__set_max_entries(self.skel.maps.events, ringbuf_bytes)
        if err:
            raise OSError(-err, "cannot size the ring buffer")
        self.skel.rodata_cfg.netmon_cfg.wakeup_bytes = wakeup_bytes
        self.skel.rodata_cfg.netmon_cfg.scoped = scoped
        self.skel.rodata_cfg.netmon_cfg.backend = (
            nm.NETMON_BACKEND_CGROUP if backend == "cgroup" else nm.NETMON_BACKEND_SYSCALL)
        with nogil:
            err = netmon_bpf__load(self.skel)
        if err:
            raise OSError(-err, "the kernel refused to load the BPF programs")
        err = nm_ring_open(&self.st, bpf.bpf_map__fd(self.skel.maps.events), _on_record,
                           store.ptr())
        if err:
            raise OSError(-err, "cannot set up the ring buffer consumer")
        if udp_sends:
            self.st.udp_fd = bpf.bpf_map__fd(self.skel.maps.udp_flows)
        if dns_names:
            self.dns_rb = bpf.ring_buffer__new(bpf.bpf_map__fd(self.skel.maps.dns_rb), _on_dns,
                                               &self.dns, NULL)
            if self.dns_rb == NULL:
                raise OSError(errno, "cannot set up the DNS ring buffer consumer")

    def dns_read(self):
        """The DNS records waiting in dns_rb (none if the program is not loaded): a list
        of bytes, each a struct netmon_dns header and its payload. Never blocks; one
        caller at a time (libbpf's consumer is single-threaded)."""
        cdef int got
        cdef size_t off = 0, size
        out = []
        if self.dns_rb == NULL:
            return out
        with nogil:
            got = bpf.ring_buffer__consume(self.dns_rb)
        try:
            while off < self.dns.n:
                memcpy(&size, self.dns.p + off, sizeof(size_t))
                out.append(PyBytes_FromStringAndSize(self.dns.p + off + sizeof(size_t), size))
                off += sizeof(size_t) + size
        finally:
            self.dns.n = 0
        if got < 0:
            raise OSError(-got, "cannot read the DNS ring buffer")
        return out

    cdef void _autoload(self, bint cgroup, bint udp_sends, bint unix_hook):
        """Load only the programs of one backend; the TCP outcome program serves both."""
        cdef netmon_bpf_progs *p = &self.skel.progs
        bpf.bpf_program__set_autoload(p.netmon_connect_enter, not cgroup)
        bpf.bpf_program__set_autoload(p.netmon_connect_exit, not cgroup)
        bpf.bpf_program__set_autoload(p.netmon_tcp_state, True)
        bpf.bpf_program__set_autoload(p.netmon_tcp_reset, True)
        bpf.bpf_program__set_autoload(p.netmon_cg_connect4, cgroup)
        bpf.bpf_program__set_autoload(p.netmon_cg_connect6, cgroup)
        bpf.bpf_program__set_autoload(p.netmon_cg_connect_unix, cgroup and unix_hook)
        bpf.bpf_program__set_autoload(p.netmon_cg_sendmsg4, udp_sends)
        bpf.bpf_program__set_autoload(p.netmon_cg_sendmsg6, udp_sends)
        # libbpf 1.1 does not know the cgroup/connect_unix section
        bpf.bpf_program__set_type(p.netmon_cg_connect_unix, bpf.BPF_PROG_TYPE_CGROUP_SOCK_ADDR)
        bpf.bpf_program__set_expected_attach_type(p.netmon_cg_connect_unix,
                                                  BPF_CGROUP_UNIX_CONNECT)

    cdef netmon_bpf *_loaded(self) except NULL:
        if self.skel == NULL:
            raise ValueError("the probe is closed")
        return self.skel

    def attach(self, int cgroup_fd=-1):
        """Attach every loaded program, in the order bpf/netmon.bpf.c defines them (enter
        before exit, so no exit arrives unpaired): tracepoints; cgroup hooks to cgroup_fd
        (bpf links: released when the process dies), which is also the scope when
        scoped."""
        cdef bpf.bpf_object_skeleton *s = self._loaded().skeleton
        cdef bpf.bpf_program *p
        cdef bpf.bpf_link *link
        cdef bint cgroup
        cdef uint32_t zero = 0
        cdef int i, err
        if cgroup_fd >= 0 and bpf.bpf_map_update_elem(bpf.bpf_map__fd(self.skel.maps.scope),
                                                      &zero, &cgroup_fd, 0):
            raise OSError(errno, "cannot set the cgroup in scope")
        for i in range(s.prog_cnt):
            p = s.progs[i].prog[0]
            if bpf.bpf_program__fd(p) < 0 or s.progs[i].link[0] != NULL:
                continue  # not loaded (another backend's), or attached already
            name = bpf.bpf_program__name(p).decode()
            ptype = bpf.bpf_program__type(p)
            cgroup = (ptype == bpf.BPF_PROG_TYPE_CGROUP_SOCK_ADDR or
                      ptype == bpf.BPF_PROG_TYPE_CGROUP_SKB)
            if cgroup and cgroup_fd < 0:
                self.detach()
                raise OSError(EINVAL, f"{name} needs a cgroup to attach to")
            with nogil:
                link = (bpf.bpf_program__attach_cgroup(p, cgroup_fd) if cgroup
                        else bpf.bpf_program__attach(p))
                err = errno
            if link == NULL:
                self.detach()
                raise OSError(err, "cannot attach " + name)
            s.progs[i].link[0] = link

    def detach(self):
        """Destroy the links, newest first (exit goes before enter)."""
        self._detach()

    cdef void _detach(self) noexcept:
        cdef bpf.bpf_object_skeleton *s
        cdef int i
        if self.skel == NULL:
            return
        s = self.skel.skeleton
        with nogil:
            for i in range(s.prog_cnt - 1, -1, -1):
                bpf.bpf_link__destroy(s.progs[i].link[0])  # NULL: not attached, a no-op
                s.progs[i].link[0] = NULL

    @property
    def programs(self):
        """The attached programs, in attach order."""
        cdef bpf.bpf_object_skeleton *s
        if self.skel == NULL:
            return []
        s = self.skel.skeleton
        return [bpf.bpf_program__name(s.progs[i].prog[0]).decode()
                for i in range(s.prog_cnt) if s.progs[i].link[0] != NULL]

    def run(self, int timeout_ms=10):
        """The poll loop; returns when stop() is called (0) or on error (-errno)."""
        cdef int err
        self.st.stop = 0
        with nogil:
            err = nm_poll_loop(&self.st, timeout_ms)
        return err

    def sync(self):
        """Read your writes: move every record the kernel has already submitted into the
        store now, serialised with the poll loop (not while paused, nor after close).
        Nothing pending costs two memory reads. Returns the records moved, or -errno."""
        cdef int n = 0
        if nm_ring_pending(&self.st):
            with nogil:
                n = nm_ring_sync(&self.st)
        return n

    def stop(self):
        self.st.stop = 1

    def pause(self, bint paused):
        """Tests: leave records in the ring (they pile up, then drop, counted)."""
        self.st.paused = paused

    @property
    def last_poll_ns(self):
        return self.st.last_poll_ns

    def drops(self):
        """Kernel-side losses by reason, summed over CPUs."""
        return self._percpu_counters(self._loaded().maps.drops, DROP_REASONS)

    def inbound(self):
        """Inbound TCP handshakes counted, not stored, by reason, summed over CPUs."""
        return self._percpu_counters(self._loaded().maps.inbound, INBOUND_REASONS)

    cdef dict _percpu_counters(self, bpf.bpf_map *m, tuple names):
        cdef int ncpu = bpf.libbpf_num_possible_cpus()
        cdef uint64_t *vals
        cdef uint32_t key
        cdef int fd = bpf.bpf_map__fd(m)
        out = {}
        if ncpu <= 0:
            raise OSError(-ncpu, "cannot count possible CPUs")
        vals = <uint64_t *>malloc(ncpu * sizeof(uint64_t))
        try:
            for key in range(len(names)):
                if bpf.bpf_map_lookup_elem(fd, &key, vals):
                    raise OSError(errno, "cannot read the counters")
                out[names[key]] = sum(vals[i] for i in range(ncpu))
        finally:
            free(vals)
        return out

    def seed_listener(self, uint32_t net_ns, uint32_t port, uint32_t pid, uint32_t uid,
                      uint64_t cgroup_id, bytes comm):
        """Record the owner of a listener that existed before the programs were attached;
        one that listen() recorded since wins. False if the entry was there already."""
        cdef nm.netmon_listener_key k
        cdef nm.netmon_listener v
        memset(&k, 0, sizeof(k))
        memset(&v, 0, sizeof(v))
        k.net_ns, k.port = net_ns, port
        v.pid, v.tid, v.uid, v.cgroup_id = pid, pid, uid, cgroup_id
        memcpy(v.comm, <char *>comm, min(len(comm), NETMON_COMM_LEN - 1))
        return bpf.bpf_map_update_elem(bpf.bpf_map__fd(self._loaded().maps.listeners),
                                       &k, &v, BPF_NOEXIST) == 0

    def prog_stats(self):
        """{program: {"id", "run_cnt", "run_time_ns"}} from the kernel; the counts stay
        zero unless kernel.bpf_stats_enabled is set."""
        cdef bpf.bpf_object_skeleton *s = self._loaded().skeleton
        cdef bpf.bpf_program *p
        cdef bpf.bpf_prog_info info
        cdef uint32_t n
        cdef int i
        out = {}
        for i in range(s.prog_cnt):
            p = s.progs[i].prog[0]
            if bpf.bpf_program__fd(p) < 0:
                continue  # not loaded: another backend's
            memset(&info, 0, sizeof(info))
            n = sizeof(info)
            if bpf.bpf_obj_get_info_by_fd(bpf.bpf_program__fd(p), &info, &n) == 0:
                out[bpf.bpf_program__name(p).decode()] = {
                    "id": info.id, "run_cnt": info.run_cnt, "run_time_ns": info.run_time_ns}
        return out

    def close(self):
        self._release()

    cdef void _release(self) noexcept:
        self._detach()
        nm_ring_close(&self.st)
        if self.dns_rb != NULL:
            bpf.ring_buffer__free(self.dns_rb)
            self.dns_rb = NULL
        free(self.dns.p)
        self.dns.p = NULL
        self.dns.n = self.dns.cap = 0
        netmon_bpf__destroy(self.skel)  # NULL: a no-op
        self.skel = NULL

    def __dealloc__(self):
        self._release()
        nm_state_destroy(&self.st)


# ---- JSON for many events at once ----
# An API answer of 100 events spent more time in Event.to_dict() and json.dumps (~8 us
# an event) than in everything else. This writes the same text straight from the Event
# tuples: byte-identical to json.dumps([e.to_dict() ...]) (tests compare the two).

from cpython.datetime cimport (datetime, import_datetime, datetime_year, datetime_month,
                               datetime_day, datetime_hour, datetime_minute, datetime_second,
                               datetime_microsecond)
from libc.stdio cimport snprintf
from json.encoder import encode_basestring_ascii as _json_str

import_datetime()

# how json_objects shows a column (event.py's table says which): as it is (0), or
cdef enum:
    _SERVICE = 1  # the service name of a port (a dict lookup), or null
    _LIST = 2     # a tuple of strings as an array, or null when empty or None
    _RFC3339 = 3  # a UTC datetime as RFC 3339 with microseconds and Z
JSON_SERVICE, JSON_LIST, JSON_RFC3339 = _SERVICE, _LIST, _RFC3339


cdef str _json_value(object v):
    """json.dumps(v) for what an Event holds: None, bool, int, str, a tuple/list of str."""
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    t = type(v)
    if t is int:
        return str(v)
    if t is str:
        return _json_str(v)
    if t is tuple or t is list:
        return "[" + ", ".join([_json_value(x) for x in v]) + "]"
    import json
    return json.dumps(v)


cdef str _rfc3339(object ts, object fallback):
    cdef char buf[40]
    cdef datetime d
    if type(ts) is not datetime or datetime_year(ts) < 1000:
        return _json_str(fallback(ts))  # what event.rfc3339 writes for the rare rest
    d = <datetime>ts
    snprintf(buf, sizeof(buf), "\"%04d-%02d-%02dT%02d:%02d:%02d.%06dZ\"",
             datetime_year(d), datetime_month(d), datetime_day(d), datetime_hour(d),
             datetime_minute(d), datetime_second(d), datetime_microsecond(d))
    return buf.decode("ascii")


def json_objects(rows, tuple prefixes, tuple columns, tuple hows, dict services,
                 object rfc3339):
    """'[{...}, {...}]': each row (a tuple) as one JSON object. Key i's text, with its
    separator, is prefixes[i] (the last item closes the object); its value comes from
    row[columns[i]], shown as hows[i] says (0: as it is; JSON_*); rfc3339 writes the rare
    datetime this does not (a year before 1000)."""
    cdef Py_ssize_t i, n = len(columns), width = max(columns, default=-1) + 1
    cdef list out = ["["]
    cdef bint first = True
    cdef int *cols = <int *>malloc(2 * n * sizeof(int) + 1)
    cdef int *how
    cdef tuple row
    if cols == NULL:
        raise MemoryError()
    how = cols + n
    try:
        for i in range(n):
            cols[i] = columns[i]
            how[i] = hows[i]
            if cols[i] < 0:
                raise ValueError("a column index is negative")
        for r in rows:
            if not isinstance(r, tuple):  # an Event, with every column asked for
                raise TypeError(f"a row is a {type(r).__name__}, not a tuple")
            row = <tuple>r
            if len(row) < width:
                raise ValueError(f"a row of {len(row)} items, {width} needed")
            if not first:
                out.append(", ")
            first = False
            for i in range(n):
                out.append(<str>prefixes[i])
                v = row[cols[i]]
                if how[i] == 0:
                    out.append(_json_value(v))
                elif how[i] == _RFC3339:
                    out.append(_rfc3339(v, rfc3339))
                elif how[i] == _SERVICE:
                    out.append(_json_value(services.get(v)))
                else:  # _LIST
                    out.append(_json_value(v) if v else "null")
            out.append(<str>prefixes[n])
    finally:
        free(cols)
    out.append("]")
    return "".join(out)

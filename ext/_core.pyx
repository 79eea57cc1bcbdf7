# cython: language_level=3, boundscheck=False, wraparound=False
"""netmon._core: the BPF probe (libbpf) and the C event store.

Nothing here runs Python per event: the ring-buffer callback is C that copies the
record into the store under its mutex. Python tuples are made only for what a query
returns, after the store's lock is released.
"""
from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset
from libc.errno cimport errno
from cpython.bytes cimport PyBytes_FromStringAndSize
cimport libbpf as bpf


cdef extern from "netmon.h":
    enum:
        NETMON_COMM_LEN
        NETMON_ADDR_LEN
        NETMON_DROP_MAX
    struct netmon_event:
        uint64_t ts_ns
        uint64_t cgroup_id
        uint32_t pid
        uint32_t tid
        uint32_t uid
        int32_t ret
        uint32_t net_ns
        uint32_t latency_us
        uint32_t packets
        uint16_t family
        uint16_t port
        uint16_t protocol
        uint8_t sock_type
        uint8_t flags
        uint8_t kind
        uint8_t backend
        uint8_t outcome
        uint8_t addr_len
        char comm[16]
        uint8_t addr[48]


cdef extern from "store.h" nogil:
    struct nm_store:
        pass
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
    struct nm_filter:
        uint32_t mask
        uint32_t pid
        char comm[16]
        uint16_t family
        uint16_t protocol
        uint16_t port
        uint8_t kind
        uint8_t dest_family
        uint8_t dest_len
        uint8_t dest[48]
        int32_t ret
        uint64_t since_ns
        uint64_t until_ns
        uint64_t after_seq
    struct nm_hit:
        uint64_t seq
        netmon_event ev
    struct nm_top:
        uint64_t count
        uint64_t failed
        netmon_event rep
    enum:
        NM_ATTEMPT_SLOTS
        NM_RET_UNKNOWN
    struct nm_attempt:
        uint16_t family
        uint16_t protocol
        int32_t ret
        uint64_t count
    uint64_t nm_store_attempts(nm_store *s, nm_attempt *out, uint64_t *other)
    int nm_store_init(nm_store *s, uint64_t capacity)
    void nm_store_free(nm_store *s)
    int nm_store_push(nm_store *s, const void *data, size_t size)
    struct nm_counters:
        uint64_t head
        uint64_t size
        uint64_t evicted
        uint64_t malformed
        uint64_t unmatched
        uint64_t oldest_ts
    nm_counters nm_store_counters(nm_store *s)
    int nm_store_query(nm_store *s, const nm_filter *f, uint64_t limit, int newest,
                       nm_hit **out, uint64_t *n, uint64_t *matched)
    int nm_store_latest_per_pid(nm_store *s, const nm_filter *f, uint64_t per_pid,
                                nm_hit **out, uint64_t *n, uint64_t *pids, int *truncated)
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
    int nm_poll_loop(bpf.ring_buffer *rb, nm_poll_state *state, int timeout_ms)
    uint64_t nm_boot_ns()
    void nm_log_install(int keep_debug)
    size_t nm_log_tail(char *buf, size_t size)
    void nm_log_clear()


cdef extern from "netmon_bpf_obj.h":
    const unsigned char netmon_bpf_obj[]
    const size_t netmon_bpf_obj_len


cdef extern from *:
    """
    #ifndef NETMON_VERSION
    #error "NETMON_VERSION must be defined by setup.py"
    #endif
    """
    const char *NETMON_VERSION


__version__ = NETMON_VERSION.decode()
RECORD_SIZE = sizeof(netmon_event)
COMM_LEN = NETMON_COMM_LEN
ADDR_LEN = NETMON_ADDR_LEN
DROP_REASONS = ("ringbuf_full", "inflight_full", "no_enter", "outcome_ringbuf_full",
                "udp_flows_full")
# the programs of each backend (bpf/netmon.bpf.c); the TCP outcome program serves both
PROGRAMS = {
    "syscall": ("netmon_connect_enter", "netmon_connect_exit", "netmon_tcp_state"),
    "cgroup": ("netmon_cg_connect4", "netmon_cg_connect6", "netmon_cg_connect_unix",
               "netmon_tcp_state"),
}
UDP_SEND_PROGRAMS = ("netmon_cg_sendmsg4", "netmon_cg_sendmsg6")
BPF_PROG_TYPE_CGROUP_SOCK_ADDR = 18
BPF_CGROUP_UNIX_CONNECT = 49  # Linux 6.7+; not in libbpf 1.1's headers
TOP_BY = ("destination", "command", "pid", "port", "error")
assert len(DROP_REASONS) == NETMON_DROP_MAX


def libbpf_version():
    return bpf.libbpf_version_string().decode()


def boot_ns():
    """CLOCK_BOOTTIME in ns: the clock of every record's ts_ns."""
    return nm_boot_ns()


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
            e.kind, e.backend, e.outcome, e.net_ns, e.latency_us, e.packets)


cdef list _rows(nm_hit *hits, uint64_t n):
    cdef uint64_t i
    cdef list out = []
    for i in range(n):
        out.append(_row(hits[i].seq, &hits[i].ev))
    return out


cdef class Store:
    """Fixed-capacity ring of records; see ext/store.h. Rows are tuples:
    (seq, ts_ns, cgroup_id, pid, tid, uid, ret, family, port, sock_type, protocol, flags,
    comm bytes, addr bytes, kind, backend, outcome, net_ns, latency_us, packets)."""
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
                "oldest_ts_ns": c.oldest_ts if c.size else None, "last_seq": c.head}

    def attempts(self):
        """({(family, protocol, ret or None if unknown): count}, other): connect attempts
        ever pushed, never forgotten (monotonic); other = those past the table's size."""
        cdef nm_attempt a[NM_ATTEMPT_SLOTS]
        cdef uint64_t other = 0, n, i
        with nogil:
            n = nm_store_attempts(&self.s, a, &other)
        return {(a[i].family, a[i].protocol,
                 None if a[i].ret == NM_RET_UNKNOWN else a[i].ret): a[i].count
                for i in range(n)}, other

    cdef int _filter(self, nm_filter *f, dict q) except -1:
        """q: pid, comm, kind, family, protocol, port, result ("ok", "error" or a return
        code), dest ((family, address bytes, prefix: bits for inet, bytes for unix)),
        since_ns, until_ns, after_seq; None or absent = any."""
        memset(f, 0, sizeof(nm_filter))
        pid, comm, family = q.get("pid"), q.get("comm"), q.get("family")
        protocol, port, result = q.get("protocol"), q.get("port"), q.get("result")
        kind, dest = q.get("kind"), q.get("dest")
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
            dfam, daddr, dlen = dest
            if len(daddr) > NETMON_ADDR_LEN:
                raise ValueError("dest longer than a record holds")
            f.mask |= NM_Q_DEST
            f.dest_family = dfam
            f.dest_len = dlen
            memcpy(f.dest, <char *>daddr, len(daddr))
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
        elif result is not None:
            f.mask |= NM_Q_RET
            f.ret = result
        f.since_ns = q.get("since_ns") or 0
        f.until_ns = q.get("until_ns") or 0
        f.after_seq = q.get("after_seq") or 0
        return 0

    def query(self, uint64_t limit=0, bint newest=True, **q):
        """(rows, matched): the newest (or oldest) `limit` (0: all) rows matching q (see
        _filter), in sequence order, and how many matched in all."""
        cdef nm_filter f
        cdef nm_hit *hits = NULL
        cdef uint64_t n = 0, matched = 0
        cdef int err
        self._filter(&f, q)
        with nogil:
            err = nm_store_query(&self.s, &f, limit, newest, &hits, &n, &matched)
        if err:
            raise MemoryError()
        try:
            return _rows(hits, n), matched
        finally:
            free(hits)

    def count(self, **q):
        cdef nm_filter f
        cdef uint64_t matched = 0
        self._filter(&f, q)
        with nogil:
            nm_store_query(&self.s, &f, 0, 1, NULL, NULL, &matched)
        return matched

    def latest_per_pid(self, uint64_t per_pid, **q):
        """(rows, pids, truncated): each pid's newest `per_pid` rows, in sequence order."""
        cdef nm_filter f
        cdef nm_hit *hits = NULL
        cdef uint64_t n = 0, pids = 0
        cdef int truncated = 0, err
        self._filter(&f, q)
        with nogil:
            err = nm_store_latest_per_pid(&self.s, &f, per_pid, &hits, &n, &pids, &truncated)
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
        self._filter(&f, q)
        with nogil:
            err = nm_store_top(&self.s, &f, by_i, limit, &tops, &n, &groups, &matched)
        if err:
            raise MemoryError()
        try:
            return [(_row(0, &tops[i].rep), tops[i].count, tops[i].failed)
                    for i in range(n)], groups, matched
        finally:
            free(tops)


cdef int _on_record(void *ctx, void *data, size_t size) noexcept nogil:
    return nm_store_push(<nm_store *>ctx, data, size)


cdef class Probe:
    """The loaded BPF object, its links and its ring buffer, feeding one Store.

    open/load: Probe(store, ringbuf_bytes, wakeup_bytes); attach(); run() (blocks
    without the GIL until stop()); detach(); close(). Errors raise OSError(errno, msg).
    """
    cdef bpf.bpf_object *obj
    cdef bpf.ring_buffer *rb
    cdef bpf.bpf_link *links[8]
    cdef int nlinks
    cdef nm_poll_state st
    cdef Store store
    cdef list attached

    def __cinit__(self):
        self.obj = NULL
        self.rb = NULL
        self.nlinks = 0
        memset(&self.st, 0, sizeof(self.st))

    def __init__(self, Store store not None, uint32_t ringbuf_bytes, uint64_t wakeup_bytes,
                 bint debug=False, str backend="syscall", bint udp_sends=False,
                 bint unix_hook=True, bint scoped=False):
        """Open and load the programs `backend` needs (+ the UDP send hooks); unix_hook:
        the kernel has BPF_CGROUP_UNIX_CONNECT (cgroup backend only); scoped: watch only
        the cgroup given to attach() and below it, not the whole host."""
        cdef bpf.bpf_map *m
        cdef bpf.bpf_program *p = NULL
        cdef size_t sz = 0
        cdef int err
        self.store = store
        self.attached = []
        self.st.udp_fd = -1
        self.st.store = store.ptr()
        nm_log_install(debug)
        nm_log_clear()
        self.obj = bpf.bpf_object__open_mem(netmon_bpf_obj, netmon_bpf_obj_len, NULL)
        if self.obj == NULL:
            raise OSError(errno, "cannot open the embedded BPF object")
        wanted = set(PROGRAMS[backend]) | (set(UDP_SEND_PROGRAMS) if udp_sends else set())
        if not unix_hook:
            wanted.discard("netmon_cg_connect_unix")
        while True:
            p = bpf.bpf_object__next_program(self.obj, p)
            if p == NULL:
                break
            bpf.bpf_program__set_autoload(p, bpf.bpf_program__name(p).decode() in wanted)
        p = bpf.bpf_object__find_program_by_name(self.obj, b"netmon_cg_connect_unix")
        bpf.bpf_program__set_type(p, BPF_PROG_TYPE_CGROUP_SOCK_ADDR)
        bpf.bpf_program__set_expected_attach_type(p, BPF_CGROUP_UNIX_CONNECT)
        m = bpf.bpf_object__find_map_by_name(self.obj, "events")
        err = bpf.bpf_map__set_max_entries(m, ringbuf_bytes)
        if err:
            raise OSError(-err, "cannot size the ring buffer")
        m = bpf.bpf_object__find_map_by_name(self.obj, ".rodata.cfg")
        cfg = <uint64_t *>bpf.bpf_map__initial_value(m, &sz) if m != NULL else NULL
        if cfg == NULL or sz < 2 * sizeof(uint64_t):
            raise OSError(22, "the BPF object has no .rodata.cfg section")
        cfg[0] = wakeup_bytes
        cfg[1] = scoped
        with nogil:
            err = bpf.bpf_object__load(self.obj)
        if err:
            raise OSError(-err, "the kernel refused to load the BPF programs")
        self.rb = bpf.ring_buffer__new(
            bpf.bpf_map__fd(bpf.bpf_object__find_map_by_name(self.obj, "events")),
            _on_record, store.ptr(), NULL)
        if self.rb == NULL:
            raise OSError(errno, "cannot set up the ring buffer consumer")
        if udp_sends:
            self.st.udp_fd = bpf.bpf_map__fd(
                bpf.bpf_object__find_map_by_name(self.obj, "udp_flows"))

    def attach(self, int cgroup_fd=-1):
        """Attach every loaded program: tracepoints; cgroup hooks to cgroup_fd (bpf links:
        released when the process dies), which is also the scope when scoped. Enter
        before exit, so no exit arrives unpaired."""
        cdef bpf.bpf_program *p = NULL
        cdef bpf.bpf_link *link
        cdef bint cgroup
        cdef uint32_t zero = 0
        if cgroup_fd >= 0 and bpf.bpf_map_update_elem(bpf.bpf_map__fd(
                bpf.bpf_object__find_map_by_name(self.obj, "scope")), &zero, &cgroup_fd, 0):
            raise OSError(errno, "cannot set the cgroup in scope")
        progs = []
        while True:
            p = bpf.bpf_object__next_program(self.obj, p)
            if p == NULL:
                break
            if bpf.bpf_program__fd(p) >= 0:
                progs.append(<size_t>p)
        progs.sort(key=lambda q: b"exit" in bpf.bpf_program__name(<bpf.bpf_program *><size_t>q))
        for q in progs:
            p = <bpf.bpf_program *><size_t>q
            name = bpf.bpf_program__name(p).decode()
            cgroup = name.startswith("netmon_cg_")
            if cgroup and cgroup_fd < 0:
                raise OSError(22, f"{name} needs a cgroup to attach to")
            with nogil:
                link = (bpf.bpf_program__attach_cgroup(p, cgroup_fd) if cgroup
                        else bpf.bpf_program__attach(p))
            if link == NULL:
                err = errno
                self.detach()
                raise OSError(err, "cannot attach " + name)
            self.links[self.nlinks] = link
            self.nlinks += 1
            self.attached.append(name)

    def detach(self):
        """Destroy the links, newest first (enter goes before exit)."""
        while self.nlinks:
            self.nlinks -= 1
            with nogil:
                bpf.bpf_link__destroy(self.links[self.nlinks])
        self.attached = []

    @property
    def programs(self):
        return list(self.attached)

    def run(self, int timeout_ms=10):
        """The poll loop; returns when stop() is called (0) or on error (-errno)."""
        cdef int err
        self.st.stop = 0
        with nogil:
            err = nm_poll_loop(self.rb, &self.st, timeout_ms)
        return err

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
        cdef int ncpu = bpf.libbpf_num_possible_cpus()
        cdef uint64_t *vals
        cdef uint32_t key
        cdef int fd = bpf.bpf_map__fd(bpf.bpf_object__find_map_by_name(self.obj, "drops"))
        out = {}
        if ncpu <= 0:
            raise OSError(-ncpu, "cannot count possible CPUs")
        vals = <uint64_t *>malloc(ncpu * sizeof(uint64_t))
        try:
            for key in range(NETMON_DROP_MAX):
                if bpf.bpf_map_lookup_elem(fd, &key, vals):
                    raise OSError(errno, "cannot read the drop counters")
                out[DROP_REASONS[key]] = sum(vals[i] for i in range(ncpu))
        finally:
            free(vals)
        return out

    def prog_stats(self):
        """{program: {"id", "run_cnt", "run_time_ns"}} from the kernel; the counts stay
        zero unless kernel.bpf_stats_enabled is set."""
        cdef bpf.bpf_program *p = NULL
        cdef bpf.bpf_prog_info info
        cdef uint32_t n
        out = {}
        while True:
            p = bpf.bpf_object__next_program(self.obj, p)
            if p == NULL:
                break
            if bpf.bpf_program__fd(p) < 0:
                continue  # not loaded: another backend's
            memset(&info, 0, sizeof(info))
            n = sizeof(info)
            if bpf.bpf_obj_get_info_by_fd(bpf.bpf_program__fd(p), &info, &n) == 0:
                out[bpf.bpf_program__name(p).decode()] = {
                    "id": info.id, "run_cnt": info.run_cnt, "run_time_ns": info.run_time_ns}
        return out

    def close(self):
        self.attached = []
        self._release()

    cdef void _release(self) noexcept:
        while self.nlinks:
            self.nlinks -= 1
            with nogil:
                bpf.bpf_link__destroy(self.links[self.nlinks])
        if self.rb != NULL:
            bpf.ring_buffer__free(self.rb)
            self.rb = NULL
        if self.obj != NULL:
            bpf.bpf_object__close(self.obj)
            self.obj = NULL

    def __dealloc__(self):
        self._release()

"""Monitor: the embedding API. Owns the probe, the store and the poll thread."""
from __future__ import annotations

import atexit
import errno
import logging
import os
import socket
import threading
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from . import _core, host, listeners, privilege
from .dns import DEFAULT_CAPACITY as DEFAULT_NAMES_CAPACITY
from .dns import DEFAULT_FLOOR_SECONDS, NameCache, window_group
from .event import AF_UNIX, PROTOCOLS, Event, to_datetime, wall_offset_ns
from .filters import FAMILY_NAMES, Filter, FilterError, compile_filter
from .host import MonitorError
from .identity import Identity, Process, Workload

log = logging.getLogger("netmon")

DEFAULT_CAPACITY = 1 << 20
DEFAULT_RINGBUF_BYTES = 8 << 20
MAX_CAPACITY = 1 << 32  # 512 GiB of records: past any host, and past it a clear error
MAX_RINGBUF_BYTES = 1 << 30
# wake the consumer early once this share of the ring waits (512 KiB of the default
# 8 MiB: ~3,800 records); below it the 10 ms timer drains. Each wake-up costs tens of us
# here: at 64 KiB a 300k connects/s loop woke netmon ~700 times a second and that was
# about half its CPU; the ring keeps 15/16 free for a consumer that is late.
WAKEUP_SHARE = 16
POLL_MS = 10  # otherwise drain every 10 ms: no record waits much longer than that
STALL_SECONDS = 2.0  # a poll loop silent this long is unhealthy
# a follower (follow(), the SSE stream, netmon trace) waits this long for a TCP
# handshake's outcome before passing its event on as pending
HOLD_SECONDS = 1.0
BACKENDS = ("syscall", "cgroup", "auto")
SWEEP_S = 0.01  # how often new records' processes and cgroups are named (see identity.py)
# top-N groups beyond the store's own: by a workload name (over the store's top by cgroup
# id: exact, a cgroup has one name) or by executable (over its top by pid)
NAME_TOP_BY = {"unit": lambda w: w.unit,
               "container": lambda w: (w.container_runtime, w.container_id),
               "pod": lambda w: w.pod_uid,
               "namespace": lambda w: w.pod_namespace}
TOP_BY = _core.TOP_BY + tuple(NAME_TOP_BY) + ("exe",)
DNS_POLL_SECONDS = 0.05  # the DNS ring is drained this often (and before every query)
NAMES_OFF = ("destination names are off: start netmon with --dns-names "
             "(Monitor(dns_names=True))")


def _check_ringbuf(n: int) -> int:
    page = os.sysconf("SC_PAGE_SIZE")
    if not isinstance(n, int) or n < page or n & (n - 1) or n > MAX_RINGBUF_BYTES:
        raise ValueError(f"ringbuf_bytes must be a power of two between {page} and 1 GiB, "
                         f"got {n!r}")
    return n


def _compiled(where: Optional[Filter], filters: dict) -> Filter:
    """The compiled `where`, or the filter keywords compiled."""
    if where is None:
        return compile_filter(**filters)
    if filters:
        raise TypeError("give the filters either compiled (where=) or as keywords, not both")
    return where


def _workload_match(key: str, v: str) -> Callable[[Workload], bool]:
    if key == "unit":
        return lambda w: w.unit == v
    if key == "container":  # an id prefix or a name
        return lambda w: w.container_id is not None and (
            w.container_id.startswith(v.lower()) or w.container_name == v)
    if key == "pod":
        return lambda w: w.pod_uid is not None and v in (w.pod_uid, w.pod_name)
    if key == "namespace":
        return lambda w: w.pod_namespace == v
    return lambda w: w.cgroup is not None and (  # cgroup: a path prefix, whole components
        v == "/" or w.cgroup == v or w.cgroup.startswith(v + "/"))


def _process_match(names: dict) -> Callable[[Process], bool]:
    ppid, exe = names.get("ppid"), names.get("exe")

    def match(p: Process) -> bool:
        if ppid is not None and p.ppid != ppid:
            return False
        if exe is not None and (p.exe is None or (
                p.exe != exe if "/" in exe else os.path.basename(p.exe) != exe)):
            return False
        return True
    return match


def _bound(ns: Optional[int], shift_ns: int) -> int:
    """A time bound on the kernel's clock -> on a store's clock (shifted by shift_ns), as
    the store takes it: 0 for none; one before boot clamps to the clock's start (a window
    reaching before boot is valid: it holds everything since boot), one past the clock's
    u64 to its end."""
    return 0 if ns is None else min(max(ns + shift_ns, 1), 2**64 - 1)


class Monitor:
    """Watch every connect() on the host.

    with Monitor() as m:            # loads and attaches the programs, starts polling
        ...
        m.events(command="curl", since=timedelta(seconds=60))

    Thread-safe: queries run in C under the store's lock, without the GIL. The kernel
    detaches the programs when their links' fds close, so even a killed process leaves
    nothing attached; stop() (or leaving the with-block) detaches at once.
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY,
                 ringbuf_bytes: int = DEFAULT_RINGBUF_BYTES, *, backend: str = "auto",
                 udp_sends: bool = False, wakeup_bytes: Optional[int] = None,
                 drop_privileges: bool = False, user: Optional[str] = None,
                 cgroup: Optional[str] = None, debug: bool = False,
                 dns_names: bool = False, names_capacity: int = DEFAULT_NAMES_CAPACITY,
                 names_floor_seconds: int = DEFAULT_FLOOR_SECONDS,
                 runtime_roots: Optional[Dict[str, List[str]]] = None):
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
        if capacity > MAX_CAPACITY:
            raise ValueError(f"capacity must be at most {MAX_CAPACITY}, got {capacity}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.capacity = capacity
        self.backend = backend  # "auto" is resolved by start()
        self.udp_sends = udp_sends
        self.cgroup = cgroup  # a cgroup v2 directory: watch only it and below; None: host
        # after attaching, give up every capability (and become `user`): see privilege.py
        self.drop_privileges = drop_privileges or user is not None
        self.user = user
        self.missing_hooks: List[str] = []  # hooks this kernel lacks
        self.ringbuf_bytes = _check_ringbuf(ringbuf_bytes)
        self.wakeup_bytes = wakeup_bytes or self.ringbuf_bytes // WAKEUP_SHARE
        self.debug = debug
        self._store = _core.Store(capacity)
        self._probe = None
        self._thread: Optional[threading.Thread] = None
        self._poll_error = 0
        self._lock = threading.Lock()
        # the store's clock: the kernel's boot clock + this (tests' synthetic monitors run
        # ahead of it, see netmon.testing, so records of any age fit after a short uptime)
        self._clock_shift_ns = 0
        # followers' holds: events waited for, and those passed on still pending
        self._holds = {"held": 0, "expired": 0}
        self._holds_lock = threading.Lock()
        self.started_at: Optional[float] = None  # time.monotonic() at start
        self._listen_drops_base: Optional[int] = None
        # destination names from DNS answers (netmon.dns): the cache, its reader thread
        self.names = NameCache(names_capacity, names_floor_seconds) if dns_names else None
        self._dns_lock = threading.Lock()  # one reader of the DNS ring at a time
        self._dns_stop = threading.Event()
        self._dns_thread: Optional[threading.Thread] = None
        # who connected: cgroup ids and pids named (see identity.py); runtime_roots:
        # {runtime: [state directory, ...]} overriding identity.DEFAULT_RUNTIME_ROOTS
        self.identity = Identity(host.cgroup2_root(), runtime_roots)
        self._sweep_lock = threading.Lock()
        self._sweeper: Optional[threading.Thread] = None
        self._sweeping = threading.Event()
        self._swept_runs = -1  # the store's runs counter when the last sweep began

    # ---- lifecycle ----

    def start(self) -> "Monitor":
        with self._lock:
            if self._probe is not None:
                return self
            cgroot, unix_hook = self._choose_backend()
            probe = self._load(unix_hook)
            self._attach(probe, cgroot)
            self._seed_listeners(probe)
            if self.drop_privileges:  # before the poll thread: capabilities are per thread
                self._drop_privileges(probe)
            self._start_polling(probe)
            return self

    def _choose_backend(self) -> Tuple[Optional[str], bool]:
        """Resolve "auto" and check the host offers what the backend needs: (the cgroup
        the hooks attach to, whether the kernel has the unix connect hook)."""
        kfunc, unix_hook = host.kernel_btf_has(b"bpf_cast_to_kern_ctx",
                                               b"BPF_CGROUP_UNIX_CONNECT")
        cgroot = host.cgroup_to_watch(self.cgroup)
        if self.backend == "auto":  # cgroup programs need CAP_NET_ADMIN too
            self.backend = "cgroup" if kfunc and cgroot and host.has_caps(host.CAP_NET_ADMIN) \
                else "syscall"
        host.preflight(tracepoints=self.backend == "syscall")
        if (self.backend == "cgroup" or self.udp_sends or self.names is not None) \
                and not (kfunc and cgroot):
            raise MonitorError(
                "the cgroup hooks need cgroup v2 mounted and Linux 6.2+ "
                f"(bpf_cast_to_kern_ctx){'' if cgroot else ': no cgroup2 mount found'}; "
                "use --backend syscall")
        self.missing_hooks = [] if unix_hook or self.backend != "cgroup" else [
            "cgroup/connect_unix (Linux 6.7+): unix connects are not seen"]
        return cgroot, unix_hook

    def _load(self, unix_hook: bool):
        try:
            return _core.Probe(self._store, self.ringbuf_bytes, self.wakeup_bytes, self.debug,
                               self.backend, self.udp_sends, unix_hook, self.cgroup is not None,
                               self.names is not None)
        except OSError as e:
            raise host.load_error(e) from None

    @staticmethod
    def _attach(probe, cgroot: Optional[str]) -> None:
        cgfd = os.open(cgroot, os.O_RDONLY | os.O_DIRECTORY) if cgroot else -1
        try:
            probe.attach(cgfd)
        except OSError as e:
            probe.close()
            raise host.attach_error(e, cgroot) from None
        finally:
            if cgfd >= 0:
                os.close(cgfd)  # the links hold the cgroup

    def _seed_listeners(self, probe) -> None:
        """Owners of the listeners that were there before we attached (the kernel side
        learns the others at listen()); not when scoped: their accepts are not in scope.
        Baseline the kernel's listen-drop counter, so stats count from now."""
        self._listen_drops_base = _listen_drops()
        if self.cgroup is not None:
            return
        n = 0
        for lst in listeners.existing_listeners(host.cgroup2_root()):
            n += probe.seed_listener(lst.net_ns, lst.port, lst.pid, lst.uid, lst.cgroup_id,
                                     lst.comm)
        log.debug("%d existing listeners' owners recorded", n)

    def _drop_privileges(self, probe) -> None:
        """Every capability goes (and the process becomes `user`): see privilege.py."""
        try:
            privilege.drop_privileges(self.user)
        except OSError as e:
            probe.close()
            raise MonitorError(f"cannot drop privileges: {e.strerror}") from None

    def _start_polling(self, probe) -> None:
        self._probe = probe
        self._poll_error = 0
        self._thread = threading.Thread(target=self._poll, name="netmon-poll", daemon=True)
        self._thread.start()
        if self.names is not None:
            self._dns_stop.clear()
            self._dns_thread = threading.Thread(target=self._read_dns, name="netmon-dns",
                                                daemon=True)
            self._dns_thread.start()
        self._sweeping.set()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="netmon-identity",
                                         daemon=True)
        self._sweeper.start()
        self.started_at = time.monotonic()
        atexit.register(self.stop)
        log.debug("attached %s", ", ".join(probe.programs))

    def _poll(self) -> None:
        err = self._probe.run(POLL_MS)
        if err:
            self._poll_error = err
            log.error("poll loop stopped: %s", os.strerror(-err))

    def _read_dns(self) -> None:
        while not self._dns_stop.wait(DNS_POLL_SECONDS):
            try:
                self.sync_names()
            except OSError as e:
                log.error("DNS reader stopped: %s", e.strerror)
                return

    def sync_names(self, probe=None) -> None:
        """Learn from the DNS answers the kernel has passed so far (the reader thread does
        this every DNS_POLL_SECONDS; queries do it first, so a connect made right after
        its lookup is named)."""
        probe = probe or self._probe
        if self.names is None or probe is None:
            return
        with self._dns_lock:
            for record in probe.dns_read():
                self.names.feed(record)

    def stop(self) -> None:
        """Detach everything and stop polling; the store stays queryable."""
        with self._lock:
            probe, self._probe = self._probe, None
            if probe is None:
                return
            probe.detach()  # first, so the last records are in the ring when we drain
            probe.stop()
            self._thread.join()
            if self._dns_thread is not None:
                self._dns_stop.set()
                self._dns_thread.join()
                self._dns_thread = None
                self.sync_names(probe)
            self._sweeping.clear()
            self._sweeper.join()
            self.identity.close()
            probe.close()
            atexit.unregister(self.stop)

    def __enter__(self) -> "Monitor":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._probe is not None

    @property
    def programs(self) -> List[str]:
        probe = self._probe
        return probe.programs if probe is not None else []

    def program_stats(self) -> dict:
        """{program: {"id", "run_cnt", "run_time_ns"}}; the kernel counts runs only while
        sysctl kernel.bpf_stats_enabled=1."""
        probe = self._probe
        return probe.prog_stats() if probe is not None else {}

    @property
    def polling(self) -> bool:
        """The poll thread is alive and has not failed."""
        return self._thread is not None and self._thread.is_alive() and not self._poll_error

    def _inject_poll_failure(self) -> None:
        """Tests only: make the poll loop end as if the ring buffer had failed."""
        self._poll_error = -errno.EIO
        self._probe.stop()

    def _pause(self, paused: bool) -> None:
        """Tests only: stop draining the ring buffer (records pile up, then drop, counted)."""
        self._probe.pause(paused)

    def inject(self, record: bytes) -> None:
        """Push one raw netmon_event through the store path the kernel callback uses."""
        self._store.push_raw(record)

    # ---- who connected (see identity.py) ----

    def _sweep_loop(self) -> None:
        while self._sweeping.is_set():
            try:
                self.sweep()
            except Exception:  # never let naming stop: events just go unnamed
                log.exception("naming new records failed")
            time.sleep(SWEEP_S)

    def sweep(self) -> None:
        """Name the processes and cgroups of the records that arrived since the last sweep:
        per pid and per cgroup id, not per record. Runs every SWEEP_S and before queries."""
        with self._sweep_lock:
            last = self.identity.swept_seq
            c = self._store.counters()
            if c["last_seq"] <= last:
                return
            oldest = c["last_seq"] - c["size"] + 1
            unswept = max(0, oldest - 1 - last)
            runs, self._swept_runs = self._swept_runs, c["runs"]
            if runs == c["runs"] and self.identity.still(*c["tail"], c["last_seq"], unswept):
                return  # all newer records: the last one's process, alive all along
            # one scan: each pid's newest record says its pid, time and cgroup (a process
            # moved between cgroups within one sweep is named lazily for the older one)
            rows, _, _ = self._store.latest_per_pid(1, after_seq=last)
            self.identity.sweep(last + 1, c["last_seq"], [(r[3], r[1]) for r in rows],
                                {r[2] for r in rows}, unswept)

    def names_to_ids(self, names: dict) -> dict:
        """Workload and process filters -> the store's cgroups / procs filters: the ids of
        every known cgroup and the ranges of every known process they name (none: an empty
        set, which matches nothing)."""
        q: dict = {}
        cgroup_sets = [set(self.identity.cgroup_ids(_workload_match(k, names[k])))
                       for k in ("unit", "container", "pod", "namespace", "cgroup")
                       if k in names]
        if cgroup_sets:
            q["cgroups"] = set.intersection(*cgroup_sets)
        if "ppid" in names or "exe" in names:
            q["procs"] = self.identity.process_ranges(_process_match(names))
        for k, v in q.items():
            if len(v) > _core.FILTER_IDS_MAX:
                raise FilterError(k, f"names more than {_core.FILTER_IDS_MAX} "
                                  f"{'cgroups' if k == 'cgroups' else 'processes'}; narrow it")
        return q

    # ---- queries ----

    def _sync(self) -> None:
        """Read your writes: every query first moves what the kernel has already submitted
        into the store (a memory read when nothing is pending), so a caller that connected
        and then asks sees its connect; and learns from the DNS answers passed so far, so
        a connect made right after its lookup is named."""
        probe = self._probe
        if probe is not None:
            probe.sync()
        self.sync_names()

    def _args(self, where: Optional[Filter], filters: dict) -> dict:
        """What the store matches on: the filters compiled, workload and process names
        turned into ids (after a sweep), time bounds on its clock. Callers _sync first."""
        f = _compiled(where, filters)
        q = f.store
        if f.names:
            self.sweep()
            q = {**q, **self.names_to_ids(f.names)}
        return {**q, "since_ns": _bound(q["since_ns"], self._clock_shift_ns),
                "until_ns": _bound(q["until_ns"], self._clock_shift_ns)}

    def clock_ns(self) -> int:
        """Now on the clock of this monitor's records (ts_ns)."""
        return _core.boot_ns() + self._clock_shift_ns

    def wall_offset_ns(self) -> int:
        """Add to a record's ts_ns for ns since the epoch (UTC)."""
        return wall_offset_ns() - self._clock_shift_ns

    def _events(self, rows) -> List[Event]:
        off = self.wall_offset_ns()
        ident = self.identity
        if rows and max(r[0] for r in rows) > ident.swept_seq:  # came after the last sweep
            self.sweep()
        return [self._named(Event.from_row(r, off, who))
                for r, who in zip(rows, ident.fields_of(rows))]

    def _named(self, ev: Event) -> Event:
        """ev with the destination name its DNS answers gave, if any."""
        if self.names is None or ev.ip is None or ev.net_ns is None:
            return ev
        fam = socket.AF_INET6 if ":" in ev.ip else socket.AF_INET
        hit = self.names.lookup(ev.net_ns, fam, socket.inet_pton(fam, ev.ip), ev.ts_ns)
        if hit is None:
            return ev
        return ev._replace(destination_name=hit.name,
                           destination_cname_chain=hit.chain or None)

    def _store_args(self, where: Optional[Filter], filters: dict, by: Optional[str] = None):
        """_args, and {group: name} for top by name: a name pattern becomes the table of
        (net_ns, IP, time window) it answered in, as the name cache holds it now (call
        _sync first)."""
        q = self._args(where, filters)
        pattern = q.get("name")
        if pattern is None and by != "name":
            return q, {}
        if self.names is None:
            raise FilterError("name" if pattern is not None else "by", NAMES_OFF, whole=True)
        table, groups = self.names.table(pattern)
        q = {k: v for k, v in q.items() if k != "name"}
        q["names"] = (table, pattern is not None)
        return q, groups

    # Filters, for every query (see netmon.filters.compile_filter): pid, command (exact
    # comm), kind ("connect" by default, "udp_send", "accept", "all" or None for every
    # kind), family ("inet", "inet6", "unix" or a number), protocol ("tcp", "udp", ...),
    # port, dest (IP, CIDR or unix path prefix), result ("ok", "error", "pending",
    # "unknown" or an errno name: what happened to the attempt, see netmon.filters),
    # src (source IP or CIDR), sport (source port), since / until
    # (aware datetime, or timedelta meaning that long ago), after_seq. Bad values:
    # ValueError. Or, instead of keywords, where=compile_filter(...): checked once, reused.

    def events(self, limit: Optional[int] = None, where: Optional[Filter] = None,
               **filters) -> List[Event]:
        """The newest `limit` (all if None) matching events, oldest first."""
        return self.query(limit=limit, where=where, **filters)[0]

    def query(self, limit: Optional[int] = None, newest: bool = True,
              where: Optional[Filter] = None, **filters) -> Tuple[List[Event], int]:
        """(events, matched): like events(), plus how many matched in all.
        newest=False takes the oldest `limit` after `after_seq` instead (paging)."""
        self._sync()
        q, _ = self._store_args(where, filters)
        rows, matched = self._store.query(limit or 0, newest, **q)
        return self._events(rows), matched

    def seq_range(self) -> Tuple[int, int]:
        """(oldest held seq, newest seq): a cursor below oldest - 1 fell out of the store."""
        self._sync()
        c = self._store.counters()
        return c["last_seq"] - c["size"] + 1, c["last_seq"]

    def attempts(self) -> Dict[Tuple[str, str, str], int]:
        """Connect attempts ever captured, by (family, protocol, result); monotonic, unlike
        the store, which forgets. result is what happened to the attempt, the same on both
        backends: ok (connected), the errno name of the failure (whether connect() or the
        handshake gave it), unknown (the backend cannot tell) or other. An attempt is
        counted once that is known: a TCP handshake in flight when its outcome arrives
        (stats()["handshakes_in_flight"] until then), or as pending if its outcome can no
        longer be joined to it. A bounded label set: family inet/inet6/unix/other,
        protocol tcp/udp/.../unix/none/other."""
        self._sync()
        counts, other = self._store.attempts()
        families = {v: k for k, v in FAMILY_NAMES.items()}
        keys = {0: "ok", _core.RET_UNKNOWN: "unknown", _core.RET_PENDING: "pending"}
        out = {("other", "other", "other"): other} if other else {}
        for (fam, proto, ret), n in counts.items():
            key = (families.get(fam, "other"),
                   "unix" if fam == AF_UNIX else
                   PROTOCOLS.get(proto, "other").lower() if proto else "none",
                   keys.get(ret) or (errno.errorcode.get(-ret, "other") if ret < 0 else "other"))
            out[key] = out.get(key, 0) + n
        return out

    def handshakes(self) -> dict:
        """The TCP handshake latency histogram the store keeps in C (monotonic, every
        handshake the kernel timed, evicted events included): "bounds_us" (16 finite
        upper bounds), "established" / "failed" (17 counts per bucket, not cumulative, the
        last +Inf) and "established_us" / "failed_us" (sums of latencies)."""
        return self._store.handshakes()

    def count(self, where: Optional[Filter] = None, **filters) -> int:
        self._sync()
        return self._store.count(**self._store_args(where, filters)[0])

    def latest_per_pid(self, limit: int = 100, where: Optional[Filter] = None,
                       max_total: Optional[int] = None, **filters) -> Tuple[dict, bool]:
        """({pid: [its newest `limit` events, oldest first]}, truncated): no more than
        `max_total` events in all (the newest) when given. truncated: some matching event
        was left out."""
        self._sync()
        rows, _, truncated = self._store.latest_per_pid(limit, max_total or 0,
                                                        **self._store_args(where, filters)[0])
        out: dict = {}
        for ev in self._events(rows):
            out.setdefault(ev.pid, []).append(ev)
        return out, truncated

    def top(self, by: str = "destination", limit: int = 10, where: Optional[Filter] = None,
            **filters) -> Tuple[List[Tuple[Event, int, int]], int, int]:
        """([(the group's newest event, count, failed)], groups, matched): the largest
        groups by destination, command, pid, port, error (failed attempts only), service
        (destination port + command: with kind="accept", the local service and the
        listener), client (source address: with kind="accept", the remote client),
        name (the destination name; one group of the events without one), cgroup (id),
        unit, container, pod, namespace or exe. By name, the event's destination_name is
        the group's name (None: the unnamed group). unit ... exe add up the store's groups
        by cgroup id (exact: a cgroup has one name) or, for exe, by pid (exact unless a pid
        was reused within the window: its events count under its newest process's exe)."""
        if by not in TOP_BY:
            raise FilterError("by", f"must be one of {', '.join(TOP_BY)}")
        self._sync()
        q, names = self._store_args(where, filters, by)
        if by not in _core.TOP_BY:
            return self._top_by_name(by, limit, q)
        rows, groups, matched = self._store.top(by, limit, **q)
        out = []
        for ev, (_, n, failed) in zip(self._events([r for r, _, _ in rows]), rows):
            if by == "name":  # the group's name, whatever the representative's answer
                name = names.get(window_group(q["names"][0], ev))
                if name != ev.destination_name:
                    ev = ev._replace(destination_name=name, destination_cname_chain=None)
            out.append((ev, n, failed))
        return out, groups, matched

    def _top_by_name(self, by: str, limit: int, q: dict):
        rows, _, matched = self._store.top("pid" if by == "exe" else "cgroup", 0, **q)
        if rows and max(r[0] for r, _, _ in rows) > self.identity.swept_seq:
            self.sweep()
        ident, key_of = self.identity, NAME_TOP_BY.get(by)
        groups: dict = {}  # key -> [newest row, count, failed]
        for row, n, failed in rows:
            if row[11] & _core.NETMON_F_NO_OWNER:  # an accept nobody is known to own
                key = None
            else:
                key = (ident.process(row[3], row[0]).exe if by == "exe"
                       else key_of(ident.workload(row[2])))
            g = groups.get(key)
            if g is None:
                groups[key] = [row, n, failed]
            else:
                g[1] += n
                g[2] += failed
                if row[1] > g[0][1]:
                    g[0] = row
        ranked = sorted(groups.values(), key=lambda g: (-g[1], -g[0][1]))[:limit or None]
        return self._top_events(ranked), len(groups), matched

    def _top_events(self, rows) -> List[Tuple[Event, int, int]]:
        evs = self._events([r for r, _, _ in rows])
        return [(ev, n, failed) for ev, (_, n, failed) in zip(evs, rows)]

    def follow(self, after_seq: Optional[int] = None, timeout: Optional[float] = None,
               where: Optional[Filter] = None, hold: float = HOLD_SECONDS,
               **filters) -> Iterator[Event]:
        """Matching events newer than after_seq (default: from now on), in order, as they
        arrive, each once what happened to it is known: a TCP attempt whose handshake is
        still pending is waited for up to `hold` seconds after it was recorded (0: not at
        all), then passed on as pending, and the events after it wait with it. Ends after
        `timeout` seconds (None: never). Events overwritten before they were read are
        skipped; compare seq numbers to see the gap."""
        if where is None:
            where = compile_filter(**filters)
        elif filters:
            raise TypeError("give the filters either compiled (where=) or as keywords, not both")
        cursor = self.seq_range()[1] if after_seq is None else after_seq
        follower = Follower(self, cursor, where, hold)
        deadline = None if timeout is None else time.monotonic() + timeout
        while deadline is None or time.monotonic() < deadline:
            evs = follower.next(1000)
            if not evs:
                time.sleep(POLL_MS / 1000)
            yield from evs

    def follow_page(self, after_seq: int, limit: int = 1000, hold: float = HOLD_SECONDS,
                    where: Optional[Filter] = None,
                    **filters) -> Tuple[List[Event], int, int, int]:
        """One step of following: (events, upto, holder, oldest). events: the oldest
        `limit` matches after after_seq, stopping before a TCP attempt whose handshake is
        pending and was recorded less than `hold` seconds ago (holder: its seq, else 0);
        upto: the seq every match up to which has been returned (the next after_seq);
        oldest: the oldest seq the store holds (after_seq + 1 below it: a gap)."""
        hold_ns = int(hold * 1e9)
        self._sync()
        # after the sync: a name's table grows as answers come
        q = {**self._store_args(where, filters)[0], "after_seq": after_seq}
        hold_from = max(self.clock_ns() - hold_ns, 1) if hold_ns else 0
        rows, upto, holder, oldest = self._store.follow(limit, hold_from, **q)
        return self._events(rows), upto, holder, oldest

    def _count_holds(self, held: int, expired: int) -> None:
        with self._holds_lock:
            self._holds["held"] += held
            self._holds["expired"] += expired

    def stats(self) -> dict:
        """captured = delivered + dropped: every connect the kernel saw is in one of them."""
        self._sync()
        c = self._store.counters()
        probe = self._probe
        kernel = probe.drops() if probe is not None else dict.fromkeys(_core.DROP_REASONS, 0)
        outcome_drops = kernel.pop("outcome_ringbuf_full")
        dns_drops = kernel.pop("dns_ringbuf_full")  # not connects: under "dns"
        oldest = c["oldest_ts_ns"]
        return {
            "captured": c["delivered"] + sum(kernel.values()),
            "delivered": c["delivered"],
            "dropped": kernel,
            "dropped_total": sum(kernel.values()),
            "evicted": c["evicted"],
            "malformed": c["malformed"],
            "outcomes_lost": {"ringbuf_full": outcome_drops,
                              "unmatched": c["outcomes_unmatched"]},
            "handshakes_in_flight": c["in_flight"],
            "follow_holds": dict(self._holds),
            "inbound": self.inbound(),
            "listeners_untracked": probe.inbound()["listeners_full"] if probe is not None else 0,
            "size": c["size"],
            "capacity": self.capacity,
            "last_seq": c["last_seq"],
            "oldest_timestamp": (to_datetime(oldest + self.wall_offset_ns())
                                 if oldest is not None else None),
            "poll_lag_seconds": self.poll_lag(),
            "attached": probe is not None,
            "backend": self.backend,
            "udp_sends": self.udp_sends,
            "dns": self.dns_stats(dns_drops),
            "programs": self.programs,
            "missing_hooks": self.missing_hooks,
            "capabilities": privilege.held_capabilities(),
            "uptime_seconds": (time.monotonic() - self.started_at) if self.started_at else 0.0,
            "identity": self.identity.stats(),
        }

    def inbound(self) -> Dict[str, int]:
        """Inbound TCP handshakes: accepted (accept events ever captured, monotonic) and,
        counted not stored, those that never completed: closed_port (SYNs answered with
        RST, no socket wanted them; any namespace), listen_drops (SYNs or handshake ACKs a
        listener dropped: accept or SYN queue full; the kernel's counter for netmon's own
        network namespace, since start)."""
        probe = self._probe
        kernel = probe.inbound() if probe is not None else {"closed_port": 0}
        now, base = _listen_drops(), self._listen_drops_base
        return {"accepted": self._store.counters()["accepts"],
                "closed_port": kernel["closed_port"],
                "listen_drops": max(0, now - base) if now is not None and base is not None
                else 0}

    def dns_stats(self, dropped: int = 0) -> dict:
        """What the destination-name machinery saw: DNS packets passed by the kernel,
        responses parsed, addresses learned (answers), (net_ns, IP) keys cached, LRU
        evictions, parse failures, payloads too long to copy (truncated), records the
        kernel could not pass (dropped: its ring was full)."""
        if self.names is None:
            return {"enabled": False}
        return {"enabled": True, **self.names.stats(), "dropped": dropped}

    def poll_lag(self) -> Optional[float]:
        """Seconds since the poll loop last drained the ring; None when not running."""
        probe = self._probe
        if probe is None:
            return None
        return max(0, _core.boot_ns() - probe.last_poll_ns) / 1e9

    def health(self) -> Tuple[bool, Optional[str]]:
        if self._probe is None:
            return False, "the BPF programs are not attached"
        if not self.polling:
            return False, f"the poll thread stopped ({os.strerror(-self._poll_error or 0)})"
        lag = self.poll_lag()
        if lag > STALL_SECONDS:
            return False, f"the poll thread has not drained the ring for {lag:.1f} s"
        return True, None


class Follower:
    """One reader following the store in order (Monitor.follow, the event stream, netmon
    trace): next() gives the matching events after its cursor, each with its final
    fields, stopping before a TCP attempt whose handshake is still pending unless it was
    recorded `hold` seconds ago or more. The matching and the stop run in C; the waits
    are counted in Monitor.stats()["follow_holds"]: held (events waited for) and expired
    (passed on still pending)."""

    def __init__(self, monitor: Monitor, cursor: int, where: Filter,
                 hold: float = HOLD_SECONDS):
        if isinstance(hold, bool) or not isinstance(hold, (int, float)) or not 0 <= hold <= 60:
            raise ValueError(f"hold must be between 0 and 60 seconds, got {hold!r}")
        self._monitor, self._where, self._hold = monitor, where, hold
        self.cursor = cursor  # every match up to this seq has been given out
        self.missed = 0  # events overwritten before this reader reached them
        self.gap: Optional[Tuple[int, int]] = None  # (first, last seq) the last next() missed
        self._holder = 0  # the seq this reader waits on, 0 if none

    def next(self, limit: int = 1000) -> List[Event]:
        """The next matching events (at most `limit`), oldest first; [] if none is ready.
        Moves the cursor past everything examined; a gap shows in `missed`/gap()."""
        m = self._monitor
        evs, upto, holder, oldest = m.follow_page(self.cursor, limit, self._hold, self._where)
        self.gap = (self.cursor + 1, oldest - 1) if self.cursor + 1 < oldest else None
        if self.gap:
            self.missed += oldest - 1 - self.cursor
        expired = sum(e.result == "pending" for e in evs) if self._hold else 0
        new_hold = holder != 0 and holder != self._holder
        self._holder = holder
        if new_hold or expired:
            m._count_holds(int(new_hold), expired)
        self.cursor = max(self.cursor, upto)
        return evs


def _listen_drops() -> Optional[int]:
    """TcpExt ListenDrops of this network namespace (/proc/net/netstat); None if unreadable."""
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            row = dict(zip(names.split()[1:], values.split()[1:]))
            return int(row["ListenDrops"]) if "ListenDrops" in row else None
    return None

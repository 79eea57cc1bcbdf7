"""Names for the numbers in a record, resolved off the capture path.

A record carries a cgroup id and a pid. Identity turns them into what a person asks
about: the cgroup path, the systemd unit, the container and its runtime, the Kubernetes
pod (uid, QoS class, name, namespace), and the process's parent pid and executable.

- Cgroups: a cgroup v2 id is its cgroupfs inode number, and ids are never reused while
  the host runs. So an id is resolved once (open_by_handle_at when we hold
  CAP_DAC_READ_SEARCH, else one walk of the cgroup2 tree for every id a sweep found new)
  and kept, also after the cgroup is removed: old events keep their names. The path says
  the unit, the container id and runtime, the pod uid and QoS class (parse_cgroup_path);
  the runtime's own state files say the container's name, pod and namespace (no API
  server). Bounded: past MAX_CGROUPS the oldest entry goes, counted.
- Processes: read from /proc by sweep(), which the Monitor runs every few milliseconds
  and before every query over the records that arrived since the last sweep: per new pid,
  not per event, and never in the ring-buffer callback. An entry is keyed by (pid, the
  process's start time) and covers the sequence numbers from the sweep that saw it until
  the next process seen with that pid, so a reused pid never inherits another process's
  ppid or exe. The race: a process that exits (or was replaced by a newer process with the
  same pid) before the sweep that follows its connect (~10 ms plus the ring buffer's
  batching) gets ppid and exe null; exe is the executable when the sweep saw the process
  (after an exec, the new one). Bounded: past MAX_PROCESSES the least recently seen pid
  goes, counted. The process a sweep read is then watched through a pidfd (up to
  MAX_WATCHED): while it has not exited, its pid cannot name anyone else, so a later
  sweep that finds only that pid again needs no /proc read (which cost ~40 us a pid and
  sweep on a busy host, a quarter of netmon's CPU under a connect loop).

Never the command line: it carries secrets.
"""
from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import json
import os
import re
import select
import threading
import time
import weakref
from collections import OrderedDict
from typing import Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from .host import effective_caps

CAP_DAC_READ_SEARCH = 2
MAX_CGROUPS = 65536
MAX_PROCESSES = 65536
MAX_WATCHED = 256  # live processes watched through a pidfd between sweeps
MISS_RETRY_S = 1.0  # an id no walk found is looked for again after this long
SEQ_END = 2**64 - 1
_TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")

# where each runtime keeps its per-container state (a DaemonSet mounts the host's);
# overridable by Monitor(runtime_roots=...), --runtime-roots, NETMON_RUNTIME_ROOTS
DEFAULT_RUNTIME_ROOTS: Dict[str, Tuple[str, ...]] = {
    # <root>/<containerd namespace, e.g. k8s.io or moby>/<id>/config.json (OCI bundle)
    "containerd": ("/run/containerd/io.containerd.runtime.v2.task",),
    # <root>/<id>/config.v2.json
    "docker": ("/var/lib/docker/containers",),
    # <root>/<id>/userdata/config.json (OCI config with the kubelet's annotations)
    "cri-o": ("/run/containers/storage/overlay-containers",
              "/var/lib/containers/storage/overlay-containers"),
    # <root>/<id>/userdata/config.json; rootful podman
    "podman": ("/var/lib/containers/storage/overlay-containers",
               "/run/containers/storage/overlay-containers"),
}
RUNTIMES = tuple(DEFAULT_RUNTIME_ROOTS)


class Workload(NamedTuple):
    """What a cgroup id names. None where it does not apply or is not known."""
    cgroup: Optional[str]  # path relative to the cgroup2 root, "/system.slice/x.service"
    unit: Optional[str]
    container_runtime: Optional[str]  # docker, containerd, cri-o, podman
    container_id: Optional[str]
    pod_uid: Optional[str]
    pod_qos: Optional[str]  # guaranteed, burstable, besteffort
    container_name: Optional[str]
    pod_name: Optional[str]
    pod_namespace: Optional[str]


class Process(NamedTuple):
    ppid: Optional[int]
    exe: Optional[str]


UNKNOWN = Workload(*[None] * len(Workload._fields))
NO_PROCESS = Process(None, None)

# ---- the path: units, containers and pods by the runtimes' naming conventions ----

_UNIT = re.compile(r".+\.(?:service|scope)")
_HEX64 = r"([0-9a-f]{64})"
_SCOPES = (  # systemd cgroup driver: <prefix><id>.scope (conmon scopes are not containers)
    (re.compile(r"docker-" + _HEX64 + r"\.scope"), "docker"),
    (re.compile(r"cri-containerd-" + _HEX64 + r"\.scope"), "containerd"),
    (re.compile(r"crio-" + _HEX64 + r"\.scope"), "cri-o"),
    (re.compile(r"libpod-" + _HEX64 + r"\.scope"), "podman"),
)
_K8S_POD_SLICE = re.compile(r"kubepods(?:-(burstable|besteffort))?-pod([0-9a-f_-]+)\.slice")
_K8S_POD_DIR = re.compile(r"pod([0-9a-f-]{36})")
_ID = re.compile(_HEX64)


def parse_cgroup_path(path: str) -> Workload:
    """The unit, container and pod a cgroup path names (no names: those come from the
    runtimes' state). The deepest match wins, so a nested container is the inner one."""
    parts = [p for p in path.split("/") if p]
    unit = runtime = cid = pod_uid = qos = None
    for i, part in enumerate(parts):
        if _UNIT.fullmatch(part):
            unit = part
        for rx, name in _SCOPES:
            m = rx.fullmatch(part)
            if m:
                runtime, cid = name, m.group(1)
        m = _K8S_POD_SLICE.fullmatch(part)
        if m:  # systemd driver; the uid's dashes are underscores in unit names
            qos, pod_uid = m.group(1) or "guaranteed", m.group(2).replace("_", "-")
            continue
        parent = parts[i - 1] if i else ""
        m = _K8S_POD_DIR.fullmatch(part)
        if m and parent in ("kubepods", "burstable", "besteffort"):  # cgroupfs driver
            pod_uid = m.group(1)
            qos = parent if parent != "kubepods" else "guaranteed"
        elif _ID.fullmatch(part) and (parent == "docker" or _K8S_POD_DIR.fullmatch(parent)):
            runtime, cid = ("docker" if parent == "docker" else None), part
    return Workload("/" + "/".join(parts), unit, runtime, cid, pod_uid, qos, None, None, None)


# ---- the runtimes' state: names, pod and namespace ----

def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(4 << 20))
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _oci_names(config: dict) -> Tuple[Optional[str], Optional[str], Optional[str]]:
    """(container, pod, namespace) from an OCI config's annotations: containerd's CRI
    plugin, CRI-O, podman and nerdctl each name them their own way."""
    a = config.get("annotations") or {}
    if not isinstance(a, dict):
        return None, None, None

    def first(*keys):
        return next((a[k] for k in keys if isinstance(a.get(k), str) and a[k]), None)
    return (first("io.kubernetes.cri.container-name", "io.kubernetes.container.name",
                  "io.kubernetes.cri-o.ContainerName", "nerdctl/name"),
            first("io.kubernetes.cri.sandbox-name", "io.kubernetes.pod.name"),
            first("io.kubernetes.cri.sandbox-namespace", "io.kubernetes.pod.namespace"))


def _docker_names(config: dict) -> Tuple[Optional[str], Optional[str], Optional[str]]:
    labels = (config.get("Config") or {}).get("Labels") or {}
    name = config.get("Name")
    name = name.lstrip("/") if isinstance(name, str) and name else None
    return (labels.get("io.kubernetes.container.name") or name,
            labels.get("io.kubernetes.pod.name"), labels.get("io.kubernetes.pod.namespace"))


def _state_files(runtime: str, roots: Sequence[str], cid: str) -> Iterable[str]:
    for root in roots:
        if runtime == "containerd":  # one directory per containerd namespace
            try:
                namespaces = sorted(os.listdir(root))
            except OSError:
                continue
            yield from (os.path.join(root, ns, cid, "config.json") for ns in namespaces)
        elif runtime == "docker":
            yield os.path.join(root, cid, "config.v2.json")
        else:
            yield os.path.join(root, cid, "userdata", "config.json")


def runtime_names(roots: Mapping[str, Sequence[str]], runtime: Optional[str],
                  cid: str) -> Tuple[Optional[str], Optional[str], Optional[str], Optional[str]]:
    """(runtime, container name, pod name, namespace) from the first state file found for
    `cid`: the path's runtime's first, then (a cgroupfs-driver path names none) any."""
    order = [runtime] if runtime else []
    order += [r for r in roots if r != runtime]
    for rt in order:
        for path in _state_files(rt, roots.get(rt, ()), cid):
            config = _read_json(path)
            if config is not None:
                names = _docker_names(config) if rt == "docker" else _oci_names(config)
                return (rt, *names)
    return runtime, None, None, None


# ---- cgroup id -> path ----

class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("id", ctypes.c_uint64)]


_FILEID_KERNFS = 0xFE
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _path_by_handle(root_fd: int, root: str, cgid: int) -> Optional[str]:
    """The cgroup's path through open_by_handle_at (the handle of a cgroup is its id);
    None if it is gone; OSError (EPERM) without CAP_DAC_READ_SEARCH."""
    fh = _FileHandle(8, _FILEID_KERNFS, cgid)
    fd = _libc.open_by_handle_at(root_fd, ctypes.byref(fh), os.O_RDONLY | os.O_DIRECTORY)
    if fd < 0:
        err = ctypes.get_errno()
        if err in (2, 116):  # ENOENT, ESTALE: removed
            return None
        raise OSError(err, os.strerror(err))
    try:
        path = os.readlink(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    rel = os.path.relpath(path, root)
    return "/" if rel == "." else "/" + rel


def walk_cgroups(root: str, wanted: set) -> Dict[int, str]:
    """{id: path relative to root} for the ids in `wanted` found under root (a cgroup's id
    is its directory's inode number); stops once all are found."""
    found: Dict[int, str] = {}
    if os.stat(root).st_ino in wanted:
        found[os.stat(root).st_ino] = "/"
    stack = [root]
    while stack and len(found) < len(wanted):
        d = stack.pop()
        try:
            entries = list(os.scandir(d))
        except OSError:  # removed while we walked
            continue
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                if e.inode() in wanted:
                    found[e.inode()] = "/" + os.path.relpath(e.path, root)
                stack.append(e.path)
    return found


# ---- /proc ----

def read_process(pid: int, known: Optional[int] = None
                 ) -> Optional[Tuple[int, int, Optional[str]]]:
    """(start time in clock ticks since boot, ppid, exe) of a live process; None if gone.
    exe is not read (None) when the start time is `known`: the same process as before."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2:].split()  # after the command, which may hold ")"
    start, ppid = int(fields[19]), int(fields[1])
    if start == known:
        return start, ppid, None
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:  # a kernel thread, or gone
        exe = None
    return start, ppid, exe


_READ_PROC = read_process


def _close_fds(watched: dict) -> None:
    for fd, _ in watched.values():
        os.close(fd)
    watched.clear()


class _Proc(NamedTuple):
    lo_seq: int  # the first sequence number this entry covers
    start: Optional[int]  # clock ticks since boot; None: not known (exited before a sweep)
    process: Process


class Identity:
    """The caches. Thread-safe: sweeps and lookups take one lock, briefly."""

    def __init__(self, cgroup_root: Optional[str],
                 runtime_roots: Optional[Mapping[str, Sequence[str]]] = None,
                 read_process: Callable = read_process):
        self.cgroup_root = cgroup_root
        self.runtime_roots = {**DEFAULT_RUNTIME_ROOTS, **(runtime_roots or {})}
        self._read_process = read_process
        self._lock = threading.Lock()
        self._cgroups: "OrderedDict[int, Workload]" = OrderedDict()
        self._misses: Dict[int, float] = {}  # id -> monotonic time no walk found it
        self._procs: "OrderedDict[int, List[_Proc]]" = OrderedDict()
        # pid -> (pidfd, start) of a process a sweep read and that had not exited since
        self._watched: "OrderedDict[int, Tuple[int, int]]" = OrderedDict()
        self._exits = select.poll()  # the watched pidfds: readable once a process exits
        # until close(); pidfds speak of real processes: not with another read_process
        self._watching = read_process is _READ_PROC and hasattr(os, "pidfd_open")
        weakref.finalize(self, _close_fds, self._watched)  # an Identity never closed
        self._by_handle = True  # until open_by_handle_at says EPERM
        self.swept_seq = 0  # every record up to this one has been swept
        self.counters = {"cgroups_evicted": 0, "processes_evicted": 0,
                         "records_unswept": 0, "cgroups_not_found": 0}

    # -- cgroups --

    def workload(self, cgid: int) -> Workload:
        w = self._cgroups.get(cgid)
        if w is None:
            self.resolve_cgroups((cgid,))
            w = self._cgroups.get(cgid, UNKNOWN)
        return w

    def fields_of(self, rows) -> List[tuple]:
        """Event's naming fields (Workload's, then Process's) for each store row. This
        runs for every event built, so a (cgroup, process) pair's tuple is built once per
        call and shared by the rows it covers."""
        memo: Dict[Tuple[int, int], Tuple[tuple, int, int]] = {}
        out = []
        for row in rows:
            seq, cgid, pid = row[0], row[2], row[3]
            hit = memo.get((cgid, pid))
            if hit is None or not hit[1] <= seq < hit[2]:
                hit = memo[(cgid, pid)] = self._fields(cgid, pid, seq)
            out.append(hit[0])
        return out

    def _fields(self, cgid: int, pid: int, seq: int) -> Tuple[tuple, int, int]:
        """(fields, lo, hi): the fields of (cgid, pid) for records lo <= seq < hi."""
        entries = self._procs.get(pid) or ()
        swept = self.swept_seq
        proc, lo, hi = None, 0, swept + 1
        if seq > swept:
            lo, hi = swept + 1, 2**64
        else:
            for e in entries:
                if e.lo_seq > seq:
                    hi = min(hi, e.lo_seq)
                    break
                proc, lo = e, e.lo_seq
        return (tuple(self.workload(cgid)) + tuple(proc.process if proc else NO_PROCESS),
                lo, hi)

    def resolve_cgroups(self, ids: Iterable[int]) -> None:
        """Resolve the ids not known yet: by handle, else one walk for all of them."""
        now = time.monotonic()
        with self._lock:
            todo = {i for i in ids if i not in self._cgroups and
                    now - self._misses.get(i, -MISS_RETRY_S) >= MISS_RETRY_S}
        if not todo or not self.cgroup_root:
            return
        paths = self._paths(todo)
        with self._lock:
            for cgid in todo:
                path = paths.get(cgid)
                if path is None:
                    if cgid not in self._misses:
                        self.counters["cgroups_not_found"] += 1
                    self._misses[cgid] = now
                    if len(self._misses) > MAX_CGROUPS:
                        self._misses.pop(next(iter(self._misses)))
                    continue
                self._misses.pop(cgid, None)
                self._cgroups[cgid] = self._named(parse_cgroup_path(path))
                if len(self._cgroups) > MAX_CGROUPS:
                    self._cgroups.popitem(last=False)
                    self.counters["cgroups_evicted"] += 1

    def _paths(self, ids: set) -> Dict[int, str]:
        root = self.cgroup_root
        if self._by_handle and not effective_caps(f"self/task/{threading.get_native_id()}") \
                & 1 << CAP_DAC_READ_SEARCH:
            self._by_handle = False  # privileges dropped: not even try (seccomp may deny it)
        if self._by_handle:
            try:
                fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    return {i: p for i in ids
                            if (p := _path_by_handle(fd, root, i)) is not None}
                finally:
                    os.close(fd)
            except OSError:  # no CAP_DAC_READ_SEARCH (dropped privileges), or not cgroupfs
                self._by_handle = False
        return walk_cgroups(root, ids)

    def _named(self, w: Workload) -> Workload:
        if not w.container_id:
            return w
        runtime, name, pod, ns = runtime_names(self.runtime_roots, w.container_runtime,
                                               w.container_id)
        return w._replace(container_runtime=runtime, container_name=name, pod_name=pod,
                          pod_namespace=ns)

    def cgroup_ids(self, match: Callable[[Workload], bool]) -> List[int]:
        """The ids of every known cgroup (seen in a record, present or removed) matching."""
        with self._lock:
            return [i for i, w in self._cgroups.items() if match(w)]

    def workloads(self) -> Dict[int, Workload]:
        with self._lock:
            return dict(self._cgroups)

    # -- processes --

    def sweep(self, lo_seq: int, hi_seq: int, newest_per_pid: Sequence[Tuple[int, int]],
              cgroup_ids: Iterable[int], unswept: int = 0) -> None:
        """Records lo_seq..hi_seq arrived: newest_per_pid holds (pid, ts_ns) of each pid's
        newest one among them, cgroup_ids every cgroup id among them; `unswept` records
        before lo_seq were overwritten before a sweep saw them."""
        self.resolve_cgroups(cgroup_ids)
        exited = self._exited()
        seen, same = [], []
        for pid, ts in newest_per_pid:
            w = self._watched.get(pid)
            if w and pid not in exited and self._known_start(pid) == w[1]:
                same.append(pid)  # its last entry's process, alive all along
            else:  # read again: the pid may have been handed out since (ns_last_pid
                # can be rewound), and nothing else says reliably that it was not
                seen.append((pid, ts, self._read_and_watch(pid)))
        with self._lock:
            self.counters["records_unswept"] += unswept
            for pid in same:
                self._procs.move_to_end(pid)
            for pid, ts, proc in seen:
                self._note(pid, ts, proc, lo_seq)
            self.swept_seq = max(self.swept_seq, hi_seq)

    def still(self, pid: int, cgid: int, hi_seq: int, unswept: int = 0) -> bool:
        """If pid's process is the one its last entry names, watched and alive, and its
        cgroup known: records up to hi_seq of pid alone (the store's runs say so) are
        swept with nothing to read (`unswept` as for sweep())."""
        w = self._watched.get(pid)
        if not w or self._known_start(pid) != w[1] or cgid not in self._cgroups or \
                self._exited():
            return False
        with self._lock:
            self.counters["records_unswept"] += unswept
            self._procs.move_to_end(pid)
            self.swept_seq = max(self.swept_seq, hi_seq)
        return True

    def _exited(self) -> set:
        """The watched pids whose process has exited (no longer watched)."""
        fds = {fd for fd, _ in self._exits.poll(0)}
        gone = {pid for pid, (fd, _) in self._watched.items() if fd in fds} if fds else set()
        for pid in gone:
            self._unwatch(pid)
        return gone

    def _read_and_watch(self, pid: int):
        """read_process, and a pidfd on the process read (opened first: if the process
        exits in between, the pidfd says so and the next sweep reads again)."""
        self._unwatch(pid)
        try:
            fd = os.pidfd_open(pid) if self._watching else None
        except OSError:  # gone, or no pidfds here (seccomp, an old kernel)
            fd = None
        proc = self._read_process(pid, self._known_start(pid))
        if fd is not None and proc is None:
            os.close(fd)
        elif fd is not None:
            self._watched[pid] = (fd, proc[0])
            self._exits.register(fd, select.POLLIN)
            if len(self._watched) > MAX_WATCHED:
                self._unwatch(next(iter(self._watched)))
        return proc

    def _unwatch(self, pid: int) -> None:
        w = self._watched.pop(pid, None)
        if w:
            self._exits.unregister(w[0])
            os.close(w[0])

    def close(self) -> None:
        """Stop watching processes (their pidfds are closed); sweeps read /proc again."""
        self._watching = False
        for pid in list(self._watched):
            self._unwatch(pid)

    def _known_start(self, pid: int) -> Optional[int]:
        entries = self._procs.get(pid)
        return entries[-1].start if entries else None

    def _note(self, pid: int, ts_ns: int, proc, lo_seq: int) -> None:
        """The process seen with `pid` from lo_seq on: a new entry unless it is the one
        the pid's last entry already names. A process that started after the record was
        made is not the one that made it."""
        if proc is not None and proc[0] * _TICK_NS > ts_ns:
            proc = None
        entries = self._procs.get(pid)
        start = proc[0] if proc else None
        if entries and entries[-1].start == start:
            self._procs.move_to_end(pid)
            return
        entry = _Proc(lo_seq, start, Process(proc[1], proc[2]) if proc else NO_PROCESS)
        if entries is None:
            entries = self._procs[pid] = []
            if len(self._procs) > MAX_PROCESSES:
                self._procs.popitem(last=False)
                self.counters["processes_evicted"] += 1
        else:
            self._procs.move_to_end(pid)
        entries.append(entry)
        del entries[:-8]  # a pid reused more often than this within the store is rare

    def process(self, pid: int, seq: int) -> Process:
        """The process that made record `seq` of `pid`, as far as a sweep saw it."""
        entries = self._procs.get(pid)
        if not entries or seq > self.swept_seq:
            return NO_PROCESS
        i = bisect.bisect_right(entries, seq, key=lambda e: e.lo_seq) - 1
        return entries[i].process if i >= 0 else NO_PROCESS

    def process_ranges(self, match: Callable[[Process], bool]) -> List[Tuple[int, int, int]]:
        """(pid, lo_seq, hi_seq) of every known process matching: its records are the
        pid's with a sequence number in [lo_seq, hi_seq)."""
        out = []
        with self._lock:
            for pid, entries in self._procs.items():
                for k, e in enumerate(entries):
                    if e.start is not None and match(e.process):
                        hi = entries[k + 1].lo_seq if k + 1 < len(entries) else SEQ_END
                        out.append((pid, e.lo_seq, hi))
        return out

    def stats(self) -> dict:
        with self._lock:
            return {"cgroups": len(self._cgroups), "processes": len(self._procs),
                    **self.counters}

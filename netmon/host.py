"""What this host offers netmon: capabilities, BTF, tracefs, the cgroup v2 mount; and the
error, naming the cause and the fix, when it does not offer enough. It imports nothing
of netmon's but the extension, so the Monitor and privilege.py can both build on it."""
from __future__ import annotations

import ctypes
import errno
import os
from typing import List, Optional

from . import _core

CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 12, 21, 38, 39
CAP_NAMES = ["chown", "dac_override", "dac_read_search", "fowner", "fsetid", "kill", "setgid",
             "setuid", "setpcap", "linux_immutable", "net_bind_service", "net_broadcast",
             "net_admin", "net_raw", "ipc_lock", "ipc_owner", "sys_module", "sys_rawio",
             "sys_chroot", "sys_ptrace", "sys_pacct", "sys_admin", "sys_boot", "sys_nice",
             "sys_resource", "sys_time", "sys_tty_config", "mknod", "lease", "audit_write",
             "audit_control", "setfcap", "mac_override", "mac_admin", "syslog", "wake_alarm",
             "block_suspend", "audit_read", "perfmon", "bpf", "checkpoint_restore"]
KERNEL_BTF = "/sys/kernel/btf/vmlinux"
TRACEFS = "/sys/kernel/tracing"
CONNECT_TP = "events/syscalls/sys_enter_connect"


class MonitorError(RuntimeError):
    """netmon cannot capture; the message names the cause and the fix."""


# ---- capabilities ----

def effective_caps(task: str = "self") -> int:
    """The CapEff mask of /proc/<task>/status: "self" is the process (as its main thread
    sees it), "self/task/<tid>" one thread (capabilities are per thread)."""
    with open(f"/proc/{task}/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def cap_names(mask: int) -> List[str]:
    """The capabilities in `mask`, by name ("bpf", "perfmon", ...)."""
    return [CAP_NAMES[i] if i < len(CAP_NAMES) else f"cap_{i}"
            for i in range(64) if mask >> i & 1]


def has_caps(*extra: int) -> bool:
    """CAP_SYS_ADMIN, or CAP_BPF + CAP_PERFMON and any `extra` capabilities."""
    caps = effective_caps()
    return bool(caps & (1 << CAP_SYS_ADMIN)) or all(
        caps & (1 << c) for c in (CAP_BPF, CAP_PERFMON, *extra))


# ---- kernel features and mounts ----

def kernel_btf_has(*names: bytes) -> List[bool]:
    """Whether the kernel's BTF mentions each name (a kfunc, an enum value...)."""
    try:
        with open(KERNEL_BTF, "rb") as f:
            btf = f.read()
    except OSError:
        return [False] * len(names)
    return [n in btf for n in names]


def ensure_tracefs() -> None:
    """The syscall tracepoints need tracefs: mount it where libbpf looks if it is not."""
    for base in ("/sys/kernel/debug/tracing", TRACEFS):
        if os.path.exists(os.path.join(base, CONNECT_TP)):
            return
    if os.path.isdir(TRACEFS) and not os.path.ismount(TRACEFS):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mount(b"tracefs", TRACEFS.encode(), b"tracefs", 0, None) != 0:
            err = ctypes.get_errno()
            raise MonitorError(f"tracefs is not mounted and mounting it at {TRACEFS} failed "
                               f"({os.strerror(err)}); mount it: "
                               f"mount -t tracefs tracefs {TRACEFS}")
    if not os.path.exists(os.path.join(TRACEFS, CONNECT_TP)):
        raise MonitorError(f"{TRACEFS}/{CONNECT_TP} does not exist: this kernel lacks syscall "
                           "tracepoints (CONFIG_FTRACE_SYSCALLS) or tracefs is not mounted there")


def preflight(tracepoints: bool = True) -> None:
    """Check what loading needs, so the error names the real cause. Only the syscall
    backend's tracepoints need tracefs (the others are raw tracepoints and cgroup hooks)."""
    if not has_caps():
        raise MonitorError("permission denied: netmon needs root, or CAP_BPF and CAP_PERFMON "
                           "(run with sudo, or: setcap cap_bpf,cap_perfmon+ep on the interpreter)")
    if not os.path.exists(KERNEL_BTF):
        raise MonitorError(f"the kernel has no BTF ({KERNEL_BTF} missing): netmon's "
                           "CO-RE programs need a kernel built with CONFIG_DEBUG_INFO_BTF=y")
    if tracepoints:
        ensure_tracefs()


def cgroup2_root() -> Optional[str]:
    """Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup, or .../unified on hybrid
    hosts); None if it is not."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split(" ", 1)[0] == "cgroup2":
                return left.split()[4]
    return None


def cgroup_to_watch(cgroup: Optional[str]) -> Optional[str]:
    """Where the cgroup hooks attach: `cgroup` (checked to be a cgroup v2 directory), else
    the hierarchy's root; None when cgroup v2 is not mounted."""
    root = cgroup2_root()
    if cgroup is None:
        return root
    if not (root and os.path.isdir(cgroup) and os.path.realpath(cgroup).startswith(
            os.path.realpath(root))):
        raise MonitorError(f"{cgroup} is not a cgroup v2 directory (under "
                           f"{root or 'a cgroup2 mount'})")
    return cgroup


# ---- why loading or attaching failed ----

def load_error(e: OSError) -> MonitorError:
    """The kernel refused the programs: the likely cause, then libbpf's log tail."""
    tail = _core.libbpf_log_tail(3000).strip()
    if e.errno in (errno.EPERM, errno.EACCES):
        msg = (f"{e.strerror}: {os.strerror(e.errno)}; run netmon as root or with CAP_BPF and "
               "CAP_PERFMON (a lockdown or seccomp policy can also forbid BPF)")
    elif e.errno == errno.ENOSYS:
        msg = "the kernel has no bpf() syscall (CONFIG_BPF_SYSCALL is off): netmon cannot run here"
    else:
        msg = (f"{e.strerror}: {os.strerror(e.errno or 0)}; the kernel needs BTF, ring buffers "
               "(Linux 5.8+) and syscall tracepoints")
    if tail:
        msg += "\n--- libbpf/verifier log (tail) ---\n" + tail
    return MonitorError(msg)


def attach_error(e: OSError, cgroot: Optional[str]) -> MonitorError:
    return MonitorError(f"{e.strerror}: {os.strerror(e.errno or 0)}; is tracefs mounted at "
                        f"{TRACEFS}, and cgroup v2 at {cgroot}?")

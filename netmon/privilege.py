"""Least privilege once the programs are attached: the BPF fds are the capability from
then on (reading maps, polling the ring and closing links need none), so every
capability can go. Linux capabilities are per thread: drop before starting threads."""
from __future__ import annotations

import ctypes
import os
import pwd
from typing import List, Optional

PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 38, 47, 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
CAP_NAMES = ["chown", "dac_override", "dac_read_search", "fowner", "fsetid", "kill", "setgid",
             "setuid", "setpcap", "linux_immutable", "net_bind_service", "net_broadcast",
             "net_admin", "net_raw", "ipc_lock", "ipc_owner", "sys_module", "sys_rawio",
             "sys_chroot", "sys_ptrace", "sys_pacct", "sys_admin", "sys_boot", "sys_nice",
             "sys_resource", "sys_time", "sys_tty_config", "mknod", "lease", "audit_write",
             "audit_control", "setfcap", "mac_override", "mac_admin", "syslog", "wake_alarm",
             "block_suspend", "audit_read", "perfmon", "bpf", "checkpoint_restore"]


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def held_capabilities() -> List[str]:
    """This thread's effective capabilities, by name ("bpf", "perfmon", ...)."""
    with open(f"/proc/self/task/{ctypes.CDLL(None).gettid()}/status") as f:
        eff = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    return [CAP_NAMES[i] if i < len(CAP_NAMES) else f"cap_{i}"
            for i in range(64) if eff >> i & 1]


def drop_privileges(user: Optional[str] = None) -> None:
    """Switch to `user` (if given), then give up every capability for good: effective,
    permitted, inheritable and ambient sets emptied, no_new_privs set. Raises OSError."""
    libc = ctypes.CDLL(None, use_errno=True)
    if user is not None:
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            raise OSError(0, f"no such user: {user}") from None
        os.setgroups([])
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)  # glibc applies it to every thread
    if libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot clear ambient capabilities: {os.strerror(err)}")
    data = (_Data * 2)()  # zeroed: all three sets empty, both 32-bit halves
    if libc.capset(ctypes.byref(_Header(_LINUX_CAPABILITY_VERSION_3, 0)), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot drop capabilities: {os.strerror(err)}")
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot set no_new_privs: {os.strerror(err)}")

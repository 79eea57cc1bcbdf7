"""Least privilege once the programs are attached: the BPF fds are the capability from
then on (reading maps, polling the ring and closing links need none), so every
capability can go. Linux capabilities are per thread: drop before starting threads."""
from __future__ import annotations

import ctypes
import os
import pwd
from typing import List, Optional

from . import host

PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 38, 47, 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def held_capabilities() -> List[str]:
    """This thread's effective capabilities, by name ("bpf", "perfmon", ...)."""
    return host.cap_names(host.effective_caps(f"self/task/{ctypes.CDLL(None).gettid()}"))


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

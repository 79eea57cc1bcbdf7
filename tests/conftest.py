"""Fixtures shared by the test modules (plain helpers are in helpers.py), and the policy:
kernel tests (marker `bpf`) need root. Without root they skip, unless NETMON_REQUIRE_BPF
is set (CI sets it): then they fail, so nothing is silently left untested."""
import contextlib
import os
import socket
import tempfile
import uuid

import pytest


def pytest_runtest_setup(item):
    """Runs before any fixture, so a module-scoped fixture that loads BPF is never reached."""
    if item.get_closest_marker("bpf") is None or os.geteuid() == 0:
        return
    reason = "needs root to load BPF programs"
    if os.environ.get("NETMON_REQUIRE_BPF", "") not in ("", "0"):
        pytest.fail(f"{reason}, and NETMON_REQUIRE_BPF is set")
    pytest.skip(reason)


@pytest.fixture(autouse=True, scope="session")
def _cwd_outside_the_source_tree(tmp_path_factory):
    """Children started with `python -c` or `-m netmon` put their working directory first
    on sys.path: run everything from elsewhere, so they import the installed netmon (the
    source tree has no built extension when testing an sdist or a wheel)."""
    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(old)


class Cgroup(str):
    """A cgroup v2 directory made for one test; enter() moves the calling process into it
    (pass it as a subprocess preexec_fn)."""

    def enter(self):
        with open(os.path.join(self, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))


@contextlib.contextmanager
def new_cgroup():
    from netmon.host import cgroup2_root
    path = Cgroup(os.path.join(cgroup2_root(), f"netmon-test-{uuid.uuid4().hex[:8]}"))
    os.mkdir(path)
    yield path
    os.rmdir(path)  # empty again: every process the test put there has exited


@pytest.fixture
def cgroup():
    with new_cgroup() as path:
        yield path


@pytest.fixture(scope="module")
def module_cgroup():
    """A cgroup shared by a module's tests, like `cgroup`."""
    with new_cgroup() as path:
        yield path


@pytest.fixture(scope="module")
def listeners():
    """One of each kind of connect target (kernel tests): tcp4/tcp6 ports and unix/abstract
    sockets listening, a bound port that refuses, a unix path nobody made."""
    tmp = tempfile.mkdtemp()
    tcp4 = socket.socket()
    tcp4.bind(("127.0.0.1", 0))
    tcp4.listen(64)
    tcp6 = socket.socket(socket.AF_INET6)
    tcp6.bind(("::1", 0))
    tcp6.listen(64)
    path = os.path.join(tmp, "netmon-test.sock")
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(path)
    unix.listen(64)
    abstract = socket.socket(socket.AF_UNIX)
    abstract_name = f"\0netmon-test-{os.getpid()}"  # unique: tests may run side by side
    abstract.bind(abstract_name)
    abstract.listen(64)
    closed = socket.socket()  # bound, never listening: connects to it are refused
    closed.bind(("127.0.0.1", 0))
    yield {"tcp4": tcp4.getsockname()[1], "tcp6": tcp6.getsockname()[1], "path": path,
           "abstract": abstract_name, "closed": closed.getsockname()[1],
           "missing": os.path.join(tmp, "no-such.sock")}
    for s in (tcp4, tcp6, unix, abstract, closed):
        s.close()

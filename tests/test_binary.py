"""The single binary (`make binary`) on the real kernel, inside a minimal Debian root with
no Python at all (mmdebstrap --variant=minbase, /proc and /sys bind-mounted, chroot):
the same answers as the installed command, a real connect from the host in /api/events,
`trace`, SIGTERM exiting 0 with nothing left attached, and its unpacking directory fresh
and private. Needs root. Skips only when the binary is absent and NETMON_REQUIRE_BINARY
is unset; CI builds it and sets that.

The minimal root is cached as a tarball under /var/cache/netmon-tests (root-only), made
once per machine (~30 s) from Debian's packages; NETMON_MINROOT_TAR names another."""
import os
import platform
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import bpf_ids, free_port, netmon_command, prog_ids_held_by, wait_progs_unloaded

import netmon

pytestmark = pytest.mark.bpf
REPO = Path(__file__).resolve().parent.parent
CACHE = Path("/var/cache/netmon-tests")
SUITE = "bookworm"
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}  # nothing of the host's
HOSTILE = ("netmon", "_MEI", "_MEIPASS", "staticx", "staticx-netmon")


def _arch():
    try:
        return subprocess.run(["dpkg", "--print-architecture"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return platform.machine()


def _binary():
    path = Path(os.environ.get("NETMON_BINARY") or
                REPO / "dist" / f"netmon-{netmon.__version__}-linux-{_arch()}")
    if not path.exists():
        if not os.environ.get("NETMON_REQUIRE_BINARY"):
            pytest.skip(f"no single binary at {path}: build it with `make binary`")
        pytest.fail(f"NETMON_REQUIRE_BINARY is set but {path} does not exist (make binary)")
    return path


def _minroot_tar():
    if os.environ.get("NETMON_MINROOT_TAR"):
        return Path(os.environ["NETMON_MINROOT_TAR"])
    tar = CACHE / f"{SUITE}-minbase.tar"
    if not tar.exists():
        CACHE.mkdir(mode=0o700, parents=True, exist_ok=True)
        assert shutil.which("mmdebstrap"), "mmdebstrap is missing: apt-get install mmdebstrap"
        part = tar.with_suffix(".part.tar")
        subprocess.run(["mmdebstrap", "--quiet", "--variant=minbase", SUITE, str(part)],
                       check=True)
        part.rename(tar)
    return tar


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A minimal Debian root holding the binary as /netmon, with the host's /proc and /sys;
    its /tmp holds directories another user made, for the binary to stay away from."""
    binary = _binary()
    if os.geteuid() != 0:
        pytest.skip("chroot and BPF need root")
    top = tmp_path_factory.mktemp("minroot")
    subprocess.run(["tar", "-C", str(top), "-xf", str(_minroot_tar())], check=True)
    assert not list(top.glob("usr/bin/python*")) and not list(top.glob("usr/lib/python3*"))
    shutil.copy2(binary, top / "netmon")
    nobody = 65534
    for name in HOSTILE:
        (top / "tmp" / name).mkdir(mode=0o777)
        os.chmod(top / "tmp" / name, 0o777)
        os.chown(top / "tmp" / name, nobody, nobody)
    mounted = []
    try:
        for path, how in (("proc", "--bind"), ("sys", "--rbind")):
            subprocess.run(["mount", how, f"/{path}", str(top / path)], check=True)
            mounted.append(top / path)
        subprocess.run(["mount", "--make-rslave", str(top / "sys")], check=True)
        yield top
    finally:
        for path in reversed(mounted):
            subprocess.run(["umount", "-R", "-l", str(path)], check=False)


def run(root, *args, env=None, timeout=60):
    return subprocess.run(["chroot", str(root), "/netmon", *args], capture_output=True,
                          text=True, timeout=timeout, env={**ENV, **(env or {})})


def installed(*args, env=None):
    """The same command from the pip-installed netmon, for comparison."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NETMON_")}
    return subprocess.run(netmon_command() + list(args), capture_output=True, text=True,
                          timeout=60, env={**clean, "COLUMNS": "100", **(env or {})})


def descendants(pid):
    """pid and every process below it."""
    children = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def test_version_names_netmon_libbpf_and_python(root):
    r = run(root, "--version")
    assert (r.returncode, r.stderr) == (0, "")
    libbpf = netmon._core.libbpf_version().lstrip("v")
    assert re.fullmatch(rf"netmon {re.escape(netmon.__version__)} \(libbpf {re.escape(libbpf)}, "
                        r"Python 3\.[0-9]+\.[0-9]+\)\n", r.stdout), r.stdout


@pytest.mark.parametrize("args, env", [
    (["--bogus"], {}),
    (["--capacity", "lots"], {}),
    (["--addr", "nowhere"], {}),
    ([], {"NETMON_CAPACITY": "-1"}),
    (["trace", "--count", "x"], {}),
    (["trace", "--nope"], {}),
    (["--help"], {}),
    (["trace", "--help"], {}),
])
def test_same_answers_as_the_installed_command(root, args, env):
    """Usage errors (one line, exit 2) and help texts: byte for byte the installed
    command's."""
    got = run(root, *args, env={"COLUMNS": "100", **env})
    want = installed(*args, env=env)
    assert (got.returncode, got.stdout, got.stderr) == (want.returncode, want.stdout, want.stderr)
    assert got.returncode in (0, 2)


@pytest.fixture(scope="module")
def server(root):
    port = free_port()
    t0 = time.monotonic()
    proc = subprocess.Popen(["chroot", str(root), "/netmon", "serve", "--addr",
                             f"127.0.0.1:{port}", "--backend", "syscall"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    line = proc.stdout.readline()
    assert line, f"the binary did not start: {proc.stderr.read()}"
    try:
        yield {"proc": proc, "url": f"http://127.0.0.1:{port}", "line": line.strip(),
               "started_s": time.monotonic() - t0}
    finally:
        if proc.poll() is None:
            for pid in reversed(descendants(proc.pid)):
                os.kill(pid, signal.SIGKILL)
            proc.wait()


def _get(url, accept="application/json"):
    import urllib.request
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Accept": accept}),
                                timeout=10) as r:
        return r.status, r.headers["Content-Type"], r.read()


def test_serve_answers_health_and_sees_a_connect_from_the_host(server):
    import json
    assert server["line"].startswith(f"netmon {netmon.__version__} listening on "
                                     f"{server['url']}; syscall backend")
    status, _, body = _get(server["url"] + "/health")
    assert status == 200 and json.loads(body)["status"] == "healthy"
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            pass
    deadline, events = time.monotonic() + 10, []
    while not events and time.monotonic() < deadline:
        _, _, body = _get(server["url"] + f"/api/events?pid={os.getpid()}&port={port}")
        events = json.loads(body)["events"]
        time.sleep(0.05)
    assert len(events) == 1, events
    e = events[0]
    assert (e["pid"], e["destination"], e["protocol"], e["return_code"], e["error"]) == \
        (os.getpid(), f"127.0.0.1:{port}", "TCP", 0, None)


def test_the_page_and_its_files_are_inside(server):
    """netmon/web/static travels in the binary: GET / for a browser is the page."""
    status, ctype, body = _get(server["url"] + "/", accept="text/html")
    want = (Path(netmon.__file__).parent / "web" / "static" / "index.html").read_bytes()
    assert (status, ctype, body) == (200, "text/html; charset=utf-8", want)
    status, ctype, body = _get(server["url"] + "/ui/app.js")
    want = (Path(netmon.__file__).parent / "web" / "static" / "app.js").read_bytes()
    assert (status, body) == (200, want)


def test_unpacks_into_a_fresh_private_directory(server, root):
    """What the binary unpacks (the interpreter, the extension, libbpf) lives in a new
    directory only root can enter, made with an unpredictable name; never one of the
    directories another user created in /tmp beforehand."""
    pids = descendants(server["proc"].pid)
    mapped = set()
    for pid in pids:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            path = line.split(None, 5)[5] if len(line.split(None, 5)) == 6 else ""
            if re.search(r"/(libpython3|libbpf|_core)[^/]*\.so", path):
                mapped.add(Path(path))
    assert {p.name.split(".")[0] for p in mapped} >= {"libpython3", "libbpf", "_core"}, mapped
    for path in mapped:
        rel = path.relative_to(root / "tmp")  # maps shows paths as the reader sees them
        assert rel.parts[0] not in HOSTILE
        for depth in range(1, len(rel.parts)):
            d = root / "tmp" / Path(*rel.parts[:depth])
            st = d.stat()
            if depth == 1:
                assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700), (d, st)
            assert st.st_uid == 0 and not st.st_mode & 0o022, (d, st)


def test_sigterm_exits_0_detaches_everything_and_cleans_up(server, root):
    """Last: stops the server."""
    proc = server["proc"]
    ids = set()
    for pid in descendants(proc.pid):
        ids |= prog_ids_held_by(pid)
    names = {p["id"]: p.get("name", "") for p in bpf_ids("prog")}
    assert len(ids) >= 2 and all(names[i].startswith("netmon_") for i in ids)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert "Traceback" not in proc.stderr.read()
    wait_progs_unloaded(ids)
    assert not ids & {p["id"] for p in bpf_ids("prog")}
    assert not ids & {link.get("prog_id") for link in bpf_ids("link")}
    assert sorted(p.name for p in (root / "tmp").iterdir()) == sorted(HOSTILE)


def test_trace_prints_a_connect_and_stops(root):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        proc = subprocess.Popen(["chroot", str(root), "/netmon", "trace", "--count", "1",
                                 "--port", str(port)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=ENV)
        try:
            err = proc.stderr.readline()  # once attached
            assert err.startswith("netmon trace: watching with the syscall backend"), err
            with socket.create_connection(("127.0.0.1", port)):
                pass
            out, rest = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, err + rest
    header, *rows = out.splitlines()
    assert len(rows) == 1, out
    row = dict(zip(header.split(), rows[0].split()))  # this test's comm has no space
    assert (row["PID"], row["DESTINATION"], row["PROTO"], row["RESULT"]) == \
        (str(os.getpid()), f"127.0.0.1:{port}", "TCP", "ok")
    assert rest.startswith("netmon trace: 1 shown;")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))

"""The container image `make image` builds, run under podman: `netmon --version`, and a
real capture with the image's own Python, wheel and bundled libbpf, both privileged and
with only the DaemonSet's capabilities and a read-only root. Not collected by `make test`
(building the image takes minutes: a Debian root file system and a wheel); run it with
`make test-image`, which builds the image first. Here podman needs runc (crun refuses
this host's hybrid cgroup layout) and limits it can set without CAP_SYS_RESOURCE."""
import json
import os
import socket
import subprocess
import time

import pytest
from helpers import free_port, http

import netmon

IMAGE = os.environ.get("IMAGE", f"registry.example.com/netmon/netmon:{netmon.__version__}")
RUN = ["podman", "--runtime", "runc", "run", "--rm", "--ulimit", "nofile=4096:4096",
       "--ulimit", "nproc=4096:4096"]
DAEMONSET_LIKE = ["--cap-drop", "ALL", "--cap-add", "BPF,PERFMON,NET_ADMIN", "--read-only",
                  "--security-opt", "no-new-privileges"]
PRIVILEGED = ["--privileged"]
PODMAN_SECCOMP = "/usr/share/containers/seccomp.json"


def runtime_default_seccomp(tmp_path):
    """podman's default seccomp profile as containerd's RuntimeDefault (what the DaemonSet
    gets on Kubernetes) has it: bpf() allowed with CAP_BPF, perf_event_open() with
    CAP_PERFMON. Debian 12's containers-common allows them only with CAP_SYS_ADMIN."""
    with open(PODMAN_SECCOMP) as f:
        profile = json.load(f)
    for rule in profile["syscalls"]:
        rule["names"] = [n for n in rule["names"] if n not in ("bpf", "perf_event_open")]
    profile["syscalls"] = [r for r in profile["syscalls"] if r["names"]] + [
        {"names": ["bpf"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_BPF"]}},
        {"names": ["perf_event_open"], "action": "SCMP_ACT_ALLOW",
         "includes": {"caps": ["CAP_PERFMON"]}}]
    path = tmp_path / "seccomp.json"
    path.write_text(json.dumps(profile))
    return ["--security-opt", f"seccomp={path}"]


def test_image_says_its_version():
    out = subprocess.run(RUN + [IMAGE, "--version"], capture_output=True, text=True,
                         timeout=120)
    assert (out.returncode, out.stdout) == (0, f"netmon {netmon.__version__}\n"), out.stderr


def test_image_holds_no_compiler_and_no_package_manager():
    probe = "import shutil; print([t for t in ('gcc', 'cc', 'clang', 'apt', 'apt-get', " \
            "'pip', 'pip3') if shutil.which(t)])"
    out = subprocess.run(RUN + ["--entrypoint", "/usr/bin/python3.11", IMAGE, "-c", probe],
                         capture_output=True, text=True, timeout=120)
    assert (out.returncode, out.stdout) == (0, "[]\n"), out.stderr


@pytest.mark.bpf
@pytest.mark.parametrize("privileges", [PRIVILEGED, DAEMONSET_LIKE], ids=["privileged",
                                                                          "daemonset-caps"])
def test_image_captures_real_connects(privileges, tmp_path):
    if privileges is DAEMONSET_LIKE:
        privileges = privileges + runtime_default_seccomp(tmp_path)
    port = free_port()
    name = f"netmon-image-check-{os.getpid()}-{port}"
    cmd = RUN[:4] + ["-d", "--name", name] + RUN[5:] + privileges + [
        "--network", "host", "-v", "/sys/kernel/tracing:/sys/kernel/tracing:ro",
        IMAGE, "--addr", f"127.0.0.1:{port}", "--backend", "syscall", "--capacity", "1048576"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if http(base + "/health")[0] == 200:
                    break
            except OSError:
                pass
            logs = subprocess.run(["podman", "logs", name], capture_output=True, text=True)
            assert time.monotonic() < deadline, logs.stdout + logs.stderr
            time.sleep(0.2)
        dead = free_port()
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", dead)) != 0
        evs = []
        while not evs and time.monotonic() < deadline:
            evs = http(f"{base}/api/events?pid={os.getpid()}&port={dead}")[2]["events"]
            time.sleep(0.05)
        assert [(e["pid"], e["destination"], e["protocol"], e["error"]) for e in evs] == [
            (os.getpid(), f"127.0.0.1:{dead}", "TCP", "ECONNREFUSED")]
        stats = http(base + "/api/stats")[2]
        assert (stats["capabilities"], stats["backend"]) == ([], "syscall")
    finally:
        subprocess.run(["podman", "rm", "-f", "-t", "2", name], capture_output=True)

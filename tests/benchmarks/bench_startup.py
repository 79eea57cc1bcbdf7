"""Start-up time of a netmon command: spawn to the first `/health` 200, N runs, as a
table (median, min, max). Not a test: it prints figures and never fails on one.

    python tests/benchmarks/bench_startup.py [--runs 9] COMMAND [COMMAND ...]

Each COMMAND is a path to a netmon executable (the installed script, the single binary).
Root: serve loads and attaches the BPF programs."""
from __future__ import annotations

import argparse
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def once(command: str, timeout: float = 30.0) -> float:
    """Seconds from spawn to /health answering 200; the process is then stopped with
    SIGTERM and must exit 0."""
    port = free_port()
    t0 = time.monotonic()
    proc = subprocess.Popen([command, "serve", "--addr", f"127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{command} exited {proc.returncode}: "
                                   f"{proc.stderr.read().decode().strip()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except OSError:
                pass
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"{command}: no /health 200 within {timeout} s")
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGTERM)
        if proc.wait(10) != 0:
            print(f"warning: {command} exited {proc.returncode} on SIGTERM", file=sys.stderr)


def cpu_seconds() -> float:
    """User + system CPU of this process's reaped children (and theirs)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("commands", nargs="+")
    args = ap.parse_args(argv)
    for command in args.commands:
        once(command)  # warm the page cache (and a onefile's extraction cache) first
    walls = {c: [] for c in args.commands}
    cpus = {c: [] for c in args.commands}
    for _ in range(args.runs):  # round robin: the host's load falls on every command alike
        for command in args.commands:
            cpu = cpu_seconds()
            walls[command].append(once(command))
            cpus[command].append(cpu_seconds() - cpu)
    load = os.getloadavg()[0]
    print(f"spawn to /health 200, {args.runs} runs each, load average {load:.1f} "
          f"on {os.cpu_count()} CPUs; CPU = user+system of the whole run incl. shutdown")
    print("| command | median s | min s | max s | CPU median s |\n|---|---|---|---|---|")
    for c in args.commands:
        t = walls[c]
        print(f"| {os.path.relpath(c)} | {statistics.median(t):.3f} | {min(t):.3f} | "
              f"{max(t):.3f} | {statistics.median(cpus[c]):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

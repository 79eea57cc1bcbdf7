"""The `netmon` command line: flags, environment, and failures that need no root."""
import argparse
import os
import platform
import re
import socket
import subprocess
import sys

import pytest

import netmon
from netmon import cli
from netmon.monitor import DEFAULT_CAPACITY, DEFAULT_RINGBUF_BYTES


def stderr_lines(capsys):
    return capsys.readouterr().err.splitlines()


def test_help(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: netmon")
    # 3.13's argparse names the metavar once ("--addr, -addr HOST:PORT"), earlier ones twice
    assert re.search(r"--addr( HOST:PORT)?, -addr HOST:PORT", out)
    for text in ("--capacity", "--ringbuf-size",
                 "--log-level", "--debug", "--version", "examples:", "NETMON_ADDR",
                 "NETMON_CAPACITY", "NETMON_RINGBUF_SIZE", "NETMON_LOG_LEVEL", "curl"):
        assert text in out


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    libbpf = netmon._core.libbpf_version().lstrip("v")
    assert capsys.readouterr().out == (f"netmon {netmon.__version__} (libbpf {libbpf}, "
                                       f"Python {platform.python_version()})\n")


@pytest.mark.parametrize("argv, words", [
    (["--bogus"], "--bogus"),
    (["--addr", "8080"], "invalid address '8080'"),
    (["--capacity", "lots"], "'lots' is not a positive integer"),
    (["--log-level", "loud"], "'loud' is not one of debug, info, warning, error"),
    (["--addr"], "expected one argument"),
    (["--capacity", "0"], "capacity must be a positive integer"),
    (["--ringbuf-size", "1000"], "power of two"),
    (["extra"], "unrecognized arguments: extra"),
])
def test_bad_flag_is_one_line_and_exit_2(capsys, argv, words):
    assert cli.main(argv) == 2
    (line,) = stderr_lines(capsys)
    assert line.startswith("netmon: error: ") and words in line


def test_bad_flag_from_the_installed_command():
    """The real process: exit status 2, one stderr line, no traceback."""
    r = subprocess.run([sys.executable, "-m", "netmon", "--capacity", "-1"],
                       capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 2
    assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr
    assert r.stdout == ""


def test_busy_port_is_one_line_and_exit_1(capsys):
    """Binding comes before BPF, so this needs no root."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert cli.main(["--addr", f"127.0.0.1:{port}"]) == 1
    (line,) = stderr_lines(capsys)
    assert f"cannot listen on 127.0.0.1:{port}: the port is already in use" in line
    assert "--addr" in line


def test_foreign_address_is_one_line_and_exit_1(capsys):
    """192.0.2.1 (TEST-NET-1) is no local interface's address; nothing is sent."""
    assert cli.main(["--addr", "192.0.2.1:8080", "--allow-unauthenticated-remote"]) == 1
    (line,) = stderr_lines(capsys)
    assert line.startswith("netmon: error: cannot listen on 192.0.2.1:8080: no local interface")


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:8080", ("127.0.0.1", 8080)),
    ("localhost:0", ("localhost", 0)),
    (":9090", ("::", 9090)),
    ("[::1]:8080", ("::1", 8080)),
    ("[::]:80", ("::", 80)),
    ("[fe80::1%eth0]:8080", ("fe80::1%eth0", 8080)),
    ("0.0.0.0:65535", ("0.0.0.0", 65535)),
])
def test_parse_addr(text, expected):
    assert cli.parse_addr(text) == expected


@pytest.mark.parametrize("text", ["8080", "127.0.0.1", "::1:8080", "[::1]", "[::1]8080",
                                  "host:", "host:http", "1.2.3.4:65536", "a:b:1", ""])
def test_parse_addr_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError, match="expected HOST:PORT"):
        cli.parse_addr(text)


@pytest.mark.parametrize("argv", [["-addr", ":9090"], ["-addr=:9090"], ["--addr", ":9090"],
                                  ["--addr=:9090"]])
def test_go_style_and_gnu_style_addr(argv):
    assert cli.parse_args(argv, environ={}).addr == ("::", 9090)


def test_defaults():
    args = cli.parse_args([], environ={})
    assert (args.addr, args.capacity, args.ringbuf_size, args.log_level, args.debug) == \
        (("127.0.0.1", 8080), DEFAULT_CAPACITY, DEFAULT_RINGBUF_BYTES, "info", False)


ENV = {"NETMON_ADDR": "[::1]:9000", "NETMON_CAPACITY": "5000",
       "NETMON_RINGBUF_SIZE": "65536", "NETMON_LOG_LEVEL": "WARNING", "NETMON_DEBUG": "1"}


def test_environment_fills_every_setting():
    args = cli.parse_args([], environ=ENV)
    assert (args.addr, args.capacity, args.ringbuf_size, args.log_level, args.debug) == \
        (("::1", 9000), 5000, 65536, "warning", True)


def test_flags_win_over_environment():
    args = cli.parse_args(["--addr", "127.0.0.1:1", "--capacity", "7", "--ringbuf-size",
                           "4096", "--log-level", "error"], environ=ENV)
    assert (args.addr, args.capacity, args.ringbuf_size, args.log_level) == \
        (("127.0.0.1", 1), 7, 4096, "error")


@pytest.mark.parametrize("value, expected", [("0", False), ("false", False), ("", False),
                                             ("yes", True), ("TRUE", True)])
def test_debug_from_environment(value, expected):
    assert cli.parse_args([], environ={"NETMON_DEBUG": value}).debug is expected


@pytest.mark.parametrize("var, value", [("NETMON_CAPACITY", "many"), ("NETMON_ADDR", "nowhere"),
                                        ("NETMON_LOG_LEVEL", "chatty"), ("NETMON_DEBUG", "maybe"),
                                        ("NETMON_RINGBUF_SIZE", "-1")])
def test_bad_environment_names_the_variable(capsys, monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    assert cli.main([]) == 2
    (line,) = stderr_lines(capsys)
    assert line.startswith(f"netmon: error: environment variable {var}: ")

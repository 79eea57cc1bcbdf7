"""The live page in a real browser: Debian's headless Chromium driven by selenium (through
the system's chromedriver: nothing is downloaded), against the installed `netmon` command
on the real kernel. netmon watches one cgroup of the test's own (--cgroup), so connects
made elsewhere on the host cannot crowd the test's out of the tail and the top lists;
children named by the test (prctl) make real connects inside it. Needs root."""
import json
import os
import secrets
import shutil
import subprocess
import sys
import time

import pytest
from helpers import CONNECTOR, start_netmon, stop

pytestmark = pytest.mark.bpf

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1400,1100")
# run in every page before its own scripts (CDP scripts are not subject to the page's CSP):
# records CSP violations and uncaught errors where the test can read them
WATCH = """
window.__netmon_test = {csp: [], errors: []};
document.addEventListener("securitypolicyviolation",
  (e) => window.__netmon_test.csp.push(e.violatedDirective + " " + e.blockedURI));
window.addEventListener("error", (e) => window.__netmon_test.errors.push(String(e.message)));
window.addEventListener("unhandledrejection",
  (e) => window.__netmon_test.errors.push(String(e.reason)));
"""
LIVE_S = 2  # a connect shows in the live tail within this
TOPS_S = 8  # the top lists refresh every 3 s


@pytest.fixture(scope="module")
def connect(module_cgroup, listeners):
    """connect(comm, ok=1, refused=0, missing=0): a child named `comm`, in the watched
    cgroup, makes that many successful, refused and unix-ENOENT connects; returns its pid."""
    def run(comm, ok=1, refused=0, missing=0):
        targets = (("inet", ["127.0.0.1", listeners["tcp4"]], ok),
                   ("inet", ["127.0.0.1", listeners["closed"]], refused),
                   ("unix", listeners["missing"], missing))
        ops = [{"family": f, "addr": a, "repeat": n} for f, a, n in targets if n]
        out = subprocess.run([sys.executable, str(CONNECTOR), comm, json.dumps(ops)], check=True,
                             capture_output=True, text=True, preexec_fn=module_cgroup.enter)
        return json.loads(out.stdout)["pid"]
    return run


@pytest.fixture(scope="module")
def server(module_cgroup):
    # the syscall backend: exact return codes for unix sockets too (ENOENT)
    proc, port, _ = start_netmon("--backend", "syscall", "--cgroup", module_cgroup,
                                 "--capacity", "65536")
    yield f"http://127.0.0.1:{port}"
    stop(proc)


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(f"{' and '.join(missing)} missing: apt-get install -y chromium "
                    "chromium-driver (make deps installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    options.add_experimental_option("perfLoggingPrefs", {"enableNetwork": True,
                                                         "enablePage": False})
    d = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    d.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": WATCH})
    yield d
    d.quit()


def wait(driver, seconds, script, *args):
    """Poll `script` (a JS function body) until it returns something truthy; return that."""
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, seconds, poll_frequency=0.05).until(
        lambda d: d.execute_script(script, *args),
        f"after {seconds} s, still false: {script}")


def network(driver):
    """The browser's network events since the last call: (requests, failures), failures
    being answers >= 400 and requests that failed other than by being cancelled."""
    requests, failures = [], []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        p = msg.get("params", {})
        if msg["method"] == "Network.requestWillBeSent":
            requests.append(p["request"])
        elif msg["method"] == "Network.responseReceived" and p["response"]["status"] >= 400:
            failures.append((p["response"]["url"], p["response"]["status"]))
        elif msg["method"] == "Network.loadingFailed" and not p.get("canceled"):
            failures.append((p.get("type"), p.get("errorText")))
    return requests, failures


def console_errors(driver):
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def open_page(driver, url):
    """Load the page fresh and wait until its streams are live and the first data is in;
    the browser's logs start over."""
    driver.get_log("browser"), network(driver)
    driver.get(url)
    wait(driver, 10, "return document.getElementById('stream-state').textContent === 'live'"
                     " && !document.getElementById('main').hidden")
    wait(driver, 10, "return document.querySelectorAll('#top-command tbody tr').length > 0"
                     " || document.getElementById('tops').dataset.loaded")


TEXTS = "return [...document.querySelectorAll(arguments[0])].map((n) => n.textContent)"


def texts(driver, selector):
    return driver.execute_script(TEXTS, selector)


def wait_for_text(driver, seconds, selector, text):
    wait(driver, seconds, f"return ({TEXTS.removeprefix('return ')}).includes(arguments[1])",
         selector, text)


def test_page_loads_with_no_console_errors_and_no_failed_requests(driver, server, connect):
    connect("nm-page-load", ok=2, refused=1)
    open_page(driver, server)
    wait_for_text(driver, LIVE_S, "#tail-table td.command", "nm-page-load")
    time.sleep(1)  # a refresh of every view
    requests, failures = network(driver)
    assert failures == []
    assert console_errors(driver) == []
    assert driver.execute_script("return window.__netmon_test") == {"csp": [], "errors": []}
    paths = {r["url"].removeprefix(server).split("?")[0] for r in requests}
    assert {"/", "/ui/app.js", "/ui/style.css", "/health", "/api/events", "/api/events/stream",
            "/api/top"} <= paths
    assert all(r["url"].startswith(server) for r in requests)  # nothing from elsewhere
    assert driver.find_element("id", "backend").text == "syscall"


def test_a_connect_appears_in_the_tail_within_2s_and_in_the_top_list(driver, server, connect):
    open_page(driver, server)
    comm = "nm-" + secrets.token_hex(5)  # 13 bytes, fits a comm
    connect(comm, ok=3, refused=2)
    start = time.monotonic()
    wait_for_text(driver, LIVE_S, "#tail-table td.command", comm)
    assert time.monotonic() - start < LIVE_S
    rows = driver.execute_script(
        "return [...document.querySelectorAll('#tail-table tbody tr')]"
        ".filter((r) => r.querySelector('td.command').textContent === arguments[0])"
        ".map((r) => [r.className, r.querySelector('td.result').textContent.split(' ')[0]])",
        comm)
    assert sorted(rows) == [["fail", "ECONNREFUSED"]] * 2 + [["ok", "ok"]] * 3
    wait_for_text(driver, TOPS_S, "#top-command td.key", comm)
    count, failed = driver.execute_script(
        "const r = [...document.querySelectorAll('#top-command tbody tr')]"
        ".find((r) => r.cells[0].textContent === arguments[0]);"
        "return [r.cells[1].textContent, r.cells[2].textContent]", comm)
    assert (count, failed) == ("5", "2")
    wait_for_text(driver, TOPS_S, "#error-table td.command", comm)
    wait_for_text(driver, TOPS_S, "#top-error td.key", "ECONNREFUSED")


def test_a_filter_narrows_the_tail(driver, server, connect):
    open_page(driver, server)
    wanted, other = "nm-wanted-" + secrets.token_hex(2), "nm-other-" + secrets.token_hex(2)
    connect(other)
    wanted_pid = connect(wanted, missing=1)
    wait_for_text(driver, LIVE_S, "#tail-table td.command", other)
    network(driver)
    form = driver.find_element("id", "filters")
    form.find_element("name", "command").send_keys(wanted)
    form.find_element("css selector", "button[type=submit]").click()
    wait(driver, LIVE_S, "const c = [...document.querySelectorAll('#tail-table td.command')];"
                         "return c.length > 0 && c.every((td) => td.textContent === arguments[0])",
         wanted)
    connect(other)
    connect(wanted, ok=2)
    wait(driver, LIVE_S, "return document.querySelectorAll('#tail-table tbody tr').length === 4")
    assert set(texts(driver, "#tail-table td.command")) == {wanted}
    requests, _ = network(driver)
    streams = [r["url"] for r in requests if "/api/events/stream" in r["url"]]
    assert streams and all(f"command={wanted}" in u for u in streams)  # the API's own filter
    # clicking an event shows every field of it
    row = driver.execute_script(
        "return [...document.querySelectorAll('#tail-table tbody tr')]"
        ".find((r) => r.querySelector('td.result').textContent === 'ENOENT')")
    row.click()
    fields = dict(zip(texts(driver, "#detail-fields th"), texts(driver, "#detail-fields td")))
    assert fields["command"] == wanted and fields["pid"] == str(wanted_pid)
    assert fields["error"] == "ENOENT" and fields["protocol"] == "UNIX"
    assert {"seq", "tid", "uid", "destination", "return_code", "cgroup_id", "timestamp",
            "outcome", "latency_us", "kind", "backend"} <= set(fields)
    # a bad filter: the API's message, no stream
    form.find_element("name", "dest").send_keys("10.0.0.0/33")
    form.find_element("css selector", "button[type=submit]").click()
    wait(driver, LIVE_S, "return !document.getElementById('filter-error').hidden")
    assert driver.find_element("id", "filter-error").text.startswith("dest: must be")


def test_pause_holds_the_tail_and_resume_catches_up(driver, server, connect):
    open_page(driver, server)
    driver.find_element("id", "pause").click()
    comm = "nm-paused-" + secrets.token_hex(2)
    connect(comm)
    time.sleep(1)
    assert comm not in texts(driver, "#tail-table td.command")
    driver.find_element("id", "pause").click()
    wait_for_text(driver, LIVE_S, "#tail-table td.command", comm)


def test_the_chart_draws_successes_and_failures(driver, server, connect):
    open_page(driver, server)
    connect("nm-chart", ok=4, refused=2)
    wait(driver, 5, "return document.querySelector('#chart path.bar.fail').getAttribute('d')")
    assert int(driver.find_element("id", "chart").get_attribute("data-points")) >= 1
    assert driver.execute_script(
        "return document.querySelector('#chart path.bar.ok').getAttribute('d').length")


@pytest.mark.parametrize("comm", ["<b>x</b>", "<svg/onload=1>"])
def test_a_command_that_is_markup_shows_as_text(driver, server, connect, comm):
    open_page(driver, server)
    connect(comm, ok=1, refused=1)
    for where in ("#tail-table td.command", "#error-table td.command", "#top-command td.key"):
        wait_for_text(driver, TOPS_S, where, comm)
    driver.execute_script(
        "[...document.querySelectorAll('#tail-table tbody tr')]"
        ".find((r) => r.querySelector('td.command').textContent === arguments[0]).click()", comm)
    assert comm in texts(driver, "#detail-fields td")
    made = driver.execute_script(
        "return document.querySelectorAll('main b, main svg:not(#chart), main img').length")
    assert made == 0
    assert driver.execute_script("return window.__netmon_test") == {"csp": [], "errors": []}
    assert console_errors(driver) == []


def test_a_token_protected_server_asks_for_the_token(driver, module_cgroup, connect, tmp_path):
    token = secrets.token_hex(16)
    token_file = tmp_path / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    proc, port, _ = start_netmon("--backend", "syscall", "--cgroup", module_cgroup,
                                 "--auth-token-file", str(token_file))
    try:
        url = f"http://127.0.0.1:{port}"
        driver.get(url)
        wait(driver, 10, "return !document.getElementById('login').hidden")
        assert driver.find_element("id", "main").get_attribute("hidden") is not None
        assert "bearer token" in driver.find_element("id", "login-message").text
        network(driver)
        driver.find_element("id", "token").send_keys(token + "\n")
        wait(driver, 10, "return document.getElementById('stream-state').textContent === 'live'")
        assert driver.find_element("id", "login").get_attribute("hidden") is not None
        connect("nm-token-ok")
        wait_for_text(driver, LIVE_S, "#tail-table td.command", "nm-token-ok")
        assert driver.execute_script("return sessionStorage.getItem('netmon.token')") == token
        requests, _ = network(driver)
        api = [r for r in requests if "/api/" in r["url"]]
        assert api and all(token not in r["url"] for r in requests)
        assert all(r["headers"].get("Authorization") == f"Bearer {token}" for r in api)
        driver.refresh()  # kept for the tab: no prompt again
        wait(driver, 10, "return document.getElementById('stream-state').textContent === 'live'")
        driver.execute_script("sessionStorage.clear()")
    finally:
        stop(proc)
        driver.get_log("browser")  # the 401s that made the prompt appear


def test_screenshot(driver, server, connect, tmp_path):
    """A picture of the page with some traffic, for a person to look at (and the README)."""
    open_page(driver, server)
    for i in range(3):
        connect("api-gateway", ok=6 + 2 * i, refused=i)
        connect("db-pool", ok=3)
        connect("metrics-agent", ok=1, missing=2)
        time.sleep(1)
    connect("curl", ok=2, refused=1)
    wait_for_text(driver, TOPS_S, "#top-command td.key", "curl")
    time.sleep(1)
    path = tmp_path / "page.png"
    assert driver.save_screenshot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20000
    keep = os.environ.get("NETMON_SCREENSHOTS")
    if keep:
        os.makedirs(keep, exist_ok=True)
        shutil.copy(path, os.path.join(keep, "page.png"))

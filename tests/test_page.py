"""The live page's HTTP side, in process (no root, no browser): GET / negotiates on Accept,
the page's files carry a strict CSP and nosniff, need no token but pass the Host check,
and hold nothing that could run markup from the host or fetch from the internet."""
import json
import re

import pytest
from test_security import TOKEN, call

from netmon.testing import record, synthetic_monitor
from netmon.web import make_app, page
from netmon.web.guard import Guard

BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"


@pytest.fixture
def app():
    m = synthetic_monitor(64)
    m.inject(record(pid=7))
    return make_app(m)


@pytest.mark.parametrize("accept, html", [
    (BROWSER, True), ("text/html", True), ("TEXT/HTML", True),
    ("application/json;q=0.5, text/*", True), ("text/html, application/json;q=0.9", True),
    ("", False), ("*/*", False), ("application/json", False), ("text/html;q=0", False),
    ("text/html, application/json", False), ("text/html;q=0.5, application/json", False),
    ("application/json, text/html;q=0.9", False), ("text/*, application/*", False),
    ("text/html;q=bogus, application/json;q=0.9", True), ("image/png", False),
])
def test_accept_negotiation(accept, html):
    assert page.prefers_html(accept) is html


def test_index_json_unchanged_for_every_client_that_does_not_prefer_html(app):
    answers = [call(app, "/", headers=h) for h in (
        None, {"Accept": "*/*"}, {"Accept": "application/json"},
        {"Accept": "text/html;q=0.5, application/json"})]
    first = answers[0]
    assert first[0] == 200 and first[1]["Content-Type"] == "application/json"
    assert all(a[2] == first[2] for a in answers)  # byte-identical
    body = json.loads(first[2])
    assert not any("/ui/" in e for e in body["endpoints"])  # the page's files are no endpoint
    assert first[1]["Vary"] == "Accept"


def assert_page_headers(head):
    csp = dict(d.strip().split(" ", 1) for d in head["Content-Security-Policy"].split(";"))
    assert csp["default-src"] == "'none'"
    assert csp["script-src"] == "'self'" and csp["connect-src"] == "'self'"
    assert csp["style-src"] == "'self'"
    assert "unsafe" not in head["Content-Security-Policy"]
    assert head["X-Content-Type-Options"] == "nosniff"


def test_browser_gets_the_page(app):
    status, head, body = call(app, "/", headers={"Accept": BROWSER})
    assert status == 200 and head["Content-Type"] == "text/html; charset=utf-8"
    assert head["Vary"] == "Accept"
    assert_page_headers(head)
    assert body == (page.STATIC / "index.html").read_bytes()
    status, _, head_body = call(app, "/", method="HEAD", headers={"Accept": BROWSER})
    assert status == 200 and head_body == b""


@pytest.mark.parametrize("name, content_type", [
    ("app.js", "text/javascript; charset=utf-8"), ("api.js", "text/javascript; charset=utf-8"),
    ("chart.js", "text/javascript; charset=utf-8"), ("events.js", "text/javascript; charset=utf-8"),
    ("style.css", "text/css; charset=utf-8"), ("favicon.svg", "image/svg+xml"),
])
def test_page_files(app, name, content_type):
    status, head, body = call(app, "/ui/" + name)
    assert status == 200 and head["Content-Type"] == content_type
    assert_page_headers(head)
    assert body == (page.STATIC / name).read_bytes()
    etag = next(v for k, v in head.items() if k.lower() == "etag")
    again = call(app, "/ui/" + name, headers={"If-None-Match": etag})
    assert again[0] == 304 and again[2] == b""


@pytest.mark.parametrize("path", ["/ui/index.html", "/ui/nothing.js", "/ui/", "/ui/../page.py",
                                  "/ui/%2e%2e/page.py", "/ui/static/app.js"])
def test_no_other_file_is_served(app, path):
    status, head, body = call(app, path)
    assert status == 404 and head["Content-Type"] == "application/json"


def test_page_needs_no_token_but_data_does(app):
    guard = Guard(app, token=TOKEN, check_host=True)
    assert call(guard, "/", headers={"Accept": BROWSER})[0] == 200
    assert call(guard, "/ui/app.js")[0] == 200
    assert call(guard, "/")[0] == 401  # the JSON list, as before
    for path in ("/api/events", "/api/events/stream", "/api/top", "/api/stats", "/metrics"):
        assert call(guard, path, headers={"Accept": BROWSER})[0] == 401
    assert call(guard, "/", method="POST", headers={"Accept": BROWSER})[0] == 401
    auth = {"Authorization": "Bearer " + TOKEN}
    assert call(guard, "/api/stats", headers=auth)[0] == 200


def test_host_check_covers_the_page(app):
    guard = Guard(app, token=TOKEN, check_host=True)
    for path in ("/", "/ui/app.js"):
        status, _, body = call(guard, path, headers={"Accept": BROWSER, "Host": "evil.example"})
        assert status == 403 and "DNS rebinding" in json.loads(body)["message"]


def static_text(suffix):
    return {p.name: p.read_text() for p in page.STATIC.iterdir() if p.suffix == suffix}


def test_scripts_never_parse_markup():
    """Strings from the host reach the DOM as text only: no API that parses HTML."""
    scripts = static_text(".js")
    assert {"app.js", "api.js", "chart.js", "events.js"} <= set(scripts)
    for name, text in scripts.items():
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                     "new Function", "setTimeout(\"", "DOMParser", "createContextualFragment"):
            assert sink not in text, f"{name} uses {sink}"


def test_html_has_no_inline_script_or_style():
    html = static_text(".html")["index.html"]
    scripts = re.findall(r"<script\b[^>]*>(.*?)</script>", html, re.S)
    assert scripts and all(not s.strip() for s in scripts)
    assert re.findall(r"<script\b[^>]*>", html) == ['<script type="module" src="/ui/app.js">']
    assert not re.search(r"<style\b|\sstyle=|\son[a-z]+=|javascript:", html, re.I)


def test_nothing_comes_from_the_internet():
    for suffix in (".html", ".js", ".css", ".svg"):
        for name, text in static_text(suffix).items():
            urls = re.findall(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}[^\s\"')]*", text, re.I)
            assert all(u.startswith("http://www.w3.org/") for u in urls), (name, urls)

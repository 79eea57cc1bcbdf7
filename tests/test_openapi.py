"""GET /openapi.json: a valid OpenAPI 3.1 document naming every route, and a property test
(schemathesis, in-process WSGI) that calls every operation with generated input and finds
no 5xx and no answer the document does not describe. Deterministic: derandomized, bounded."""
import threading

import schemathesis
from helpers import Healthy, call
from hypothesis import HealthCheck, settings
from openapi_spec_validator import validate
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from netmon.testing import record, synthetic_monitor
from netmon.web import make_app
from netmon.web.guard import Guard
from netmon.web.openapi import SPEC


def populated_app():
    mon = synthetic_monitor(64)
    for i in range(80):  # wrapped: evicted events too
        mon.inject(record(pid=i % 5, comm=["curl", "wget", "ssh"][i % 3], ret=[0, -111, -2][i % 3],
                          ip=None if i % 7 == 0 else "::1" if i % 4 == 0 else f"10.0.0.{i}",
                          path="/run/x.sock" if i % 7 == 0 else None, port=i,
                          sock_type=2 if i % 5 == 0 else 1, kind=2 if i % 11 == 0 else 1,
                          flags=0x4 if i % 13 == 0 else 0))
    stopped = threading.Event()
    stopped.set()  # event streams end after their first message instead of running on
    return make_app(Healthy(mon), server_stats=lambda: {"auth_failures": 0}, shutdown=stopped)


APP = populated_app()


def test_document_is_valid_openapi_31():
    validate(SPEC)
    assert SPEC["openapi"].startswith("3.1")


def test_document_is_served_and_covers_every_route():
    reply = call(APP, "GET", "/openapi.json")
    assert reply.status == 200 and reply.body == SPEC
    routes = {(r.method.lower(), r.rule) for r in APP.api_routes()}  # not the page's files
    documented = {(m, p) for p, ops in SPEC["paths"].items() for m in ops}
    assert documented == routes


schema = schemathesis.openapi.from_wsgi("/openapi.json", APP)
CHECKS = (content_type_conformance, response_headers_conformance, response_schema_conformance,
          status_code_conformance)


@schema.parametrize()
@settings(max_examples=40, derandomize=True, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_every_operation_with_generated_input(case):
    response = case.call()
    assert response.status_code < 500, response.text
    case.validate_response(response, checks=CHECKS)


# The same run with access control on: every answer still has a documented
# status and shape, and the token is required (a call without it is a 401).
TOKEN = "fuzz-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
GUARDED = Guard(APP, token=TOKEN, check_host=True)
guarded_schema = schemathesis.openapi.from_wsgi("/openapi.json", GUARDED, headers=AUTH)


@guarded_schema.parametrize()
@settings(max_examples=15, derandomize=True, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_every_operation_with_auth_on(case):
    response = case.call(headers=AUTH)
    assert response.status_code < 500, response.text
    case.validate_response(response, checks=CHECKS)
    if case.path != "/health":
        assert case.call().status_code == 401

"""GET /openapi.json: the OpenAPI 3.1 description of netmon's HTTP API.
tests/test_openapi.py validates it and drives the app with inputs generated from it."""
from __future__ import annotations

from .. import __version__
from ..filters import FAMILY_NAMES, FILTER_NAMES
from ..monitor import TOP_BY
from .base import App
from .limits import (
    MAX_ANSWER_EVENTS,
    MAX_BODY_BYTES,
    MAX_DURATION,
    MAX_EVENTS_LIMIT,
    MAX_LIMIT,
    MAX_PID,
    MAX_STREAMS,
)


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _null(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


def _obj(required: tuple, **props) -> dict:
    return {"type": "object", "required": list(required), "properties": props}


def _json(schema: dict, description: str, **extra) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}},
            **extra}


def _param(name: str, description: str, schema: dict, where: str = "query") -> dict:
    return {"name": name, "in": where, "description": description, "schema": schema}


def _params(*names: str) -> list:
    return [{"$ref": f"#/components/parameters/{n}"} for n in names]


INT = {"type": "integer", "minimum": 0}
STR = {"type": "string"}
TIME = {"type": "string", "format": "date-time"}
ERROR = _json(_ref("Error"), "the parameter or body is invalid; the message names it")
CHUNKED = _json(_ref("Error"), "a body sent with Transfer-Encoding")

EVENT = _obj(
    ("seq", "timestamp", "pid", "tid", "uid", "command", "destination", "address_family",
     "protocol", "return_code", "error", "kind", "backend"),
    seq={**INT, "description": "1, 2, ... in capture order; the cursor for after= and "
                               "Last-Event-ID"},
    timestamp={**TIME, "description": "UTC, RFC 3339 with microseconds"}, wall_time=TIME,
    pid=_null({**INT, "description": "accept: the process that called listen(); null if "
                                    "unknown"}),
    tid=_null(INT), uid=_null(INT), cgroup_id=_null(INT), net_ns=_null(INT),
    command=_null({**STR, "description": "the calling thread's comm (accept: the "
                                         "listener's)"}),
    destination=_null({**STR, "description": "1.2.3.4:80, [::1]:443, /path or @abstract"}),
    destination_ip=_null(STR), destination_port=_null(INT), service=_null(STR),
    source_ip=_null({**STR, "description": "connect: the local address the kernel chose; "
                                           "accept: the remote client's"}),
    source_port=_null({"type": "integer", "minimum": 1, "maximum": 65535,
                       "description": "connect: the local port; accept: the client's"}),
    address_family={"type": "integer", "description": "AF_* as the caller gave it"},
    protocol=_null({**STR, "description": "TCP, UDP, UNIX, ..."}), socket_type=_null(STR),
    return_code=_null({"type": "integer", "description": "what connect() returned: 0 or "
                       "-errno (-115, EINPROGRESS, for a non-blocking TCP connect); null where "
                       "the backend cannot know (cgroup: unix, UDP; TCP until its handshake "
                       "ends if the socket blocks)"}),
    error=_null({**STR, "description": "the errno name of the failure, whether connect() "
                                       "or the handshake reported it; EINPROGRESS only while "
                                       "the handshake is pending; null if nothing failed"}),
    truncated={"type": "boolean"}, kind={"enum": ["connect", "udp_send", "accept"]},
    backend={"enum": ["syscall", "cgroup"]},
    outcome=_null({**STR, "description": "TCP: pending, established, refused, timeout, reset, "
                                         "unreachable, aborted, failed; unknown where the "
                                         "backend cannot know"}),
    latency_us=_null(INT), packets=_null(INT),
    destination_name=_null({**STR, "description": "the name the process asked DNS for, "
                            "when netmon (--dns-names) saw the answer that gave this IP in "
                            "this network namespace; null otherwise (never reverse DNS)"}),
    destination_cname_chain=_null({"type": "array", "items": STR, "description":
                                   "the CNAMEs the answer went through, in order; null "
                                   "when it had none"}),
    cgroup=_null({**STR, "description": "cgroup v2 path from the cgroup2 root; null if the "
                                        "cgroup was gone before netmon saw it"}),
    unit=_null({**STR, "description": "systemd unit (nginx.service, session-3.scope)"}),
    container_runtime=_null({"enum": ["docker", "containerd", "cri-o", "podman"]}),
    container_id=_null(STR), container_name=_null(STR),
    pod_uid=_null(STR), pod_qos=_null({"enum": ["guaranteed", "burstable", "besteffort"]}),
    pod_name=_null(STR), pod_namespace=_null(STR),
    ppid=_null({**INT, "description": "parent pid when netmon first saw the process"}),
    exe=_null({**STR, "description": "the executable's path; null if the process exited "
                                     "before netmon saw it"}))

FILTER_SCHEMA = {"type": "object", "description": "the filters as understood: names "
                 "normalised, times absolute, networks canonical",
                 "required": ["kind"], "properties": {
                     "kind": {"enum": ["connect", "udp_send", "accept", "all"]},
                     "pid": INT, "command": STR, "family": STR, "protocol": STR, "port": INT,
                     "dest": STR, "result": STR, "src": STR, "sport": INT, "since": STR,
                     "until": STR, "after": INT, "name": STR, "limit": INT,
                     "unit": STR, "container": STR, "pod": STR, "namespace": STR,
                     "cgroup": STR, "ppid": INT, "exe": STR}}

STATS = _obj(
    ("captured", "delivered", "dropped", "dropped_total", "evicted", "size", "capacity",
     "last_seq", "oldest_timestamp", "poll_lag_seconds", "programs", "uptime_seconds",
     "backend", "capabilities", "missing_hooks", "outcomes_lost", "connect_attempts", "http",
     "handshakes_in_flight", "follow_holds", "inbound", "listeners_untracked"),
    captured={**INT, "description": "delivered + dropped_total"}, delivered=INT,
    dropped={"type": "object", "additionalProperties": INT,
             "description": "records the kernel could not deliver, by reason"},
    dropped_total=INT, evicted={**INT, "description": "overwritten in the full store"},
    malformed=INT, size=INT, capacity=INT, last_seq=INT, oldest_timestamp=_null(TIME),
    poll_lag_seconds=_null({"type": "number"}), attached={"type": "boolean"},
    backend=STR, udp_sends={"type": "boolean"}, bpf_stats_enabled={"type": "boolean"},
    dns={"type": "object", "required": ["enabled"], "description": "destination names "
         "(--dns-names): payloads from port 53 the kernel passed (packets), responses "
         "parsed, addresses learned (answers), (net_ns, IP) keys cached (names_cached), "
         "evictions from the full cache, parse_failures, truncated (too long to copy), "
         "dropped (the kernel's DNS ring was full), tcp_gaps (partial TCP answers dropped at "
         "a lost segment), tcp_streams_evicted",
         "properties": {"enabled": {"type": "boolean"}},
         "additionalProperties": INT},
    programs={"type": "object", "additionalProperties": _obj(
        ("id", "run_cnt", "run_time_ns"), id=INT, run_cnt=_null(INT), run_time_ns=_null(INT)),
        "description": "run counts are null while sysctl kernel.bpf_stats_enabled is 0"},
    missing_hooks={"type": "array", "items": STR},
    capabilities={"type": "array", "items": STR},
    outcomes_lost={"type": "object", "additionalProperties": INT},
    inbound={**_obj(("accepted", "closed_port", "listen_drops"), accepted=INT,
                    closed_port=INT, listen_drops=INT),
             "description": "inbound TCP handshakes: accepted (accept events ever captured) "
                            "and, counted not stored, those that never completed: "
                            "closed_port (SYNs answered with RST: no socket for the port), "
                            "listen_drops (dropped by a full accept or SYN queue in netmon's "
                            "network namespace, since start)"},
    listeners_untracked={**INT, "description": "listen() calls the owner map had no room "
                                               "for: their accepts carry no process"},
    uptime_seconds={"type": "number"},
    handshakes_in_flight={**INT, "description": "TCP attempts waiting for their handshake's "
                          "outcome: counted in connect_attempts once it arrives"},
    follow_holds=_obj(("held", "expired"), held=INT, expired=INT),
    connect_attempts={"type": "array", "description": "every attempt ever captured (not only "
                      "those still held), by what happened to it: ok, the failure's errno "
                      "name, unknown, pending (its outcome could no longer be joined)",
                      "items": _obj(("family", "protocol", "result", "count"), family=STR,
                                    protocol=STR, result=STR, count=INT)},
    http={"type": "object", "description": "the HTTP layer's counters"},
    otlp={**_obj(("sent", "retries", "dropped", "queued", "endpoint"), sent=INT, retries=INT,
                 dropped={"type": "object", "additionalProperties": INT,
                          "description": "events never sent: queue_full, evicted, rejected"},
                 queued=INT, endpoint=STR),
          "description": "present while the OTLP event exporter runs"},
    identity={"type": "object", "description": "who-connected caches: cgroups and "
              "processes held, and what they could not keep or find (evicted, not found, "
              "records overwritten before a sweep named them)", "additionalProperties": INT})

TOP_ENTRY = _obj(("count", "failed", "last_seen"), count=INT, failed=INT, last_seen=TIME,
                 destination=_null(STR), command=_null(STR), pid=_null(INT), port=_null(INT),
                 source_ip=_null(STR),
                 service=_null(STR), error=_null(STR), return_code=_null({"type": "integer"}),
                 name=_null({**STR, "description": "by=name: the destination name; null "
                                                   "groups the events without one"}),
                 cgroup_id=_null(INT), cgroup=_null(STR), unit=_null(STR),
                 container_runtime=_null(STR), container_id=_null(STR),
                 container_name=_null(STR), pod_uid=_null(STR), pod_name=_null(STR),
                 pod_namespace=_null(STR), pod_qos=_null(STR), exe=_null(STR))

HEALTH = _obj(("status", "service", "version", "uptime_seconds", "events_captured",
               "events_dropped", "events_evicted", "backend"),
              status={"enum": ["healthy", "unhealthy"]}, service=STR, version=STR,
              uptime_seconds={"type": "number"}, events_captured=INT, events_dropped=INT,
              events_evicted=INT, backend={"enum": ["syscall", "cgroup", "auto"]}, reason=STR,
              missing_hooks={"type": "array", "items": STR})

PARAMETERS = {
    "pid": _param("pid", "only this process (tgid)", {"type": "integer", "minimum": 0,
                                                      "maximum": MAX_PID}),
    "command": _param("command", "only this command (comm, exact)",
                      {"type": "string", "minLength": 1, "maxLength": 15}),
    "family": _param("family", "address family", {"enum": sorted(FAMILY_NAMES)}),
    "protocol": _param("protocol", "tcp, udp, ...", {"type": "string"}),
    "port": _param("port", "destination port", {"type": "integer", "minimum": 0,
                                                "maximum": 65535}),
    "dest": _param("dest", "an IP, a CIDR (10.0.0.0/8, ::1/128) or a unix path prefix "
                   "(/run/, @abstract)", {"type": "string"}),
    "result": _param("result", "what happened to the attempt: ok (connected), error "
                     "(failed), pending (handshake under way), unknown (the backend cannot "
                     "tell), or the errno name of the failure like ECONNREFUSED",
                     {"type": "string"}),
    "kind": _param("kind", "connect (default), udp_send, accept (TCP connections a "
                   "listener on this host completed) or all",
                   {"enum": ["connect", "udp_send", "accept", "all"]}),
    "src": _param("src", "source IP or CIDR (a connect's local address, an accept's "
                  "client); only events whose source is known match", {"type": "string"}),
    "sport": _param("sport", "source port (a connect's local port, an accept's client "
                    "port)", {"type": "integer", "minimum": 1, "maximum": 65535}),
    "unit": _param("unit", "only this systemd unit (nginx.service); an unknown one matches "
                   "nothing", STR),
    "container": _param("container", "only this container: an id prefix or its name", STR),
    "pod": _param("pod", "only this Kubernetes pod: its name or uid", STR),
    "namespace": _param("namespace", "only pods in this Kubernetes namespace", STR),
    "cgroup": _param("cgroup", "only cgroups at or under this path from the cgroup2 root "
                     "(/system.slice)", {"type": "string", "pattern": "^/"}),
    "ppid": _param("ppid", "only processes whose parent is this pid",
                   {"type": "integer", "minimum": 0, "maximum": MAX_PID}),
    "exe": _param("exe", "only this executable: a path (/usr/bin/curl) or a file name", STR),
    "since": _param("since", "RFC 3339 instant, or an age like 300s, 5m, 2h", STR),
    "until": _param("until", "RFC 3339 instant, or an age like 300s, 5m, 2h", STR),
    "name": _param("name", "a destination name (api.example.com), or *.example.com for any "
                   "name below it; matches the name asked for or a CNAME on its chain. Needs "
                   "--dns-names (else 400)", {"type": "string", "minLength": 1,
                                              "maxLength": 255}),
    "after": _param("after", "a cursor: only events with a larger seq (next_after, an "
                    "event's seq)", {"type": "integer", "minimum": 0,
                                     "maximum": 2**63 - 1}),
}

SPEC = {
    "openapi": "3.1.0",
    "info": {"title": "netmon", "version": __version__,
             "description": "Watches every connect() on this host with eBPF. Every answer is "
                            "JSON unless stated, errors included: {error, message}. Unknown "
                            "query parameters are a 400."},
    "components": {
        "schemas": {
            "Error": {**_obj(("error", "message"), error={**STR, "description": "the HTTP "
                                                          "reason phrase"}, message=STR),
                      "additionalProperties": False},
            "Event": EVENT, "Stats": STATS, "Health": HEALTH, "TopEntry": TOP_ENTRY,
        },
        "parameters": PARAMETERS,
    },
    "paths": {
        "/": {"get": {"summary": "The endpoints", "operationId": "index", "responses": {
            "200": {"description": "service name, version and one line per endpoint; the "
                                   "live page when Accept ranks text/html above JSON",
                    "content": {
                        "application/json": {"schema": _obj(
                            ("service", "version", "endpoints"), service=STR, version=STR,
                            description=STR, endpoints={"type": "object",
                                                        "additionalProperties": STR})},
                        "text/html": {"schema": STR}}}}}},
        "/health": {"get": {"summary": "Liveness", "operationId": "health", "responses": {
            "200": _json(_ref("Health"), "capturing"),
            "503": _json(_ref("Health"), "not capturing; reason says why")}}},
        "/api/connection-summary": {"post": {
            "summary": "Count one pid's or command's connect() attempts over the last "
                       "duration seconds", "operationId": "connectionSummary",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["duration"], "properties": {
                    "pid": {"type": "integer", "minimum": 1, "maximum": MAX_PID},
                    "command": {"type": "string", "minLength": 1, "maxLength": 15},
                    "duration": {"type": "integer", "minimum": 1, "maximum": MAX_DURATION}},
                "description": "exactly one of pid and command"}}}},
            "responses": {
                "200": _json(_obj(("total_attempts", "pid", "command", "duration", "message"),
                                  total_attempts=INT, pid=_null(INT), command=_null(STR),
                                  duration=INT, message=STR), "the count"),
                "400": ERROR,
                "411": CHUNKED,
                "413": _json(_ref("Error"), f"a body over {MAX_BODY_BYTES // 1024} KiB")}}},
        "/api/list-connections": {
            method: {"summary": "Each process's most recent limit connect() attempts",
                     "operationId": f"listConnections{method.title()}",
                     **({"parameters": [
                         PARAMETERS["pid"],
                         _param("limit", "events per pid (default 100)",
                                {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT})]}
                        if method == "get" else {"requestBody": {"content": {
                            "application/json": {"schema": {"type": "object", "properties": {
                                "pid": {"type": "integer", "minimum": 1},
                                "limit": {"type": "integer", "minimum": 1,
                                          "maximum": MAX_LIMIT}}}}}}}),
                     "responses": {
                         "200": _json(_obj(("total_pids", "connections", "truncated",
                                            "message"), total_pids=INT,
                                           connections={"type": "object",
                                                        "additionalProperties": {
                                                            "type": "array",
                                                            "items": _ref("Event")}},
                                           truncated={"type": "boolean"}, message=STR),
                                      "events by pid, oldest first; at most "
                                      f"{MAX_ANSWER_EVENTS} in all, the newest (truncated "
                                      "then says some were left out)"),
                         "400": ERROR, "411": CHUNKED,
                         "413": _json(_ref("Error"), f"a body over {MAX_BODY_BYTES // 1024} KiB")}}
            for method in ("get", "post")},
        "/api/events": {"get": {
            "summary": "Events matching every given filter, newest last",
            "description": "Without after: the newest limit matches. With after: the oldest "
                           "limit matches after that seq, so next_after pages on without "
                           "repeating or skipping an event still held.",
            "operationId": "events",
            "parameters": _params(*FILTER_NAMES, "since", "until", "after") + [
                _param("limit", "at most this many (default 100)",
                       {"type": "integer", "minimum": 1, "maximum": MAX_EVENTS_LIMIT})],
            "responses": {
                "200": _json(_obj(("events", "count", "matched", "next_after", "truncated",
                                   "filters"),
                                  events={"type": "array", "items": _ref("Event")},
                                  count=INT, matched={**INT, "description": "all matches"},
                                  next_after={**INT, "description": "pass as after= for "
                                              "the next page"},
                                  truncated={"type": "boolean"}, filters=FILTER_SCHEMA),
                             "a page of events"),
                "400": ERROR}}},
        "/api/events/stream": {"get": {
            "summary": "Server-Sent Events: matching events as they happen",
            "description": "One message per event: 'event: <kind>', 'id: <seq>', 'data: "
                           "<Event JSON>'. Resumes after Last-Event-ID (or after=); without "
                           "either, starts now. 'event: gap' with data {missed, first_seq, "
                           "last_seq} when events were overwritten before they could be "
                           "sent. ': keepalive' after 15 s without a message. Ends when "
                           "the server stops.",
            "operationId": "eventStream",
            "parameters": _params(*FILTER_NAMES, "since", "until", "after") + [
                _param("Last-Event-ID", "resume after this seq", {
                    "type": "string", "pattern": "^[0-9]{1,18}$"}, where="header")],
            "responses": {
                "200": {"description": "the stream",
                        "content": {"text/event-stream": {"schema": STR}}},
                "400": ERROR,
                "429": _json(_ref("Error"), f"{MAX_STREAMS} streams are open already",
                             headers={"Retry-After": {"description": "seconds",
                                                      "schema": {"type": "integer"}}})}}},
        "/api/top": {"get": {
            "summary": "The top talkers of the last duration seconds",
            "operationId": "top",
            "parameters": _params(*FILTER_NAMES) + [
                _param("by", "what to group by (default destination); error groups failed "
                       "attempts only; service (port + command) and client (source "
                       "address) are for kind=accept; name (needs --dns-names) groups "
                       "by destination name; cgroup, unit, container, pod, namespace and "
                       "exe group by who connected", {"enum": list(TOP_BY)}),
                _param("duration", "seconds back (default 60)",
                       {"type": "integer", "minimum": 1, "maximum": MAX_DURATION}),
                _param("limit", "groups (default 10)",
                       {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT})],
            "responses": {
                "200": _json(_obj(("by", "duration", "limit", "top", "groups", "matched",
                                   "filters"),
                                  by=STR, duration=INT, limit=INT,
                                  top={"type": "array", "items": _ref("TopEntry"),
                                       "description": "largest first; each entry carries "
                                       "its key (destination, command, pid and command, "
                                       "port and service, error and return_code, port and "
                                       "command and service, source_ip, name, cgroup_id "
                                       "and cgroup, unit, the container's runtime, id and "
                                       "names, the pod's uid, name, namespace and QoS "
                                       "class, pod_namespace, or exe); null is the group "
                                       "of events without one"},
                                  groups=INT, matched=INT, filters=FILTER_SCHEMA),
                             "the largest groups"),
                "400": ERROR}}},
        "/api/stats": {"get": {"summary": "Capture counters and state", "operationId": "stats",
                               "responses": {"200": _json(_ref("Stats"), "counters")}}},
        "/metrics": {"get": {
            "summary": "Prometheus metrics", "operationId": "metrics",
            "description": "netmon_connect_attempts_total{family,protocol,result}, "
                           "netmon_connect_attempts_in_flight, "
                           "netmon_events_{captured,delivered,evicted}_total, "
                           "netmon_events_dropped_total{reason}, netmon_outcomes_lost_total"
                           "{reason}, netmon_store_events, netmon_store_capacity, "
                           "netmon_poll_lag_seconds, netmon_build_info{version,"
                           "libbpf_version,backend}, netmon_http_auth_failures_total, "
                           "netmon_http_{host_rejected,connections_refused,answers_cut}_total, "
                           "netmon_tcp_accepts_total{result}: accepted, closed_port, "
                           "listen_drops; with "
                           "--dns-names netmon_dns_{packets,responses,answers,evictions,"
                           "parse_failures,truncated,dropped,tcp_gaps}_total, "
                           "netmon_dns_names_cached",
            "responses": {"200": {"description": "text format 0.0.4",
                                  "content": {"text/plain": {"schema": STR}}}}}},
        "/openapi.json": {"get": {"summary": "This document", "operationId": "openapi",
                                  "responses": {"200": _json({"type": "object"},
                                                             "OpenAPI 3.1")}}},
    },
}


def routes(app: App) -> None:
    @app.get("/openapi.json")
    def openapi_document():
        """This API, described in OpenAPI 3.1."""
        return SPEC

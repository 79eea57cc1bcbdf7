"""Filters compiled once (netmon.filters.compile_filter) and handed to Monitor's queries as
where=: the same answers as the keyword form. Synthetic records, no root."""
import datetime as dt

import pytest

from netmon.filters import FilterError, compile_filter, int_in
from netmon.testing import record, synthetic_monitor


@pytest.fixture(scope="module")
def mon():
    m = synthetic_monitor(64)
    m.inject(record(pid=1, comm="curl", ip="10.0.0.1", port=443, age=30))
    m.inject(record(pid=2, comm="wget", ip="10.0.0.2", port=80, ret=-111, age=20))
    m.inject(record(pid=3, comm="dig", ip="10.0.0.3", port=53, sock_type=2, kind=2,
                    packets=2, age=10))
    m.inject(record(pid=1, comm="curl", ip="::1", port=443, age=5))
    return m


@pytest.mark.parametrize("filters", [
    {}, {"pid": 1}, {"command": "wget"}, {"kind": "all"}, {"kind": None},
    {"kind": "udp_send"}, {"result": "error"}, {"dest": "10.0.0.0/8", "port": 443},
    {"since": dt.timedelta(seconds=15), "kind": "all"}, {"after_seq": 1},
])
def test_compiled_filter_answers_like_keywords(mon, filters):
    where = compile_filter(**filters)
    assert [e.seq for e in mon.events(where=where)] == [e.seq for e in mon.events(**filters)]
    assert mon.query(1, False, where)[1] == mon.query(1, False, **filters)[1]
    assert mon.count(where) == mon.count(**filters)
    assert mon.latest_per_pid(5, where)[0].keys() == mon.latest_per_pid(5, **filters)[0].keys()
    assert mon.top("pid", 5, where)[1:] == mon.top("pid", 5, **filters)[1:]
    if "after_seq" not in filters:  # follow() takes its own after_seq
        assert [e.seq for e in mon.follow(0, 0.05, where)] == \
            [e.seq for e in mon.follow(0, 0.05, **filters)]


def test_kind_all_is_every_kind(mon):
    assert mon.count(kind="all") == mon.count(kind=None) == 4
    assert mon.count() == 3  # connect attempts only, by default


def test_after_narrows_a_compiled_filter(mon):
    where = compile_filter(pid=1)
    assert [e.seq for e in mon.events(where=where.after(1))] == [4]
    assert [e.seq for e in mon.events(where=where)] == [1, 4]  # unchanged


def test_compiled_and_keywords_together_are_refused(mon):
    with pytest.raises(TypeError):
        mon.events(where=compile_filter(pid=1), pid=2)


def test_int_in_names_the_parameter_or_says_the_given_sentence():
    assert int_in("port", 80, 0, 65535) == 80
    with pytest.raises(FilterError, match=r"^port: must be an integer between 0 and 65535$"):
        int_in("port", 70000, 0, 65535)
    with pytest.raises(FilterError, match=r"^pid must be a positive integer$") as ei:
        int_in("pid", True, 1, 10, "pid must be a positive integer")
    assert ei.value.param == "pid"

"""The keydir (issue 14): rows agree with the jobs they index, the column prefilter of a list
finds exactly what status_matcher finds, and a failed read of the log is a 503 for that request
while the server keeps serving."""
import os
import shutil
import tempfile
import time

import gevent
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hq_gevent.api import TextFilter
from hq_gevent.config import Config
from hq_gevent.job import STATUSES, Job, JobSpec
from hq_gevent.keydir import Keydir
from hq_gevent.store import Store, status_matcher


def make_job(job_id, **fields):
    job = Job(job_id, fields.pop("name", "n"), fields.pop("comment", ""), "http://x/", None, None, 0)
    for key, value in fields.items():
        setattr(job, key, value)
    return job


STATE = st.fixed_dictionaries({
    "waiting": st.booleans(), "running": st.booleans(), "success": st.booleans(), "failure": st.booleans(),
    "canceled": st.booleans(), "finished_at": st.one_of(st.none(), st.integers(0, 2 ** 50)),
})


@given(states=st.lists(STATE, max_size=30))
def test_rows_give_each_job_status(states):
    keydir = Keydir()
    jobs = [make_job((i + 1) << 22, **state) for i, state in enumerate(states)]
    for i, job in enumerate(reversed(jobs)):  # out of order: rows are inserted, not appended
        keydir.put(job, i * 10, 10)
    assert list(keydir.ids) == [job.id for job in jobs]
    for pos, job in enumerate(jobs):
        assert keydir.status(pos) == (None if job.active else job.status)


@given(ids=st.lists(st.integers(1, 500), unique=True, max_size=80), doomed=st.sets(st.integers(1, 500)),
       compacting=st.booleans())
def test_remove_keeps_the_columns_aligned(ids, doomed, compacting):
    keydir = Keydir()
    if compacting:
        keydir.shadow = keydir.offsets[:]
    for job_id in ids:
        keydir.put(make_job(job_id, name=f"n{job_id}", comment=f"c{job_id}"), job_id * 7, job_id)
    freed = keydir.remove(list(doomed))
    kept = sorted(set(ids) - doomed)
    assert freed == sum(i for i in ids if i in doomed)
    assert list(keydir.ids) == kept
    assert list(keydir.offsets) == [i * 7 for i in kept] and list(keydir.lengths) == kept
    assert [keydir.name(p) for p in range(len(kept))] == [f"n{i}" for i in kept]
    assert keydir.comments == [f"c{i}" for i in kept]
    if compacting:
        assert len(keydir.shadow) == len(kept)


# --- the list prefilter against status_matcher itself, on a real store -----------------------
NAMES = ["alpha", "beta", "alphabet", "gamma-1", "x"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(jobs=[("alpha", "", "wait"), ("beta", "urgent", "ok"), ("alphabet", "", "fail")], name="alpha", term=None,
         status="waiting", reverse=False, limit=0)
@example(jobs=[("x", "", "ok"), ("beta", "later", "cancel"), ("beta", "", "fail")], name="^beta$", term="fail",
         status=None, reverse=True, limit=1)
@given(jobs=st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(["", "urgent", "later"]),
                               st.sampled_from(["wait", "ok", "fail", "cancel"])), min_size=1, max_size=40),
       name=st.one_of(st.none(), st.sampled_from(["alpha", "^beta$", "a", "nomatch", "-[0-9]"])),
       term=st.one_of(st.none(), st.sampled_from(["urgent", "fail", "succ", "alpha"])),
       status=st.one_of(st.none(), st.sampled_from(STATUSES)), reverse=st.booleans(), limit=st.integers(0, 5))
def test_prefiltered_list_equals_a_plain_walk(jobs, name, term, status, reverse, limit):
    data_dir = tempfile.mkdtemp(prefix="hq-keydir-")
    store = Store(data_dir, Config(wal_fsync="no", job_lifetime=0))
    store.load()
    store.open(gevent.get_hub().threadpool)
    try:
        for job_name, comment, fate in jobs:
            view, _ = store.push(JobSpec(job_name, comment, "http://127.0.0.1:9/", None, None, 0))
            job = store.active[int(view["id"])]
            if fate == "cancel":
                store.stop(job.id)
            elif fate != "wait":
                assert store.take(job)
                store.finish(job, job.finished(success=fate == "ok", failure=fate == "fail"))
        match = status_matcher(TextFilter(name) if name else None, TextFilter(term) if term else None, status)
        every = [store.get(i) for i in (reversed(store.ids) if reverse else store.ids)]
        expected = [job.id for job in every if match is None or match(job)]
        found, next_id = store.list_jobs(None, reverse, limit, match)
        assert [job.id for job in found] == (expected[:limit] if limit else expected)
        if limit and len(expected) >= limit:
            rest = [job.id for job in every]
            after = rest[rest.index(expected[limit - 1]) + 1:]
            assert next_id == (after[0] if after else None)
        else:
            assert next_id is None
    finally:
        store.close()
        shutil.rmtree(data_dir)


# --- a log that cannot be read: 503 for the request, the server keeps running ------------------
def test_unreadable_record_is_a_503_and_the_server_keeps_serving(make_server, worker):
    worker.respond(200, b"done")
    srv = make_server(job_lifetime=0)
    pushed = srv.push(url=worker.url + "/w", payload={"a": 1}, comment="kept")
    deadline = time.monotonic() + 15  # wait without reading it: a job once read is kept parsed
    while srv.api("GET", "/job?status=waiting")[1]["count"] or srv.api("GET", "/job?status=running")[1]["count"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    log_path = os.path.join(srv.data_dir, "jobs.jsonl")
    os.truncate(log_path, 0)  # the record the keydir points at is gone
    status, body = srv.api("GET", f"/job/{pushed['id']}")
    assert status == 503 and body["status"] == 503 and "job log" in body["error"]
    status, body = srv.api("GET", "/job?limit=10")
    assert status == 503, body
    assert srv.request("GET", "/stats").status_code == 200
    assert srv.proc.poll() is None
    assert "Reading jobs from" in srv.log()


def test_a_job_read_once_is_not_read_again(tmp_path):
    """The recent-reads cache: a page asked twice reads the log once; a changed job is read anew."""
    store = Store(str(tmp_path), Config(wal_fsync="no", job_lifetime=0))
    store.load()
    store.open(gevent.get_hub().threadpool)
    ids = [int(store.push(JobSpec("n", "", "http://127.0.0.1:9/", '{"i":%d}' % i, None, 0))[0]["id"]) for i in range(5)]
    for job_id in ids:
        job = store.active[job_id]
        assert store.take(job)
        store.finish(job, job.finished(success=True, output=f"first {job_id}"))
    first = [job.output for job in store.list_jobs()[0]]
    reads = []
    real = store.reader.read_many
    store.reader.read_many = lambda spans: (reads.append(len(spans)), real(spans))[1]
    assert [job.output for job in store.list_jobs()[0]] == first and reads == []
    store.restart(ids[2])
    job = store.active[ids[2]]
    assert store.take(job)
    store.finish(job, job.finished(failure=True, output="second"))
    assert [job.output for job in store.list_jobs()[0]][2] == "second" and reads == [1]
    store.close()

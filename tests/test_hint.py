"""The hint file (issue 14): a start-up from it shows exactly what a full replay of the log shows,
and a hint file that cannot be trusted (torn, cut, of an older log, past the log's end, altered)
is ignored with a WARN. Stores run in-process on real files under gevent, like test_units."""
import logging
import os
import shutil
import tempfile

import gevent
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hq_gevent.config import Config
from hq_gevent.job import JobSpec
from hq_gevent.store import HINT_NAME, LOG_NAME, Store

CONFIG = {"wal_fsync": "no", "job_lifetime": 0}


def start(data_dir):
    store = Store(data_dir, Config(**CONFIG))
    store.load()
    store.open(gevent.get_hub().threadpool)
    return store


def crash(store):
    """Everything written, but no hint file for it (as after SIGKILL: close() would write one)."""
    store.schedule.stop()
    gevent.killall(store._greenlets)
    store.wal.close()
    store.reader.close()


def loaded(data_dir):
    """(visible state, hint bytes used) of a store started on `data_dir` (not opened)."""
    store = Store(data_dir, Config(**CONFIG))
    store.load()
    try:
        return visible(store), store.hint_covered
    finally:
        store.reader.close()


def visible(store):
    jobs = [store.get(job_id).to_dict() for job_id in list(store.ids)]
    page, _ = store.list_jobs(limit=0)
    assert [job.to_dict() for job in page] == jobs  # the list reads the same records as get
    return {"jobs": jobs, "waiting": store.num_waiting, "stored": len(store.jobs), "live": store.live_bytes,
            "unique": sorted(store.unique.items())}


def push(store, n, key=None):
    specs = [JobSpec(f"n{i % 3}", f"comment {i}", "http://127.0.0.1:9/w", '{"i":%d}' % i, {"X-A": "b"}, 0,
                     unique_key=key) for i in range(n)]
    return [int(view["id"]) for view, _ in store.push_many(specs)]


def finish(store, job, success):
    assert store.take(job)
    outcome = job.finished(success=success, failure=not success, status_code=200 if success else 500,
                           output="out " * 50, err="" if success else "worker said no")
    store.finish(job, outcome)


OPS = st.lists(st.one_of(
    st.tuples(st.just("push"), st.integers(1, 4)),
    st.tuples(st.just("push_unique"), st.integers(0, 2)),
    st.tuples(st.just("finish"), st.integers(0, 50), st.booleans()),
    st.tuples(st.just("cancel"), st.integers(0, 50)),
    st.tuples(st.just("restart_job"), st.integers(0, 50), st.booleans()),
    st.tuples(st.just("delete"), st.integers(0, 50)),
    st.tuples(st.just("compact")),
    st.tuples(st.just("compact_while_pushing")),
    st.tuples(st.just("restart")),
    st.tuples(st.just("crash")),
), max_size=25)


def pick(jobs, index):
    return jobs[index % len(jobs)] if jobs else None


def run(store, data_dir, ops):
    for op in ops:
        active = [store.active[i] for i in sorted(store.active) if not store.active[i].running]
        done = [i for i in store.ids if i not in store.active]
        if op[0] == "push":
            push(store, op[1])
        elif op[0] == "push_unique":
            push(store, 1, key=f"k{op[1]}")
        elif op[0] == "finish" and active:
            finish(store, pick(active, op[1]), op[2])
        elif op[0] == "cancel" and active:
            store.stop(pick(active, op[1]).id)
        elif op[0] == "restart_job" and done:
            store.restart(pick(done, op[1]), copy=op[2])
        elif op[0] == "delete" and done:
            store.delete(pick(done, op[1]))
        elif op[0] == "compact":
            store.compact()
        elif op[0] == "compact_while_pushing":
            compaction = gevent.spawn(store.compact)
            push(store, 2)
            if active:
                finish(store, active[0], True)
            compaction.get()
        elif op[0] == "restart":
            store.close()
            store = start(data_dir)
        elif op[0] == "crash":
            crash(store)
            store = start(data_dir)
    return store


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, end_with_crash=st.booleans())
def test_hint_start_shows_what_a_full_replay_shows(ops, end_with_crash):
    data_dir = tempfile.mkdtemp(prefix="hq-hint-")
    try:
        store = run(start(data_dir), data_dir, ops)
        before = visible(store)
        (crash if end_with_crash else Store.close)(store)
        from_hint, covered = loaded(data_dir)
        if os.path.exists(os.path.join(data_dir, HINT_NAME)) and os.path.getsize(os.path.join(data_dir, LOG_NAME)):
            assert covered > 0, "a hint file of this log was not used"
        if not end_with_crash and before["stored"]:
            assert covered == os.path.getsize(os.path.join(data_dir, LOG_NAME))  # nothing left to replay
        os.unlink(os.path.join(data_dir, HINT_NAME)) if os.path.exists(os.path.join(data_dir, HINT_NAME)) else None
        replayed, covered = loaded(data_dir)
        assert covered == 0
        assert from_hint == replayed == before
    finally:
        shutil.rmtree(data_dir)


# --- hint files that must not be trusted ---------------------------------------------------
@pytest.fixture
def data_dir(tmp_path):
    store = start(str(tmp_path))
    ids = push(store, 30)
    for job_id in ids[:20]:
        finish(store, store.active[job_id], job_id % 2 == 0)
    store.delete(ids[0])
    store.compact()  # writes a hint file
    store.close()  # writes one for the whole log
    return str(tmp_path)


def expect_full_replay(data_dir, caplog):
    hint_path = os.path.join(data_dir, HINT_NAME)
    with caplog.at_level(logging.WARNING, logger="hq_gevent"):
        state, covered = loaded(data_dir)
    assert covered == 0
    assert any(r.levelno == logging.WARNING and f"Ignoring {hint_path}" in r.getMessage() for r in caplog.records)
    os.unlink(hint_path)
    assert loaded(data_dir) == (state, 0)
    return state


def test_a_good_hint_is_used(data_dir):
    state, covered = loaded(data_dir)
    assert covered == os.path.getsize(os.path.join(data_dir, LOG_NAME))
    assert state["stored"] == 29 and state["waiting"] == 10
    os.unlink(os.path.join(data_dir, HINT_NAME))
    assert loaded(data_dir) == (state, 0)


@pytest.mark.parametrize("cut", [1, 40, 0.5, 0.9])
def test_torn_or_truncated_hint(data_dir, caplog, cut):
    path = os.path.join(data_dir, HINT_NAME)
    size = os.path.getsize(path)
    os.truncate(path, size - cut if isinstance(cut, int) else int(size * cut))
    assert expect_full_replay(data_dir, caplog)["stored"] == 29


def test_altered_hint(data_dir, caplog):
    path = os.path.join(data_dir, HINT_NAME)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 1
    open(path, "wb").write(data)
    assert expect_full_replay(data_dir, caplog)["stored"] == 29


def test_hint_of_an_older_log_generation(data_dir, caplog):
    old_hint = open(os.path.join(data_dir, HINT_NAME), "rb").read()
    store = start(data_dir)
    for job_id in list(store.active)[:5]:
        finish(store, store.active[job_id], True)
    store.delete(next(i for i in store.ids if i not in store.active))
    store.compact()  # a new log file
    store.close()
    open(os.path.join(data_dir, HINT_NAME), "wb").write(old_hint)
    state = expect_full_replay(data_dir, caplog)
    assert state["stored"] == 28 and state["waiting"] == 5


def test_hint_pointing_past_the_end_of_the_log(data_dir, caplog):
    log_path = os.path.join(data_dir, LOG_NAME)
    data = open(log_path, "rb").read()
    cut = data.rindex(b"\n", 0, len(data) - 1) + 1  # the log loses its last whole record
    os.truncate(log_path, cut)
    expect_full_replay(data_dir, caplog)


def test_hint_of_a_replaced_log(data_dir, caplog):
    """The same bytes in another file (a copy restored from a backup): not trusted, replayed."""
    log_path = os.path.join(data_dir, LOG_NAME)
    shutil.copyfile(log_path, log_path + ".copy")
    os.rename(log_path + ".copy", log_path)
    expect_full_replay(data_dir, caplog)


def test_records_after_the_hint_are_replayed(data_dir):
    store = start(data_dir)
    assert store.hint_covered
    late = push(store, 3)
    finish(store, store.active[late[0]], True)
    before = visible(store)
    crash(store)
    state, covered = loaded(data_dir)
    assert 0 < covered < os.path.getsize(os.path.join(data_dir, LOG_NAME))
    assert state == before


def test_reads_after_compaction_come_from_the_new_log(tmp_path):
    store = start(str(tmp_path))
    ids = push(store, 10)
    for job_id in ids:
        finish(store, store.active[job_id], True)
    before = [store.get(i).to_dict() for i in ids]
    old_reader = store.reader
    store.delete(ids[0])
    store.compact()
    assert store.reader is not old_reader
    old_reader.close()  # nothing may read the old file any more
    log_path = os.path.join(str(tmp_path), LOG_NAME)
    assert os.fstat(store.reader.fd).st_ino == os.stat(log_path).st_ino
    assert [store.get(i).to_dict() for i in ids[1:]] == before[1:]
    page, _ = store.list_jobs()
    assert [job.to_dict() for job in page] == before[1:]
    assert store.get(ids[1]).output == "out " * 50 and store.get(ids[1]).payload == '{"i":1}'
    store.close()

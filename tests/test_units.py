"""Unit tests: ids, status derivation, job validation, and the WAL on a temp dir (in-process gevent)."""
import os

import gevent
import pytest

from hq_gevent import ids, wal
from hq_gevent.config import Config
from hq_gevent.invalid import Invalid
from hq_gevent.job import Job, JobSpec, fields_from_request
from hq_gevent.store import Store


# --- ids ------------------------------------------------------------------------------
def test_id_layout_matches_katsubushi():
    gen = ids.IdGenerator(server_id=5, clock=lambda: ids.EPOCH_MS + 1000)
    first = gen.next_id()
    assert first == (1000 << 22) | (5 << 12) | 0
    assert gen.next_id() == first + 1  # same millisecond: sequence + 1
    assert ids.timestamp_ms(first) == ids.EPOCH_MS + 1000
    assert ids.format_ms(ids.EPOCH_MS + 1000) == "2019-01-01T00:00:01.000Z"


def test_ids_are_monotonic_when_the_clock_steps_back():
    now = [ids.EPOCH_MS + 10_000]
    gen = ids.IdGenerator(clock=lambda: now[0])
    a = gen.next_id()
    now[0] -= 5000
    b = gen.next_id()
    now[0] += 10_000
    c = gen.next_id()
    assert a < b < c


def test_sequence_exhaustion_moves_to_the_next_millisecond():
    ticks = iter([ids.EPOCH_MS + 7] * 4097 + [ids.EPOCH_MS + 8] * 10)
    gen = ids.IdGenerator(clock=lambda: next(ticks))
    got = [gen.next_id() for _ in range(4097)]
    assert got == sorted(set(got))
    assert ids.timestamp_ms(got[-1]) == ids.EPOCH_MS + 8


def test_observe_keeps_ids_above_stored_ones():
    gen = ids.IdGenerator(clock=lambda: ids.EPOCH_MS + 5)
    stored = (100 << 22) | 7
    gen.observe(stored)
    assert gen.next_id() > stored


def test_server_id_range():
    with pytest.raises(ValueError):
        ids.IdGenerator(server_id=1024)


# --- status ---------------------------------------------------------------------------
def job():
    return Job(1 << 22, "n", "", "http://x/", None, None, 0)


@pytest.mark.parametrize("fields,status", [
    ({"running": True, "waiting": False}, "running"),
    ({"running": True, "waiting": False, "canceled": True}, "canceling"),
    ({}, "waiting"),
    ({"canceled": True}, "canceling"),
    ({"waiting": False, "failure": True, "success": True}, "failure"),
    ({"waiting": False, "success": True, "canceled": True}, "success"),
    ({"waiting": False, "canceled": True}, "canceled"),
    ({"waiting": False}, "unfinished"),
    ({"waiting": False, "finished_at": 5}, "unknown"),
])
def test_status_precedence(fields, status):
    j = job()
    for key, value in fields.items():
        setattr(j, key, value)
    assert j.status == status


def test_record_roundtrip_and_active_jobs_log_as_waiting():
    j = job()
    j.payload = '{"a":1}'
    j.headers = {"X": "y"}
    j.waiting, j.running, j.started_at = False, True, 123  # start is never logged
    back = Job.from_record(j.to_record())
    assert back.waiting and not back.running and back.started_at is None
    j.assume(j.finished(failure=True, status_code=500, output="o", err="e"))
    back = Job.from_record(j.to_record())
    assert (back.status, back.status_code, back.output, back.err, back.payload, back.headers) == \
           ("failure", 500, "o", "e", '{"a":1}', {"X": "y"})


def test_fields_from_request():
    assert fields_from_request({"url": "https://h:8443/p?q", "payload": {"b": [1]}}) == \
        ("default", "", "https://h:8443/p?q", '{"b":[1]}', None, 0)
    with pytest.raises(Invalid) as e:
        fields_from_request({"url": "http://h/", "headers": {"A": "x\ny"}})
    assert e.value.status == 422


# --- WAL ------------------------------------------------------------------------------
def open_store(tmp_path, **config):
    store = Store(str(tmp_path), Config(**config))
    store.load()
    store.open(gevent.get_hub().threadpool)
    return store


def reload(tmp_path, **config):
    store = Store(str(tmp_path), Config(**config))
    store.load()
    return store


def push(store, n, name="j"):
    return [int(store.push(JobSpec(f"{name}{i}", "", "http://x/", '{"i":%d}' % i, None, 0))[0]["id"]) for i in range(n)]


@pytest.mark.parametrize("policy", ["always", "everysec", "no"])
def test_replay_restores_every_job(tmp_path, policy):
    store = open_store(tmp_path, wal_fsync=policy)
    pushed = push(store, 50)
    store.close()
    again = reload(tmp_path)
    assert again.ids == pushed
    assert again.num_waiting == 50 and again.queue.qsize() == 50
    assert [again.jobs[i].name for i in pushed] == [f"j{i}" for i in range(50)]


def test_group_commit_shares_fsyncs(tmp_path, monkeypatch):
    calls = []
    real_fsync = os.fsync
    monkeypatch.setattr(wal.os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd)))
    store = open_store(tmp_path)
    greenlets = [gevent.spawn(push, store, 5, f"g{k}-") for k in range(40)]
    gevent.joinall(greenlets, raise_error=True)
    store.close()
    assert len(reload(tmp_path).jobs) == 200
    assert len(calls) < 100  # 200 durable appends, far fewer fsyncs


def test_torn_tail_is_truncated(tmp_path):
    store = open_store(tmp_path)
    push(store, 3)
    store.close()
    path = os.path.join(tmp_path, "jobs.jsonl")
    size = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(b'["p",1,"x"')
    assert len(reload(tmp_path).jobs) == 3
    assert os.path.getsize(path) == size


def test_only_a_partial_first_line_loads_empty(tmp_path):
    with open(os.path.join(tmp_path, "jobs.jsonl"), "wb") as f:
        f.write(b'["p",12')
    assert reload(tmp_path).jobs == {}
    assert os.path.getsize(os.path.join(tmp_path, "jobs.jsonl")) == 0


def test_corrupt_middle_line_names_file_and_line(tmp_path):
    store = open_store(tmp_path)
    push(store, 3)
    store.close()
    path = os.path.join(tmp_path, "jobs.jsonl")
    lines = open(path, "rb").read().split(b"\n")
    lines[1] = b"not json"
    open(path, "wb").write(b"\n".join(lines))
    with pytest.raises(wal.WalCorrupt, match=r"jobs\.jsonl:2"):
        reload(tmp_path)


def test_wrong_shape_record_is_corrupt(tmp_path):
    with open(os.path.join(tmp_path, "jobs.jsonl"), "wb") as f:
        f.write(b'["p",1,"x"]\n["p"]\n')
    with pytest.raises(wal.WalCorrupt, match=r":1"):
        reload(tmp_path)


def test_compaction_rewrites_to_the_live_set_and_keeps_later_writes(tmp_path):
    store = open_store(tmp_path)
    ids_ = push(store, 100)
    for job_id in ids_[:90]:
        store.cancel_waiting(store.jobs[job_id])
        store.delete(job_id)
    before = store.wal.size
    assert store.compaction_due() is False  # min bytes not reached
    store.config.wal_compact_min_bytes = 0
    assert store.compaction_due()
    compaction = gevent.spawn(store.compact)
    late = push(store, 5, "late")  # appended while the rewrite runs
    compaction.get()
    late += push(store, 2, "after")
    assert store.wal.size < before
    store.close()
    again = reload(tmp_path)
    assert again.ids == ids_[90:] + late
    assert again.wal.size == os.path.getsize(os.path.join(tmp_path, "jobs.jsonl"))
    # A job pushed during the rewrite may be both in the snapshot and in the copied tail.
    assert again.live_bytes <= again.wal.size <= again.live_bytes + 7 * again.jobs[late[0]].record_size


def test_leftover_rewrite_file_is_removed(tmp_path):
    store = open_store(tmp_path)
    push(store, 2)
    store.close()
    leftover = os.path.join(tmp_path, "jobs.jsonl.rewrite")
    with open(leftover, "wb") as f:
        f.write(b"half a rewrite")
    assert len(reload(tmp_path).jobs) == 2
    assert not os.path.exists(leftover)


def test_failed_write_changes_nothing_and_is_cut_back(tmp_path, monkeypatch):
    store = open_store(tmp_path, wal_fsync="no")
    kept = push(store, 2)
    real_write = os.write
    state = {"fail": True}

    def flaky_write(fd, data):
        if state["fail"] and fd == store.wal.fd:
            real_write(fd, bytes(data)[:7])  # a partial record reaches the file
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(wal.os, "write", flaky_write)
    with pytest.raises(wal.WalError, match="No space left"):
        push(store, 1, "lost")
    assert store.ids == kept
    state["fail"] = False
    more = push(store, 1, "ok")
    store.close()
    assert reload(tmp_path).ids == kept + more

"""Durability under faults (SPEC §9, issue 4): real SIGKILLs, real OS write errors, real files.

Each test is bounded in time and count; together they take well under five minutes.
"""
import os
import random
import resource
import threading
import time

import pytest
import requests

from hq_gevent import ids
from hq_gevent.wal import TEST_PAUSE_ENV

pytestmark = pytest.mark.slow


def log_path(srv):
    return os.path.join(srv.data_dir, "jobs.jsonl")


class Pushers:
    """`threads` clients pushing until stopped; `acked` holds the ids answered 200."""

    def __init__(self, srv, url, threads=8):
        self.acked = []
        self.errors = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(srv.url, url, i), daemon=True) for i in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self, base, url, n):
        session = requests.Session()
        i = 0
        while not self._stop.is_set():
            i += 1
            try:
                r = session.post(base + "/job", json={"url": url, "name": f"t{n}", "payload": {"i": i}}, timeout=5)
            except requests.RequestException:
                return  # the server was killed
            if r.status_code == 200:
                self.acked.append(r.json()["id"])
            else:
                self.errors.append((r.status_code, r.text))

    def stop(self):
        self._stop.set()
        for t in self._threads:
            t.join(10)


def all_ids(srv):
    status, body = srv.api("GET", "/job?limit=-1")
    assert status == 200
    return {job["id"]: job for job in body["jobs"]}


def assert_all_succeed(srv, job_ids, timeout=60):
    """Wait until nothing is waiting or running, then check every job in one listing."""
    deadline = time.monotonic() + timeout
    while True:
        stats = srv.api("GET", "/stats")[1]
        if stats["numWaitingJobs"] == 0 and stats["numRunningJobs"] == 0:
            break
        assert time.monotonic() < deadline, stats
        time.sleep(0.1)
    stored = all_ids(srv)
    bad = [stored.get(job_id) for job_id in job_ids if stored.get(job_id, {}).get("status") != "success"]
    assert not bad, f"{len(bad)} jobs did not succeed, e.g. {bad[:2]}"


@pytest.mark.parametrize("policy", ["always", "everysec"])
def test_sigkill_under_load_loses_no_acknowledged_push(make_server, worker, policy):
    """Five seeded kill moments; with everysec a process crash loses nothing either: the data
    reached the kernel before the push was answered."""
    rng = random.Random(20261201)
    srv = make_server(wal_fsync=policy, dispatchers=2, max_workers=20, access_log_file="")
    worker.hold()
    acked = set()
    rounds = 5 if policy == "always" else 2
    for _ in range(rounds):
        pushers = Pushers(srv, worker.url)
        time.sleep(rng.uniform(0.3, 2.0))
        srv.kill()
        pushers.stop()
        assert not pushers.errors
        acked.update(pushers.acked)
        srv.start()
        stored = all_ids(srv)
        missing = acked - set(stored)
        assert not missing, f"{len(missing)} acknowledged jobs lost"
    assert len(acked) > 50
    worker.release()
    assert_all_succeed(srv, acked)
    assert set(worker.job_ids()) >= acked


def make_large_log(path, jobs):
    """A log of `jobs` finished jobs, each as its create record and its result record."""
    ticks = iter(range(ids.EPOCH_MS + 10 ** 11, ids.EPOCH_MS + 2 * 10 ** 11))
    gen = ids.IdGenerator(clock=lambda: next(ticks))
    with open(path, "w") as f:
        for i in range(jobs):
            job_id = gen.next_id()
            head = f'["p",{job_id},"big{i % 10}","","http://127.0.0.1:9/","{{\\"i\\":{i}}}",null,0,'
            f.write(head + '1,null,null,0,null,"",""]\n')
            f.write(head + f'0,{ids.EPOCH_MS + 10 ** 11},{ids.EPOCH_MS + 10 ** 11 + 5},1,200,"OK",""]\n')


@pytest.mark.parametrize("step", ["written", "fsynced", "renamed"])
def test_sigkill_during_compaction_leaves_old_or_new_state(make_server, worker, step):
    srv = make_server(start=False, wal_compact_min_bytes=1000, wal_compact_ratio=1.5, access_log_file="")
    os.makedirs(srv.data_dir)
    make_large_log(log_path(srv), 100_000)  # 200k records
    original = os.path.getsize(log_path(srv))
    srv.env[TEST_PAUSE_ENV] = step
    srv.start(timeout=60)
    deadline = time.monotonic() + 60
    while f"compaction paused at step: {step}" not in srv.log():
        assert time.monotonic() < deadline, srv.log()
        time.sleep(0.1)
    during = [srv.push(url=worker.url, name="during")["id"] for _ in range(10)]
    for job_id in during:
        srv.wait_job(job_id)
    srv.kill()
    srv.env.pop(TEST_PAUSE_ENV)
    srv.config["wal_compact_min_bytes"] = 1 << 40  # no further compaction: look at what the crash left
    srv.start(timeout=60)
    stats = srv.api("GET", "/stats")[1]
    assert stats["numJobs"] == 100_010
    for job_id in during:
        assert srv.job(job_id)["status"] == "success"
    sample = srv.api("GET", "/job?name=^big3$&limit=5")[1]["jobs"]
    assert [j["status"] for j in sample] == ["success"] * 5 and sample[0]["output"] == "OK"
    assert not os.path.exists(log_path(srv) + ".rewrite")
    size = os.path.getsize(log_path(srv))
    if step == "renamed":
        assert size < 0.6 * original  # the new, compacted log
    else:
        assert size > original  # the old log, plus what was pushed meanwhile
    srv.stop()


def test_empty_log_file_loads(make_server, worker):
    srv = make_server(start=False)
    os.makedirs(srv.data_dir)
    open(log_path(srv), "wb").close()
    srv.start()
    assert srv.api("GET", "/stats")[1]["numJobs"] == 0


def test_truncated_middle_of_the_file_refuses(make_server, worker):
    srv = make_server()
    for _ in range(5):
        srv.wait_job(srv.push(url=worker.url)["id"])
    srv.stop()
    data = open(log_path(srv), "rb").read()
    cut = data.index(b"\n", len(data) // 3) - 10
    open(log_path(srv), "wb").write(data[:cut] + data[cut + 25:])  # a hole that merges two lines
    srv.start(wait=False)
    assert srv.proc.wait(20) == 1
    assert f"{log_path(srv)}:" in srv.log() and "refusing to start" in srv.log()


def test_write_errors_answer_503_harm_nothing_and_recover(make_server, worker):
    """A real EFBIG: the server's file size limit is lowered under it (prlimit), then raised."""
    srv = make_server(access_log_file="", dispatchers=1)
    kept = [srv.wait_job(srv.push(url=worker.url, name="kept")["id"]) for _ in range(3)]
    worker.hold()
    running = srv.push(url=worker.url, name="running")["id"]
    worker.wait_requests(4)
    size = os.path.getsize(log_path(srv))
    unlimited = resource.prlimit(srv.proc.pid, resource.RLIMIT_FSIZE)
    resource.prlimit(srv.proc.pid, resource.RLIMIT_FSIZE, (size, unlimited[1]))  # no byte more
    try:
        refused = 0
        for _ in range(5):
            status, body = srv.api("POST", "/job", {"url": worker.url, "payload": "x" * 200})
            if status == 503:
                refused += 1
                assert body["status"] == 503 and "File too large" in body["error"]
        assert refused >= 3
        worker.release()  # the running job's result cannot be written either
        time.sleep(0.5)
        for job in kept:
            assert srv.job(job["id"]) == job  # reads keep working, stored jobs unharmed
    finally:
        resource.prlimit(srv.proc.pid, resource.RLIMIT_FSIZE, unlimited)
    after = srv.push(url=worker.url, name="after")["id"]
    srv.wait_job(after)
    srv.restart()  # the log still loads: partial records were cut off
    for job in kept:
        assert srv.job(job["id"]) == job
    assert srv.job(after)["status"] == "success"
    # The job whose result could not be logged runs again after the restart.
    assert srv.wait_job(running)["status"] == "success"
    assert worker.job_ids().count(running) == 2


def test_sigterm_with_a_large_backlog_exits_in_time_and_loses_nothing(make_server, worker):
    srv = make_server(shutdown_timeout=2, dispatchers=2, max_workers=2, access_log_file="")
    worker.hold()
    pushers = Pushers(srv, worker.url, threads=4)
    deadline = time.monotonic() + 20
    while len(pushers.acked) < 2000 and time.monotonic() < deadline:
        time.sleep(0.1)
    pushers.stop()
    acked = set(pushers.acked)
    assert len(acked) >= 1000
    started = time.monotonic()
    assert srv.stop() == 0
    assert time.monotonic() - started < 2 + 2
    worker.release()
    srv.start()
    assert acked <= set(all_ids(srv))
    assert_all_succeed(srv, acked)

"""Several hq-gevent servers on one PostgreSQL database (SPEC §13), all real processes: servers,
a throwaway PostgreSQL cluster (tests/pgcluster.py), worker apps on 127.0.0.1, real signals."""
import collections
import re
import threading
import time

import pytest
import requests

from conftest import FINISHED


@pytest.fixture
def dsn(pg_cluster, request):
    return pg_cluster.create_database(f"multi_{request.node.name[:40].lower().replace('-', '_')}_{time.monotonic_ns()}")


@pytest.fixture
def servers(make_server, dsn):
    """start(n, **config) -> n servers with server_id 1..n on one database."""
    def start(n, first_id=1, **config):
        return [make_server(name=f"s{first_id + i}", store="postgresql", postgresql_dsn=dsn, server_id=first_id + i,
                            **config) for i in range(n)]
    return start


def running_here(srv):
    return srv.api("GET", "/stats")[1]["numWorkers"]


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout}s: {what}")


def test_every_job_is_delivered_exactly_once_across_three_servers(servers, worker):
    s = servers(3, dispatchers=2, max_workers=8)
    worker.respond(200, b"ok", delay=0.005)
    ids = []
    for i in range(300):
        ids.append(s[i % 3].push(url=worker.url, name=f"j{i}")["id"])
    worker.wait_requests(300, timeout=60)
    for job_id in ids[::10]:
        assert s[int(job_id) % 3].wait_job(job_id)["status"] == "success"
    time.sleep(0.5)  # a duplicate would arrive by now
    delivered = collections.Counter(worker.job_ids())
    assert sorted(delivered) == sorted(ids) and set(delivered.values()) == {1}
    # Any server answers for any job, and lists show every server's jobs in id order.
    listed = s[1].api("GET", "/job?limit=-1")[1]
    assert [job["id"] for job in listed["jobs"]] == sorted(ids, key=int)
    assert all(job["status"] == "success" for job in listed["jobs"])
    assert {s[k].api("GET", "/stats")[1]["numJobs"] for k in range(3)} == {300}


def test_a_push_to_a_busy_server_is_picked_up_by_an_idle_one(servers, worker):
    a, b = servers(2, dispatchers=1, max_workers=0)
    worker.hold()
    blocker = a.push(url=worker.url, name="blocker")
    a.wait_job(blocker["id"], ("running",))
    busy, idle = (a, b) if running_here(a) else (b, a)
    pickups = []
    for _ in range(5):
        before = len(worker.requests)
        pushed_at = time.monotonic()
        job = busy.push(url=worker.url, name="next")
        arrived = worker.wait_requests(before + 1, timeout=10)[before]
        assert arrived["headers"]["x-hq-job-id"] == job["id"]
        pickups.append(arrived["time"] - pushed_at)
        assert running_here(idle) == 1
        idle.api("POST", f"/job/{job['id']}/stop")
        idle.wait_job(job["id"], ("canceled",))
    # SPEC: within 100 ms (NOTIFY, no polling); generous on this shared machine.
    assert sorted(pickups)[2] < 0.3, pickups
    worker.release()


def test_a_run_at_pushed_to_a_busy_server_is_kept_by_an_idle_one(servers, worker):
    a, b = servers(2, dispatchers=1, max_workers=0)
    worker.hold()
    blocker = a.push(url=worker.url, name="blocker")
    a.wait_job(blocker["id"], ("running",))
    busy = a if running_here(a) else b
    time.sleep(1.5)  # the idle server has settled into its long sleep (nothing scheduled)
    pushed_at = time.monotonic()
    job = busy.push(url=worker.url, name="later", delay=1)
    arrived = worker.wait_requests(2, timeout=15)[1]
    assert arrived["headers"]["x-hq-job-id"] == job["id"]
    late = arrived["time"] - pushed_at - 1
    # Without the NOTIFY carrying its runAt the idle server would look again only after its 5 s sleep.
    assert -0.05 <= late < 1.5, f"started {late:+.2f}s from its runAt (SPEC: within 1 s)"
    worker.release()


def test_a_stop_sent_to_another_server_cancels_the_running_request_within_a_second(servers, worker):
    s = servers(3, dispatchers=1, max_workers=2)
    worker.hold()
    job = s[0].push(url=worker.url)
    s[0].wait_job(job["id"], ("running",))
    runner = next(srv for srv in s if running_here(srv))
    other = next(srv for srv in s if srv is not runner)
    started = time.monotonic()
    assert other.api("POST", f"/job/{job['id']}/stop") == (200, {"id": job["id"]})
    stopped = other.job(job["id"])
    took = time.monotonic() - started
    assert stopped["status"] == "canceled" and "stopped" in stopped["err"], stopped
    assert took < 2.5, f"stop took {took:.2f}s (SPEC: 1 s)"
    wait_for(lambda: running_here(runner) == 0, 5, "the runner aborted its request")
    status, body = other.api("POST", f"/job/{job['id']}/stop")
    assert (status, body["error"]) == (422, f"The job {job['id']} is not active")
    worker.release()


def test_a_server_id_held_by_a_live_server_is_refused(servers, make_server, dsn):
    (first,) = servers(1, first_id=7)
    clash = make_server(name="clash", start=False, store="postgresql", postgresql_dsn=dsn, server_id=7)
    clash.start(wait=False)
    assert clash.proc.wait(30) == 1
    assert "server_id 7 is held by another live hq-gevent server" in clash.log()
    assert first.api("GET", "/readyz")[0] == 200
    # A killed server's connection closes, and with it its hold on the id: it starts again at once.
    first.kill()
    first.start()
    assert first.api("GET", "/readyz")[0] == 200


def test_concurrent_pushes_of_one_unique_key_on_three_servers_make_one_job(servers, worker):
    s = servers(3)
    worker.hold()
    results = []

    def push(srv):
        for _ in range(5):
            r = srv.request("POST", "/job", json={"url": worker.url, "uniqueKey": "k-1"})
            results.append((r.status_code, r.json()["id"], r.headers.get("X-Hq-Duplicate")))

    threads = [threading.Thread(target=push, args=(srv,)) for srv in s for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {code for code, _, _ in results} == {200}
    assert len({job_id for _, job_id, _ in results}) == 1
    assert sum(1 for *_, dup in results if dup != "true") == 1
    assert s[2].api("GET", "/stats")[1]["numJobs"] == 1
    worker.release()


@pytest.mark.slow
def test_a_killed_servers_jobs_run_again_on_the_others_within_the_lease(servers, make_server, dsn, worker):
    lease = 5
    (a,) = servers(1, first_id=1, lease_seconds=lease, dispatchers=2, max_workers=30)
    worker.hold()
    ids = [job["id"] for job in a.api("POST", "/jobs", [{"url": worker.url, "name": f"k{i}"} for i in range(50)])[1]["jobs"]]
    worker.wait_requests(50, timeout=20)
    b, c = servers(2, first_id=2, lease_seconds=lease, dispatchers=2, max_workers=30)
    a.kill()
    killed = time.monotonic()
    worker.release()  # A's held requests answer into closed connections
    for job_id in ids:
        job = b.wait_job(job_id, FINISHED, timeout=lease + 5 + 15)
        assert job["status"] == "success", job
    took = time.monotonic() - killed
    assert took < lease + 5 + 10, f"rescued in {took:.1f}s (SPEC: lease_seconds + 5 = {lease + 5}s)"
    delivered = collections.Counter(worker.job_ids())
    assert all(delivered[job_id] >= 2 for job_id in ids), delivered  # A's attempt, then B's or C's
    assert c.api("GET", "/stats")[1]["numRunningJobs"] == 0


@pytest.mark.slow
def test_the_lifetime_sweep_runs_on_one_server_at_a_time(servers, worker):
    s = servers(3, job_lifetime=1, job_lifetime_interval=1)
    ids = [job["id"] for job in s[0].api("POST", "/jobs", [{"url": worker.url}] * 30)[1]["jobs"]]
    for job_id in ids:
        s[1].wait_job(job_id)
    started = time.monotonic()
    wait_for(lambda: s[2].api("GET", "/stats")[1]["numJobs"] == 0, 15, "expired jobs removed")
    time.sleep(3)
    elapsed = time.monotonic() - started + 3
    sweeps = [(srv.config["server_id"], int(m)) for srv in s
              for m in re.findall(r"Lifetime sweep on server_id \d+: removed (\d+) jobs", srv.log())]
    assert sum(n for _, n in sweeps) == 30
    # Three servers each trying every second would sweep ~3x a second; one at a time, ~1x.
    assert len(sweeps) <= (elapsed + 8) / 0.9, sweeps


@pytest.mark.slow
def test_postgresql_restart_under_load_503s_then_reconnects_and_keeps_every_acknowledged_push(
        servers, pg_cluster, worker):
    s = servers(2, dispatchers=2, max_workers=8)
    acknowledged, refused, slowest = [], collections.Counter(), [0.0]
    stop = threading.Event()

    def pusher(srv):
        while not stop.is_set():
            started = time.monotonic()
            try:
                r = srv.request("POST", "/job", json={"url": worker.url}, timeout=15)
                if r.status_code == 200:
                    acknowledged.append(r.json()["id"])
                else:
                    refused[r.status_code] += 1
            except requests.RequestException as e:
                refused[type(e).__name__] += 1
            slowest[0] = max(slowest[0], time.monotonic() - started)
            time.sleep(0.005)

    threads = [threading.Thread(target=pusher, args=(srv,)) for srv in s]
    for t in threads:
        t.start()
    try:
        time.sleep(1)
        pg_cluster.restart()  # cuts every connection; back within a second
        time.sleep(1)
        pg_cluster.pg_ctl_stop()  # an outage long enough to see
        time.sleep(0.5)
        during = [srv.request("POST", "/job", json={"url": worker.url}, timeout=15) for srv in s]
        ready = [srv.api("GET", "/readyz") for srv in s]
        pg_cluster.pg_ctl_start()
        for srv in s:
            wait_for(lambda srv=srv: srv.api("GET", "/readyz")[0] == 200, 20, "reconnected")
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert [r.status_code for r in during] == [503, 503] and all(r.json()["status"] == 503 for r in during)
    assert all(code == 503 and "PostgreSQL" in body["error"] for code, body in ready), ready
    assert slowest[0] < 8, f"a push took {slowest[0]:.1f}s during the outage (503 expected quickly)"
    assert set(refused) <= {503}, refused  # never a 500 or a dropped connection
    assert len(acknowledged) > 20
    after = s[0].push(url=worker.url)
    for job_id in acknowledged + [after["id"]]:
        assert s[1].wait_job(job_id, FINISHED, timeout=30)["status"] == "success"
    assert set(acknowledged) <= set(worker.job_ids())

"""Scheduled jobs (delay / runAt, SPEC §10.2-10.3) and logs of the previous version."""
import signal
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from conftest import FINISHED

DATA = Path(__file__).parent / "data"


def rfc3339(seconds_from_now):
    return (datetime.now(timezone.utc) + timedelta(seconds=seconds_from_now)).isoformat()


def parse(text):
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def arrival(worker, job_id, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for r in list(worker.requests):
            if r["headers"].get("x-hq-job-id") == job_id:
                return r
        time.sleep(0.01)
    raise AssertionError(f"job {job_id} never reached the worker")


def test_delay_is_honoured_never_early_at_most_a_second_late(server, worker):
    pushed = time.time()
    job = server.push(url=worker.url, delay=1.5)
    assert job["status"] == "waiting" and job["runAt"] is not None
    run_at = parse(job["runAt"])
    assert 1.3 <= run_at - pushed <= 1.8
    assert server.api("GET", "/stats")[1]["numScheduledJobs"] == 1
    got = arrival(worker, job["id"])
    started = got["time"] - time.monotonic() + time.time()
    assert run_at - 0.01 <= started <= run_at + 1.0
    done = server.wait_job(job["id"], FINISHED)
    assert done["status"] == "success" and done["runAt"] is None
    assert server.api("GET", "/stats")[1]["numScheduledJobs"] == 0


def test_run_at_with_an_offset(server, worker):
    when = datetime.now(timezone(timedelta(hours=9))) + timedelta(seconds=1.2)
    job = server.push(url=worker.url, runAt=when.isoformat())
    assert abs(parse(job["runAt"]) - when.timestamp()) < 0.002
    started = arrival(worker, job["id"])["time"] - time.monotonic() + time.time()
    assert when.timestamp() - 0.01 <= started <= when.timestamp() + 1.0


def test_run_at_in_the_past_means_now(server, worker):
    job = server.push(url=worker.url, runAt="2020-01-01T00:00:00Z")
    assert job["runAt"] is None
    assert server.wait_job(job["id"], FINISHED)["status"] == "success"


def test_scheduled_jobs_do_not_hold_queue_slots(make_server, worker):
    srv = make_server(queues=2, dispatchers=1)
    later = [srv.push(url=worker.url, delay=30) for _ in range(5)]
    now = srv.push(url=worker.url)  # would wait behind a full queue if the scheduled ones held slots
    assert srv.wait_job(now["id"], FINISHED, timeout=5)["status"] == "success"
    stats = srv.api("GET", "/stats")[1]
    assert stats["numScheduledJobs"] == 5 and stats["queueUsage"] == 0 and stats["numWaitingJobs"] == 5
    assert all(srv.job(j["id"])["status"] == "waiting" for j in later)


def test_stop_of_a_scheduled_job_is_never_sent(server, worker):
    job = server.push(url=worker.url, delay=1)
    assert server.api("POST", f"/job/{job['id']}/stop")[0] == 200
    stopped = server.job(job["id"])
    assert stopped["status"] == "canceled" and stopped["runAt"] is None and stopped["attempts"] == 0
    assert server.api("GET", "/stats")[1]["numScheduledJobs"] == 0
    time.sleep(1.6)
    assert worker.job_ids().count(job["id"]) == 0


@pytest.mark.parametrize("body,status", [
    ({"delay": "5"}, 400),
    ({"delay": True}, 400),
    ({"delay": -1}, 422),
    ({"delay": 31536001}, 422),
    ({"runAt": 12}, 400),
    ({"runAt": "tomorrow"}, 422),
    ({"runAt": "2026-12-24T18:00:00"}, 422),  # no offset
    ({"runAt": "2099-12-24T18:00:00Z"}, 422),  # more than a year ahead
    ({"delay": 1, "runAt": "2026-12-24T18:00:00Z"}, 422),
    ({"uniqueKey": 5}, 400),
    ({"uniqueKey": ""}, 422),
    ({"uniqueKey": "k" * 257}, 422),
])
def test_schedule_and_key_validation(server, body, status):
    code, answer = server.api("POST", "/job", {"url": "http://127.0.0.1:9/", **body})
    assert code == status and answer["status"] == status, answer
    assert server.api("GET", "/stats")[1]["numJobs"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_scheduled_jobs_survive_a_restart_and_run_once_at_their_time(make_server, worker, sig):
    srv = make_server()
    jobs = [srv.push(url=worker.url, delay=2.5 + i * 0.2) for i in range(5)]
    srv.stop(sig)
    srv.start()
    assert srv.api("GET", "/stats")[1]["numScheduledJobs"] == 5
    for j in jobs:
        run_at = parse(j["runAt"])
        assert srv.job(j["id"])["runAt"] == j["runAt"]
        started = arrival(worker, j["id"])["time"] - time.monotonic() + time.time()
        assert run_at - 0.01 <= started <= run_at + 1.0
    for j in jobs:
        assert srv.wait_job(j["id"], FINISHED)["status"] == "success"
    assert sorted(worker.job_ids()) == sorted(j["id"] for j in jobs)  # each once


@pytest.mark.parametrize("lines", [6, 5])  # the whole log, and one cut after a push (a crash)
def test_a_log_written_by_the_previous_version_loads(make_server, worker, lines):
    srv = make_server(start=False)
    data_dir = Path(srv.data_dir)
    data_dir.mkdir(parents=True)
    text = (DATA / "jobs-v0.1.jsonl").read_text().splitlines(keepends=True)
    (data_dir / "jobs.jsonl").write_text("".join(text[:lines]))
    srv.start()
    jobs = {j["name"]: j for j in srv.api("GET", "/job")[1]["jobs"]}
    ok, failed = jobs["old-success"], jobs["old-failure"]
    assert ok["status"] == "success" and ok["payload"] == {"n": 1} and ok["comment"] == "c"
    assert failed["status"] == "failure" and failed["err"] == "Internal Server Error"
    assert ok["retry"]["maxAttempts"] == 1 and ok["attempts"] == 1 and ok["history"] == []
    assert ok["runAt"] is None and ok["uniqueKey"] is None
    if lines == 5:  # the third job was waiting when the log ends: it is attempted once after the load
        done = srv.wait_job(jobs["old-stopped"]["id"], FINISHED)
        assert done["attempts"] == 1 and done["status"] in ("success", "failure")
    srv.restart()  # the loaded jobs are rewritten in today's form on the next change only; both forms load
    assert {j["name"] for j in srv.api("GET", "/job")[1]["jobs"]} == set(jobs)

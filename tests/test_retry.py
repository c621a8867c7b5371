"""Automatic retries (SPEC §10.3), against real worker apps on 127.0.0.1 that answer per attempt."""
import email.utils
import http.server
import signal
import threading
import time

import pytest

from conftest import FINISHED


class ScriptedWorker:
    """A worker app whose answer depends on the job and its attempt: answer(job_id, attempt) ->
    (status, headers dict, body bytes). Records (job id, attempt header, arrival time)."""

    def __init__(self, answer):
        self.answer = answer
        self.calls = []
        self.lock = threading.Lock()
        worker = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                job_id, attempt = self.headers.get("X-Hq-Job-Id"), self.headers.get("X-Hq-Attempt")
                with worker.lock:
                    worker.calls.append((job_id, attempt, time.time()))
                    n = sum(1 for c in worker.calls if c[0] == job_id)
                status, headers, body = worker.answer(job_id, n)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/work"

    def calls_for(self, job_id):
        with self.lock:
            return [c for c in self.calls if c[0] == job_id]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scripted():
    workers = []

    def make(answer):
        workers.append(ScriptedWorker(answer))
        return workers[-1]

    yield make
    for w in workers:
        w.close()


def fails_then_succeeds(failures, status=500, headers=None):
    return lambda job_id, n: (status, headers or {}, b"nope") if n <= failures else (200, {}, b"done")


def wait_finished(srv, job_id, timeout=20):
    return srv.wait_job(job_id, FINISHED, timeout)


def test_flaky_worker_succeeds_on_third_attempt(server, scripted):
    worker = scripted(fails_then_succeeds(2))
    job = server.push(url=worker.url, retry={"maxAttempts": 5, "minBackoff": 0.2, "maxBackoff": 1})
    assert job["retry"] == {"maxAttempts": 5, "minBackoff": 0.2, "maxBackoff": 1.0, "maxRetryDuration": 0.0}
    assert job["attempts"] == 0 and job["history"] == [] and job["runAt"] is None
    done = wait_finished(server, job["id"])
    assert done["status"] == "success" and done["attempts"] == 3 and done["statusCode"] == 200
    assert [h["attempt"] for h in done["history"]] == [1, 2]
    assert all(h["statusCode"] == 500 and h["err"] == "Internal Server Error" for h in done["history"])
    calls = worker.calls_for(job["id"])
    assert [c[1] for c in calls] == ["1", "2", "3"]  # X-Hq-Attempt on every request


def test_waiting_for_retry_is_visible_and_backoff_is_bounded(server, scripted):
    worker = scripted(fails_then_succeeds(3))
    job = server.push(url=worker.url, retry={"maxAttempts": 4, "minBackoff": 0.4, "maxBackoff": 0.8})
    deadline = time.monotonic() + 10
    while True:  # catch it between attempts
        seen = server.job(job["id"])
        if seen["attempts"] >= 1 and seen["status"] == "waiting":
            break
        assert time.monotonic() < deadline, seen
        time.sleep(0.01)
    assert seen["waiting"] and seen["runAt"] is not None and seen["statusCode"] == 500
    assert seen["history"][-1]["attempt"] == seen["attempts"]
    wait_finished(server, job["id"])
    times = [c[2] for c in worker.calls_for(job["id"])]
    gaps = [b - a for a, b in zip(times, times[1:])]
    # backoff before attempt n+1: uniform in [d/2, d], d = min(0.8, 0.4 * 2^(n-1)); plus dispatch latency
    for n, gap in enumerate(gaps, start=1):
        ceiling = min(0.8, 0.4 * 2 ** (n - 1))
        assert ceiling / 2 - 0.05 <= gap <= ceiling + 1.0, (n, gaps)


def test_final_failure_after_max_attempts(server, scripted):
    worker = scripted(lambda job_id, n: (502, {}, b"down"))
    job = server.push(url=worker.url, retry={"maxAttempts": 3, "minBackoff": 0.1, "maxBackoff": 0.2})
    done = wait_finished(server, job["id"])
    assert done["status"] == "failure" and done["attempts"] == 3 and done["err"] == "Bad Gateway"
    assert [h["attempt"] for h in done["history"]] == [1, 2] and done["runAt"] is None
    assert len(worker.calls_for(job["id"])) == 3


def test_no_response_is_retried_too(server, scripted):
    dead = "http://127.0.0.1:9/never"  # discard port: connection refused
    job = server.push(url=dead, retry={"maxAttempts": 2, "minBackoff": 0.1})
    done = wait_finished(server, job["id"])
    assert done["status"] == "failure" and done["attempts"] == 2 and done["statusCode"] is None
    assert done["err"].startswith("failed to do http request:") and done["history"][0]["statusCode"] is None


def test_default_policy_attempts_once_as_hq(server, scripted):
    worker = scripted(lambda job_id, n: (500, {}, b"x"))
    job = server.push(url=worker.url)
    assert job["retry"]["maxAttempts"] == 1
    done = wait_finished(server, job["id"])
    assert done["status"] == "failure" and done["attempts"] == 1 and done["history"] == []
    time.sleep(0.3)
    assert len(worker.calls_for(job["id"])) == 1


def test_server_defaults_come_from_config(make_server, scripted):
    srv = make_server(retry_max_attempts=2, retry_min_backoff=0.1, retry_max_backoff=0.1)
    worker = scripted(fails_then_succeeds(1))
    job = srv.push(url=worker.url)
    assert job["retry"] == {"maxAttempts": 2, "minBackoff": 0.1, "maxBackoff": 0.1, "maxRetryDuration": 0.0}
    assert wait_finished(srv, job["id"])["status"] == "success"


def test_no_retry_header_ends_it(server, scripted):
    worker = scripted(lambda job_id, n: (500, {"X-Hq-No-Retry": "true"}, b"fatal"))
    job = server.push(url=worker.url, retry={"maxAttempts": 5, "minBackoff": 0.1})
    done = wait_finished(server, job["id"])
    assert done["status"] == "failure" and done["attempts"] == 1
    time.sleep(0.4)
    assert len(worker.calls_for(job["id"])) == 1


@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_retry_after_on_503_makes_the_wait_at_least_that_long(server, scripted, form):
    def answer(job_id, n):
        if n > 1:
            return 200, {}, b"ok"
        value = "2" if form == "seconds" else email.utils.formatdate(time.time() + 3, usegmt=True)
        return 503, {"Retry-After": value}, b"busy"

    worker = scripted(answer)
    job = server.push(url=worker.url, retry={"maxAttempts": 2, "minBackoff": 0.1, "maxBackoff": 0.1})
    done = wait_finished(server, job["id"])
    assert done["status"] == "success"
    first, second = [c[2] for c in worker.calls_for(job["id"])]
    assert second - first >= 1.5  # 2 s, or an HTTP-date 3 s ahead at whole-second precision


def test_max_retry_duration_stops_retrying(server, scripted):
    worker = scripted(lambda job_id, n: (500, {}, b"x"))
    job = server.push(url=worker.url, retry={"maxAttempts": 100, "minBackoff": 0.3, "maxBackoff": 0.3,
                                             "maxRetryDuration": 1})
    done = wait_finished(server, job["id"])
    assert done["status"] == "failure"
    calls = worker.calls_for(job["id"])
    assert 2 <= len(calls) <= 8 and calls[-1][2] - calls[0][2] <= 1.5


def test_stop_cancels_a_job_waiting_for_retry(server, scripted):
    worker = scripted(lambda job_id, n: (500, {}, b"x"))
    job = server.push(url=worker.url, retry={"maxAttempts": 5, "minBackoff": 3, "maxBackoff": 3})
    deadline = time.monotonic() + 10
    while server.job(job["id"])["attempts"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert server.api("POST", f"/job/{job['id']}/stop")[0] == 200
    stopped = server.job(job["id"])
    assert stopped["status"] == "canceled" and stopped["runAt"] is None and stopped["attempts"] == 1
    time.sleep(3.5)
    assert len(worker.calls_for(job["id"])) == 1
    assert server.api("GET", "/stats")[1]["numScheduledJobs"] == 0


def test_restart_resets_attempts_and_copy_keeps_the_policy(server, scripted):
    worker = scripted(lambda job_id, n: (500, {}, b"x"))
    policy = {"maxAttempts": 2, "minBackoff": 0.1, "maxBackoff": 0.1}
    job = server.push(url=worker.url, retry=policy, uniqueKey="restart-me")
    assert wait_finished(server, job["id"])["attempts"] == 2
    status, again = server.api("POST", f"/job/{job['id']}/restart", {})
    assert status == 200 and again["attempts"] == 0 and again["history"] == [] and again["runAt"] is None
    assert again["uniqueKey"] == "restart-me"
    assert wait_finished(server, job["id"])["attempts"] == 2
    status, copy = server.api("POST", f"/job/{job['id']}/restart", {"copy": True})
    assert status == 200 and copy["retry"]["maxAttempts"] == 2 and copy["uniqueKey"] is None


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_jobs_waiting_for_retry_survive_a_restart(make_server, scripted, sig):
    worker = scripted(fails_then_succeeds(1))
    srv = make_server()
    jobs = [srv.push(url=worker.url, retry={"maxAttempts": 3, "minBackoff": 2, "maxBackoff": 2}) for _ in range(5)]
    deadline = time.monotonic() + 10
    while not all(srv.job(j["id"])["attempts"] == 1 for j in jobs):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    srv.stop(sig)
    srv.start()
    for j in jobs:
        seen = srv.job(j["id"])
        assert seen["status"] in ("waiting", "running", "success") and seen["attempts"] >= 1
        assert len(seen["history"]) >= 1
    for j in jobs:
        done = wait_finished(srv, j["id"])
        assert done["status"] == "success" and done["attempts"] == 2
        calls = worker.calls_for(j["id"])
        assert len(calls) == 2 and calls[1][2] - calls[0][2] >= 0.9  # the backoff was kept, not skipped


@pytest.mark.parametrize("retry,status", [
    ("x", 400),
    ({"maxAttempts": "3"}, 400),
    ({"maxAttempts": True}, 400),
    ({"maxAttempts": 1.5}, 400),
    ({"bogus": 1}, 400),
    ({"minBackoff": "1"}, 400),
    ({"maxAttempts": 0}, 422),
    ({"maxAttempts": 1001}, 422),
    ({"minBackoff": 0}, 422),
    ({"minBackoff": 5, "maxBackoff": 2}, 422),
    ({"maxBackoff": 86401}, 422),
    ({"maxRetryDuration": -1}, 422),
])
def test_retry_validation(server, retry, status):
    code, body = server.api("POST", "/job", {"url": "http://127.0.0.1:9/", "retry": retry})
    assert code == status and body["status"] == status and "retry" in body["error"], body
    assert server.api("GET", "/stats")[1]["numJobs"] == 0

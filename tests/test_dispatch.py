"""The worker request (SPEC §4) and dispatch bounds (SPEC §6), observed at a real worker app."""
import socket
import threading
import time

import pytest

import hq_gevent


def test_worker_request_method_path_query_headers_body(server, worker):
    job = server.push(url=worker.url + "/some/path?a=1&b=two", payload={"k": "v", "n": [1, 2.5, None]},
                      headers={"X-Custom": "yes", "User-Agent": "mine"})
    server.wait_job(job["id"])
    req = worker.requests[-1]
    assert req["method"] == "POST"
    assert req["path"] == "/some/path?a=1&b=two"
    assert req["body"] == b'{"k":"v","n":[1,2.5,null]}'
    h = req["headers"]
    assert h["content-type"] == "application/json"
    assert h["user-agent"] == "mine"  # a job header may override User-Agent
    assert h["x-custom"] == "yes"
    assert h["x-hq-job-id"] == job["id"]


def test_default_user_agent_and_no_body_for_null_payload(server, worker):
    job = server.push(url=worker.url)
    server.wait_job(job["id"])
    req = worker.requests[-1]
    assert req["headers"]["user-agent"] == f"HQ/{hq_gevent.__version__}"
    assert req["body"] == b"" and req["path"] == "/"


def test_job_header_cannot_forge_the_job_id(server, worker):
    job = server.push(url=worker.url, headers={"X-Hq-Job-Id": "1", "Content-Type": "text/plain"})
    server.wait_job(job["id"])
    h = worker.requests[-1]["headers"]
    assert h["x-hq-job-id"] == job["id"]
    assert h["content-type"] == "text/plain"


@pytest.mark.parametrize("code", [200, 201, 204, 299])
def test_any_2xx_is_success(server, worker, code):
    worker.respond(code, b"" if code == 204 else b"body")
    job = server.wait_job(server.push(url=worker.url)["id"])
    assert job["status"] == "success" and job["success"] and job["statusCode"] == code and job["err"] == ""


@pytest.mark.parametrize("code,reason", [(500, "Internal Server Error"), (404, "Not Found"), (302, "Found"), (418, "I'm a Teapot")])
def test_non_2xx_is_failure_with_reason(server, worker, code, reason):
    worker.respond(code, b"nope")
    job = server.wait_job(server.push(url=worker.url)["id"])
    assert job["status"] == "failure" and job["failure"] and not job["success"]
    assert job["statusCode"] == code and job["output"] == "nope"
    assert job["err"].lower() == reason.lower()


def test_connection_refused(server):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    job = server.wait_job(server.push(url=f"http://127.0.0.1:{port}/x")["id"])
    assert job["status"] == "failure" and job["statusCode"] is None
    assert job["err"].startswith("failed to do http request:") and "refused" in job["err"]
    assert "\n" not in job["err"]


def test_unresolvable_host(server):
    job = server.wait_job(server.push(url="http://no-such-host.invalid/x")["id"])
    assert job["status"] == "failure" and job["err"].startswith("failed to do http request:")


def test_timeout_bounds_the_whole_exchange(server, worker):
    worker.respond(200, b"late", delay=5)
    started = time.monotonic()
    job = server.wait_job(server.push(url=worker.url, timeout=1)["id"], timeout=10)
    assert time.monotonic() - started < 4
    assert job["status"] == "failure" and job["statusCode"] is None
    assert job["err"].startswith("failed to do http request:") and "timeout" in job["err"]


def test_timeout_covers_a_worker_that_never_answers(server):
    # Accepts the connection and reads, never answers: only the job timeout can end it.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    conns = []
    threading.Thread(target=lambda: conns.append(listener.accept()), daemon=True).start()
    try:
        job = server.wait_job(server.push(url=f"http://127.0.0.1:{listener.getsockname()[1]}/", timeout=1)["id"])
        assert job["status"] == "failure" and "timeout" in job["err"]
    finally:
        listener.close()


def test_output_is_capped_with_a_marker(make_server, worker):
    srv = make_server(max_output_bytes=100)
    worker.respond(200, b"a" * 5000)
    job = srv.wait_job(srv.push(url=worker.url)["id"])
    assert job["status"] == "success" and job["err"] == ""
    assert job["output"].startswith("a" * 100) and "truncated" in job["output"]
    assert len(job["output"]) < 200
    worker.respond(200, b"b" * 100)
    job = srv.wait_job(srv.push(url=worker.url)["id"])
    assert job["output"] == "b" * 100


def test_output_is_decoded_with_replacement(server, worker):
    worker.respond(200, "héllo".encode() + b"\xff")
    job = server.wait_job(server.push(url=worker.url)["id"])
    assert job["output"] == "héllo\ufffd"


def test_one_dispatcher_without_workers_runs_one_at_a_time_in_order(make_server, worker):
    srv = make_server(dispatchers=1, max_workers=0)
    worker.respond(200, b"OK", delay=0.05)
    ids = [srv.push(url=worker.url)["id"] for _ in range(8)]
    for job_id in ids:
        srv.wait_job(job_id)
    assert worker.max_in_flight == 1
    assert worker.job_ids() == ids


def test_concurrency_bound_is_dispatchers_times_max_workers(make_server, worker):
    srv = make_server(dispatchers=2, max_workers=3)
    worker.respond(200, b"OK", delay=0.3)
    ids = [srv.push(url=worker.url)["id"] for _ in range(20)]
    for job_id in ids:
        srv.wait_job(job_id, timeout=30)
    assert 4 <= worker.max_in_flight <= 6
    assert sorted(worker.job_ids()) == sorted(ids)


def test_full_queue_loses_nothing_and_keeps_order(make_server, worker):
    srv = make_server(queues=2, dispatchers=1, max_workers=0)
    worker.hold()
    ids = [srv.push(url=worker.url)["id"] for _ in range(50)]
    stats = srv.api("GET", "/stats")[1]
    assert stats["numJobs"] == 50 and stats["queueUsage"] <= 2 and stats["numWaitingJobs"] >= 48
    worker.release()
    for job_id in ids:
        assert srv.wait_job(job_id, timeout=30)["status"] == "success"
    assert worker.job_ids() == ids


def test_stats_count_waiting_running_and_workers(make_server, worker):
    srv = make_server(dispatchers=1, max_workers=2)
    worker.hold()
    ids = [srv.push(url=worker.url)["id"] for _ in range(5)]
    worker.wait_requests(2)
    stats = srv.api("GET", "/stats")[1]
    assert stats["numRunningJobs"] == 2 and stats["numWorkers"] == 2 and stats["numWaitingJobs"] == 3
    worker.release()
    for job_id in ids:
        srv.wait_job(job_id)
    stats = srv.api("GET", "/stats")[1]
    assert stats["numRunningJobs"] == 0 and stats["numWaitingJobs"] == 0 and stats["numJobs"] == 5


def test_worker_that_closes_kept_alive_connections(server):
    """An HTTP/1.0-style worker closing after each response: every job still succeeds."""
    import http.server

    class OneShot(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"bye")

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), OneShot)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        ids = [server.push(url=f"http://127.0.0.1:{httpd.server_address[1]}/")["id"] for _ in range(5)]
        for job_id in ids:
            job = server.wait_job(job_id)
            assert job["status"] == "success" and job["output"] == "bye"
    finally:
        httpd.shutdown()

"""Operations (issue 5 runtime): log format, access log, SIGUSR1 reopen, SIGTERM bounds, job_lifetime."""
import json
import os
import re
import signal
import time

import pytest

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(Z|[+-]\d\d:\d\d) (DEBUG|INFO|WARN|ERROR) \S")


def wait_for(predicate, timeout=10, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def read(path):
    return open(path).read() if os.path.exists(path) else ""


def test_server_log_lines_have_time_and_level(make_server, tmp_path):
    srv = make_server(log_file=str(tmp_path / "server.log"))
    srv.stop()
    lines = read(tmp_path / "server.log").splitlines()
    assert lines and all(LOG_LINE.match(line) for line in lines), lines
    assert any("Opened data directory: " in line for line in lines)
    assert any(f"The server Listening on 127.0.0.1:{srv.port} (pid: {srv.proc.pid})" in line for line in lines)


def test_access_log_has_the_original_fields(make_server, tmp_path):
    access = tmp_path / "access.log"
    srv = make_server(access_log_file=str(access))
    srv.request("POST", "/job", data=b'{"url": 1}', headers={"Content-Type": "application/json", "Host": "example.test"})
    assert wait_for(lambda: '"uri":"/job"' in read(access))
    entry = json.loads([line for line in read(access).splitlines() if '"uri":"/job"' in line][0])
    for key in ("time", "remote_ip", "host", "method", "uri", "status", "latency", "bytes_in", "bytes_out"):
        assert key in entry, key
    assert (entry["remote_ip"], entry["host"], entry["method"], entry["uri"], entry["status"]) == \
        ("127.0.0.1", "example.test", "POST", "/job", 400)
    assert entry["bytes_in"] == 10 and entry["bytes_out"] > 10


def test_sigusr1_reopens_both_logs(make_server, tmp_path):
    server_log, access = tmp_path / "server.log", tmp_path / "access.log"
    srv = make_server(log_file=str(server_log), access_log_file=str(access))
    srv.request("GET", "/stats")
    assert wait_for(lambda: "/stats" in read(access))
    os.rename(server_log, tmp_path / "server.log.1")
    os.rename(access, tmp_path / "access.log.1")
    srv.send_signal(signal.SIGUSR1)
    assert wait_for(lambda: "Reopened log files" in read(server_log))
    srv.request("GET", "/?after-rotate")
    assert wait_for(lambda: "after-rotate" in read(access))
    assert "after-rotate" not in read(tmp_path / "access.log.1")
    assert "/stats" in read(tmp_path / "access.log.1")
    assert srv.stop() == 0


def test_sigterm_lets_running_jobs_finish_within_shutdown_timeout(make_server, worker):
    srv = make_server(shutdown_timeout=10)
    worker.respond(200, b"done", delay=1)
    job = srv.push(url=worker.url)
    worker.wait_requests(1)
    started = time.monotonic()
    assert srv.stop() == 0
    assert time.monotonic() - started < 8
    srv.start()
    assert srv.job(job["id"])["status"] == "success"
    assert len(worker.requests) == 1


def test_sigterm_with_a_stuck_job_exits_in_time_and_the_job_runs_later(make_server, worker):
    srv = make_server(shutdown_timeout=1, dispatchers=1)
    worker.hold()
    stuck = srv.push(url=worker.url)["id"]
    backlog = [srv.push(url=worker.url)["id"] for _ in range(200)]
    worker.wait_requests(1)
    started = time.monotonic()
    assert srv.stop() == 0
    assert time.monotonic() - started < 1 + 2
    worker.release()
    srv.start()
    for job_id in [stuck] + backlog:
        assert srv.wait_job(job_id, timeout=30)["status"] == "success"


def test_second_signal_exits_at_once_and_stays_consistent(make_server, worker):
    srv = make_server(shutdown_timeout=30)
    worker.hold()
    job = srv.push(url=worker.url)["id"]
    worker.wait_requests(1)
    srv.send_signal(signal.SIGTERM)
    assert wait_for(lambda: "Shutting down" in srv.log())
    started = time.monotonic()
    srv.send_signal(signal.SIGINT)
    assert srv.proc.wait(10) != 0
    assert time.monotonic() - started < 5
    worker.release()
    srv.start()
    assert srv.wait_job(job)["status"] == "success"


def test_job_lifetime_removes_only_old_finished_jobs(make_server, worker):
    srv = make_server(job_lifetime=1, job_lifetime_interval=1, dispatchers=1, max_workers=2)
    old = srv.wait_job(srv.push(url=worker.url, name="old")["id"])
    worker.hold()
    running = srv.push(url=worker.url, name="running")["id"]
    worker.wait_requests(2)
    assert wait_for(lambda: srv.api("GET", f"/job/{old['id']}")[0] == 422, timeout=10)
    assert srv.job(running)["status"] == "running"
    worker.release()
    srv.wait_job(running)
    srv.restart(job_lifetime=0)
    assert srv.api("GET", f"/job/{old['id']}")[0] == 422  # the removal went through the log
    assert srv.job(running)["status"] == "success"


@pytest.mark.parametrize("level,shown,hidden", [("error", None, " INFO "), ("debug", " INFO ", None)])
def test_log_level(make_server, tmp_path, level, shown, hidden):
    path = tmp_path / f"{level}.log"
    srv = make_server(log_file=str(path), log_level=level)
    srv.stop()
    text = read(path)
    if shown:
        assert shown in text
    if hidden:
        assert hidden not in text

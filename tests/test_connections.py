"""Connection limits (issue 12, SPEC §11) and the server log's format (issue 13, log_format), against
a real server over real sockets: slow and idle clients are dropped on time and never stop others,
max_connections holds the rest in the listen backlog, running out of descriptors is survived."""
import json
import re
import resource
import selectors
import socket
import subprocess
import sys
import time
from datetime import datetime

import pytest
import requests

from conftest import HQServer, ROOT, require_tool


def wait_closed(sock, timeout):
    """Seconds until the server closes `sock` (EOF or reset); fails if it stays open past `timeout`."""
    started = time.monotonic()
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except socket.timeout:
        pytest.fail(f"the connection was still open after {timeout}s")
    return time.monotonic() - started


def open_idle(port, n):
    """n connections that send nothing (connected, or at least queued in the listen backlog)."""
    return [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(n)]


def timed_get(url, timeout=20):
    started = time.monotonic()
    r = requests.get(url, timeout=timeout)
    return r.status_code, time.monotonic() - started


def test_slow_sender_is_dropped_after_request_header_timeout(make_server):
    srv = make_server(request_header_timeout=1)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        started = time.monotonic()
        # One byte every 0.2 s: each read makes progress, but the head never completes in time.
        s.setblocking(False)
        closed = False
        for byte in b"POST /job HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            try:
                s.send(bytes([byte]))
                if s.recv(1) == b"":
                    closed = True
                    break
            except BlockingIOError:
                pass
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            if time.monotonic() - started > 10:
                break
            time.sleep(0.2)
        elapsed = time.monotonic() - started
    assert closed, "a slow sender was still connected after 10 s"
    assert 0.8 < elapsed < 6, elapsed
    assert srv.api("GET", "/")[0] == 200


def test_silent_connection_and_idle_keep_alive_are_closed(make_server):
    srv = make_server(request_header_timeout=1, keepalive_timeout=3)
    with socket.create_connection(("127.0.0.1", srv.port)) as silent:
        assert 0.8 < wait_closed(silent, 10) < 6
    with socket.create_connection(("127.0.0.1", srv.port)) as kept:
        # Within keepalive_timeout the connection serves requests (the head deadline does not run
        # while it is idle: 1.5 s idle > request_header_timeout is fine)...
        for _ in range(2):
            kept.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert kept.recv(65536).startswith(b"HTTP/1.1 200")
            time.sleep(1.5)
        # ...and once idle longer than that, the server closes it.
        assert 0.5 < wait_closed(kept, 15) < 8


def test_stalled_body_is_answered_408_and_dropped(make_server):
    srv = make_server(request_header_timeout=1, keepalive_timeout=2)
    body = b'{"url": "http://127.0.0.1:9/stalled"}'
    with socket.create_connection(("127.0.0.1", srv.port), timeout=15) as s:
        s.sendall(b"POST /job HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body[:10]))  # ...and no more
        started = time.monotonic()
        received = b""
        while chunk := s.recv(65536):
            received += chunk
        elapsed = time.monotonic() - started
    assert received.startswith(b"HTTP/1.1 408 "), received
    assert 1.5 < elapsed < 10, elapsed
    assert srv.api("GET", "/job")[1]["count"] == 0
    assert "Traceback" not in srv.log()


@pytest.mark.slow
def test_client_that_does_not_read_its_answer_is_dropped(make_server, worker):
    srv = make_server(keepalive_timeout=2)
    for _ in range(3):  # ~12 MB of listing: more than the socket buffers on both sides hold
        batch = [{"url": worker.url + "/big", "comment": "c" * 4000} for _ in range(1000)]
        assert srv.api("POST", "/jobs", batch)[0] == 200
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(20)
        s.connect(("127.0.0.1", srv.port))
        s.sendall(b"GET /job HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.5)
        assert timed_get(srv.url + "/stats")[1] < 2  # the stuck answer holds no one else up
        started = time.monotonic()
        # The server gives up after keepalive_timeout; what it had sent is still readable, then EOF.
        time.sleep(4)
        received = 0
        try:
            while chunk := s.recv(1 << 20):
                received += len(chunk)
        except ConnectionResetError:
            pass
        assert time.monotonic() - started < 15
    assert 0 < received < 12_000_000, received
    assert srv.proc.poll() is None and "Traceback" not in srv.log()


@pytest.mark.slow
def test_300_idle_and_slow_connections_do_not_stop_normal_clients(make_server):
    srv = make_server(request_header_timeout=30)
    idle = open_idle(srv.port, 200)
    slow = open_idle(srv.port, 100)
    try:
        for s in slow:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # a head that never completes
        for _ in range(20):
            status, elapsed = timed_get(srv.url + "/stats")
            assert status == 200 and elapsed < 2, elapsed
        assert srv.api("POST", "/job", {"url": "http://127.0.0.1:9/x"})[0] == 200
    finally:
        for s in idle + slow:
            s.close()


@pytest.mark.slow
def test_max_connections_queues_the_rest_until_idle_ones_time_out(make_server):
    srv = make_server(request_header_timeout=1, max_connections=10)
    idle = open_idle(srv.port, 30)  # 10 served (idle), 20 waiting in the backlog
    try:
        # A normal client waits behind them: the idle ones are dropped a batch of 10 per second.
        status, elapsed = timed_get(srv.url + "/stats")
        assert status == 200
        assert 0.8 < elapsed < 15, elapsed
    finally:
        for s in idle:
            s.close()
    # With the idle ones gone, answers are immediate again.
    assert timed_get(srv.url + "/stats")[1] < 2


class LimitedServer(HQServer):
    """The server under prlimit: RLIMIT_NOFILE 256 for its process."""

    def start(self, timeout=20, wait=True):
        self.write_config()
        self._log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            ["prlimit", "--nofile=256:256", sys.executable, "-m", "hq_gevent", "serve", "-c", str(self.config_path)],
            stdout=self._log_file, stderr=subprocess.STDOUT, cwd=str(ROOT))
        if wait:
            self.wait_ready(timeout)
        return self


def connect_many(port, n, timeout=5):
    """Start n non-blocking connects at once; returns the sockets once each is connected or timed out."""
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < n + 100:
        pytest.skip("this test process may not open that many sockets")
    sockets, sel = [], selectors.DefaultSelector()
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        sockets.append(s)
        sel.register(s, selectors.EVENT_WRITE)
    pending, deadline = n, time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for key, _ in sel.select(0.2):
            sel.unregister(key.fileobj)
            pending -= 1
    sel.close()
    return sockets


@pytest.mark.slow
def test_running_out_of_descriptors_never_stops_accepting(tmp_path):
    require_tool("prlimit", "running the server with RLIMIT_NOFILE 256")
    srv = LimitedServer(tmp_path, {"request_header_timeout": 30})
    try:
        srv.start()
        sockets = connect_many(srv.port, 400)
        try:
            deadline = time.monotonic() + 10
            while "Cannot accept connections" not in srv.log():
                assert time.monotonic() < deadline, "the server never ran out of descriptors:\n" + srv.log()
                time.sleep(0.1)
            assert srv.proc.poll() is None
        finally:
            for s in sockets:
                s.close()
        # Once they are closed, descriptors come back and the server accepts and answers again.
        deadline = time.monotonic() + 20
        while True:
            try:
                if requests.get(srv.url + "/stats", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.2)
        assert srv.api("POST", "/job", {"url": "http://127.0.0.1:9/after"})[0] == 200
        log = srv.log()
        assert "Traceback" not in log, log
        assert log.count("Cannot accept connections") <= 3, log  # once per episode, not once per attempt
    finally:
        srv.stop()


# --- the server log's format ---------------------------------------------------------------------

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?([+-]\d\d:\d\d|Z)$")


def test_json_log_lines(make_server, worker, tmp_path):
    worker.respond(500, b"no")
    access_log = tmp_path / "access.log"
    srv = make_server(log_format="json", log_level="debug", data_dir=None, access_log_file=str(access_log))
    job = srv.push(url=worker.url + "/fails", retry={"maxAttempts": 2, "minBackoff": 0.1, "maxBackoff": 0.1})
    assert srv.wait_job(job["id"])["status"] == "failure"
    assert srv.stop() == 0
    entries = [json.loads(line) for line in srv.log().splitlines()]  # every line is one JSON object
    for entry in entries:
        assert set(entry) <= {"time", "level", "msg", "job_id", "traceback"}, entry
        assert RFC3339.match(entry["time"]) and datetime.fromisoformat(entry["time"]), entry
        assert entry["level"] in ("DEBUG", "INFO", "WARN", "ERROR")
    messages = [e["msg"] for e in entries]
    assert any(m.startswith("Created temporary data directory: ") for m in messages)
    assert any(m.startswith("The server Listening on ") for m in messages)
    assert [e for e in entries if e["level"] == "WARN"]
    # The dispatcher's line about the failed first attempt carries the job's id (a string, as in the API).
    assert [e for e in entries if e.get("job_id") == job["id"]], entries


FORMAT_RECORDS = r"""
import json, logging, sys
from hq_gevent.server import JsonLogFormatter, LogFormatter
try:
    raise ValueError("broken \ud800 thing")
except ValueError:
    failed = logging.LogRecord("hq_gevent", logging.ERROR, "x", 1, "Job %d failed: %s", (12345, "x"), sys.exc_info())
failed.job_id = 12345
warn = logging.LogRecord("hq_gevent", logging.WARNING, "x", 1, "careful", (), None)
print(json.dumps([JsonLogFormatter().format(failed), JsonLogFormatter().format(warn), LogFormatter().format(failed)]))
"""


def test_json_log_formatter_job_id_and_traceback():
    # In a child process: importing hq_gevent.server monkey-patches the interpreter that does it.
    out = subprocess.run([sys.executable, "-c", FORMAT_RECORDS], capture_output=True, text=True, cwd=str(ROOT),
                         timeout=60, check=True).stdout
    failed, warn, text = json.loads(out)
    entry = json.loads(failed)
    assert entry["level"] == "ERROR" and entry["msg"] == "Job 12345 failed: x" and entry["job_id"] == "12345"
    assert entry["traceback"].startswith("Traceback") and "ValueError: broken" in entry["traceback"]
    assert json.loads(warn) == {"time": json.loads(warn)["time"], "level": "WARN", "msg": "careful"}
    # text stays HQ's format: `<time> <LEVEL> <message>`, the traceback's lines after it.
    lines = text.splitlines()
    assert re.match(r"^\S+ ERROR Job 12345 failed: x$", lines[0]) and lines[1].startswith("Traceback")


def test_text_log_stays_the_default(make_server):
    srv = make_server()
    assert srv.stop() == 0
    lines = [line for line in srv.log().splitlines() if not line.startswith("{")]  # access lines are JSON
    assert lines and all(re.match(r"^\S+ (DEBUG|INFO|WARN|ERROR) ", line) for line in lines), lines


def test_deadlines_start_from_their_full_length_for_every_request(make_server):
    """Each request gets the whole request_header_timeout for its head and the whole
    keepalive_timeout of idleness before it, however many came before on the connection."""
    srv = make_server(request_header_timeout=1, keepalive_timeout=2)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        for _ in range(3):  # 3 x 0.6 s of head time > 1 s; 3 x 1.2 s idle > 2 s
            s.sendall(b"GET / HTTP/1.1\r\nHo")
            time.sleep(0.6)
            s.sendall(b"st: x\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
            time.sleep(1.2)

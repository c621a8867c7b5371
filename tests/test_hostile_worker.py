"""A hostile worker app cannot freeze the server, void a job's timeout or blow up its memory.

Each worker here is written byte by byte on a raw socket on 127.0.0.1 and answers a real server's
worker request with one hostile answer: flooded as fast as the socket takes it (the case where a
read loop that never yields holds the event loop) or trickled (the case where only the job's
timeout can end it). While it runs, a prober keeps asking the same server for `GET /`.
"""
import datetime
import threading
import time

import pytest
import requests

from conftest import SocketWorker

JOB_TIMEOUT = 3
TIMEOUT_MARGIN = 3  # the shared 2-core machine can be slow; the bug this catches took 9-12 s more
PROBE_LIMIT = 0.5
RSS_GROWTH_LIMIT = 30 << 20
FLOOD_SECONDS = 30  # a flood stops by itself at the latest after this long
CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


def flood(prefix, block):
    """Send prefix, then block after block until the server hangs up (or FLOOD_SECONDS)."""
    def answer(conn):
        conn.sendall(prefix)
        deadline = time.monotonic() + FLOOD_SECONDS
        while time.monotonic() < deadline:
            conn.sendall(block)
    return answer


def trickle(prefix, byte=b"a", every=0.01):
    """Send prefix, then one byte every `every` seconds until the server hangs up."""
    def answer(conn):
        conn.sendall(prefix)
        deadline = time.monotonic() + FLOOD_SECONDS
        while time.monotonic() < deadline:
            conn.sendall(byte)
            time.sleep(every)
    return answer


class HostileWorker(SocketWorker):
    """Reads each worker request, then lets `answer(conn)` write to the socket."""

    def __init__(self, answer):
        self.answer = answer
        super().__init__("/hostile")

    def serve(self, conn):
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            try:
                self.answer(conn)
            except OSError:
                pass  # the server hung up: what we wanted


class Prober:
    """GET / on the server every 50 ms from a thread; keeps the slowest answer time."""

    def __init__(self, url):
        self.url = url
        self.times = []
        self.failures = []
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        session = requests.Session()
        while self.running:
            t0 = time.monotonic()
            try:
                session.get(self.url + "/", timeout=10).raise_for_status()
            except requests.RequestException as e:
                self.failures.append(repr(e))
            self.times.append(time.monotonic() - t0)
            time.sleep(0.05)

    def stop(self):
        self.running = False
        self.thread.join(15)
        return max(self.times)


def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def seconds(timestamp):
    return datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def attack(server, answer, min_seconds=1.5, max_jobs=20):
    """Run jobs against a hostile worker, one after another until min_seconds have passed (an
    answer refused at once is repeated, so the prober measures during it); returns
    (jobs, slowest GET /, RSS growth in bytes)."""
    worker = HostileWorker(answer)
    try:
        rss_before = peak = rss(server.proc.pid)
        prober = Prober(server.url)
        jobs = []
        start = time.monotonic()
        while time.monotonic() - start < min_seconds and len(jobs) < max_jobs:
            job_id = server.push(url=worker.url, timeout=JOB_TIMEOUT)["id"]
            deadline = time.monotonic() + JOB_TIMEOUT + 30
            while True:
                peak = max(peak, rss(server.proc.pid))
                job = server.job(job_id)
                if job["status"] not in ("waiting", "running") or time.monotonic() > deadline:
                    break
                time.sleep(0.02)
            jobs.append(job)
        slowest = prober.stop()
        assert not prober.failures, prober.failures[:3]
        assert len(prober.times) >= 3  # the prober measured during the attack, not just once
        return jobs, slowest, peak - rss_before
    finally:
        worker.close()


def check_bounded(jobs, slowest, growth):
    """The bounds every attack must keep; returns the longest job's run time."""
    assert slowest < PROBE_LIMIT, f"GET / took {slowest:.2f}s during the attack"
    assert growth < RSS_GROWTH_LIMIT, f"the server's RSS grew by {growth >> 20} MiB"
    took = max(seconds(job["finishedAt"]) - seconds(job["startedAt"]) for job in jobs)
    print(f"{len(jobs)} jobs, longest {took:.2f}s, slowest GET / {slowest * 1000:.0f} ms, RSS +{growth / 2**20:.1f} MiB")
    assert took < JOB_TIMEOUT + TIMEOUT_MARGIN, f"a job ran {took:.1f}s with timeout {JOB_TIMEOUT}"
    return took


TIMED_OUT = {
    "declared 1 GiB chunk, then a trickle": trickle(CHUNKED_HEAD + b"40000000\r\n"),
    "huge Content-Length, then a trickle": trickle(b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n"),
    "a head trickled without end": trickle(b"HTTP/1.1 200 OK\r\nX-Slow: "),
    "a chunk-size line trickled without end": trickle(CHUNKED_HEAD + b"1", byte=b"0"),
}


@pytest.mark.parametrize("case", list(TIMED_OUT))
def test_trickle_ends_at_the_job_timeout(make_server, case):
    server = make_server()
    jobs, slowest, growth = attack(server, TIMED_OUT[case])
    took = check_bounded(jobs, slowest, growth)
    for job in jobs:
        assert job["status"] == "failure" and job["statusCode"] is None, job
        assert job["err"].endswith(f"timeout after {JOB_TIMEOUT}s"), job["err"]
    assert took > JOB_TIMEOUT - 0.5


REFUSED = {
    "a chunk-size line without end": (flood(CHUNKED_HEAD, b"1" * 65536), "chunk size line is too long"),
    "a chunk-size extension without end": (flood(CHUNKED_HEAD + b"5;", b"x" * 65536), "chunk size line is too long"),
    "endless trailers": (flood(CHUNKED_HEAD + b"2\r\nok\r\n0\r\n", b"X-Trailer: 1\r\n" * 4096), "trailers are too long"),
    "a head without end": (flood(b"HTTP/1.1 200 OK\r\n", b"X-Header: 1\r\n" * 4096), "headers are too large"),
    "endless interim responses": (flood(b"", b"HTTP/1.1 100 Continue\r\n\r\n" * 2048), "headers are too large"),
    "chunks that are mostly framing": (flood(CHUNKED_HEAD, b"1;" + b"e" * 4000 + b"\r\nx\r\n"), "too much framing"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_flood_of_framing_is_refused(make_server, case):
    answer, reason = REFUSED[case]
    server = make_server()
    jobs, slowest, growth = attack(server, answer)
    check_bounded(jobs, slowest, growth)
    for job in jobs:
        assert job["status"] == "failure" and job["statusCode"] is None, job
        assert job["err"].startswith("failed to do http request:") and reason in job["err"], job["err"]


CAP = 256 << 10
TRUNCATED = {
    "a declared 1 GiB chunk, flooded": flood(CHUNKED_HEAD + b"40000000\r\n", b"z" * 65536),
    "an endless body without length": flood(b"HTTP/1.1 200 OK\r\n\r\n", b"z" * 65536),
    "a huge Content-Length, flooded": flood(b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n", b"z" * 65536),
    "endless one-byte chunks": flood(CHUNKED_HEAD, b"1\r\nz\r\n" * 10000),
}


@pytest.mark.parametrize("case", list(TRUNCATED))
def test_endless_output_is_cut_at_the_cap(make_server, case):
    server = make_server(max_output_bytes=CAP)
    jobs, slowest, growth = attack(server, TRUNCATED[case])
    check_bounded(jobs, slowest, growth)
    for job in jobs:
        assert (job["status"], job["statusCode"]) == ("success", 200), job.get("err")
        kept, _, marker = job["output"].partition("\n")
        assert kept == "z" * CAP and "truncated" in marker

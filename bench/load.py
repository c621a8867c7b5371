"""The bench's load client: keep-alive HTTP/1.1 on non-blocking sockets, many gevent greenlets.

Requests are prebuilt bytes and response bodies are kept raw (decoded after the clock stops),
so the timed loop is just send, recv, find the header end and Content-Length. Each run reports
its own CPU use (`client_cpu`, the fraction of one core): near 1.0 means the client itself may be
the limit, which the baseline scenario checks against wrk.
"""
import errno
import os
import resource
import socket as pysocket
import time

import gevent
from gevent.hub import get_hub


def _cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def build_request(method, path, body=None, headers=None, host="127.0.0.1"):
    """A complete HTTP/1.1 keep-alive request as bytes."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    elif method in ("POST", "PUT"):
        lines.append("Content-Length: 0")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + (body or b"")


class Conn:
    """One keep-alive connection; reconnects by itself when the server closed it.

    A plain non-blocking socket with one persistent gevent read watcher: after sending, wait for
    readability and then recv. That skips gevent.socket's Python wrapper and its failed first
    recv per request, and halves the client's CPU per request (measured against bench.worker),
    which matters on a 2-core machine where the client's CPU is the server's loss.
    """

    def __init__(self, host, port, timeout=None):
        self.addr = (host, port)
        self.timeout = timeout  # per request; None = bounded by the caller (run's joinall)
        self.sock = None
        self.buf = b""
        self.hub = get_hub()

    def _connect(self):
        self.close()
        s = pysocket.socket(pysocket.AF_INET, pysocket.SOCK_STREAM)
        s.setsockopt(pysocket.IPPROTO_TCP, pysocket.TCP_NODELAY, 1)
        s.setblocking(False)
        self.sock = s
        self.rw = self.hub.loop.io(s.fileno(), 1)
        self.ww = self.hub.loop.io(s.fileno(), 2)
        err = s.connect_ex(self.addr)
        if err in (errno.EINPROGRESS, errno.EAGAIN):
            self.hub.wait(self.ww)
            err = s.getsockopt(pysocket.SOL_SOCKET, pysocket.SO_ERROR)
        if err:
            raise ConnectionRefusedError(err, os.strerror(err))

    def close(self):
        if self.sock is not None:
            self.rw.close()
            self.ww.close()
            self.sock.close()
        self.sock = None
        self.buf = b""

    def _recv(self):
        while True:
            self.hub.wait(self.rw)
            try:
                data = self.sock.recv(262144)
            except BlockingIOError:
                continue  # a spurious wake-up
            if not data:
                raise ConnectionError("connection closed by server")
            self.got_bytes = True
            return data

    def _send(self, raw):
        view = memoryview(raw)
        while view:
            try:
                view = view[self.sock.send(view) :]
            except BlockingIOError:
                self.hub.wait(self.ww)

    def request(self, raw):
        """Send prebuilt request bytes; returns (status, body bytes)."""
        if self.timeout is None:
            return self._request(raw)
        with gevent.Timeout(self.timeout, TimeoutError(f"no answer from {self.addr} in {self.timeout}s")):
            return self._request(raw)

    def _request(self, raw):
        fresh = self.sock is None
        if fresh:
            self._connect()
        self.got_bytes = False
        try:
            self._send(raw)
            return self._read_response()
        except (ConnectionError, OSError):
            self.close()
            if fresh or self.got_bytes:
                raise
            # Nothing came back on a kept-alive connection: the stale keep-alive case (the server
            # closed it while idle), so one retry on a new one. Should a server take the request
            # and then drop the connection, the retry pushes a second job, and the e2e scenario
            # shows it as `unexpected`, never as a silent success.
            self._connect()
            self._send(raw)
            return self._read_response()

    def _read_response(self):
        buf = self.buf
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            buf += self._recv()
        head = buf[:end]
        rest = buf[end + 4 :]
        status = int(head[9:12])
        lower = head.lower()
        i = lower.find(b"\r\ncontent-length:")
        if i >= 0:
            j = lower.find(b"\r\n", i + 2)
            length = int(head[i + 17 : j if j >= 0 else len(head)])
            while len(rest) < length:
                rest += self._recv()
            body, self.buf = rest[:length], rest[length:]
        elif b"\r\ntransfer-encoding: chunked" in lower:
            body, self.buf = self._read_chunked(rest)
        else:
            # No length: the body runs to the end of the connection.
            chunks = [rest]
            while True:
                try:
                    chunks.append(self._recv())
                except ConnectionError:
                    break
            body = b"".join(chunks)
            self.close()
            return status, body
        if b"\r\nconnection: close" in lower:
            self.close()
        return status, body

    def _read_chunked(self, buf):
        parts = []
        while True:
            while b"\r\n" not in buf:
                buf += self._recv()
            line, buf = buf.split(b"\r\n", 1)
            size = int(line.split(b";")[0], 16)
            while len(buf) < size + 2:
                buf += self._recv()
            if size == 0:
                while not buf.startswith(b"\r\n") and b"\r\n\r\n" not in buf:
                    buf += self._recv()
                rest = buf[2:] if buf.startswith(b"\r\n") else buf.split(b"\r\n\r\n", 1)[1]
                return b"".join(parts), rest
            parts.append(buf[:size])
            buf = buf[size + 2 :]


def get(host, port, path, timeout=10.0, headers=None):
    """One-off request for control traffic (stats, polling); returns (status, body)."""
    c = Conn(host, port, timeout)
    try:
        return c.request(build_request("GET", path, headers={"Connection": "close", **(headers or {})}))
    finally:
        c.close()


class Result:
    def __init__(self, n):
        self.sent = [0.0] * n  # time.monotonic() when the request was sent
        self.latency = [None] * n  # seconds, None when the request failed
        self.status = [None] * n
        self.body = [None] * n
        self.errors = 0
        self.done = 0
        self.elapsed = 0.0
        self.cpu = 0.0

    @property
    def rate(self):
        return self.done / self.elapsed if self.elapsed else 0.0

    def latencies(self, ok_only=True):
        return [lat for lat, st in zip(self.latency, self.status) if lat is not None and (not ok_only or 200 <= st < 300)]


def run(host, port, requests, concurrency=64, deadline_s=120.0, keep_bodies=False, timeout=None):
    """Send every prebuilt request in `requests` (in order) over `concurrency` keep-alive connections.

    Stops taking new requests once `deadline_s` has passed, and kills the connections still
    waiting 35 s later, so a stuck server cannot hang the bench; unsent requests stay `None`.
    No per-socket timeout by default: gevent arms a timer on every blocking recv for one, which
    costs ~10% of the client's CPU per request; the joinall bound does the job instead.
    """
    n = len(requests)
    res = Result(n)
    state = {"next": 0}
    stop_at = time.monotonic() + deadline_s
    monotonic = time.monotonic

    def loop():
        conn = Conn(host, port, timeout)
        try:
            while True:
                i = state["next"]
                if i >= n or monotonic() > stop_at:
                    return
                state["next"] = i + 1
                t0 = monotonic()
                res.sent[i] = t0
                try:
                    status, body = conn.request(requests[i])
                except (ConnectionError, OSError, ValueError):
                    res.errors += 1
                    conn.close()
                    gevent.sleep(0.01)  # a refusing server must not turn this into a busy loop
                    continue
                res.latency[i] = monotonic() - t0
                res.status[i] = status
                if keep_bodies:
                    res.body[i] = body
                res.done += 1
        finally:
            conn.close()

    cpu0, t0 = _cpu(), time.monotonic()
    workers = [gevent.spawn(loop) for _ in range(min(concurrency, max(1, n)))]
    gevent.joinall(workers, timeout=deadline_s + (timeout or 30) + 5)
    gevent.killall(workers, block=False)
    res.elapsed = time.monotonic() - t0
    res.cpu = (_cpu() - cpu0) / res.elapsed if res.elapsed else 0.0
    return res


def run_for(host, port, raw, duration_s, concurrency=64, timeout=None):
    """Send the same request for `duration_s` seconds; returns (requests/s, p50 s, p99 s, cpu, errors)."""
    lat = []
    errors = [0]
    stop_at = time.monotonic() + duration_s
    monotonic = time.monotonic

    def loop():
        conn = Conn(host, port, timeout)
        try:
            while monotonic() < stop_at:
                t0 = monotonic()
                try:
                    conn.request(raw)
                except (ConnectionError, OSError, ValueError):
                    errors[0] += 1
                    conn.close()
                    gevent.sleep(0.01)
                    continue
                lat.append(monotonic() - t0)
        finally:
            conn.close()

    cpu0, t0 = _cpu(), time.monotonic()
    workers = [gevent.spawn(loop) for _ in range(concurrency)]
    gevent.joinall(workers, timeout=duration_s + (timeout or 30) + 5)
    gevent.killall(workers, block=False)
    elapsed = time.monotonic() - t0
    return len(lat) / elapsed, percentile(lat, 50), percentile(lat, 99), (_cpu() - cpu0) / elapsed, errors[0]


def percentile(values, p):
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * p / 100.0))]

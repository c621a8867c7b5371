"""The worker request client against raw HTTP answers a real worker may give (chunked, no length,
interim 100, HTTP/1.0, closed keep-alive connections, basic auth), through a real server."""
import socket
import threading

import pytest


class RawWorker:
    """Answers each request with canned bytes; records the raw requests."""

    def __init__(self, answer, close=False):
        self.answer, self.close = answer, close
        self.requests = []
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        data = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, data = data.partition(b"\r\n\r\n")
                length = int([line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")][0])
                while len(data) < length:
                    data += conn.recv(65536)
                self.requests.append(head + b"\r\n\r\n" + data[:length])
                data = data[length:]
                conn.sendall(self.answer)
                if self.close:
                    return

    def stop(self):
        self.listener.close()


@pytest.fixture
def raw():
    workers = []

    def make(answer, close=False):
        worker = RawWorker(answer, close)
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        worker.stop()


def run(server, url, **job):
    return server.wait_job(server.push(url=url, **job)["id"])


def test_chunked_body_and_reuse(server, raw):
    w = raw(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-T: 1\r\n\r\n")
    for _ in range(3):
        job = run(server, w.url)
        assert job["status"] == "success" and job["output"] == "hello world"


def test_body_until_close_without_length(server, raw):
    w = raw(b"HTTP/1.1 201 Created\r\nConnection: close\r\n\r\nall of it", close=True)
    job = run(server, w.url)
    assert (job["status"], job["statusCode"], job["output"]) == ("success", 201, "all of it")


def test_interim_100_continue_is_skipped(server, raw):
    w = raw(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\nok")
    assert run(server, w.url)["statusCode"] == 202


def test_http10_worker_and_empty_reason(server, raw):
    w = raw(b"HTTP/1.0 503 \r\nContent-Length: 4\r\n\r\nbusy", close=True)
    job = run(server, w.url)
    assert (job["status"], job["statusCode"], job["err"], job["output"]) == ("failure", 503, "Service Unavailable", "busy")


def test_garbage_answer_is_a_failure_not_a_crash(server, raw):
    w = raw(b"SSH-2.0-OpenSSH\r\n\r\n", close=True)
    job = run(server, w.url)
    assert job["status"] == "failure" and job["statusCode"] is None
    assert job["err"].startswith("failed to do http request:") and "malformed" in job["err"]


def test_worker_closing_without_answer(server, raw):
    w = raw(b"", close=True)
    job = run(server, w.url)
    assert job["status"] == "failure" and "closed the connection" in job["err"]


def test_chunked_output_is_capped(make_server, raw):
    srv = make_server(max_output_bytes=8)
    w = raw(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nabcdef\r\n6\r\nghijkl\r\n0\r\n\r\n")
    job = run(srv, w.url)
    assert job["status"] == "success" and job["output"].startswith("abcdefgh\n") and "truncated" in job["output"]


def test_basic_auth_from_the_url_and_host_header(server, raw):
    w = raw(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    port = w.url.rsplit(":", 1)[1]
    run(server, f"http://user:p%40ss@127.0.0.1:{port}/a?b=1")
    head = w.requests[-1].decode()
    assert head.startswith("POST /a?b=1 HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{port}\r\n" in head
    assert "Authorization: Basic dXNlcjpwQHNz\r\n" in head  # user:p@ss
    assert "Content-Length: 0\r\n" in head

"""The worker request client against raw HTTP answers a real worker may give (chunked, no length,
interim 100, HTTP/1.0, closed keep-alive connections, basic auth), through a real server."""

import pytest

from conftest import SocketWorker


class RawWorker(SocketWorker):
    """Answers each request with canned bytes; records the raw requests."""

    def __init__(self, answer, close=False):
        self.answer, self.close_after = answer, close
        self.requests = []
        super().__init__()

    def serve(self, conn):
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
                if self.close_after:
                    return


@pytest.fixture
def raw():
    workers = []

    def make(answer, close=False):
        worker = RawWorker(answer, close)
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        worker.close()


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


def header_lines(raw_request):
    head = raw_request.partition(b"\r\n\r\n")[0].decode()
    return [line.partition(": ") for line in head.split("\r\n")[1:]]


def sent(raw_request, name):
    """Every value sent under `name` (compared case-insensitively)."""
    return [value for n, _, value in header_lines(raw_request) if n.lower() == name.lower()]


def test_job_headers_replace_ours_case_insensitively(server, raw):
    w = raw(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    run(server, w.url, payload={"a": 1}, headers={
        "content-type": "text/plain", "USER-AGENT": "mine/1", "x-hq-job-id": "forged", "X-HQ-ATTEMPT": "99",
        "Content-Length": "5", "X-Extra": "yes"})
    request = w.requests[-1]
    assert sent(request, "Content-Type") == ["text/plain"]
    assert sent(request, "User-Agent") == ["mine/1"]
    assert sent(request, "X-Hq-Attempt") == ["1"]
    assert sent(request, "Content-Length") == ["7"]  # {"a":1}
    assert sent(request, "X-Extra") == ["yes"]
    job_id = sent(request, "X-Hq-Job-Id")
    assert len(job_id) == 1 and job_id[0].isdigit()
    names = [n.lower() for n, _, _ in header_lines(request)]
    assert len(names) == len(set(names)), names


@pytest.mark.parametrize("status,reason", [(301, "Moved Permanently"), (302, "Found"), (307, "Temporary Redirect"), (308, "Permanent Redirect")])
def test_redirects_are_not_followed(server, raw, status, reason):
    target = raw(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    w = raw(f"HTTP/1.1 {status} {reason}\r\nLocation: {target.url}/elsewhere\r\nContent-Length: 5\r\n\r\nmoved".encode())
    job = run(server, w.url)
    assert (job["status"], job["statusCode"], job["err"], job["output"]) == ("failure", status, reason, "moved")
    assert len(w.requests) == 1 and target.requests == []


# --- the client on its own (what the dispatcher's retries read from it) --------------------------

def direct(answer_bytes, raw, **send):
    from hq_gevent.delivery import Delivery

    w = raw(answer_bytes)
    response = Delivery(1 << 20).send(send.pop("job_id", 7), w.url + "/x", '{"a":1}', send.pop("headers", None),
                                      send.pop("timeout", 10), **send)
    return response, w.requests[-1]


def test_attempt_header(raw):
    response, request = direct(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", raw, attempt=3,
                               headers={"x-hq-attempt": "1"})
    assert sent(request, "X-Hq-Attempt") == ["3"] and response.body == b"ok"
    assert (response.retry_after, response.no_retry) == (None, False)


@pytest.mark.parametrize("value,expected", [("120", 120.0), ("0", 0.0), ("9999999", 86400.0), ("soon", None)])
def test_retry_after_seconds(raw, value, expected):
    answer = f"HTTP/1.1 503 Service Unavailable\r\nRetry-After: {value}\r\nContent-Length: 0\r\n\r\n".encode()
    response, _ = direct(answer, raw)
    assert response.status == 503 and response.retry_after == expected


def test_retry_after_http_date(raw):
    import email.utils
    import time

    when = email.utils.formatdate(time.time() + 90, usegmt=True)
    response, _ = direct(f"HTTP/1.1 429 Too Many Requests\r\nretry-after: {when}\r\nContent-Length: 0\r\n\r\n".encode(), raw)
    assert 85 <= response.retry_after <= 91
    past = email.utils.formatdate(time.time() - 3600, usegmt=True)
    response, _ = direct(f"HTTP/1.1 429 Too Many Requests\r\nRetry-After: {past}\r\nContent-Length: 0\r\n\r\n".encode(), raw)
    assert response.retry_after == 0


@pytest.mark.parametrize("value,expected", [("true", True), ("TRUE", True), (" True ", True), ("false", False), ("1", False)])
def test_no_retry_header(raw, value, expected):
    response, _ = direct(f"HTTP/1.1 500 Internal Server Error\r\nX-Hq-No-Retry: {value}\r\nContent-Length: 0\r\n\r\n".encode(), raw)
    assert response.no_retry is expected


def test_header_injection_never_reaches_the_wire(raw):
    from hq_gevent.delivery import DeliveryError

    with pytest.raises(DeliveryError, match="invalid header"):
        direct(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", raw, headers={"X-A": "b\r\nX-Injected: 1"})


def test_timeout_bounds_a_trickled_body(raw):
    """A unit-level twin of tests/test_hostile_worker.py: a body that never completes ends at the timeout."""
    import time

    from hq_gevent.delivery import DeliveryError

    t0 = time.monotonic()
    with pytest.raises(DeliveryError, match="timeout after 1s"):
        direct(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this", raw, timeout=1)
    assert time.monotonic() - t0 < 5

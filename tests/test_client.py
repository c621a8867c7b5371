"""hq_gevent.client against a real server; its errors carry the server's status and text."""
import socket
import threading
import time

import pytest

from conftest import free_port
from hq_gevent.client import Client, HQConnectionError, HQError


class Listener:
    """A real TCP listener that counts connections and answers each one with `reply` (or nothing)."""

    def __init__(self, reply=None, hold=0.0):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.reply, self.hold, self.connections, self.closing = reply, hold, 0, False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    @property
    def address(self):
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def run(self):
        deadline = time.monotonic() + 30
        while not self.closing and time.monotonic() < deadline:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            with conn:
                conn.settimeout(2)
                try:
                    conn.recv(65536)
                    time.sleep(self.hold)
                    if self.reply:
                        conn.sendall(self.reply)
                except OSError:
                    pass

    def close(self):
        self.closing = True
        self.thread.join(5)
        self.sock.close()


def test_routes_return_plain_dicts(server, worker):
    with Client(server.url, timeout=10) as hq:
        info = hq.info()
        assert set(info) >= {"version", "commitHash"}
        assert hq.stats()["numJobs"] == 0

        job = hq.push(url=worker.url, name="lib", payload={"x": 1}, headers={"X-A": "b"}, timeout=5)
        assert type(job) is dict and job["status"] == "waiting" and job["name"] == "lib"
        assert hq.push({"url": worker.url, "comment": "dict form"})["comment"] == "dict form"
        done = hq.wait(job["id"], timeout=15)
        assert done["status"] == "success" and done["output"] == "OK"
        assert hq.get(int(job["id"])) == hq.get(job["id"]) == server.job(job["id"])

        page = hq.list(name="^lib$")
        assert [j["id"] for j in page["jobs"]] == [job["id"]] and page["hasNext"] is False
        page = hq.list(limit=1, reverse=True)
        assert page["hasNext"] is True and page["next"] == job["id"] and page["count"] == 1

        again = hq.restart(job["id"])
        assert again["id"] == job["id"] and again["waiting"] is True
        hq.wait(job["id"], timeout=15)
        copy = hq.restart(job, copy=True)
        assert copy["id"] != job["id"] and copy["payload"] == {"x": 1}
        hq.wait(copy, timeout=15)
        assert hq.delete(copy["id"]) == {"id": copy["id"]}

        worker.hold()
        held = hq.push(url=worker.url)
        worker.wait_requests(5)
        assert hq.stop(held["id"]) == {"id": held["id"]}
        assert hq.wait(held["id"], timeout=15)["status"] == "canceled"
        worker.release()


def test_iter_jobs_follows_next(server, worker):
    ids = [server.push(url=worker.url, name=f"it{i}")["id"] for i in range(5)]
    hq = Client(server.url)
    assert [j["id"] for j in hq.iter_jobs(page_size=2)] == ids
    assert [j["id"] for j in hq.iter_jobs(page_size=2, reverse=True, begin=ids[3])] == ids[3::-1]
    assert [j["id"] for j in hq.iter_jobs(page_size=1, name="it[13]")] == [ids[1], ids[3]]


def test_server_errors_carry_status_and_text(server, worker):
    hq = Client(server.url)
    cases = [
        (lambda: hq.push(name="no url"), 422, "'url' is required"),
        (lambda: hq.get("123"), 422, "The job '123' is not found"),
        (lambda: hq.request("GET", "/no/such/route"), 404, "Not Found"),
        (lambda: hq.request("PUT", "/job"), 405, "Method Not Allowed"),
        (lambda: hq.list(name="("), 422, None),
    ]
    for call, status, text in cases:
        with pytest.raises(HQError) as e:
            call()
        assert e.value.status == status, (status, e.value.error)
        assert isinstance(e.value.error, str) and e.value.error
        if text:
            assert e.value.error == text and str(e.value) == text

    job = hq.push(url=worker.url)
    hq.wait(job["id"], timeout=15)
    with pytest.raises(HQError) as e:
        hq.stop(job["id"])
    assert (e.value.status, e.value.error) == (422, f"The job {job['id']} is not active")


def test_bad_ids_fail_before_any_request():
    listener = Listener()
    try:
        hq = Client(listener.address)
        for bad in ("abc", "-1", "1.0", "", str(1 << 64), "١٢"):
            with pytest.raises(ValueError):
                hq.get(bad)
        with pytest.raises(ValueError):
            hq.list(begin="x")
        time.sleep(0.3)
        assert listener.connections == 0
    finally:
        listener.close()


def test_unreachable_server_is_a_distinct_error_naming_the_address():
    port = free_port()
    hq = Client(f"127.0.0.1:{port}/")  # host:port means http; the slash is dropped
    assert hq.address == f"http://127.0.0.1:{port}"
    with pytest.raises(HQConnectionError) as e:
        hq.stats()
    assert not isinstance(e.value, HQError)
    assert e.value.address == f"http://127.0.0.1:{port}"
    assert str(e.value) == f"cannot reach hq-gevent at http://127.0.0.1:{port}: Connection refused"


def test_timeout_on_a_silent_server():
    listener = Listener(hold=3)
    try:
        started = time.monotonic()
        with pytest.raises(HQConnectionError) as e:
            Client(listener.address, timeout=0.3).stats()
        assert time.monotonic() - started < 2.5
        assert "no answer within 0.3s" in str(e.value)
    finally:
        listener.close()


def test_push_is_never_retried():
    # The connection drops after the request was sent: the job may or may not be stored, so a
    # retry could enqueue it twice. Exactly one connection must be made.
    listener = Listener()
    try:
        with pytest.raises(HQConnectionError):
            Client(listener.address, timeout=5).push(url="http://127.0.0.1:9/")
        time.sleep(0.3)
        assert listener.connections == 1
    finally:
        listener.close()


def test_a_non_hq_answer_is_an_hq_error():
    listener = Listener(reply=b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 11\r\nConnection: close\r\n\r\nproxy oops\n")
    try:
        with pytest.raises(HQError) as e:
            Client(listener.address).info()
        assert e.value.status == 502 and "proxy oops" in e.value.error
    finally:
        listener.close()

"""hq_gevent.client against a real server; its errors carry the server's status and text."""
import socket
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from conftest import free_port
from hq_gevent.client import (BatchError, Client, HQAuthError, HQConnectionError, HQError, PushedJob, rfc3339,
                              with_policy)
from test_cli import READ_TOKEN, TOKEN, logged, seconds_from_now, start_guarded, tls_cert, wait_logged  # noqa: F401


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
        assert isinstance(job, dict) and job["status"] == "waiting" and job["name"] == "lib"
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


# --- delivery policy, batch push (SPEC §10) ------------------------------------------------
def test_with_policy_builds_the_push_keys():
    job = {"url": "http://h/", "retry": {"maxAttempts": 2, "maxRetryDuration": 60}, "delay": 5}
    plus_two = timezone(timedelta(hours=2))
    assert with_policy(job, retry={"minBackoff": 0.5}, run_at=datetime(2026, 12, 24, 20, 0, 0, 123456, plus_two),
                       unique_key="k") == {
        "url": "http://h/", "retry": {"maxAttempts": 2, "maxRetryDuration": 60, "minBackoff": 0.5},
        "runAt": "2026-12-24T18:00:00.123Z", "uniqueKey": "k"}
    assert with_policy(job, retry=7, delay=timedelta(minutes=2))["retry"]["maxAttempts"] == 7
    assert with_policy({"runAt": "x"}, delay=timedelta(minutes=2)) == {"delay": 120.0}
    assert job["delay"] == 5 and "runAt" not in job  # the caller's dict is left alone
    assert rfc3339(datetime(2026, 1, 2, 3, 4, 5)) == "2026-01-02T03:04:05.000Z"  # naive means UTC
    assert with_policy({"runAt": datetime(2026, 1, 2, 3, 4, 5)}) == {"runAt": "2026-01-02T03:04:05.000Z"}
    assert rfc3339("2026-12-24T18:00:00+01:00") == "2026-12-24T18:00:00+01:00"  # a string is the server's to check
    for kwargs, error in (({"delay": 1, "run_at": "2026-12-24T18:00:00Z"}, ValueError), ({"run_at": 5}, TypeError),
                          ({"retry": "3"}, TypeError), ({"retry": True}, TypeError)):
        with pytest.raises(error):
            with_policy({}, **kwargs)


def test_push_policy_keywords_reach_the_server(server, worker):
    hq = Client(server.url, timeout=10)
    at = (datetime.now(timezone(timedelta(hours=-5))) + timedelta(hours=1)).replace(microsecond=250000)
    job = hq.push(url=worker.url, retry=3, run_at=at, unique_key="k-1")
    assert isinstance(job, PushedJob) and job.duplicate is False
    assert job["retry"]["maxAttempts"] == 3 and job["uniqueKey"] == "k-1"
    assert job["runAt"] == rfc3339(at) and job["runAt"].endswith(".250Z")
    assert server.job(job["id"])["runAt"] == job["runAt"]

    naive = (datetime.now(timezone.utc) + timedelta(hours=2)).replace(tzinfo=None, microsecond=0)
    assert hq.push(url=worker.url, run_at=naive)["runAt"] == naive.strftime("%Y-%m-%dT%H:%M:%S.000Z")
    policy = {"maxAttempts": 4, "minBackoff": 0.25, "maxBackoff": 1, "maxRetryDuration": 30}
    delayed = hq.push({"url": worker.url, "name": "d"}, retry=policy, delay=timedelta(minutes=10))
    assert delayed["retry"] == policy and 540 < seconds_from_now(delayed["runAt"]) <= 600
    text = (datetime.now(timezone.utc) + timedelta(hours=3)).astimezone(timezone(timedelta(hours=2)))
    as_text = hq.push(url=worker.url, run_at=text.isoformat(timespec="milliseconds"))
    assert as_text["runAt"] == rfc3339(text)

    again = hq.push(url=worker.url + "/other", unique_key="k-1")
    assert again.duplicate is True and again["id"] == job["id"] and again["url"] == worker.url
    assert hq.stats()["numJobs"] == 4

    for kwargs, status in (({"retry": {"maxAttempts": 0}}, 422), ({"retry": {"bogus": 1}}, 400),
                           ({"run_at": "soon"}, 422), ({"delay": -1}, 422), ({"unique_key": ""}, 422)):
        with pytest.raises(HQError) as e:
            hq.push(url=worker.url, **kwargs)
        assert e.value.status == status, (kwargs, e.value.status, e.value.error)
    assert hq.stats()["numJobs"] == 4


def test_push_many_batches_of_1000_in_order(make_server, worker, tmp_path):
    access = tmp_path / "access.log"
    server = make_server(access_log_file=str(access))
    hq = Client(server.url, timeout=60)
    assert hq.push_many([]) == []
    pushed = hq.push_many({"url": worker.url, "name": f"m{i}"} for i in range(1500))
    assert [j["name"] for j in pushed] == [f"m{i}" for i in range(1500)]
    ids = [j["id"] for j in pushed]
    assert len(set(ids)) == 1500 and ids == sorted(ids, key=int)
    assert [j["id"] for j in hq.iter_jobs()] == ids
    assert wait_logged(access, "POST", "/jobs", 2) == 2 and logged(access, "POST", "/job") == 0

    # A duplicate key is answered with the stored job: compare ids.
    twice = hq.push_many([{"url": worker.url, "uniqueKey": "d"}, {"url": worker.url, "uniqueKey": "d"},
                          {"url": worker.url, "delay": 600, "retry": {"maxAttempts": 2}}])
    assert twice[0]["id"] == twice[1]["id"] != twice[2]["id"] and twice[2]["retry"]["maxAttempts"] == 2
    assert twice[2]["runAt"] is not None

    # A refused job in the second batch: the first batch is stored, the index counts from the caller's list.
    jobs = [{"url": worker.url} for _ in range(1001)]
    jobs[1000] = {"url": "ftp://example.com/"}
    with pytest.raises(BatchError) as e:
        hq.push_many(jobs)
    assert (e.value.status, e.value.index, len(e.value.pushed)) == (422, 1000, 1000)
    assert e.value.error == f"jobs[1000]: {e.value.reason}" and "url" in e.value.reason
    assert hq.stats()["numJobs"] == 1500 + 2 + 1000


# --- tokens and TLS (SPEC §11) ----------------------------------------------------------------
def test_token_from_argument_or_environment(make_server, worker, monkeypatch):
    srv, address = start_guarded(make_server, auth_tokens=[TOKEN], auth_read_tokens=[READ_TOKEN])
    monkeypatch.delenv("HQ_TOKEN", raising=False)
    with pytest.raises(HQAuthError) as e:
        Client(address).stats()
    assert (e.value.status, e.value.error) == (401, "Unauthorized") and isinstance(e.value, HQError)
    job = Client(address, token=TOKEN).push(url=worker.url)
    assert Client(address, token=TOKEN).push_many([{"url": worker.url}])[0]["id"] != job["id"]
    monkeypatch.setenv("HQ_TOKEN", READ_TOKEN)
    reader = Client(address)
    assert reader.get(job["id"])["id"] == job["id"]
    with pytest.raises(HQAuthError) as e:
        reader.stop(job["id"])
    assert (e.value.status, e.value.error) == (403, "Forbidden")
    with pytest.raises(HQAuthError):
        Client(address, token="").stats()  # "" ignores $HQ_TOKEN
    for bad in ("two words-0123456789", "line\nbreak-0123456789", "caf\u00e9-0123456789"):
        with pytest.raises(ValueError) as e:
            Client(address, token=bad)
        assert bad not in str(e.value) and "printable ASCII" in str(e.value)


def test_cacert_from_argument_or_environment(make_server, tls_cert, monkeypatch, tmp_path):
    cert, key = tls_cert
    srv, address = start_guarded(make_server, tls_cert_file=str(cert), tls_key_file=str(key))
    monkeypatch.delenv("HQ_CACERT", raising=False)
    assert Client(address, cacert=str(cert)).stats()["numJobs"] == 0
    with pytest.raises(HQConnectionError) as e:
        Client(address).stats()
    assert "certificate verify failed" in e.value.reason
    monkeypatch.setenv("HQ_CACERT", str(cert))
    assert Client(address).stats()["numJobs"] == 0
    with pytest.raises(ValueError):
        Client(address, cacert=str(tmp_path / "none.pem"))

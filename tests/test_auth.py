"""API tokens (issue 12, SPEC §11) against a real server: exact 401/403 answers, what a read token may
do, the open routes, token files, and tokens never written to a log."""
import json
import logging
import socket
import time

import pytest
import requests

from hq_gevent import auth
from hq_gevent.config import from_dict

FULL = "full-token-4f1c9a7e2b"
FULL2 = "second-full-token-88d0"
READ = "read-token-0c3b5d9e61"
JSON_TYPE = "application/json; charset=UTF-8"
UNAUTHORIZED = b'{"status":401,"error":"Unauthorized"}'
FORBIDDEN = b'{"status":403,"error":"Forbidden"}'


def wait_up(srv, timeout=20):
    """Until GET /readyz (open with tokens on) says the jobs are loaded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if srv.proc.poll() is not None:
            raise RuntimeError(f"server exited with {srv.proc.returncode}:\n{srv.log()}")
        try:
            if requests.get(srv.url + "/readyz", timeout=1).status_code == 200:
                return srv
        except requests.RequestException:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"server not up in {timeout}s:\n{srv.log()}")


@pytest.fixture
def start(make_server):
    def start(**config):
        srv = make_server(start=False, **config)
        srv.start(wait=False)
        return wait_up(srv)
    return start


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def test_no_token_is_401_with_the_exact_body_and_header(start):
    srv = start(auth_tokens=[FULL])
    for headers in ({}, bearer("wrong-token-000000000"), bearer(FULL + "x"), bearer(FULL[:-1]),
                    {"Authorization": f"Basic {FULL}"}, {"Authorization": FULL}, {"Authorization": "Bearer "},
                    {"Authorization": "Bearer " + "\u00e9" * 20}):
        for method, path in (("GET", "/"), ("GET", "/job"), ("POST", "/job"), ("GET", "/stats"),
                             ("DELETE", "/job/1"), ("GET", "/nowhere")):
            r = requests.request(method, srv.url + path, headers=headers, timeout=10)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.content == UNAUTHORIZED
            assert r.headers["WWW-Authenticate"] == 'Bearer realm="hq-gevent"'
            assert r.headers["Content-Type"] == JSON_TYPE
    # A token in the query string is not a token (it would end up in the access log).
    for query in (f"token={FULL}", f"access_token={FULL}", f"auth={FULL}"):
        assert requests.get(f"{srv.url}/job?{query}", timeout=10).status_code == 401


def test_full_token_may_do_everything(start, worker):
    srv = start(auth_tokens=[FULL, FULL2])
    for token in (FULL, FULL2):  # each configured token works, not only the first
        srv.session.headers.update(bearer(token))
        job = srv.push(url=worker.url + "/t", payload={"with": token[:4]})
        assert srv.wait_job(job["id"])["status"] == "success"
        assert srv.api("DELETE", f"/job/{job['id']}")[0] == 200
    # The scheme is case-insensitive (RFC 7235).
    r = requests.get(srv.url + "/stats", headers={"Authorization": f"bearer {FULL}"}, timeout=10)
    assert r.status_code == 200, r.text


def test_read_token_may_only_read(start, worker):
    srv = start(auth_tokens=[FULL], auth_read_tokens=[READ])
    srv.session.headers.update(bearer(FULL))
    job = srv.push(url=worker.url + "/r")
    srv.wait_job(job["id"])
    reader = requests.Session()
    reader.headers.update(bearer(READ))
    assert reader.get(srv.url + "/job", timeout=10).json()["count"] == 1
    assert reader.get(f"{srv.url}/job/{job['id']}", timeout=10).json()["id"] == job["id"]
    assert reader.get(srv.url + "/stats", timeout=10).status_code == 200
    assert reader.head(srv.url + "/stats", timeout=10).status_code == 200
    assert reader.get(srv.url + "/ui/internal/job", timeout=10).status_code == 200
    for method, path, body in (("POST", "/job", {"url": worker.url + "/no"}),
                               ("POST", f"/job/{job['id']}/restart", {}),
                               ("POST", f"/job/{job['id']}/stop", None),
                               ("DELETE", f"/job/{job['id']}", None),
                               ("POST", "/ui/internal/job", {"url": worker.url + "/no"}),
                               ("PUT", "/job", None)):
        r = reader.request(method, srv.url + path, json=body, timeout=10)
        assert r.status_code == 403, (method, path, r.text)
        assert r.content == FORBIDDEN and r.headers["Content-Type"] == JSON_TYPE
    # Nothing was pushed, restarted or deleted.
    jobs = srv.api("GET", "/job")[1]["jobs"]
    assert [j["id"] for j in jobs] == [job["id"]] and jobs[0]["status"] == "success"
    assert len(worker.requests) == 1


def test_open_routes(start):
    srv = start(auth_tokens=[FULL])
    # The web UI's page and files load without a token (the page then asks for one)...
    for path in ("/ui/", "/ui/app.js", "/ui/style.css", "/ui/index.html", "/ui/jobs/123"):
        r = requests.get(srv.url + path, timeout=10)
        assert r.status_code == 200, (path, r.status_code)
    assert requests.get(srv.url + "/ui", timeout=10, allow_redirects=False).status_code in (302, 303)
    # ...but not its API, however the path is spelled.
    for path in ("/ui/internal/job", "/ui/internal/stats", "/ui/internal/", "/ui/%69nternal/job"):
        assert requests.get(srv.url + path, timeout=10).status_code == 401, path
    # Health checks are open; /metrics is not by default.
    for path in ("/healthz", "/readyz"):
        assert requests.get(srv.url + path, timeout=10).status_code == 200, path
        assert requests.post(srv.url + path, timeout=10).status_code == 401, path
    assert requests.get(srv.url + "/metrics", timeout=10).status_code == 401


def test_metrics_public_opens_only_metrics(start):
    srv = start(auth_tokens=[FULL], metrics_public=True)
    assert requests.get(srv.url + "/metrics", timeout=10).status_code == 200
    assert requests.get(srv.url + "/stats", timeout=10).status_code == 401


def test_ui_off_closes_its_paths(start):
    srv = start(auth_tokens=[FULL], ui=False)
    assert requests.get(srv.url + "/ui/", timeout=10).status_code == 401


def test_refused_push_with_a_body_stores_nothing_and_closes(start):
    srv = start(auth_tokens=[FULL], auth_read_tokens=[READ])
    body = json.dumps({"url": "http://127.0.0.1:9/x"}).encode()
    smuggled = b"POST /job HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body), body)
    for auth_line in (b"", b"Authorization: Bearer " + READ.encode() + b"\r\n"):
        request = (b"POST /job HTTP/1.1\r\nHost: x\r\n" + auth_line
                   + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(smuggled), smuggled))
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(request)
            received = b""
            while chunk := s.recv(65536):
                received += chunk
        assert received.split(b" ")[1] in (b"401", b"403"), received
        assert received.count(b"HTTP/1.1") == 1 and b"Connection: close" in received, received
    assert requests.get(srv.url + "/job", headers=bearer(FULL), timeout=10).json()["count"] == 0


def test_tokens_are_never_logged(start, tmp_path):
    access_log = tmp_path / "access.log"
    srv = start(auth_tokens=[FULL], auth_read_tokens=[READ], access_log_file=str(access_log), log_level="debug")
    wrong = "wrong-but-long-token-0001"
    for token in (FULL, READ, wrong):
        for method in ("GET", "POST", "DELETE"):
            requests.request(method, srv.url + "/job", headers=bearer(token), json={"url": "http://127.0.0.1:9/"},
                             timeout=10)
    requests.get(srv.url + "/job", headers={"Authorization": f"Basic {FULL}"}, timeout=10)
    # Malformed requests that carry a token, refused before the app: the refusal is logged, not the head.
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(b"POST /job HTTP/1.1\r\nAuthorization: Bearer " + FULL.encode()
                  + b"\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
        while s.recv(65536):
            pass
    assert srv.stop() == 0
    logs = access_log.read_text() + srv.log()
    assert logs.count('"status":401') >= 2 and logs.count('"status":403') == 2, logs
    for secret in (FULL, READ, wrong, "Authorization", "Bearer"):
        assert secret not in logs, secret


def test_token_files(start, tmp_path):
    full_file = tmp_path / "tokens"
    full_file.write_text(f"# hq-gevent API tokens, one per line\n\n{FULL}\n  {FULL2}  \n# old: retired\n")
    read_file = tmp_path / "read-tokens"
    read_file.write_text(f"{READ}\r\n")
    srv = start(auth_tokens_file=str(full_file), auth_read_tokens_file=str(read_file))
    for token in (FULL, FULL2):
        assert requests.post(srv.url + "/job/1/stop", headers=bearer(token), timeout=10).status_code == 422
    assert requests.post(srv.url + "/job/1/stop", headers=bearer(READ), timeout=10).status_code == 403
    assert requests.get(srv.url + "/stats", headers=bearer(READ), timeout=10).status_code == 200
    assert requests.get(srv.url + "/stats", headers=bearer("# old: retired"), timeout=10).status_code == 401
    assert "API tokens required: 2 full access, 1 read-only" in srv.log()


@pytest.mark.parametrize("content, expected", [
    (None, "cannot read auth_tokens_file {path}: No such file or directory"),
    (f"{FULL}\nshort-secret\n", "auth_tokens_file {path} line 2: a token must be at least 16 characters"),
    ("# nothing but a comment\n\n", "auth_tokens_file {path} holds no token"),
    (f"{FULL} # with a comment\n", "auth_tokens_file {path} line 1: a token must be printable ASCII without spaces"),
], ids=["missing", "short", "empty", "inline-comment"])
def test_unusable_token_file_stops_the_start_without_printing_it(make_server, tmp_path, content, expected):
    path = tmp_path / "tokens"
    if content is not None:
        path.write_text(content)
    srv = make_server(start=False, auth_tokens_file=str(path))
    srv.start(wait=False)
    assert srv.proc.wait(20) == 1
    log = srv.log()
    assert expected.format(path=path) in log, log
    assert FULL not in log and "short-secret" not in log


def test_unreadable_token_file(make_server, tmp_path):
    import os

    path = tmp_path / "tokens"
    if os.geteuid() == 0:  # root reads any file: a directory is what it cannot read
        path.mkdir()
        reason = "Is a directory"
    else:
        path.write_text(FULL + "\n")
        path.chmod(0)
        reason = "Permission denied"
    srv = make_server(start=False, auth_tokens_file=str(path))
    srv.start(wait=False)
    assert srv.proc.wait(20) == 1
    assert f"cannot read auth_tokens_file {path}: {reason}" in srv.log(), srv.log()


def test_same_token_for_full_and_read_is_refused(make_server):
    srv = make_server(start=False, auth_tokens=[FULL], auth_read_tokens=[FULL])
    srv.start(wait=False)
    assert srv.proc.wait(20) == 1
    assert "both for full access and as a read token" in srv.log() and FULL not in srv.log()


def test_open_server_warns_only_off_loopback(caplog):
    caplog.set_level(logging.INFO, logger="hq_gevent")
    app = object()
    for addr, warns in (("0.0.0.0:19900", True), ("[::]:19900", True), ("10.1.2.3:19900", True),
                        ("hq.example.com:19900", True), ("127.0.0.1:19900", False), ("[::1]:19900", False),
                        ("localhost:19900", False)):
        caplog.clear()
        assert auth.wrap(app, from_dict({"addr": addr})) is app  # no token: the app itself, open
        warned = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert bool(warned) == warns, addr
        if warns:
            assert "No API token is configured" in warned[0].getMessage()
    caplog.clear()
    assert auth.wrap(app, from_dict({"addr": "0.0.0.0:19900", "auth_tokens": [FULL]})) is not app
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_open_server_on_loopback_logs_no_warning(make_server):
    srv = make_server()
    assert "No API token" not in srv.log()
    assert srv.api("GET", "/")[0] == 200

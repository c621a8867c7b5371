"""Every route of SPEC §5 against a real server subprocess and a real worker app."""
import json
import re
import time

import pytest
import requests

from conftest import HQServer, WorkerApp


@pytest.fixture(scope="module")
def app():
    worker = WorkerApp()
    yield worker
    worker.close()


@pytest.fixture(scope="module")
def srv(tmp_path_factory, app):
    server = HQServer(tmp_path_factory.mktemp("api"), {"max_workers": 4, "job_list_default_limit": 0}).start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def reset_worker(app):
    app.respond(200, b"OK")
    app.release()
    yield
    app.release()


ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
KEYS = {"id", "name", "comment", "url", "payload", "headers", "timeout", "createdAt", "startedAt", "finishedAt",
        "success", "failure", "canceled", "waiting", "running", "statusCode", "output", "err", "status",
        "retry", "attempts", "runAt", "uniqueKey", "history"}  # SPEC §10.1


def test_info(srv):
    r = srv.request("GET", "/")
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "application/json; charset=UTF-8"
    body = r.json()
    assert set(body) == {"version", "commitHash"}
    import hq_gevent
    assert body["version"] == hq_gevent.__version__


def test_pretty_indents_and_default_is_minimized(srv):
    assert "\n" not in srv.request("GET", "/stats").text
    pretty = srv.request("GET", "/stats?pretty").text
    assert pretty.startswith("{\n  ")
    assert json.loads(pretty)["queues"] == 8192


def test_push_returns_waiting_job_with_every_field(srv, app):
    app.hold()
    job = srv.push(url=app.url + "/x", payload={"a": [1, 2]}, name="n1", comment="c1", headers={"X-A": "b"}, timeout=5)
    assert set(job) == KEYS
    assert job["waiting"] is True and job["status"] == "waiting" and job["running"] is False
    assert job["name"] == "n1" and job["comment"] == "c1" and job["payload"] == {"a": [1, 2]}
    assert job["headers"] == {"X-A": "b"} and job["timeout"] == 5
    assert ISO.match(job["createdAt"]) and job["startedAt"] is None and job["finishedAt"] is None
    assert job["statusCode"] is None and job["output"] == "" and job["err"] == ""
    assert job["id"].isdigit()
    app.release()
    done = srv.wait_job(job["id"])
    assert done["status"] == "success" and done["statusCode"] == 200 and done["output"] == "OK"
    assert ISO.match(done["startedAt"]) and ISO.match(done["finishedAt"])


def test_created_at_is_the_time_in_the_id(srv, app):
    job = srv.push(url=app.url)
    ms = (int(job["id"]) >> 22) + 1546300800000
    assert job["createdAt"] == time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + ".%03dZ" % (ms % 1000)
    assert abs(ms / 1000 - time.time()) < 60


def test_defaults_for_name_comment_headers_timeout(srv, app):
    job = srv.push(url=app.url, name="")
    assert job["name"] == "default" and job["comment"] == "" and job["headers"] is None
    assert job["timeout"] == 0 and job["payload"] is None


def test_form_field_payload_is_accepted(srv, app):
    r = srv.request("POST", "/job", data={"payload": json.dumps({"url": app.url, "name": "form"})})
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "form"


@pytest.mark.parametrize("body,status,text", [
    ("{", 400, "invalid JSON"),
    ("", 422, "'url' is required"),  # an empty body is a job without url (SPEC §5, as HQ)
    ("[1,2]", 400, "JSON object"),
    ('"url"', 400, "JSON object"),
    ('{"url": 5}', 400, "'url' must be a string"),
    ('{"url": "http://x/", "name": 1}', 400, "'name' must be a string"),
    ('{"url": "http://x/", "timeout": "5"}', 400, "'timeout' must be an integer"),
    ('{"url": "http://x/", "timeout": 1.5}', 400, "'timeout' must be an integer"),
    ('{"url": "http://x/", "headers": ["a"]}', 400, "'headers'"),
    ('{"url": "http://x/", "headers": {"a": 1}}', 400, "'headers'"),
    ("{}", 422, "'url' is required"),
    ('{"url": ""}', 422, "'url' is required"),
    ('{"url": "ftp://x/"}', 422, "absolute http or https"),
    ('{"url": "/relative"}', 422, "absolute http or https"),
    ('{"url": "http://"}', 422, "absolute http or https"),
    ('{"url": "http://x:99999/"}', 422, "not a valid URL"),
    ('{"url": "http://x/ y"}', 422, "without spaces"),
    ('{"url": "http://x/", "timeout": -1}', 422, "negative"),
    ('{"url": "http://x/", "headers": {"X-A": "a\\r\\nX-Evil: 1"}}', 422, "CR, LF"),
    ('{"url": "http://x/", "headers": {"Bad Name": "v"}}', 422, "invalid header name"),
])
def test_bad_push_bodies_are_refused_and_nothing_is_stored(srv, body, status, text):
    before = srv.api("GET", "/stats")[1]["numJobs"]
    r = srv.request("POST", "/job", data=body.encode(), headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"] == "application/json; charset=UTF-8"
    err = r.json()
    assert err["status"] == status and text in err["error"]
    assert srv.api("GET", "/stats")[1]["numJobs"] == before


def test_oversized_body_is_413_and_server_keeps_serving(tmp_path, app):
    srv = HQServer(tmp_path, {"max_body_bytes": 1000}).start()
    try:
        r = srv.request("POST", "/job", data=json.dumps({"url": app.url, "payload": "x" * 2000}),
                        headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["status"] == 413
        # chunked, without Content-Length
        r = srv.request("POST", "/job", data=iter([b'{"url": "http://a/", "payload": "', b"x" * 2000, b'"}']),
                        headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        assert srv.api("GET", "/stats")[1]["numJobs"] == 0
        assert srv.push(url=app.url)["status"] == "waiting"
    finally:
        srv.stop()


def test_get_unknown_and_non_numeric_ids(srv):
    status, body = srv.api("GET", "/job/123")
    assert (status, body) == (422, {"status": 422, "error": "The job '123' is not found"})
    status, body = srv.api("GET", "/job/abc")
    assert (status, body) == (422, {"status": 422, "error": "The job id must be a number but 'abc'."})
    for method, path in [("DELETE", "/job/77"), ("POST", "/job/77/stop"), ("POST", "/job/77/restart")]:
        status, body = srv.api(method, path, {})
        assert status == 422 and body["error"] == "The job '77' is not found"


def test_unknown_route_and_wrong_method(srv):
    assert srv.api("GET", "/nope") == (404, {"status": 404, "error": "Not Found"})
    assert srv.api("PUT", "/job") == (405, {"status": 405, "error": "Method Not Allowed"})
    assert srv.api("GET", "/job/1/stop") == (405, {"status": 405, "error": "Method Not Allowed"})


def test_delete(srv, app):
    job = srv.push(url=app.url)
    srv.wait_job(job["id"])
    assert srv.api("DELETE", f"/job/{job['id']}") == (200, {"id": job["id"]})
    assert srv.api("GET", f"/job/{job['id']}")[0] == 422


def test_delete_and_restart_refuse_waiting_and_running(srv, app):
    app.hold()
    running = srv.push(url=app.url, name="held")
    srv.wait_job(running["id"], ("running",))
    for path in (f"/job/{running['id']}", f"/job/{running['id']}/restart"):
        method = "DELETE" if path.endswith(running["id"]) else "POST"
        status, body = srv.api(method, path, {})
        assert (status, body["error"]) == (422, f"The job {running['id']} is running now")
    app.release()
    srv.wait_job(running["id"])


def test_stop_waiting_job_never_reaches_the_worker(tmp_path, worker):
    srv = HQServer(tmp_path, {"dispatchers": 1, "max_workers": 0}).start()
    try:
        worker.hold()
        first = srv.push(url=worker.url, name="first")
        srv.wait_job(first["id"], ("running",))
        second = srv.push(url=worker.url, name="second")
        assert srv.job(second["id"])["status"] == "waiting"
        status, body = srv.api("DELETE", f"/job/{second['id']}")
        assert (status, body["error"]) == (422, f"The job {second['id']} is waiting now")
        assert srv.api("GET", "/stats")[1]["queueUsage"] == 1
        assert srv.api("POST", f"/job/{second['id']}/stop") == (200, {"id": second["id"]})
        assert srv.api("GET", "/stats")[1]["queueUsage"] == 0  # its queue entry is stale now
        stopped = srv.job(second["id"])
        assert stopped["status"] == "canceled" and stopped["canceled"] is True
        assert stopped["success"] is False and stopped["failure"] is False
        assert stopped["finishedAt"] and "stopped" in stopped["err"]
        worker.release()
        srv.wait_job(first["id"])
        time.sleep(0.3)
        assert worker.job_ids() == [first["id"]]
        status, body = srv.api("POST", f"/job/{second['id']}/stop")
        assert (status, body["error"]) == (422, f"The job {second['id']} is not active")
    finally:
        srv.stop()


def test_stop_running_job_aborts_its_request(srv, app):
    app.hold()
    job = srv.push(url=app.url, name="abort-me")
    srv.wait_job(job["id"], ("running",))
    started = time.monotonic()
    assert srv.api("POST", f"/job/{job['id']}/stop") == (200, {"id": job["id"]})
    assert time.monotonic() - started < 5
    stopped = srv.job(job["id"])
    assert stopped["status"] == "canceled" and stopped["canceled"] and not stopped["failure"]
    assert stopped["statusCode"] is None and "stopped" in stopped["err"] and stopped["startedAt"]


def test_restart_in_place_keeps_id_and_resets_results(srv, app):
    app.respond(500, b"boom")
    job = srv.push(url=app.url, name="again")
    failed = srv.wait_job(job["id"])
    assert failed["status"] == "failure" and failed["statusCode"] == 500 and failed["err"] == "Internal Server Error"
    assert failed["output"] == "boom"
    app.respond(200, b"fine")
    app.hold()
    status, restarted = srv.api("POST", f"/job/{job['id']}/restart", {})
    assert status == 200
    assert restarted["id"] == job["id"] and restarted["waiting"] is True and restarted["status"] == "waiting"
    assert restarted["statusCode"] is None and restarted["err"] == "" and restarted["output"] == ""
    assert restarted["startedAt"] is None and restarted["finishedAt"] is None and restarted["failure"] is False
    app.release()
    assert srv.wait_job(job["id"])["status"] == "success"


def test_restart_copy_makes_a_new_job_and_leaves_the_original(srv, app):
    job = srv.push(url=app.url + "/c?q=1", name="orig", comment="cc", payload=[1], headers={"X-K": "v"}, timeout=9)
    original = srv.wait_job(job["id"])
    status, copy = srv.api("POST", f"/job/{job['id']}/restart", {"copy": True})
    assert status == 200 and copy["id"] != job["id"] and int(copy["id"]) > int(job["id"])
    for key in ("name", "comment", "url", "payload", "headers", "timeout"):
        assert copy[key] == original[key]
    assert copy["waiting"] is True and copy["createdAt"] >= original["createdAt"]
    assert srv.job(job["id"]) == original
    assert srv.wait_job(copy["id"])["status"] == "success"


def test_restart_bad_bodies(srv, app):
    job = srv.push(url=app.url)
    srv.wait_job(job["id"])
    assert srv.api("POST", f"/job/{job['id']}/restart", {"copy": "yes"})[0] == 400
    r = srv.request("POST", f"/job/{job['id']}/restart", data=b"{nope", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["status"] == 400


def test_stats_fields(srv):
    status, stats = srv.api("GET", "/stats")
    assert status == 200
    for key in ("queues", "dispatchers", "maxWorkers", "queueUsage", "numWaitingJobs", "numRunningJobs",
                "numWorkers", "numJobs"):
        assert isinstance(stats[key], int), key
    assert stats["maxWorkers"] == 4


def test_list_query_errors(srv):
    assert srv.api("GET", "/job?limit=x")[0] == 400
    assert srv.api("GET", "/job?begin=x")[0] == 400
    assert srv.api("GET", "/job?reverse=maybe")[0] == 400
    status, body = srv.api("GET", "/job?name=(")
    assert status == 422 and "regular expression" in body["error"]
    assert srv.api("GET", "/job?term=[a")[0] == 422
    assert srv.api("GET", "/job?status=bogus")[0] == 422


def test_ui_is_served_with_redirect_and_internal_api(srv):
    r = srv.request("GET", "/ui", allow_redirects=False)
    assert r.status_code == 302 and r.headers["Location"].endswith("/ui/")  # 302 as HQ
    assert srv.request("GET", "/ui/internal/stats").json()["queues"] == 8192
    assert srv.api("GET", "/ui/internal/job/abc")[0] == 422


def test_ui_disabled_is_404(tmp_path):
    srv = HQServer(tmp_path, {"ui": False}).start()
    try:
        assert srv.request("GET", "/ui/").status_code == 404
        assert srv.request("GET", "/ui/internal/stats").status_code == 404
    finally:
        srv.stop()


def test_keep_alive_responses_do_not_stall(srv):
    # Without TCP_NODELAY every keep-alive response after the first waits ~40 ms.
    # A functional check, not a benchmark: the median of 21 round trips is far from 40 ms.
    session = requests.Session()
    session.get(srv.url + "/")
    times = []
    for _ in range(21):
        started = time.monotonic()
        session.get(srv.url + "/")
        times.append(time.monotonic() - started)
    assert sorted(times)[10] < 0.030


def raw_request(srv, head):
    import socket

    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(head)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


def test_request_header_parsing_limits(srv):
    ok = raw_request(srv, b"GET /stats HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\nConnection: close\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200")
    many = b"".join(b"X-%d: v\r\n" % i for i in range(150))
    assert raw_request(srv, b"GET / HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n").startswith(b"HTTP/1.1 400")
    assert raw_request(srv, b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert srv.api("GET", "/")[0] == 200


def test_unknown_route_of_the_ui_api_is_a_json_404_not_the_page(srv):
    r = srv.request("GET", "/ui/internal/nope")
    assert r.status_code == 404 and r.json() == {"status": 404, "error": "Not Found"}
    assert srv.request("GET", "/ui/internal/stats").status_code == 200
    assert srv.request("GET", "/ui/jobs/123").headers["Content-Type"].startswith("text/html")

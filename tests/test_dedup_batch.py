"""Deduplicated pushes (SPEC §10.4) and batch pushes (§10.6), on a real server."""
import json
import threading
import time

import requests

from conftest import FINISHED


def push_raw(srv, body):
    return srv.request("POST", "/job", json=body)


def test_duplicate_push_answers_the_stored_job(server, worker):
    first = push_raw(server, {"url": worker.url, "uniqueKey": "order-42", "payload": {"n": 1}})
    assert first.status_code == 200 and "X-Hq-Duplicate" not in first.headers
    again = push_raw(server, {"url": worker.url, "uniqueKey": "order-42", "payload": {"n": 2}})
    assert again.status_code == 200 and again.headers["X-Hq-Duplicate"] == "true"
    assert again.json()["id"] == first.json()["id"] and again.json()["payload"] == {"n": 1}
    assert again.json()["uniqueKey"] == "order-42"
    assert server.api("GET", "/stats")[1]["numJobs"] == 1


def test_twenty_concurrent_pushes_with_one_key_make_one_job(make_server, worker):
    srv = make_server(wal_fsync="always")
    barrier = threading.Barrier(20)
    answers = []

    def push():
        barrier.wait()
        r = requests.post(srv.url + "/job", json={"url": worker.url, "uniqueKey": "same"}, timeout=10)
        answers.append((r.status_code, r.json()["id"], r.headers.get("X-Hq-Duplicate")))

    threads = [threading.Thread(target=push) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {a[0] for a in answers} == {200} and len({a[1] for a in answers}) == 1
    assert sum(1 for a in answers if a[2] is None) == 1  # exactly one created it
    assert srv.api("GET", "/stats")[1]["numJobs"] == 1
    srv.wait_job(answers[0][1], FINISHED)
    assert worker.job_ids() == [answers[0][1]]


def test_key_is_rebuilt_after_a_restart_and_freed_by_delete(server, worker):
    job = server.push(url=worker.url, uniqueKey="k1")
    server.wait_job(job["id"], FINISHED)
    server.restart()
    again = push_raw(server, {"url": worker.url, "uniqueKey": "k1"})
    assert again.headers.get("X-Hq-Duplicate") == "true" and again.json()["id"] == job["id"]
    assert server.api("DELETE", f"/job/{job['id']}")[0] == 200
    fresh = push_raw(server, {"url": worker.url, "uniqueKey": "k1"})
    assert "X-Hq-Duplicate" not in fresh.headers and fresh.json()["id"] != job["id"]


def test_window_expiry_frees_the_key(make_server, worker):
    srv = make_server(unique_window=3)
    first = srv.push(url=worker.url, uniqueKey="w")
    assert push_raw(srv, {"url": worker.url, "uniqueKey": "w"}).headers.get("X-Hq-Duplicate") == "true"
    time.sleep(3.1)
    second = push_raw(srv, {"url": worker.url, "uniqueKey": "w"})
    assert "X-Hq-Duplicate" not in second.headers and second.json()["id"] != first["id"]
    srv.restart()  # the newer holder wins after a replay too
    third = push_raw(srv, {"url": worker.url, "uniqueKey": "w"})
    assert third.headers.get("X-Hq-Duplicate") == "true" and third.json()["id"] == second.json()["id"]


def test_job_lifetime_frees_the_key(make_server, worker):
    srv = make_server(job_lifetime=1, job_lifetime_interval=1)
    job = srv.push(url=worker.url, uniqueKey="life")
    srv.wait_job(job["id"], FINISHED)
    deadline = time.monotonic() + 10
    while srv.api("GET", "/stats")[1]["numJobs"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    fresh = push_raw(srv, {"url": worker.url, "uniqueKey": "life"})
    assert "X-Hq-Duplicate" not in fresh.headers and fresh.json()["id"] != job["id"]


def test_batch_stores_all_in_order(server, worker):
    jobs = [{"url": worker.url, "name": f"b{i}", "payload": {"i": i}} for i in range(250)]
    status, body = server.api("POST", "/jobs", jobs)
    assert status == 200 and [j["name"] for j in body["jobs"]] == [f"b{i}" for i in range(250)]
    ids = [int(j["id"]) for j in body["jobs"]]
    assert ids == sorted(ids) and all(j["status"] == "waiting" for j in body["jobs"])
    for j in body["jobs"][-3:]:
        assert server.wait_job(j["id"], FINISHED)["status"] == "success"
    worker.wait_requests(250)
    assert server.api("GET", "/stats")[1]["numJobs"] == 250


def test_batch_is_all_or_nothing(server, worker):
    jobs = [{"url": worker.url}, {"url": worker.url}, {"url": "ftp://nope/"}]
    status, body = server.api("POST", "/jobs", jobs)
    assert status == 422 and body["error"].startswith("jobs[2]: ") and body["status"] == 422
    status, body = server.api("POST", "/jobs", [{"url": worker.url}, {"url": worker.url, "timeout": "x"}])
    assert status == 400 and body["error"].startswith("jobs[1]: ")
    assert server.api("GET", "/stats")[1]["numJobs"] == 0


def test_batch_limits(server, worker):
    assert server.api("POST", "/jobs", [])[0] == 400
    assert server.api("POST", "/jobs", {"url": worker.url})[0] == 400
    status, body = server.api("POST", "/jobs", [{"url": worker.url}] * 1001)
    assert status == 413 and body["status"] == 413
    assert server.api("GET", "/stats")[1]["numJobs"] == 0


def test_batch_dedups_against_stored_jobs_and_within_itself(server, worker):
    stored = server.push(url=worker.url, uniqueKey="a")
    status, body = server.api("POST", "/jobs", [
        {"url": worker.url, "uniqueKey": "a"},
        {"url": worker.url, "uniqueKey": "b"},
        {"url": worker.url, "uniqueKey": "b"},
        {"url": worker.url},
    ])
    assert status == 200
    a, b1, b2, plain = body["jobs"]
    assert a["id"] == stored["id"] and b1["id"] == b2["id"] and plain["id"] not in (a["id"], b1["id"])
    assert server.api("GET", "/stats")[1]["numJobs"] == 3


def test_batch_is_durable_together(make_server, worker):
    srv = make_server()
    worker.hold()
    status, body = srv.api("POST", "/jobs", [{"url": worker.url, "delay": 60} for _ in range(50)])
    assert status == 200
    srv.kill()
    srv.start()
    listed = srv.api("GET", "/job")[1]
    assert listed["count"] == 50 and {j["id"] for j in listed["jobs"]} == {j["id"] for j in body["jobs"]}
    assert srv.api("GET", "/stats")[1]["numScheduledJobs"] == 50
    worker.release()


def test_batch_with_form_encoding_is_read_like_a_push(server, worker):
    r = server.request("POST", "/jobs", data={"payload": json.dumps([{"url": worker.url}])})
    assert r.status_code == 200 and len(r.json()["jobs"]) == 1

"""Metrics (SPEC §12): the Metrics class in-process, parsed back with prometheus_client's own
parser, and GET /metrics of a real server after a known workload."""
import os
import re
import resource
import threading
import time
from wsgiref.simple_server import WSGIRequestHandler, make_server

import bottle
import gevent
import pytest
import requests
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from hq_gevent import wal
from hq_gevent.api import error_body, handle_errors, render
from hq_gevent.invalid import Invalid
from hq_gevent.metrics import HISTORY_SECONDS, Metrics, route_label

GAUGES = {"waiting": 0, "scheduled": 0, "running": 0, "stored": 0, "queue_usage": 0, "workers_busy": 0,
          "wal_bytes": 0}


def samples(text):
    """{(sample name, frozenset of labels): value} of an exposition text."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name, frozenset(sample.labels.items())] = sample.value
    return found


def value(found, name, **labels):
    return found[name, frozenset(labels.items())]


def scrape(metrics):
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return samples(body.decode())


@pytest.fixture
def metrics():
    return Metrics(lambda: dict(GAUGES))


def test_counters_equal_the_calls(metrics):
    metrics.pushed()
    metrics.pushed(3)
    for status in ("success", "success", "failure", "canceled", "success"):
        metrics.finished(status)
    metrics.attempt("success", 0.02)
    metrics.attempt("failure", 0.5)
    metrics.attempt("failure", 1.5)
    metrics.retried()
    metrics.compacted()
    metrics.write_failed()
    found = scrape(metrics)
    assert value(found, "hq_jobs_pushed_total") == 4
    assert value(found, "hq_jobs_finished_total", status="success") == 3
    assert value(found, "hq_jobs_finished_total", status="failure") == 1
    assert value(found, "hq_jobs_finished_total", status="canceled") == 1
    assert value(found, "hq_job_attempts_total", result="success") == 1
    assert value(found, "hq_job_attempts_total", result="failure") == 2
    assert value(found, "hq_job_retries_total") == 1
    assert value(found, "hq_wal_compactions_total") == 1
    assert value(found, "hq_store_write_errors_total") == 1


def test_every_series_exists_before_its_first_event(metrics):
    # Alert rules such as "no attempt in 10 minutes" need the series at 0, not absent.
    found = scrape(metrics)
    for status in ("success", "failure", "canceled"):
        assert value(found, "hq_jobs_finished_total", status=status) == 0
    for result in ("success", "failure"):
        assert value(found, "hq_job_attempts_total", result=result) == 0
    for name in ("hq_jobs_pushed_total", "hq_job_retries_total", "hq_wal_compactions_total",
                 "hq_store_write_errors_total", "hq_delivery_duration_seconds_count",
                 "hq_job_wait_seconds_count", "hq_store_write_duration_seconds_count"):
        assert value(found, name) == 0
    assert not [key for key in found if key[0].endswith("_created")]


def test_histograms_have_buckets_sum_and_count(metrics):
    for seconds in (0.003, 0.003, 0.2, 7.0, 4000.0):
        metrics.attempt("success", seconds)
    metrics.waited(0.0005)
    metrics.waited(-0.01)  # a clock step backwards counts as no wait, never a negative sum
    metrics.waited(45)
    metrics.store_write(0.0002)
    metrics.store_write(0.02)
    found = scrape(metrics)

    assert value(found, "hq_delivery_duration_seconds_count") == 5
    assert value(found, "hq_delivery_duration_seconds_sum") == pytest.approx(4007.206)
    assert value(found, "hq_delivery_duration_seconds_bucket", le="0.005") == 2
    assert value(found, "hq_delivery_duration_seconds_bucket", le="0.25") == 3
    assert value(found, "hq_delivery_duration_seconds_bucket", le="10.0") == 4
    assert value(found, "hq_delivery_duration_seconds_bucket", le="600.0") == 4
    assert value(found, "hq_delivery_duration_seconds_bucket", le="+Inf") == 5

    assert value(found, "hq_job_wait_seconds_count") == 3
    assert value(found, "hq_job_wait_seconds_sum") == pytest.approx(45.0005)
    assert value(found, "hq_job_wait_seconds_bucket", le="0.001") == 2
    assert value(found, "hq_job_wait_seconds_bucket", le="30.0") == 2
    assert value(found, "hq_job_wait_seconds_bucket", le="60.0") == 3

    assert value(found, "hq_store_write_duration_seconds_count") == 2
    assert value(found, "hq_store_write_duration_seconds_bucket", le="0.0005") == 1
    assert value(found, "hq_store_write_duration_seconds_bucket", le="0.025") == 2

    for name in ("hq_delivery_duration_seconds", "hq_job_wait_seconds", "hq_store_write_duration_seconds"):
        bounds = [(float(dict(labels)["le"]), count) for (sample, labels), count in found.items()
                  if sample == name + "_bucket"]
        counts = [count for _, count in sorted(bounds)]
        assert counts == sorted(counts), f"{name} buckets are not cumulative"
        assert len(counts) >= 10


def test_gauges_are_read_at_scrape_time():
    now = dict(GAUGES)
    metrics = Metrics(lambda: dict(now))
    now.update(waiting=7, scheduled=2, running=3, stored=40, queue_usage=5, workers_busy=3, wal_bytes=12345)
    found = scrape(metrics)
    assert value(found, "hq_jobs", state="waiting") == 7
    assert value(found, "hq_jobs", state="scheduled") == 2
    assert value(found, "hq_jobs", state="running") == 3
    assert value(found, "hq_jobs_stored") == 40
    assert value(found, "hq_queue_usage") == 5
    assert value(found, "hq_workers_busy") == 3
    assert value(found, "hq_wal_bytes") == 12345
    now["waiting"] = 0
    assert value(scrape(metrics), "hq_jobs", state="waiting") == 0


def test_process_metrics_and_private_registries():
    one, two = Metrics(lambda: dict(GAUGES)), Metrics(lambda: dict(GAUGES))
    one.pushed(5)
    found = scrape(one)
    assert value(found, "process_resident_memory_bytes") > 0
    assert value(found, "process_cpu_seconds_total") > 0
    assert value(scrape(two), "hq_jobs_pushed_total") == 0


def test_openmetrics_when_the_scraper_asks_for_it(metrics):
    metrics.pushed(2)
    body, content_type = metrics.render("application/openmetrics-text;version=1.0.0,text/plain;q=0.5")
    assert content_type.startswith("application/openmetrics-text")
    families = {family.name: family for family in parse_openmetrics(body.decode())}
    assert families["hq_jobs_pushed"].type == "counter"
    assert families["hq_jobs_pushed"].samples[0].value == 2


@pytest.mark.parametrize("rule, label", [
    ("/job/<job_id>", "/job/{id}"),
    ("/job/<job_id>/stop", "/job/{id}/stop"),
    ("/job/<job_id:int>/restart", "/job/{id}/restart"),
    ("/ui/internal/job/<job_id>", "/ui/internal/job/{id}"),
    ("/ui/<path:path>", "/ui/{path}"),
    ("/stats", "/stats"),
])
def test_route_label_is_the_pattern(rule, label):
    assert route_label(rule) == label


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def app_server(metrics):
    """A bottle app set up as api.make_app does (metrics plugin outermost, then the error
    plugin, bottle's own errors through a hook), served on a loopback socket."""
    app = bottle.Bottle(catchall=True)
    app.uninstall(True)
    app.install(metrics.route_plugin())
    app.install(handle_errors)

    def get_job(job_id):
        if job_id == "404404":
            raise Invalid(422, f"The job '{job_id}' is not found")
        return render({"id": job_id})

    def stop_job(job_id):
        return render({"id": job_id})

    def crash():
        raise RuntimeError("boom")

    def moved():
        bottle.redirect("/stats")

    app.route("/job/<job_id>", "GET", get_job)
    app.route("/job/<job_id>/stop", "POST", stop_job)
    app.route("/ui/internal/job/<job_id>", "GET", get_job)
    app.route("/crash", "GET", crash)
    app.route("/moved", "GET", moved)

    def http_error(res):
        if "bottle.route" not in bottle.request.environ:
            metrics.count_unmatched(bottle.request.method, res.status_code)
        return error_body(res.status_code, "Not Found" if res.status_code == 404 else "Method Not Allowed")

    for code in (404, 405):
        app.error_handler[code] = http_error
    server = make_server("127.0.0.1", 0, app, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_route_plugin_counts_every_answer_by_pattern(metrics, app_server):
    session = requests.Session()
    ids = ["7304948228913152", "7304948228913153", "404404"]
    answers = [session.get(f"{app_server}/job/{job_id}", timeout=10).status_code for job_id in ids]
    answers.append(session.post(f"{app_server}/job/{ids[0]}/stop", timeout=10).status_code)
    answers.append(session.get(f"{app_server}/ui/internal/job/{ids[1]}", timeout=10).status_code)
    answers.append(session.get(f"{app_server}/crash", timeout=10).status_code)
    answers.append(session.get(f"{app_server}/moved", allow_redirects=False, timeout=10).status_code)
    answers.append(session.get(f"{app_server}/no/such/{ids[0]}", timeout=10).status_code)
    answers.append(session.delete(f"{app_server}/job/{ids[0]}/stop", timeout=10).status_code)
    assert answers == [200, 200, 422, 200, 200, 500, 303, 404, 405]

    found = scrape(metrics)
    requests_total = {dict(labels)["route"] + " " + dict(labels)["method"] + " " + dict(labels)["code"]: count
                      for (name, labels), count in found.items() if name == "hq_http_requests_total"}
    assert requests_total == {
        "/job/{id} GET 200": 2,
        "/job/{id} GET 422": 1,
        "/job/{id}/stop POST 200": 1,
        "/ui/internal/job/{id} GET 200": 1,
        "/crash GET 500": 1,
        "/moved GET 303": 1,
        "unmatched GET 404": 1,
        "unmatched DELETE 405": 1,
    }
    assert value(found, "hq_http_request_duration_seconds_count", route="/job/{id}") == 3
    assert value(found, "hq_http_request_duration_seconds_bucket", route="/job/{id}", le="+Inf") == 3
    assert value(found, "hq_http_request_duration_seconds_sum", route="/job/{id}") > 0
    for (_, labels) in found:
        for label_name, label_value in labels:
            if label_name != "le":
                assert not re.search(r"\d{4,}", label_value), f"a raw id in a label: {label_value}"


def test_wal_times_batches_and_counts_failures(tmp_path, metrics):
    log = wal.WriteAheadLog(str(tmp_path / "jobs.jsonl"), "always", metrics=metrics)
    log.load(lambda *record: None)  # a new, empty log: nothing to replay
    log.open(gevent.get_hub().threadpool)
    gevent.joinall([gevent.spawn(log.append, wal.encode(["p", n])) for n in range(20)], raise_error=True)
    log.rewrite([[wal.encode(["p", 1])]])
    log.close()
    found = scrape(metrics)
    batches = value(found, "hq_store_write_duration_seconds_count")
    assert 1 <= batches <= 20  # group commit: the 20 appends share batches
    assert value(found, "hq_store_write_duration_seconds_sum") > 0
    assert value(found, "hq_wal_compactions_total") == 1
    assert value(found, "hq_store_write_errors_total") == 0

    full = wal.WriteAheadLog("/dev/full", "always", metrics=metrics)  # every write: ENOSPC
    full.open(gevent.get_hub().threadpool)
    with pytest.raises(wal.WalError):
        full.append(wal.encode(["p", 1]))
    full.close()
    found = scrape(metrics)
    assert value(found, "hq_store_write_errors_total") == 1
    assert value(found, "hq_store_write_duration_seconds_count") == batches


class Clock:
    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now


def test_history_is_a_fixed_ring_of_seconds():
    gauges = dict(GAUGES)
    clock = Clock(1_800_000_000.25)
    metrics = Metrics(lambda: dict(gauges), clock=clock)
    empty = metrics.history()
    assert empty["interval"] == 1
    assert empty["end"] == 1_799_999_999
    assert set(empty["series"]) == {"success", "failure", "canceled", "waiting", "scheduled", "running"}
    assert all(len(points) == HISTORY_SECONDS and not any(points) for points in empty["series"].values())

    gauges.update(waiting=4, running=2)
    metrics.sample()
    metrics.finished("success")
    metrics.finished("success")
    clock.now += 0.7  # same second
    metrics.finished("failure")
    clock.now += 0.5  # the next second
    metrics.finished("success")
    metrics.finished("canceled")
    gauges.update(waiting=1, running=1, scheduled=3)
    metrics.sample()
    clock.now += 1  # two seconds after the start: both earlier ones are complete
    history = metrics.history()
    assert history["end"] == 1_800_000_001
    series = history["series"]
    assert series["success"][-2:] == [2, 1]
    assert series["failure"][-2:] == [1, 0]
    assert series["canceled"][-2:] == [0, 1]
    assert series["waiting"][-2:] == [4, 1]
    assert series["running"][-2:] == [2, 1]
    assert series["scheduled"][-2:] == [0, 3]
    assert sum(series["success"]) == 3

    # Seconds without a sample keep the last gauge values; finish counts are zero there.
    clock.now += 5
    series = metrics.history()["series"]
    assert series["waiting"][-5:] == [1] * 5 and series["success"][-5:] == [0] * 5

    # Ten minutes later everything above has left the window, and the ring has not grown.
    clock.now += HISTORY_SECONDS + 30
    for _ in range(1000):
        metrics.finished("failure")
    history = metrics.history()
    assert history["end"] == int(clock.now) - 1
    assert all(len(points) == HISTORY_SECONDS for points in history["series"].values())
    assert sum(history["series"]["success"]) == 0 and sum(history["series"]["failure"]) == 0
    clock.now += 1
    assert metrics.history()["series"]["failure"][-1] == 1000
    assert all(len(ring) == HISTORY_SECONDS + 1 for ring in metrics._ring.values())


def test_history_sampler_runs_every_second():
    gauges = dict(GAUGES, waiting=3, scheduled=1, running=2)
    metrics = Metrics(lambda: dict(gauges))
    metrics.start()
    try:
        gevent.sleep(1.2)
        gauges.update(waiting=9)
        deadline = time.monotonic() + 10
        while metrics.history()["series"]["waiting"][-1] != 9:
            assert time.monotonic() < deadline, "the sampler did not record the new gauge"
            gevent.sleep(0.1)
    finally:
        metrics.stop()
    series = metrics.history()["series"]
    assert series["running"][-1] == 2 and series["scheduled"][-1] == 1
    assert 3 in series["waiting"]


# --- GET /metrics of a real server ---------------------------------------------------------
def live_samples(srv):
    response = srv.request("GET", "/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain")
    return samples(response.text)


def wait_for(srv, condition, timeout=15):
    """The scrape once `condition(samples)` holds: counters may trail the API by a moment."""
    deadline = time.monotonic() + timeout
    while True:
        found = live_samples(srv)
        if condition(found):
            return found
        assert time.monotonic() < deadline, "the metrics never reached the expected values"
        time.sleep(0.1)


def wait_attempts(srv, job_id, attempts, timeout=15):
    deadline = time.monotonic() + timeout
    while srv.job(job_id)["attempts"] < attempts:
        assert time.monotonic() < deadline, f"job {job_id} never reached attempt {attempts}"
        time.sleep(0.02)


def test_metrics_after_a_known_workload(make_server, worker):
    srv = make_server(access_log_file="", dispatchers=2)
    ids = []

    def push(**job):
        status, body = srv.api("POST", "/job", dict(url=worker.url, **job))
        assert status == 200, body
        ids.append(body["id"])
        return body["id"]

    # 4 successes; the second push of the uniqueKey stores nothing
    for n in range(3):
        push(name=f"ok{n}")
    once = push(name="once", uniqueKey="metrics-once")
    assert push(name="once again", uniqueKey="metrics-once") == once
    for job_id in set(ids):
        assert srv.wait_job(job_id)["status"] == "success"

    # 2 failures, one attempt each
    worker.respond(500)
    failing = [push(name=f"fail{n}") for n in range(2)]
    for job_id in failing:
        assert srv.wait_job(job_id)["status"] == "failure"

    # a failed attempt, a retry, a success
    worker.hold()
    retried = push(name="retried", retry={"maxAttempts": 2, "minBackoff": 1, "maxBackoff": 1})
    worker.wait_requests(7)
    worker.release()
    wait_attempts(srv, retried, 1)
    worker.respond(200)
    assert srv.wait_job(retried)["status"] == "success"
    assert srv.job(retried)["attempts"] == 2

    # stopped while running, and stopped while scheduled
    worker.hold()
    running = push(name="stopped while running")
    worker.wait_requests(9)
    scheduled = push(name="scheduled", delay=3600)
    found = wait_for(srv, lambda f: value(f, "hq_jobs", state="scheduled") == 1)
    assert value(found, "hq_jobs", state="running") == 1
    assert value(found, "hq_workers_busy") == 1
    time.sleep(1.2)  # so the once-a-second history sample sees them too
    for job_id in (running, scheduled):
        assert srv.api("POST", f"/job/{job_id}/stop")[0] == 200
        assert srv.wait_job(job_id)["status"] == "canceled"
    worker.release()

    assert srv.request("GET", "/no/such/path").status_code == 404
    assert srv.request("GET", "/job/abc").status_code == 422

    found = wait_for(srv, lambda f: value(f, "hq_jobs_finished_total", status="canceled") == 2)
    assert value(found, "hq_jobs_pushed_total") == 9
    assert value(found, "hq_jobs_finished_total", status="success") == 5
    assert value(found, "hq_jobs_finished_total", status="failure") == 2
    assert value(found, "hq_job_attempts_total", result="success") == 5
    assert value(found, "hq_job_attempts_total", result="failure") == 3  # the stopped request is no result
    assert value(found, "hq_job_retries_total") == 1
    assert value(found, "hq_delivery_duration_seconds_count") == 8
    assert value(found, "hq_delivery_duration_seconds_bucket", le="+Inf") == 8
    assert value(found, "hq_job_wait_seconds_count") == 9  # every start: 4 + 2 + 2 + 1
    assert value(found, "hq_job_wait_seconds_sum") >= 0
    for state in ("waiting", "scheduled", "running"):
        assert value(found, "hq_jobs", state=state) == 0
    assert value(found, "hq_jobs_stored") == 9
    assert value(found, "hq_queue_usage") == 0
    assert value(found, "hq_workers_busy") == 0
    assert value(found, "hq_wal_bytes") == os.path.getsize(os.path.join(srv.data_dir, "jobs.jsonl"))
    assert value(found, "hq_store_write_duration_seconds_count") >= 1
    assert value(found, "hq_store_write_errors_total") == 0
    assert value(found, "process_resident_memory_bytes") > 0

    assert value(found, "hq_http_requests_total", method="POST", route="/job", code="200") == 10
    assert value(found, "hq_http_requests_total", method="POST", route="/job/{id}/stop", code="200") == 2
    assert value(found, "hq_http_requests_total", method="GET", route="unmatched", code="404") == 1
    assert value(found, "hq_http_requests_total", method="GET", route="/job/{id}", code="422") == 1
    assert value(found, "hq_http_request_duration_seconds_count", route="/job") >= 10
    routes = {dict(labels)["route"] for name, labels in found if name == "hq_http_requests_total"}
    assert routes <= {"/", "/stats", "/job", "/job/{id}", "/job/{id}/stop", "/job/{id}/restart", "/jobs",
                      "/metrics", "/healthz", "/readyz", "unmatched"}, routes
    for (_, labels) in found:
        for _, label_value in labels:
            assert not any(job_id in label_value for job_id in ids), f"a raw id in a label: {label_value}"

    # The live charts' history: finishes count once their second is complete, gauges as sampled
    # at the start of each second, so the idle state shows within ~2 s.
    def finishes_and_idle(history):
        series = history["series"]
        return ((sum(series["success"]), sum(series["failure"]), sum(series["canceled"])),
                [series[state][-1] for state in ("waiting", "scheduled", "running")])

    deadline = time.monotonic() + 10
    while True:
        status, history = srv.api("GET", "/stats/history")
        assert status == 200, history
        if finishes_and_idle(history) == ((5, 2, 2), [0, 0, 0]) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert finishes_and_idle(history) == ((5, 2, 2), [0, 0, 0])
    assert history["interval"] == 1 and abs(history["end"] - time.time()) < 3
    series = history["series"]
    assert {name: len(points) for name, points in series.items()} == dict.fromkeys(
        ("success", "failure", "canceled", "waiting", "scheduled", "running"), 600)
    assert max(series["scheduled"]) == 1 and max(series["running"]) >= 1  # while one was scheduled and one ran

def test_readyz_and_write_errors_follow_a_real_write_failure(make_server, worker):
    """A real EFBIG (the file size limit lowered under the server, as in test_faults)."""
    srv = make_server(access_log_file="")
    assert srv.api("GET", "/healthz") == (200, {"status": "ok"})
    assert srv.api("GET", "/readyz") == (200, {"status": "ready"})
    srv.wait_job(srv.push(url=worker.url)["id"])
    size = os.path.getsize(os.path.join(srv.data_dir, "jobs.jsonl"))
    unlimited = resource.prlimit(srv.proc.pid, resource.RLIMIT_FSIZE)
    resource.prlimit(srv.proc.pid, resource.RLIMIT_FSIZE, (size, unlimited[1]))
    try:
        assert srv.api("POST", "/job", {"url": worker.url})[0] == 503
        status, body = srv.api("GET", "/readyz")
        assert status == 503 and body["status"] == 503 and body["error"]
        assert srv.api("GET", "/healthz") == (200, {"status": "ok"})
        assert value(live_samples(srv), "hq_store_write_errors_total") >= 1
    finally:
        resource.prlimit(srv.proc.pid, resource.RLIMIT_FSIZE, unlimited)
    srv.wait_job(srv.push(url=worker.url)["id"])  # a write succeeds again
    assert srv.api("GET", "/readyz") == (200, {"status": "ready"})

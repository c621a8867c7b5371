"""Prometheus metrics (SPEC §12) and the per-second history behind the web UI's live charts.

One `Metrics` per server process, on its own CollectorRegistry (plus the library's
process_* collector), so nothing leaks between servers run in one interpreter (tests).
The exposition format is made by prometheus_client; nothing here writes it by hand.

Interface (the server wires it):
    metrics = Metrics(snapshot)    snapshot() -> {"waiting", "scheduled", "running", "stored",
                                   "queue_usage", "workers_busy", "wal_bytes"}: ints read at scrape
                                   time (and once a second for the history). The three job states
                                   partition the active jobs: "waiting" = may start now,
                                   "scheduled" = waiting for a future runAt (retry backoff, delay),
                                   "running" = a worker request in flight; sum(hq_jobs) = active jobs.
    app.install(metrics.route_plugin())   install it BEFORE the error-handling plugin, so it is the
                                   outermost wrapper and sees the status of every answer.
    metrics.count_unmatched(method, code) from the app's error hook when no route matched
                                   ("bottle.route" not in request.environ): 404/405 of unknown paths.
    metrics.pushed(n=1)            jobs stored by a push (a uniqueKey duplicate stores nothing).
    metrics.finished(status)       "success" | "failure" | "canceled": a job's final outcome.
    metrics.attempt(result, seconds)  "success" | "failure", and the worker request's duration.
                                   A request aborted by a stop is no result: don't call it then
                                   (the job counts as finished("canceled")).
    metrics.retried()              a failed attempt that was followed by a scheduled retry.
    metrics.waited(seconds)        from when a job may start (push, runAt) to when it starts.
    store.wal.metrics = metrics    lets the log report the three below (or WriteAheadLog(..., metrics=)).
    metrics.store_write(seconds)   one log batch's write + fsync (called by wal.py).
    metrics.write_failed()         a log batch that could not be written (called by wal.py).
    metrics.compacted()            a finished log rewrite (called by wal.py).
    metrics.render(accept=None)    -> (body bytes, content type) for GET /metrics.
    metrics.start() / stop()       the greenlet that samples the history once a second.
    metrics.history()              -> {"interval": 1, "end": <unix second of the newest slot>,
                                   "series": {"success", "failure", "canceled", "waiting",
                                   "scheduled", "running": [600 numbers, oldest first]}}.

Per-request cost, measured with timeit under gevent's monkey-patching (locks are gevent's):
route_plugin wrapper ~2.2 us, pushed() ~0.5 us, finished() ~0.8 us, attempt() ~1.6 us,
waited() ~1.2 us -- about 1-2% of a push (~200 us) or an end-to-end job (~330 us).
Counters and histograms are children bound once (per route, per status), so the
request path does no label lookups.
"""
import re
import time

import gevent
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, disable_created_metrics
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily

HISTORY_SECONDS = 600  # the UI's live charts: the last 10 minutes, one slot per second
_RING = HISTORY_SECONDS + 1  # plus the second now filling
FINISHED = ("success", "failure", "canceled")
GAUGED = ("waiting", "scheduled", "running")

# Bucket bounds in seconds, from sub-millisecond API answers to multi-minute worker requests.
HTTP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
WRITE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
DELIVERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 21600)

# The *_created series would double the scrape, and Prometheus (text format) stores them as
# separate gauges nobody graphs; process_start_time_seconds already dates the counters.
disable_created_metrics()

_PLACEHOLDER = re.compile(r"<([A-Za-z_][A-Za-z0-9_]*)(?::[^>]*)?>")


def route_label(rule):
    """A bottle rule as the `route` label: "/job/<job_id>/stop" -> "/job/{id}/stop"."""
    def name(match):
        return "{id}" if match.group(1).endswith("id") else "{" + match.group(1) + "}"

    return _PLACEHOLDER.sub(name, rule)


class _StoreGauges:
    """Gauges read from the store at scrape time, so they are never stale or double-kept."""

    def __init__(self, snapshot):
        self.snapshot = snapshot

    def collect(self):
        now = self.snapshot()
        jobs = GaugeMetricFamily("hq_jobs", "Active jobs by state (waiting: may start now; scheduled: "
                                 "waiting for a future runAt; running: worker request in flight).",
                                 labels=["state"])
        for state in GAUGED:
            jobs.add_metric([state], now[state])
        yield jobs
        yield GaugeMetricFamily("hq_jobs_stored", "Jobs in the store (any status).", value=now["stored"])
        yield GaugeMetricFamily("hq_queue_usage", "Waiting jobs in the dispatch queue.", value=now["queue_usage"])
        yield GaugeMetricFamily("hq_workers_busy", "Worker requests in flight.", value=now["workers_busy"])
        yield GaugeMetricFamily("hq_wal_bytes", "Size of the job log in bytes.", value=now["wal_bytes"])


class _RoutePlugin:
    """Bottle plugin (api 2): counts and times every answer of a matched route by its pattern."""

    name = "hq_metrics"
    api = 2

    def __init__(self, requests, durations):
        self.requests = requests
        self.durations = durations

    def apply(self, callback, route):
        import bottle  # the plugin only exists inside the bottle app

        label = route_label(route.rule)
        method = route.method
        duration = self.durations.labels(label)
        counters = {}  # status code -> bound counter child
        requests = self.requests
        response = bottle.response
        http_response = bottle.HTTPResponse
        clock = time.perf_counter

        def count(code):
            child = counters.get(code)
            if child is None:
                child = counters[code] = requests.labels(method, label, str(code))
            child.inc()

        def wrapper(*args, **kwargs):
            start = clock()
            try:
                result = callback(*args, **kwargs)
            except http_response as e:  # a redirect or an abort
                count(e.status_code)
                raise
            except BaseException:
                count(500)  # bottle answers an uncaught error with 500
                raise
            finally:
                duration.observe(clock() - start)
            count(result.status_code if isinstance(result, http_response) else response.status_code)
            return result

        return wrapper


class Metrics:
    def __init__(self, snapshot, clock=time.time):
        self.snapshot = snapshot
        self.clock = clock  # wall clock for the history slots (a test may pass its own)
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        registry.register(_StoreGauges(snapshot))

        self._pushed = Counter("hq_jobs_pushed", "Jobs stored by a push.", registry=registry)
        finished = Counter("hq_jobs_finished", "Jobs that finished, by outcome.", ["status"], registry=registry)
        self._finished = {status: finished.labels(status) for status in FINISHED}
        attempts = Counter("hq_job_attempts", "Worker requests made, by result.", ["result"], registry=registry)
        self._attempts = {result: attempts.labels(result) for result in ("success", "failure")}
        self._retries = Counter("hq_job_retries", "Failed attempts followed by a scheduled retry.", registry=registry)
        self._delivery = Histogram("hq_delivery_duration_seconds", "Duration of a worker request.",
                                   buckets=DELIVERY_BUCKETS, registry=registry)
        self._wait = Histogram("hq_job_wait_seconds", "From when a job may start to when it starts.",
                               buckets=WAIT_BUCKETS, registry=registry)
        self._http_requests = Counter("hq_http_requests", "HTTP requests answered, by route pattern and code.",
                                      ["method", "route", "code"], registry=registry)
        self._http_duration = Histogram("hq_http_request_duration_seconds", "Time to answer an HTTP request.",
                                        ["route"], buckets=HTTP_BUCKETS, registry=registry)
        self._unmatched = {}
        self._store_write = Histogram("hq_store_write_duration_seconds",
                                      "A job log batch's write + fsync.", buckets=WRITE_BUCKETS, registry=registry)
        self._write_errors = Counter("hq_store_write_errors", "Job log batches that could not be written.",
                                     registry=registry)
        self._compactions = Counter("hq_wal_compactions", "Job log rewrites completed.", registry=registry)

        # The history: one ring per series, slot = unix second % _RING.
        self._ring = {name: [0] * _RING for name in FINISHED + GAUGED}
        self._second = int(clock())  # the newest second the ring holds (its slot is filling)
        self._last_gauges = dict.fromkeys(GAUGED, 0)
        self._sampler = None

    # --- counting ------------------------------------------------------------------------
    def route_plugin(self):
        return _RoutePlugin(self._http_requests, self._http_duration)

    def count_unmatched(self, method, code):
        key = (method, code)
        child = self._unmatched.get(key)
        if child is None:
            child = self._unmatched[key] = self._http_requests.labels(method, "unmatched", str(code))
        child.inc()

    def pushed(self, n=1):
        self._pushed.inc(n)

    def finished(self, status):
        self._finished[status].inc()
        self._advance()
        self._ring[status][self._second % _RING] += 1

    def attempt(self, result, seconds):
        self._attempts[result].inc()
        self._delivery.observe(seconds)

    def retried(self):
        self._retries.inc()

    def waited(self, seconds):
        self._wait.observe(max(0.0, seconds))

    def store_write(self, seconds):
        self._store_write.observe(seconds)

    def write_failed(self):
        self._write_errors.inc()

    def compacted(self):
        self._compactions.inc()

    def render(self, accept=None):
        """(body, content type) of a scrape; `accept` is the request's Accept header, if any
        (Prometheus asks for OpenMetrics, curl gets the classic text format)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    # --- history -------------------------------------------------------------------------
    def _advance(self):
        """Move the ring to the current second: slots of seconds passed since are opened with
        zero finishes and the last gauge sample (a gauge holds its value until sampled again)."""
        now = int(self.clock())
        if now <= self._second:
            return
        skipped = min(now - self._second, _RING)
        for second in range(now - skipped + 1, now + 1):
            slot = second % _RING
            for status in FINISHED:
                self._ring[status][slot] = 0
            for state in GAUGED:
                self._ring[state][slot] = self._last_gauges[state]
        self._second = now

    def sample(self):
        """Record the gauges into the current second's slot (the sampler calls it each second)."""
        now = self.snapshot()
        self._advance()
        slot = self._second % _RING
        for state in GAUGED:
            self._last_gauges[state] = self._ring[state][slot] = now[state]

    def start(self):
        self.sample()
        self._sampler = gevent.spawn(self._sample_every_second)

    def stop(self):
        if self._sampler is not None:
            self._sampler.kill()
            self._sampler = None

    def _sample_every_second(self):
        while True:
            now = self.clock()
            gevent.sleep(1.01 - now % 1)  # just after the next second starts
            self.sample()

    def history(self):
        """The last HISTORY_SECONDS complete seconds, oldest first; the second now filling is
        left out so the newest point of a chart never shows a partial count."""
        self._advance()
        filling = self._second % _RING
        # oldest first: the slots after the filling one, then those before it
        series = {name: ring[filling + 1:] + ring[:filling] for name, ring in self._ring.items()}
        end = self._second - 1
        return {"interval": 1, "end": end, "series": series}

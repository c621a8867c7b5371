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

Cost: events only bump plain counts (a histogram: one bisect); the library's metric
families are built from them at scrape time, and it renders the exposition. Each route's
counts and histogram are bound when the plugin wraps it, so a request does no label lookup.
"""
import bisect
import re
import time

import gevent
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

HISTORY_SECONDS = 600  # the UI's live charts: the last 10 minutes, one slot per second
_RING = HISTORY_SECONDS + 1  # plus the second now filling
FINISHED = ("success", "failure", "canceled")
GAUGED = ("waiting", "scheduled", "running")
RESULTS = ("success", "failure")

# Bucket bounds in seconds, from sub-millisecond API answers to multi-minute worker requests.
HTTP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
WRITE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
DELIVERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 21600)

_PLACEHOLDER = re.compile(r"<([A-Za-z_][A-Za-z0-9_]*)(?::[^>]*)?>")


def route_label(rule):
    """A bottle rule as the `route` label: "/job/<job_id>/stop" -> "/job/{id}/stop"."""
    def name(match):
        return "{id}" if match.group(1).endswith("id") else "{" + match.group(1) + "}"

    return _PLACEHOLDER.sub(name, rule)


class _Histogram:
    """Observations counted per bucket (a bound includes its value, as Prometheus' `le`)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound
        self.sum = 0.0

    def observe(self, value):
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def add_to(self, family, labels=()):
        cumulative, buckets = 0, []
        for bound, count in zip(self.bounds + (float("inf"),), self.counts):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        family.add_metric(list(labels), buckets, self.sum)


class _RoutePlugin:
    """Bottle plugin (api 2): counts and times every answer of a matched route by its pattern."""

    name = "hq_metrics"
    api = 2

    def __init__(self, metrics):
        self.metrics = metrics

    def apply(self, callback, route):
        import bottle  # the plugin only exists inside the bottle app

        label = route_label(route.rule)
        codes = self.metrics._http_codes(route.method, label)  # status code -> count
        duration = self.metrics._http_duration(label)
        response = bottle.response
        http_response = bottle.HTTPResponse
        clock = time.perf_counter

        def wrapper(*args, **kwargs):
            start = clock()
            try:
                result = callback(*args, **kwargs)
            except http_response as e:  # a redirect or an abort
                codes[e.status_code] = codes.get(e.status_code, 0) + 1
                raise
            except BaseException:
                codes[500] = codes.get(500, 0) + 1  # bottle answers an uncaught error with 500
                raise
            finally:
                duration.observe(clock() - start)
            code = result.status_code if isinstance(result, http_response) else response.status_code
            codes[code] = codes.get(code, 0) + 1
            return result

        return wrapper


class _Collector:
    """Turns the counts into metric families at scrape time (the library renders them)."""

    def __init__(self, metrics):
        self.metrics = metrics

    def collect(self):
        m = self.metrics
        now = m.snapshot()
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

        yield CounterMetricFamily("hq_jobs_pushed", "Jobs stored by a push.", value=m.counts["pushed"])
        finished = CounterMetricFamily("hq_jobs_finished", "Jobs that finished, by outcome.", labels=["status"])
        for status in FINISHED:
            finished.add_metric([status], m.finished_counts[status])
        yield finished
        attempts = CounterMetricFamily("hq_job_attempts", "Worker requests that ended, by result.",
                                       labels=["result"])
        for result in RESULTS:
            attempts.add_metric([result], m.attempt_counts[result])
        yield attempts
        yield CounterMetricFamily("hq_job_retries", "Failed attempts followed by a scheduled retry.",
                                  value=m.counts["retried"])
        for name, doc, histogram in (
                ("hq_delivery_duration_seconds", "Duration of a worker request.", m.delivery),
                ("hq_job_wait_seconds", "From when a job may start to when it starts.", m.wait),
                ("hq_store_write_duration_seconds", "A job log batch's write + fsync.", m.store_writes)):
            family = HistogramMetricFamily(name, doc)
            histogram.add_to(family)
            yield family
        yield CounterMetricFamily("hq_store_write_errors", "Job log batches that could not be written.",
                                  value=m.counts["write_failed"])
        yield CounterMetricFamily("hq_wal_compactions", "Job log rewrites completed.", value=m.counts["compacted"])

        requests = CounterMetricFamily("hq_http_requests", "HTTP requests answered, by route pattern and code.",
                                       labels=["method", "route", "code"])
        for (method, route), codes in m.http_counts.items():
            for code, count in list(codes.items()):
                requests.add_metric([method, route, str(code)], count)
        yield requests
        durations = HistogramMetricFamily("hq_http_request_duration_seconds", "Time to answer an HTTP request.",
                                          labels=["route"])
        for route, histogram in m.http_durations.items():
            histogram.add_to(durations, [route])
        yield durations


class Metrics:
    def __init__(self, snapshot, clock=time.time):
        self.snapshot = snapshot
        self.clock = clock  # wall clock for the history slots (a test may pass its own)
        # Plain counts, read by _Collector at scrape time. Every caller runs in the gevent hub's
        # thread (the log's threadpool only does file I/O), so no lock is needed; the library's
        # own Counter/Histogram take one per update, which cost ~5 us of CPU per push.
        self.counts = dict.fromkeys(("pushed", "retried", "write_failed", "compacted"), 0)
        self.finished_counts = dict.fromkeys(FINISHED, 0)
        self.attempt_counts = dict.fromkeys(RESULTS, 0)
        self.delivery = _Histogram(DELIVERY_BUCKETS)
        self.wait = _Histogram(WAIT_BUCKETS)
        self.store_writes = _Histogram(WRITE_BUCKETS)
        self.http_counts = {}  # (method, route pattern) -> {status code: count}
        self.http_durations = {}  # route pattern -> _Histogram
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.registry.register(_Collector(self))

        # The history: one ring per series, slot = unix second % _RING.
        self._ring = {name: [0] * _RING for name in FINISHED + GAUGED}
        self._second = int(clock())  # the newest second the ring holds (its slot is filling)
        self._last_gauges = dict.fromkeys(GAUGED, 0)
        self._sampler = None

    # --- counting ------------------------------------------------------------------------
    def route_plugin(self):
        return _RoutePlugin(self)

    def _http_codes(self, method, route):
        return self.http_counts.setdefault((method, route), {})

    def _http_duration(self, route):
        return self.http_durations.setdefault(route, _Histogram(HTTP_BUCKETS))

    def count_unmatched(self, method, code):
        codes = self._http_codes(method, "unmatched")
        codes[code] = codes.get(code, 0) + 1

    def pushed(self, n=1):
        self.counts["pushed"] += n

    def finished(self, status):
        self.finished_counts[status] += 1
        self._advance()
        self._ring[status][self._second % _RING] += 1

    def attempt(self, result, seconds):
        self.attempt_counts[result] += 1
        self.delivery.observe(seconds)

    def retried(self):
        self.counts["retried"] += 1

    def waited(self, seconds):
        self.wait.observe(max(0.0, seconds))

    def store_write(self, seconds):
        self.store_writes.observe(seconds)

    def write_failed(self):
        self.counts["write_failed"] += 1

    def compacted(self):
        self.counts["compacted"] += 1

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

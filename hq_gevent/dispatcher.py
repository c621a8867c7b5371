"""Dispatchers: consumers of the job queue, each with a greenlet pool bounding its requests."""
import logging
import time

import gevent
import gevent.pool

from hq_gevent import retry
from hq_gevent.delivery import Delivery, DeliveryError, outcome_text, reason_phrase
from hq_gevent.hosts import AllowedHosts
from hq_gevent.ids import now_ms
from hq_gevent.storage import StoreUnavailable

log = logging.getLogger("hq_gevent")


class JobStopped(gevent.GreenletExit):
    """Raised into a worker request greenlet to abort it (a GreenletExit, so the hub stays quiet)."""


class Dispatchers:
    def __init__(self, store, config, metrics=None):
        self.store = store
        self.metrics = metrics or store.metrics
        self.config = config
        self.allowed_hosts = AllowedHosts(config.allowed_hosts)
        self.delivery = Delivery(config.max_output_bytes, config.dispatchers * max(1, config.max_workers),
                                 config.signing_secrets, self.allowed_hosts)
        self.pools = [gevent.pool.Pool(max(1, config.max_workers)) for _ in range(config.dispatchers)]
        self.loops = []
        self.requests = {}  # job id -> greenlet of its worker request (killed by stop)
        store.on_abort = self.abort

    @property
    def in_flight(self):
        return len(self.requests)

    def start(self):
        self.loops = [gevent.spawn(self._consume, pool) for pool in self.pools]

    def _consume(self, pool):
        while True:
            pool.wait_available()
            pool.spawn(self._run, self.store.claim())

    def _run(self, job):
        if job.canceled:  # stopped between being claimed and starting
            after = job.finished(canceled=True, attempted=False, err="The job was stopped before it started")
        else:
            after = self._deliver(job)
        try:
            self.store.finish(job, after)
        except StoreUnavailable as e:
            log.error("The outcome of job %d could not be recorded (it will run again): %s",
                      job.id, e, extra={"job_id": job.id})
            return
        if after.waiting:
            self.metrics.retried()
        else:
            self.metrics.finished("success" if after.success else "failure" if after.failure else "canceled")

    def _deliver(self, job):
        """The job's state after one attempt: finished, or waiting for a retry."""
        request = gevent.spawn(self._attempt, job, job.attempts + 1)
        self.requests[job.id] = request
        started = time.perf_counter()
        try:
            request.join()
        finally:
            del self.requests[job.id]
        result = request.value
        if isinstance(result, JobStopped):
            return job.finished(canceled=True, err="The job was stopped while it was running")
        succeeded = not isinstance(result, Exception) and 200 <= result.status < 300
        self.metrics.attempt("success" if succeeded else "failure", time.perf_counter() - started)
        if isinstance(result, Exception):
            return self._failed(job, err=str(result))
        output = outcome_text(result, self.config.max_output_bytes)
        if 200 <= result.status < 300:
            return job.finished(success=True, status_code=result.status, output=output)
        return self._failed(job, result.status, output, reason_phrase(result), result.retry_after, result.no_retry)

    def _failed(self, job, status_code=None, output="", err="", retry_after=None, no_retry=False):
        """A failed attempt: another one after a backoff while the policy allows (SPEC §10.3)."""
        wait = None
        if not job.canceled:  # a stop that raced with the answer: no further attempt
            wait = retry.next_wait(job.retry, job.attempts + 1, status_code, retry_after, no_retry,
                                   job.first_started_at, now_ms())
        if wait is None:
            return job.finished(failure=True, status_code=status_code, output=output, err=err)
        log.debug("Job %d: attempt %d failed (%s); next attempt in %.1fs", job.id, job.attempts + 1, err, wait,
                  extra={"job_id": job.id})
        return job.retrying(wait, status_code, output, err)

    def _attempt(self, job, attempt):
        """The worker request's Response, or the exception that stands for its outcome."""
        try:
            return self.delivery.send(job.id, job.url, job.payload, job.headers, job.timeout, attempt=attempt)
        except DeliveryError as e:
            return e
        except Exception as e:
            log.exception("Delivering job %d failed unexpectedly", job.id, extra={"job_id": job.id})
            return DeliveryError(f"failed to do http request: internal error: {e!r}")

    def abort(self, job_id):
        """Kill the worker request of a job running here (the store asks, for a stop)."""
        request = self.requests.get(job_id)
        if request is not None:
            request.kill(JobStopped, block=False)

    def shutdown(self, timeout):
        """Take no more jobs; give running ones `timeout` seconds, then abandon them unrecorded
        (the log still has them waiting, so they run after the next start)."""
        gevent.killall(self.loops)
        with gevent.Timeout(timeout, False):
            for pool in self.pools:
                pool.join()
        abandoned = sum(len(pool) for pool in self.pools)
        if abandoned:
            log.warning("Shutdown timeout: %d running jobs left unfinished; they run again at the next start", abandoned)
        for pool in self.pools:
            pool.kill(block=False)
        gevent.killall(list(self.requests.values()), block=False)
        return abandoned

"""The job store: every job in an in-memory index (ids ascending), every change through the log.

A change is applied to memory only once its log record is durable (the WAL calls back in
log order), so what the API shows never runs ahead of what a restart would load.
"""
import bisect
import collections
import contextlib
import gc
import logging
import os
import time

import gevent
import gevent.event
import gevent.queue

from hq_gevent import retry, wal
from hq_gevent.ids import EPOCH_MS, SEQUENCE_BITS, SERVER_ID_BITS, IdGenerator, now_ms, timestamp_ms
from hq_gevent.job import STATUSES, Job
from hq_gevent.metrics import Metrics
from hq_gevent.schedule import Schedule
from hq_gevent.storage import JobConflict, JobNotFound

log = logging.getLogger("hq_gevent")

LOG_NAME = "jobs.jsonl"
SCAN_SLICE_SECONDS = 0.02  # a list scan yields this often (SPEC §11: at least every 50 ms)
SCAN_CHECK_EVERY = 64  # jobs examined between looks at the clock


class Store:
    def __init__(self, data_dir, config, metrics=None):
        self.config = config
        self.metrics = metrics or Metrics(lambda: {})
        self.loaded = False
        self.jobs = {}
        self.ids = []  # sorted: ids grow in push order, so this is also creation order
        self.ids_gen = IdGenerator(config.server_id)
        self.wal = wal.WriteAheadLog(os.path.join(data_dir, LOG_NAME), config.wal_fsync, self.metrics)
        self.live_bytes = 0  # bytes the log would hold if rewritten now
        self.queue = gevent.queue.Queue(maxsize=config.queues)
        self.backlog = collections.deque()  # waiting jobs that did not fit in the queue, in order
        self._backlog_ready = gevent.event.Event()
        self.num_waiting = 0
        self.num_running = 0
        self.num_scheduled = 0  # waiting jobs whose run_at is still ahead (held by the schedule)
        self.schedule = Schedule(self._release)
        self.unique = {}  # uniqueKey -> the newest stored job that holds it
        self._unique_pending = {}  # uniqueKey -> Event set when the push that claimed it is done
        self._busy = {}  # job id -> Event: one API change at a time per job
        self._running = {}  # job id -> Event set when the outcome of its attempt is recorded
        self.on_abort = lambda job_id: None  # the dispatchers' hook to abort a running request
        self._greenlets = []
        self.default_retry = Job.default_retry = retry.from_config(config)

    # --- start and stop ----------------------------------------------------------------
    def load(self):
        # Replay allocates millions of objects that all live on: the cyclic GC would rescan
        # the growing heap again and again (most of the load time at a million jobs).
        gc.disable()
        try:
            self.wal.load(self._replay)
        finally:
            gc.enable()
            gc.freeze()  # the loaded jobs stay out of later collections too
        now = now_ms()
        for job_id in self.ids:
            job = self.jobs[job_id]
            if job.unique_key is not None:
                self.unique[job.unique_key] = job
            if job.waiting:
                self.num_waiting += 1
                self._start_when_due(job, now)
        if self.ids:
            self.ids_gen.observe(self.ids[-1])
        self.loaded = True

    def unready_reason(self):
        """Why the store cannot take changes now (SPEC §12 /readyz), or None when it can."""
        if not self.loaded:
            return "the job log is loading"
        if self.wal.last_error:
            return f"the last job log write failed: {self.wal.last_error}"
        return None

    def stats(self):
        """The GET /stats figures the store knows (SPEC §5, §10.5)."""
        return {
            "queueUsage": self.queue_usage(),
            "numWaitingJobs": self.num_waiting,
            "numRunningJobs": self.num_running,
            "numJobs": len(self.jobs),
            "numScheduledJobs": self.num_scheduled,
            "numJobsInLastMinute": self.jobs_created_since(now_ms() - 60000),
            "numBackloggedJobs": len(self.backlog),
            "walBytes": self.wal.size,
        }

    def jobs_created_since(self, ms):
        """Stored jobs created after `ms`: ids encode their creation time and are kept sorted."""
        first = max(0, ms - EPOCH_MS) << (SERVER_ID_BITS + SEQUENCE_BITS)
        return len(self.ids) - bisect.bisect_left(self.ids, first)

    def gauges(self):
        """The figures a metrics scrape reads (SPEC §12): job states partition the active jobs."""
        return {
            "waiting": self.num_waiting - self.num_scheduled,
            "scheduled": self.num_scheduled,
            "running": self.num_running,
            "stored": len(self.jobs),
            "queue_usage": self.queue_usage(),
            "wal_bytes": self.wal.size,
        }

    def _replay(self, rec, size):
        op = rec[0]
        if op == "p":
            job_id = rec[1]
            job = self.jobs.get(job_id)
            if job is None:
                job = self.jobs[job_id] = Job.from_record(rec)
                self._insert_id(job.id)
            else:
                self.live_bytes -= job.record_size
                job.load_record(rec)
            job.record_size = size
            self.live_bytes += size
        elif op == "d" and len(rec) == 2:
            # A delete of an unknown id is legitimate: compaction may already have left it out.
            old = self.jobs.pop(rec[1], None)
            if old is not None:
                self._remove_ids([old.id])
                self.live_bytes -= old.record_size
        else:
            raise ValueError(f"unknown record type {op!r}")

    def open(self, threadpool):
        self.wal.open(threadpool)
        self._greenlets = [gevent.spawn(self._feed_queue), gevent.spawn(self._compact_when_due)]
        if self.config.job_lifetime:
            self._greenlets.append(gevent.spawn(self._expire_old_jobs))
        self.schedule.start()

    def close(self):
        self.schedule.stop()
        gevent.killall(self._greenlets)
        self.wal.close()

    # --- the queue ----------------------------------------------------------------------
    def _enqueue(self, job):
        # A full queue never blocks or fails a push: the job waits in the backlog, in order.
        if self.backlog or self.queue.full():
            self.backlog.append(job)
            self._backlog_ready.set()
        else:
            self.queue.put_nowait(job)

    def _start_when_due(self, job, now):
        """A waiting job goes to the schedule while its run_at is ahead, else into the queue."""
        if job.run_at is not None and job.run_at > now:
            self.num_scheduled += 1
            self.schedule.add(job.id, job.run_at)
        else:
            job.ready_at = job.run_at or now
            job.run_at = None
            self._enqueue(job)

    def _release(self, job_id, run_at):
        job = self.jobs.get(job_id)
        # Stale entries (stopped, restarted, deleted, rescheduled) are skipped here.
        if job is not None and job.waiting and not job.running and job.run_at == run_at:
            self.num_scheduled -= 1
            job.run_at = None
            job.ready_at = run_at
            self._enqueue(job)

    def _feed_queue(self):
        while True:
            self._backlog_ready.wait()
            while self.backlog:
                self.queue.put(self.backlog[0])  # keep it at the head until it is in, so order holds
                self.backlog.popleft()
            self._backlog_ready.clear()

    def queue_usage(self):
        """Waiting jobs in the queue now. A job stopped while queued keeps its slot until a
        dispatcher drops it; counting only the still-waiting ones (at most `queues` to look at)
        keeps the figure honest."""
        return sum(1 for job in self.queue.queue if job.waiting)

    # --- index --------------------------------------------------------------------------
    def _insert_id(self, job_id):
        if not self.ids or job_id > self.ids[-1]:
            self.ids.append(job_id)
        else:
            bisect.insort(self.ids, job_id)

    def _remove_ids(self, job_ids):
        if len(job_ids) < 16:
            for job_id in job_ids:
                i = bisect.bisect_left(self.ids, job_id)
                if i < len(self.ids) and self.ids[i] == job_id:
                    del self.ids[i]
        else:
            doomed = set(job_ids)
            self.ids = [i for i in self.ids if i not in doomed]

    def get(self, job_id):
        job = self.jobs.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    # --- changes ------------------------------------------------------------------------
    def _log_put(self, job, record, then):
        """Append a job's record; when durable, account its size and run `then`."""
        line = wal.encode(record)

        def apply():
            self.live_bytes += len(line) - job.record_size
            job.record_size = len(line)
            then()

        self.wal.append(line, apply)

    @contextlib.contextmanager
    def exclusive(self, job_id):
        """Serialize API changes of one job (stop, restart, delete) across their log write."""
        while job_id in self._busy:
            self._busy[job_id].wait()
        done = self._busy[job_id] = gevent.event.Event()
        try:
            yield
        finally:
            del self._busy[job_id]
            done.set()

    def _log_waiting(self, jobs):
        """Log fresh waiting `jobs` in one write; once durable each is indexed (a restarted job
        replaces its old object) and enqueued, or scheduled when its run_at is ahead."""
        lines = [wal.encode(job.to_record()) for job in jobs]

        def stored():
            now = now_ms()
            for job, line in zip(jobs, lines):
                old = self.jobs.get(job.id)
                if old is None:
                    self._insert_id(job.id)
                else:
                    self.live_bytes -= old.record_size
                self.jobs[job.id] = job
                job.record_size = len(line)
                self.live_bytes += len(line)
                if job.unique_key is not None:
                    self.unique[job.unique_key] = job
                self.num_waiting += 1
                self._start_when_due(job, now)

        self.wal.append(b"".join(lines), stored)
        return len(jobs)

    def push(self, spec):
        """Store a new job durably and enqueue it: (its view as enqueued, False), or
        (the stored job's view, True) when its uniqueKey is taken (SPEC §10.4)."""
        return self.push_many([spec])[0]

    def push_many(self, specs):
        """Store all new jobs of `specs` in one durable log write: [(view, duplicate)] in order."""
        keys = {spec.unique_key for spec in specs if spec.unique_key is not None}
        while True:  # let pushes that claimed one of these keys finish first
            pending = [self._unique_pending[key] for key in keys if key in self._unique_pending]
            if not pending:
                break
            for done in pending:
                done.wait()
        # From here to the claim below nothing yields: a key is checked and claimed atomically.
        now = now_ms()
        results, fresh, claimed = [], [], {}
        for spec in specs:
            holder = claimed.get(spec.unique_key) or self._unique_holder(spec.unique_key, now)
            if holder is not None:
                results.append((holder, True))
                continue
            job = Job(self.ids_gen.next_id(), spec.name, spec.comment, spec.url, spec.payload, spec.headers,
                      spec.timeout, spec.retry, spec.run_at, spec.unique_key)
            if spec.unique_key is not None:
                claimed[spec.unique_key] = job
            fresh.append(job)
            results.append((job, False))
        views = [(job.to_dict(), duplicate) for job, duplicate in results]
        if not fresh:
            return views
        done = gevent.event.Event()
        for key in claimed:
            self._unique_pending[key] = done
        try:
            self.metrics.pushed(self._log_waiting(fresh))
        finally:
            for key in claimed:
                del self._unique_pending[key]
            done.set()
        return views

    def _unique_holder(self, key, now):
        """The stored job that holds `key` within unique_window, or None."""
        if key is None:
            return None
        job = self.unique.get(key)
        if job is None or self.jobs.get(job.id) is not job:
            return None
        window = self.config.unique_window
        if window and timestamp_ms(job.id) <= now - window * 1000:
            return None
        return job

    def restart(self, job_id, copy=False):
        with self.exclusive(job_id):
            job = self.get(job_id)
            self._refuse_active(job)
            # The response and the record show the job as it will stand once enqueued.
            fresh = job.copy(self.ids_gen.next_id()) if copy else job.copy(job.id, job.unique_key)
            view = fresh.to_dict()
            self._log_waiting([fresh])
            return view

    def delete(self, job_id):
        with self.exclusive(job_id):
            job = self.get(job_id)
            self._refuse_active(job)
            self._log_deletes([job])

    def _log_deletes(self, jobs):
        def removed():
            for job in jobs:
                if self.jobs.pop(job.id, None) is not None:
                    self.live_bytes -= job.record_size
                if job.unique_key is not None and self.unique.get(job.unique_key) is job:
                    del self.unique[job.unique_key]
            self._remove_ids([job.id for job in jobs])

        self.wal.append(b"".join(wal.encode(["d", job.id]) for job in jobs), removed)

    @staticmethod
    def _refuse_active(job):
        if job.running:
            raise JobConflict(f"The job {job.id} is running now")
        if job.waiting:
            raise JobConflict(f"The job {job.id} is waiting now")

    def stop(self, job_id):
        """Cancel a waiting job, or abort a running one; returns once its outcome is recorded."""
        with self.exclusive(job_id):
            job = self.get(job_id)
            if job.running:
                job.canceled = True
                self.on_abort(job.id)
                done = self._running.get(job.id)
                if done is not None:
                    done.wait(timeout=10)
            elif job.waiting:
                self.cancel_waiting(job)
            else:
                raise JobConflict(f"The job {job.id} is not active")

    def cancel_waiting(self, job):
        """Stop a job that has not started (or waits for a retry): it is never sent (again)."""
        was_scheduled = job.run_at is not None
        job.canceled = True  # shows "canceling" and makes a dispatcher skip it meanwhile
        after = job.finished(canceled=True, attempted=False, status_code=job.status_code, output=job.output,
                             err="The job was stopped before it started" if not job.attempts
                             else "The job was stopped while it waited for a retry")

        def canceled():
            if job.waiting and not job.running:
                if job.run_at is not None:
                    self.num_scheduled -= 1
                job.assume(after)
                self.num_waiting -= 1
                self.metrics.finished("canceled")

        try:
            self._log_put(job, after.to_record(), canceled)
        except wal.WalError:
            job.canceled = False
            if not was_scheduled:
                self._enqueue(job)  # a dispatcher may have skipped it; a duplicate entry is skipped too
            raise

    # --- the dispatcher's side ----------------------------------------------------------
    def claim(self):
        """The next job to send now, in queue order; it is running from here on."""
        while True:
            job = self.queue.get()
            if self.take(job):
                return job

    def take(self, job):
        """A dispatcher took `job` from the queue: True if it is to be sent now."""
        if not job.waiting or job.running or job.canceled or self.jobs.get(job.id) is not job:
            return False
        job.waiting, job.running = False, True
        job.started_at = now_ms()
        if job.ready_at is not None:
            self.metrics.waited(max(0, job.started_at - job.ready_at) / 1000)
        if not job.attempts:
            job.first_started_at = job.started_at
        self.num_waiting -= 1
        self.num_running += 1
        self._running[job.id] = gevent.event.Event()
        return True

    def finish(self, job, after):
        """Record a sent job's outcome (`after`: job.finished() or job.retrying()). A retrying
        job waits in the schedule for its next attempt. On a log failure the job stays as the
        log has it (waiting), so it runs again after a restart."""
        def finished():
            job.assume(after)
            if job.waiting:
                self.num_waiting += 1
                self._start_when_due(job, now_ms())

        try:
            self._log_put(job, after.to_record(), finished)
        except wal.WalError:
            job.running, job.waiting = False, True
            job.started_at = job.history[-1][1] if job.history else None
            self.num_waiting += 1
            raise
        finally:
            self.num_running -= 1
            self._running.pop(job.id).set()

    # --- queries ------------------------------------------------------------------------
    def list_jobs(self, begin=None, reverse=False, limit=0, match=None):
        """(jobs, next_id): walk from `begin` in id order keeping jobs that `match`, until
        `limit` matched (0 = all). next_id is the stored id after the last one examined
        when the limit stopped the walk and more jobs follow, else None."""
        found = []
        position = self._start_position(begin, reverse)
        step = -1 if reverse else 1
        examined = 0
        slice_end = time.perf_counter() + SCAN_SLICE_SECONDS
        while 0 <= position < len(self.ids):
            job = self.jobs[self.ids[position]]
            position += step
            if match is None or match(job):
                found.append(job)
                if limit and len(found) >= limit:
                    break
            examined += 1
            # By elapsed time, not by count: a job's match may cost far more than another's.
            if examined % SCAN_CHECK_EVERY == 0 and time.perf_counter() > slice_end:
                # > 0: sleep(0) may resume this greenlet before the loop polls for I/O.
                gevent.sleep(0.001)  # let others run; the index may change meanwhile
                position = self._after(job.id, reverse)
                slice_end = time.perf_counter() + SCAN_SLICE_SECONDS
        next_id = self.ids[position] if limit and len(found) >= limit and 0 <= position < len(self.ids) else None
        return found, next_id

    def _start_position(self, begin, reverse):
        if begin is None:
            return len(self.ids) - 1 if reverse else 0
        if reverse:
            return bisect.bisect_right(self.ids, begin) - 1
        return bisect.bisect_left(self.ids, begin)

    def _after(self, job_id, reverse):
        if reverse:
            return bisect.bisect_left(self.ids, job_id) - 1
        return bisect.bisect_right(self.ids, job_id)

    # --- background work ----------------------------------------------------------------
    def compaction_due(self):
        size = self.wal.size
        return size > self.config.wal_compact_min_bytes and size > self.config.wal_compact_ratio * self.live_bytes

    def compact(self):
        before = self.wal.size
        log.info("Compacting %s (%d bytes, %d live)", self.wal.path, before, self.live_bytes)
        self.wal.rewrite(self._snapshot())
        log.info("Compacted %s: %d -> %d bytes", self.wal.path, before, self.wal.size)

    def _snapshot(self):
        last = -1
        while True:
            start = bisect.bisect_right(self.ids, last)
            chunk = self.ids[start:start + 1000]
            if not chunk:
                return
            yield [wal.encode(self.jobs[job_id].to_record()) for job_id in chunk]
            last = chunk[-1]

    def _compact_when_due(self):
        while True:
            gevent.sleep(1)
            if self.compaction_due():
                try:
                    self.compact()
                except OSError as e:
                    log.error("Compaction of %s failed, will retry: %s", self.wal.path, e)
                    gevent.sleep(30)

    def expire_old_jobs(self):
        """Delete finished jobs whose finishedAt is older than job_lifetime."""
        cutoff = now_ms() - self.config.job_lifetime * 1000
        doomed = []
        for job_id in self.ids:
            if timestamp_ms(job_id) > cutoff:
                break  # created after the cutoff: cannot have finished before it
            job = self.jobs[job_id]
            if not job.active and job.finished_at is not None and job.finished_at < cutoff:
                doomed.append(job)
        if doomed:
            # One append, enqueued before any other change can interleave with the scan.
            self._log_deletes(doomed)
            log.info("Removed %d jobs finished more than %d seconds ago", len(doomed), self.config.job_lifetime)
        return len(doomed)

    def _expire_old_jobs(self):
        while True:
            gevent.sleep(self.config.job_lifetime_interval)
            try:
                self.expire_old_jobs()
            except wal.WalError as e:
                log.error("Removing expired jobs failed, will retry: %s", e)


def status_matcher(name_filter=None, term_filter=None, status=None):
    """A predicate for list_jobs, or None when nothing filters. The filters are api.TextFilter
    (RE2, linear time): `name` searches the name; `term` the name, id, comment, url and status."""
    if status is not None and status not in STATUSES:
        raise ValueError(f"unknown status '{status}'")
    if not (name_filter or term_filter or status):
        return None
    # Eight statuses in all: which ones the term matches is known before the walk.
    term_statuses = frozenset(s for s in STATUSES if term_filter.search(s)) if term_filter else frozenset()

    def match(job):
        if status is not None and job.status != status:
            return False
        if name_filter is not None and not name_filter.search(job.name):
            return False
        if term_filter is not None:
            s = term_filter.search
            if not (s(job.name) or s(job.comment) or s(job.url) or (term_statuses and job.status in term_statuses)
                    or term_filter.search_unique(str(job.id))):
                return False
        return True

    return match

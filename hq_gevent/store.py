"""The job store: a keydir of every job (ids ascending) in memory, every change through the log.

The Bitcask model: each stored job is one row of compact columns (keydir.py) that says where
its latest record lies in the log; a finished job's payload, headers, output and err are read
back from there (in the threadpool, a page of jobs in one pass) when a request shows it. Active
jobs (waiting, scheduled, running) also stay whole in memory: the dispatchers send them, and
they are few next to the finished ones. Compaction rewrites the log and writes a hint file
(hint.py) of the keydir, so a start-up replays only the records after it.

A change is applied to memory only once its log record is durable (the WAL calls back in
log order), so what the API shows never runs ahead of what a restart would load.
"""
import bisect
import collections
import collections.abc
import contextlib
import ctypes
import gc
import logging
import os
import time
from array import array

import gevent
import gevent.event
import gevent.queue
import ujson

from hq_gevent import hint, retry, wal
from hq_gevent.ids import EPOCH_MS, SEQUENCE_BITS, SERVER_ID_BITS, IdGenerator, now_ms, timestamp_ms
from hq_gevent.job import STATUSES, Job
from hq_gevent.job import CANCELED, FAILURE, SUCCESS
from hq_gevent.keydir import ACTIVE, FINISH_TIME, Keydir, status_table
from hq_gevent.metrics import Metrics
from hq_gevent.schedule import Schedule
from hq_gevent.storage import JobConflict, JobNotFound, StoreUnavailable, refuse_active

log = logging.getLogger("hq_gevent")

LOG_NAME = "jobs.jsonl"
HINT_NAME = "jobs.hint"
SCAN_SLICE_SECONDS = 0.02  # a list scan yields this often (SPEC §11: at least every 50 ms)
SCAN_BLOCK = 4096  # rows prefiltered at once (column masks) between looks at the clock
SNAPSHOT_CHUNK = 1000
RECENT_READS = 1000  # finished jobs kept parsed after a read (~5 KB each with 2 KB payload and output)
OLD_READER_SECONDS = 60  # a replaced log stays readable this long for reads planned before
RECORD_FLAGS = SUCCESS | FAILURE | CANCELED
_ACTIVE_ROWS = bytes(1 if flags & ACTIVE else 0 for flags in range(256))


class Row:
    """A finished job as a list filter sees it, from the keydir alone (no log read)."""
    __slots__ = ("id", "name", "comment", "url", "status")

    def __init__(self, job_id, name, comment, url, status):
        self.id, self.name, self.comment, self.url, self.status = job_id, name, comment, url, status


class StoredIds(collections.abc.Sequence):
    """The stored ids, ascending (a read-only view of the keydir's column)."""

    def __init__(self, keydir_of):
        self._keydir_of = keydir_of

    def __len__(self):
        return len(self._keydir_of().ids)

    def __getitem__(self, i):
        return self._keydir_of().ids[i]

    def __eq__(self, other):
        return list(self) == list(other)


class StoredJobs(collections.abc.Mapping):
    """Every stored job by id: a job not active is read from the log on each access."""

    def __init__(self, store):
        self._store = store

    def __len__(self):
        return len(self._store.keydir)

    def __iter__(self):
        return iter(self._store.keydir.ids.tolist())

    def __contains__(self, job_id):
        return job_id in self._store.active or self._store.keydir.find(job_id) is not None

    def __getitem__(self, job_id):
        try:
            return self._store.get(job_id)
        except JobNotFound:
            raise KeyError(job_id) from None


class Store:
    def __init__(self, data_dir, config, metrics=None):
        self.config = config
        self.metrics = metrics or Metrics(lambda: {})
        self.loaded = False
        self.keydir = Keydir()  # every stored job, ids ascending (= creation order)
        self.active = {}  # job id -> Job, for each waiting or running job
        self.jobs = StoredJobs(self)
        self.ids = StoredIds(lambda: self.keydir)
        self.ids_gen = IdGenerator(config.server_id)
        self.wal = wal.WriteAheadLog(os.path.join(data_dir, LOG_NAME), config.wal_fsync, self.metrics)
        self.hint_path = os.path.join(data_dir, HINT_NAME)
        self.reader = None  # wal.LogReader of the current log
        self._recent = collections.OrderedDict()  # (reader, offset) -> Job read from there
        self.hint_covered = 0  # log bytes the start-up took from the hint file (0: a full replay)
        self.live_bytes = 0  # bytes the log would hold if rewritten now
        self._moved = None  # during a compaction: job id -> offset of its record logged meanwhile
        self._replayed_waiting = {}  # during the replay: job id -> record, of jobs waiting so far
        self.queue = gevent.queue.Queue(maxsize=config.queues)
        self.backlog = collections.deque()  # waiting jobs that did not fit in the queue, in order
        self._backlog_ready = gevent.event.Event()
        self.num_waiting = 0
        self.num_running = 0
        self.num_scheduled = 0  # waiting jobs whose run_at is still ahead (held by the schedule)
        self.schedule = Schedule(self._release)
        self.unique = {}  # uniqueKey -> the id of the newest stored job that holds it
        self.unique_of = {}  # job id -> its uniqueKey, for the jobs that have one
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
            covered = self.hint_covered = self._load_hint()
            self.wal.load(self._replay, covered)
            kd = self.keydir
            for job_id, rec in self._replayed_waiting.items():
                job = self.active[job_id] = Job.from_record(rec)
                job.record_size = kd.lengths[kd.find(job_id)]
            self._replayed_waiting = {}
        finally:
            gc.enable()
            gc.freeze()  # the loaded jobs stay out of later collections too
        _release_free_memory()
        self.reader = wal.LogReader(self.wal.path)
        now = now_ms()
        for job_id in sorted(self.active):
            self.num_waiting += 1
            self._start_when_due(self.active[job_id], now)
        for job_id in sorted(self.unique_of):
            self.unique[self.unique_of[job_id]] = job_id
        if len(self.keydir):
            self.ids_gen.observe(self.keydir.ids[-1])
        self.loaded = True

    def _load_hint(self):
        """Take the keydir from the hint file when it matches the log: returns the log bytes it
        covers (the replay goes on from there), or 0 after a WARN when it cannot be trusted."""
        if not os.path.exists(self.hint_path):
            return 0
        try:
            fd = os.open(self.wal.path, os.O_RDONLY)
        except OSError as e:
            log.warning("Ignoring %s: cannot open %s (%s); replaying the whole log", self.hint_path, self.wal.path, e)
            return 0
        try:
            keydir, unique_of, covered = hint.load(self.hint_path, fd)
            active = {}
            rows = keydir.flags.translate(_ACTIVE_ROWS)
            pos = rows.find(1)
            while pos >= 0:
                job = Job.from_record(ujson.loads(os.pread(fd, keydir.lengths[pos], keydir.offsets[pos])))
                if job.id != keydir.ids[pos] or not job.waiting:
                    raise hint.HintInvalid(f"row {pos} does not point at the waiting job {keydir.ids[pos]}")
                job.record_size = keydir.lengths[pos]
                active[job.id] = job
                pos = rows.find(1, pos + 1)
        except (hint.HintInvalid, OSError, ValueError, KeyError, TypeError, IndexError) as e:
            log.warning("Ignoring %s (%s): replaying the whole log", self.hint_path, e)
            return 0
        finally:
            os.close(fd)
        self.keydir, self.unique_of, self.active = keydir, unique_of, active
        self.live_bytes = sum(keydir.lengths)
        log.info("Loaded %d jobs from %s; replaying %s after byte %d", len(keydir), self.hint_path,
                 self.wal.path, covered)
        return covered

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
            "numJobs": len(self.keydir),
            "numScheduledJobs": self.num_scheduled,
            "numJobsInLastMinute": self.jobs_created_since(now_ms() - 60000),
            "numBackloggedJobs": len(self.backlog),
            "walBytes": self.wal.size,
        }

    def jobs_created_since(self, ms):
        """Stored jobs created after `ms`: ids encode their creation time and are kept sorted."""
        first = max(0, ms - EPOCH_MS) << (SERVER_ID_BITS + SEQUENCE_BITS)
        return len(self.keydir) - bisect.bisect_left(self.keydir.ids, first)

    def gauges(self):
        """The figures a metrics scrape reads (SPEC §12): job states partition the active jobs."""
        return {
            "waiting": self.num_waiting - self.num_scheduled,
            "scheduled": self.num_scheduled,
            "running": self.num_running,
            "stored": len(self.keydir),
            "queue_usage": self.queue_usage(),
            "wal_bytes": self.wal.size,
        }

    def _replay(self, rec, offset, size):
        op = rec[0]
        if op == "p" and len(rec) == 15:
            # The fast path (no delivery-policy field): a row from the record's fields; a job
            # still waiting at the end of the replay is built from its record then.
            (_, job_id, name, comment, url, _, _, _, waiting, _, finished, flags, _, _, _) = rec
            if type(job_id) is not int or type(name) is not str or type(url) is not str:
                raise ValueError("the job id is not an integer, or its name or url not a string")
            flags = (flags & RECORD_FLAGS) | (FINISH_TIME if finished is not None else 0)
            if waiting == 1:
                self._replayed_waiting[job_id] = rec
                flags |= ACTIVE
            else:
                self._replayed_waiting.pop(job_id, None)
            self.active.pop(job_id, None)
            self.unique_of.pop(job_id, None)
            self.live_bytes += size - self.keydir.put_row(job_id, offset, size, finished, flags, name, url, comment)
        elif op == "p":
            self._replayed_waiting.pop(rec[1], None)
            self._index(Job.from_record(rec), offset, size)
        elif op == "d" and len(rec) == 2:
            # A delete of an unknown id is legitimate: compaction may already have left it out.
            if type(rec[1]) is int:
                self._forget([rec[1]])
        else:
            raise ValueError(f"unknown record type {op!r}")

    def _index(self, job, offset, size):
        """`job` as its record at `offset` (`size` bytes) has it: in the keydir, and in memory
        while it is active."""
        self.live_bytes += size - self.keydir.put(job, offset, size)
        job.record_size = size
        if job.waiting or job.running:
            self.active[job.id] = job
        else:
            self.active.pop(job.id, None)
        if job.unique_key is not None:
            self.unique_of[job.id] = job.unique_key
        else:
            self.unique_of.pop(job.id, None)
        if self._moved is not None:
            self._moved[job.id] = offset

    def _forget(self, job_ids):
        self.live_bytes -= self.keydir.remove(job_ids)
        for job_id in job_ids:
            self.active.pop(job_id, None)
            self._replayed_waiting.pop(job_id, None)
            key = self.unique_of.pop(job_id, None)
            if key is not None and self.unique.get(key) == job_id:
                del self.unique[key]

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
        if self.reader is not None and self.wal.last_error is None and self.wal.size:
            # Everything is written: the next start-up can skip the replay.
            try:
                covered = self.wal.size
                identity = hint.log_identity(self.reader.fd, covered)
                hint.write(self.hint_path, hint.encode(self.keydir, self.unique_of, identity, covered))
            except (OSError, ValueError) as e:
                log.warning("Cannot write %s (%s): the next start-up replays the whole log", self.hint_path, e)

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
        job = self.active.get(job_id)
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

    # --- reading jobs back -----------------------------------------------------------------
    def get(self, job_id):
        job = self.active.get(job_id)
        if job is not None:
            return job
        kd = self.keydir
        pos = kd.find(job_id)
        if pos is None:
            raise JobNotFound(job_id)
        return self._read([(job_id, self.reader, kd.offsets[pos], kd.lengths[pos])])[0]

    def _read(self, wanted):
        """Jobs from their log records, [(job_id, reader, offset, length)] in one threadpool
        pass per reader. A read that fails is a 503 for this request (StoreUnavailable).
        The last RECENT_READS jobs read are kept parsed (a record at an offset of one log file
        never changes, and a finished job is never changed in place): a page asked again and
        again (a UI's first page) is not read and parsed again each time."""
        by_reader = {}
        jobs = [None] * len(wanted)
        recent = self._recent
        for index, (job_id, reader, offset, length) in enumerate(wanted):
            job = recent.get((reader, offset))
            if job is not None and job.id == job_id:
                recent.move_to_end((reader, offset))
                jobs[index] = job
            else:
                by_reader.setdefault(reader, []).append((index, offset, length))
        threadpool = gevent.get_hub().threadpool
        for reader, spans in by_reader.items():
            datas = threadpool.apply(reader.read_many, ([(offset, length) for _, offset, length in spans],))
            if isinstance(datas, Exception):
                log.error("Reading jobs from %s failed: %s", reader.path, datas)
                raise StoreUnavailable(f"cannot read the job log: {datas}")
            for (index, offset, length), data in zip(spans, datas):
                job_id = wanted[index][0]
                try:
                    job = Job.from_record(ujson.loads(data))
                except (ValueError, TypeError, KeyError, IndexError) as e:
                    job = e
                if not isinstance(job, Job) or job.id != job_id:
                    log.error("%s: the record at byte %d is not job %d (%s)", reader.path, offset, job_id, job)
                    raise StoreUnavailable(f"the job log does not hold job {job_id} where expected")
                job.record_size = length
                jobs[index] = recent[reader, offset] = job
                if len(recent) > RECENT_READS:
                    recent.popitem(last=False)
        return jobs

    # --- changes ------------------------------------------------------------------------
    def _log_put(self, job, record, then):
        """Append a job's record; when durable, run `then` and index the job as it stands."""
        line = wal.encode(record)

        def apply(offset):
            then()
            self._index(job, offset, len(line))

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

        def stored(offset):
            now = now_ms()
            for job, line in zip(jobs, lines):
                self._index(job, offset, len(line))
                offset += len(line)
                if job.unique_key is not None:
                    self.unique[job.unique_key] = job.id
                self.num_waiting += 1
                self._start_when_due(job, now)

        self.wal.append(b"".join(lines), stored)
        return len(jobs)

    def push(self, spec):
        """Store a new job durably and enqueue it: (its view as enqueued, False), or
        (the stored job's view, True) when its uniqueKey is taken (SPEC §10.4)."""
        if spec.unique_key is not None:
            return self.push_many([spec])[0]
        job = self._new_job(spec)  # the common case: no key to check, claim or wait for
        view = job.to_dict()
        self.metrics.pushed(self._log_waiting([job]))
        return view, False

    def _new_job(self, spec):
        return Job(self.ids_gen.next_id(), spec.name, spec.comment, spec.url, spec.payload, spec.headers,
                   spec.timeout, spec.retry, spec.run_at, spec.unique_key)

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
            job = self._new_job(spec)
            if spec.unique_key is not None:
                claimed[spec.unique_key] = job
            fresh.append(job)
            results.append((job, False))
        views = [(job.to_dict(), False) if isinstance(job, Job) else None for job, _ in results]
        if fresh:
            done = gevent.event.Event() if claimed else None
            for key in claimed:
                self._unique_pending[key] = done
            try:
                self.metrics.pushed(self._log_waiting(fresh))
            finally:
                for key in claimed:
                    del self._unique_pending[key]
                if done is not None:
                    done.set()
        for index, (holder, duplicate) in enumerate(results):
            if duplicate:  # a stored holder (an id: reading it may yield, so only now)
                holder = holder if isinstance(holder, Job) else self._holder_job(holder)
                views[index] = (holder.to_dict(), True)
        return views

    def _holder_job(self, job_id):
        try:
            return self.get(job_id)
        except JobNotFound:  # deleted since: the push found it all the same
            raise JobConflict(f"The job {job_id} that holds this uniqueKey was deleted meanwhile") from None

    def _unique_holder(self, key, now):
        """The id of the stored job that holds `key` within unique_window, or None."""
        if key is None:
            return None
        job_id = self.unique.get(key)
        if job_id is None or self.unique_of.get(job_id) != key:
            return None
        window = self.config.unique_window
        if window and timestamp_ms(job_id) <= now - window * 1000:
            return None
        return job_id

    def restart(self, job_id, copy=False):
        with self.exclusive(job_id):
            job = self.get(job_id)
            refuse_active(job)
            # The response and the record show the job as it will stand once enqueued.
            fresh = job.copy(self.ids_gen.next_id()) if copy else job.copy(job.id, job.unique_key)
            view = fresh.to_dict()
            self._log_waiting([fresh])
            return view

    def delete(self, job_id):
        with self.exclusive(job_id):
            job = self.get(job_id)
            refuse_active(job)
            self._log_deletes([job.id])

    def _log_deletes(self, job_ids):
        self.wal.append(b"".join(wal.encode(["d", job_id]) for job_id in job_ids), lambda offset: self._forget(job_ids))

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
        if not job.waiting or job.running or job.canceled or self.active.get(job.id) is not job:
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
        when the limit stopped the walk and more jobs follow, else None.

        `match` sees an active job whole, a finished one as a Row (id, name, comment, url,
        status): filters never read the log. A status_matcher's filters also narrow each block
        of rows by columns first (its name filter runs once per distinct name), so a scan
        that matches nothing costs little more than a walk over two byte columns."""
        prefilter = _Prefilter(self.keydir, match) if match is not None else None
        found = []  # per job: the active Job, or (job_id, reader, offset, length) to read back
        position = self._start_position(begin, reverse)
        step = -1 if reverse else 1
        slice_end = time.perf_counter() + SCAN_SLICE_SECONDS
        full = False
        while not full:
            kd = self.keydir
            ids = kd.ids
            if not 0 <= position < len(ids):
                break
            lo, hi = (max(0, position - SCAN_BLOCK + 1), position + 1) if reverse else \
                (position, min(len(ids), position + SCAN_BLOCK))
            mask = prefilter.block(lo, hi) if prefilter is not None else None
            while lo <= position < hi:
                if mask is not None:
                    at = mask.rfind(1, 0, position - lo + 1) if reverse else mask.find(1, position - lo)
                    if at < 0:
                        position = lo - 1 if reverse else hi
                        break
                    position = lo + at
                if match is None or self._row_matches(kd, position, match):
                    found.append(self._entry(kd, position))
                    if limit and len(found) >= limit:
                        full = True
                        position += step
                        break
                position += step
            # By elapsed time, not by count: a job's match may cost far more than another's.
            if not full and time.perf_counter() > slice_end and 0 <= position < len(ids):
                resume = ids[position]
                # > 0: sleep(0) may resume this greenlet before the loop polls for I/O.
                gevent.sleep(0.001)  # let others run; the keydir may change meanwhile
                position = self._start_position(resume, reverse)
                slice_end = time.perf_counter() + SCAN_SLICE_SECONDS
        ids = self.keydir.ids
        next_id = ids[position] if full and 0 <= position < len(ids) else None
        return self._materialize(found), next_id

    def _row_matches(self, kd, pos, match):
        if kd.flags[pos] & ACTIVE:
            job = self.active.get(kd.ids[pos])
            return job is not None and match(job)
        return match(Row(kd.ids[pos], kd.name(pos), kd.comments[pos], kd.url(pos), kd.status(pos)))

    def _entry(self, kd, pos):
        job_id = kd.ids[pos]
        job = self.active.get(job_id) if kd.flags[pos] & ACTIVE else None
        return job if job is not None else (job_id, self.reader, kd.offsets[pos], kd.lengths[pos])

    def _materialize(self, found):
        wanted = [(i, entry) for i, entry in enumerate(found) if not isinstance(entry, Job)]
        if wanted:
            for (i, _), job in zip(wanted, self._read([entry for _, entry in wanted])):
                found[i] = job
        return found

    def _start_position(self, begin, reverse):
        ids = self.keydir.ids
        if begin is None:
            return len(ids) - 1 if reverse else 0
        if reverse:
            return bisect.bisect_right(ids, begin) - 1
        return bisect.bisect_left(ids, begin)

    # --- background work ----------------------------------------------------------------
    def compaction_due(self):
        size = self.wal.size
        return size > self.config.wal_compact_min_bytes and size > self.config.wal_compact_ratio * self.live_bytes

    def compact(self):
        """Rewrite the log to the live records (a finished job's record is copied as it is), then
        write the hint file of the new log. Rows point into the new log from the switch-over on."""
        before = self.wal.size
        log.info("Compacting %s (%d bytes, %d live)", self.wal.path, before, self.live_bytes)
        kd = self.keydir
        kd.shadow = array("q", [-1]) * len(kd)
        self._moved = {}
        try:
            self.wal.rewrite(self._snapshot(), self._switched)
        finally:
            self.keydir.shadow = None
            self._moved = None
        log.info("Compacted %s: %d -> %d bytes", self.wal.path, before, self.wal.size)
        self._write_hint()

    def _snapshot(self):
        """The live records in id order, in chunks; each row's offset in the new log goes to
        the keydir's shadow column."""
        last = -1
        written = 0
        while True:
            kd = self.keydir
            start = bisect.bisect_right(kd.ids, last)
            chunk = kd.ids[start:start + SNAPSHOT_CHUNK]
            if not chunk:
                return
            lines, spans, reader = [], [], self.reader
            for pos, job_id in enumerate(chunk, start):
                job = self.active.get(job_id) if kd.flags[pos] & ACTIVE else None
                if job is not None:
                    lines.append(wal.encode(job.to_record()))
                else:
                    spans.append((len(lines), kd.offsets[pos], kd.lengths[pos]))
                    lines.append(None)
            if spans:
                datas = gevent.get_hub().threadpool.apply(reader.read_many, ([s[1:] for s in spans],))
                if isinstance(datas, Exception):
                    raise datas
                for (index, _, _), data in zip(spans, datas):
                    lines[index] = data
            kd = self.keydir  # the read yielded: rows may have moved, come or gone meanwhile
            for job_id, line in zip(chunk, lines):
                pos = kd.find(job_id)
                if pos is not None:
                    kd.shadow[pos] = written
                written += len(line)
            yield lines
            last = chunk[-1]

    def _switched(self, start, written):
        """Within the log's switch-over: rows logged since the rewrite began point into the
        copied tail, the others to their snapshot record; reads go to the new file."""
        kd = self.keydir
        shadow = kd.shadow
        for job_id, offset in self._moved.items():
            pos = kd.find(job_id)
            if pos is not None and offset >= start:
                shadow[pos] = offset - start + written
        kd.offsets, kd.shadow = shadow, None
        old, self.reader = self.reader, wal.LogReader(self.wal.path)
        # In the threadpool: the last close of a big replaced log frees its blocks, which takes a while.
        gevent.spawn_later(OLD_READER_SECONDS, gevent.get_hub().threadpool.apply, old.close)

    def _write_hint(self):
        """The hint file of the log as it stands: the keydir is copied while no change is applied
        (in slices, so the loop keeps serving; appends wait that long), then written."""
        with self.wal.paused() as covered:
            keydir = _copy_keydir(self.keydir, pause=_let_others_run)
            unique_of = dict(self.unique_of)
            reader = self.reader
        threadpool = gevent.get_hub().threadpool
        try:
            if not covered:  # nothing a hint could spare; an older one must not stay either
                raise ValueError("the log is empty")
            identity = threadpool.apply(hint.log_identity, (reader.fd, covered))
            data = hint.encode(keydir, unique_of, identity, covered, pause=_let_others_run)
            threadpool.apply(hint.write, (self.hint_path, data))
        except (OSError, ValueError) as e:
            if covered:
                log.warning("Cannot write %s (%s): the next start-up replays the whole log", self.hint_path, e)
            with contextlib.suppress(OSError):
                os.unlink(self.hint_path)

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
        kd = self.keydir
        doomed = []
        for pos, job_id in enumerate(kd.ids):
            if timestamp_ms(job_id) > cutoff:
                break  # created after the cutoff: cannot have finished before it
            if not kd.flags[pos] & ACTIVE and 0 <= kd.finished[pos] < cutoff:
                doomed.append(job_id)
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


def status_matcher(name_filter=None, term_filter=None, status=None, ids=None):
    """A predicate for list_jobs, or None when nothing filters. The filters are api.TextFilter
    (RE2, linear time): `name` searches the name; `term` the name, id, comment, url and status.
    `ids`: the store's ids, ascending, so that the term can rule out ids a block at a time."""
    if status is not None and status not in STATUSES:
        raise ValueError(f"unknown status '{status}'")
    if not (name_filter or term_filter or status):
        return None
    # Eight statuses in all: which ones the term matches is known before the walk.
    term_statuses = frozenset(s for s in STATUSES if term_filter.search(s)) if term_filter else frozenset()
    if term_filter is not None:
        search_id = term_filter.id_searcher(ids) if ids is not None else lambda i: term_filter.search_unique(str(i))

    def match(job):
        if status is not None and job.status != status:
            return False
        if name_filter is not None and not name_filter.search(job.name):
            return False
        if term_filter is not None:
            s = term_filter.search
            if not (s(job.name) or s(job.comment) or s(job.url) or (term_statuses and job.status in term_statuses)
                    or search_id(job.id)):
                return False
        return True

    match.filters = (name_filter, term_filter, status)  # lets list_jobs narrow by columns first
    return match


class _Prefilter:
    """Column masks for a block of keydir rows: 1 where a row may match a status_matcher (the
    exact test follows), 0 where its name or status rules it out. Any other predicate: no mask."""

    def __init__(self, keydir, match):
        self.keydir = keydir
        name_filter, _, status = getattr(match, "filters", (None, None, None))
        self.name_filter = name_filter
        self.name_ok = bytearray()  # per name table index: does the name filter match it
        self.status_table = status_table(status) if status else None

    def block(self, lo, hi):
        if self.name_filter is None and self.status_table is None:
            return None
        kd = self.keydir
        mask = None
        if self.status_table is not None:
            mask = bytes(kd.flags[lo:hi]).translate(self.status_table)
        if self.name_filter is not None:
            names = kd.names[lo:hi]
            ok = self.name_ok
            need = max(names) + 1 if names else 0
            if len(ok) < need:  # RE2 once per distinct name, as far as the rows seen so far need
                search, texts = self.name_filter.search, kd.name_table.texts
                ok.extend(1 if search(text) else 0 for text in texts[len(ok):need])
            by_name = bytes(map(ok.__getitem__, names))
            mask = by_name if mask is None else \
                (int.from_bytes(by_name, "big") & int.from_bytes(mask, "big")).to_bytes(hi - lo, "big")
        return mask


def _release_free_memory():
    """Give the heap's free pages back to the system (glibc's malloc_trim): the replay parsed
    every record whole and kept only the keydir's columns, leaving the freed payloads and
    outputs scattered between live blocks, where the allocator alone would keep them resident."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _let_others_run():
    gevent.sleep(0.001)  # > 0: sleep(0) may resume this greenlet before the loop polls for I/O


def _copy_keydir(kd, pause, rows=1 << 18):
    """A copy of the keydir's columns and tables, `rows` at a time with pause() between."""
    copy = Keydir()
    n = len(kd)
    for name, code in Keydir.COLUMNS:
        target = array(code)
        size = target.itemsize
        for start in range(0, n, rows):
            with memoryview(getattr(kd, name)) as source:  # released before the pause
                target.frombytes(source.cast("B")[start * size:(start + rows) * size])
            pause()
        setattr(copy, name, target)
    for start in range(0, n, rows):
        copy.flags += kd.flags[start:start + rows]
        copy.comments += kd.comments[start:start + rows]
        pause()
    copy.name_table.texts = list(kd.name_table.texts)
    copy.url_table.texts = list(kd.url_table.texts)
    return copy

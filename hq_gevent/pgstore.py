"""The PostgreSQL store (SPEC §13): several hq-gevent servers share one database.

Every job is a row of hq_jobs; nothing is cached between requests, so any server answers for
any job. A server claims ready jobs with `FOR UPDATE SKIP LOCKED` (only as many as it has
free dispatch slots), holds each under a lease it renews while the request runs, and records
the outcome only if it still holds the job. LISTEN/NOTIFY on one channel wakes idle servers
(a push, a rescued job, an earlier runAt) and carries a stop to the server running the job.

psycopg is imported here only: server.py monkey-patches first, so psycopg's waits and
psycopg_pool's worker threads are gevent's (psycopg >= 3.1.14 cooperates with gevent).
"""
import contextlib
import logging
import os
import signal
import socket
import time
import zlib

import gevent
import gevent.event
import gevent.queue
import ujson

try:
    import psycopg
    import psycopg_pool
except ImportError as e:  # the 'postgresql' extra is not installed: load() says so
    psycopg = psycopg_pool = None
    _MISSING = e

from hq_gevent import retry
from hq_gevent.ids import EPOCH_MS, SEQUENCE_BITS, SERVER_ID_BITS, IdGenerator, now_ms
from hq_gevent.job import Job
from hq_gevent.metrics import Metrics
from hq_gevent.storage import JobConflict, JobNotFound, StoreUnavailable, refuse_active

log = logging.getLogger("hq_gevent")

SCHEMA_VERSION = 1
CHANNEL = "hq_gevent"
# Advisory lock keys (class, object): the schema migration, a server_id's owner, the rescuer.
LOCK_SCHEMA, LOCK_SERVER_ID, LOCK_RESCUE, LOCK_UNIQUE = 72310, 72311, 72312, 72313
POOL_SIZE = 16
POOL_TIMEOUT = 3.0  # seconds a request waits for a connection before its 503
RESCUE_EVERY = 2.0
WAKE_FALLBACK = 5.0  # the claimer re-checks this often even with no NOTIFY (one may be lost in an outage)
SCAN_SLICE_SECONDS = 0.02  # SPEC §11: a list scan yields at least every 50 ms
SCAN_CHECK_EVERY = 64
SCAN_BATCH = 1000
CLAIM_BATCH = 64
NOTIFY_GAP = 0.005
CLAIM_GAP = 0.002  # a push is picked up by another server within this (+ a round trip)
FINISH_RETRY_SECONDS = 0.5

# One version's statements each; a server applies those above the stored version at start.
MIGRATIONS = {
    1: """
CREATE TABLE hq_jobs (
    id bigint PRIMARY KEY,
    name bytea NOT NULL,            -- bytea: a JSON string may hold U+0000, which text refuses
    comment bytea NOT NULL,
    url text NOT NULL,
    payload text,                   -- compact JSON text as pushed (numbers kept exactly)
    headers text,                   -- JSON object text, in the order given
    timeout integer NOT NULL,
    started_at bigint,              -- ms since the Unix epoch, like every time column but lease_until
    finished_at bigint,
    success boolean NOT NULL DEFAULT false,
    failure boolean NOT NULL DEFAULT false,
    canceled boolean NOT NULL DEFAULT false,
    waiting boolean NOT NULL,
    running boolean NOT NULL DEFAULT false,
    status_code integer,
    output bytea NOT NULL DEFAULT '',
    err bytea NOT NULL DEFAULT '',
    max_attempts integer NOT NULL,
    min_backoff double precision NOT NULL,
    max_backoff double precision NOT NULL,
    max_retry_duration double precision NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    run_at bigint NOT NULL,         -- earliest start of the next attempt (its push time when none was asked)
    unique_key bytea,
    history text,                   -- JSON [[attempt, startedAt, finishedAt, statusCode, err], ...]
    first_started_at bigint,
    server_id integer,              -- the server running it, while running
    lease_until timestamptz         -- database clock: no two servers' clocks are compared
);
-- The claim query: waiting jobs in id order (run_at and canceled are filtered on the few rows).
CREATE INDEX hq_jobs_waiting ON hq_jobs (id) WHERE waiting;
CREATE INDEX hq_jobs_run_at ON hq_jobs (run_at) WHERE waiting;
CREATE INDEX hq_jobs_running ON hq_jobs (lease_until) WHERE running;
CREATE INDEX hq_jobs_unique_key ON hq_jobs (unique_key, id) WHERE unique_key IS NOT NULL;
CREATE TABLE hq_servers (
    server_id integer PRIMARY KEY,
    host text NOT NULL,
    pid integer NOT NULL,
    started_at timestamptz NOT NULL,
    heartbeat_at timestamptz NOT NULL,
    stopped_at timestamptz
);
CREATE TABLE hq_periodic (name text PRIMARY KEY, last_run timestamptz NOT NULL, server_id integer);
INSERT INTO hq_periodic VALUES ('lifetime_sweep', 'epoch', NULL);
""",
}

COLUMNS = ("id, name, comment, url, payload, headers, timeout, started_at, finished_at, success, failure, canceled, "
           "waiting, running, status_code, output, err, max_attempts, min_backoff, max_backoff, max_retry_duration, "
           "attempts, run_at, unique_key, history, first_started_at")
# What a filter reads (SPEC §5: name, id, comment, url, status): a scan fetches only these.
SCAN_COLUMNS = "id, name, comment, url, waiting, running, canceled, success, failure, finished_at"
INSERT = f"INSERT INTO hq_jobs ({COLUMNS}) VALUES ({', '.join(['%s'] * 26)})"
UPDATE_STATE = """UPDATE hq_jobs SET started_at = %s, finished_at = %s, success = %s, failure = %s, canceled = %s,
    waiting = %s, running = false, status_code = %s, output = %s, err = %s, attempts = %s, run_at = %s,
    history = %s, first_started_at = %s, server_id = NULL, lease_until = NULL WHERE id = %s"""
# A job whose server is gone: waiting again as it stood before that attempt (its last failed
# attempt's times, or none), or canceled when a stop was asked meanwhile.
RELEASE = """UPDATE hq_jobs SET running = false, waiting = NOT canceled, server_id = NULL, lease_until = NULL,
    started_at = CASE WHEN canceled THEN started_at WHEN history IS NULL THEN NULL
                      ELSE (history::jsonb -> -1 ->> 1)::bigint END,
    finished_at = CASE WHEN canceled THEN %(now)s ELSE finished_at END,
    err = CASE WHEN canceled THEN convert_to('The job was stopped while it was running', 'UTF8') ELSE err END,
    run_at = %(now)s
    WHERE running AND {where} RETURNING id, canceled"""


def _b(text):
    return None if text is None else text.encode("utf-8", "surrogatepass")


def _s(data):
    return None if data is None else bytes(data).decode("utf-8", "surrogatepass")


def job_from_row(row):
    job = Job.__new__(Job)
    (job.id, name, comment, job.url, job.payload, headers, job.timeout, job.started_at, job.finished_at,
     job.success, job.failure, job.canceled, job.waiting, job.running, job.status_code, output, err,
     max_attempts, min_backoff, max_backoff, max_duration, job.attempts, run_at, unique_key, history,
     job.first_started_at) = row
    job.name, job.comment, job.output, job.err, job.unique_key = _s(name), _s(comment), _s(output), _s(err), _s(unique_key)
    job.headers = None if headers is None else ujson.loads(headers)
    job.retry = retry.shared((max_attempts, min_backoff, max_backoff, max_duration))
    job.history = tuple(tuple(h) for h in ujson.loads(history)) if history else None
    job.run_at = run_at if job.waiting else None
    job.record_size = 0
    job.ready_at = None
    return job


def _scan_job(row):
    """Just what a list filter reads (the matched ones are fetched whole afterwards)."""
    job = Job.__new__(Job)
    (job.id, name, comment, job.url, job.waiting, job.running, job.canceled, job.success, job.failure,
     job.finished_at) = row
    job.name, job.comment = _s(name), _s(comment)
    return job


def _history_text(history):
    return ujson.dumps([list(h) for h in history], ensure_ascii=False) if history else None


def job_row(job, run_at=None):
    """The INSERT parameters of a job (COLUMNS order); `run_at` for one that may start now."""
    return (job.id, _b(job.name), _b(job.comment), job.url, job.payload,
            None if job.headers is None else ujson.dumps(job.headers, ensure_ascii=False, escape_forward_slashes=False),
            job.timeout, job.started_at, job.finished_at, job.success, job.failure, job.canceled,
            job.waiting, False, job.status_code, _b(job.output), _b(job.err), *job.retry, job.attempts,
            job.run_at if job.run_at is not None else run_at, _b(job.unique_key), _history_text(job.history),
            job.first_started_at)


def _state_params(job):
    return (job.started_at, job.finished_at, job.success, job.failure, job.canceled, job.waiting,
            job.status_code, _b(job.output), _b(job.err), job.attempts,
            job.run_at if job.run_at is not None else now_ms(), _history_text(job.history),
            job.first_started_at, job.id)


def _reason(error):
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _unique_lock_key(key):
    return zlib.crc32(_b(key)) - (1 << 31)  # advisory lock keys are int4


def migrate_schema(conn):
    """Create or migrate the schema to SCHEMA_VERSION (one transaction, one server at a time);
    refuse a schema newer than this code knows."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (LOCK_SCHEMA,))
        conn.execute("CREATE TABLE IF NOT EXISTS hq_schema_version (version integer NOT NULL)")
        version = conn.execute("SELECT max(version) FROM hq_schema_version").fetchone()[0] or 0
        if version > SCHEMA_VERSION:
            raise StoreUnavailable(f"the database schema is version {version}, newer than this hq-gevent knows "
                                   f"({SCHEMA_VERSION}): upgrade hq-gevent on this server")
        for step in range(version + 1, SCHEMA_VERSION + 1):
            conn.execute(MIGRATIONS[step])
            conn.execute("INSERT INTO hq_schema_version VALUES (%s)", (step,))
            log.info("PostgreSQL schema migrated to version %d", step)


class Batcher:
    """Concurrent calls of one kind become one transaction (group commit, like the WAL's): each
    caller queues its item and waits; one greenlet writes everything queued so far, then the lot
    that queued meanwhile. `write(items)` returns one result per item, in order."""

    def __init__(self, write):
        self._write = write
        self._queue = []
        self._due = gevent.event.Event()
        self._greenlet = None

    def start(self):
        self._greenlet = gevent.spawn(self._loop)

    def stop(self):
        if self._greenlet is not None:
            self._greenlet.kill()
            self._greenlet = None
        queued, self._queue = self._queue, []
        for _, result in queued:
            result.set_exception(StoreUnavailable("the server is stopping"))

    def submit(self, item):
        if self._greenlet is None:  # not started (or stopped): write it alone
            return self._write([item])[0]
        result = gevent.event.AsyncResult()
        self._queue.append((item, result))
        self._due.set()
        return result.get()

    def _loop(self):
        while True:
            self._due.wait()
            self._due.clear()
            batch, self._queue = self._queue, []
            if not batch:
                continue
            try:
                values = self._write([item for item, _ in batch])
            except Exception as e:  # noqa: BLE001 - every caller gets it (StoreUnavailable: a 503)
                for _, result in batch:
                    result.set_exception(e)
            else:
                for (_, result), value in zip(batch, values):
                    result.set(value)


class PostgresStore:
    ids = None  # no in-memory id index (the WAL store's lets a `term` filter rule out ids in blocks)

    def __init__(self, config, metrics=None):
        # psycopg's own log lines (the pool's reconnect attempts, several a second in an outage)
        # go through the server's handlers in its format (text or JSON), errors only: the outage
        # itself is logged once here and shown by /readyz.
        driver_log = logging.getLogger("psycopg")
        driver_log.handlers, driver_log.propagate = list(log.handlers), False
        driver_log.setLevel(logging.ERROR)
        self.config = config
        self.metrics = metrics or Metrics(lambda: {})
        self.server_id = config.server_id
        self.lease = config.lease_seconds
        self.capacity = config.dispatchers * max(1, config.max_workers)  # the dispatchers' slots (SPEC §6)
        self.loaded = False
        self.ids_gen = IdGenerator(config.server_id)
        self.default_retry = Job.default_retry = retry.from_config(config)
        self.on_abort = lambda job_id: None
        self.pool = None
        self._listener = None  # the LISTEN connection; it also holds this server_id's advisory lock
        self._trouble_reason = None  # why the LISTEN connection is down now, or None
        self._pool_trouble = None  # why the last statement could not reach PostgreSQL (None once one did)
        self._running = {}  # job id -> (job, Event set once its outcome is recorded) for jobs running here
        self._ready = gevent.queue.Queue()  # claimed jobs not yet handed to a dispatcher
        self._want = 0  # dispatchers waiting in claim()
        self._wanted = gevent.event.Event()
        self._wake = gevent.event.Event()  # something may be ready: a push, a NOTIFY, a retry's runAt
        self._notify_due = gevent.event.Event()
        self._notify_run_at = None  # the earliest runAt of the jobs pushed since the last NOTIFY
        self._sleep_until = 0  # ms: when the claimer's current sleep ends (0: it is not sleeping)
        self._next_run_at = (None, 0.0)  # (the earliest runAt ahead as last known, when it was looked up)
        self._greenlets = []
        self._pushes = Batcher(self._insert_jobs)  # single pushes: one INSERT transaction for all queued
        self._finishes = Batcher(self._update_outcomes)  # outcomes: one UPDATE transaction for all queued
        self._gauges = ({}, 0.0, 0.0)  # last figures, when, when `stored` was counted

    # --- start and stop ----------------------------------------------------------------
    def _conninfo(self):
        return self.config.postgresql_dsn

    def _connect_kwargs(self):
        # A dead peer is noticed within ~10 s; a statement never hangs a request for long.
        return {"connect_timeout": 3, "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
                "keepalives_count": 3, "application_name": f"hq-gevent server_id={self.server_id}", "autocommit": True,
                "options": "-c statement_timeout=30000"}

    def load(self):
        if psycopg is None:
            raise StoreUnavailable(f"store = \"postgresql\" needs psycopg 3 ({_MISSING}): "
                                   "pip install 'hq-gevent[postgresql]'")
        try:
            # The listening connection first: an unreachable database fails the start at once,
            # with libpq's own reason, and a server_id in use is refused before any change.
            self._connect_listener()
            migrate_schema(self._listener)
            self.pool = psycopg_pool.ConnectionPool(
                self._conninfo(), min_size=2, max_size=POOL_SIZE, kwargs=self._connect_kwargs(), open=False,
                timeout=POOL_TIMEOUT, reconnect_timeout=365 * 86400, name="hq-gevent")
            self.pool.open(wait=True, timeout=10)
            with self._tx() as cur:
                self._register(cur)
                released = self._release(cur, "server_id = %(sid)s")
                if released:
                    log.warning("Released %d jobs a previous run of server_id %d left running", released, self.server_id)
                mask = ((1 << SERVER_ID_BITS) - 1)
                cur.execute("SELECT max(id) FROM hq_jobs WHERE (id >> %s) & %s = %s",
                            (SEQUENCE_BITS, mask, self.server_id))
                last = cur.fetchone()[0]
            if last is not None:
                self.ids_gen.observe(last)
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as e:
            self._close_connections()
            raise StoreUnavailable(f"cannot use PostgreSQL ({_reason(e)})") from None
        except StoreUnavailable:
            self._close_connections()
            raise
        log.info("Using PostgreSQL (schema version %d) as server_id %d", SCHEMA_VERSION, self.server_id)
        self.loaded = True

    def _connect_listener(self):
        conn = psycopg.Connection.connect(self._conninfo(), **self._connect_kwargs())
        try:
            got = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (LOCK_SERVER_ID, self.server_id)).fetchone()[0]
            if not got:
                row = conn.execute("SELECT host, pid, extract(epoch FROM now() - heartbeat_at) FROM hq_servers "
                                   "WHERE server_id = %s", (self.server_id,)).fetchone()
                holder = f" ({row[0]} pid {row[1]}, last heartbeat {row[2]:.0f}s ago)" if row else ""
                raise StoreUnavailable(f"server_id {self.server_id} is held by another live hq-gevent server{holder}: "
                                       "every server on one database needs its own server_id")
            conn.execute(f"LISTEN {CHANNEL}")
        except BaseException:
            conn.close()
            raise
        self._listener = conn

    def _register(self, cur):
        cur.execute("""INSERT INTO hq_servers (server_id, host, pid, started_at, heartbeat_at)
            VALUES (%s, %s, %s, now(), now()) ON CONFLICT (server_id) DO UPDATE
            SET host = excluded.host, pid = excluded.pid, started_at = now(), heartbeat_at = now(), stopped_at = NULL""",
                    (self.server_id, socket.gethostname(), os.getpid()))

    def open(self, threadpool=None):
        self._greenlets = [gevent.spawn(self._listen), gevent.spawn(self._claim_loop),
                           gevent.spawn(self._notify_loop), gevent.spawn(self._heartbeat_loop),
                           gevent.spawn(self._rescue_loop)]
        if self.config.job_lifetime:
            self._greenlets.append(gevent.spawn(self._sweep_loop))
        self._pushes.start()
        self._finishes.start()

    def close(self):
        gevent.killall(self._greenlets)
        self._pushes.stop()
        self._finishes.stop()
        try:
            with self._tx() as cur:
                # Jobs abandoned at shutdown wait again at once (no lease to run out first).
                released = self._release(cur, "server_id = %(sid)s")
                cur.execute("UPDATE hq_servers SET stopped_at = now() WHERE server_id = %s", (self.server_id,))
            if released:
                log.warning("Released %d running jobs to the other servers", released)
                self._notify_wake_now()
        except StoreUnavailable as e:
            log.error("Could not release this server's running jobs (their lease runs out instead): %s", e)
        self._close_connections()

    def _close_connections(self):
        if self._listener is not None:
            self._listener.close()
        if self.pool is not None:
            self.pool.close(timeout=2)

    def _notify_wake_now(self, run_at=0):
        with contextlib.suppress(StoreUnavailable), self._one() as cur:
            cur.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"w {run_at}"))

    # --- connections ---------------------------------------------------------------------
    @contextlib.contextmanager
    def _tx(self, transaction=True):
        """A cursor on a pooled connection, in one transaction committed when the block ends, or
        (transaction=False) for one statement that commits by itself: one round trip instead of
        three (BEGIN, the statement, COMMIT) on the hot paths (push, claim, finish, get, list).
        PostgreSQL out of reach (refused, cut, timed out) is a StoreUnavailable: a quick 503."""
        if self.pool is None:
            raise StoreUnavailable("PostgreSQL is not connected yet")
        try:
            with self.pool.connection() as conn:
                with conn.transaction() if transaction else contextlib.nullcontext(), conn.cursor() as cur:
                    yield cur
        except (psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout) as e:
            self._pool_trouble = _reason(e)
            raise StoreUnavailable(f"PostgreSQL is unavailable: {_reason(e)}") from None
        self._pool_trouble = None

    def _one(self):
        return self._tx(transaction=False)

    def unready_reason(self):
        if not self.loaded:
            return "connecting to PostgreSQL"
        reason = self._trouble_reason or self._pool_trouble
        if reason:
            return f"PostgreSQL is unreachable: {reason}"
        return None

    def _listen(self):
        """NOTIFY messages: 'w' (something may be ready) and 's <server_id> <job id>' (a stop).
        When the connection drops, reconnect (and take this server_id's lock again)."""
        while True:
            try:
                if self._listener is None or self._listener.closed:
                    self._connect_listener()
                    self._trouble_reason = None
                    self.pool.check()  # drop pooled connections the outage broke
                    log.info("Reconnected to PostgreSQL")
                    self._wake.set()  # NOTIFYs of the outage are lost: look for ready jobs now
                for note in self._listener.notifies(timeout=1.0):
                    self._on_notify(note.payload)
            except StoreUnavailable as e:  # our server_id was taken while we were cut off
                log.critical("%s; stopping", e)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            except (psycopg.Error, OSError) as e:
                if self._trouble_reason is None:
                    log.error("PostgreSQL connection lost, reconnecting: %s", _reason(e))
                self._trouble_reason = _reason(e)
                if self._listener is not None:
                    with contextlib.suppress(Exception):
                        self._listener.close()
                    self._listener = None
                gevent.sleep(0.5)

    def _on_notify(self, payload):
        if payload.startswith("s "):
            _, server_id, job_id = payload.split()
            if int(server_id) == self.server_id:
                self._abort_here(int(job_id))
        elif payload.startswith("w"):
            self._wake_for(int(payload[2:] or 0))

    def _notify_loop(self):
        """Wake the other servers after pushes, outside the pushes' transactions (NOTIFY at commit
        takes a database-wide lock that would serialize them): at most one NOTIFY per NOTIFY_GAP,
        carrying the earliest runAt pushed meanwhile."""
        while True:
            self._notify_due.wait()
            self._notify_due.clear()
            run_at, self._notify_run_at = self._notify_run_at, None
            try:
                self._notify_wake_now(run_at or 0)
            except Exception:  # noqa: BLE001 - never let the notifier die
                log.exception("NOTIFY failed")
                gevent.sleep(0.5)
            gevent.sleep(NOTIFY_GAP)

    def _wake_for(self, run_at):
        """Wake this server's claimer for a job that may start at `run_at` (ms; 0 = now), unless
        its sleep ends before then anyway (a scheduled push must not cost a claim query). Not
        asleep: it may be between its query for the next runAt and its sleep, so it looks again."""
        if run_at > now_ms():
            known, looked_at = self._next_run_at
            if known is None or run_at < known:
                self._next_run_at = (run_at, looked_at)
        if run_at <= now_ms() or not self._sleep_until or run_at < self._sleep_until:
            self._wake.set()

    def _woke(self, run_at=0):
        """New waiting jobs, the earliest may start at `run_at`: this server's claimer and the others."""
        self._wake_for(run_at)
        self._notify_run_at = run_at if self._notify_run_at is None else min(self._notify_run_at, run_at)
        self._notify_due.set()

    # --- periodic work -------------------------------------------------------------------
    @staticmethod
    def _every(seconds, work, what):
        """Run `work` every `seconds` for good: a failure is logged, never the end of the loop."""
        while True:
            gevent.sleep(seconds)
            try:
                work()
            except StoreUnavailable as e:
                log.warning("%s failed, will retry: %s", what, e)
            except Exception:  # noqa: BLE001 - a bug must not stop leases, rescues or sweeps for good
                log.exception("%s failed unexpectedly, will retry", what)

    def _heartbeat_loop(self):
        self._every(max(1.0, self.lease / 3), self.heartbeat, "Heartbeat and lease renewal")

    def heartbeat(self):
        """This server is alive, and so are the requests it runs: their leases start again."""
        with self._one() as cur:
            cur.execute("UPDATE hq_servers SET heartbeat_at = now() WHERE server_id = %s", (self.server_id,))
            if self._running:
                cur.execute("UPDATE hq_jobs SET lease_until = now() + make_interval(secs => %s) "
                            "WHERE id = ANY(%s) AND running AND server_id = %s",
                            (self.lease, list(self._running), self.server_id))

    def _release(self, cur, where, **params):
        cur.execute(RELEASE.format(where=where), dict(params, now=now_ms(), sid=self.server_id))
        rows = cur.fetchall()
        return len(rows)

    def rescue(self):
        """Jobs whose server stopped renewing their lease wait again (or end canceled if a stop
        was asked). One server at a time: the others skip while one holds the lock."""
        with self._tx() as cur:
            cur.execute("SELECT pg_try_advisory_xact_lock(%s, 0)", (LOCK_RESCUE,))
            if not cur.fetchone()[0]:
                return 0
            rescued = self._release(cur, "lease_until < now() AND NOT (id = ANY(%(mine)s))", mine=list(self._running))
        if rescued:
            log.warning("%d jobs whose server's lease ran out wait again", rescued)
            self._woke()
        return rescued

    def _rescue_loop(self):
        self._every(RESCUE_EVERY, self.rescue, "Rescue of expired leases")

    def expire_old_jobs(self):
        """Delete finished jobs whose finishedAt is older than job_lifetime, if no server did it
        within the last job_lifetime_interval (a lease row: one server per interval)."""
        cutoff = now_ms() - self.config.job_lifetime * 1000
        with self._tx() as cur:
            cur.execute("UPDATE hq_periodic SET last_run = now(), server_id = %s WHERE name = 'lifetime_sweep' "
                        "AND last_run <= now() - make_interval(secs => %s) RETURNING 1",
                        (self.server_id, self.config.job_lifetime_interval * 0.9))
            if cur.fetchone() is None:
                return None
            first_later = max(0, cutoff - EPOCH_MS + 1) << (SERVER_ID_BITS + SEQUENCE_BITS)
            cur.execute("DELETE FROM hq_jobs WHERE id < %s AND NOT waiting AND NOT running "
                        "AND finished_at IS NOT NULL AND finished_at < %s", (first_later, cutoff))
            removed = cur.rowcount
        log.info("Lifetime sweep on server_id %d: removed %d jobs finished more than %d seconds ago",
                 self.server_id, removed, self.config.job_lifetime)
        return removed

    def _sweep_loop(self):
        self._every(self.config.job_lifetime_interval, self.expire_old_jobs, "Removing expired jobs")

    # --- stats ---------------------------------------------------------------------------
    def _counts(self, everything=True):
        """(waiting, scheduled, ready, running, stored, created in the last minute); the active
        ones come from the partial indexes; the last two walk the primary key (None unless asked)."""
        now = now_ms()
        minute_ago = max(0, now - 60000 - EPOCH_MS) << (SERVER_ID_BITS + SEQUENCE_BITS)
        totals = """, (SELECT count(*) FROM hq_jobs), (SELECT count(*) FROM hq_jobs WHERE id >= %(minute)s)"""
        with self._one() as cur:
            cur.execute("""SELECT
                (SELECT count(*) FROM hq_jobs WHERE waiting),
                (SELECT count(*) FROM hq_jobs WHERE waiting AND run_at > %(now)s),
                (SELECT count(*) FROM hq_jobs WHERE waiting AND NOT canceled AND run_at <= %(now)s),
                (SELECT count(*) FROM hq_jobs WHERE running)""" + (totals if everything else ", NULL, NULL"),
                        {"now": now, "minute": minute_ago})
            return cur.fetchone()

    def stats(self):
        """GET /stats figures of the whole cluster (SPEC §5, §10.5). queueUsage: jobs ready to
        start now, up to `queues` (the WAL store's bounded queue)."""
        waiting, scheduled, ready, running, stored, last_minute = self._counts()
        return {
            "queueUsage": min(ready, self.config.queues),
            "numWaitingJobs": waiting,
            "numRunningJobs": running,
            "numJobs": stored,
            "numScheduledJobs": scheduled,
            "numJobsInLastMinute": last_minute,
            "numBackloggedJobs": max(0, ready - self.config.queues),
            "walBytes": 0,
        }

    def gauges(self):
        """For the metrics sampler (each second): counted at most once a second, the last figures
        while PostgreSQL is out of reach."""
        values, at, stored_at = self._gauges
        now = time.monotonic()
        if now - at >= 1.0:
            try:
                # Counting every stored row walks the primary key: past 100k rows, every 10 s is enough for a graph.
                everything = now - stored_at >= (10.0 if values.get("stored", 0) > 100000 else 1.0)
                waiting, scheduled, ready, running, stored, _ = self._counts(everything)
                values = {"waiting": waiting - scheduled, "scheduled": scheduled, "running": running,
                          "stored": stored if everything else values.get("stored", 0),
                          "queue_usage": min(ready, self.config.queues), "wal_bytes": 0}
                stored_at = now if everything else stored_at
            except StoreUnavailable:
                pass
            self._gauges = (values, now, stored_at)
        return values or {"waiting": 0, "scheduled": 0, "running": 0, "stored": 0, "queue_usage": 0, "wal_bytes": 0}

    def queue_usage(self):
        return self.stats()["queueUsage"]

    # --- reads ---------------------------------------------------------------------------
    def get(self, job_id):
        with self._one() as cur:
            cur.execute(f"SELECT {COLUMNS} FROM hq_jobs WHERE id = %s", (job_id,))
            row = cur.fetchone()
        if row is None:
            raise JobNotFound(job_id)
        return job_from_row(row)

    def list_jobs(self, begin=None, reverse=False, limit=0, match=None):
        """SPEC §5 paging, as the WAL store: walk from `begin` in id order (keyset-paginated
        batches, a connection held per batch only) keeping jobs that `match` (RE2, in Python)."""
        found = []
        after, inclusive = begin, True
        op, order = (">", "ASC") if not reverse else ("<", "DESC")
        batch = (limit + 1) if limit and match is None else 200
        columns = SCAN_COLUMNS if match is not None else COLUMNS
        make = _scan_job if match is not None else job_from_row
        next_id = None
        slice_end = time.perf_counter() + SCAN_SLICE_SECONDS
        examined = 0
        while True:
            where = "" if after is None else f"WHERE id {op}{'=' if inclusive else ''} %s"
            with self._one() as cur:
                cur.execute(f"SELECT {columns} FROM hq_jobs {where} ORDER BY id {order} LIMIT %s",
                            ((after, batch) if after is not None else (batch,)))
                rows = cur.fetchall()
            stopped = False
            for index, row in enumerate(rows):
                job = make(row)
                if match is None or match(job):
                    found.append(job)
                    if limit and len(found) >= limit:
                        stopped = True
                        if index + 1 < len(rows):
                            next_id = rows[index + 1][0]
                        else:
                            next_id = self._id_after(job.id, reverse)
                        break
                examined += 1
                if examined % SCAN_CHECK_EVERY == 0 and time.perf_counter() > slice_end:
                    gevent.sleep(0.001)  # > 0: let other requests run between slices
                    slice_end = time.perf_counter() + SCAN_SLICE_SECONDS
            if stopped or len(rows) < batch:
                break
            after, inclusive = rows[-1][0], False
            batch = min(batch * 2, SCAN_BATCH * 4) if match is not None else SCAN_BATCH
        if match is not None and found:
            found = self._whole(found)
        return found, next_id

    def _id_after(self, job_id, reverse):
        op, order = (">", "ASC") if not reverse else ("<", "DESC")
        with self._one() as cur:
            cur.execute(f"SELECT id FROM hq_jobs WHERE id {op} %s ORDER BY id {order} LIMIT 1", (job_id,))
            row = cur.fetchone()
        return row[0] if row else None

    def _whole(self, scanned):
        """Full rows of the scanned jobs a filter kept, in the same order (a deleted one drops out)."""
        whole = {}
        ids = [job.id for job in scanned]
        for start in range(0, len(ids), SCAN_BATCH):
            with self._one() as cur:
                cur.execute(f"SELECT {COLUMNS} FROM hq_jobs WHERE id = ANY(%s)", (ids[start:start + SCAN_BATCH],))
                for row in cur:
                    whole[row[0]] = row
        return [job_from_row(whole[i]) for i in ids if i in whole]

    # --- changes -------------------------------------------------------------------------
    def push(self, spec):
        if spec.unique_key is not None:
            return self.push_many([spec])[0]
        job = Job(self.ids_gen.next_id(), spec.name, spec.comment, spec.url, spec.payload, spec.headers,
                  spec.timeout, spec.retry, spec.run_at, None)
        self._pushes.submit(job)  # returns once committed with the others queued alongside
        self.metrics.pushed(1)
        self._woke(job.run_at or 0)
        return job.to_dict(), False

    def _insert_jobs(self, jobs):
        now = now_ms()
        with self._tx(transaction=len(jobs) > 1) as cur:
            cur.executemany(INSERT, [job_row(job, now) for job in jobs])  # pipelined: one round trip
        return [True] * len(jobs)

    def push_many(self, specs):
        """All new jobs of `specs` in one transaction: [(view, duplicate)] in order. A uniqueKey
        is checked and taken under an advisory lock on the key, so concurrent pushes on any
        server make one job."""
        keys = sorted({spec.unique_key for spec in specs if spec.unique_key is not None})
        with self._tx(transaction=bool(keys) or len(specs) > 1) as cur:
            holders = self._lock_unique_keys(cur, keys) if keys else {}
            now = now_ms()
            results, fresh = [], []
            for spec in specs:
                holder = holders.get(spec.unique_key)
                if holder is not None:
                    results.append((holder, True))
                    continue
                job = Job(self.ids_gen.next_id(), spec.name, spec.comment, spec.url, spec.payload, spec.headers,
                          spec.timeout, spec.retry, spec.run_at, spec.unique_key)
                if spec.unique_key is not None:
                    holders[spec.unique_key] = job
                fresh.append(job)
                results.append((job, False))
            if len(fresh) == 1:
                cur.execute(INSERT, job_row(fresh[0], now))
            elif fresh:
                cur.executemany(INSERT, [job_row(job, now) for job in fresh])  # pipelined: one round trip
        if fresh:
            self.metrics.pushed(len(fresh))
            self._woke(min(job.run_at or 0 for job in fresh))
        return [(job.to_dict(), duplicate) for job, duplicate in results]

    def _lock_unique_keys(self, cur, keys):
        """Lock `keys` (in one order: no deadlock) until commit; {key: the job holding it}."""
        for lock_key in sorted({_unique_lock_key(key) for key in keys}):
            cur.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_UNIQUE, lock_key))
        cur.execute(f"SELECT DISTINCT ON (unique_key) {COLUMNS} FROM hq_jobs WHERE unique_key = ANY(%s) "
                    "ORDER BY unique_key, id DESC", ([_b(key) for key in keys],))
        window_start = now_ms() - self.config.unique_window * 1000
        holders = {}
        for row in cur.fetchall():
            job = job_from_row(row)
            if not self.config.unique_window or (job.id >> (SERVER_ID_BITS + SEQUENCE_BITS)) + EPOCH_MS > window_start:
                holders[job.unique_key] = job
        return holders

    def _locked(self, cur, job_id):
        cur.execute(f"SELECT {COLUMNS}, server_id FROM hq_jobs WHERE id = %s FOR UPDATE", (job_id,))
        row = cur.fetchone()
        if row is None:
            raise JobNotFound(job_id)
        return job_from_row(row[:-1]), row[-1]

    def restart(self, job_id, copy=False):
        with self._tx() as cur:
            job, _ = self._locked(cur, job_id)
            refuse_active(job)
            if copy:
                fresh = job.copy(self.ids_gen.next_id())
                cur.execute(INSERT, job_row(fresh, now_ms()))
            else:
                fresh = job.copy(job.id, job.unique_key)
                cur.execute("DELETE FROM hq_jobs WHERE id = %s", (job.id,))
                cur.execute(INSERT, job_row(fresh, now_ms()))
        self._woke()
        return fresh.to_dict()

    def delete(self, job_id):
        with self._tx() as cur:
            job, _ = self._locked(cur, job_id)
            refuse_active(job)
            cur.execute("DELETE FROM hq_jobs WHERE id = %s", (job_id,))

    def stop(self, job_id):
        """Cancel a waiting job, or abort a running one on whichever server runs it; returns
        once its outcome is recorded (at most ~10 s)."""
        with self._tx() as cur:
            job, server_id = self._locked(cur, job_id)
            if job.running:
                cur.execute("UPDATE hq_jobs SET canceled = true WHERE id = %s", (job_id,))
                if server_id != self.server_id:
                    cur.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"s {server_id} {job_id}"))
            elif job.waiting:
                after = job.finished(canceled=True, attempted=False, status_code=job.status_code, output=job.output,
                                     err="The job was stopped before it started" if not job.attempts
                                     else "The job was stopped while it waited for a retry")
                cur.execute(UPDATE_STATE, _state_params(after))
            else:
                raise JobConflict(f"The job {job.id} is not active")
        if not job.running:
            self.metrics.finished("canceled")
            return
        if server_id == self.server_id:
            done = self._abort_here(job_id)
            if done is not None:
                done.wait(timeout=10)
                return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the other server records the outcome (or its lease runs out)
            gevent.sleep(0.02)
            with self._one() as cur:
                cur.execute("SELECT running FROM hq_jobs WHERE id = %s", (job_id,))
                row = cur.fetchone()
            if row is None or not row[0]:
                return

    def _abort_here(self, job_id):
        entry = self._running.get(job_id)
        if entry is None:
            return None
        job, done = entry
        job.canceled = True  # a dispatcher that has not started it yet records it canceled
        self.on_abort(job_id)
        return done

    # --- the dispatchers' side -----------------------------------------------------------
    def claim(self):
        """The next job to send now, in id order among the ready ones of the whole cluster; it is
        running here (leased) from here on."""
        self._want += 1
        self._wanted.set()
        try:
            return self._ready.get()
        finally:
            self._want -= 1

    def _claim_loop(self):
        """Claim as many ready jobs as dispatchers wait for, then sleep until a push, a NOTIFY or
        the earliest runAt ahead."""
        while True:
            self._wanted.wait()
            wanted = self._want - self._ready.qsize()
            if wanted <= 0:
                self._wanted.clear()
                continue
            # Claim ahead up to the free dispatch slots: a round trip (and a commit) per job
            # would cap dispatch at a few hundred jobs a second.
            wanted = max(wanted, min(CLAIM_BATCH, self.capacity - len(self._running)))
            self._wake.clear()  # a wake-up from here on is not lost: the wait below returns at once
            try:
                jobs = self._claim_batch(wanted)
                pause = None if len(jobs) >= wanted else self._until_next_run_at()
            except StoreUnavailable:
                gevent.sleep(0.5)
                continue
            except Exception:  # noqa: BLE001 - dispatch must not stop for good
                log.exception("Claiming jobs failed unexpectedly, will retry")
                gevent.sleep(1)
                continue
            for job in jobs:
                self._ready.put(job)
            if pause is not None:
                self._sleep_until = now_ms() + int(pause * 1000)
                self._wake.wait(pause)
                self._sleep_until = 0
                # Under a stream of pushes, let a few gather: one claim for several jobs, not one each.
                gevent.sleep(CLAIM_GAP)

    def _claim_batch(self, n):
        now = now_ms()
        with self._one() as cur:
            cur.execute(f"""WITH picked AS (
                    SELECT id FROM hq_jobs WHERE waiting AND NOT canceled AND run_at <= %(now)s
                    ORDER BY id LIMIT %(n)s FOR UPDATE SKIP LOCKED)
                UPDATE hq_jobs j SET waiting = false, running = true, started_at = %(now)s,
                    first_started_at = CASE WHEN j.attempts = 0 THEN %(now)s ELSE j.first_started_at END,
                    server_id = %(sid)s, lease_until = now() + make_interval(secs => %(lease)s)
                FROM picked WHERE j.id = picked.id
                RETURNING {', '.join('j.' + c for c in COLUMNS.split(', '))}""",
                        {"now": now, "n": n, "sid": self.server_id, "lease": self.lease})
            rows = cur.fetchall()
        jobs = sorted((job_from_row(row) for row in rows), key=lambda job: job.id)
        for job, row in zip(jobs, sorted(rows, key=lambda row: row[0])):
            ready_at = max(row[22], (job.id >> (SERVER_ID_BITS + SEQUENCE_BITS)) + EPOCH_MS)
            self.metrics.waited(max(0, now - ready_at) / 1000)
            self._running[job.id] = (job, gevent.event.Event())
        return jobs

    def _until_next_run_at(self):
        """Seconds until the earliest runAt ahead (at most WAKE_FALLBACK). Looked up at most once
        a second: a runAt pushed meanwhile (here or, by NOTIFY, elsewhere) lowers the known one."""
        now = now_ms()
        known, looked_at = self._next_run_at
        if time.monotonic() - looked_at >= 1.0 or (known is not None and known <= now):
            with self._one() as cur:
                cur.execute("SELECT min(run_at) FROM hq_jobs WHERE waiting AND NOT canceled AND run_at > %s", (now,))
                known = cur.fetchone()[0]
            self._next_run_at = (known, time.monotonic())
        if known is None:
            return WAKE_FALLBACK
        return min(WAKE_FALLBACK, max(0.0, (known - now) / 1000) + 0.002)

    def finish(self, job, after):
        """Record an attempt's outcome if this server still holds the job. PostgreSQL out of
        reach: try again for half a lease (the lease is renewed meanwhile), then give up (the
        job runs again elsewhere once its lease runs out)."""
        deadline = time.monotonic() + self.lease / 2
        try:
            while True:
                try:
                    recorded = self._record(job, after)
                    break
                except StoreUnavailable:
                    if time.monotonic() > deadline:
                        raise
                    gevent.sleep(FINISH_RETRY_SECONDS)
            if not recorded:
                log.warning("Job %d was taken over by another server (its lease ran out): this outcome is dropped",
                            job.id, extra={"job_id": job.id})
            job.assume(after)
            if after.waiting:
                self._woke(after.run_at)  # its runAt: this server's claimer and the others re-arm their timers
        finally:
            entry = self._running.pop(job.id, None)
            if entry is not None:
                entry[1].set()

    def _update_outcomes(self, items):
        """[(job, after)] in one transaction: for each, True when it was stored (this server still
        holds the job, and no stop came while it was to be retried)."""
        stored = set()
        with self._tx(transaction=len(items) > 1) as cur:
            cur.executemany(UPDATE_STATE + " AND running AND server_id = %s AND NOT (canceled AND %s) RETURNING id",
                            [(*_state_params(after), self.server_id, after.waiting) for _, after in items],
                            returning=True)
            while True:
                stored.update(row[0] for row in cur.fetchall())
                if not cur.nextset():
                    break
        return [job.id in stored for job, _ in items]

    def _record(self, job, after):
        """True once the outcome is stored; False when this server no longer holds the job."""
        if self._finishes.submit((job, after)):
            return True
        with self._tx() as cur:
            cur.execute("SELECT canceled FROM hq_jobs WHERE id = %s AND running AND server_id = %s FOR UPDATE",
                        (job.id, self.server_id))
            row = cur.fetchone()
            if row is None:
                return False
            after.waiting, after.canceled, after.run_at = False, True, None  # canceled while its retry was due
            after.err = "The job was stopped while it waited for a retry"
            cur.execute(UPDATE_STATE, _state_params(after))
        return True

"""`hq-gevent migrate --from-data-dir DIR --to-postgresql DSN`: copy every job of a write-ahead
log data_dir into a PostgreSQL database (SPEC §13), so a single-box install moves up with its
history.

The log is replayed by the WAL store's own loader while this command holds the data_dir's lock
(so no server runs on it meanwhile; a running server's lock is refused, never taken). Rows go in
with ON CONFLICT (id) DO NOTHING, one transaction per batch: running it again after an
interruption resumes where it stopped and never duplicates a job.
"""
import os
import sys
import time

import zc.lockfile

BATCH = 1000


class MigrateError(Exception):
    pass


def _lock(data_dir):
    path = os.path.join(data_dir, "lock")
    try:
        return zc.lockfile.LockFile(path, content_template="{pid}")
    except zc.lockfile.LockError:
        try:
            with open(path) as f:
                holder = f.read().strip() or "unknown"
        except OSError:
            holder = "unknown"
        raise MigrateError(f"data_dir {data_dir} is locked by a running hq-gevent server (pid {holder}): "
                           "stop it first, then migrate") from None


class Progress:
    """A one-line bar on a terminal; nothing otherwise (a log or a pipe gets the summary only)."""

    def __init__(self, total, stream):
        self.total, self.stream = total, stream
        self.on_tty = stream.isatty()
        self.started = time.monotonic()
        self.shown_at = 0.0

    def show(self, done, final=False):
        if not self.on_tty or (not final and time.monotonic() - self.shown_at < 0.2):
            return
        self.shown_at = time.monotonic()
        fraction = done / self.total if self.total else 1.0
        width = 30
        bar = "#" * int(fraction * width)
        rate = done / max(1e-6, time.monotonic() - self.started)
        self.stream.write(f"\r[{bar:<{width}}] {fraction:6.1%} {done}/{self.total} jobs, {rate:,.0f}/s")
        if final:
            self.stream.write("\n")
        self.stream.flush()


def migrate(data_dir, dsn, config, stream=sys.stderr):
    """Copy the jobs; returns (jobs in the log, rows inserted now)."""
    # Imported here: the other CLI commands never load gevent or psycopg.
    import psycopg

    from hq_gevent.ids import timestamp_ms
    from hq_gevent.pgstore import INSERT, job_row, migrate_schema
    from hq_gevent.store import LOG_NAME, Store

    data_dir = os.path.abspath(data_dir)
    if not os.path.isfile(os.path.join(data_dir, LOG_NAME)):
        raise MigrateError(f"{data_dir} holds no job log ({LOG_NAME})")
    lock = _lock(data_dir)
    try:
        store = Store(data_dir, config)
        store.load()
        ids = list(store.ids)
        try:
            conn = psycopg.connect(dsn, connect_timeout=10)
        except psycopg.Error as e:
            raise MigrateError(f"cannot connect to PostgreSQL: {e}") from None
        with conn:
            migrate_schema(conn)
            progress = Progress(len(ids), stream)
            inserted = 0
            with conn.cursor() as cur:
                for start in range(0, len(ids), BATCH):
                    jobs = [store.get(job_id) for job_id in ids[start:start + BATCH]]
                    # A waiting job may start from its creation on (or its runAt, kept as is).
                    rows = [job_row(job, timestamp_ms(job.id)) for job in jobs]
                    cur.executemany(INSERT + " ON CONFLICT (id) DO NOTHING", rows)
                    inserted += max(0, cur.rowcount)
                    conn.commit()
                    progress.show(start + len(jobs))
            progress.show(len(ids), final=True)
        return len(ids), inserted
    finally:
        lock.close()


def run(args):
    """The CLI entry: 0 when every job is in PostgreSQL, 1 with a message otherwise."""
    from hq_gevent import config as config_module

    dsn = args.to_postgresql or os.environ.get("HQ_POSTGRESQL_DSN")
    if not dsn:
        print("error: give the database with --to-postgresql DSN (or $HQ_POSTGRESQL_DSN)", file=sys.stderr)
        return 1
    try:
        # The server's config gives the retry defaults its 15-field records stand for.
        config = config_module.load(args.config_file) if args.config_file else config_module.Config()
        total, inserted = migrate(args.from_data_dir, dsn, config)
    except (MigrateError, config_module.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - psycopg's errors and the log's: one line, no traceback
        print(f"error: migration stopped ({type(e).__name__}: {e}); run it again to resume", file=sys.stderr)
        return 1
    print(f"{total} jobs in {os.path.abspath(args.from_data_dir)}: {inserted} copied now, "
          f"{total - inserted} were already in PostgreSQL")
    return 0

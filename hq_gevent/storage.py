"""The one interface between the API/dispatchers and a job store, and the choice of store.

Two stores implement it: `store.Store` (the embedded write-ahead log, SPEC §9) and
`pgstore.PostgresStore` (several servers on one PostgreSQL database, SPEC §13). Nothing
above this interface knows which one runs.

    load()                      read the stored state (replay / connect, migrate, register);
                                `loaded` is True from then on (requests before it get a 503)
    open(threadpool) / close()  start and stop background work
    unready_reason() -> str|None  why changes cannot be taken now (GET /readyz)
    push(spec) -> (view, duplicate)          spec: job.JobSpec; view: the job as a dict
    push_many(specs) -> [(view, duplicate)]  all or nothing, one durable write
    get(job_id) -> Job
    list_jobs(begin, reverse, limit, match) -> (jobs, next_id)   SPEC §5 paging; match(job) -> bool
    delete(job_id)
    restart(job_id, copy) -> view
    stop(job_id)                cancel a waiting job, or abort a running one (wherever it runs);
                                returns once its outcome is recorded
    stats() -> dict             the counters of GET /stats that the store knows
    gauges() -> dict            waiting, scheduled, running, stored, queue_usage, wal_bytes (metrics)
    claim() -> Job              blocks until a job may start now; it is then running here
    finish(job, after)          record an attempt's outcome (job.finished() or job.retrying())
    on_abort                    set by the dispatchers: called with a job id running here whose
                                stop was asked for (on any server)
    default_retry, metrics      the server's retry policy tuple, the Metrics sink
"""


class JobNotFound(Exception):
    def __init__(self, job_id):
        super().__init__(f"The job '{job_id}' is not found")


class JobConflict(Exception):
    """The job's state forbids the change (running, waiting, not active)."""


class StoreUnavailable(Exception):
    """The store cannot take or answer this request now (disk full, database down): a 503."""


def refuse_active(job):
    """Delete and restart take only finished jobs (SPEC §5: 422 with HQ's texts)."""
    if job.running:
        raise JobConflict(f"The job {job.id} is running now")
    if job.waiting:
        raise JobConflict(f"The job {job.id} is waiting now")


def open_store(config, data_dir, metrics):
    """The store the config names (`store = "wal" | "postgresql"`)."""
    if getattr(config, "store", "wal") == "postgresql":
        from hq_gevent.pgstore import PostgresStore  # noqa: PLC0415 (psycopg only when asked for)

        return PostgresStore(config, metrics)
    from hq_gevent.store import Store  # noqa: PLC0415

    return Store(data_dir, config, metrics)

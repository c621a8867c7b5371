"""The job record: its fields, its derived status, its log form, and validation of a pushed job."""
import re
import sys
from urllib.parse import urlsplit

import ujson

from hq_gevent import retry, schedule
from hq_gevent.ids import format_ms, now_ms, timestamp_ms
from hq_gevent.invalid import Invalid

SUCCESS, FAILURE, CANCELED = 1, 2, 4
STATUSES = ("running", "canceling", "waiting", "failure", "success", "canceled", "unfinished", "unknown")
MAX_HISTORY = 10  # failed attempts kept in a job's history (SPEC §10.1)


def dumps(value):
    return ujson.dumps(value, ensure_ascii=False, escape_forward_slashes=False)


class Job:
    # Slots, integer timestamps and the payload kept as its JSON text keep a stored job
    # small: the index holds every job in memory (a million of them in well under 1 KB each).
    __slots__ = (
        "id", "name", "comment", "url", "payload", "headers", "timeout",
        "started_at", "finished_at", "success", "failure", "canceled",
        "waiting", "running", "status_code", "output", "err", "record_size",
        # Delivery policy (SPEC §10): a shared policy tuple (retry.py), attempts recorded so far,
        # earliest start of the next attempt (ms or None), dedup key, failed attempts as tuples
        # (attempt, started_at, finished_at, status_code, err) or None, start of the first attempt.
        "retry", "attempts", "run_at", "unique_key", "history", "first_started_at",
        "ready_at",  # when it last became free to start (ms, memory only): for the wait metric
    )
    default_retry = (1, 1.0, 3600.0, 0.0)  # the server's default policy; Store sets it from the config

    def __init__(self, job_id, name, comment, url, payload, headers, timeout,
                 retry_policy=None, run_at=None, unique_key=None):
        self.id = job_id
        self.name = name
        self.comment = comment
        self.url = url
        self.payload = payload  # compact JSON text, or None for no body
        self.headers = headers
        self.timeout = timeout
        self.retry = retry_policy or self.default_retry
        self.unique_key = unique_key
        self.record_size = 0
        self.reset()
        self.run_at = run_at

    def reset(self):
        """Back to a fresh waiting job, never attempted."""
        self.started_at = self.finished_at = None
        self.success = self.failure = self.canceled = False
        self.waiting, self.running = True, False
        self.status_code = None
        self.output = self.err = ""
        self.attempts = 0
        self.history = None
        self.run_at = None
        self.first_started_at = None
        self.ready_at = None

    def copy(self, new_id, unique_key=None):
        """A fresh waiting job with this one's request and policy (restart)."""
        return Job(new_id, self.name, self.comment, self.url, self.payload, self.headers, self.timeout,
                   self.retry, None, unique_key)

    def evolve(self, **changes):
        """A detached copy with `changes` applied: the next state, logged before it is assumed."""
        other = Job.__new__(Job)
        for name in Job.__slots__:
            setattr(other, name, getattr(self, name))
        for name, value in changes.items():
            setattr(other, name, value)
        return other

    def assume(self, other):
        """Take every field of `other` (an evolve() of this job) once its record is durable."""
        for name in Job.__slots__:
            if name != "record_size":
                setattr(self, name, getattr(other, name))

    @property
    def active(self):
        return self.waiting or self.running

    @property
    def status(self):
        if self.running:
            return "canceling" if self.canceled else "running"
        if self.waiting:
            return "canceling" if self.canceled else "waiting"
        if self.failure:
            return "failure"
        if self.success:
            return "success"
        if self.canceled:
            return "canceled"
        return "unfinished" if self.finished_at is None else "unknown"

    def scheduled(self, now):
        """Waiting for a future runAt (not yet allowed to start)."""
        return self.waiting and self.run_at is not None and self.run_at > now

    def to_dict(self):
        return {
            "id": str(self.id),
            "name": self.name,
            "comment": self.comment,
            "url": self.url,
            "payload": None if self.payload is None else ujson.loads(self.payload),
            "headers": self.headers,
            "timeout": self.timeout,
            "createdAt": format_ms(timestamp_ms(self.id)),
            "startedAt": format_ms(self.started_at),
            "finishedAt": format_ms(self.finished_at),
            "success": self.success,
            "failure": self.failure,
            "canceled": self.canceled,
            "waiting": self.waiting,
            "running": self.running,
            "statusCode": self.status_code,
            "output": self.output,
            "err": self.err,
            "status": self.status,
            "retry": retry.to_dict(self.retry),
            "attempts": self.attempts,
            "runAt": None if self.run_at is None or not self.scheduled(now_ms()) else format_ms(self.run_at),
            "uniqueKey": self.unique_key,
            "history": [
                {"attempt": n, "startedAt": format_ms(started), "finishedAt": format_ms(finished),
                 "statusCode": code, "err": err}
                for n, started, finished, code, err in self.history
            ] if self.history else [],
        }

    # --- outcomes (each returns the next state; the store logs it, then the job assumes it) ---
    def finished(self, success=False, failure=False, canceled=False, status_code=None, output="", err="", attempted=True):
        return self.evolve(
            waiting=False, running=False, finished_at=now_ms(), success=success, failure=failure,
            canceled=canceled, status_code=status_code, output=output, err=err, run_at=None,
            attempts=self.attempts + 1 if attempted else self.attempts)

    def retrying(self, wait_seconds, status_code=None, output="", err=""):
        """A failed attempt followed by another one after `wait_seconds`."""
        ended = now_ms()
        attempt = self.attempts + 1
        history = (self.history or ()) + ((attempt, self.started_at, ended, status_code, err),)
        return self.evolve(
            waiting=True, running=False, finished_at=ended, success=False, failure=False,
            status_code=status_code, output=output, err=err, attempts=attempt,
            history=history[-MAX_HISTORY:], run_at=ended + int(wait_seconds * 1000))

    # --- log form --------------------------------------------------------------------
    # One flat JSON array per job (faster to parse than an object, and smaller on disk); the
    # delivery-policy fields travel in a 16th element, so a log of the previous version (15
    # elements) still loads. Start of a request is never logged: a job is durable as waiting
    # until its result is, so a crash mid-request simply runs it again (at-least-once).
    def to_record(self):
        started, finished = self.started_at, self.finished_at
        if self.running:
            # As it stood before this attempt started: the last failed attempt, or nothing.
            started, finished = (self.history[-1][1], self.history[-1][2]) if self.history else (None, None)
        flags = (SUCCESS if self.success else 0) | (FAILURE if self.failure else 0) | (CANCELED if self.canceled else 0)
        waiting = 1 if self.waiting or self.running else 0
        record = [
            "p", self.id, self.name, self.comment, self.url, self.payload, self.headers, self.timeout,
            waiting, started, finished, flags, self.status_code, self.output, self.err,
        ]
        # Most jobs use no delivery-policy feature: their record stays in the 15-field form, which
        # loads back to the same values (see load_record) and keeps the log as small as before.
        if (self.retry != self.default_retry or self.run_at is not None or self.unique_key is not None
                or self.history or self.attempts != _implied_attempts(waiting, finished, self.canceled)):
            record.append([list(self.retry), self.attempts, self.run_at, self.unique_key,
                           [list(h) for h in self.history] if self.history else None, self.first_started_at])
        return record

    @classmethod
    def from_record(cls, rec):
        job = cls.__new__(cls)
        job.load_record(rec)
        job.record_size = 0
        return job

    def load_record(self, rec):
        """Set every field from a log record (replay: the hot loop of start-up)."""
        (_, job_id, name, self.comment, url, self.payload, self.headers, self.timeout,
         waiting, self.started_at, self.finished_at, flags, self.status_code, self.output, self.err) = rec[:15]
        if type(job_id) is not int:
            raise ValueError("the job id is not an integer")
        self.id = job_id
        # Names and urls repeat across many jobs: one shared string each saves memory.
        self.name, self.url = sys.intern(name), sys.intern(url)
        self.waiting, self.running, self.ready_at = waiting == 1, False, None
        self.success, self.failure, self.canceled = bool(flags & SUCCESS), bool(flags & FAILURE), bool(flags & CANCELED)
        if len(rec) > 15:
            policy, self.attempts, self.run_at, self.unique_key, history, self.first_started_at = rec[15]
            self.retry = retry.shared(tuple(policy))
            self.history = tuple(tuple(h) for h in history) if history else None
        else:  # no policy field in use (or a record of 0.1): the server's defaults
            self.retry = self.default_retry
            self.run_at = self.unique_key = self.history = self.first_started_at = None
            self.attempts = _implied_attempts(waiting, self.finished_at, self.canceled)


def _implied_attempts(waiting, finished_at, canceled):
    """Attempts of a job whose record has no policy fields: one if it finished other than by a stop."""
    return 1 if not waiting and finished_at is not None and not canceled else 0


# --- validation of a pushed job --------------------------------------------------------
# Used with fullmatch(): `$` would also match before a trailing newline ("X-A\n").
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(r"[^\x00-\x08\x0a-\x1f\x7f]*")  # no control character but HTAB (RFC 9110)
_BAD_URL_CHAR = re.compile(r"[\s\x00-\x1f\x7f]")


def _string(body, key, default):
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise Invalid(400, f"'{key}' must be a string")
    return value


def validate_url(url):
    if _BAD_URL_CHAR.search(url):
        raise Invalid(422, f"'url' must be an absolute http or https URL without spaces: {url!r}")
    try:
        parts = urlsplit(url)
        parts.port  # raises on a malformed port
    except ValueError:
        raise Invalid(422, f"'url' is not a valid URL: {url!r}") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise Invalid(422, f"'url' must be an absolute http or https URL: {url!r}")


def validate_headers(headers):
    if headers is None:
        return None
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        raise Invalid(400, "'headers' must be an object of string values")
    for name, value in headers.items():
        if not _TOKEN.fullmatch(name):
            raise Invalid(422, f"invalid header name {name!r}")
        if not _FIELD_VALUE.fullmatch(value):
            raise Invalid(422, f"header {name!r} has a control character (CR, LF, NUL, ...) in its value")
    return headers


def fields_from_request(body):
    """(name, comment, url, payload_text, headers, timeout) from a decoded POST /job body."""
    if not isinstance(body, dict):
        raise Invalid(400, "the job must be a JSON object")
    url = _string(body, "url", "")
    if not url:
        raise Invalid(422, "'url' is required")
    validate_url(url)
    name = _string(body, "name", "") or "default"
    comment = _string(body, "comment", "")
    timeout = body.get("timeout")
    if timeout is None:
        timeout = 0
    elif not isinstance(timeout, int) or isinstance(timeout, bool):
        raise Invalid(400, "'timeout' must be an integer number of seconds")
    elif timeout < 0:
        raise Invalid(422, "'timeout' must not be negative")
    headers = validate_headers(body.get("headers"))
    payload = body.get("payload")
    return name, comment, url, None if payload is None else dumps(payload), headers, timeout


# --- the delivery-policy keys of a push (SPEC §10.2) ---------------------------------------
MAX_UNIQUE_KEY = 256
_POLICY_KEYS = frozenset(("retry", "delay", "runAt", "uniqueKey"))


class JobSpec:
    """A pushed job, validated: what Store.push needs to create it."""
    __slots__ = ("name", "comment", "url", "payload", "headers", "timeout", "retry", "run_at", "unique_key")

    def __init__(self, name, comment, url, payload, headers, timeout, retry=None, run_at=None, unique_key=None):
        self.name, self.comment, self.url, self.payload = name, comment, url, payload
        self.headers, self.timeout, self.retry, self.run_at, self.unique_key = headers, timeout, retry, run_at, unique_key


def spec_from_request(body, default_retry, allowed_hosts=None):
    """A JobSpec from a decoded POST /job body (also one element of POST /jobs); `allowed_hosts`
    (hosts.AllowedHosts) refuses a url whose host the server may not send to (SPEC §11)."""
    fields = fields_from_request(body)
    refusal = allowed_hosts.push_refusal(fields[2]) if allowed_hosts else None
    if refusal:
        raise Invalid(422, refusal)
    if not _POLICY_KEYS.intersection(body):  # HQ's fields only: the server's defaults, now
        return JobSpec(*fields, default_retry)
    policy = retry.from_request(body.get("retry"), default_retry)
    run_at = schedule.run_at_from_request(body, now_ms())
    unique_key = body.get("uniqueKey")
    if unique_key is not None:
        if not isinstance(unique_key, str):
            raise Invalid(400, "'uniqueKey' must be a string")
        if not 1 <= len(unique_key) <= MAX_UNIQUE_KEY:
            raise Invalid(422, f"'uniqueKey' must be 1 to {MAX_UNIQUE_KEY} characters")
    return JobSpec(*fields, policy, run_at, unique_key)

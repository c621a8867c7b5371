"""The job record: its fields, its derived status, its log form, and validation of a pushed job."""
import re
import sys
from urllib.parse import urlsplit

import ujson

from hq_gevent.ids import format_ms, now_ms, timestamp_ms

SUCCESS, FAILURE, CANCELED = 1, 2, 4
STATUSES = ("running", "canceling", "waiting", "failure", "success", "canceled", "unfinished", "unknown")


class InvalidJob(Exception):
    """A pushed job that cannot be accepted; `status` is 400 (malformed) or 422 (invalid value)."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


def dumps(value):
    return ujson.dumps(value, ensure_ascii=False, escape_forward_slashes=False)


class Job:
    # Slots, integer timestamps and the payload kept as its JSON text keep a stored job
    # small: the index holds every job in memory (a million of them in well under 1 KB each).
    __slots__ = (
        "id", "name", "comment", "url", "payload", "headers", "timeout",
        "started_at", "finished_at", "success", "failure", "canceled",
        "waiting", "running", "status_code", "output", "err", "record_size",
    )

    def __init__(self, job_id, name, comment, url, payload, headers, timeout):
        self.id = job_id
        self.name = name
        self.comment = comment
        self.url = url
        self.payload = payload  # compact JSON text, or None for no body
        self.headers = headers
        self.timeout = timeout
        self.record_size = 0
        self.reset()

    def reset(self):
        """Back to a fresh waiting job (push and restart in place)."""
        self.started_at = self.finished_at = None
        self.success = self.failure = self.canceled = False
        self.waiting, self.running = True, False
        self.status_code = None
        self.output = self.err = ""

    def copy(self, new_id):
        return Job(new_id, self.name, self.comment, self.url, self.payload, self.headers, self.timeout)

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
        }

    # --- log form --------------------------------------------------------------------
    # One flat JSON array per job (faster to parse than an object, and smaller on disk).
    # Start of a request is never logged: a job is durable as waiting until its result
    # is, so a crash mid-request simply runs it again (at-least-once).
    def finished_state(self, success=False, failure=False, canceled=False, status_code=None, output="", err=""):
        """The outcome of a run as a tuple for to_record() and apply_finish()."""
        return (self.started_at, now_ms(), success, failure, canceled, status_code, output, err)

    def apply_finish(self, started_at, finished_at, success, failure, canceled, status_code, output, err):
        self.waiting = self.running = False
        self.started_at, self.finished_at = started_at, finished_at
        self.success, self.failure, self.canceled = success, failure, canceled
        self.status_code, self.output, self.err = status_code, output, err

    def to_record(self, finished=None):
        """The log record of this job, or of this job with the `finished` state applied."""
        if finished is None:
            if self.active:
                return [
                    "p", self.id, self.name, self.comment, self.url, self.payload, self.headers, self.timeout,
                    1, None, None, 0, None, "", "",
                ]
            finished = (self.started_at, self.finished_at, self.success, self.failure, self.canceled,
                        self.status_code, self.output, self.err)
        started, ended, success, failure, canceled, code, output, err = finished
        flags = (SUCCESS if success else 0) | (FAILURE if failure else 0) | (CANCELED if canceled else 0)
        return [
            "p", self.id, self.name, self.comment, self.url, self.payload, self.headers, self.timeout,
            0, started, ended, flags, code, output, err,
        ]

    @classmethod
    def from_record(cls, rec):
        job = cls.__new__(cls)
        job.load_record(rec)
        job.record_size = 0
        return job

    def load_record(self, rec):
        """Set every field from a log record (replay: the hot loop of start-up)."""
        (_, job_id, name, self.comment, url, self.payload, self.headers, self.timeout,
         waiting, self.started_at, self.finished_at, flags, self.status_code, self.output, self.err) = rec
        if type(job_id) is not int:
            raise ValueError("the job id is not an integer")
        self.id = job_id
        # Names and urls repeat across many jobs: one shared string each saves memory.
        self.name, self.url = sys.intern(name), sys.intern(url)
        self.waiting, self.running = waiting == 1, False
        self.success, self.failure, self.canceled = bool(flags & SUCCESS), bool(flags & FAILURE), bool(flags & CANCELED)


# --- validation of a pushed job --------------------------------------------------------
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_BAD_VALUE = re.compile(r"[\r\n\x00]")
_BAD_URL_CHAR = re.compile(r"[\s\x00-\x1f\x7f]")


def _string(body, key, default):
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise InvalidJob(400, f"'{key}' must be a string")
    return value


def validate_url(url):
    if _BAD_URL_CHAR.search(url):
        raise InvalidJob(422, f"'url' must be an absolute http or https URL without spaces: {url!r}")
    try:
        parts = urlsplit(url)
        parts.port  # raises on a malformed port
    except ValueError:
        raise InvalidJob(422, f"'url' is not a valid URL: {url!r}") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise InvalidJob(422, f"'url' must be an absolute http or https URL: {url!r}")


def validate_headers(headers):
    if headers is None:
        return None
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        raise InvalidJob(400, "'headers' must be an object of string values")
    for name, value in headers.items():
        if not _TOKEN.match(name):
            raise InvalidJob(422, f"invalid header name {name!r}")
        if _BAD_VALUE.search(value):
            raise InvalidJob(422, f"header {name!r} has a CR, LF or NUL in its value")
    return headers


def fields_from_request(body):
    """(name, comment, url, payload_text, headers, timeout) from a decoded POST /job body."""
    if not isinstance(body, dict):
        raise InvalidJob(400, "the job must be a JSON object")
    url = _string(body, "url", "")
    if not url:
        raise InvalidJob(422, "'url' is required")
    validate_url(url)
    name = _string(body, "name", "") or "default"
    comment = _string(body, "comment", "")
    timeout = body.get("timeout")
    if timeout is None:
        timeout = 0
    elif not isinstance(timeout, int) or isinstance(timeout, bool):
        raise InvalidJob(400, "'timeout' must be an integer number of seconds")
    elif timeout < 0:
        raise InvalidJob(422, "'timeout' must not be negative")
    headers = validate_headers(body.get("headers"))
    payload = body.get("payload")
    return name, comment, url, None if payload is None else dumps(payload), headers, timeout

"""A small Python client for the hq-gevent (and HQ 1.x) HTTP API.

    from hq_gevent.client import Client, HQError
    hq = Client("http://127.0.0.1:19900")
    job = hq.push(url="http://127.0.0.1:8080/work", payload={"n": 1}, name="resize")
    hq.wait(job["id"], timeout=60)["status"]   # -> "success"

Every method returns the server's JSON as plain dicts (`push` a dict subclass with a `duplicate`
flag). A server error raises `HQError` (`.status`, `.error`; `HQAuthError` for 401/403); a server
that cannot be reached raises `HQConnectionError`, which names the address. This module must stay
light: the CLI imports it, and it must not pull in gevent.
"""
import os
import re
import time
from datetime import datetime, timedelta, timezone

import requests
from requests.adapters import HTTPAdapter

from hq_gevent import __version__

DEFAULT_ADDRESS = "http://127.0.0.1:19900"
FINISHED = ("success", "failure", "canceled", "unknown")
BATCH_SIZE = 1000  # the most jobs POST /jobs takes at once (SPEC §10.6)


class HQError(Exception):
    """The server answered with an error: `status` is the HTTP code, `error` the server's text."""

    def __init__(self, status, error):
        super().__init__(error)
        self.status = status
        self.error = error


class HQAuthError(HQError):
    """401 (no valid token) or 403 (a read-only token asked to change something)."""


class BatchError(HQError):
    """`push_many` stopped at a refused batch. `index` is the position (in the jobs given) of the
    job the server named, or None; `reason` the server's text without its `jobs[i]: ` prefix;
    `pushed` the jobs stored by the batches before (the refused batch stored nothing)."""

    def __init__(self, status, error, index, reason, pushed):
        super().__init__(status, error)
        self.index = index
        self.reason = reason
        self.pushed = pushed


class PushedJob(dict):
    """The job a push answered with. `duplicate` is True when the server already held a job with
    this `uniqueKey` (answer header `X-Hq-Duplicate: true`): nothing new was stored and this is
    that job as it stands now."""

    duplicate = False


class HQConnectionError(ConnectionError):
    """No answer from the server at `address` (refused, unresolvable, reset or timed out)."""

    def __init__(self, address, reason):
        super().__init__(f"cannot reach hq-gevent at {address}: {reason}")
        self.address = address
        self.reason = reason


def normalize_address(address):
    """`host:port` is accepted for convenience and means http; a trailing slash is dropped."""
    address = (address or DEFAULT_ADDRESS).strip()
    if "://" not in address:
        address = "http://" + address
    return address.rstrip("/")


def job_id(value):
    """The decimal id of a job, from an int, a string or a job dict; ValueError if not one."""
    if isinstance(value, dict):
        value = value["id"]
    text = str(value).strip()
    if not text.isdigit() or not text.isascii() or int(text) >= 1 << 64:
        raise ValueError(f"The job id must be a number but '{value}'.")
    return str(int(text))


def rfc3339(value):
    """A `runAt` for the wire: a datetime (naive means UTC) as `2026-12-24T18:00:00.000Z`; a
    string is passed as it is, for the server to check."""
    if isinstance(value, str):
        return value
    if not isinstance(value, datetime):
        raise TypeError(f"run_at must be a datetime or an RFC 3339 string, not {type(value).__name__}")
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def with_policy(job, retry=None, delay=None, run_at=None, unique_key=None):
    """A copy of the job dict with the delivery policy set (SPEC §10.2); None leaves a key as it is.

    `retry` is maxAttempts as an int, or a dict of retry keys merged over the job's own; `delay`
    (seconds or a timedelta) and `run_at` each replace the other, as a job may have only one.
    """
    if delay is not None and run_at is not None:
        raise ValueError("give delay or run_at, not both")
    job = dict(job)
    if retry is not None:
        if isinstance(retry, int) and not isinstance(retry, bool):
            retry = {"maxAttempts": retry}
        elif not isinstance(retry, dict):
            raise TypeError("retry must be maxAttempts (an int) or a dict of retry keys")
        own = job.get("retry")
        job["retry"] = dict(own if isinstance(own, dict) else {}, **retry)
    if delay is not None:
        job.pop("runAt", None)
        job["delay"] = delay.total_seconds() if isinstance(delay, timedelta) else delay
    if run_at is not None:
        job.pop("delay", None)
        job["runAt"] = rfc3339(run_at)
    elif isinstance(job.get("runAt"), datetime):
        job["runAt"] = rfc3339(job["runAt"])
    if unique_key is not None:
        job["uniqueKey"] = unique_key
    return job


def _reason(exc):
    # requests wraps urllib3 wraps the socket error: dig for the OS's own words ("Connection
    # refused"), else the innermost error's text ("Remote end closed connection...").
    todo, seen, last = [exc], set(), exc
    while todo and len(seen) < 50:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
        last = e
        todo += [a for a in e.args if isinstance(a, BaseException)]
        todo += [x for x in (e.__cause__, e.__context__) if x is not None]
        reason = getattr(e, "reason", None)
        if isinstance(reason, BaseException):
            todo.append(reason)
    return str(last) or type(last).__name__


class Client:
    """`token` (default `$HQ_TOKEN`) is sent as `Authorization: Bearer <token>`; `cacert` (default
    `$HQ_CACERT`) is a PEM file of the CA that signed an https server's certificate, else the
    system's CAs are used. Pass "" to ignore the environment variable."""

    def __init__(self, address=DEFAULT_ADDRESS, timeout=30.0, session=None, token=None, cacert=None):
        self.address = normalize_address(address)
        self.timeout = timeout
        self.session = session or requests.Session()
        # Explicitly no retries: a retried POST /job could enqueue the same job twice.
        for prefix in ("http://", "https://"):
            self.session.mount(prefix, HTTPAdapter(max_retries=0))
        self.session.headers["User-Agent"] = f"hq-gevent-client/{__version__}"
        token = (os.environ.get("HQ_TOKEN", "") if token is None else token).strip()
        if token:
            # Checked here so that requests' own header error, which quotes the value, never shows it.
            if not re.fullmatch(r"[\x21-\x7e]+", token):
                raise ValueError("the token must be printable ASCII without spaces")
            self.session.headers["Authorization"] = f"Bearer {token}"
        cacert = os.environ.get("HQ_CACERT", "") if cacert is None else cacert
        if cacert and not os.path.isfile(cacert):
            raise ValueError(f"CA certificate file not found: {cacert}")
        # Given with each request: requests lets $REQUESTS_CA_BUNDLE override a session's `verify`.
        self.verify = cacert or None

    def close(self):
        self.session.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def request(self, method, path, params=None, body=None, timeout=None):
        return self._send(method, path, params, body, timeout)[0]

    def _send(self, method, path, params=None, body=None, timeout=None):
        """(the answer's JSON object, its headers); else HQError/HQConnectionError."""
        timeout = self.timeout if timeout is None else timeout
        try:
            resp = self.session.request(
                method, self.address + path, params=params, json=body, timeout=timeout, verify=self.verify
            )
        except requests.Timeout:
            raise HQConnectionError(
                self.address, f"no answer within {timeout}s (the request may still have taken effect)"
            ) from None
        except requests.ConnectionError as e:
            raise HQConnectionError(self.address, _reason(e)) from None
        except requests.RequestException as e:  # invalid URL, bad scheme...
            raise HQConnectionError(self.address, str(e)) from None
        try:
            data = resp.json()
        except ValueError:
            data = None
        if resp.status_code >= 400 or not isinstance(data, dict):
            if isinstance(data, dict) and "error" in data:
                error = HQAuthError if resp.status_code in (401, 403) else HQError
                raise error(data.get("status", resp.status_code), data["error"])
            # Not an hq-gevent answer (a proxy page, another service on the port).
            text = resp.text.strip().splitlines()[0][:200] if resp.text.strip() else resp.reason
            raise HQError(resp.status_code, f"unexpected response {resp.status_code} from {self.address}: {text}")
        return data, resp.headers

    # --- one method per route ---------------------------------------------------------
    def info(self):
        return self.request("GET", "/")

    def stats(self):
        return self.request("GET", "/stats")

    def push(self, job=None, *, retry=None, delay=None, run_at=None, unique_key=None, **fields):
        """Push one job: a dict, and/or keyword fields (url, payload, headers, timeout, name,
        comment). The policy keywords are those of `with_policy`. Returns a `PushedJob`."""
        body = with_policy(dict(job or {}, **fields), retry, delay, run_at, unique_key)
        data, headers = self._send("POST", "/job", body=body)
        pushed = PushedJob(data)
        pushed.duplicate = headers.get("X-Hq-Duplicate", "").lower() == "true"
        return pushed

    def push_many(self, jobs):
        """Push job dicts through `POST /jobs`, 1000 a request; returns the stored jobs in the
        order given. Each batch is stored all or nothing. A duplicate `uniqueKey` is answered with
        the job already stored (its id shows it; no `duplicate` flag here). A refused batch
        raises `BatchError`, with the jobs the batches before it stored."""
        jobs = [with_policy(job) if isinstance(job, dict) else job for job in jobs]
        pushed = []
        for start in range(0, len(jobs), BATCH_SIZE):
            try:
                pushed += self.request("POST", "/jobs", body=jobs[start:start + BATCH_SIZE])["jobs"]
            except HQAuthError:
                raise
            except HQError as e:
                # The server counts from the batch's start; count from the caller's list instead.
                m = re.match(r"jobs\[(\d+)\]: (.*)", e.error, re.S)
                index, reason = (start + int(m[1]), m[2]) if m else (None, e.error)
                if e.status == 404 and not m:
                    reason += " (the server has no batch push, POST /jobs: it is HQ or an older hq-gevent)"
                error = f"jobs[{index}]: {reason}" if m else reason
                raise BatchError(e.status, error, index, reason, pushed) from None
        return pushed

    def list(self, name=None, term=None, begin=None, reverse=False, status=None, limit=None):
        """One page: {"jobs": [...], "hasNext": bool, "next": id (when hasNext), "count": n}."""
        params = {}
        if name:
            params["name"] = name
        if term:
            params["term"] = term
        if begin is not None:
            params["begin"] = job_id(begin)
        if reverse:
            params["reverse"] = "true"
        if status:
            params["status"] = status
        if limit is not None:
            params["limit"] = str(int(limit))
        return self.request("GET", "/job", params=params)

    def iter_jobs(self, page_size=1000, **filters):
        """Every matching job, following `next` from page to page."""
        begin = filters.pop("begin", None)
        while True:
            page = self.list(begin=begin, limit=page_size, **filters)
            yield from page["jobs"]
            # `next` always moves on; a server that repeats it would otherwise loop forever.
            if not page.get("hasNext") or page.get("next") in (None, begin):
                return
            begin = page["next"]

    def get(self, id, timeout=None):
        return self.request("GET", f"/job/{job_id(id)}", timeout=timeout)

    def delete(self, id):
        return self.request("DELETE", f"/job/{job_id(id)}")

    def stop(self, id):
        return self.request("POST", f"/job/{job_id(id)}/stop")

    def restart(self, id, copy=False):
        return self.request("POST", f"/job/{job_id(id)}/restart", body={"copy": bool(copy)})

    def wait(self, id, timeout=None, interval=0.05, max_interval=1.0):
        """Poll until the job is finished and return it; TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(id)
            if job.get("status") in FINISHED:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job['id']} still {job.get('status')} after {timeout}s")
            pause = interval if deadline is None else min(interval, max(0.0, deadline - time.monotonic()))
            time.sleep(pause)
            interval = min(interval * 2, max_interval)

"""A small Python client for the hq-gevent (and HQ 1.x) HTTP API.

    from hq_gevent.client import Client, HQError
    hq = Client("http://127.0.0.1:19900")
    job = hq.push(url="http://127.0.0.1:8080/work", payload={"n": 1}, name="resize")
    hq.wait(job["id"], timeout=60)["status"]   # -> "success"

Every method returns the server's JSON as plain dicts. A server error raises `HQError`
(`.status`, `.error`); a server that cannot be reached raises `HQConnectionError`, which names
the address. This module must stay light: the CLI imports it, and it must not pull in gevent.
"""
import time

import requests
from requests.adapters import HTTPAdapter

from hq_gevent import __version__

DEFAULT_ADDRESS = "http://127.0.0.1:19900"
FINISHED = ("success", "failure", "canceled", "unknown")


class HQError(Exception):
    """The server answered with an error: `status` is the HTTP code, `error` the server's text."""

    def __init__(self, status, error):
        super().__init__(error)
        self.status = status
        self.error = error


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
    def __init__(self, address=DEFAULT_ADDRESS, timeout=30.0, session=None):
        self.address = normalize_address(address)
        self.timeout = timeout
        self.session = session or requests.Session()
        # Explicitly no retries: a retried POST /job could enqueue the same job twice.
        for prefix in ("http://", "https://"):
            self.session.mount(prefix, HTTPAdapter(max_retries=0))
        self.session.headers["User-Agent"] = f"hq-gevent-client/{__version__}"

    def close(self):
        self.session.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def request(self, method, path, params=None, body=None, timeout=None):
        timeout = self.timeout if timeout is None else timeout
        try:
            resp = self.session.request(
                method, self.address + path, params=params, json=body, timeout=timeout
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
                raise HQError(data.get("status", resp.status_code), data["error"])
            # Not an hq-gevent answer (a proxy page, another service on the port).
            text = resp.text.strip().splitlines()[0][:200] if resp.text.strip() else resp.reason
            raise HQError(resp.status_code, f"unexpected response {resp.status_code} from {self.address}: {text}")
        return data

    # --- one method per route ---------------------------------------------------------
    def info(self):
        return self.request("GET", "/")

    def stats(self):
        return self.request("GET", "/stats")

    def push(self, job=None, **fields):
        """Push one job: a dict, or keyword fields (url, payload, headers, timeout, name, comment)."""
        body = dict(job or {}, **fields)
        return self.request("POST", "/job", body=body)

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

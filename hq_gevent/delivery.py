"""The worker request: POST a job's payload to its url and turn the answer into an outcome.

Uses http.client over gevent sockets with a keep-alive pool per (scheme, host, port):
measured in bench/ against requests.Session, which costs ~1 ms of CPU per request here.
"""
import collections
import http
import http.client
import socket
import ssl
from urllib.parse import urlsplit

import gevent

from hq_gevent import __version__

USER_AGENT = f"HQ/{__version__}"
# Headers the job may not set: framing is ours, and the job id must be trustworthy.
RESERVED = {"content-length", "transfer-encoding", "connection", "host", "x-hq-job-id"}
IDLE_PER_HOST = 64
TRUNCATION_MARKER = "\n[hq-gevent: output truncated at {limit} bytes]"


class DeliveryError(Exception):
    """No response arrived; the message is the job's err."""


class Response:
    __slots__ = ("status", "reason", "body", "truncated")

    def __init__(self, status, reason, body, truncated):
        self.status, self.reason, self.body, self.truncated = status, reason, body, truncated


class Delivery:
    def __init__(self, max_output_bytes):
        self.max_output_bytes = max_output_bytes
        self._idle = collections.defaultdict(collections.deque)
        self._tls = None

    def send(self, job_id, url, payload, headers, timeout):
        """POST and return a Response, or raise DeliveryError. `timeout` (s, 0 = none) bounds it all."""
        try:
            with gevent.Timeout(timeout or None, _Timeout):
                return self._send(job_id, url, payload, headers)
        except _Timeout:
            raise DeliveryError(f'failed to do http request: Post "{url}": timeout after {timeout}s') from None
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise DeliveryError(f'failed to do http request: Post "{url}": {_describe(e)}') from None

    def _send(self, job_id, url, payload, headers):
        parts = urlsplit(url)
        key = (parts.scheme.lower(), parts.hostname, parts.port)
        target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        body = payload.encode() if payload is not None else b""
        request_headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        if headers:
            for name, value in headers.items():
                if name.lower() not in RESERVED:
                    request_headers[name] = value
        request_headers["X-Hq-Job-Id"] = str(job_id)
        request_headers["Content-Length"] = str(len(body))

        conn, reused = self._connection(key)
        try:
            try:
                response = self._exchange(conn, target, request_headers, body)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                if not reused:
                    raise
                # A kept-alive connection the worker had closed meanwhile: try once afresh.
                conn.close()
                conn, reused = self._new_connection(key), False
                response = self._exchange(conn, target, request_headers, body)
            result = self._read(response)
        except BaseException:
            conn.close()  # also on a kill (stop) or timeout: never reuse a half-used connection
            raise
        if response.will_close or result.truncated:
            conn.close()
        else:
            idle = self._idle[key]
            if len(idle) < IDLE_PER_HOST:
                idle.append(conn)
            else:
                conn.close()
        return result

    @staticmethod
    def _exchange(conn, target, headers, body):
        conn.putrequest("POST", target, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders(body)
        return conn.getresponse()

    def _read(self, response):
        limit = self.max_output_bytes
        body = response.read(limit + 1)
        truncated = len(body) > limit
        if truncated:
            body = body[:limit]
        return Response(response.status, response.reason, body, truncated)

    def _connection(self, key):
        idle = self._idle.get(key)
        if idle:
            return idle.pop(), True
        return self._new_connection(key), False

    def _new_connection(self, key):
        scheme, host, port = key
        if scheme == "https":
            if self._tls is None:
                self._tls = ssl.create_default_context()
            conn = http.client.HTTPSConnection(host, port, context=self._tls)
        else:
            conn = http.client.HTTPConnection(host, port)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn


class _Timeout(Exception):
    pass


def _describe(error):
    if isinstance(error, socket.gaierror):
        return f"lookup failed: {error.strerror}"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower() if error.strerror[0].isupper() else error.strerror
    return str(error) or type(error).__name__


def outcome_text(response, max_output_bytes):
    output = response.body.decode("utf-8", "replace")
    if response.truncated:
        output += TRUNCATION_MARKER.format(limit=max_output_bytes)
    return output


def reason_phrase(response):
    if response.reason:
        return response.reason
    try:
        return http.HTTPStatus(response.status).phrase
    except ValueError:
        return f"HTTP status {response.status}"

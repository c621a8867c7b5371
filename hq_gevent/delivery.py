"""The worker request: POST a job's payload to its url and turn the answer into an outcome.

A small HTTP/1.1 client on gevent sockets with a keep-alive pool per (scheme, host, port).
This path decides end-to-end throughput: measured here, requests.Session costs ~1 ms of CPU
per request and http.client ~200 us; this client, which builds the request in one buffer and
parses only the headers it needs, costs a fraction of that (see bench/RESULTS.md); geventhttpclient
costs ~2x and lets a hostile answer hold the event loop (README, "Worker request").

A worker's answer is untrusted: every read after the first yields to the loop, and everything
we keep or scan is bounded (output by max_output_bytes, framing by the MAX_* below), so no answer
can freeze the server, outlive the job's timeout or grow memory without limit.
"""
import base64
import collections
import datetime
import email.utils
import http
import re
import time
from urllib.parse import quote, unquote, urlsplit

import gevent
from gevent import socket, ssl  # gevent's own: correct whether or not the process is monkey-patched

from hq_gevent import __version__
from hq_gevent.hosts import AddressNotAllowed
from hq_gevent.signing import HEADER_NAMES as SIGNATURE_HEADERS, Signer

USER_AGENT = f"HQ/{__version__}"
# Headers the job may not set: framing is ours, and the job id and attempt must be trustworthy.
RESERVED = {"content-length", "transfer-encoding", "connection", "host", "x-hq-job-id", "x-hq-attempt"}
TRUNCATION_MARKER = "\n[hq-gevent: output truncated at {limit} bytes]"
# Bounds on what a worker can make us read besides the output (itself capped at max_output_bytes):
MAX_HEAD = 64 << 10  # status lines and headers, interim (1xx) responses included
MAX_CHUNK_LINE = 4096  # one chunk-size line with its extensions (Go's net/http allows as much)
MAX_TRAILERS = 64 << 10
MAX_CHUNK_OVERHEAD = 16 << 10  # non-data bytes beyond 16 + 2 x data per chunk (Go's rule, too)
MAX_RETRY_AFTER = 86400
RECV = 65536
CHUNK_SIZE = re.compile(rb"[0-9a-fA-F]{1,16}")


class DeliveryError(Exception):
    """No response arrived; the message is the job's err."""


class ProtocolError(ValueError):
    """The worker's answer is not valid HTTP/1.x, or exceeds a bound."""


class _Stale(Exception):
    """A kept-alive connection the worker had closed before we used it."""


class Response:
    __slots__ = ("status", "reason", "body", "truncated", "retry_after", "no_retry")

    def __init__(self, status, reason, body, truncated, retry_after=None, no_retry=False):
        self.status, self.reason, self.body, self.truncated = status, reason, body, truncated
        self.retry_after = retry_after  # seconds from Retry-After, or None (SPEC §10.3: the caller uses it on 429/503)
        self.no_retry = no_retry  # the worker said X-Hq-No-Retry: true


class _Head:
    __slots__ = ("status", "reason", "length", "chunked", "keep_alive", "retry_after", "no_retry")


class _Connection:
    """A socket and the bytes received on it but not consumed yet."""

    __slots__ = ("sock", "buf", "reads", "received", "lines")

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()
        self.reads = self.received = self.lines = 0  # within the current exchange

    def fill(self):
        """Append what the worker sends next; returns how many bytes (0 at the end of the stream)."""
        if self.reads:
            # gevent's recv returns at once while the kernel holds bytes, so a worker that keeps
            # sending would otherwise hold the event loop (every request, and this job's timeout)
            # until it stops. A normal answer arrives in one read and never pays for this.
            gevent.sleep(0)
        self.reads += 1
        data = self.sock.recv(RECV)
        self.buf += data
        self.received += len(data)
        return len(data)

    def need(self, what):
        if not self.fill():
            raise ProtocolError(f"the worker closed the connection before {what}")

    def line(self, cap, what):
        """The next CRLF-terminated line (without CRLF), at most `cap` bytes."""
        self.lines += 1
        if not self.lines % 1024:
            gevent.sleep(0)  # 64 KiB of one-byte chunks is ~13k lines: parsing them is a turn of its own
        buf, start = self.buf, 0
        while True:
            end = buf.find(b"\r\n", start)
            if end >= 0:
                line = bytes(buf[:end])
                del buf[:end + 2]
                return line
            if len(buf) > cap:
                raise ProtocolError(f"the {what} is too long")
            start = max(0, len(buf) - 1)
            self.need(f"the end of the {what}")

    def close(self):
        self.sock.close()


class Delivery:
    def __init__(self, max_output_bytes, max_idle_per_host=1024, signing_secrets=(), allowed_hosts=None):
        """signing_secrets: `whsec_` secrets (signing.SigningError if one is bad); allowed_hosts: a
        hosts.AllowedHosts whose address patterns are checked on every new connection, or None."""
        self.max_output_bytes = max_output_bytes
        self.max_idle_per_host = max_idle_per_host
        self.signer = Signer(signing_secrets) if signing_secrets else None
        self.allowed_hosts = allowed_hosts or None
        self._reserved = RESERVED | set(SIGNATURE_HEADERS) if self.signer else RESERVED
        self._idle = collections.defaultdict(list)
        self._tls = None

    def send(self, job_id, url, payload, headers, timeout, attempt=1):
        """POST and return a Response, or raise DeliveryError. `timeout` (s, 0 = none) bounds it all."""
        try:
            with gevent.Timeout(timeout or None, _Timeout):
                return self._send(job_id, url, payload, headers, attempt)
        except _Timeout:
            raise DeliveryError(f'failed to do http request: Post "{url}": timeout after {timeout}s') from None
        except (OSError, ValueError) as e:
            raise DeliveryError(f'failed to do http request: Post "{url}": {_describe(e)}') from None

    def _send(self, job_id, url, payload, headers, attempt):
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        key = (scheme, parts.hostname, parts.port or (443 if scheme == "https" else 80))
        request = self._request_bytes(job_id, parts, payload, headers, attempt)
        idle = self._idle[key]
        if idle:
            conn = idle.pop()
            try:
                return self._exchange(conn, request, idle, reused=True)
            except _Stale:
                pass  # the worker closed it meanwhile: once more on a fresh connection
        return self._exchange(self._connect(key), request, idle, reused=False)

    def _exchange(self, conn, request, idle, reused):
        conn.reads = conn.received = conn.lines = 0
        try:
            try:
                conn.sock.sendall(request)
                head = _read_head(conn)
            except (ConnectionResetError, BrokenPipeError, ProtocolError):
                if reused and not conn.received:
                    raise _Stale() from None
                raise
            body, truncated, complete = _read_body(conn, head, self.max_output_bytes)
        except BaseException:
            conn.close()  # also on a kill (stop) or a timeout: never reuse a half-used connection
            raise
        if head.keep_alive and complete and not conn.buf and len(idle) < self.max_idle_per_host:
            idle.append(conn)
        else:
            conn.close()
        return Response(head.status, head.reason, body, truncated, head.retry_after, head.no_retry)

    def _connect(self, key):
        scheme, host, port = key
        check = self.allowed_hosts is not None and self.allowed_hosts.needs_address_check(host, port)
        # Resolve once and connect to the very address checked: no second lookup to rebind.
        candidates = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        if check:
            allowed = [c for c in candidates if self.allowed_hosts.address_allowed(c[4][0], port)]
            if not allowed:
                raise AddressNotAllowed(candidates[0][4][0])
            candidates = allowed
        error = None
        for family, kind, proto, _, address in candidates:
            sock = socket.socket(family, kind, proto)
            try:
                sock.connect(address)
                break
            except OSError as e:
                sock.close()
                error = e
        else:
            raise error or OSError("the host has no address")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if scheme == "https":
            if self._tls is None:
                self._tls = ssl.create_default_context()
            sock = self._tls.wrap_socket(sock, server_hostname=host)
        return _Connection(sock)

    def _request_bytes(self, job_id, parts, payload, headers, attempt):
        target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        if not target.isascii():
            target = quote(target, safe="/?&=%:@!$'()*+,;~-._")
        host = parts.netloc.rpartition("@")[2]
        body = payload.encode() if payload is not None else b""
        # Keyed by lower-case name: a job's `content-type` replaces our Content-Type (one of each name).
        fields = {"content-type": ("Content-Type", "application/json"), "user-agent": ("User-Agent", USER_AGENT)}
        if parts.username is not None:
            credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            fields["authorization"] = ("Authorization", "Basic " + base64.b64encode(credentials).decode())
        if headers:
            reserved = self._reserved
            for name, value in headers.items():
                lower = name.lower()
                if lower not in reserved:
                    if "\n" in name or "\r" in name or "\n" in value or "\r" in value:
                        raise ValueError(f"invalid header {name!r}")  # job.py validates; never inject
                    fields[lower] = (name, value)
        lines = [f"POST {target} HTTP/1.1", f"Host: {host}"]
        lines += [f"{name}: {value}" for name, value in fields.values()]
        lines += [f"X-Hq-Job-Id: {job_id}", f"X-Hq-Attempt: {attempt}", f"Content-Length: {len(body)}"]
        if self.signer is not None:
            lines += [f"{name}: {value}" for name, value in self.signer.headers(job_id, body)]
        lines += ["", ""]
        return "\r\n".join(lines).encode() + body


def _read_head(conn):
    """The _Head of the next final response (interim 1xx responses skipped)."""
    used = 0
    while True:
        buf, start = conn.buf, 0
        while True:
            end = buf.find(b"\r\n\r\n", start)
            if end >= 0:
                break
            if used + len(buf) > MAX_HEAD:
                raise ProtocolError("the response headers are too large")
            start = max(0, len(buf) - 3)
            conn.need("it answered" if not used and not buf else "the end of the response headers")
        used += end + 4
        if used > MAX_HEAD:
            raise ProtocolError("the response headers are too large")
        lines = buf[:end].decode("latin-1").split("\r\n")
        del buf[:end + 4]
        version, _, rest = lines[0].partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isascii() or not code.isdigit():
            raise ProtocolError(f"malformed status line {lines[0][:80]!r}")
        status = int(code)
        if 100 <= status < 200:
            continue  # an interim response (100 Continue): the final one follows
        head = _Head()
        head.status, head.reason = status, reason.strip()
        head.length, head.chunked, head.retry_after, head.no_retry = None, False, None, False
        connection = ""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                value = value.strip()
                if not value.isascii() or not value.isdigit() or (head.length is not None and int(value) != head.length):
                    raise ProtocolError(f"invalid Content-Length {value[:40]!r}")
                head.length = int(value)
            elif name == "transfer-encoding":
                head.chunked = "chunked" in value.lower()
            elif name == "connection":
                connection = value.strip().lower()
            elif name == "retry-after":
                head.retry_after = parse_retry_after(value)
            elif name == "x-hq-no-retry":
                head.no_retry = value.strip().lower() == "true"
        if version == "HTTP/1.0":
            head.keep_alive = connection == "keep-alive"
        else:
            head.keep_alive = connection != "close"
        return head


def parse_retry_after(value, now=None):
    """Seconds to wait from a Retry-After value (delta-seconds or HTTP-date), within [0, 86400]; None if unparsable."""
    value = value.strip()
    if value.isascii() and value.isdigit():
        seconds = float(value) if len(value) <= 6 else float(MAX_RETRY_AFTER)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:  # "-0000": an HTTP-date is UTC anyway
            when = when.replace(tzinfo=datetime.timezone.utc)
        seconds = when.timestamp() - (time.time() if now is None else now)
    return min(max(seconds, 0.0), float(MAX_RETRY_AFTER))


def _read_body(conn, head, limit):
    """(body capped at limit, truncated, complete): complete means the connection can be reused."""
    if head.status in (204, 304):
        return b"", False, True
    if head.chunked:
        return _read_chunked(conn, limit)
    buf = conn.buf
    if head.length is not None:
        wanted = min(head.length, limit)
        while len(buf) < wanted:
            conn.need("the end of the body")
        if len(buf) == wanted:  # the usual case: one copy, not two
            body = bytes(buf)
            buf.clear()
        else:
            body = bytes(buf[:wanted])
            del buf[:wanted]
        if head.length > limit:
            return body, True, False
        return body, False, True
    # No length: the body runs until the worker closes the connection.
    while len(buf) <= limit:
        if not conn.fill():
            body = bytes(buf)
            buf.clear()
            return body, False, False
    body = bytes(buf[:limit])
    buf.clear()
    return body, True, False


def _read_chunked(conn, limit):
    body = bytearray()
    buf = conn.buf
    overhead = 0
    while True:
        line = conn.line(MAX_CHUNK_LINE, "chunk size line")
        size = line.split(b";", 1)[0].strip()
        if not CHUNK_SIZE.fullmatch(size):
            raise ProtocolError("malformed chunk size")
        size = int(size, 16)
        if size == 0:
            trailers = 0
            while True:  # trailers, if any, end with an empty line
                line = conn.line(MAX_TRAILERS, "response trailers")
                if not line:
                    return bytes(body), False, True
                trailers += len(line) + 2
                if trailers > MAX_TRAILERS:
                    raise ProtocolError("the response trailers are too long")
        overhead = max(0, overhead + len(line) + 4 - 16 - 2 * size)
        if overhead > MAX_CHUNK_OVERHEAD:
            raise ProtocolError("the chunked body has too much framing for its data")
        remaining = size
        while remaining:
            if not buf:
                conn.need("the end of a chunk")
            take = min(remaining, len(buf))
            if len(body) + take > limit:  # more than the cap: keep the cap, read no further
                body += buf[:limit - len(body)]
                buf.clear()
                return bytes(body), True, False
            body += buf[:take]
            del buf[:take]
            remaining -= take
        while len(buf) < 2:
            conn.need("the end of a chunk")
        if buf[:2] != b"\r\n":
            raise ProtocolError("a chunk is longer than its size")
        del buf[:2]


class _Timeout(Exception):
    pass


def _describe(error):
    if isinstance(error, AddressNotAllowed):
        return str(error)
    if isinstance(error, socket.gaierror):
        return f"lookup failed: {error.strerror}"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror[0].lower() + error.strerror[1:]
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

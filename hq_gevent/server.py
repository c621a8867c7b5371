"""`hq-gevent serve`: wire config, logs, data dir, store, dispatchers and the WSGI server together."""
from gevent import monkey

monkey.patch_all()  # before anything imports socket, ssl or threading

import errno  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import ssl  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import datetime  # noqa: E402
from http import HTTPStatus  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import ujson  # noqa: E402
import zc.lockfile  # noqa: E402
from gevent.pool import Pool  # noqa: E402
from gevent.pywsgi import WSGIHandler, WSGIServer  # noqa: E402

from hq_gevent import auth  # noqa: E402
from hq_gevent import config as config_module  # noqa: E402
from hq_gevent.api import make_app  # noqa: E402
from hq_gevent.dispatcher import Dispatchers  # noqa: E402
from hq_gevent.metrics import Metrics  # noqa: E402
from hq_gevent.storage import StoreUnavailable, open_store  # noqa: E402
from hq_gevent.wal import WalCorrupt  # noqa: E402

log = logging.getLogger("hq_gevent")
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}


def rfc3339(ts):
    return datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


_now_cache = [0, ""]


def rfc3339_now():
    """The current second in RFC 3339, formatted once per second (every access line needs it)."""
    second = int(time.time())
    if second != _now_cache[0]:
        _now_cache[:] = [second, rfc3339(second)]
    return _now_cache[1]


class LogFormatter(logging.Formatter):
    """log_format = "text": `<RFC 3339 time> <LEVEL> <message>`, a traceback's lines after it (HQ's format)."""

    NAMES = {"WARNING": "WARN", "CRITICAL": "ERROR"}

    def format(self, record):
        line = f"{rfc3339(record.created)} {self.NAMES.get(record.levelname, record.levelname)} {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonLogFormatter(LogFormatter):
    """log_format = "json": one object per line for journald/ELK: time, level, msg, job_id (when the
    record carries one: log.info(..., extra={"job_id": id})) and traceback (for an exception)."""

    def format(self, record):
        entry = {
            "time": datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds"),
            "level": self.NAMES.get(record.levelname, record.levelname),
            "msg": record.getMessage(),
        }
        job_id = getattr(record, "job_id", None)
        if job_id is not None:
            entry["job_id"] = str(job_id)  # a string, as in the API: ids exceed JavaScript's integers
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        # The json module (not ujson): it escapes a lone surrogate instead of failing on it.
        return json.dumps(entry, separators=(",", ":"))


class LogFile:
    """A log destination (a path, or stdout when None) that SIGUSR1 can reopen for logrotate."""

    def __init__(self, path):
        self.path = path
        self.stream = None
        self.reopen()

    def reopen(self):
        if self.path is None:
            self.stream = sys.stdout
            return
        old, self.stream = self.stream, open(self.path, "a", buffering=1, encoding="utf-8")
        if old is not None:
            old.close()

    def write(self, text):
        self.stream.write(text)
        if self.path is None:
            self.stream.flush()

    def flush(self):
        self.stream.flush()


MAX_HEAD_BYTES = 65536  # SPEC §5: a request head (request line and headers) over 64 KiB → 431
LINGER_SECONDS = 1.0  # after refusing a request, how long unread request bytes are drained...
LINGER_BYTES = 262144  # ...and how many, so the answer is not lost to a TCP reset
OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class BadRequest(ValueError):
    """A request refused before the app sees it; the connection is closed after the answer."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(status, message):
    """A complete HTTP response with the API's JSON error body, closing the connection."""
    body = ujson.dumps({"status": status, "error": message}).encode()
    reason = HTTPStatus(status).phrase.encode()
    return (b"HTTP/1.1 %d %s\r\nContent-Type: application/json; charset=UTF-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (status, reason, len(body), body))


class RequestHeaders:
    """pywsgi's request-header object, parsed without the email package: that parser was
    ~8% of the server's CPU on the push path (py-spy, bench push)."""

    __slots__ = ("fields", "status", "too_large")
    MAX_FIELDS = 100

    def __init__(self, fp, budget=MAX_HEAD_BYTES):
        self.status = ""
        self.too_large = False
        self.fields = []
        for _ in range(self.MAX_FIELDS + 1):
            line = fp.readline(budget + 1)
            budget -= len(line)
            if budget < 0:
                self.status = "Request head too large"
                self.too_large = True
                return
            if line in (b"\r\n", b"\n", b""):
                return
            text = line.decode("latin-1")
            if text[0] in " \t" and self.fields:
                self.fields[-1][1] += " " + text.strip()  # an obsolete folded continuation line
                continue
            name, colon, value = text.partition(":")
            if not colon or not name or name != name.strip():
                self.status = "Invalid header line"
                return
            self.fields.append([name, value.strip()])
        self.status = "Too many headers"

    def get(self, name, default=None):
        name = name.lower()
        for key, value in self.fields:
            if key.lower() == name:
                return value
        return default

    getheader = get

    @property
    def headers(self):
        return [f"{key}: {value}\r\n" for key, value in self.fields]

    @property
    def typeheader(self):
        return self.get("content-type")

    def body_length(self, method, version):
        """The body's length from strict framing (SPEC §5): an int, None for no body or a chunked one.
        Anything a proxy in front could read differently is refused: it is how requests are smuggled."""
        length = encoding = None
        for name, value in self.fields:
            name = name.lower()
            if name == "content-length":
                if length is not None:
                    raise BadRequest(400, "more than one Content-Length")
                length = value
            elif name == "transfer-encoding":
                if encoding is not None:
                    raise BadRequest(400, "more than one Transfer-Encoding")
                encoding = value
        if encoding is not None:
            if length is not None:
                raise BadRequest(400, "both Content-Length and Transfer-Encoding")
            if encoding.lower() != "chunked" or version != "HTTP/1.1":
                raise BadRequest(400, "Transfer-Encoding must be exactly chunked (HTTP/1.1)")
            return None
        if length is None:
            return None
        if not (length.isascii() and length.isdigit()) or len(length) > 18:
            raise BadRequest(400, "invalid Content-Length")
        if method == "HEAD" and int(length):
            raise BadRequest(400, "a HEAD request with a body")
        return int(length)


class Deadline(gevent.Timeout):
    """A per-connection gevent.Timeout that counts its whole length at every start(). A stopped
    libev timer resumes with the time it had left, so a plain Timeout reused per request would add
    up every head read (or idle wait) of a keep-alive connection and one day drop it mid-request;
    a repeating timer re-armed with again() starts from the full length each time."""

    def __init__(self, seconds):
        super().__init__(seconds)
        self.timer.close()
        self.timer = gevent.get_hub().loop.timer(seconds, seconds)

    def start(self):
        self.timer.again(self._on_expiration, gevent.getcurrent(), self, update=True)


class AccessLogHandler(WSGIHandler):
    """pywsgi handler: strict framing, connection time limits, TCP_NODELAY (pywsgi writes headers
    and body separately; without it a keep-alive client waits ~40 ms per response for delayed ACKs),
    and echo-style JSON access lines. The server it runs in is a `Server` (for the limits)."""

    requests_handled = 0
    linger = False

    def handle(self):
        try:
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # not TCP (a unix socket)
        config = self.server.config
        # Per socket operation: an idle keep-alive connection, a stalled body or a client that does
        # not read its answer is dropped after keepalive_timeout. The head has a deadline of its own.
        self.socket.settimeout(config.keepalive_timeout)
        self.head_deadline = Deadline(config.request_header_timeout)
        self.idle_deadline = Deadline(config.keepalive_timeout)
        return super().handle()

    def handle_one_request(self):
        if self.rfile.closed:
            return None
        if self.requests_handled:
            if not self._next_request_arrives():
                return None
            self.time_start = time.time()  # a refusal's latency starts when its request does
        self.environ = self.command = self.path = None  # a refusal's access line must not show the last request
        self.head_deadline.start()
        try:
            result = super().handle_one_request()
        except gevent.Timeout as timeout:
            if timeout is not self.head_deadline:
                raise
            log.debug("Dropped %s: no complete request head within %ss", self._peer(), timeout.seconds)
            return None
        finally:
            self.head_deadline.cancel()
        self.requests_handled += 1
        if isinstance(result, tuple):  # refused before the app: (status, full response)
            self._refuse(*result)
            return None
        if result is None and self.linger:
            self._linger_close()
        return result

    def _next_request_arrives(self):
        """Wait for the first byte of the next request on a keep-alive connection (keepalive_timeout).
        The wait runs on this connection's own timer, not the socket's timeout: gevent makes a new
        timer for every wait of a socket with a timeout, and this wait happens once per request
        (push 5-10% faster, bench A/B)."""
        sock = self.socket
        sock.settimeout(None)
        self.idle_deadline.start()
        try:
            return bool(self.rfile.peek(1))
        except gevent.Timeout as timeout:
            if timeout is not self.idle_deadline:
                raise
            return False
        except (OSError, ValueError):
            return False
        finally:
            self.idle_deadline.cancel()
            sock.settimeout(self.server.config.keepalive_timeout)

    def read_requestline(self):
        try:
            return super().read_requestline()
        except ssl.SSLError as e:
            if e.reason == "HTTP_REQUEST":  # plain HTTP on the TLS port: say so, as Go's server does
                _write_raw(self.socket, b"HTTP/1.0 400 Bad Request\r\nConnection: close\r\n\r\n"
                                        b"Client sent an HTTP request to an HTTPS server.\n")
            raise

    def read_request(self, raw_requestline):
        self.requestline = raw_requestline.rstrip()
        words = self.requestline.split()
        if len(words) != 3 or words[2] not in ("HTTP/1.0", "HTTP/1.1"):
            raise BadRequest(400, "invalid request line")
        self.command, self.path, self.request_version = words
        self.headers = RequestHeaders(self.rfile, MAX_HEAD_BYTES - len(raw_requestline))
        if self.headers.too_large:
            raise BadRequest(431, "the request head is larger than 64 KiB")
        if self.headers.status:
            raise BadRequest(400, self.headers.status)
        self.content_length = self.headers.body_length(self.command, self.request_version)
        connection = self.headers.get("connection", "").lower()
        if self.request_version == "HTTP/1.1":
            self.close_connection = connection == "close"
        else:
            self.close_connection = connection != "keep-alive"
        self.head_deadline.cancel()  # the head is complete: the app may take its time
        return True

    def _connection_upgrade_requested(self):
        return False  # no protocol upgrades: wsgi.input is always the framed body, never the raw socket

    def _handle_client_error(self, ex):
        if isinstance(ex, BadRequest):
            status, message = ex.status, ex.message
        elif isinstance(ex, OSError) and not isinstance(ex, ValueError):
            return None  # the connection broke while the head was read: nobody to answer
        else:
            status, message = 400, "Bad Request"
        log.debug("Refused a request from %s: %s", self._peer(), message)
        return (str(status), error_response(status, message))

    def _refuse(self, status, response):
        if status == "414":  # pywsgi's own refusal of a request line over 8 KiB
            response = error_response(414, "the request line is too long")
        self.code = int(status)
        self.status = status.encode()
        try:
            self.socket.sendall(response)
            self.response_length = len(response)
        except OSError:
            pass
        self.time_finish = time.time()
        self.log_request()
        self._linger_close()

    def _linger_close(self):
        """Half-close, then drain what the client still sends for a moment: closing with unread bytes
        makes the kernel send a reset, which can destroy the answer before the client reads it."""
        try:
            self.socket.shutdown(socket.SHUT_WR)
            with gevent.Timeout(LINGER_SECONDS, False):
                left = LINGER_BYTES
                while left > 0:
                    data = self.socket.recv(65536)
                    if not data:
                        break
                    left -= len(data)
        except OSError:
            pass

    def _body_unfinished(self):
        body = self.wsgi_input
        if body._chunked_input_error:
            return True
        if body.chunked_input:
            return body.chunk_length != 0
        return body.position < (body.content_length or 0)

    def run_application(self):
        try:
            super().run_application()
        finally:
            if self._body_unfinished():
                # Refused unread (401, 413) or broken: closing costs less than reading a body of any
                # size to its end, and the bytes left can never be taken for a next request.
                self.close_connection = True
                self.linger = True
                self.wsgi_input._chunked_input_error = True  # makes pywsgi's _discard() skip it

    def _write_with_headers(self, data):
        if not self.close_connection and self._body_unfinished():
            self.close_connection = True
            self.response_headers = [h for h in self.response_headers if h[0].lower() != b"connection"]
            self.response_headers.append((b"Connection", b"close"))
        # pywsgi sends the head and the body in two syscalls; every API answer is small,
        # so one buffer and one send (the same bytes pywsgi would build) is cheaper.
        if self.response_use_chunked or len(data) > 65536:
            return super()._write_with_headers(data)
        self.headers_sent = True
        self.finalize_headers()
        head = bytearray(b"HTTP/1.1 ")
        head += self.status
        head += b"\r\n"
        for header, value in self.response_headers:
            head += header + b": " + value + b"\r\n"
        head += b"\r\n"
        head += data
        self._sendall(head)

    def handle_error(self, t, v, tb):
        if issubclass(t, TimeoutError):  # a client that stopped reading its answer
            self.close_connection = True
            return
        super().handle_error(t, v, tb)

    def _peer(self):
        return self.client_address[0] if isinstance(self.client_address, tuple) else "a client"

    def format_request(self):
        env = self.environ or {}
        latency = (self.time_finish - self.time_start) if self.time_finish else 0
        return ujson.dumps({
            "time": rfc3339_now(),
            "remote_ip": self.client_address[0] if isinstance(self.client_address, tuple) else "",
            "host": env.get("HTTP_HOST", ""),
            "method": self.command,
            "uri": self.path,
            "status": getattr(self, "code", None) or 0,
            "latency": int(latency * 1e9),
            "latency_human": f"{latency * 1000:.3f}ms",
            "bytes_in": int(env.get("CONTENT_LENGTH") or 0),
            "bytes_out": self.response_length or 0,
        }, escape_forward_slashes=False)


def _write_raw(sock, data):
    """A few plain bytes under a TLS socket (which has not completed a handshake)."""
    try:
        os.write(sock.fileno(), data)
    except OSError:
        pass


def read_body_first(app, max_body_bytes):
    """WSGI middleware between the auth check and the API: reads the whole body before the app
    runs, so a malformed chunked body or one that ends early is answered 400 here (inside the app
    it would be an internal error), and a stalled client is dropped. Bodies over max_body_bytes are
    left to the app's 413 unread; the handler then closes the connection instead of reading them."""

    def refuse(start_response, status, message):
        body = ujson.dumps({"status": status, "error": message}).encode()
        start_response(f"{status} {HTTPStatus(status).phrase}", [
            ("Content-Type", "application/json; charset=UTF-8"),
            ("Content-Length", str(len(body))), ("Connection", "close")])
        return [body]

    def with_body_read(environ, start_response):
        body = environ["wsgi.input"]
        length = body.content_length
        if not body.chunked_input and (not length or length > max_body_bytes):
            return app(environ, start_response)
        try:
            data = _read_chunked(body, max_body_bytes + 1) if body.chunked_input else body.read(length)
        except TimeoutError:
            return refuse(start_response, 408, "the request body stopped arriving")
        except OSError:  # pywsgi's chunk parser errors and an early end of the body are IOErrors
            body._chunked_input_error = True
            return refuse(start_response, 400, "malformed or incomplete request body")
        environ["wsgi.input"] = io.BytesIO(data)
        environ["CONTENT_LENGTH"] = str(len(data))
        return app(environ, start_response)

    return with_body_read


CHUNKED_PIECE = 4096
YIELD_EVERY = 0.02  # seconds of chunk parsing before other requests get a turn


def _read_chunked(body, limit):
    """Up to `limit` bytes of a chunked body, in pieces, yielding every 20 ms: pywsgi parses ~3 us a
    chunk, so a body of one-byte chunks read at once would hold the event loop for seconds."""
    parts, size = [], 0
    turn_ends = time.monotonic() + YIELD_EVERY
    while size < limit:
        part = body.read(min(CHUNKED_PIECE, limit - size))
        if not part:
            break
        parts.append(part)
        size += len(part)
        if time.monotonic() > turn_ends:
            gevent.sleep(0.001)  # a timer, not sleep(0): that runs again before the loop polls for I/O
            turn_ends = time.monotonic() + YIELD_EVERY
    return b"".join(parts)


class Server(WSGIServer):
    """pywsgi's server with hq-gevent's limits: `config` for the handler, at most max_connections
    handlers at once (a pool: the rest wait in the listen backlog), and an accept loop that
    outlives running out of file descriptors."""

    out_of_descriptors = False

    def __init__(self, config, app, access_log, ssl_context=None):
        ssl_args = {"ssl_context": ssl_context, "do_handshake_on_connect": False} if ssl_context else {}
        # Without a handshake on accept, the TLS handshake happens in the handler's first read,
        # under the request-head deadline: a client that connects and says nothing is dropped.
        super().__init__(config.host_port, app, handler_class=AccessLogHandler, log=access_log,
                         error_log=_ErrorLog(), spawn=Pool(config.max_connections), **ssl_args)
        self.config = config

    def do_read(self):
        try:
            accepted = super().do_read()
        except OSError as e:
            if e.errno not in OUT_OF_DESCRIPTORS:
                raise
            # The pending connection stays in the backlog: pause accepting instead of spinning on
            # it (gevent would log a traceback per attempt), and try again shortly.
            if not self.out_of_descriptors:
                log.warning("Cannot accept connections: %s; retrying every %.1fs", e.strerror, ACCEPT_RETRY_SECONDS)
                self.out_of_descriptors = True
            self.stop_accepting()
            gevent.spawn_later(ACCEPT_RETRY_SECONDS, self._start_accepting_if_started)
            return None
        if self.out_of_descriptors and accepted:
            self.out_of_descriptors = False
            log.info("Accepting connections again")
        return accepted


ACCEPT_RETRY_SECONDS = 0.1


def tls_context(config):
    """An SSLContext for tls_cert_file/tls_key_file, or None; a bad file stops the start."""
    if not config.tls_cert_file:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
    except (OSError, ssl.SSLError) as e:
        raise Fatal(f"cannot load tls_cert_file {config.tls_cert_file} / tls_key_file "
                    f"{config.tls_key_file}: {e.strerror or e}") from None
    return context


def setup_logging(config):
    server_log = LogFile(config.log_file)
    handler = logging.StreamHandler(server_log)
    handler.setFormatter(JsonLogFormatter() if config.log_format == "json" else LogFormatter())
    log.handlers[:] = [handler]
    log.setLevel(LEVELS[config.log_level])
    log.propagate = False
    access_log = LogFile(config.access_log_file) if config.access_log_file != "" else None
    return server_log, access_log


def open_data_dir(config):
    """(data_dir, lock, is_temporary); raises SystemExit with a message if it is locked."""
    temporary = config.data_dir is None
    if temporary:
        data_dir = tempfile.mkdtemp(prefix="hq-gevent-")
        log.warning("Created temporary data directory: %s", data_dir)
    else:
        data_dir = os.path.abspath(config.data_dir)
        os.makedirs(data_dir, exist_ok=True)
    lock_path = os.path.join(data_dir, "lock")
    try:
        lock = zc.lockfile.LockFile(lock_path, content_template="{pid}")
    except zc.lockfile.LockError:
        holder = _read(lock_path).strip() or "unknown"
        raise Fatal(f"data_dir {data_dir} is locked by another hq-gevent process (pid {holder})") from None
    return data_dir, lock, temporary


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


class Fatal(Exception):
    """Stops the start with a message and exit code 1."""


def serve(config_file=None, log_level=None):
    if config_file is None and os.path.exists("/etc/hq-gevent/hq-gevent.toml"):
        config_file = "/etc/hq-gevent/hq-gevent.toml"
    try:
        config = config_module.load(config_file, log_level)
    except config_module.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    server_log, access_log = setup_logging(config)
    try:
        return run(config, server_log, access_log)
    except Fatal as e:
        log.error("%s", e)
        return 1


def run(config, server_log, access_log):
    # Token and certificate files are read first: a mistake in them stops the start at once.
    try:
        access = auth.Access(config)
    except auth.TokenError as e:
        raise Fatal(str(e)) from None
    ssl_context = tls_context(config)
    gevent.get_hub().print_exception = _log_greenlet_error
    wal_store = config.store == "wal"
    data_dir, lock, temporary = open_data_dir(config) if wal_store else (None, None, False)
    try:
        metrics = Metrics(lambda: dict(store.gauges(), workers_busy=dispatchers.in_flight))
        store = open_store(config, data_dir, metrics)
        dispatchers = Dispatchers(store, config)
        app = make_app(store, dispatchers, config)
        app = access.wrap(read_body_first(until_loaded(app, store), config.max_body_bytes))
        try:
            server = Server(config, app, access_log, ssl_context)
            server.init_socket()
        except OSError as e:
            raise Fatal(f"cannot listen on {config.addr}: {e.strerror or e}") from None
        stopping = gevent.event.Event()
        _install_signals(stopping, server_log, access_log)
        # Listening while the jobs load lets /readyz say so (503) to a load balancer.
        server.start()
        if ssl_context:
            log.info("TLS on: HTTPS only, certificate %s", config.tls_cert_file)
        log.info("The server Listening on %s (pid: %d)", config.addr, os.getpid())
        started = time.monotonic()
        try:
            store.load()
        except (WalCorrupt, StoreUnavailable) as e:
            raise Fatal(str(e)) from None
        if wal_store:
            log.info("Opened data directory: %s (%d jobs, %d waiting, loaded in %.2fs)",
                     data_dir, len(store.jobs), store.num_waiting, time.monotonic() - started)
        store.open(gevent.get_hub().threadpool)
        dispatchers.start()
        metrics.start()
        stopping.wait()
        log.info("Shutting down (waiting up to %ds for running jobs)", config.shutdown_timeout)
        server.close()  # stop accepting; connections already open are finished below
        dispatchers.shutdown(config.shutdown_timeout)
        server.stop(timeout=1)
        store.close()
        log.info("Stopped")
        return 0
    finally:
        if lock is not None:
            lock.close()
        if temporary:
            shutil.rmtree(data_dir, ignore_errors=True)


OPEN_WHILE_LOADING = ("/healthz", "/readyz")


def until_loaded(app, store):
    """WSGI middleware: 503 for every request but the health checks until the jobs are loaded."""
    def gate(environ, start_response):
        if store.loaded or environ.get("PATH_INFO") in OPEN_WHILE_LOADING:
            return app(environ, start_response)
        body = b'{"status":503,"error":"the server is loading its jobs"}'
        start_response("503 Service Unavailable", [("Content-Type", "application/json; charset=UTF-8"),
                                                   ("Content-Length", str(len(body)))])
        return [body]

    return gate


def _log_greenlet_error(context, t, v, tb):
    """gevent's hub prints a greenlet's uncaught exception to stderr; here it is a log line like any
    other (one JSON object with log_format = "json"). Only the context's type is named: a request's
    environ would carry its Authorization header."""
    log.error("Uncaught %s in %s", getattr(t, "__name__", t), type(context).__name__, exc_info=(t, v, tb))


class _ErrorLog:
    """pywsgi's error log → our logger (it writes tracebacks of broken connections there)."""

    def write(self, text):
        text = text.rstrip()
        if text:
            log.error("%s", text)

    def flush(self):
        pass


def _install_signals(stopping, server_log, access_log):
    def stop():
        if stopping.is_set():
            log.warning("Second stop signal: exiting now (the log is consistent; pending jobs run at next start)")
            os._exit(1)
        stopping.set()

    def reopen():
        server_log.reopen()
        if access_log is not None:
            access_log.reopen()
        log.info("Reopened log files")

    # Past a file size limit a write must fail with EFBIG (answered 503), not kill the server.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    gevent.signal_handler(signal.SIGTERM, stop)
    gevent.signal_handler(signal.SIGINT, stop)
    gevent.signal_handler(signal.SIGUSR1, reopen)

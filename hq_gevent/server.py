"""`hq-gevent serve`: wire config, logs, data dir, store, dispatchers and the WSGI server together."""
from gevent import monkey

monkey.patch_all()  # before anything imports socket, ssl or threading

import logging  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import datetime  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import ujson  # noqa: E402
import zc.lockfile  # noqa: E402
from gevent.pywsgi import WSGIHandler, WSGIServer  # noqa: E402

from hq_gevent import config as config_module  # noqa: E402
from hq_gevent.api import make_app  # noqa: E402
from hq_gevent.dispatcher import Dispatchers  # noqa: E402
from hq_gevent.store import Store  # noqa: E402
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
    NAMES = {"WARNING": "WARN", "CRITICAL": "ERROR"}

    def format(self, record):
        line = f"{rfc3339(record.created)} {self.NAMES.get(record.levelname, record.levelname)} {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


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


class RequestHeaders:
    """pywsgi's request-header object, parsed without the email package: that parser was
    ~8% of the server's CPU on the push path (py-spy, bench push)."""

    __slots__ = ("fields", "status")
    MAX_LINE = 65536
    MAX_FIELDS = 100

    def __init__(self, fp):
        self.status = ""
        self.fields = []
        for _ in range(self.MAX_FIELDS + 1):
            line = fp.readline(self.MAX_LINE + 1)
            if len(line) > self.MAX_LINE:
                self.status = "Line too long"
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

    def __delitem__(self, name):
        name = name.lower()
        self.fields = [field for field in self.fields if field[0].lower() != name]

    @property
    def headers(self):
        return [f"{key}: {value}\r\n" for key, value in self.fields]

    @property
    def typeheader(self):
        return self.get("content-type")


class AccessLogHandler(WSGIHandler):
    """pywsgi handler: TCP_NODELAY (pywsgi writes headers and body separately; without it a
    keep-alive client waits ~40 ms per response for delayed ACKs), and echo-style JSON access lines."""

    def MessageClass(self, fp, *args):
        return RequestHeaders(fp)

    def _write_with_headers(self, data):
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

    def handle(self):
        try:
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # not TCP (a unix socket)
        return super().handle()

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


def setup_logging(config):
    server_log = LogFile(config.log_file)
    handler = logging.StreamHandler(server_log)
    handler.setFormatter(LogFormatter())
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
    data_dir, lock, temporary = open_data_dir(config)
    try:
        store = Store(data_dir, config)
        started = time.monotonic()
        try:
            store.load()
        except WalCorrupt as e:
            raise Fatal(str(e)) from None
        log.info("Opened data directory: %s (%d jobs, %d waiting, loaded in %.2fs)",
                 data_dir, len(store.jobs), store.num_waiting, time.monotonic() - started)
        store.open(gevent.get_hub().threadpool)
        dispatchers = Dispatchers(store, config)
        dispatchers.start()
        app = make_app(store, dispatchers, config)
        host, port = config.host_port
        try:
            server = WSGIServer((host, port), app, handler_class=AccessLogHandler,
                                log=access_log, error_log=_ErrorLog(), spawn="default")
            server.init_socket()
        except OSError as e:
            raise Fatal(f"cannot listen on {config.addr}: {e.strerror or e}") from None
        stopping = gevent.event.Event()
        _install_signals(stopping, server_log, access_log)
        server.start()
        log.info("The server Listening on %s (pid: %d)", config.addr, os.getpid())
        stopping.wait()
        log.info("Shutting down (waiting up to %ds for running jobs)", config.shutdown_timeout)
        server.close()  # stop accepting; connections already open are finished below
        dispatchers.shutdown(config.shutdown_timeout)
        server.stop(timeout=1)
        store.close()
        log.info("Stopped")
        return 0
    finally:
        lock.close()
        if temporary:
            shutil.rmtree(data_dir, ignore_errors=True)


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

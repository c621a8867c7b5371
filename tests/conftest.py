"""Shared fixtures: a real hq-gevent server in a subprocess and a real worker app on 127.0.0.1.

Nothing here is mocked: the server is `python -m hq_gevent serve -c <toml>` on a free
loopback port, and the worker app is a threaded HTTP server that records what it receives.
"""
import http.server
import importlib.util
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import toml

ROOT = Path(__file__).resolve().parent.parent
FINISHED = ("success", "failure", "canceled", "unknown")

# --- the two stores (SPEC §13) ---------------------------------------------------------------
# These modules run twice: on the write-ahead log, and on PostgreSQL (a fresh database of one
# throwaway cluster per HQServer). HQServer picks the store of the running parametrization.
BOTH_STORES = ("test_api", "test_dispatch", "test_retry", "test_list", "test_dedup_batch", "test_schedule")
_store = {"kind": "wal", "cluster": None}
_databases = itertools.count()


WAL_ONLY = ("test_a_log_written_by_the_previous_version_loads",)  # about the log's own format


def pytest_generate_tests(metafunc):
    if ("hq_store" in metafunc.fixturenames and metafunc.module.__name__.rpartition(".")[2] in BOTH_STORES
            and metafunc.function.__name__ not in WAL_ONLY):
        metafunc.parametrize("hq_store", ["wal", "postgresql"], indirect=True, scope="module")


def require_postgresql():
    """Skip without PostgreSQL or psycopg, except in CI where either missing is a failure."""
    from pgcluster import find_bin_dir

    missing = None
    if find_bin_dir() is None:
        missing = "PostgreSQL's server (initdb)"
    elif importlib.util.find_spec("psycopg") is None or importlib.util.find_spec("psycopg_pool") is None:
        missing = "psycopg and psycopg_pool"
    if missing is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{missing} is required in CI; .ci/deps.sh and setup.py's test extra install it")
    pytest.skip(f"{missing} not installed")


@pytest.fixture(scope="session")
def pg_cluster():
    """One throwaway PostgreSQL cluster for the whole run (initdb in a temp dir, a free loopback port)."""
    require_postgresql()
    from pgcluster import PGCluster

    cluster = PGCluster(durable=False).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module", autouse=True)
def hq_store(request):
    """"wal", or "postgresql" for the second run of the BOTH_STORES modules."""
    kind = getattr(request, "param", "wal")
    _store["kind"] = kind
    _store["cluster"] = request.getfixturevalue("pg_cluster") if kind == "postgresql" else None
    yield kind
    _store["kind"], _store["cluster"] = "wal", None


@pytest.fixture(scope="module")
def tmp_path_factory(tmp_path_factory, hq_store):
    """The same factory, made to depend on hq_store: a module's own fixtures that build a server
    from it (test_api's `srv`, test_list's `listed`) are built again for the other store."""
    return tmp_path_factory


def fresh_database(name="hq"):
    """A new empty database on the session's cluster: its DSN."""
    return _store["cluster"].create_database(f"{name}_{os.getpid()}_{next(_databases)}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_tool(path_or_name, why):
    """Skip when a system tool is absent, except in CI where a missing tool is a failure."""
    import shutil

    if shutil.which(path_or_name):
        return
    if os.environ.get("CI"):
        pytest.fail(f"{path_or_name} is required in CI ({why}); .ci/deps.sh should install it")
    pytest.skip(f"{path_or_name} not installed ({why})")


class HQServer:
    """One hq-gevent process. `config` is merged over test defaults and written as TOML."""

    def __init__(self, tmp_path, config=None, env=None, name="hq"):
        self.tmp_path = Path(tmp_path)
        self.port = free_port()
        self.config = {
            "addr": f"127.0.0.1:{self.port}",
            "data_dir": str(self.tmp_path / f"{name}-data"),
            "shutdown_timeout": 5,
        }
        self.config.update(config or {})
        if _store["kind"] == "postgresql" and "store" not in self.config:
            self.config.update(store="postgresql", postgresql_dsn=fresh_database())
        self.config_path = self.tmp_path / f"{name}.toml"
        self.log_path = self.tmp_path / f"{name}.log"
        self.env = env or {}
        self.proc = None
        self.session = requests.Session()

    @property
    def url(self):
        scheme = "https" if self.config.get("tls_cert_file") else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    address = url

    @property
    def data_dir(self):
        return self.config.get("data_dir")

    def write_config(self):
        self.config_path.write_text(toml.dumps({k: v for k, v in self.config.items() if v is not None}))

    def start(self, timeout=20, wait=True):
        self.write_config()
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        env.pop("HQ_CONFIG", None)
        self._log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hq_gevent", "serve", "-c", str(self.config_path)],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(ROOT),
        )
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                # /readyz is open with tokens configured (and 200 once the jobs are loaded);
                # a TLS server is probed without verification.
                if requests.get(self.url + "/readyz", timeout=1, verify=False).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server not ready in {timeout}s:\n{self.log()}")

    def log(self):
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def send_signal(self, sig):
        self.proc.send_signal(sig)

    def stop(self, sig=signal.SIGTERM, timeout=20):
        """Send `sig` and wait; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            self._log_file.close()

    def kill(self):
        return self.stop(signal.SIGKILL)

    def restart(self, **config):
        assert self.stop() == 0, self.log()
        self.config.update(config)
        return self.start()

    # --- HTTP helpers -------------------------------------------------------------
    def request(self, method, path, **kw):
        kw.setdefault("timeout", 10)
        return self.session.request(method, self.url + path, **kw)

    def api(self, method, path, json_body=None, **kw):
        """(status code, decoded JSON body)."""
        if json_body is not None:
            kw["json"] = json_body
        r = self.request(method, path, **kw)
        return r.status_code, r.json()

    def push(self, **job):
        status, body = self.api("POST", "/job", job)
        assert status == 200, body
        return body

    def job(self, job_id):
        status, body = self.api("GET", f"/job/{job_id}")
        assert status == 200, body
        return body

    def wait_job(self, job_id, statuses=FINISHED, timeout=15):
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["status"] in statuses:
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {job['status']} after {timeout}s: {job}")
            time.sleep(0.02)


class _WorkerHTTPServer(http.server.ThreadingHTTPServer):
    request_queue_size = 512  # the default 5 resets connections when many jobs arrive at once


class WorkerApp:
    """A real worker app on 127.0.0.1 that records each request.

    respond(status, body, delay) sets the answer; hold() makes requests block until release().
    """

    def __init__(self):
        self.requests = []
        self.status = 200
        self.body = b"OK"
        self.delay = 0.0
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._gate = threading.Event()
        self._gate.set()
        self._arrived = threading.Condition(self._lock)
        app = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with app._lock:
                    app.requests.append(
                        {
                            "method": self.command,
                            "path": self.path,
                            "headers": {k.lower(): v for k, v in self.headers.items()},
                            "body": body,
                            "time": time.monotonic(),
                        }
                    )
                    app.in_flight += 1
                    app.max_in_flight = max(app.max_in_flight, app.in_flight)
                    app._arrived.notify_all()
                try:
                    app._gate.wait(60)
                    if app.delay:
                        time.sleep(app.delay)
                    status, payload = app.status, app.body
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    with app._lock:
                        app.in_flight -= 1

            do_PUT = do_GET = do_POST

        self.server = _WorkerHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def respond(self, status=200, body=b"OK", delay=0.0):
        self.status, self.body, self.delay = status, body, delay

    def hold(self):
        self._gate.clear()

    def release(self):
        self._gate.set()

    def wait_requests(self, n, timeout=15):
        with self._lock:
            ok = self._arrived.wait_for(lambda: len(self.requests) >= n, timeout)
        assert ok, f"worker got {len(self.requests)} requests, wanted {n}"
        return self.requests

    def job_ids(self):
        with self._lock:
            return [r["headers"].get("x-hq-job-id") for r in self.requests]

    def close(self):
        self.release()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def worker():
    app = WorkerApp()
    yield app
    app.close()


@pytest.fixture
def make_server(tmp_path):
    """Factory: make_server(**config) -> a started HQServer; all are stopped at teardown."""
    started = []

    def make(start=True, env=None, name=None, **config):
        srv = HQServer(tmp_path, config, env=env, name=name or f"hq{len(started)}")
        started.append(srv)
        return srv.start() if start else srv

    yield make
    for srv in started:
        if srv.proc is not None and srv.proc.poll() is None:
            srv.stop(signal.SIGKILL)


@pytest.fixture
def server(make_server):
    return make_server()


def dump_json(obj):
    return json.dumps(obj, separators=(",", ":"))


class SocketWorker:
    """A worker app written at the socket level, for answers no HTTP library would give:
    each accepted connection runs `serve(conn)` (a subclass's) in a thread of its own."""

    def __init__(self, path=""):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}{path}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn):
        raise NotImplementedError

    def close(self):
        self.listener.close()

"""hq-gevent's load-testing suite: `python3 -m bench [options]`.

Each scenario starts a fresh server (any HQ-compatible command, `--server 'CMD {config}'`) on a
temporary data_dir and a fresh bench worker, both on 127.0.0.1, drives it over HTTP only, and
prints a table plus one JSON line per scenario. `--compare 'CMD {config}'` runs a second server
alternately with the first (A B A B ..., `--rounds`, at least 3) and reports medians and A/B ratios.
Each side may run another checkout's hq_gevent (`--server-dir`/`--compare-dir DIR`, or
`--server-ref`/`--compare-ref REF`: that commit of this repository, exported with `git archive`)
and its own config (`--set-a`/`--set-b`, `--secure A|B`: API token and signing on).

Every run is bounded in count and time; every child process runs in its own process group and is
killed on exit, on an error and on Ctrl-C (and gets SIGKILL if the bench itself dies).
"""
import argparse
import ctypes
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import gevent
from gevent import subprocess

from bench import load

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
DEFAULT_SERVER = f"{shlex.quote(sys.executable)} -m hq_gevent serve -c {{config}}"
SCENARIOS = ["baseline", "push", "e2e", "slow", "memory", "list", "schedule", "batch", "retry"]
OPT_IN = ["many_scheduled"]  # run only when named: a million jobs held in one server
SIZES = {  # jobs per scenario: full run, and --quick
    "full": {"push": 10000, "e2e": 10000, "slow": 10000, "memory": 100000, "list": 100000,
             "schedule": 100000, "batch": 100000, "retry": 10000, "many_scheduled": 1000000},
    "quick": {"push": 2000, "e2e": 2000, "slow": 1000, "memory": 5000, "list": 5000,
              "schedule": 5000, "batch": 10000, "retry": 1000, "many_scheduled": 50000},
}
# Server config per scenario (the reference points), before --set overrides.
CONFIGS = {
    "push": {"dispatchers": 2, "max_workers": 0},
    "e2e": {"dispatchers": 2, "max_workers": 100},
    "slow": {"dispatchers": 1, "max_workers": None},  # None: ample, = n
    "memory": {"dispatchers": 2, "max_workers": 100},
    "list": {"dispatchers": 2, "max_workers": 100},
    "schedule": {"dispatchers": 2, "max_workers": 100},
    "batch": {"dispatchers": 2, "max_workers": 0},  # the push part, as in push
    "batch_e2e": {"dispatchers": 2, "max_workers": 100},  # the e2e part, as in e2e (--set batch.KEY sets both)
    "retry": {"dispatchers": 2, "max_workers": 100},
    "many_scheduled": {"dispatchers": 2, "max_workers": 100},
}
# The retry scenario's policy (SPEC §10.2) and worker: each job fails twice, then succeeds.
RETRY_POLICY = {"maxAttempts": 5, "minBackoff": 0.1, "maxBackoff": 1}
RETRY_FAILS = 2
# The longest the backoff waits of one job can add up to: before attempt 2 at most minBackoff, before
# attempt 3 at most 2 x minBackoff (SPEC §10.3: d = min(maxBackoff, minBackoff x 2^(n-1)), jitter below d).
RETRY_WAITS_S = sum(min(RETRY_POLICY["maxBackoff"], RETRY_POLICY["minBackoff"] * 2**k) for k in range(RETRY_FAILS))
# --secure: the API token the bench's clients send and the signing secret the server signs with.
# Made up for the bench, not secrets: they guard nothing but a throwaway server on 127.0.0.1.
BENCH_TOKEN = "hq-bench-token-0123456789abcdef"
BENCH_SIGNING_SECRET = "whsec_aHEtYmVuY2gtc2lnbmluZy1zZWNyZXQtMzItYnl0ZXM="
# Figures where smaller is better (times, sizes, CPU, failures); rates (*_per_s) and the rest are higher-is-better.
LOWER_IS_BETTER = re.compile(
    r"((?<!_per)_s|_ms|_job|_mb|lost|duplicates|unexpected|errors|_cpu|early|vs_ideal|mismatches|not_success|"
    r"wrong_attempts|due_before_rss)$"
)
# Keys only hq-gevent knows; a 1.x server (e.g. the Go HQ) refuses or ignores them.
HQ_GEVENT_ONLY_KEYS = (
    "wal_fsync", "max_output_bytes", "max_body_bytes", "wal_compact_min_bytes", "wal_compact_ratio",
    "retry_max_attempts", "retry_min_backoff", "retry_max_backoff", "retry_max_duration", "unique_window",
    "auth_tokens", "auth_read_tokens", "auth_tokens_file", "auth_read_tokens_file", "signing_secrets",
    "tls_cert_file", "tls_key_file", "allowed_hosts", "request_header_timeout", "keepalive_timeout",
    "max_connections", "metrics_public", "log_format",
)
FINISHED = ("success", "failure", "canceled", "unknown")

children = []  # every live Popen, for cleanup


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def _die_with_parent():
    # PR_SET_PDEATHSIG: a child gets SIGKILL if the bench is killed without a chance to clean up.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except OSError:
        pass


def spawn(cmd, log_path, env=None, stdout=None, cwd=None):
    out = open(log_path, "ab")
    proc = subprocess.Popen(
        cmd,
        stdout=stdout if stdout is not None else out,
        stderr=out,
        env=env,
        cwd=cwd,
        start_new_session=True,  # its own process group, so a wrapper's children die with it
        preexec_fn=_die_with_parent,
    )
    out.close()
    children.append(proc)
    return proc


def stop(proc, sig=signal.SIGTERM, timeout=15.0):
    """Signal the child's process group and wait; SIGKILL when it does not exit in time."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers of the group, if any
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait(5)
    if proc in children:
        children.remove(proc)
    return proc.returncode


def cleanup():
    for proc in list(children):
        try:
            stop(proc, signal.SIGKILL, 5)
        except Exception as exc:  # keep killing the others
            log(f"cleanup of pid {proc.pid}: {exc}")


def machine():
    """What the figures depend on, recorded with them."""
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kb = 0
    fs = "?"
    tmp = os.path.realpath(tempfile.gettempdir())
    try:  # the filesystem the data dirs live on: fsync cost is most of a durable push
        best = ""
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, kind = line.split()[:3]
            if (tmp + "/").startswith(mnt.rstrip("/") + "/") and len(mnt) >= len(best):
                best, fs = mnt, f"{kind} ({dev})"
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "mem_gib": round(mem_kb / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "gevent": gevent.__version__,
        "tmp_fs": f"{tmp}: {fs}",
        "load_avg_at_start": round(os.getloadavg()[0], 2),
    }


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def tail(path, n=30):
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def toml_dumps(config):
    # Only strings, ints and bools occur; JSON's string escapes are valid TOML basic strings.
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items() if v is not None)


def _tree(pid):
    """`pid` and its descendants (a server command may be a wrapper)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    tree, frontier = {pid}, [pid]
    while frontier:
        p = frontier.pop()
        for child, parent in parents.items():
            if parent == p and child not in tree:
                tree.add(child)
                frontier.append(child)
    return tree


def rss_bytes(pid):
    total = 0
    for p in _tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def cpu_seconds(pid):
    """User + system CPU time used so far by `pid` and its descendants."""
    total = 0
    for p in _tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """Fraction of one core a process used between start() and figures()."""

    def __init__(self, **procs):
        self.procs = procs

    def start(self):
        self.t0 = time.monotonic()
        self.c0 = {name: cpu_seconds(p.pid) for name, p in self.procs.items()}
        return self

    def figures(self):
        elapsed = time.monotonic() - self.t0
        return {f"{name}_cpu": r((cpu_seconds(p.pid) - self.c0[name]) / elapsed, 2) for name, p in self.procs.items()}


class Worker:
    """`python3 -m bench.worker` on a port it picks itself (no port race)."""

    def __init__(self, workdir, sleep_ms=0, trivial=False, name="worker", fail_first=0):
        cmd = [sys.executable, "-m", "bench.worker", "--port", "0"]
        if sleep_ms:
            cmd += ["--sleep-ms", str(sleep_ms)]
        if fail_first:
            cmd += ["--fail-first", str(fail_first)]
        if trivial:
            cmd.append("--trivial")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        self.log_path = Path(workdir) / f"{name}.log"
        self.proc = spawn(cmd, self.log_path, env=env, stdout=subprocess.PIPE)
        with gevent.Timeout(20, RuntimeError(f"worker did not start:\n{tail(self.log_path)}")):
            line = self.proc.stdout.readline().decode()
        if not line.startswith("listening"):
            raise RuntimeError(f"worker did not start:\n{tail(self.log_path)}")
        self.port = int(line.rsplit(":", 1)[1])
        self.url = f"http://{HOST}:{self.port}"
        # One kept-alive connection for polling: a connection per poll would pile up
        # thousands of TIME_WAIT ports during a long wait and could exhaust the ephemeral range.
        self.control = load.Conn(HOST, self.port, timeout=60)

    def stats(self):
        status, body = self.control.request(load.build_request("GET", "/stats"))
        return json.loads(body)

    def arrivals(self):
        status, body = self.control.request(load.build_request("GET", "/arrivals"))
        return json.loads(body)

    def successes(self):
        status, body = self.control.request(load.build_request("GET", "/successes"))
        return json.loads(body)

    def close(self):
        self.control.close()
        stop(self.proc)


def server_config(flavor, scenario_config):
    """The TOML keys every bench server gets, then the scenario's."""
    config = {
        "addr": None,  # set at start
        "data_dir": None,
        "log_level": "warn",
        "access_log_file": "/dev/null",  # so request logging is not what gets measured
        "shutdown_timeout": 5,
        "wal_fsync": "always",
    }
    config.update(scenario_config)
    if flavor != "hq-gevent":
        for key in HQ_GEVENT_ONLY_KEYS:
            config.pop(key, None)
    return config


class Side:
    """One server under test: its command template, flavor, checkout and config overrides."""

    def __init__(self, label, template, flavor, root=None, sets=(), commit=None):
        self.label = label
        self.template = template
        self.flavor = flavor
        self.root = root  # the checkout whose hq_gevent the server imports (None: this one, as installed)
        self.sets = list(sets)  # (key, value) pairs over the shared --set ones
        self.commit = commit or checkout_commit(root or ROOT)
        self.version = None  # `GET /`'s answer, read at each start

    def describe(self):
        return {"server": self.template, "dir": str(self.root or ROOT), "commit": self.commit, "version": self.version}


def checkout_commit(root):
    """Short commit of a git checkout, `+dirty` when its hq_gevent/ has changes (None: not a checkout)."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "hq_gevent"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def export_ref(ref, dest):
    """This repository's tree at `ref` into `dest` (git archive: the repository is only read); returns the commit."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{ref}^{{commit}}"],
                            capture_output=True, text=True, timeout=10)
    if commit.returncode:
        raise RuntimeError(f"not a commit of {ROOT}: {ref}: {commit.stderr.strip()}")
    tar_path = Path(str(dest) + ".tar")
    made = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", "-o", str(tar_path), commit.stdout.strip()],
                          capture_output=True, text=True, timeout=120)
    if made.returncode:
        raise RuntimeError(f"git archive {ref}: {made.stderr.strip()}")
    os.makedirs(dest)
    with tarfile.open(tar_path) as tar:
        tar.extractall(dest, filter="data")
    tar_path.unlink()
    return commit.stdout.strip()[:7]


class Server:
    """One run of the server under test, from a command template with `{config}`."""

    def __init__(self, side, workdir, name, config, profile_dir=None):
        self.profile_dir = profile_dir
        self.profiler = None
        self.profiles = 0
        self.side = side
        self.template = side.template
        self.flavor = side.flavor
        self.workdir = Path(workdir)
        self.name = name
        self.data_dir = self.workdir / f"{name}-data"
        self.config_path = self.workdir / f"{name}.toml"
        self.log_path = self.workdir / f"{name}.log"
        self.config = server_config(self.flavor, config)
        self.config["data_dir"] = str(self.data_dir)
        token = (self.config.get("auth_tokens") or [None])[0]
        # Every request of the bench's clients carries the token when the server wants one.
        self.auth = {"Authorization": f"Bearer {token}"} if token else {}
        self.proc = None
        self.port = None
        self.control = None

    def start(self, timeout=30.0):
        """Start and wait for `GET /` to answer; returns seconds from exec to the first answer."""
        for attempt in range(3):  # a free port can be taken between choosing and binding
            if self.port is None or attempt:
                self.port = free_port()
            self.config["addr"] = f"{HOST}:{self.port}"
            self.config_path.write_text(toml_dumps(self.config))
            cmd = [arg.replace("{config}", str(self.config_path)) for arg in shlex.split(self.template)]
            env = dict(os.environ)
            env.pop("HQ_CONFIG", None)
            root = self.side.root
            if self.flavor == "hq-gevent":
                # The side's checkout first on the path (this one by default), installed or not. With
                # another checkout the server also runs in it: `python3 -m` puts the working directory
                # before PYTHONPATH, so the bench's own checkout must not be the working directory there.
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root or ROOT), os.environ.get("PYTHONPATH")]))
            t0 = time.monotonic()
            self.proc = spawn(cmd, self.log_path, env=env, cwd=str(root) if root else None)
            log(f"started {self.name} pid {self.proc.pid}: {' '.join(cmd)}")
            deadline = t0 + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    code, body = load.get(HOST, self.port, "/", timeout=2, headers=self.auth)
                    if code == 200:
                        ready = time.monotonic() - t0
                        self.side.version = json.loads(body)
                        self._check_auth()
                        self._attach_profiler()
                        return ready
                except (ConnectionError, OSError, ValueError):
                    pass
                gevent.sleep(0.01)
            else:
                stop(self.proc)
                raise RuntimeError(f"{self.name} not answering after {timeout}s:\n{tail(self.log_path)}")
            children.remove(self.proc)
        raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{tail(self.log_path)}")

    def _check_auth(self):
        """With a token configured, a request without it must be refused, or an A/B measures nothing."""
        if self.auth and load.get(HOST, self.port, "/stats", timeout=10)[0] != 401:
            log(f"warning: {self.name} answers without the token: auth_tokens is not in force")

    def get_json(self, path):
        if self.control is None:
            self.control = load.Conn(HOST, self.port, timeout=60)  # kept alive, as for the worker
        status, body = self.control.request(load.build_request("GET", path, headers=self.auth))
        return status, json.loads(body)

    def rss(self):
        return rss_bytes(self.proc.pid)

    def stop(self):
        self._detach_profiler()
        if self.control is not None:
            self.control.close()
            self.control = None
        if self.proc is not None:
            stop(self.proc, timeout=self.config.get("shutdown_timeout", 10) + 10)

    def _attach_profiler(self):
        """With --profile: py-spy samples the server until stop(), without pausing it."""
        if not self.profile_dir:
            return
        self.profiles += 1
        self.profile_path = Path(self.profile_dir) / f"{self.name}-{self.profiles}.txt"
        cmd = ["py-spy", "record", "--pid", str(self.proc.pid), "--subprocesses", "--nonblocking",
               "--rate", "250", "--format", "raw", "--output", str(self.profile_path)]
        plog = self.workdir / f"{self.name}-py-spy.log"
        self.profiler = spawn(cmd, plog)
        deadline = time.monotonic() + 10
        while "Sampling" not in tail(plog) and time.monotonic() < deadline:
            if self.profiler.poll() is not None:
                raise RuntimeError(f"py-spy failed:\n{tail(plog)}")
            gevent.sleep(0.05)

    def _detach_profiler(self):
        if self.profiler is None:
            return
        stop(self.profiler, signal.SIGINT, 30)  # SIGINT: py-spy writes its output, then exits
        self.profiler = None
        if self.profile_path.exists():
            summary = profile_summary(self.profile_path.read_text())
            self.profile_path.with_suffix(".top.txt").write_text(summary)
            log(f"profile {self.profile_path} (top frames in {self.profile_path.with_suffix('.top.txt').name}):\n{summary}")


def profile_summary(raw, top=15):
    """The frames with the most samples, by self and by inclusive count, from py-spy's raw format."""
    own, incl, total = {}, {}, 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        # --subprocesses puts a `process PID:"cmd"` root frame; alone it means no Python frame.
        frames = [f for f in stack.split(";") if not f.startswith("process ")] or ["(no Python frame: idle or native)"]
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for frame in set(frames):
            incl[frame] = incl.get(frame, 0) + n
    out = [f"{total} samples"]
    for title, table in (("self", own), ("inclusive", incl)):
        out.append(f"-- by {title} --")
        for frame, n in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
            out.append(f"{100.0 * n / max(total, 1):5.1f}%  {frame}")
    return "\n".join(out) + "\n"


# --- building blocks ------------------------------------------------------------------------

def job_dict(worker, i, **extra):
    """Job i of a run. Names alternate foo-*/bar-* for the list filters."""
    return {"url": f"{worker.url}/job", "name": f"{'foo' if i % 2 else 'bar'}-{i % 10}", "payload": {"i": i}, **extra}


def json_headers(server):
    return {"Content-Type": "application/json", **server.auth}


def push_jobs(server, jobs, opts, deadline_s, batch_size=None, concurrency=None):
    """Push job dicts, one per `POST /job` or `batch_size` per `POST /jobs` (SPEC §10.6).

    Returns (load.Result, [(sent time, id, index in jobs) of acknowledged jobs]). A batch is
    acknowledged as a whole or not at all; an answer with the wrong number of jobs counts as none.
    """
    headers = json_headers(server)
    if batch_size:
        groups = [list(range(k, min(k + batch_size, len(jobs)))) for k in range(0, len(jobs), batch_size)]
        path, body_of = "/jobs", lambda g: [jobs[i] for i in g]
    else:
        groups = [[i] for i in range(len(jobs))]
        path, body_of = "/job", lambda g: jobs[g[0]]
    reqs = [load.build_request("POST", path, json.dumps(body_of(g), separators=(",", ":")).encode(), headers) for g in groups]
    res = load.run(HOST, server.port, reqs, concurrency or opts.concurrency, deadline_s, keep_bodies=True)
    acked = []
    for group, sent, status, body in zip(groups, res.sent, res.status, res.body):
        if status != 200:
            continue
        answer = json.loads(body)
        answered = answer["jobs"] if batch_size else [answer]
        if len(answered) == len(group):
            acked.extend((sent, str(job["id"]), i) for i, job in zip(group, answered))
    return res, acked


def push(server, worker, n, opts, deadline_s):
    """Push n jobs one by one; returns (load.Result, [(sent time, id) of acknowledged pushes])."""
    res, acked = push_jobs(server, [job_dict(worker, i) for i in range(n)], opts, deadline_s)
    return res, [(sent, job_id) for sent, job_id, _ in acked]


def supports_batch(server):
    """Whether the server has `POST /jobs` (an empty array is a 400 there, an unknown route 404/405)."""
    raw = load.build_request("POST", "/jobs", b"[]", {**json_headers(server), "Connection": "close"})
    conn = load.Conn(HOST, server.port, timeout=10)
    try:
        return conn.request(raw)[0] not in (404, 405)
    finally:
        conn.close()


def stored_jobs(server, deadline, page=5000):
    """Every stored job as {id: (status, attempts)}, read in pages of `page` (bounded by `deadline`)."""
    jobs, begin = {}, None
    while time.monotonic() < deadline:
        code, body = server.get_json(f"/job?limit={page}" + (f"&begin={begin}" if begin else ""))
        if code != 200:
            raise RuntimeError(f"GET /job answered {code}: {body}")
        for job in body["jobs"]:
            jobs[str(job["id"])] = (job.get("status"), job.get("attempts"))
        if not body.get("hasNext"):
            break
        begin = body["next"]
    return jobs


def wait_delivered(worker, server, ids, deadline, quiet_until=0.0):
    """Poll the worker until every id has arrived; returns the arrivals map (maybe incomplete).

    Gives up early when the server has been idle (nothing waiting or running) for 2 s while ids
    are still missing: those jobs are lost, and waiting out the whole bound would not find them.
    Also when nothing new has arrived for STALL_S (after `quiet_until`: scheduled jobs may
    legitimately keep the worker quiet until then): a server that holds jobs it never sends.
    """
    want = len(ids)
    idle_since = None
    next_idle_check = time.monotonic() + 0.5
    stall = Stall(quiet_until)
    while time.monotonic() < deadline:
        unique = worker.stats()["unique"]
        if stall.stuck(unique):
            break
        if unique >= want:
            arrivals = worker.arrivals()
            if all(i in arrivals for i in ids):
                return arrivals
            gevent.sleep(0.2)  # extra ids arrived (failed pushes that were stored); keep waiting
        else:
            gevent.sleep(0.005)
        if time.monotonic() >= next_idle_check:
            next_idle_check = time.monotonic() + 0.5
            if server_idle(server):
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > 2.0:
                    break
            else:
                idle_since = None
    return worker.arrivals()


def wait_succeeded(worker, server, want, deadline):
    """Until the worker has answered 200 for `want` distinct ids (the retry scenario); returns whether it has.

    Gives up, as wait_delivered does, after the server has been idle for 2 s.
    """
    idle_since = None
    next_idle_check = time.monotonic() + 0.5
    stall = Stall()
    while time.monotonic() < deadline:
        stats = worker.stats()
        if stats["successIds"] >= want:
            return True
        if stall.stuck(stats["requests"]):
            break
        gevent.sleep(0.005)
        if time.monotonic() >= next_idle_check:
            next_idle_check = time.monotonic() + 0.5
            if server_idle(server):
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > 2.0:
                    break
            else:
                idle_since = None
    return False


STALL_S = 60.0


class Stall:
    """Whether a counter has not moved for STALL_S seconds (not counting the time before `quiet_until`)."""

    def __init__(self, quiet_until=0.0):
        self.value = None
        self.since = max(time.monotonic(), quiet_until)

    def stuck(self, value):
        now = time.monotonic()
        if value != self.value:
            self.value, self.since = value, max(now, self.since)
        if now - self.since > STALL_S:
            log(f"nothing new at the worker for {STALL_S:.0f} s; the jobs still missing count as lost")
            return True
        return False


def wait_finished(server, job_id, deadline):
    """Until the job has finished; returns its status (None if the bound passed first)."""
    while time.monotonic() < deadline:
        code, job = server.get_json(f"/job/{job_id}")
        if code == 200 and job.get("status") in FINISHED:
            return job["status"]
        gevent.sleep(0.005)
    return None


def server_idle(server):
    """Nothing waiting, running or scheduled (1.x /stats names; numScheduledJobs where the server has it)."""
    code, stats = server.get_json("/stats")
    return code == 200 and stats.get("numWaitingJobs") == 0 and stats.get("numRunningJobs") == 0 and not stats.get("numScheduledJobs")


def wait_idle(server, deadline):
    """Until the server reports nothing waiting or running (1.x /stats names)."""
    while time.monotonic() < deadline:
        if server_idle(server):
            return True
        gevent.sleep(0.02)
    return False


def delivery_figures(acked, arrivals):
    ids = {i for _, i in acked}
    return {
        "lost": sum(1 for i in ids if i not in arrivals),
        "duplicates": sum(c - 1 for c, _ in arrivals.values()),
        "unexpected": sum(1 for i in arrivals if i not in ids),
    }


def ms(seconds):
    return None if seconds is None else round(seconds * 1000, 3)


def r(x, nd=1):
    return None if x is None else round(x, nd)


def rfc3339_ms(t_ms):
    """Unix time in whole milliseconds as SPEC §1's time format."""
    seconds, millis = divmod(t_ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


# --- scenarios ------------------------------------------------------------------------------

def sc_push(ctx, side):
    """Acknowledged (durable) pushes per second and POST /job latency; no waiting for dispatch."""
    n = ctx.n("push")
    worker = ctx.worker()
    server = ctx.server(side, "push", ctx.config("push", n, side))
    meter = CpuMeter(server=server.proc, worker=worker.proc).start()
    res, acked = push(server, worker, n, ctx.opts, ctx.opts.timeout)
    lat = res.latencies()
    figures = {
        "pushes_per_s": r(len(acked) / res.elapsed),
        "push_p50_ms": ms(load.percentile(lat, 50)),
        "push_p99_ms": ms(load.percentile(lat, 99)),
        "errors": n - len(acked),
        "client_cpu": r(res.cpu, 2),
    } | meter.figures()
    # The same push by wrk (same job, same number of connections) on a fresh server of the same
    # config: if wrk gets much more, the bench client is what limits pushes_per_s. Fresh, because
    # the first server is still dispatching its backlog, which would slow wrk down.
    job = json.dumps({"url": f"{worker.url}/job", "name": "wrk", "payload": {"i": 0}}).encode()
    w = None
    if shutil.which("wrk"):
        server.stop()
        server2 = ctx.server(side, "push", ctx.config("push", n, side))
        w = wrk(f"http://{HOST}:{server2.port}/job", ctx.opts.baseline_seconds, ctx.opts.concurrency, ctx.workdir, post=job,
                headers=server2.auth)
    figures["wrk_pushes_per_s"] = r(w[0]) if w else None
    figures["client_vs_wrk"] = r(figures["pushes_per_s"] / w[0], 2) if w else None
    if ctx.baseline_rps:  # this round's trivial-app rate: issue 6 wants durable push >= 60% of it
        figures["vs_baseline"] = r(figures["pushes_per_s"] / ctx.baseline_rps, 2)
    return figures


def push_and_deliver(ctx, server, worker, n, batch_size=None):
    """Push n jobs under a CPU meter and wait until the worker has them (e2e and slow)."""
    t_end = time.monotonic() + ctx.opts.timeout
    meter = CpuMeter(server=server.proc, worker=worker.proc).start()
    jobs = [job_dict(worker, i) for i in range(n)]
    res, acked = push_jobs(server, jobs, ctx.opts, ctx.opts.timeout, batch_size, ctx.opts.batch_concurrency if batch_size else None)
    acked = [(sent, job_id) for sent, job_id, _ in acked]
    push_end = time.monotonic()
    t_start = min(s for s, _ in acked) if acked else push_end
    arrivals = wait_delivered(worker, server, [i for _, i in acked], t_end)
    return meter, res, acked, t_start, push_end, arrivals, t_end


def sc_e2e(ctx, side):
    """Push n jobs until the worker has every one and the last reads success."""
    n = ctx.n("e2e")
    return run_e2e(ctx, side, "e2e", ctx.config("e2e", n, side), n)


def run_e2e(ctx, side, scenario, config, n, batch_size=None):
    """The e2e measurement on a fresh server and worker: pushes one by one, or in batches."""
    worker = ctx.worker()
    server = ctx.server(side, scenario, config)
    meter, res, acked, t_start, push_end, arrivals, t_end = push_and_deliver(ctx, server, worker, n, batch_size)
    complete = bool(acked) and all(i in arrivals for _, i in acked)
    # Batches are acknowledged in any order: the job to watch is the highest id, the last stored.
    last = max((i for _, i in acked), key=int, default=None)
    done = complete and wait_finished(server, last, t_end) == "success"
    t_done = time.monotonic()
    cpu = meter.figures()
    lat = [arrivals[i][1] - sent for sent, i in acked if i in arrivals]
    figures = {
        "jobs_per_s": r(len(acked) / (t_done - t_start)) if done else None,
        "pushes_per_s": r(len(acked) / (push_end - t_start)),
        "latency_p50_ms": ms(load.percentile(lat, 50)),
        "latency_p99_ms": ms(load.percentile(lat, 99)),
        "errors": n - len(acked) + (0 if done else 1),
        "client_cpu": r(res.cpu, 2),
    }
    figures.update(cpu)
    figures.update(delivery_figures(acked, arrivals))
    figures["signed"] = worker.stats()["signed"]  # worker requests that carried a signature
    return figures


def sc_slow(ctx, side):
    """n jobs whose worker holds each for --slow-ms, with ample max_workers: total vs ideal."""
    n = ctx.n("slow")
    sleep_s = ctx.opts.slow_ms / 1000.0
    worker = ctx.worker(sleep_ms=ctx.opts.slow_ms)
    server = ctx.server(side, "slow", ctx.config("slow", n, side))
    meter, res, acked, t_start, push_end, arrivals, t_end = push_and_deliver(ctx, server, worker, n)
    idle = wait_idle(server, t_end)
    t_done = time.monotonic()
    cpu = meter.figures()
    stats = worker.stats()
    ideal = (push_end - t_start) + sleep_s
    figures = {
        "total_s": r(t_done - t_start, 3) if idle else None,
        "push_s": r(push_end - t_start, 3),
        "ideal_s": r(ideal, 3),
        "overhead_s": r(t_done - t_start - ideal, 3) if idle else None,
        "max_concurrency": stats["maxConcurrency"],
        "pushes_per_s": r(len(acked) / (push_end - t_start)),
        "errors": n - len(acked) + (0 if idle else 1),
        "client_cpu": r(res.cpu, 2),
    }
    figures.update(cpu)
    figures.update(delivery_figures(acked, arrivals))
    return figures


def populate(ctx, side, scenario):
    """A server holding n finished jobs; shared by memory and list within one round."""
    n = ctx.n(scenario)
    config = ctx.config(scenario, n, side)
    key = (side, n, json.dumps(config, sort_keys=True))
    if key in ctx.populated:
        return ctx.populated[key]
    worker = ctx.worker()
    server = ctx.server(side, scenario, config, keep=True)
    gevent.sleep(0.5)  # let start-up allocations settle before the idle reading
    rss0 = server.rss()
    t0 = time.monotonic()
    t_end = t0 + ctx.opts.timeout
    res, acked = push(server, worker, n, ctx.opts, ctx.opts.timeout)
    arrivals = wait_delivered(worker, server, [i for _, i in acked], t_end)
    idle = wait_idle(server, t_end)
    fill_rate = len(acked) / (time.monotonic() - t0)
    info = {"server": server, "n": n, "rss0": rss0, "acked": acked, "arrivals": arrivals, "idle": idle, "fill_rate": fill_rate}
    ctx.populated[key] = info
    return info


def sc_memory(ctx, side):
    """RSS per stored job after n jobs; then restart: time to first answer and RSS reloaded."""
    info = populate(ctx, side, "memory")
    server, n = info["server"], info["n"]
    rss1 = server.rss()
    t0 = time.monotonic()
    server.stop()
    stop_s = time.monotonic() - t0
    restart_s = server.start()
    code, stats = server.get_json("/stats")
    gevent.sleep(0.5)
    rss2 = server.rss()
    figures = {
        "fill_jobs_per_s": r(info["fill_rate"]),  # pushing and running the n jobs, e2e at this size
        "rss_idle_mb": r(info["rss0"] / 2**20),
        "rss_mb": r(rss1 / 2**20),
        "bytes_per_job": r((rss1 - info["rss0"]) / n, 0),
        "stop_s": r(stop_s, 3),  # SIGTERM to exit, nothing in flight
        "restart_s": r(restart_s, 3),  # exec to the first answer, the log replayed
        "rss_restarted_mb": r(rss2 / 2**20),
        "jobs_after_restart": stats.get("numJobs"),
        "errors": n - len(info["acked"]) + (0 if info["idle"] else 1) + (0 if stats.get("numJobs") == n else 1),
    }
    figures.update(delivery_figures(info["acked"], info["arrivals"]))
    return figures


# (label, path, how many jobs the page must hold given n stored jobs; odd i are named foo-*).
# The last three match nothing, so each request scans every stored job: the case where a slow
# regex engine or a scan that never yields would stall the server (hardening issue, item 1).
# A server may match a plain (anchored) word without its regex engine, or remember its answer
# per distinct name (the bench's jobs have 20 names); the last one is an alternation over `term`,
# which includes each job's own id and url, so it shows what the engine itself costs per job.
LIST_QUERIES = [
    ("first100", "/job?limit=100", lambda n: min(100, n)),
    ("reverse100", "/job?limit=100&reverse=true", lambda n: min(100, n)),
    ("name_foo", "/job?limit=100&name=%5Efoo", lambda n: min(100, n // 2)),
    ("nomatch_scan", "/job?limit=100&name=%5Enomatch-", lambda n: 0),
    ("term_nomatch_scan", "/job?limit=100&term=%5Enomatch-", lambda n: 0),
    ("regex_nomatch_scan", "/job?limit=100&term=" + quote("^(nomatch|nohit)-[0-9]+$", safe=""), lambda n: 0),
]


def sc_list(ctx, side):
    """Latency of `GET /job` pages over n stored jobs, and of `GET /` asked alongside each.

    For each query: p50/p99 of the list request, and the slowest `GET /` that a second
    connection, asking every 5 ms, got while the list requests ran (a scan must not stall it).
    """
    info = populate(ctx, side, "list")
    server, n = info["server"], info["n"]
    figures, errors = {}, 0
    for label, path, want in LIST_QUERIES:
        raw = load.build_request("GET", path, headers=server.auth)
        conn = load.Conn(HOST, server.port, timeout=60)
        times, root_times, running = [], [], [True]
        poller = gevent.spawn(poll_root, server, root_times, running)
        t_stop = time.monotonic() + ctx.opts.list_seconds
        try:
            while len(times) < ctx.opts.list_reps and (len(times) < 3 or time.monotonic() < t_stop):
                t0 = time.monotonic()
                status, body = conn.request(raw)
                times.append(time.monotonic() - t0)
                if status != 200 or len(json.loads(body)["jobs"]) != want(n):
                    errors += 1
        finally:
            running[0] = False
            poller.join(65)
            poller.kill()
            conn.close()
        figures[f"{label}_p50_ms"] = ms(statistics.median(times))
        figures[f"{label}_p99_ms"] = ms(load.percentile(times, 99))
        figures[f"{label}_root_max_ms"] = ms(max(root_times, default=None))
    figures["errors"] = errors + n - len(info["acked"])
    return figures


def poll_root(server, times, running):
    """`GET /` every 5 ms on its own connection while running[0]; appends each latency to times."""
    raw = load.build_request("GET", "/", headers=server.auth)
    conn = load.Conn(HOST, server.port, timeout=60)
    try:
        while running[0]:
            t0 = time.monotonic()
            conn.request(raw)
            times.append(time.monotonic() - t0)
            gevent.sleep(0.005)
    finally:
        conn.close()


def sc_schedule(ctx, side):
    """n jobs with `runAt` spread evenly over --schedule-spread seconds (SPEC §10.2).

    The window opens `lead` seconds after pushing starts, so that the RSS per scheduled job is
    read right after pushing, before any job is due. Unless --schedule-lead fixes it, the lead is
    1.5 x the push time expected from a calibration push first (n/20 jobs, at least 100, due in an
    hour: they count in the RSS figure, then are stopped, and must never reach the worker).
    Lateness of a start = its arrival at the worker minus its runAt (minus its push, for a job
    pushed after its runAt had passed).
    """
    n = ctx.n("schedule")
    opts = ctx.opts
    worker = ctx.worker()
    server = ctx.server(side, "schedule", ctx.config("schedule", n, side))
    batch = opts.batch_size if supports_batch(server) else None
    conc = opts.batch_concurrency if batch else None
    spread = opts.schedule_spread
    gevent.sleep(0.5)  # let start-up allocations settle before the idle reading
    rss0 = server.rss()
    meter = CpuMeter(server=server.proc, worker=worker.proc).start()
    calibration, lead = [], opts.schedule_lead
    if lead is None:
        later = rfc3339_ms(time.time_ns() // 1_000_000 + 3600_000)
        jobs = [job_dict(worker, n + i, runAt=later) for i in range(min(n, max(100, n // 20)))]
        res, acked = push_jobs(server, jobs, opts, opts.timeout, batch, conc)
        calibration = [job_id for _, job_id, _ in acked]
        lead = 2.0 + 1.5 * n * res.elapsed / max(1, len(calibration))
    # One reading of both clocks: runAt is wall time on the wire, the worker's arrivals are monotonic.
    wall0_ms, mono0 = time.time_ns() // 1_000_000, time.monotonic()
    run_at_ms = [wall0_ms + int((lead + spread * i / n) * 1000) for i in range(n)]
    run_at_mono = [mono0 + (t - wall0_ms) / 1000.0 for t in run_at_ms]
    jobs = [job_dict(worker, i, runAt=rfc3339_ms(t)) for i, t in enumerate(run_at_ms)]
    res, acked = push_jobs(server, jobs, opts, opts.timeout, batch, conc)
    push_end = time.monotonic()
    rss1, t_rss = server.rss(), time.monotonic()
    code, stats = server.get_json("/stats")
    stops = [load.build_request("POST", f"/job/{job_id}/stop", None, server.auth) for job_id in calibration]
    stopped = load.run(HOST, server.port, stops, opts.concurrency, opts.timeout)
    t_start = min((sent for sent, _, _ in acked), default=push_end)
    arrivals = wait_delivered(worker, server, [job_id for _, job_id, _ in acked], mono0 + lead + spread + opts.timeout,
                              quiet_until=mono0 + lead + spread)
    cpu = meter.figures()
    late, early, pushed_after_due, due = [], 0, 0, []
    for sent, job_id, i in acked:
        pushed_after_due += sent > run_at_mono[i]
        if job_id in arrivals:
            arrived = arrivals[job_id][1]
            early += arrived < run_at_mono[i] - 0.01  # 10 ms: the two clocks were read a moment apart
            late.append(arrived - max(run_at_mono[i], sent))
            due.append((max(run_at_mono[i], sent), arrived))
    due.sort()
    rate = len(due) / (max(a for _, a in due) - due[0][0]) if len(due) > 1 else None
    figures = {
        "push_batch_size": batch or 1,
        "lead_s": r(lead, 3),
        "spread_s": spread,
        "pushes_per_s": r(len(acked) / (push_end - t_start)) if acked else None,
        "push_s": r(push_end - t_start, 3),
        "rss_idle_mb": r(rss0 / 2**20),
        "rss_mb": r(rss1 / 2**20),
        "bytes_per_scheduled_job": r((rss1 - rss0) / (n + len(calibration)), 0),
        # Jobs already due when RSS was read (their records may have grown): 0 for a clean figure.
        "due_before_rss": sum(1 for t in run_at_mono if t <= t_rss),
        "scheduled_at_rss": stats.get("numScheduledJobs") if code == 200 else None,
        "pushed_after_due": pushed_after_due,
        "lateness_p50_ms": ms(load.percentile(late, 50)),
        "lateness_p99_ms": ms(load.percentile(late, 99)),
        "lateness_max_ms": ms(max(late, default=None)),
        # Starts per second from the first due time to the last start, against n / spread due per
        # second: a server slower than the due rate falls behind, and its lateness grows through
        # the window. overtaken: how long after a job due later than it had started a job started,
        # so a job held back by the timer shows even when the server as a whole is behind.
        "starts_per_s": r(rate),
        "due_per_s": r(n / spread),
        "overtaken_p99_ms": ms(load.percentile(overtaken(due), 99)),
        "overtaken_max_ms": ms(max(overtaken(due), default=None)),
        "early": early,
        "errors": n - len(acked) + early + len(calibration) - sum(1 for st in stopped.status if st == 200),
        "client_cpu": r(res.cpu, 2),
    }
    figures.update(cpu)
    figures.update(delivery_figures([(sent, job_id) for sent, job_id, _ in acked], arrivals))
    return figures


def overtaken(due):
    """For (due time, start) pairs sorted by due time: each start minus the earliest start of a job due strictly later (or 0)."""
    out, earliest_later, k = [], float("inf"), len(due)
    while k > 0:
        j = k
        while j > 0 and due[j - 1][0] == due[k - 1][0]:  # the jobs due at this same time
            j -= 1
        out.extend(max(0.0, started - earliest_later) for _, started in due[j:k])
        earliest_later = min([earliest_later] + [started for _, started in due[j:k]])
        k = j
    return out


def sc_batch(ctx, side):
    """Durable jobs/s acknowledged by `POST /jobs` with --batch-size jobs each; then e2e with batch pushes.

    The push part (dispatchers=2, max_workers=0, as push) checks that every acknowledged job is
    still stored after a restart; the e2e part (2 x 100, as e2e) runs on a fresh server.
    """
    n = ctx.n("batch")
    opts = ctx.opts
    worker = ctx.worker()
    server = ctx.server(side, "batch", ctx.config("batch", n, side))
    jobs = [job_dict(worker, i) for i in range(n)]
    meter = CpuMeter(server=server.proc, worker=worker.proc).start()
    res, acked = push_jobs(server, jobs, opts, opts.timeout, opts.batch_size, opts.batch_concurrency)
    cpu = meter.figures()
    t_start = min((sent for sent, _, _ in acked), default=0.0)
    push_end = max((sent + lat for sent, lat in zip(res.sent, res.latency) if lat is not None), default=t_start)
    lat = res.latencies()
    # Durable means still there after a restart: stop, start on the same data, read every id back.
    server.stop()
    server.start()
    stored = stored_jobs(server, time.monotonic() + opts.timeout)
    acked_ids = {job_id for _, job_id, _ in acked}
    figures = {
        "jobs_per_s": r(len(acked) / (push_end - t_start)) if push_end > t_start else None,
        "batch_p50_ms": ms(load.percentile(lat, 50)),
        "batch_p99_ms": ms(load.percentile(lat, 99)),
        "client_cpu": r(res.cpu, 2),
    } | cpu
    figures["lost"] = len(acked_ids - set(stored))
    figures["unexpected"] = len(set(stored) - acked_ids)
    figures["push_errors"] = n - len(acked)
    server.stop()
    worker.close()
    e2e = run_e2e(ctx, side, "batch", ctx.config("batch", n, side, base="batch_e2e"), n, opts.batch_size)
    figures.update({f"e2e_{k}": v for k, v in e2e.items() if k not in ("lost", "duplicates", "unexpected", "errors")})
    figures["lost"] += e2e["lost"]
    figures["unexpected"] += e2e["unexpected"]
    figures["duplicates"] = e2e["duplicates"]
    figures["errors"] = figures.pop("push_errors") + e2e["errors"]
    return figures


def sc_retry(ctx, side):
    """n jobs with RETRY_POLICY against a worker that fails each job twice, then answers 200.

    Completion time (first push to the worker's last first success) against the ideal: 3n
    requests at this server's e2e rate (measured here first, n plain jobs on a fresh server)
    plus the longest backoff waits of one job. Every job must end `success` after 3 attempts,
    with one success at the worker and `X-Hq-Attempt` counting its requests.
    """
    n = ctx.n("retry")
    opts = ctx.opts
    config = ctx.config("retry", n, side)
    reference = run_e2e(ctx, side, "retry", config, n)
    ctx.stop_run_objs()  # the reference's processes must not take CPU from the measured run
    worker = ctx.worker(fail_first=RETRY_FAILS)
    server = ctx.server(side, "retry", config)
    jobs = [job_dict(worker, i, retry=RETRY_POLICY) for i in range(n)]
    t_end = time.monotonic() + opts.timeout
    meter = CpuMeter(server=server.proc, worker=worker.proc).start()
    res, acked = push_jobs(server, jobs, opts, opts.timeout)
    t_start = min((sent for sent, _, _ in acked), default=time.monotonic())
    done = wait_succeeded(worker, server, len(acked), t_end) if acked else False
    t_done = time.monotonic()
    cpu = meter.figures()
    wait_idle(server, t_end)
    stored = stored_jobs(server, t_end)
    successes, stats = worker.successes(), worker.stats()
    acked_ids = {job_id for _, job_id, _ in acked}
    rate = reference["jobs_per_s"]
    ideal = (RETRY_FAILS + 1) * n / rate + RETRY_WAITS_S if rate else None
    total = t_done - t_start if done else None
    not_success = sum(1 for job_id in acked_ids if (stored.get(job_id) or (None,))[0] != "success")
    wrong_attempts = sum(1 for job_id in acked_ids if (stored.get(job_id) or (None, None))[1] != RETRY_FAILS + 1)
    figures = {
        "total_s": r(total, 3),
        "ideal_s": r(ideal, 3),
        "vs_ideal": r(total / ideal, 2) if total and ideal else None,
        "e2e_jobs_per_s": rate,  # the reference: n plain jobs, same config
        "requests": stats["requests"],  # worker requests: (RETRY_FAILS + 1) x n when all is well
        "requests_per_s": r(stats["requests"] / total) if total else None,
        "pushes_per_s": r(len(acked) / res.elapsed) if res.elapsed else None,
        "lost": sum(1 for job_id in acked_ids if job_id not in successes),
        "duplicates": sum(c - 1 for c in successes.values()),  # a job's success answered twice
        "unexpected": sum(1 for job_id in successes if job_id not in acked_ids),
        "attempt_mismatches": stats["attemptMismatches"],
        "not_success": not_success,
        "wrong_attempts": wrong_attempts,
        "errors": n - len(acked) + (0 if done else 1) + stats["attemptMismatches"] + not_success + wrong_attempts
                  + reference["errors"] + reference["lost"] + reference["duplicates"],
        "client_cpu": r(res.cpu, 2),
    }
    figures.update(cpu)
    return figures


def sc_many_scheduled(ctx, side):
    """Do n jobs scheduled an hour ahead slow pushes and lists down (issue 11: a million must not)?

    Push p50/p99 and list p50 on the fresh server, then after n scheduled jobs were pushed (in
    batches of identical jobs), then RSS per scheduled job and a restart with them in the log.
    Opt-in (not in the default set): at the full size the server holds a million jobs.
    """
    n = ctx.n("many_scheduled")
    opts = ctx.opts
    worker = ctx.worker()
    server = ctx.server(side, "many_scheduled", ctx.config("many_scheduled", n, side))
    batch = opts.batch_size if supports_batch(server) else 1
    gevent.sleep(0.5)
    rss0 = server.rss()
    figures = {}
    for phase in ("empty", "loaded"):
        if phase == "loaded":
            later = rfc3339_ms(time.time_ns() // 1_000_000 + 3600_000)
            job = {"url": f"{worker.url}/job", "name": "later", "payload": {"i": 0}, "runAt": later}
            body = json.dumps([job] * batch if batch > 1 else job, separators=(",", ":")).encode()
            raw = load.build_request("POST", "/jobs" if batch > 1 else "/job", body, json_headers(server))
            count = -(-n // batch)  # whole batches: n rounded up
            res_fill = load.run(HOST, server.port, [raw] * count, opts.batch_concurrency, opts.timeout)
            figures["fill_jobs_per_s"] = r(res_fill.done * batch / res_fill.elapsed) if res_fill.elapsed else None
            figures["errors"] = count - sum(1 for st in res_fill.status if st == 200)
            rss1 = server.rss()
        pushes = [load.build_request("POST", "/job", json.dumps(job_dict(worker, i)).encode(), json_headers(server))
                  for i in range(2000)]
        res = load.run(HOST, server.port, pushes, opts.concurrency, opts.timeout)
        figures[f"{phase}_push_p50_ms"] = ms(load.percentile(res.latencies(), 50))
        figures[f"{phase}_push_p99_ms"] = ms(load.percentile(res.latencies(), 99))
        figures[f"{phase}_pushes_per_s"] = r(res.rate)
        for label, path in (("first100", "/job?limit=100"), ("reverse100", "/job?limit=100&reverse=true"),
                            ("stats", "/stats")):
            times = []
            for _ in range(10):
                t0 = time.monotonic()
                server.get_json(path)
                times.append(time.monotonic() - t0)
            figures[f"{phase}_{label}_p50_ms"] = ms(statistics.median(times))
    code, stats = server.get_json("/stats")
    scheduled = stats.get("numScheduledJobs")
    figures["scheduled"] = scheduled
    figures["bytes_per_scheduled_job"] = r((rss1 - rss0) / (-(-n // batch) * batch), 0)
    figures["push_p99_loaded_vs_empty"] = r(figures["loaded_push_p99_ms"] / figures["empty_push_p99_ms"], 2) \
        if figures.get("empty_push_p99_ms") else None
    server.stop()
    figures["restart_s"] = r(server.start(), 3)  # exec to the first answer, the timer structure rebuilt
    code, stats = server.get_json("/stats")
    figures["scheduled_after_restart"] = stats.get("numScheduledJobs")
    # Every acknowledged job still scheduled after the restart (numScheduledJobs: SPEC §10.5).
    figures["lost"] = sum(1 for st in res_fill.status if st == 200) * batch - (stats.get("numScheduledJobs") or 0)
    return figures


def wrk(url, seconds, concurrency, workdir, post=None, headers=None):
    """wrk's requests/s and p50/p99 (s), or None when wrk is not installed. `post`: a JSON body."""
    if not shutil.which("wrk"):
        return None
    cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--latency"]
    for name, value in (headers or {}).items():
        cmd += ["-H", f"{name}: {value}"]
    if post is not None:
        script = Path(workdir) / "post.lua"
        lua_body = json.dumps(post.decode())  # a JSON string literal is a valid Lua string literal here
        script.write_text(f'wrk.method = "POST"\nwrk.body = {lua_body}\nwrk.headers["Content-Type"] = "application/json"\n')
        cmd += ["-s", str(script)]
    proc = spawn(cmd + [url], Path(workdir) / "wrk.log", stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=seconds + 30)
    children.remove(proc)
    text = out.decode()
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if not m:
        raise RuntimeError(f"cannot read wrk output:\n{text}")
    refused = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    if refused:  # wrk counts every answer in its rate, a 401 or 503 too: such a rate means nothing
        log(f"wrk got {refused.group(1)} non-2xx answers from {url}; its figure is left out")
        return None

    def lat(p):
        mm = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        if not mm:
            return None
        return float(mm.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[mm.group(2)]

    return float(m.group(1)), lat(50), lat(99)


def fsync_latency(workdir, seconds):
    """p50/p99 of append + fsync on the data dirs' filesystem: the floor under a durable push."""
    times = []
    path = Path(workdir) / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        stop_at = time.monotonic() + seconds
        while len(times) < 1000 and (len(times) < 10 or time.monotonic() < stop_at):
            t0 = time.monotonic()
            os.write(fd, b'{"probe": "a job record of about this size, give or take a few bytes"}\n')
            os.fsync(fd)
            times.append(time.monotonic() - t0)
    finally:
        os.close(fd)
        path.unlink()
    return load.percentile(times, 50), load.percentile(times, 99)


def sc_baseline(ctx, side):
    """The machine's limit: the bench client vs wrk against a trivial gevent.pywsgi app and the worker."""
    secs, conc = ctx.opts.baseline_seconds, ctx.opts.concurrency
    p50, p99 = fsync_latency(ctx.workdir, min(secs, 2.0))
    figures = {"fsync_p50_ms": ms(p50), "fsync_p99_ms": ms(p99)}
    get_raw = load.build_request("GET", "/")
    post_raw = load.build_request("POST", "/job", b'{"i":1}', {"Content-Type": "application/json"})
    for label, trivial, raw in (("trivial", True, get_raw), ("worker", False, post_raw)):
        app = ctx.worker(trivial=trivial)
        meter = CpuMeter(app=app.proc).start()
        rps, p50, p99, cpu, errors = load.run_for(HOST, app.port, raw, secs, conc)
        figures[f"{label}_client_rps"] = r(rps)
        figures[f"{label}_client_p50_ms"] = ms(p50)
        figures[f"{label}_client_cpu"] = r(cpu, 2)
        # The app's own CPU share under each client: ~1.0 means the app, not the client, is the limit.
        figures[f"{label}_app_cpu_client"] = meter.figures()["app_cpu"]
        meter.start()
        w = wrk(f"{app.url}/" if trivial else f"{app.url}/job", secs, conc, ctx.workdir, post=None if trivial else b'{"i":1}')
        figures[f"{label}_wrk_rps"] = r(w[0]) if w else None
        figures[f"{label}_wrk_p50_ms"] = ms(w[1]) if w else None
        figures[f"{label}_app_cpu_wrk"] = meter.figures()["app_cpu"] if w else None
        # Near 1.0: the bench client drives the app as hard as wrk does, so it is not the limit.
        figures[f"{label}_client_vs_wrk"] = r(rps / w[0], 2) if w else None
        figures["errors"] = figures.get("errors", 0) + errors
        app.close()
    ctx.baseline_rps = figures["trivial_client_rps"]
    return figures


RUNNERS = {
    "baseline": sc_baseline, "push": sc_push, "e2e": sc_e2e, "slow": sc_slow, "memory": sc_memory, "list": sc_list,
    "schedule": sc_schedule, "batch": sc_batch, "retry": sc_retry, "many_scheduled": sc_many_scheduled,
}


# --- orchestration --------------------------------------------------------------------------

class Context:
    def __init__(self, opts, workdir, sides):
        self.opts = opts
        self.workdir = Path(workdir)
        self.sides = sides  # {"A": Side, "B": Side (with --compare)}
        self.sizes = dict(SIZES["quick" if opts.quick else "full"])
        self.sizes.update(opts.sizes)
        self.populated = {}
        self._run_objs = []
        self._seq = 0
        self.baseline_rps = None  # set by this round's baseline, if it runs

    def n(self, scenario):
        return self.sizes[scenario]

    def config(self, scenario, n, side="A", base=None):
        """The scenario's server config (CONFIGS[base or scenario]), then --set, then the side's own."""
        cfg = dict(CONFIGS[base or scenario])
        if cfg.get("max_workers", 0) is None:
            cfg["max_workers"] = max(n, 1)
        cfg["queues"] = max(8192, n)  # a queue that holds the whole run, for every server alike
        for key, value in self.opts.set + self.sides[side].sets:
            scope, _, name = key.rpartition(".")
            if not scope or scope == scenario:
                cfg[name] = value
        return cfg

    def worker(self, sleep_ms=0, trivial=False, fail_first=0):
        self._seq += 1
        w = Worker(self.workdir, sleep_ms, trivial, name=f"worker{self._seq}", fail_first=fail_first)
        log(f"started worker{self._seq} pid {w.proc.pid}")
        self._run_objs.append(w)
        return w

    def server(self, side, scenario, config, keep=False):
        self._seq += 1
        srv = Server(self.sides[side], self.workdir, f"{scenario}-{side}-{self._seq}", config, self.opts.profile)
        srv.start()
        if not keep:
            self._run_objs.append(srv)
        return srv

    def stop_run_objs(self):
        """Stop this run's processes so far (their data dirs go at end_run)."""
        for obj in self._run_objs:
            obj.stop() if isinstance(obj, Server) else obj.close()

    def end_run(self):
        """Stop the processes of one scenario run and drop its data dirs."""
        for obj in self._run_objs:
            obj.stop() if isinstance(obj, Server) else obj.close()
            if isinstance(obj, Server) and not self.opts.keep:
                shutil.rmtree(obj.data_dir, ignore_errors=True)
        self._run_objs = []

    def end_round(self):
        for info in self.populated.values():
            info["server"].stop()
            if not self.opts.keep:
                shutil.rmtree(info["server"].data_dir, ignore_errors=True)
        self.populated = {}


def median_figures(runs):
    out = {}
    for key in runs[0]:
        values = [run[key] for run in runs if run.get(key) is not None]
        if not values:
            out[key] = None
        elif key in ("lost", "duplicates", "unexpected", "errors"):
            out[key] = sum(values)  # correctness counts add up; a single lost job must show
        else:
            out[key] = r(statistics.median(values), 3)
    return out


def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3f}".rstrip("0").rstrip(".") if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def print_table(results, compare):
    rows = []
    for res in results:
        if compare:
            a, b = res["a"]["figures"], res["b"]["figures"]
            for key in a:
                better = "lower" if LOWER_IS_BETTER.search(key) else "higher"
                rows.append((res["scenario"], key, fmt(a[key]), fmt(b.get(key)), fmt(res["ratio"].get(key)), better))
        else:
            for key, value in res["figures"].items():
                rows.append((res["scenario"], key, fmt(value)))
    head = ("scenario", "figure", "A", "B", "A/B", "better") if compare else ("scenario", "figure", "value")
    widths = [max(len(str(row[i])) for row in rows + [head]) for i in range(len(head))]
    for row in [head] + rows:
        print("  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))))


def parse_sizes(text):
    """`--n 500` sets every scenario; `--n push=5000,list=100000` sets some."""
    if text is None:
        return {}
    if "=" not in text:
        sizes = {name: int(text) for name in SIZES["full"]}
    else:
        sizes = {}
        for part in text.split(","):
            name, _, value = part.partition("=")
            if name not in SIZES["full"]:
                raise argparse.ArgumentTypeError(f"unknown scenario in --n: {name}")
            sizes[name] = int(value)
    if any(n < 1 for n in sizes.values()):
        raise argparse.ArgumentTypeError("--n wants at least 1 job")
    return sizes


def parse_set(text):
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError("--set wants KEY=VALUE")
    try:
        value = json.loads(value)
    except ValueError:
        pass  # a bare string
    return key, value


def flavor_of(template, flavor):
    if flavor != "auto":
        return flavor
    return "hq-gevent" if re.search(r"hq[-_]gevent", template) else "hq1"


def build_parser():
    p = argparse.ArgumentParser(prog="python3 -m bench", description="Load-test an HQ-compatible job queue server.")
    p.add_argument("scenarios", nargs="*",
                   help=f"which to run (default: all): {' '.join(SCENARIOS)}; opt-in: {' '.join(OPT_IN)}")
    p.add_argument("--server", default=DEFAULT_SERVER, help="server command template with {config} (default: hq-gevent)")
    p.add_argument("--compare", help="a second server command template (`same`: side A's command and checkout); runs A and B alternately")
    for side, opt in (("A", "server"), ("B", "compare")):
        p.add_argument(f"--{opt}-dir", metavar="DIR", help=f"side {side} imports hq_gevent from this checkout (and runs in it)")
        p.add_argument(f"--{opt}-ref", metavar="REF", help=f"side {side} runs this commit of this repository (exported with git archive)")
        p.add_argument(f"--set-{side.lower()}", action="append", type=parse_set, default=[], metavar="[SCENARIO.]KEY=VALUE",
                       help=f"like --set, for side {side} only")
    p.add_argument("--secure", choices=["A", "B"], action="append", default=[],
                   help="that side's servers get an API token (which the bench's clients send) and a signing secret")
    p.add_argument("--server-flavor", default="auto", choices=["auto", "hq-gevent", "hq1"],
                   help="hq1 omits config keys a 1.x server does not know (auto: by the command's name)")
    p.add_argument("--compare-flavor", default="auto", choices=["auto", "hq-gevent", "hq1"])
    p.add_argument("--rounds", type=int, default=None, help="runs per scenario and server (default 1; 3 with --compare)")
    p.add_argument("--quick", action="store_true", help="small sizes (seconds per scenario)")
    p.add_argument("--n", dest="sizes", type=parse_sizes, default={}, help="jobs: N for every scenario, or name=N,...")
    p.add_argument("--set", action="append", type=parse_set, default=[], metavar="[SCENARIO.]KEY=VALUE",
                   help="override a server config key (value as JSON, else a string)")
    p.add_argument("--concurrency", type=int, default=64, help="client connections (default 64)")
    p.add_argument("--batch-size", type=int, default=100, help="jobs per POST /jobs in batch and schedule (default 100)")
    p.add_argument("--batch-concurrency", type=int, default=16, help="client connections for batch pushes (default 16)")
    p.add_argument("--schedule-spread", type=float, default=10.0, help="seconds the schedule scenario's runAt spread over (default 10)")
    p.add_argument("--schedule-lead", type=float, default=None,
                   help="seconds from the first push to the first runAt (default: 2 + the expected push time)")
    p.add_argument("--slow-ms", type=float, default=1000, help="worker hold time in the slow scenario (default 1000)")
    p.add_argument("--baseline-seconds", type=float, default=None, help="per baseline measurement (default 3; 1 with --quick)")
    p.add_argument("--list-reps", type=int, default=20, help="max repetitions per list query")
    p.add_argument("--list-seconds", type=float, default=5, help="time budget per list query (at least 3 repetitions)")
    p.add_argument("--timeout", type=float, default=600, help="bound on each scenario's pushing and waiting (s)")
    p.add_argument("--json", dest="json_out", help="also append the JSON lines to this file")
    p.add_argument("--store", choices=["wal", "postgresql"], default="wal",
                   help="postgresql: durable push/s and e2e jobs/s of the PostgreSQL store with 1 and 2 servers and "
                        "of the WAL store, in one run, on a throwaway PostgreSQL cluster (bench/pg.py)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs)")
    p.add_argument("--profile", metavar="DIR", help="sample every server with py-spy; raw stacks and top frames go to DIR")
    return p


def main(argv=None):
    opts = build_parser().parse_args(argv)
    for name in opts.scenarios:
        if name not in SCENARIOS + OPT_IN:
            build_parser().error(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS + OPT_IN)}")
    scenarios = [s for s in SCENARIOS + OPT_IN if s in (opts.scenarios or SCENARIOS)]
    opts.compare_same = opts.compare == "same"
    if opts.compare_same:
        opts.compare = opts.server
        if opts.compare_dir or opts.compare_ref:
            build_parser().error("--compare same runs side A's checkout; give --compare-dir/--compare-ref with a command instead")
    if not opts.compare and (opts.compare_dir or opts.compare_ref):
        opts.compare = DEFAULT_SERVER
    if not opts.compare and (opts.set_b or "B" in opts.secure):
        build_parser().error("--set-b and --secure B need --compare (`--compare same`: the same command as --server)")
    for side, opt in (("A", "server"), ("B", "compare")):
        if getattr(opts, f"{opt}_dir") and getattr(opts, f"{opt}_ref"):
            build_parser().error(f"give --{opt}-dir or --{opt}-ref, not both")
    if opts.rounds is None:
        opts.rounds = 3 if opts.compare else 1
    if opts.compare and opts.rounds < 3:
        build_parser().error("--compare needs --rounds >= 3")
    if opts.baseline_seconds is None:
        opts.baseline_seconds = 1.0 if opts.quick else 3.0
    opts.server_flavor = flavor_of(opts.server, opts.server_flavor)
    if opts.compare:
        opts.compare_flavor = flavor_of(opts.compare, opts.compare_flavor)
    if opts.profile:
        if not shutil.which("py-spy"):
            build_parser().error("--profile needs py-spy (python3 -m pip install py-spy)")
        os.makedirs(opts.profile, exist_ok=True)
        opts.profile = os.path.abspath(opts.profile)

    if opts.store == "postgresql":
        from bench import pg

        workdir = tempfile.mkdtemp(prefix="hq-bench-pg-")
        try:
            return pg.main(opts, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    main_greenlet = gevent.getcurrent()
    # SIGTERM behaves like Ctrl-C: unwind through the finally below, which kills every child.
    def interrupted():
        log("got SIGTERM")
        main_greenlet.throw(KeyboardInterrupt)

    gevent.signal_handler(signal.SIGTERM, interrupted)
    workdir = tempfile.mkdtemp(prefix="hq-bench-")
    try:
        sides = make_sides(opts, workdir)
    except (RuntimeError, OSError) as exc:
        log(f"error: {exc}")
        shutil.rmtree(workdir, ignore_errors=True)
        return 1
    for side in sides.values():
        log(f"side {side.label}: {side.template} in {side.root or ROOT} at {side.commit}")
    ctx = Context(opts, workdir, sides)
    about = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine()}
    runs = {s: {side: [] for side in ctx.sides} for s in scenarios}
    status = None
    try:
        for rnd in range(opts.rounds):
            for scenario in scenarios:
                # baseline measures the machine, not a server: once per round.
                for side in (["A"] if scenario == "baseline" else ctx.sides):
                    log(f"{scenario} [{side}] round {rnd + 1}/{opts.rounds}")
                    try:
                        figures = RUNNERS[scenario](ctx, side)
                    finally:
                        ctx.end_run()
                    runs[scenario][side].append(figures)
                    log(f"{scenario} [{side}] round {rnd + 1}: {json.dumps(figures, separators=(',', ':'))}")
            ctx.end_round()
    except KeyboardInterrupt:
        log("interrupted; stopping child processes (the runs that finished are reported)")
        status = 130
    except (RuntimeError, OSError) as exc:  # a server that would not start, or went away: say why
        log(f"error: {exc}")
        if not opts.keep:
            log("rerun with --keep to keep the configs and the servers' logs")
        status = 1
    finally:
        ctx.end_run()
        cleanup()
        if opts.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    about["machine"]["load_avg_at_end"] = round(os.getloadavg()[0], 2)  # other agents may come and go meanwhile
    results = summarize(ctx, runs, about)
    if results:
        report(results, opts, about)
    if status is not None:
        return status
    # Exit 2 when any run lost, duplicated or failed something, so CI and scripts can gate on it.
    bad = any(
        (figs.get(k) or 0) > 0
        for res in results
        for figs in [res.get("figures") or {}, (res.get("a") or {}).get("figures") or {}, (res.get("b") or {}).get("figures") or {}]
        for k in ("lost", "duplicates", "unexpected", "errors")
    )
    return 2 if bad else 0


def make_sides(opts, workdir):
    """Side A (--server) and, with --compare, side B: command, checkout, config overrides."""
    sides = {}
    for label, opt in (("A", "server"), ("B", "compare")):
        template = getattr(opts, opt)
        if not template:
            continue
        root, commit = getattr(opts, f"{opt}_dir"), None
        if label == "B" and opts.compare_same:  # the same server: side A's command and checkout
            root, commit = sides["A"].root, sides["A"].commit
        elif root:
            root = Path(root).resolve()
            if not (root / "hq_gevent").is_dir():
                raise RuntimeError(f"--{opt}-dir {root}: no hq_gevent package there")
        elif getattr(opts, f"{opt}_ref"):
            root = Path(workdir) / f"src-{label}"
            commit = export_ref(getattr(opts, f"{opt}_ref"), root)
        sets = getattr(opts, f"set_{label.lower()}")
        if label in opts.secure:
            sets = [("auth_tokens", [BENCH_TOKEN]), ("signing_secrets", [BENCH_SIGNING_SECRET])] + sets
        sides[label] = Side(label, template, getattr(opts, f"{opt}_flavor"), root, sets, commit)
    return sides


def summarize(ctx, runs, about):
    """One result per scenario that ran: medians (and A/B ratios) over its rounds."""
    opts, results = ctx.opts, []
    for scenario, by_side in runs.items():
        if not by_side["A"]:
            continue
        res = {"scenario": scenario, "rounds": len(by_side["A"])}
        if scenario != "baseline":
            res["n"] = ctx.n(scenario)
            for side, key in (("A", "config"), ("B", "config_b")):
                if side in ctx.sides:
                    for suffix, base in [("", None)] + ([("_e2e", "batch_e2e")] if scenario == "batch" else []):
                        cfg = server_config(ctx.sides[side].flavor, ctx.config(scenario, res["n"], side, base))
                        res[key + suffix] = {k: v for k, v in cfg.items() if v is not None}
        a = median_figures(by_side["A"])
        if by_side.get("B"):
            b = median_figures(by_side["B"])
            res["a"] = ctx.sides["A"].describe() | {"figures": a, "runs": by_side["A"]}
            res["b"] = ctx.sides["B"].describe() | {"figures": b, "runs": by_side["B"]}
            res["ratio"] = {k: (r(a[k] / b[k], 3) if a[k] is not None and b.get(k) else None) for k in a}
        else:
            if scenario == "baseline":
                res["server"] = None
            else:
                res.update(ctx.sides["A"].describe())
            res["figures"] = a
            if len(by_side["A"]) > 1:
                res["runs"] = by_side["A"]
        results.append(res | about)
    return results


def report(results, opts, about):
    """The table on stdout, then one JSON line per scenario (also appended to --json)."""
    m = about["machine"]
    print(f"# {about['when']}  {m['cpu']} x{m['cores']}, {m['mem_gib']} GiB, Linux {m['kernel']}, "
          f"Python {m['python']}, gevent {m['gevent']}, {m['tmp_fs']}, load {m['load_avg_at_start']} -> {m.get('load_avg_at_end')}")
    plain = [res for res in results if "ratio" not in res]
    compared = [res for res in results if "ratio" in res]
    if plain:
        print_table(plain, False)
    if plain and compared:
        print()
    if compared:
        print_table(compared, True)
    lines = [json.dumps(res, separators=(",", ":")) for res in results]
    for line in lines:
        print(line)
    if opts.json_out:
        with open(opts.json_out, "a") as f:
            f.write("".join(line + "\n" for line in lines))

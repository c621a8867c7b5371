"""The store at scale (issues 4 and 14): a million stored jobs — memory, start-up, listing, compaction.

    python3 -m bench.scale [--jobs 1000000] [--records-per-job 2] [--payload-bytes 2048]
                           [--output-bytes 2048] [--comment-bytes 40] [--server-dir DIR] [--json FILE]

1. Writes a log of N finished jobs (each as its create and its result record, as a server writes
   them; issue 14's realistic job: a 2 KB payload, a 2 KB worker answer, a 40-byte comment) into
   a temp data_dir. `--payload-bytes 0 --output-bytes 0 --comment-bytes 0` is issue 4's small job.
2. memory/start-up: starts the server on it with compaction off and times the first answered
   `GET /job?limit=1` (a full replay: no hint file yet); RSS per job = (RSS loaded - RSS of an
   empty server) / N.
3. listing (warm page cache): `GET /job?limit=100` p50/p99 over 200 requests; a no-match
   `name=` scan over every job (p50 of 5), with `GET /` asked every 2 ms meanwhile (its max).
4. restart with a hint file: the server stops (SIGTERM; the keydir store writes jobs.hint at a
   clean stop) and starts again; time to the first answered `GET /job?limit=1`, and RSS.
5. compaction: starts it again with compaction due at once while one client polls `GET /` and
   another pushes; reports their latency p50/p99/max and errors while the rewrite runs (between
   the server's "Compacting" and "Compacted" log lines), its duration, and the log size before
   and after against the live records.
`--server-dir` runs the server of another checkout (e.g. a `git worktree` of the previous commit).
Everything is on 127.0.0.1, bounded in time, and the temp directory is removed at the end.
"""
import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from hq_gevent import ids

SERVER = [sys.executable, "-m", "hq_gevent", "serve", "-c"]


def write_log(path, jobs, records_per_job, payload_bytes=0, output_bytes=0, comment_bytes=0):
    ticks = iter(range(ids.EPOCH_MS + 10 ** 11, ids.EPOCH_MS + 2 * 10 ** 11))
    gen = ids.IdGenerator(clock=lambda: next(ticks))
    finished = ids.EPOCH_MS + 10 ** 11
    filler = "x" * payload_bytes  # the payload's JSON text is {"i":N,"d":"xxx..."}, stored as a string
    output = json.dumps("r" * output_bytes) if output_bytes else '"OK"'
    with open(path, "w", buffering=1 << 20) as f:
        for i in range(jobs):
            body = f'{{\\"i\\":{i},\\"d\\":\\"{filler}\\"}}' if payload_bytes else f'{{\\"i\\":{i}}}'
            comment = f"c{i:0{max(1, comment_bytes - 1)}d}" if comment_bytes else ""
            head = f'["p",{gen.next_id()},"job{i % 10}","{comment}","http://127.0.0.1:9/work","{body}",null,0,'
            if records_per_job == 2:
                f.write(head + '1,null,null,0,null,"",""]\n')
            f.write(head + f'0,{finished},{finished + 5},1,200,{output},""]\n')


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Server:
    code_dir = None  # another checkout's server (--server-dir), else this one

    def __init__(self, workdir, data_dir, **config):
        self.port = free_port()
        self.log_path = os.path.join(workdir, f"server-{self.port}.log")
        config = dict(addr=f"127.0.0.1:{self.port}", data_dir=data_dir, access_log_file="",
                      job_lifetime=0, dispatchers=2, **config)
        self.config_path = os.path.join(workdir, f"server-{self.port}.toml")
        with open(self.config_path, "w") as f:
            for key, value in config.items():
                f.write(f"{key} = {json.dumps(value)}\n")
        self.started = time.monotonic()
        env = dict(os.environ, PYTHONPATH=self.code_dir) if self.code_dir else None
        self.proc = subprocess.Popen(SERVER + [self.config_path], stdout=open(self.log_path, "w"),
                                     stderr=subprocess.STDOUT, env=env, cwd=self.code_dir)

    def log(self):
        with open(self.log_path) as f:
            return f.read()

    def wait_first_answer(self, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log()}")
            try:
                status, _ = request(self.port, "GET", "/job?limit=1", timeout=2)
                if status == 200:
                    return time.monotonic() - self.started
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError("no answer in time")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def request(port, method, path, body=None, timeout=10, conn=None):
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body, {"Content-Type": "application/json"} if body else {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        if own:
            conn.close()


def poller(port, method, path, body, stop, samples, errors):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    while not stop.is_set():
        started = time.monotonic()
        try:
            status, _ = request(port, method, path, body, conn=conn)
        except OSError as e:
            errors.append(repr(e))
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            continue
        samples.append((started, time.monotonic() - started))
        if status != 200:
            errors.append(status)
        time.sleep(0.002)


def timed(port, path, n):
    """Latencies (s) of `n` sequential GETs of `path` on one connection; raises on a non-200."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    out = []
    for _ in range(n):
        started = time.perf_counter()
        status, body = request(port, "GET", path, conn=conn)
        out.append(time.perf_counter() - started)
        if status != 200:
            raise RuntimeError(f"GET {path}: {status} {body[:200]!r}")
    conn.close()
    return out


def listing(port, result):
    """Issue 14's list figures on a loaded server (warm page cache)."""
    timed(port, "/job?limit=100", 20)  # warm-up
    lat = timed(port, "/job?limit=100", 200)
    result["list100_p50_ms"] = round(percentile(lat, 0.5) * 1000, 2)
    result["list100_p99_ms"] = round(percentile(lat, 0.99) * 1000, 2)
    stop = threading.Event()
    polls, errors = [], []
    root = threading.Thread(target=poller, args=(port, "GET", "/", None, stop, polls, errors))
    root.start()
    try:
        scan = timed(port, "/job?limit=100&name=nomatch-", 5)
    finally:
        stop.set()
        root.join(15)
    result["nomatch_scan_p50_ms"] = round(percentile(scan, 0.5) * 1000, 1)
    result["nomatch_scan_root_max_ms"] = round(max(lat for _, lat in polls) * 1000, 2) if polls else None
    result["nomatch_scan_root_p99_ms"] = round(percentile([lat for _, lat in polls], 0.99) * 1000, 2) if polls else None
    result["nomatch_scan_errors"] = len(errors)


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))] if values else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--records-per-job", type=int, choices=(1, 2), default=2)
    parser.add_argument("--payload-bytes", type=int, default=2048)
    parser.add_argument("--output-bytes", type=int, default=2048)
    parser.add_argument("--comment-bytes", type=int, default=40)
    parser.add_argument("--server-dir", help="run the server of this checkout (default: this one)")
    parser.add_argument("--skip-compaction", action="store_true")
    parser.add_argument("--json", help="append the result as a JSON line to this file")
    opts = parser.parse_args(argv)
    Server.code_dir = os.path.abspath(opts.server_dir) if opts.server_dir else None
    workdir = tempfile.mkdtemp(prefix="hq-scale-")
    result = {"scenario": "scale", "jobs": opts.jobs, "records_per_job": opts.records_per_job,
              "payload_bytes": opts.payload_bytes, "output_bytes": opts.output_bytes,
              "comment_bytes": opts.comment_bytes, "server_dir": Server.code_dir or os.getcwd(),
              "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_avg_at_start": os.getloadavg()[0]}
    try:
        empty = Server(workdir, os.path.join(workdir, "empty"))
        empty.wait_first_answer()
        empty_rss = rss(empty.proc.pid)
        empty.stop()

        data_dir = os.path.join(workdir, "data")
        os.makedirs(data_dir)
        log_path = os.path.join(data_dir, "jobs.jsonl")
        write_log(log_path, opts.jobs, opts.records_per_job, opts.payload_bytes, opts.output_bytes,
                  opts.comment_bytes)
        result["log_bytes"] = os.path.getsize(log_path)

        loaded = Server(workdir, data_dir, wal_compact_min_bytes=1 << 50)
        result["startup_to_first_answer_s"] = round(loaded.wait_first_answer(600), 2)
        loaded_rss = rss(loaded.proc.pid)
        result["rss_loaded_mb"] = round(loaded_rss / 1e6, 1)
        result["rss_per_job_bytes"] = round((loaded_rss - empty_rss) / opts.jobs)
        listing(loaded.port, result)
        loaded.stop()
        result["hint_file_bytes"] = os.path.getsize(os.path.join(data_dir, "jobs.hint")) \
            if os.path.exists(os.path.join(data_dir, "jobs.hint")) else None

        again = Server(workdir, data_dir, wal_compact_min_bytes=1 << 50)
        result["restart_to_first_answer_s"] = round(again.wait_first_answer(600), 2)
        result["restart_rss_per_job_bytes"] = round((rss(again.proc.pid) - empty_rss) / opts.jobs)
        again.stop()
        if opts.skip_compaction:
            return finish(result, opts, workdir)

        compacting = Server(workdir, data_dir, wal_compact_min_bytes=0, wal_compact_ratio=1.2)
        compacting.wait_first_answer(600)
        stop = threading.Event()
        polls, pushes, errors = [], [], []
        push_body = json.dumps({"url": "http://127.0.0.1:9/x", "payload": {"k": 1}}).encode()
        threads = [threading.Thread(target=poller, args=(compacting.port, "GET", "/", None, stop, polls, errors)),
                   threading.Thread(target=poller, args=(compacting.port, "POST", "/job", push_body, stop, pushes, errors))]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 900
        begun = ended = None
        while time.monotonic() < deadline and ended is None:
            text = compacting.log()
            if begun is None and "Compacting" in text:
                begun = time.monotonic()
            if "Compacted" in text:
                ended = time.monotonic()
            time.sleep(0.05)
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(15)
        if begun is None or ended is None:
            raise RuntimeError(f"compaction did not run:\n{compacting.log()[-2000:]}")
        during = lambda samples: [lat for started, lat in samples if begun - 0.1 <= started <= ended]  # noqa: E731
        for name, samples in (("get", polls), ("push", pushes)):
            lat = during(samples)
            result[f"compaction_{name}_n"] = len(lat)
            result[f"compaction_{name}_p50_ms"] = round(percentile(lat, 0.5) * 1000, 2) if lat else None
            result[f"compaction_{name}_p99_ms"] = round(percentile(lat, 0.99) * 1000, 2) if lat else None
            result[f"compaction_{name}_max_ms"] = round(max(lat) * 1000, 2) if lat else None
        result["compaction_errors"] = len(errors)
        result["compaction_s"] = round(ended - begun, 2)
        stats = json.loads(request(compacting.port, "GET", "/stats")[1])
        result["log_bytes_after"] = stats["walBytes"]
        result["num_jobs_after"] = stats["numJobs"]
        compacting.stop()
        result["log_bytes_file_after"] = os.path.getsize(log_path)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return finish(result, opts, workdir)


def finish(result, opts, workdir):
    shutil.rmtree(workdir, ignore_errors=True)
    line = json.dumps(result)
    print(line)
    if opts.json:
        with open(opts.json, "a") as f:
            f.write(line + "\n")
    return 1 if result.get("compaction_errors") else 0


if __name__ == "__main__":
    sys.exit(main())

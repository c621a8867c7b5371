"""`python3 -m bench --store postgresql`: the PostgreSQL store (SPEC §13) against the WAL store, in one run.

Starts its own throwaway PostgreSQL cluster (tests/pgcluster.py: initdb + pg_ctl in a temp dir on a
free loopback port, PostgreSQL's durable defaults: fsync and synchronous_commit on), then for the
WAL store, PostgreSQL with one server and PostgreSQL with two servers on one database (a fresh
database each time):
- durable push/s: n pushes with a runAt an hour ahead (so no dispatch shares the run), answered
  only once committed; with two servers the pushes are split between them;
- e2e jobs/s: n pushes until the bench worker has received every job; lost and duplicate deliveries.
"""
import json
import os
import sys
import time

import gevent

from bench import load
from bench import run as B

sys.path.insert(0, str(B.ROOT / "tests"))
from pgcluster import PGCluster, find_bin_dir  # noqa: E402

SETUPS = (("wal", 1), ("postgresql", 1), ("postgresql", 2))
SERVER_CONFIG = {"dispatchers": 2, "max_workers": 100}  # the e2e scenario's


class Run:
    def __init__(self, opts, workdir):
        self.opts, self.workdir = opts, workdir
        self.cluster = None
        self.count = 0

    def start_server(self, config, name):
        port = B.free_port()
        config = dict(B.server_config("hq-gevent", SERVER_CONFIG), addr=f"{B.HOST}:{port}", **config)
        path = os.path.join(self.workdir, name + ".toml")
        with open(path, "w") as f:
            f.write(B.toml_dumps({k: v for k, v in config.items() if v is not None}))
        log_path = os.path.join(self.workdir, name + ".log")
        proc = B.spawn([sys.executable, "-m", "hq_gevent", "serve", "-c", path], log_path, cwd=str(B.ROOT))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server {name} exited:\n{B.tail(log_path)}")
            try:
                conn = load.Conn(B.HOST, port, timeout=2)
                status, _ = conn.request(load.build_request("GET", "/readyz"))
                conn.close()
                if status == 200:
                    return proc, port
            except OSError:
                pass
            gevent.sleep(0.05)
        raise RuntimeError(f"server {name} not ready in 30 s:\n{B.tail(log_path)}")

    def servers(self, store, n):
        self.count += 1
        if store == "wal":
            return [self.start_server({"data_dir": os.path.join(self.workdir, f"data{self.count}")}, f"wal{self.count}")]
        dsn = self.cluster.create_database(f"bench{self.count}")
        return [self.start_server({"store": "postgresql", "postgresql_dsn": dsn, "server_id": i + 1},
                                  f"pg{self.count}-{i + 1}") for i in range(n)]

    def push_all(self, servers, jobs):
        """Push `jobs` split round-robin between `servers`, each over its share of the connections."""
        reqs = [load.build_request("POST", "/job", json.dumps(job, separators=(",", ":")).encode(),
                                   {"Content-Type": "application/json"}) for job in jobs]
        share = len(servers)
        runs = [gevent.spawn(load.run, B.HOST, port, reqs[k::share], max(1, self.opts.concurrency // share),
                             self.opts.timeout) for k, (_, port) in enumerate(servers)]
        gevent.joinall(runs)
        return sum(sum(1 for status in r.value.status if status == 200) for r in runs)

    def measure(self, store, n_servers, n):
        worker = B.Worker(self.workdir, name=f"worker{self.count}")
        try:
            servers = self.servers(store, n_servers)
            started = time.monotonic()
            acked = self.push_all(servers, [B.job_dict(worker, i, delay=3600) for i in range(n)])
            push_rate = acked / (time.monotonic() - started)
            for proc, _ in servers:
                B.stop(proc)
            servers = self.servers(store, n_servers)
            started = time.monotonic()
            pusher = gevent.spawn(self.push_all, servers, [B.job_dict(worker, i) for i in range(n)])
            deadline = started + self.opts.timeout
            while worker.stats()["unique"] < n and time.monotonic() < deadline:
                gevent.sleep(0.005)
            took = time.monotonic() - started
            acked_e2e = pusher.get()
            stats = worker.stats()
            for proc, _ in servers:
                B.stop(proc)
        finally:
            worker.close()
        return {"durable_pushes_per_s": B.r(push_rate), "e2e_jobs_per_s": B.r(stats["unique"] / took),
                "errors": (n - acked) + (n - acked_e2e), "lost": max(0, acked_e2e - stats["unique"]),
                "duplicates": stats["duplicates"]}


def main(opts, workdir):
    """Run and report; returns the exit status."""
    if find_bin_dir() is None:
        B.log("error: --store postgresql needs PostgreSQL's server (initdb, pg_ctl); .ci/deps.sh installs it")
        return 1
    n = opts.sizes.get("e2e") or B.SIZES["quick" if opts.quick else "full"]["e2e"]
    run = Run(opts, workdir)
    about = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": B.machine()}
    run.cluster = PGCluster(durable=True).start()
    results = []
    try:
        for rnd in range(opts.rounds):
            for store, n_servers in SETUPS:
                B.log(f"{store} x{n_servers} round {rnd + 1}/{opts.rounds}: {n} jobs")
                figures = run.measure(store, n_servers, n)
                B.log(f"{store} x{n_servers}: {json.dumps(figures)}")
                results.append(({"store": store, "servers": n_servers, "n": n}, figures))
    finally:
        B.cleanup()
        run.cluster.stop()
    about["machine"]["load_avg_at_end"] = round(os.getloadavg()[0], 2)
    print(f"# {about['when']}  {json.dumps(about['machine'])}")
    print(f"{'store':<12}{'servers':>8}{'push/s':>10}{'e2e jobs/s':>12}{'lost':>6}{'dup':>5}{'errors':>8}")
    for setup, f in results:
        print(f"{setup['store']:<12}{setup['servers']:>8}{f['durable_pushes_per_s']:>10,.0f}{f['e2e_jobs_per_s']:>12,.0f}"
              f"{f['lost']:>6}{f['duplicates']:>5}{f['errors']:>8}")
    for setup, f in results:
        print(json.dumps(dict(setup, figures=f, **about), separators=(",", ":")))
    if opts.json_out:
        with open(opts.json_out, "a") as out:
            for setup, f in results:
                out.write(json.dumps(dict(setup, figures=f, **about)) + "\n")
    return 0 if all(f["lost"] == 0 and f["errors"] == 0 for _, f in results) else 1

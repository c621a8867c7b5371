"""The bench suite (bench/): every scenario runs end to end at tiny sizes and reports 0 lost /
0 duplicate; its loss and duplicate detectors do fire; its child processes die with it.

No timing assertions: figures on a shared CI machine are not facts about the code.
"""
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from conftest import ROOT, require_tool

sys.path.insert(0, str(ROOT))  # bench/ is not installed with the package; plain `pytest` must find it too
from bench.run import overtaken, profile_summary  # noqa: E402

BENCH = [sys.executable, "-m", "bench"]
CORRECTNESS = ("lost", "duplicates", "unexpected", "errors")


def bench_env(tmp_path):
    # The bench's temporary directory goes under pytest's, so even a SIGKILLed bench leaves nothing in /tmp.
    return dict(os.environ, TMPDIR=str(tmp_path))


def run_bench(args, tmp_path, timeout=120):
    proc = subprocess.run(BENCH + args, cwd=str(ROOT), capture_output=True, text=True, timeout=timeout, env=bench_env(tmp_path))
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc, {res["scenario"]: res for res in lines}


def start_worker(*args):
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.worker", "--port", "0", *args], cwd=str(ROOT), stdout=subprocess.PIPE, text=True
    )
    line = proc.stdout.readline()
    assert line.startswith("listening"), line
    return proc, f"http://127.0.0.1:{line.rsplit(':', 1)[1].strip()}"


OLD_SCENARIOS = ["baseline", "push", "e2e", "slow", "memory", "list"]


def test_every_scenario_runs_and_loses_nothing(tmp_path):
    out = tmp_path / "bench.jsonl"
    args = OLD_SCENARIOS + ["--quick", "--n", "60", "--set", "push.max_workers=3", "--slow-ms", "200", "--baseline-seconds", "0.5"]
    proc, results = run_bench(args + ["--list-reps", "3", "--json", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(results) == sorted(OLD_SCENARIOS), proc.stdout
    for name, res in results.items():
        figures = res["figures"]
        for key in CORRECTNESS:
            assert figures.get(key, 0) == 0, (name, figures)
        if name != "baseline":
            assert res["n"] == 60
    e2e = results["e2e"]["figures"]
    assert e2e["jobs_per_s"] > 0 and e2e["latency_p50_ms"] is not None
    assert results["slow"]["figures"]["max_concurrency"] >= 2  # ample max_workers ran jobs side by side
    assert results["memory"]["figures"]["jobs_after_restart"] == 60
    assert results["push"]["figures"]["vs_baseline"] > 0  # push relative to this run's baseline
    assert results["push"]["config"]["max_workers"] == 3 and results["e2e"]["config"]["max_workers"] == 100
    assert results["push"]["config"]["wal_fsync"] == "always"
    listing = results["list"]["figures"]
    for query in ("name_foo", "nomatch_scan", "term_nomatch_scan", "regex_nomatch_scan"):  # the hardening issue's filter variants
        assert listing[f"{query}_p50_ms"] > 0 and listing[f"{query}_p99_ms"] >= listing[f"{query}_p50_ms"], listing
        assert listing[f"{query}_root_max_ms"] > 0, listing  # GET / was asked while the scan ran
    # The table is there too, and --json got the same lines.
    assert re.search(r"^e2e\s+lost\s+0$", proc.stdout, re.M), proc.stdout
    assert [json.loads(line)["scenario"] for line in out.read_text().splitlines()] == list(results)


def test_new_scenarios_run_and_lose_nothing(tmp_path):
    # schedule: 40 jobs due over 1 s from 2 s after pushing; batch: 5 batches of 50, then e2e in batches;
    # retry: 30 jobs that each fail twice, after a 30-job e2e reference run; many_scheduled: 300 held
    # for an hour (opt-in: only when named).
    args = ["schedule", "batch", "retry", "many_scheduled", "--n", "schedule=40,batch=250,retry=30,many_scheduled=300",
            "--batch-size", "50",
            "--schedule-spread", "1", "--schedule-lead", "2"]
    proc, results = run_bench(args, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(results) == ["batch", "many_scheduled", "retry", "schedule"], proc.stdout
    for name, res in results.items():
        for key in CORRECTNESS:
            assert res["figures"].get(key, 0) == 0, (name, res["figures"])
        assert "lost" in res["figures"] and "errors" in res["figures"], name
    sched = results["schedule"]["figures"]
    assert sched["push_batch_size"] == 50 and sched["early"] == 0, sched
    assert sched["lateness_p50_ms"] is not None and sched["lateness_p99_ms"] >= sched["lateness_p50_ms"], sched
    assert sched["due_before_rss"] == 0 and sched["scheduled_at_rss"] == 40, sched  # RSS read before any came due
    batch = results["batch"]["figures"]
    assert batch["jobs_per_s"] > 0 and batch["e2e_jobs_per_s"] > 0, batch
    assert results["batch"]["config"]["max_workers"] == 0 and results["batch"]["config_e2e"]["max_workers"] == 100
    retry = results["retry"]["figures"]
    assert retry["requests"] == 90 and retry["attempt_mismatches"] == 0, retry  # 3 attempts each, X-Hq-Attempt right
    assert retry["not_success"] == 0 and retry["wrong_attempts"] == 0, retry
    assert retry["total_s"] > 0 and retry["ideal_s"] > 0 and retry["vs_ideal"] > 0, retry
    many = results["many_scheduled"]["figures"]
    assert many["scheduled"] == 300 and many["scheduled_after_restart"] == 300, many
    assert many["empty_push_p99_ms"] > 0 and many["loaded_push_p99_ms"] > 0 and many["restart_s"] > 0, many


def test_compare_runs_each_checkout_and_a_secure_side(tmp_path):
    # Side B imports a copy of hq_gevent that says another version; side A alone has a token and a
    # signing secret: its worker requests are signed and the bench's clients must send the token.
    checkout = tmp_path / "other-checkout"
    shutil.copytree(ROOT / "hq_gevent", checkout / "hq_gevent", ignore=shutil.ignore_patterns("__pycache__"))
    init = checkout / "hq_gevent" / "__init__.py"
    init.write_text(re.sub(r'__version__ = "[^"]*"', '__version__ = "0.0.0-other"', init.read_text()))
    proc, results = run_bench(["e2e", "--n", "30", "--compare-dir", str(checkout), "--secure", "A"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = results["e2e"]
    assert res["b"]["dir"] == str(checkout) and res["b"]["version"]["version"] == "0.0.0-other", res["b"]
    assert res["a"]["version"]["version"] != "0.0.0-other"
    assert res["config"]["auth_tokens"] and "auth_tokens" not in res["config_b"]
    assert all(run["signed"] == 30 for run in res["a"]["runs"]), res["a"]["runs"]
    assert all(run["signed"] == 0 for run in res["b"]["runs"]), res["b"]["runs"]
    assert "not in force" not in proc.stderr  # the server refused requests without the token
    assert re.findall(r"e2e \[(A|B)\] round \d+/", proc.stderr) == ["A", "B"] * 3
    # --set-b without a B side is a usage error.
    assert run_bench(["e2e", "--set-b", "dispatchers=1"], tmp_path)[0].returncode == 2


def test_compare_ref_runs_a_commit_of_this_repository(tmp_path):
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True)
    if head.returncode:
        pytest.skip("not a git checkout")
    proc, results = run_bench(["e2e", "--n", "20", "--compare-ref", "HEAD"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = results["e2e"]
    assert res["b"]["commit"] == head.stdout.strip() and res["b"]["dir"].endswith("src-B"), res["b"]
    assert run_bench(["e2e", "--compare-ref", "no-such-ref-anywhere"], tmp_path)[0].returncode == 1


def test_compare_alternates_and_reports_ratios(tmp_path):
    # B is the same server run as a foreign 1.x one (no hq-gevent-only config keys).
    default = f"{shlex.quote(sys.executable)} -m hq_gevent serve -c {{config}}"
    proc, results = run_bench(["e2e", "--n", "40", "--compare", default, "--compare-flavor", "hq1"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = results["e2e"]
    assert res["rounds"] == 3 and len(res["a"]["runs"]) == 3 and len(res["b"]["runs"]) == 3
    for side in ("a", "b"):
        assert res[side]["figures"]["lost"] == 0 and res[side]["figures"]["duplicates"] == 0
    assert "wal_fsync" in res["config"] and "wal_fsync" not in res["config_b"]  # a 1.x server gets 1.x keys only
    assert res["ratio"]["jobs_per_s"] > 0
    order = re.findall(r"e2e \[(A|B)\] round \d+/", proc.stderr)
    assert order == ["A", "B"] * 3, proc.stderr
    assert "A/B" in proc.stdout
    assert run_bench(["e2e", "--compare", default, "--rounds", "2"], tmp_path)[0].returncode != 0


FAKE_SERVER = r'''
# Acknowledges every push and never delivers it: the bench must call that loss, not success.
import http.server, json, sys, toml
host, port = toml.load(sys.argv[1])["addr"].rsplit(":", 1)
ids = iter(range(1, 10**9))
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def reply(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        if self.path.startswith("/job/"):
            self.reply({"status": "waiting"})
        elif self.path.startswith("/stats"):
            self.reply({"numWaitingJobs": 0, "numRunningJobs": 0})  # idle, so the bench stops waiting
        else:
            self.reply({"version": "fake"})
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.reply({"id": str(next(ids)), "status": "waiting"})
http.server.ThreadingHTTPServer((host, int(port)), H).serve_forever()
'''


def test_a_server_that_loses_jobs_is_reported(tmp_path):
    fake = tmp_path / "fake_hq.py"
    fake.write_text(FAKE_SERVER)
    # The 300 s bound is not waited out: the server says it is idle, so the missing jobs are lost.
    proc, results = run_bench(["e2e", "--n", "20", "--timeout", "300", "--server", f"{sys.executable} {fake} {{config}}"], tmp_path, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    figures = results["e2e"]["figures"]
    assert figures["lost"] == 20 and figures["jobs_per_s"] is None and figures["errors"] >= 1, figures


def test_a_server_that_does_not_start_is_an_error(tmp_path):
    proc, results = run_bench(["push", "--n", "5", "--server", f"{sys.executable} -c 'raise SystemExit(3)' {{config}}"], tmp_path)
    assert proc.returncode == 1 and not results
    assert "exited with 3" in proc.stderr, proc.stderr


def test_worker_counts_duplicates_and_concurrency():
    proc, url = start_worker("--sleep-ms", "300")
    try:
        s = requests.Session()
        assert s.post(url + "/job", data=b'{"a":1}', headers={"X-Hq-Job-Id": "7"}, timeout=5).text == "OK"
        assert s.post(url + "/job", headers={"X-Hq-Job-Id": "7"}, timeout=5).status_code == 200
        threads = [
            threading.Thread(target=requests.post, args=(url + "/job",), kwargs={"headers": {"X-Hq-Job-Id": str(i)}, "timeout": 5})
            for i in range(100, 105)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        stats = s.get(url + "/stats", timeout=5).json()
        assert stats == {"requests": 7, "unique": 6, "duplicates": 1, "noId": 0, "inFlight": 0, "maxConcurrency": 5,
                         "signed": 0, "successIds": 0, "duplicateSuccesses": 0, "attemptMismatches": 0}, stats
        assert s.get(url + "/arrivals", timeout=5).json()["7"][0] == 2
        s.post(url + "/reset", timeout=5)
        assert s.get(url + "/stats", timeout=5).json()["requests"] == 0
    finally:
        proc.terminate()
        proc.wait(10)


def test_failing_worker_fails_twice_then_counts_successes():
    proc, url = start_worker("--fail-first", "2")
    try:
        s = requests.Session()
        codes = [s.post(url + "/job", headers={"X-Hq-Job-Id": "9", "X-Hq-Attempt": str(k)}, timeout=5).status_code for k in (1, 2, 3)]
        assert codes == [500, 500, 200]
        # A fourth request is a duplicate success, and its attempt header (3) is not its count (4).
        assert s.post(url + "/job", headers={"X-Hq-Job-Id": "9", "X-Hq-Attempt": "3"}, timeout=5).status_code == 200
        s.post(url + "/job", headers={"X-Hq-Job-Id": "10", "webhook-signature": "v1,x"}, timeout=5)  # no X-Hq-Attempt
        stats = s.get(url + "/stats", timeout=5).json()
        assert stats["successIds"] == 1 and stats["duplicateSuccesses"] == 1, stats
        assert stats["attemptMismatches"] == 2 and stats["signed"] == 1, stats
        assert s.get(url + "/successes", timeout=5).json() == {"9": 2}
    finally:
        proc.terminate()
        proc.wait(10)


def test_baseline_measures_the_client_against_wrk(tmp_path):
    require_tool("wrk", "the baseline checks the bench client against wrk")
    proc, results = run_bench(["baseline", "--baseline-seconds", "0.5", "--concurrency", "8"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    figures = results["baseline"]["figures"]
    for label in ("trivial", "worker"):
        assert figures[f"{label}_client_rps"] > 0 and figures[f"{label}_wrk_rps"] > 0, figures
        assert figures[f"{label}_client_vs_wrk"] is not None


def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_interrupt_kills_every_child(sig, tmp_path):
    # SIGINT/SIGTERM: the bench unwinds, stops its children and reports the scenario that had
    # finished; SIGKILL: the children get PDEATHSIG. The slow scenario's worker holds jobs 20 s,
    # so the bench is surely mid-scenario when the signal lands.
    proc = subprocess.Popen(
        BENCH + ["push", "slow", "--n", "20", "--slow-ms", "20000", "--baseline-seconds", "0.5"],
        cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=bench_env(tmp_path),
    )
    pids, deadline = [], time.monotonic() + 60
    try:
        for line in proc.stderr:
            m = re.search(r"started (\S+) pid (\d+)", line)
            if m:
                pids.append(int(m.group(2)))
                if m.group(1).startswith("slow-"):
                    break
            assert time.monotonic() < deadline, pids
        assert len(pids) >= 4, pids  # push's worker and server(s: one more for wrk), slow's worker and server
        time.sleep(1)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == (-9 if sig == signal.SIGKILL else 130)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if sig != signal.SIGKILL:
        assert [json.loads(line)["scenario"] for line in out.splitlines() if line.startswith("{")] == ["push"]
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in pids if _alive(p)]


def test_overtaken_measures_a_start_after_later_due_jobs_started():
    # (due, started): the second job due at 2 started at 5, after the job due at 3 had started at 3.
    assert sorted(overtaken([(1, 1.0), (2, 5.0), (2, 2.0), (3, 3.0)])) == [0.0, 0.0, 0.0, 2.0]
    assert overtaken([(1, 1.5), (1, 1.0)]) == [0.0, 0.0]  # due at the same time: either may go first
    assert overtaken([]) == []


def test_profile_summary_ranks_frames_by_self_and_inclusive_samples():
    raw = (
        'process 1:"python -m hq_gevent";run (hub.py:1);handle (api.py:5);fsync (wal.py:9) 6\n'
        'process 1:"python -m hq_gevent";run (hub.py:1);handle (api.py:5) 3\n'
        'process 1:"python -m hq_gevent" 1\n'
    )
    text = profile_summary(raw)
    self_part, incl_part = text.split("-- by inclusive --")
    assert text.startswith("10 samples")
    assert self_part.index("60.0%  fsync (wal.py:9)") < self_part.index("30.0%  handle (api.py:5)")
    assert "10.0%  (no Python frame: idle or native)" in self_part
    assert "90.0%  run (hub.py:1)" in incl_part and "process 1" not in text


@pytest.mark.skipif(not __import__("shutil").which("py-spy"), reason="py-spy not installed (optional: --profile only)")
def test_profile_writes_stacks_and_top_frames(tmp_path):
    proc, results = run_bench(["e2e", "--n", "200", "--profile", str(tmp_path / "prof")], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tops = list((tmp_path / "prof").glob("e2e-A-*.top.txt"))
    assert len(tops) == 1 and "samples" in tops[0].read_text()
    assert "hq_gevent" in tops[0].with_suffix("").with_suffix(".txt").read_text()

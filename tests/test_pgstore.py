"""The PostgreSQL store on its own: schema versions, `hq-gevent migrate` from a WAL data_dir, a
long filtered scan, start-up errors. Real server processes and a real throwaway cluster."""
import os
import pty
import subprocess
import sys
import threading
import time

import pytest
import requests

from conftest import ROOT, free_port


@pytest.fixture
def dsn(pg_cluster, request):
    return pg_cluster.create_database(f"pg_{request.node.name[:40].lower()}_{time.monotonic_ns()}")


def dbname(dsn):
    return dsn.rsplit("/", 1)[1]


def migrate(*args, env=None):
    return subprocess.run([sys.executable, "-m", "hq_gevent", "migrate", *args], capture_output=True, text=True,
                          cwd=str(ROOT), timeout=120, env=dict(os.environ, **(env or {})))


def test_the_schema_is_created_under_a_version_and_a_newer_one_is_refused(make_server, pg_cluster, dsn):
    srv = make_server(store="postgresql", postgresql_dsn=dsn)
    assert pg_cluster.sql("SELECT max(version) FROM hq_schema_version", dbname(dsn)) == "1"
    srv.stop()
    srv.start()  # a second start finds version 1 and changes nothing
    assert pg_cluster.sql("SELECT count(*) FROM hq_schema_version", dbname(dsn)) == "1"
    srv.stop()
    pg_cluster.sql("INSERT INTO hq_schema_version VALUES (99)", dbname(dsn))
    srv.start(wait=False)
    assert srv.proc.wait(30) == 1
    assert "the database schema is version 99, newer than this hq-gevent knows (1)" in srv.log()


def test_an_unreachable_database_stops_the_start_with_a_clear_message(make_server):
    srv = make_server(start=False, store="postgresql", postgresql_dsn=f"postgresql://postgres@127.0.0.1:{free_port()}/x")
    srv.start(wait=False)
    assert srv.proc.wait(30) == 1
    assert "cannot use PostgreSQL" in srv.log()
    assert "Traceback" not in srv.log()


def test_migrate_copies_every_job_of_a_wal_data_dir_idempotently(make_server, pg_cluster, dsn, worker, tmp_path):
    wal = make_server(name="wal", max_workers=16)
    worker.respond(500, b"no")
    failed = wal.push(url=worker.url, name="failed\u0000nul", retry={"maxAttempts": 2, "minBackoff": 0.1, "maxBackoff": 0.1})
    scheduled = wal.push(url=worker.url, name="later", delay=3600, uniqueKey="once", payload={"big": 2 ** 70})
    stopped = wal.push(url=worker.url, delay=3600)
    wal.api("POST", f"/job/{stopped['id']}/stop")
    wal.wait_job(failed["id"], ("failure",))
    worker.respond(200, b"fine")
    for _ in range(2):  # past one migrate batch (1000)
        ok = wal.api("POST", "/jobs", [{"url": worker.url, "name": "ok", "comment": "c"}] * 600)[1]["jobs"][-1]["id"]
    wal.wait_job(ok, timeout=60)
    before = wal.api("GET", "/job?limit=-1")[1]["jobs"]

    refused = migrate("--from-data-dir", wal.data_dir, "--to-postgresql", dsn)
    assert refused.returncode == 1 and "is locked by a running hq-gevent server" in refused.stderr
    wal.stop()

    first = migrate("--from-data-dir", wal.data_dir, "--to-postgresql", dsn)
    assert first.returncode == 0, first.stderr
    assert f"{len(before)} jobs in" in first.stdout and f"{len(before)} copied now" in first.stdout
    assert first.stderr == ""  # no bar when not on a terminal
    # An interrupted copy is resumed: remove some rows and run it again.
    pg_cluster.sql("DELETE FROM hq_jobs WHERE id % 3 = 0", dbname(dsn))
    again = migrate("--from-data-dir", wal.data_dir, "--to-postgresql", dsn)
    assert again.returncode == 0 and "copied now" in again.stdout
    assert pg_cluster.sql("SELECT count(*) FROM hq_jobs", dbname(dsn)) == str(len(before))
    once_more = migrate("--from-data-dir", wal.data_dir, "--to-postgresql", dsn)
    assert f"0 copied now, {len(before)} were already in PostgreSQL" in once_more.stdout

    pg = make_server(name="pg", store="postgresql", postgresql_dsn=dsn)
    after = pg.api("GET", "/job?limit=-1")[1]["jobs"]
    assert after == before
    assert pg.job(scheduled["id"])["runAt"] == scheduled["runAt"]
    dup = pg.request("POST", "/job", json={"url": worker.url, "uniqueKey": "once"})
    assert dup.headers.get("X-Hq-Duplicate") == "true" and dup.json()["id"] == scheduled["id"]
    fresh = pg.push(url=worker.url)
    assert int(fresh["id"]) > int(ok)  # ids continue after the migrated ones of this server_id


def test_migrate_shows_a_progress_bar_on_a_terminal(make_server, dsn, worker):
    wal = make_server(name="wal")
    wal.api("POST", "/jobs", [{"url": worker.url}] * 50)
    wal.stop()
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "hq_gevent", "migrate", "--from-data-dir", wal.data_dir,
                             "--to-postgresql", dsn], stdout=subprocess.PIPE, stderr=follower, cwd=str(ROOT))
    os.close(follower)
    out, _ = proc.communicate(timeout=60)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    assert proc.returncode == 0
    assert b"[##############################] 100.0% 50/50 jobs" in shown, shown
    assert b"50 copied now" in out


@pytest.mark.slow
def test_a_no_match_filter_over_many_rows_never_stalls_other_requests(make_server, pg_cluster, dsn):
    srv = make_server(store="postgresql", postgresql_dsn=dsn)
    rows = 300000
    # Rows made by PostgreSQL itself (pushing 300k through HTTP would take minutes here).
    pg_cluster.sql(f"""INSERT INTO hq_jobs (id, name, comment, url, timeout, waiting, finished_at, success,
        max_attempts, min_backoff, max_backoff, max_retry_duration, attempts, run_at)
        SELECT (1 << 40) + g, convert_to('job' || g, 'UTF8'), convert_to('', 'UTF8'), 'http://127.0.0.1:9/', 0,
               false, 1700000000000, true, 1, 1, 3600, 0, 1, 0 FROM generate_series(1, {rows}) g""", dbname(dsn))
    result = {}

    def scan():
        started = time.monotonic()
        result["answer"] = srv.api("GET", "/job?term=no-such-job&limit=10", timeout=300)
        result["took"] = time.monotonic() - started

    scanner = threading.Thread(target=scan)
    scanner.start()
    slowest = 0.0
    while scanner.is_alive():
        started = time.monotonic()
        assert requests.get(srv.url + "/", timeout=10).status_code == 200
        slowest = max(slowest, time.monotonic() - started)
        time.sleep(0.05)
    scanner.join()
    status, body = result["answer"]
    assert status == 200 and body["count"] == 0 and body["hasNext"] is False
    assert slowest < 1.0, f"GET / took {slowest:.2f}s during the scan ({result['took']:.1f}s)"


def test_migrate_errors_are_one_line(make_server, worker, tmp_path, pg_cluster):  # pg_cluster: skip without psycopg
    missing = migrate("--from-data-dir", str(tmp_path / "nothing"), "--to-postgresql", "postgresql://127.0.0.1:1/x")
    assert missing.returncode == 1 and "holds no job log" in missing.stderr
    wal = make_server(name="wal")
    wal.push(url=worker.url)
    wal.stop()
    down = migrate("--from-data-dir", wal.data_dir, "--to-postgresql", f"postgresql://postgres@127.0.0.1:{free_port()}/x")
    assert down.returncode == 1 and "cannot connect to PostgreSQL" in down.stderr
    no_dsn = migrate("--from-data-dir", wal.data_dir, env={"HQ_POSTGRESQL_DSN": ""})
    assert no_dsn.returncode == 1 and "--to-postgresql" in no_dsn.stderr
    assert all("Traceback" not in r.stderr for r in (missing, down, no_dsn))


@pytest.mark.slow
def test_the_bench_compares_the_stores_on_its_own_cluster(pg_cluster):  # pg_cluster: skip without PostgreSQL
    out = subprocess.run([sys.executable, "-m", "bench", "--store", "postgresql", "--n", "300"], capture_output=True,
                         text=True, cwd=str(ROOT), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.split()[:1] in (["wal"], ["postgresql"])]
    assert [(r[0], r[1]) for r in rows] == [("wal", "1"), ("postgresql", "1"), ("postgresql", "2")]
    assert all(r[4:] == ["0", "0", "0"] for r in rows), out.stdout  # lost, duplicates, errors

"""The `hq-gevent` client commands, run as real subprocesses against a real server and worker app."""
import json
import os
import pty
import re
import select
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import pytest
import requests

from conftest import ROOT, free_port, require_tool

ESC = "\033"


CLIENT_ENV = ("HQ_ADDRESS", "NO_COLOR", "HQ_TOKEN", "HQ_CACERT", "HQ_TOKEN_FILE")


def hq(*args, stdin=None, env=None, timeout=30):
    """Run `python -m hq_gevent ARGS`; the client's variables come only from `env`, and the token
    file is one that does not exist unless `env` names another (never this host's real one)."""
    full_env = {k: v for k, v in os.environ.items() if k not in CLIENT_ENV}
    full_env["HQ_TOKEN_FILE"] = str(ROOT / "no-such-token-file")
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "hq_gevent", *map(str, args)], input=stdin,
                          capture_output=True, text=True, env=full_env, cwd=str(ROOT), timeout=timeout)


def ok(*args, **kw):
    p = hq(*args, **kw)
    assert p.returncode == 0, (p.returncode, p.stdout, p.stderr)
    return p.stdout


def lines(text):
    return text.strip().splitlines()


def dead_port():
    return free_port()  # nothing listens there once the probe socket is closed


def finished_job(server, **job):
    return server.wait_job(server.push(**job)["id"])


# --- no server needed ---------------------------------------------------------------------
def test_version_and_each_command_documents_its_flags():
    assert ok("-v").strip() == "hq-gevent 0.2.0"
    expect = {
        "push": ["--url", "--payload", "--name", "--comment", "--header", "--timeout", "--address", "--token",
                 "--cacert", "--retry", "--min-backoff", "--max-backoff", "--delay", "--run-at", "--unique-key"],
        "list": ["--quiet", "--detail", "--name", "--term", "--reverse", "--begin", "--limit", "--status",
                 "--json", "--all"],
        "info": ["--address"], "stats": ["--address"], "stop": ["--address"], "delete": ["--address"],
        "restart": ["--copy", "--address"], "wait": ["--timeout", "--address"],
    }
    for command, flags in expect.items():
        text = ok(command, "-h")
        assert text.startswith(f"usage: hq-gevent {command}"), text
        for flag in flags:
            assert flag in text, (command, flag)


def test_usage_errors_exit_2_before_any_request():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    address = f"http://127.0.0.1:{listener.getsockname()[1]}"
    bad_ids = (["info", "abc"], ["stop", "1", "abc"], ["restart", "1.5"], ["list", "-b", "abc"],
               ["delete", str(1 << 64)])
    others = (["push"], ["push", "--name", "x", "job.json"], ["push", "--url", "http://h/", "--payload", "{bad"],
              ["push", "--url", "http://h/", "--delay", "1", "--run-at", "2030-01-01T00:00:00Z"],
              ["push", "--url", "http://h/", "--retry", "0"], ["push", "--url", "http://h/", "--min-backoff", "x"],
              ["push", "--url", "http://h/", "--header", "NoColon"], ["list", "-l", "0"],
              ["list", "-l", "3", "--all"], ["wait"], ["frobnicate"])
    try:
        for args in bad_ids + others:
            p = hq(*args, "-a", address)
            assert (p.returncode, p.stdout) == (2, ""), (args, p.returncode, p.stdout, p.stderr)
            assert "usage:" in p.stderr, (args, p.stderr)
            if args in bad_ids:
                assert "must be a number but" in p.stderr, (args, p.stderr)
        with pytest.raises(BlockingIOError):
            listener.accept()  # not one connection was attempted
    finally:
        listener.close()


def test_unreachable_server_names_the_address():
    port = dead_port()
    for args in (["stats"], ["stop", "1", "2"], ["push", "--url", "http://h/"]):
        p = hq(*args, "-a", f"127.0.0.1:{port}")
        assert p.returncode == 1, (args, p.stderr)
        assert p.stderr.startswith(f"error: cannot reach hq-gevent at http://127.0.0.1:{port}: "), p.stderr
        assert "refused" in p.stderr.lower() and len(lines(p.stderr)) == 1, p.stderr
    p = hq("stats", env={"HQ_ADDRESS": f"http://127.0.0.1:{port}"})
    assert p.returncode == 1 and f"127.0.0.1:{port}" in p.stderr


# --- against a real server ----------------------------------------------------------------
def test_client_commands_do_not_load_gevent(server):
    code = ("import sys; from hq_gevent.cli import main; rc = main(['stats', '-a', sys.argv[1]]); "
            "bad = [m for m in sys.modules if m.split('.')[0] == 'gevent' or m == 'hq_gevent.server']; "
            "assert not bad, bad; sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, server.url], capture_output=True, text=True, cwd=str(ROOT), timeout=30)
    assert p.returncode == 0, p.stderr


def test_hq_address_env_and_a_flag_override(server):
    stats = json.loads(ok("stats", env={"HQ_ADDRESS": server.url}))
    assert {"queues", "dispatchers", "maxWorkers", "numJobs"} <= set(stats)
    dead = {"HQ_ADDRESS": f"http://127.0.0.1:{dead_port()}"}
    assert json.loads(ok("stats", "-a", server.url, env=dead))["numJobs"] == 0
    assert hq("stats", env=dead).returncode == 1


def test_push_files_and_stdin(server, worker, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"url": worker.url + "/a", "name": "alpha", "payload": {"n": 1}}))
    b.write_text(json.dumps({"url": worker.url + "/b", "comment": "second", "timeout": 7}))
    ids = lines(ok("push", a, b, "-a", server.url))
    assert len(ids) == 2 and all(i.isdigit() for i in ids) and int(ids[0]) < int(ids[1])
    ja, jb = server.wait_job(ids[0]), server.wait_job(ids[1])
    assert (ja["name"], ja["payload"], ja["status"]) == ("alpha", {"n": 1}, "success")
    assert (jb["name"], jb["comment"], jb["timeout"], jb["url"]) == ("default", "second", 7, worker.url + "/b")
    assert sorted(worker.job_ids()) == sorted(ids)

    (from_stdin,) = lines(ok("push", "-", "-a", server.url, stdin=json.dumps({"url": worker.url + "/c", "name": "in"})))
    assert server.wait_job(from_stdin)["name"] == "in"

    # Bad input anywhere means nothing is pushed: every file is read and parsed first.
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    before = server.api("GET", "/stats")[1]["numJobs"]
    for args, message in (([a, bad], f"error: {bad}: invalid JSON"), ([a, tmp_path / "none.json"], "none.json: No such file"),
                          ([a, "-"], "stdin[0]: a job must be a JSON object")):
        p = hq("push", *args, "-a", server.url, stdin="[1, 2]")
        assert p.returncode == 1 and p.stdout == "", p
        assert message in p.stderr, p.stderr
    assert server.api("GET", "/stats")[1]["numJobs"] == before

    # A job the server refuses: its message, exit 1. Several jobs are one batch, stored all or
    # nothing, so the good file's job is not pushed either.
    nourl = tmp_path / "nourl.json"
    nourl.write_text(json.dumps({"name": "x"}))
    p = hq("push", nourl, "-a", server.url)
    assert (p.returncode, p.stdout, p.stderr) == (1, "", "error: 'url' is required\n")
    p = hq("push", a, nourl, "-a", server.url)
    assert (p.returncode, p.stdout) == (1, ""), p
    assert p.stderr == f"error: {nourl}: 'url' is required\nerror: nothing was pushed\n"
    assert server.api("GET", "/stats")[1]["numJobs"] == before


def test_push_url_one_liner_with_headers(server, worker):
    out = ok("push", "--url", worker.url + "/hook?x=1", "--payload", '{"a": [1, 2]}', "--name", "one",
             "--comment", "from the shell", "--header", "X-Team: images", "--header", "X-Empty:",
             "--header", "Authorization:Bearer a:b", "--timeout", "9", "-a", server.url)
    (job_id,) = lines(out)
    job = server.wait_job(job_id)
    assert job["status"] == "success", job
    assert (job["name"], job["comment"], job["timeout"]) == ("one", "from the shell", 9)
    assert job["headers"] == {"X-Team": "images", "X-Empty": "", "Authorization": "Bearer a:b"}
    (req,) = worker.wait_requests(1)
    assert req["path"] == "/hook?x=1" and json.loads(req["body"]) == {"a": [1, 2]}
    assert req["headers"]["x-team"] == "images" and req["headers"]["authorization"] == "Bearer a:b"
    assert req["headers"]["x-hq-job-id"] == job_id

    p = hq("push", "--url", "not-a-url", "-a", server.url)
    assert p.returncode == 1 and p.stderr.startswith("error: ") and p.stdout == "", p


def test_list_table_quiet_json_detail(server, worker):
    ids = [finished_job(server, url=worker.url + f"/{i}", name=f"job-{i}", comment=f"note\n{i}")["id"] for i in range(3)]
    table = lines(ok("list", "-a", server.url))
    assert table[0].split() == ["ID", "NAME", "CREATED", "DURATION", "STATUS"]
    assert [r.split()[0] for r in table[1:]] == ids
    for row, i in zip(table[1:], range(3)):
        assert row.split()[1] == f"job-{i}" and row.endswith("success"), row
        assert re.search(r"  (now|\d+ seconds? ago)  ", row), row
        assert re.search(r"  (0s|\d+ms|\d+(\.\d+)?s)  ", row), row  # the duration column
    starts = {row.index("STATUS") if n == 0 else row.index("success") for n, row in enumerate(table)}
    assert len(starts) == 1, table  # columns are aligned
    assert ESC not in "\n".join(table)  # stdout is a pipe: no colour

    assert lines(ok("list", "-q", "-a", server.url)) == ids

    data = json.loads(ok("list", "--json", "-a", server.url))
    assert [j["id"] for j in data["jobs"]] == ids and data["hasNext"] is False and data["count"] == 3
    assert data["jobs"][0] == server.job(ids[0])

    detail = lines(ok("list", "-d", "-a", server.url))
    assert re.split(r"\s{2,}", detail[0]) == ["ID", "NAME", "COMMENT", "URL", "CREATED", "RUN AT", "STARTED", "FINISHED",
                                             "DURATION", "ATTEMPTS", "STATUS"]
    assert "note 0" in detail[1] and worker.url + "/0" in detail[1] and "\n" not in detail[1]
    assert len(re.findall(r"now|ago", detail[1])) == 3, detail[1]
    assert re.search(r"  1/1  +success$", detail[1]), detail[1]


def test_list_filters(server, worker):
    worker.respond(500, b"boom")
    failed = finished_job(server, url=worker.url, name="b-fail", comment="needle")["id"]
    worker.respond(200)
    a1 = finished_job(server, url=worker.url, name="a-one")["id"]
    a2 = finished_job(server, url=worker.url, name="a-two")["id"]
    b1 = finished_job(server, url=worker.url, name="b-one")["id"]

    def q(*args):
        return lines(ok("list", "-q", *args, "-a", server.url))

    assert q() == [failed, a1, a2, b1]
    assert q("-n", "^a-") == [a1, a2]
    assert q("-t", "needle") == [failed]
    assert q("-r") == [b1, a2, a1, failed]
    assert q("-b", a2) == [a2, b1]
    assert q("-l", "2") == [failed, a1]
    assert q("-r", "-l", "1", "-n", "^b") == [b1]
    assert q("-s", "failure") == [failed]
    assert q(b1, failed) == [b1, failed]

    data = json.loads(ok("list", "--json", "-l", "2", "-a", server.url))
    assert [j["id"] for j in data["jobs"]] == [failed, a1]
    assert data["hasNext"] is True and data["next"] == a2 and data["count"] == 2

    # Ids: the known ones are shown, each unknown one reported, exit 1.
    p = hq("list", "-q", a1, "12345", "-a", server.url)
    assert (p.returncode, p.stdout) == (1, a1 + "\n")
    assert p.stderr == "error: The job '12345' is not found\n"
    p = hq("list", "-n", "x", a1, "-a", server.url)
    assert p.returncode == 2 and "cannot be combined" in p.stderr
    p = hq("list", "-n", "(", "-a", server.url)
    assert p.returncode == 1 and p.stderr.startswith("error: ") and p.stdout == ""
    # Nothing matches: just the header.
    assert lines(ok("list", "-n", "^zzz", "-a", server.url)) == ["ID  NAME  CREATED  DURATION  STATUS"]


def test_list_pages_past_the_servers_default_limit(make_server, worker):
    server = make_server(job_list_default_limit=2)
    ids = [server.push(url=worker.url, name=f"p{i}")["id"] for i in range(5)]
    p = hq("list", "-q", "-a", server.url)
    assert p.returncode == 0 and lines(p.stdout) == ids[:2]
    assert f"more jobs follow; use --all, or -b {ids[2]}" in p.stderr
    p = hq("list", "-q", "--all", "-a", server.url)
    assert p.returncode == 0 and lines(p.stdout) == ids and p.stderr == ""
    assert lines(ok("list", "-q", "-l", "4", "-a", server.url)) == ids[:4]
    assert lines(ok("list", "-q", "--all", "-r", "-b", ids[3], "-a", server.url)) == ids[3::-1]
    data = json.loads(ok("list", "--json", "--all", "-a", server.url))
    assert [j["id"] for j in data["jobs"]] == ids and data["count"] == 5 and data["hasNext"] is False


def test_status_colour_only_on_a_tty_without_no_color(server, worker):
    finished_job(server, url=worker.url)
    worker.respond(500)
    finished_job(server, url=worker.url)

    def on_tty(env):
        master, slave = pty.openpty()
        full_env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
        full_env.update(env)
        proc = subprocess.Popen([sys.executable, "-m", "hq_gevent", "list", "-a", server.url],
                                stdout=slave, stderr=subprocess.PIPE, env=full_env, cwd=str(ROOT))
        os.close(slave)
        chunks, deadline = [], time.monotonic() + 20
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        os.close(master)
        assert proc.wait(10) == 0, proc.stderr.read()
        return b"".join(chunks).decode()

    coloured = on_tty({})
    assert f"{ESC}[32msuccess{ESC}[0m" in coloured and f"{ESC}[31mfailure{ESC}[0m" in coloured, repr(coloured)
    assert "STATUS" in coloured and f"{ESC}[" not in coloured.splitlines()[0]
    plain = on_tty({"NO_COLOR": "1"})
    assert ESC not in plain and "success" in plain and "failure" in plain


def test_info_and_stats(server, worker):
    job = finished_job(server, url=worker.url, name="shown", payload={"k": "välue"})
    text = ok("info", job["id"], "-a", server.url)
    assert json.loads(text) == server.job(job["id"])
    assert text.startswith('{\n  "id": ') and "välue" in text
    p = hq("info", "123", "-a", server.url)
    assert (p.returncode, p.stdout, p.stderr) == (1, "", "error: The job '123' is not found\n")

    text = ok("stats", "-a", server.url)
    stats = json.loads(text)
    assert text.startswith("{\n  ")
    for key in ("queues", "dispatchers", "maxWorkers", "queueUsage", "numWaitingJobs", "numRunningJobs",
                "numWorkers", "numJobs"):
        assert key in stats, key
    assert stats["numJobs"] == 1


def test_stop_restart_delete_with_a_good_and_an_unknown_id(make_server, worker):
    server = make_server(dispatchers=1)
    worker.hold()
    running = server.push(url=worker.url, name="held")["id"]
    worker.wait_requests(1)
    waiting = server.push(url=worker.url, name="queued")["id"]
    assert server.job(waiting)["status"] == "waiting"

    p = hq("stop", waiting, "999", running, "-a", server.url)
    assert p.returncode == 1, p
    assert lines(p.stdout) == [waiting, running]
    assert p.stderr == "error: The job '999' is not found\n"
    assert server.wait_job(waiting)["status"] == "canceled"
    assert server.wait_job(running)["status"] == "canceled"
    worker.release()
    p = hq("stop", waiting, "-a", server.url)
    assert (p.returncode, p.stdout, p.stderr) == (1, "", f"error: The job {waiting} is not active\n")

    p = hq("restart", running, "999", "-a", server.url)
    assert (p.returncode, lines(p.stdout)) == (1, [running]) and "error: The job '999' is not found" in p.stderr
    assert server.wait_job(running)["status"] == "success"
    (copy,) = lines(ok("restart", "-c", waiting, "-a", server.url))
    assert copy != waiting and int(copy) > int(waiting)
    assert server.wait_job(copy)["name"] == "queued" and server.job(waiting)["status"] == "canceled"
    (again,) = lines(ok("restart", "--copy", copy, "-a", server.url))
    assert again not in (copy, waiting)
    server.wait_job(again)

    p = hq("delete", "999", waiting, "-a", server.url)
    assert (p.returncode, lines(p.stdout)) == (1, [waiting]) and p.stderr == "error: The job '999' is not found\n"
    assert server.api("GET", f"/job/{waiting}")[0] == 422
    assert lines(ok("delete", copy, again, "-a", server.url)) == [copy, again]
    assert lines(ok("list", "-q", "-a", server.url)) == [running]


def test_wait_success_failure_timeout_and_pipeline(server, worker, tmp_path):
    good = server.push(url=worker.url, name="good")["id"]
    p = hq("wait", good, "-a", server.url)
    assert (p.returncode, p.stdout, p.stderr) == (0, f"{good} success\n", "")

    worker.respond(500)
    bad = server.push(url=worker.url)["id"]
    p = hq("wait", good, bad, "--timeout", "20", "-a", server.url)
    assert p.returncode == 1 and sorted(lines(p.stdout)) == sorted([f"{good} success", f"{bad} failure"]), p

    p = hq("wait", good, "999", "-a", server.url)
    assert p.returncode == 1 and p.stdout == f"{good} success\n" and "error: The job '999' is not found" in p.stderr

    worker.respond(200)
    worker.hold()
    held = server.push(url=worker.url)["id"]
    started = time.monotonic()
    p = hq("wait", good, held, "--timeout", "0.5", "-a", server.url)
    assert p.returncode == 2, p
    assert time.monotonic() - started < 10
    assert p.stdout == f"{good} success\n" and p.stderr == f"error: timed out after 0.5s waiting for {held}\n"
    worker.release()
    server.wait_job(held)

    # The scripting idiom of the README: push, then wait on what was pushed.
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"url": worker.url, "name": "piped"}))
    hq_cmd = f"{sys.executable} -m hq_gevent"
    p = subprocess.run(["bash", "-c", f"set -o pipefail; {hq_cmd} push {job} {job} -a {server.url} | "
                                      f"xargs {hq_cmd} wait --timeout 20 -a {server.url}"],
                       capture_output=True, text=True, cwd=str(ROOT), timeout=60)
    assert p.returncode == 0, p
    assert [line.split()[1] for line in lines(p.stdout)] == ["success", "success"]


def test_wait_timeout_holds_even_when_the_server_is_silent():
    listener = socket.socket()  # accepts connections (the backlog) but never answers
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        started = time.monotonic()
        p = hq("wait", "1", "--timeout", "0.5", "-a", f"http://127.0.0.1:{listener.getsockname()[1]}")
        assert (p.returncode, p.stdout) == (2, ""), p
        assert p.stderr == "error: timed out after 0.5s waiting for 1\n"
        assert time.monotonic() - started < 10
    finally:
        listener.close()


# --- delivery policy and batch push (SPEC §10) ---------------------------------------------
def rfc3339_ms(t):
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def seconds_from_now(text):
    return (datetime.fromisoformat(text.replace("Z", "+00:00")) - datetime.now(timezone.utc)).total_seconds()


def logged(access_log, method, uri):
    """How many `method uri` requests the server's access log shows."""
    if not access_log.exists():
        return 0
    entries = [json.loads(line) for line in access_log.read_text().splitlines() if line.strip()]
    return sum(1 for e in entries if (e["method"], e["uri"]) == (method, uri))


def wait_logged(access_log, method, uri, count, timeout=10):
    # The access-log line is written just after the answer: give it a moment.
    deadline = time.monotonic() + timeout
    while logged(access_log, method, uri) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # a surplus request would show up now
    return logged(access_log, method, uri)


def test_push_policy_options_reach_the_server(server, worker, tmp_path):
    (first,) = lines(ok("push", "--url", worker.url, "--retry", "3", "--min-backoff", "0.5", "--max-backoff", "2",
                        "--delay", "600", "--unique-key", "nightly-1", "-a", server.url))
    job = server.job(first)
    assert job["retry"] == {"maxAttempts": 3, "minBackoff": 0.5, "maxBackoff": 2, "maxRetryDuration": 0}, job
    assert 540 < seconds_from_now(job["runAt"]) <= 600, job["runAt"]
    assert (job["uniqueKey"], job["attempts"], job["status"]) == ("nightly-1", 0, "waiting")

    # The options override the file's own policy key by key; --run-at replaces the file's delay.
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"url": worker.url, "retry": {"maxAttempts": 2, "maxRetryDuration": 60}, "delay": 5}))
    at = rfc3339_ms(datetime.now(timezone.utc) + timedelta(hours=1))
    (second,) = lines(ok("push", policy, "--retry", "4", "--run-at", at, "-a", server.url))
    job = server.job(second)
    assert job["retry"] == {"maxAttempts": 4, "minBackoff": 1, "maxBackoff": 3600, "maxRetryDuration": 60}, job
    assert (job["runAt"], job["uniqueKey"]) == (at, None)

    # A duplicate uniqueKey prints the stored job's id, says so on stderr, stores nothing.
    p = hq("push", "--url", worker.url + "/other", "--unique-key", "nightly-1", "-a", server.url)
    assert (p.returncode, p.stdout) == (0, first + "\n"), p
    assert p.stderr.startswith(f"note: {first} is the job already pushed with uniqueKey 'nightly-1'"), p.stderr
    assert server.api("GET", "/stats")[1]["numJobs"] == 2
    same = json.dumps([{"url": worker.url, "uniqueKey": "twice"}, {"url": worker.url, "uniqueKey": "twice"}])
    ids = lines(ok("push", "-", "-a", server.url, stdin=same))
    assert len(ids) == 2 and ids[0] == ids[1] and server.api("GET", "/stats")[1]["numJobs"] == 3

    # One key for several jobs is a usage error; a value the server refuses is its error.
    p = hq("push", policy, policy, "--unique-key", "k", "-a", server.url)
    assert p.returncode == 2 and "--unique-key names one job" in p.stderr, p
    for args in (["--run-at", "next tuesday"], ["--min-backoff", "0"], ["--retry", "1001"], ["--delay", "31536001"]):
        p = hq("push", "--url", worker.url, *args, "-a", server.url)
        assert p.returncode == 1 and p.stdout == "" and p.stderr.startswith("error: "), (args, p)
    assert server.api("GET", "/stats")[1]["numJobs"] == 3


def test_push_of_several_files_is_one_batch(make_server, worker, tmp_path):
    access = tmp_path / "access.log"
    server = make_server(access_log_file=str(access))
    files = []
    for n in range(3):
        files.append(tmp_path / f"f{n}.json")
        files[-1].write_text(json.dumps({"url": worker.url, "name": f"f{n}"}))
    ids = lines(ok("push", *files, "--retry", "2", "-a", server.url))
    assert len(ids) == 3 and ids == sorted(ids, key=int), ids
    stored = [server.job(i) for i in ids]
    assert [j["name"] for j in stored] == ["f0", "f1", "f2"] and {j["retry"]["maxAttempts"] for j in stored} == {2}
    assert server.api("GET", "/stats")[1]["numJobs"] == 3
    assert wait_logged(access, "POST", "/jobs", 1) == 1 and logged(access, "POST", "/job") == 0


def test_push_of_1500_jobs_from_stdin_takes_two_batches(make_server, worker, tmp_path):
    access = tmp_path / "access.log"
    server = make_server(access_log_file=str(access))
    jobs = [{"url": worker.url, "name": f"n{i}"} for i in range(1500)]
    ids = lines(ok("push", "-", "-a", server.url, stdin=json.dumps(jobs), timeout=120))
    assert len(set(ids)) == 1500 and ids == sorted(ids, key=int)
    listed = json.loads(ok("list", "--json", "--all", "-a", server.url))["jobs"]
    assert [(j["id"], j["name"]) for j in listed] == [(i, f"n{n}") for n, i in enumerate(ids)]
    assert wait_logged(access, "POST", "/jobs", 2) == 2 and logged(access, "POST", "/job") == 0
    assert ok("push", "-", "-a", server.url, stdin="[]") == ""  # no jobs, no request
    assert logged(access, "POST", "/jobs") == 2

    # A bad job in the second batch: the first batch is stored and printed, none of the second.
    jobs[1203] = {"name": "no url"}
    p = hq("push", "-", "-a", server.url, stdin=json.dumps(jobs), timeout=120)
    assert p.returncode == 1 and len(lines(p.stdout)) == 1000, (p.returncode, p.stderr)
    assert p.stderr == ("error: stdin[1203]: 'url' is required\n"
                        "error: 1000 of 1500 jobs were pushed (the ids above), the rest were not\n")
    assert server.api("GET", "/stats")[1]["numJobs"] == 2500
    assert lines(ok("list", "-q", "--all", "-a", server.url))[1500:] == lines(p.stdout)


def table(text):
    """A `list` table as dicts, cut at the header's column starts (cells may be empty)."""
    rows = lines(text)
    names = re.split(r"\s{2,}", rows[0])
    starts = [rows[0].index(name) for name in names]
    ends = starts[1:] + [None]
    return [{name: row[a:b].strip() for name, a, b in zip(names, starts, ends)} for row in rows[1:]]


def test_list_detail_shows_attempts_and_run_at(server, worker):
    done = finished_job(server, url=worker.url, name="done")["id"]
    later = server.push(url=worker.url, name="later", retry={"maxAttempts": 5}, delay=600)["id"]
    rows = {r["ID"]: r for r in table(ok("list", "-d", "-a", server.url))}
    assert (rows[done]["ATTEMPTS"], rows[done]["RUN AT"], rows[done]["STATUS"]) == ("1/1", "", "success")
    assert rows[later]["ATTEMPTS"] == "0/5" and rows[later]["STATUS"] == "waiting"
    assert re.fullmatch(r"(9|10) minutes from now", rows[later]["RUN AT"]), rows[later]


def test_info_shows_the_history_of_attempts(server, worker):
    worker.respond(500, b"boom")
    (job_id,) = lines(ok("push", "--url", worker.url, "--retry", "2", "--min-backoff", "0.1", "--max-backoff", "0.1",
                         "-a", server.url))
    assert server.wait_job(job_id)["status"] == "failure"
    text = ok("info", job_id, "-a", server.url)
    job = json.loads(text)
    assert job == server.job(job_id) and job["attempts"] == 2
    assert [(h["attempt"], h["statusCode"]) for h in job["history"]] == [(1, 500)]
    # Indented like the rest, one key a line.
    assert '\n  "history": [\n    {\n      "attempt": 1,\n' in text, text


def test_wait_keeps_waiting_while_a_job_waits_for_a_retry(server, worker):
    worker.respond(500)
    (job_id,) = lines(ok("push", "--url", worker.url, "--retry", "3", "--min-backoff", "2", "--max-backoff", "2",
                         "-a", server.url))
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_ENV}
    env["HQ_TOKEN_FILE"] = str(ROOT / "no-such-token-file")
    proc = subprocess.Popen([sys.executable, "-m", "hq_gevent", "wait", job_id, "--timeout", "60", "-a", server.url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))
    try:
        job = server.wait_job(job_id, statuses=("waiting",), timeout=15)
        deadline = time.monotonic() + 15
        while job["attempts"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
            job = server.job(job_id)
        assert (job["attempts"], job["status"]) == (1, "waiting"), job  # the backoff of 1-2 s starts
        worker.respond(200)
        assert proc.poll() is None  # a job waiting for its retry has not finished
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (proc.returncode, out, err) == (0, f"{job_id} success\n", "")
    assert server.job(job_id)["attempts"] == 2


# --- tokens and TLS (SPEC §11) ---------------------------------------------------------------
TOKEN = "cli-test-token-0123456789"
READ_TOKEN = "cli-read-only-token-0123456789"


def start_guarded(make_server, **config):
    """Start a server that wants a token or speaks TLS, and its address. conftest's readiness
    probe (a plain GET / without a token) cannot see such a server ready, so probe here."""
    srv = make_server(start=False, **config)
    srv.start(wait=False)
    scheme = "https" if config.get("tls_cert_file") else "http"
    address = f"{scheme}://127.0.0.1:{srv.port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if srv.proc.poll() is not None:
            raise RuntimeError(f"server exited with {srv.proc.returncode}:\n{srv.log()}")
        try:
            requests.get(address + "/", timeout=1, verify=config.get("tls_cert_file") or True)
            return srv, address
        except requests.RequestException:
            time.sleep(0.05)
    raise RuntimeError(f"server not ready in 20s:\n{srv.log()}")


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1, made by the openssl CLI: (cert.pem, key.pem)."""
    require_tool("openssl", "makes the test's TLS certificate")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    return cert, key


def test_token_from_flag_env_or_token_file(make_server, worker, tmp_path):
    srv, address = start_guarded(make_server, auth_tokens=[TOKEN], auth_read_tokens=[READ_TOKEN])
    p = hq("stats", "-a", address)
    assert (p.returncode, p.stdout, p.stderr) == (1, "", "error: Unauthorized (give a token with --token or $HQ_TOKEN)\n")
    p = hq("stop", "1", "2", "3", "-a", address)  # said once, not once per id
    assert (p.returncode, p.stdout, p.stderr) == (1, "", "error: Unauthorized (give a token with --token or $HQ_TOKEN)\n")

    assert json.loads(ok("stats", "--token", TOKEN, "-a", address))["numJobs"] == 0
    (one,) = lines(ok("push", "--url", worker.url, "-a", address, env={"HQ_TOKEN": TOKEN}))
    files = [tmp_path / "a.json", tmp_path / "b.json"]
    for f in files:
        f.write_text(json.dumps({"url": worker.url}))
    two = lines(ok("push", *files, "--token", TOKEN, "-a", address))  # POST /jobs too
    assert len(two) == 2
    assert lines(ok("wait", one, *two, "--token", TOKEN, "-a", address)) == [f"{i} success" for i in [one, *two]]

    p = hq("stats", "--token", "wrong-token-0123456789", "-a", address)
    assert (p.returncode, p.stderr) == (1, "error: Unauthorized (the server refused the token from --token)\n")

    # The token file of an installed server (here a temp file via $HQ_TOKEN_FILE): first token, comments skipped.
    token_file = tmp_path / "tokens"
    token_file.write_text(f"# hq-gevent API tokens\n\n   {TOKEN}  \nsecond-token-0123456789\n")
    assert lines(ok("list", "-q", "-a", address, env={"HQ_TOKEN_FILE": str(token_file)})) == [one, *two]
    p = hq("stats", "-a", address, env={"HQ_TOKEN_FILE": str(token_file), "HQ_TOKEN": "wrong-token-0123456789"})
    assert p.stderr == "error: Unauthorized (the server refused the token from $HQ_TOKEN)\n"  # $HQ_TOKEN comes first
    p = hq("stats", "--token", "a secret with spaces", "-a", address)
    assert (p.returncode, p.stderr) == (1, "error: the token must be printable ASCII without spaces\n")
    token_file.write_text("# no token yet\n")
    p = hq("stats", "-a", address, env={"HQ_TOKEN_FILE": str(token_file)})
    assert p.stderr == "error: Unauthorized (give a token with --token or $HQ_TOKEN)\n"

    # A read token lists but cannot change anything.
    assert lines(ok("list", "-q", "-a", address, env={"HQ_TOKEN": READ_TOKEN})) == [one, *two]
    p = hq("push", "--url", worker.url, "-a", address, env={"HQ_TOKEN": READ_TOKEN})
    assert (p.returncode, p.stdout, p.stderr) == (1, "", "error: Forbidden (the token from $HQ_TOKEN may only read)\n")
    assert srv.log().count(TOKEN) == srv.log().count(READ_TOKEN) == 0


def test_cacert_verifies_a_tls_server(make_server, worker, tls_cert, tmp_path):
    cert, key = tls_cert
    srv, address = start_guarded(make_server, tls_cert_file=str(cert), tls_key_file=str(key))
    (job_id,) = lines(ok("push", "--url", worker.url, "--cacert", cert, "-a", address))
    assert lines(ok("wait", job_id, "-a", address, env={"HQ_CACERT": str(cert)})) == [f"{job_id} success"]

    p = hq("stats", "-a", address)  # the system's CAs do not know this certificate
    assert p.returncode == 1 and p.stdout == "" and len(lines(p.stderr)) == 1, p
    assert p.stderr.startswith(f"error: cannot reach hq-gevent at {address}: ") and "certificate verify failed" in p.stderr
    assert p.stderr.endswith("(give the CA certificate that signed the server's with --cacert or $HQ_CACERT)\n"), p.stderr
    p = hq("stats", "--cacert", tmp_path / "none.pem", "-a", address)
    assert (p.returncode, p.stderr) == (1, f"error: CA certificate file not found: {tmp_path / 'none.pem'}\n")

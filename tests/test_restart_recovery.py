"""Jobs survive restarts and crashes; the log's torn tail, corrupt lines and the data_dir lock."""
import json
import os


def log_path(srv):
    return os.path.join(srv.data_dir, "jobs.jsonl")


def test_jobs_survive_sigterm_restart(make_server, worker):
    srv = make_server()
    done = srv.wait_job(srv.push(url=worker.url, name="kept", payload={"x": 1})["id"])
    assert srv.stop() == 0
    srv.start()
    again = srv.job(done["id"])
    assert again == done


def test_sigkill_while_jobs_wait_then_they_run_after_restart(make_server, worker):
    srv = make_server(dispatchers=1, max_workers=0)
    worker.hold()
    ids = [srv.push(url=worker.url, name=f"w{i}")["id"] for i in range(10)]
    worker.wait_requests(1)  # the first is in flight, nine wait
    srv.kill()
    worker.release()
    srv.start()
    for job_id in ids:
        assert srv.wait_job(job_id)["status"] == "success"
    delivered = worker.job_ids()
    assert set(delivered) == set(ids)
    assert len(delivered) in (10, 11)  # the in-flight one may be delivered twice (at-least-once)


def test_ids_keep_growing_across_restarts(make_server, worker):
    srv = make_server()
    first = srv.push(url=worker.url)["id"]
    srv.restart()
    second = srv.push(url=worker.url)["id"]
    assert int(second) > int(first)


def test_torn_last_line_is_dropped_with_a_warning(make_server, worker):
    srv = make_server()
    kept = srv.wait_job(srv.push(url=worker.url)["id"])
    assert srv.stop() == 0
    size = os.path.getsize(log_path(srv))
    with open(log_path(srv), "ab") as f:
        f.write(b'["p",12345,"torn","","http://x/",nu')
    srv.start()
    assert "torn" in srv.log()
    assert srv.job(kept["id"]) == kept
    assert os.path.getsize(log_path(srv)) == size
    assert srv.push(url=worker.url)["status"] == "waiting"


def test_corrupt_middle_line_refuses_to_start_naming_file_and_line(make_server, worker):
    srv = make_server()
    for _ in range(3):
        srv.wait_job(srv.push(url=worker.url)["id"])
    assert srv.stop() == 0
    with open(log_path(srv), "rb") as f:
        lines = f.read().split(b"\n")
    lines[1] = b'{"garbage'
    with open(log_path(srv), "wb") as f:
        f.write(b"\n".join(lines))
    srv.start(wait=False)
    assert srv.proc.wait(20) == 1
    assert f"{log_path(srv)}:2" in srv.log()


def test_second_server_on_the_same_data_dir_is_refused(make_server):
    first = make_server()
    second = make_server(start=False, data_dir=first.data_dir)
    second.start(wait=False)
    assert second.proc.wait(20) == 1
    assert f"pid {first.proc.pid}" in second.log()
    assert first.api("GET", "/")[0] == 200


def test_temporary_data_dir_is_announced_and_removed(make_server):
    srv = make_server(data_dir=None)
    lines = srv.log().splitlines()
    assert " WARN Created temporary data directory: " in lines[0]
    path = lines[0].rsplit(": ", 1)[1].strip()
    assert os.path.isdir(path)
    assert any(f"The server Listening on 127.0.0.1:{srv.port} (pid: {srv.proc.pid})" in line for line in lines)
    assert srv.stop() == 0
    assert not os.path.exists(path)


def test_restart_reloads_stopped_and_deleted_state(make_server, worker):
    srv = make_server(dispatchers=1)
    worker.hold()
    running = srv.push(url=worker.url)["id"]
    waiting = srv.push(url=worker.url)["id"]
    worker.wait_requests(1)
    srv.api("POST", f"/job/{waiting}/stop")
    srv.api("POST", f"/job/{running}/stop")
    worker.release()
    done = srv.wait_job(srv.push(url=worker.url)["id"])
    srv.api("DELETE", f"/job/{done['id']}")
    before = {j: srv.job(j) for j in (running, waiting)}
    srv.restart()
    for job_id, job in before.items():
        assert srv.job(job_id) == job and job["status"] == "canceled"
    assert srv.api("GET", f"/job/{done['id']}")[0] == 422


def test_log_lines_are_json_arrays(make_server, worker):
    srv = make_server()
    srv.wait_job(srv.push(url=worker.url)["id"])
    srv.stop()
    with open(log_path(srv)) as f:
        records = [json.loads(line) for line in f]
    assert [r[0] for r in records] == ["p", "p"]

"""allowed_hosts (SPEC §11) through a real server: refused at push, and checked at connect."""
from conftest import FINISHED


def test_push_to_a_host_not_allowed_is_refused_and_nothing_stored(make_server, worker):
    # Name patterns only: a host that matches none is refused at push (with an address pattern
    # in the list, a name could still resolve into it, so it would be checked at connect instead).
    srv = make_server(allowed_hosts=["workers.example.com", "*.internal.example", "localhost:" + str(worker.port)])
    status, body = srv.api("POST", "/job", {"url": "http://evil.example.org/x"})
    assert (status, body) == (422, {"status": 422, "error": "'url' host is not allowed: evil.example.org"})
    status, body = srv.api("POST", "/jobs", [{"url": "http://workers.example.com/"}, {"url": "http://10.1.2.3/"}])
    assert status == 422 and body["error"] == "jobs[1]: 'url' host is not allowed: 10.1.2.3"
    assert srv.api("GET", "/stats")[1]["numJobs"] == 0
    job = srv.push(url=f"http://localhost:{worker.port}/x")  # host:port pattern
    assert srv.wait_job(job["id"], FINISHED)["status"] == "success"
    assert srv.api("POST", "/job", {"url": f"http://localhost:{worker.port + 1}/"})[0] == 422  # other port
    assert srv.api("POST", "/job", {"url": "http://a.internal.example/"})[0] == 200  # a subdomain


def test_a_name_that_resolves_outside_the_allowed_blocks_fails_the_attempt(make_server, worker):
    srv = make_server(allowed_hosts=["10.0.0.0/8"])
    job = srv.push(url=f"http://localhost:{worker.port}/x")  # a name: it can only be checked once resolved
    done = srv.wait_job(job["id"], FINISHED)
    assert done["status"] == "failure" and "address not allowed" in done["err"]
    assert done["err"].startswith("failed to do http request:")
    assert worker.requests == []


def test_the_connected_address_inside_a_block_is_allowed(make_server, worker):
    srv = make_server(allowed_hosts=["127.0.0.0/8"])
    job = srv.push(url=f"http://localhost:{worker.port}/x")
    assert srv.wait_job(job["id"], FINISHED)["status"] == "success"


def test_bad_pattern_stops_the_start(make_server):
    srv = make_server(start=False, allowed_hosts=["10.0.0.0/99"])
    srv.write_config()
    import subprocess
    import sys

    from conftest import ROOT
    out = subprocess.run([sys.executable, "-m", "hq_gevent", "serve", "-c", str(srv.config_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "allowed_hosts" in out.stderr

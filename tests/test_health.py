"""Liveness and readiness (SPEC §12) while the job log loads: the server listens first."""
import os
import time

import requests

from test_faults import log_path, make_large_log


def test_readyz_is_503_while_the_log_loads_then_ready(make_server):
    srv = make_server(start=False, access_log_file="")
    os.makedirs(srv.data_dir)
    make_large_log(log_path(srv), 300_000)  # 600k records: well over a second to replay
    srv.start(wait=False)
    seen = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            ready = requests.get(srv.url + "/readyz", timeout=2)
        except requests.ConnectionError:
            time.sleep(0.01)  # not listening yet
            continue
        seen.add(ready.status_code)
        if ready.status_code == 503:
            assert ready.json() == {"status": 503, "error": "the job log is loading"}
            assert requests.get(srv.url + "/healthz", timeout=2).json() == {"status": "ok"}
            listing = requests.get(srv.url + "/job?limit=1", timeout=2)
            assert listing.status_code in (503, 200)  # 200 only if the load ended in between
        if ready.status_code == 200:
            assert ready.json() == {"status": "ready"}
            break
        time.sleep(0.005)
    assert seen == {503, 200}, srv.log()
    assert srv.api("GET", "/stats")[1]["numJobs"] == 300_000

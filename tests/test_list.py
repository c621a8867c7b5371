"""GET /job: filters, paging with begin/next in both directions, limits (SPEC §5)."""
import pytest

from conftest import HQServer, WorkerApp


@pytest.fixture(scope="module")
def listed(tmp_path_factory):
    """A server holding 30 finished jobs: names a0..a9 (success), b0..b9 (failure), c0..c9 (success)."""
    worker = WorkerApp()
    srv = HQServer(tmp_path_factory.mktemp("list"), {"dispatchers": 1}).start()
    ids = []
    for group in "abc":
        worker.respond(500 if group == "b" else 200, b"x")
        for i in range(10):
            job = srv.push(url=worker.url + f"/{group}", name=f"{group}{i}", comment=f"note-{group}{i}")
            srv.wait_job(job["id"])
            ids.append(job["id"])
    yield srv, ids
    srv.stop()
    worker.close()


def get(srv, query):
    status, body = srv.api("GET", "/job?" + query)
    assert status == 200, body
    return body


def names(body):
    return [job["name"] for job in body["jobs"]]


def test_all_in_id_order(listed):
    srv, ids = listed
    body = get(srv, "")
    assert [j["id"] for j in body["jobs"]] == ids
    assert body["count"] == 30 and body["hasNext"] is False and "next" not in body


def test_reverse(listed):
    srv, ids = listed
    assert [j["id"] for j in get(srv, "reverse=1")["jobs"]] == ids[::-1]
    assert [j["id"] for j in get(srv, "reverse=true")["jobs"]] == ids[::-1]


def test_paging_forward_walks_everything_once(listed):
    srv, ids = listed
    seen, begin, pages = [], "", 0
    while True:
        body = get(srv, f"limit=7&begin={begin}")
        seen += [j["id"] for j in body["jobs"]]
        pages += 1
        if not body["hasNext"]:
            break
        assert body["next"] == ids[len(seen)]
        begin = body["next"]
    assert seen == ids and pages == 5


def test_paging_backward(listed):
    srv, ids = listed
    seen, begin = [], ""
    while True:
        body = get(srv, f"limit=8&reverse=1&begin={begin}")
        seen += [j["id"] for j in body["jobs"]]
        if not body["hasNext"]:
            break
        begin = body["next"]
    assert seen == ids[::-1]


def test_exact_limit_at_the_end_has_no_next(listed):
    srv, ids = listed
    body = get(srv, f"limit=5&begin={ids[25]}")
    assert body["count"] == 5 and body["hasNext"] is False


def test_begin_between_ids_starts_at_next_one(listed):
    srv, ids = listed
    between = str(int(ids[3]) + 1)
    assert between not in ids
    assert get(srv, f"begin={between}&limit=1")["jobs"][0]["id"] == ids[4]
    assert get(srv, f"begin={between}&limit=1&reverse=1")["jobs"][0]["id"] == ids[3]
    assert get(srv, "begin=1&limit=1")["jobs"][0]["id"] == ids[0]
    assert get(srv, f"begin={int(ids[-1]) + 10}")["count"] == 0


def test_name_regex(listed):
    srv, _ = listed
    assert names(get(srv, "name=^b[0-2]$")) == ["b0", "b1", "b2"]
    assert get(srv, "name=^zzz")["count"] == 0


def test_term_matches_name_id_comment_url_status(listed):
    srv, ids = listed
    assert names(get(srv, "term=note-c3")) == ["c3"]
    assert get(srv, f"term={ids[7]}")["jobs"][0]["id"] == ids[7]
    assert len(get(srv, "term=/a$")["jobs"]) == 10  # url ends in /a
    assert len(get(srv, "term=^failure$")["jobs"]) == 10


def test_status_filter(listed):
    srv, _ = listed
    assert names(get(srv, "status=failure")) == [f"b{i}" for i in range(10)]
    assert len(get(srv, "status=success")["jobs"]) == 20
    assert get(srv, "status=waiting")["count"] == 0


def test_filtered_paging_next_is_the_following_stored_job(listed):
    srv, ids = listed
    body = get(srv, "status=failure&limit=3")
    assert names(body) == ["b0", "b1", "b2"]
    assert body["hasNext"] is True and body["next"] == ids[13]  # b3: the stored job after b2
    body = get(srv, f"status=failure&limit=3&begin={body['next']}")
    assert names(body) == ["b3", "b4", "b5"]


def test_filter_that_stops_on_limit_at_the_last_job(listed):
    srv, ids = listed
    body = get(srv, "name=^c9$&limit=1")
    assert names(body) == ["c9"] and body["hasNext"] is False


def test_combined_filters(listed):
    srv, _ = listed
    assert names(get(srv, "name=^[ab]&status=success&limit=3")) == ["a0", "a1", "a2"]


def test_negative_limit_means_no_limit(listed):
    srv, _ = listed
    assert get(srv, "limit=-1")["count"] == 30


def test_default_limit_from_config(tmp_path, worker):
    srv = HQServer(tmp_path, {"job_list_default_limit": 2}).start()
    try:
        for _ in range(3):
            srv.push(url=worker.url)
        body = get(srv, "")
        assert body["count"] == 2 and body["hasNext"] is True
        assert get(srv, "limit=0")["count"] == 2
        assert get(srv, "limit=-1")["count"] == 3
    finally:
        srv.stop()

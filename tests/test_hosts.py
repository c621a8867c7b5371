"""allowed_hosts (SPEC §11): every pattern form, the push check, and the check of the address a
worker request actually connects to (real sockets on 127.0.0.1)."""
import pytest
from test_delivery import RawWorker

from hq_gevent.delivery import Delivery, DeliveryError
from hq_gevent.hosts import AllowedHosts

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def refusal(patterns, url):
    return AllowedHosts(patterns).push_refusal(url)


@pytest.mark.parametrize("patterns,url,allowed", [
    ([], "http://anything.example:1234/", True),
    (["api.example.com"], "http://API.Example.com/x", True),
    (["api.example.com"], "http://api.example.com.:8080/", True),
    (["api.example.com"], "http://example.com/", False),
    (["api.example.com"], "http://api.example.com.evil.org/", False),
    (["*.example.com"], "http://a.example.com/", True),
    (["*.example.com"], "https://a.b.example.com/", True),
    (["*.example.com"], "http://example.com/", False),
    (["*.example.com"], "http://badexample.com/", False),
    (["api.example.com:8080"], "http://api.example.com:8080/", True),
    (["api.example.com:8080"], "http://api.example.com/", False),
    (["api.example.com:443"], "https://api.example.com/", True),
    (["10.1.2.3"], "http://10.1.2.3:9000/", True),
    (["10.1.2.3"], "http://10.1.2.4/", False),
    (["10.1.2.3:80"], "http://10.1.2.3/", True),
    (["10.1.2.3:80"], "http://10.1.2.3:81/", False),
    (["10.0.0.0/8"], "http://10.200.0.1/", True),
    (["10.0.0.0/8"], "http://11.0.0.1/", False),
    (["fd00::/8"], "http://[fd12::1]/", True),
    (["fd00::/8"], "http://[fe80::1]/", False),
    (["[fd00::1]:8443"], "https://[fd00::1]:8443/", True),
    (["[fd00::1]:8443"], "https://[fd00::1]/", False),
    (["::ffff:0:0/96", "example.org"], "http://127.0.0.1/", False),
    # A name no name pattern matches passes the push only when address patterns can judge it later.
    (["10.0.0.0/8"], "http://internal.example/", True),
    (["example.org"], "http://internal.example/", False),
])
def test_pattern_forms_at_push(patterns, url, allowed):
    assert (refusal(patterns, url) is None) is allowed


def test_refusal_message():
    assert refusal(["example.org"], "http://Evil.Example.NET:81/x") == "'url' host is not allowed: evil.example.net"
    assert refusal(["10.0.0.0/8"], "http://[::1]/") == "'url' host is not allowed: ::1"


@pytest.mark.parametrize("pattern", ["", "  ", "*", "*.", "a b", "http://x", "h:0", "h:65536", "h:x",
                                     "10.0.0.0/33", "300.1.1.1/8", "[zz]:80", "[::1]x", "a..b", "-a.com"])
def test_bad_pattern_is_a_clear_error(pattern):
    with pytest.raises(ValueError, match="allowed_hosts"):
        AllowedHosts([pattern])


def test_ipv4_mapped_address_is_its_ipv4_address():
    hosts = AllowedHosts(["10.0.0.0/8"])
    assert hosts.address_allowed("::ffff:10.1.1.1", 80) and not hosts.address_allowed("::ffff:127.0.0.1", 80)


# --- at connect time: the address actually connected to ---------------------------------------

@pytest.fixture
def raw_ok():
    worker = RawWorker(OK)
    yield worker
    worker.close()


def send(patterns, url):
    return Delivery(1 << 20, allowed_hosts=AllowedHosts(patterns)).send(1, url, "{}", None, 10)


def test_a_name_that_resolves_outside_the_blocks_fails_the_attempt(raw_ok):
    url = raw_ok.url.replace("127.0.0.1", "localhost")
    with pytest.raises(DeliveryError, match=r'^failed to do http request: Post "http://localhost:\d+": address not allowed \(') as e:
        send(["10.0.0.0/8"], url)
    assert "127.0.0.1" in str(e.value) or "::1" in str(e.value)
    assert raw_ok.requests == []
    assert send(["127.0.0.0/8"], url).status == 200
    assert len(raw_ok.requests) == 1


def test_a_name_pattern_vouches_for_the_name(raw_ok):
    assert send(["localhost"], raw_ok.url.replace("127.0.0.1", "localhost")).status == 200


def test_an_ip_literal_is_checked_at_connect_too(raw_ok):
    """A job pushed before allowed_hosts was tightened (it runs after a restart) is still refused."""
    port = int(raw_ok.url.rsplit(":", 1)[1])
    with pytest.raises(DeliveryError, match=r"address not allowed \(127\.0\.0\.1\)"):
        send(["10.0.0.0/8"], raw_ok.url)
    with pytest.raises(DeliveryError, match="address not allowed"):
        send([f"127.0.0.1:{port + 1}"], raw_ok.url)
    assert send([f"127.0.0.1:{port}"], raw_ok.url).status == 200
    assert raw_ok.requests and len(raw_ok.requests) == 1


# --- through a real server (config allowed_hosts) ------------------------------------------------

def test_server_refuses_at_push_and_at_connect(make_server, worker):
    server = make_server(allowed_hosts=["10.0.0.0/8", "*.example.org"])
    status, body = server.api("POST", "/job", {"url": "http://127.0.0.1:9/"})
    assert (status, body) == (422, {"status": 422, "error": "'url' host is not allowed: 127.0.0.1"})
    job = server.wait_job(server.push(url=worker.url.replace("127.0.0.1", "localhost"))["id"])
    assert job["status"] == "failure" and "address not allowed" in job["err"], job
    assert worker.requests == []
    open_server = make_server(allowed_hosts=["127.0.0.0/8"], name="loopback-allowed")
    assert open_server.wait_job(open_server.push(url=worker.url.replace("127.0.0.1", "localhost"))["id"])["status"] == "success"

"""TLS on the listener (issue 12, SPEC §11): HTTPS with a self-signed certificate made by the
openssl CLI, plain HTTP on that port refused cleanly, a silent client dropped."""
import socket
import subprocess
import time

import pytest
import requests

from conftest import require_tool


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """(cert.pem, key.pem): self-signed for 127.0.0.1, so it is also the client's CA file."""
    require_tool("openssl", "making a self-signed certificate")
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture
def tls_server(make_server, certificate):
    def start(**config):
        cert, key = certificate
        srv = make_server(start=False, tls_cert_file=str(cert), tls_key_file=str(key), **config)
        srv.start(wait=False)
        srv.https = f"https://127.0.0.1:{srv.port}"
        deadline = time.monotonic() + 20
        while True:
            assert srv.proc.poll() is None, srv.log()
            try:
                if requests.get(srv.https + "/readyz", verify=str(cert), timeout=1).status_code == 200:
                    return srv
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.05)
    return start


def test_https_serves_the_api(tls_server, certificate, worker):
    cert, _ = certificate
    srv = tls_server()
    # verify= on each call: a session's own verify loses to $REQUESTS_CA_BUNDLE when that is set.
    session = requests.Session()
    r = session.get(srv.https + "/", verify=str(cert), timeout=10)
    assert r.status_code == 200 and "version" in r.json()
    job = session.post(srv.https + "/job", json={"url": worker.url + "/tls"}, verify=str(cert), timeout=10).json()
    deadline = time.monotonic() + 15
    while session.get(f"{srv.https}/job/{job['id']}", verify=str(cert), timeout=10).json()["status"] != "success":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # The certificate is really the server's: without the CA file, verification fails.
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(srv.https + "/", timeout=10)
    assert "TLS on" in srv.log()


def test_plain_http_on_the_tls_port_fails_cleanly(tls_server, certificate):
    cert, _ = certificate
    srv = tls_server()
    answered = 0
    for _ in range(20):
        try:
            r = requests.get(f"http://127.0.0.1:{srv.port}/job", timeout=10)
        except requests.ConnectionError:
            continue
        # Like Go's server: a plain-text 400 that says what went wrong.
        assert r.status_code == 400 and "HTTPS" in r.text, r.text
        answered += 1
    assert answered > 0
    # Garbage that is neither HTTP nor TLS.
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(b"\x00\x01garbage" * 100)
            try:
                while s.recv(65536):
                    pass
            except ConnectionResetError:
                pass
    assert srv.proc.poll() is None
    assert requests.get(srv.https + "/stats", verify=str(cert), timeout=10).status_code == 200
    log = srv.log()
    assert "Traceback" not in log and " ERROR " not in log, log


def test_silent_client_is_dropped_before_the_handshake(tls_server):
    srv = tls_server(request_header_timeout=1)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=15) as s:
        started = time.monotonic()
        try:
            assert s.recv(1) == b""
        except ConnectionResetError:
            pass
        assert 0.5 < time.monotonic() - started < 10


def test_missing_certificate_stops_the_start(make_server, tmp_path):
    srv = make_server(start=False, tls_cert_file=str(tmp_path / "nope.pem"), tls_key_file=str(tmp_path / "key.pem"))
    srv.start(wait=False)
    assert srv.proc.wait(20) == 1
    assert "cannot load tls_cert_file" in srv.log() and "nope.pem" in srv.log()

"""Signed worker requests (SPEC §11), verified by code nobody here wrote: PyPI `standardwebhooks`,
and by examples/workerapp.py --verify-secret, a real worker app process."""
import base64
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError
from test_delivery import RawWorker

from hq_gevent.delivery import Delivery
from hq_gevent.signing import Signer, SigningError

ROOT = Path(__file__).resolve().parent.parent
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def new_secret():
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


SECRET_A, SECRET_B, OTHER = new_secret(), new_secret(), new_secret()


def headers_and_body(raw_request):
    head, _, body = raw_request.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")[1:]
    return {name.lower(): value for name, _, value in (line.partition(": ") for line in lines)}, body


@pytest.fixture
def raw_ok():
    worker = RawWorker(OK)
    yield worker
    worker.close()


def test_each_secret_verifies_with_standardwebhooks(raw_ok):
    Delivery(1 << 20, signing_secrets=[SECRET_A, SECRET_B]).send(42, raw_ok.url, '{"x":"é"}', None, 10)
    headers, body = headers_and_body(raw_ok.requests[-1])
    assert headers["webhook-id"] == "42" and abs(int(headers["webhook-timestamp"]) - time.time()) < 60
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (SECRET_A, SECRET_B):
        assert Webhook(secret).verify(body, headers) == {"x": "é"}
    with pytest.raises(WebhookVerificationError):
        Webhook(OTHER).verify(body, headers)


def test_a_job_cannot_override_the_signature(raw_ok):
    forged = {"Webhook-Signature": "v1,Zm9yZ2Vk", "webhook-id": "1", "WEBHOOK-TIMESTAMP": "1"}
    Delivery(1 << 20, signing_secrets=[SECRET_A]).send(5, raw_ok.url, None, forged, 10)
    request = raw_ok.requests[-1]
    assert request.lower().count(b"\r\nwebhook-signature:") == 1
    headers, body = headers_and_body(request)
    assert body == b"" and headers["webhook-id"] == "5"
    Webhook(SECRET_A).verify(body, headers, json_parse=False)


def test_no_secrets_no_signature(raw_ok):
    Delivery(1 << 20).send(5, raw_ok.url, "{}", {"webhook-id": "mine"}, 10)
    headers, _ = headers_and_body(raw_ok.requests[-1])
    assert "webhook-signature" not in headers and headers["webhook-id"] == "mine"  # not reserved then


def test_unpadded_secret_works_like_standardwebhooks(raw_ok):
    secret = "whsec_" + base64.b64encode(b"sixteen byte key!").decode().rstrip("=")
    Delivery(1 << 20, signing_secrets=[secret]).send(9, raw_ok.url, "[1]", None, 10)
    headers, body = headers_and_body(raw_ok.requests[-1])
    assert Webhook(secret).verify(body, headers) == [1]


@pytest.mark.parametrize("secret,message", [
    ("abc", 'secret #1 must look like "whsec_<base64>"'),
    ("whsec_not*base64!", "secret #1 is not valid base64"),
    ("whsec_", "secret #1 is empty"),
])
def test_bad_secret_is_a_clear_error_without_the_secret(secret, message):
    with pytest.raises(SigningError, match=re.escape(message)) as caught:
        Signer([secret])
    assert secret not in str(caught.value) or secret == "whsec_"
    with pytest.raises(SigningError, match="secret #2"):
        Delivery(1 << 20, signing_secrets=[SECRET_A, secret])


# --- the example worker app verifies the server's signatures ----------------------------------

@pytest.fixture
def verifying_app():
    proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / "workerapp.py"), "--port", "0",
                             "--verify-secret", SECRET_B, "--verify-secret", OTHER],
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        yield re.search(r"http://[\d.]+:\d+/", line).group(0)
    finally:
        proc.kill()
        proc.wait()


def test_workerapp_accepts_a_signature_by_any_of_its_secrets(verifying_app):
    # The server signs with A and B; the app knows B (and another): it accepts.
    response = Delivery(1 << 20, signing_secrets=[SECRET_A, SECRET_B]).send(3, verifying_app, '{"n":1}', None, 10)
    assert response.status == 200 and b'"ok": true' in response.body


def test_workerapp_refuses_bad_signatures(verifying_app):
    response = Delivery(1 << 20, signing_secrets=[SECRET_A]).send(3, verifying_app, '{"n":1}', None, 10)
    assert response.status == 401
    assert Delivery(1 << 20).send(3, verifying_app, '{"n":1}', None, 10).status == 401
    # A captured signed request replayed with another body.
    signed = Signer([SECRET_B]).headers(3, b'{"n":1}')
    forged = requests.post(verifying_app, data=b'{"n":2}', headers=dict(signed), timeout=10)
    assert forged.status_code == 401
    genuine = requests.post(verifying_app, data=b'{"n":1}', headers=dict(signed), timeout=10)
    assert genuine.status_code == 200
    stale = Signer([SECRET_B]).headers(3, b'{"n":1}', now=time.time() - 3600)
    assert requests.post(verifying_app, data=b'{"n":1}', headers=dict(stale), timeout=10).status_code == 401


# --- through a real server (config signing_secrets) ----------------------------------------------

def test_server_signs_worker_requests(make_server, worker):
    server = make_server(signing_secrets=[SECRET_A, SECRET_B])
    job = server.wait_job(server.push(url=worker.url, payload={"k": "v"}, headers={"webhook-id": "x"})["id"])
    assert job["status"] == "success"
    request = worker.requests[-1]
    assert request["headers"]["webhook-id"] == str(job["id"])
    for secret in (SECRET_A, SECRET_B):
        assert Webhook(secret).verify(request["body"], request["headers"]) == {"k": "v"}


def test_server_signatures_pass_the_example_app(make_server, verifying_app):
    server = make_server(signing_secrets=[SECRET_B])
    assert server.wait_job(server.push(url=verifying_app, payload=[1, 2])["id"])["status"] == "success"
    other = make_server(signing_secrets=[SECRET_A], name="unknown-secret")
    job = other.wait_job(other.push(url=verifying_app, payload=[1, 2])["id"])
    assert (job["status"], job["statusCode"]) == ("failure", 401)

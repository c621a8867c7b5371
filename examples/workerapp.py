"""An example worker app, like HQ's: prints every job request it receives and answers 200.

    python3 examples/workerapp.py [--port 8080] [--sleep SECONDS] [--status 200] [--verify-secret whsec_...]

With --verify-secret (repeatable, for a secret being rotated) it accepts only requests signed
with that secret as the server's `signing_secrets` signs them (Standard Webhooks), and answers
401 to any other. The check needs only the standard library, so this file runs on its own.
"""
import argparse
import base64
import binascii
import hashlib
import hmac
import http.server
import json
import sys
import time

TOLERANCE = 300  # seconds a signed timestamp may differ from now (Standard Webhooks' replay window)


def secret_key(secret):
    """The HMAC key of a "whsec_<base64>" secret."""
    encoded = secret.removeprefix("whsec_")
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise argparse.ArgumentTypeError("expected whsec_<base64>") from None
    if not key:
        raise argparse.ArgumentTypeError("the secret is empty")
    return key


def signature_valid(keys, headers, body, now=None):
    """Whether one `v1,` signature of webhook-signature matches one of keys, for a fresh timestamp."""
    msg_id, timestamp = headers.get("webhook-id"), headers.get("webhook-timestamp")
    signatures = headers.get("webhook-signature")
    if not (msg_id and timestamp and signatures) or not timestamp.isascii() or not timestamp.isdigit():
        return False
    if abs((time.time() if now is None else now) - int(timestamp)) > TOLERANCE:
        return False
    signed = f"{msg_id}.{timestamp}.".encode() + body
    expected = [base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode() for key in keys]
    for versioned in signatures.split(" "):
        version, _, given = versioned.partition(",")
        if version == "v1" and any(hmac.compare_digest(given, e) for e in expected):
            return True
    return False


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--sleep", type=float, default=0, help="seconds to wait before answering")
    parser.add_argument("--status", type=int, default=200, help="HTTP status to answer with")
    parser.add_argument("--verify-secret", type=secret_key, action="append", default=[], metavar="WHSEC",
                        help="accept only requests signed with this secret (repeat for several)")
    args = parser.parse_args()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            job_id = self.headers.get("X-Hq-Job-Id")
            if args.verify_secret and not signature_valid(args.verify_secret, self.headers, body):
                print(f"{time.strftime('%H:%M:%S')} job {job_id} refused: bad or missing signature", flush=True)
                return self.reply(401, {"error": "invalid signature"})
            try:
                shown = json.dumps(json.loads(body)) if body else "(no body)"
            except ValueError:
                shown = body.decode("utf-8", "replace")
            print(f"{time.strftime('%H:%M:%S')} job {job_id} {self.command} {self.path} payload={shown}", flush=True)
            if args.sleep:
                time.sleep(args.sleep)
            self.reply(args.status, {"job": job_id, "ok": args.status < 300})

        def reply(self, status, answer):
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer((args.addr, args.port), Handler)
    print(f"worker app listening on http://{args.addr}:{server.server_address[1]}/", flush=True)  # --port 0: a free one
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())

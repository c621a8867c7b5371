"""A fast gevent worker app for the bench: answers every job POST with 200 "OK".

    python3 -m bench.worker --port P [--sleep-ms N]       the worker
    python3 -m bench.worker --port P --fail-first K       fails each job's first K requests with 500
    python3 -m bench.worker --port P --trivial            a trivial gevent.pywsgi app (baseline)

It counts deliveries per `X-Hq-Job-Id` (first arrival on CLOCK_MONOTONIC, so the bench process
can subtract its own push times) and the peak number of requests in flight. With --fail-first it
answers a job's first K requests 500 and the rest 200, counts the 200s per id (a job that succeeds
twice is a duplicate success), and checks `X-Hq-Attempt` against its own count of that job's
requests. Control routes: `GET /stats` (counters), `GET /arrivals` ({id: [count, first_arrival]}),
`GET /successes` ({id: 200s answered}), `POST /reset`.

The worker side is a hand-rolled HTTP/1.1 keep-alive loop on a gevent StreamServer rather than
pywsgi: a WSGI stack costs more per request than the server under test spends dispatching it,
and the worker must never be what limits an end-to-end figure. With `--port 0` the chosen port
is printed as `listening 127.0.0.1:PORT` on stdout.
"""
import argparse
import json
import socket
import sys
import time

import gevent
from gevent.server import StreamServer

OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nOK"
OK_CLOSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\nOK"
FAIL = b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\nContent-Length: 4\r\n\r\nFAIL"
FAIL_CLOSE = b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\nContent-Length: 4\r\nConnection: close\r\n\r\nFAIL"
MAX_HEAD = 64 * 1024


class Counters:
    def __init__(self):
        self.reset()

    def reset(self):
        self.arrivals = {}  # job id -> [count, first arrival (time.monotonic())]
        self.successes = {}  # job id -> 200s answered (with --fail-first)
        self.signed = 0  # requests with a Standard Webhooks signature (signing_secrets on)
        self.attempt_mismatches = 0  # X-Hq-Attempt absent or not this job's request count
        self.requests = 0  # job POSTs, with or without an id
        self.deliveries = 0  # job POSTs with an id; kept as a count so /stats stays O(1) to poll
        self.no_id = 0
        self.in_flight = 0
        self.max_in_flight = 0

    def stats(self):
        return {
            "requests": self.requests,
            "unique": len(self.arrivals),
            "duplicates": self.deliveries - len(self.arrivals),
            "noId": self.no_id,
            "inFlight": self.in_flight,
            "maxConcurrency": self.max_in_flight,
            "signed": self.signed,
            "successIds": len(self.successes),
            "duplicateSuccesses": sum(self.successes.values()) - len(self.successes),
            "attemptMismatches": self.attempt_mismatches,
        }


def _json_response(obj, close):
    body = json.dumps(obj, separators=(",", ":")).encode()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
    return head + (b"Connection: close\r\n" if close else b"") + b"\r\n" + body


def _read_chunked(sock, buf):
    """Decode a chunked body starting in `buf`; returns (body, leftover)."""
    body = b""
    while True:
        while b"\r\n" not in buf:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("eof in chunk size")
            buf += data
        line, buf = buf.split(b"\r\n", 1)
        size = int(line.split(b";")[0], 16)
        while len(buf) < size + 2:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("eof in chunk")
            buf += data
        if size == 0:
            # Skip trailers up to the blank line.
            while not buf.startswith(b"\r\n") and b"\r\n\r\n" not in buf:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("eof in trailers")
                buf += data
            if buf.startswith(b"\r\n"):
                return body, buf[2:]
            return body, buf.split(b"\r\n\r\n", 1)[1]
        body += buf[:size]
        buf = buf[size + 2 :]


def make_handler(counters, sleep_s, fail_first=0):
    def handle(sock, _addr):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        try:
            while True:
                while True:
                    end = buf.find(b"\r\n\r\n")
                    if end >= 0:
                        break
                    if len(buf) > MAX_HEAD:
                        return
                    data = sock.recv(65536)
                    if not data:
                        return
                    buf += data
                head = buf[:end].decode("latin-1")
                buf = buf[end + 4 :]
                lines = head.split("\r\n")
                method, target, version = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                if headers.get("transfer-encoding", "").lower() == "chunked":
                    _body, buf = _read_chunked(sock, buf)
                else:
                    length = int(headers.get("content-length") or 0)
                    while len(buf) < length:
                        data = sock.recv(65536)
                        if not data:
                            return
                        buf += data
                    buf = buf[length:]
                conn = headers.get("connection", "").lower()
                close = conn == "close" or (version == "HTTP/1.0" and conn != "keep-alive")
                path = target.split("?", 1)[0]
                if method == "GET" and path == "/stats":
                    sock.sendall(_json_response(counters.stats(), close))
                elif method == "GET" and path == "/arrivals":
                    sock.sendall(_json_response(counters.arrivals, close))
                elif method == "GET" and path == "/successes":
                    sock.sendall(_json_response(counters.successes, close))
                elif method == "POST" and path == "/reset":
                    counters.reset()
                    sock.sendall(_json_response({"reset": True}, close))
                elif method == "GET":
                    sock.sendall(OK_CLOSE if close else OK)
                else:
                    counters.requests += 1
                    job_id = headers.get("x-hq-job-id")
                    count = 0
                    if job_id is None:
                        counters.no_id += 1
                    else:
                        counters.deliveries += 1
                        seen = counters.arrivals.get(job_id)
                        if seen is None:
                            counters.arrivals[job_id] = seen = [0, time.monotonic()]
                        seen[0] += 1
                        count = seen[0]
                    if "webhook-signature" in headers:
                        counters.signed += 1
                    fail = fail_first and count <= fail_first
                    if fail_first:
                        if headers.get("x-hq-attempt") != str(count):
                            counters.attempt_mismatches += 1
                        if not fail and job_id is not None:
                            counters.successes[job_id] = counters.successes.get(job_id, 0) + 1
                    counters.in_flight += 1
                    if counters.in_flight > counters.max_in_flight:
                        counters.max_in_flight = counters.in_flight
                    try:
                        if sleep_s:
                            gevent.sleep(sleep_s)
                        if fail:
                            sock.sendall(FAIL_CLOSE if close else FAIL)
                        else:
                            sock.sendall(OK_CLOSE if close else OK)
                    finally:
                        counters.in_flight -= 1
                if close:
                    return
        except (ConnectionError, OSError, ValueError):
            return  # a client that went away or spoke garbage; nothing to record

    return handle


def trivial_app(environ, start_response):
    """The baseline: the least a gevent.pywsgi process can do per request."""
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"OK"]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python3 -m bench.worker", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1 (0 = pick one and print it)")
    parser.add_argument("--sleep-ms", type=float, default=0, help="hold each job request this long before answering")
    parser.add_argument("--fail-first", type=int, default=0, metavar="K",
                        help="answer each job's first K requests (by X-Hq-Job-Id) with 500, the rest with 200")
    parser.add_argument("--trivial", action="store_true", help="serve a trivial gevent.pywsgi app instead")
    args = parser.parse_args(argv)

    # A deep backlog: the slow scenario opens thousands of connections at once, and a dropped SYN
    # costs a 1 s retransmit that would be blamed on the server under test.
    addr = ("127.0.0.1", args.port)
    if args.trivial:
        from gevent.pywsgi import WSGIServer

        class NoDelayWSGIServer(WSGIServer):
            # Without TCP_NODELAY a pywsgi response can sit in Nagle's buffer until the
            # client's delayed ACK (~40 ms), capping a keep-alive connection at ~25 req/s.
            def handle(self, sock, address):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return super().handle(sock, address)

        server = NoDelayWSGIServer(addr, trivial_app, log=None, error_log=None, backlog=4096)
    else:
        server = StreamServer(addr, make_handler(Counters(), args.sleep_ms / 1000.0, args.fail_first), backlog=4096)
    server.start()
    print(f"listening 127.0.0.1:{server.server_port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

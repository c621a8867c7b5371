"""An example worker app, like HQ's: prints every job request it receives and answers 200.

    python3 examples/workerapp.py [--port 8080] [--sleep SECONDS] [--status 200]
"""
import argparse
import http.server
import json
import sys
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--sleep", type=float, default=0, help="seconds to wait before answering")
    parser.add_argument("--status", type=int, default=200, help="HTTP status to answer with")
    args = parser.parse_args()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            job_id = self.headers.get("X-Hq-Job-Id")
            try:
                shown = json.dumps(json.loads(body)) if body else "(no body)"
            except ValueError:
                shown = body.decode("utf-8", "replace")
            print(f"{time.strftime('%H:%M:%S')} job {job_id} {self.command} {self.path} payload={shown}", flush=True)
            if args.sleep:
                time.sleep(args.sleep)
            reply = json.dumps({"job": job_id, "ok": args.status < 300}).encode()
            self.send_response(args.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer((args.addr, args.port), Handler)
    print(f"worker app listening on http://{args.addr}:{args.port}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())

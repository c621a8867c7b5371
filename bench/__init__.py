"""hq-gevent's load-testing suite: `python3 -m bench --help`. Talks HTTP only, so it can drive any HQ-compatible server."""

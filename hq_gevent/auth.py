"""API tokens (SPEC §11): which requests may reach the API, as one WSGI middleware.

    access = Access(config)      # reads the tokens; TokenError (never naming a token) if unusable
    app = access.wrap(app)       # the same app when no token is configured

A request needs `Authorization: Bearer <token>`: a full token may do anything, a read token only
GET/HEAD (403 otherwise), no valid token → 401. Open without one: GET /healthz, /readyz, the web
UI's page and static files (not its API under <ui_basename>/internal), and /metrics when
metrics_public. Tokens are accepted only in that header, never in the query string (which the
access log records).
"""
import hmac
import ipaddress
import logging

log = logging.getLogger("hq_gevent")

MIN_LENGTH = 16
JSON_TYPE = "application/json; charset=UTF-8"
UNAUTHORIZED = b'{"status":401,"error":"Unauthorized"}'
FORBIDDEN = b'{"status":403,"error":"Forbidden"}'
READ_METHODS = ("GET", "HEAD")


class TokenError(Exception):
    """A token source that cannot be used. Its message says where, never what the token is."""


def wrap(app, config):
    """The app behind the token check configured in `config` (the app itself when there is none)."""
    return Access(config).wrap(app)


class Access:
    def __init__(self, config):
        full = _tokens(config.auth_tokens, "auth_tokens", config.auth_tokens_file, "auth_tokens_file")
        read = _tokens(config.auth_read_tokens, "auth_read_tokens",
                       config.auth_read_tokens_file, "auth_read_tokens_file")
        if set(full) & set(read):
            raise TokenError("a token is configured both for full access and as a read token")
        # The whole header value each token is compared with: a request's own header needs no copy.
        self.expected = tuple(("Bearer " + t, True) for t in full) + tuple(("Bearer " + t, False) for t in read)
        self.open_paths = {"/healthz", "/readyz"} | ({"/metrics"} if config.metrics_public else set())
        self.ui = config.ui_basename if config.ui else None
        self.config = config

    def wrap(self, app):
        if not self.expected:
            if not _is_loopback(self.config.host_port[0]):
                log.warning("No API token is configured: anyone who can reach %s can read, push and delete "
                            "jobs (set auth_tokens_file; see the README's Security section)", self.config.addr)
            return app
        log.info("API tokens required: %d full access, %d read-only",
                 sum(full for _, full in self.expected), sum(not full for _, full in self.expected))
        expected, is_open = self.expected, self.is_open

        def with_token_check(environ, start_response):
            access = _access(environ.get("HTTP_AUTHORIZATION"), expected)
            if access:
                return app(environ, start_response)
            method = environ["REQUEST_METHOD"]
            if access is False:  # a read token
                if method in READ_METHODS:
                    return app(environ, start_response)
                return _deny(environ, start_response, "403 Forbidden", FORBIDDEN, ())
            if method in READ_METHODS and is_open(environ["PATH_INFO"]):
                return app(environ, start_response)
            return _deny(environ, start_response, "401 Unauthorized", UNAUTHORIZED,
                         (("WWW-Authenticate", 'Bearer realm="hq-gevent"'),))

        return with_token_check

    def is_open(self, path):
        if path in self.open_paths:
            return True
        ui = self.ui
        return (ui is not None and (path == ui or path.startswith(ui + "/"))
                and not path.startswith(ui + "/internal"))


def _access(header, expected):
    """True (full access), False (read-only) or None (no valid token). Every token is compared, in
    constant time, and the loop never stops early: the time taken does not tell which one matched."""
    if header is None or not header.isascii():
        return None
    if not header.startswith("Bearer "):
        if header[:7].lower() != "bearer ":  # the scheme is case-insensitive (RFC 7235)
            return None
        header = "Bearer " + header[7:].lstrip()
    found = None
    for value, full in expected:
        if hmac.compare_digest(header, value):
            found = full
    return found


def _deny(environ, start_response, status, body, extra_headers):
    start_response(status, [("Content-Type", JSON_TYPE), ("Content-Length", str(len(body))), *extra_headers])
    return [b""] if environ["REQUEST_METHOD"] == "HEAD" else [body]


def _tokens(listed, key, path, file_key):
    tokens = []
    for number, token in enumerate(listed, 1):
        _check(token, f"{key} item {number}")
        tokens.append(token)
    if path:
        tokens += _read_file(path, file_key)
    return tokens


def _read_file(path, key):
    """One token per line; blank lines and lines starting with # are ignored."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise TokenError(f"cannot read {key} {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise TokenError(f"{key} {path} is not UTF-8 text") from None
    tokens = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if line and not line.startswith("#"):
            _check(line, f"{key} {path} line {number}")
            tokens.append(line)
    if not tokens:
        # An empty file would silently leave the server open, when whoever wrote it meant to close it.
        raise TokenError(f"{key} {path} holds no token")
    return tokens


def _check(token, where):
    if len(token) < MIN_LENGTH:
        raise TokenError(f"{where}: a token must be at least {MIN_LENGTH} characters")
    if not (token.isascii() and token.isprintable()) or " " in token:
        raise TokenError(f"{where}: a token must be printable ASCII without spaces")


def _is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost: assume it is reachable from elsewhere

"""HTTP routes: parse and validate, call the store or the dispatchers, render JSON. Nothing else."""
import bisect
import logging
import mimetypes
import os
import re
import time
from urllib.parse import parse_qs

import bottle
import gevent
import re2
import ujson

from hq_gevent import __commit_hash__, __version__
from hq_gevent.invalid import Invalid
from hq_gevent.job import spec_from_request
from hq_gevent.storage import JobConflict, JobNotFound, StoreUnavailable
from hq_gevent.store import status_matcher

log = logging.getLogger("hq_gevent")

JSON_TYPE = "application/json; charset=UTF-8"
UI_DIR = os.path.join(os.path.dirname(__file__), "ui")
MAX_ID = (1 << 64) - 1
MAX_DEPTH = 512  # SPEC §5: deeper JSON is refused, so every stored job renders (pages nest it 3 deeper)
BODY_TYPES = ("application/json", "application/x-www-form-urlencoded")  # others with a body: 415
RENDER_CHUNK = 256  # jobs of a list page rendered at once (a failure falls back to one by one)
SLICE_SECONDS = 0.02  # a long page renders in slices of this, so it never stalls serving (SPEC §11)
MAX_BATCH = 1000
_BOOLS = {"1": True, "t": True, "true": True, "0": False, "f": False, "false": False}
_ASCII_DIGITS = re.compile(r"[0-9]+")
_ASCII_ID = re.compile(r"[0-9]{1,20}")  # isdigit() would take '²', '①' and Arabic-Indic digits
_INTEGER = re.compile(r"-?[0-9]+")


def dump(value, pretty=False):
    """Strict JSON bytes: NaN, Infinity (OverflowError) or a lone surrogate (UnicodeEncodeError)
    raise instead of leaving JSON."""
    if pretty:
        text = ujson.dumps(value, ensure_ascii=False, escape_forward_slashes=False, allow_nan=False, indent=2)
    else:
        text = ujson.dumps(value, ensure_ascii=False, escape_forward_slashes=False, allow_nan=False)
    return text.encode()


def render(value, status=200):
    bottle.response.status = status
    bottle.response.content_type = JSON_TYPE
    if "pretty" in bottle.request.query:
        return dump(value, True) + b"\n"
    return dump(value)


def error_body(status, message):
    return render({"status": status, "error": message}, status)


def handle_errors(callback):
    """Bottle plugin: every known failure becomes {"status", "error"}; the unknown ones a logged 500."""
    def wrapper(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except bottle.HTTPResponse:
            raise
        except Invalid as e:
            return error_body(e.status, e.message)
        except (JobNotFound, JobConflict) as e:
            return error_body(422, str(e))
        except StoreUnavailable as e:
            return error_body(503, str(e))
        except Exception:
            log.exception("Internal error on %s %s", bottle.request.method, bottle.request.path)
            return error_body(500, "Internal Server Error")

    return wrapper


# --- request parsing -------------------------------------------------------------------
def read_body(max_bytes):
    environ = bottle.request.environ
    length = environ.get("CONTENT_LENGTH")
    if length:
        if not _ASCII_DIGITS.fullmatch(length):  # int() would also take "+34", " 34", "3_4"
            raise Invalid(400, "invalid Content-Length")
        length = int(length)
        if length > max_bytes:
            raise Invalid(413, f"the request body is larger than max_body_bytes ({max_bytes} bytes)")
        body = environ["wsgi.input"].read(length)
    else:
        body = environ["wsgi.input"].read(max_bytes + 1)
        if len(body) > max_bytes:
            raise Invalid(413, f"the request body is larger than max_body_bytes ({max_bytes} bytes)")
    return body


def read_json(max_bytes, empty=None):
    """The decoded JSON body (SPEC §5); a form field `payload` holding JSON text is accepted too.
    `empty` is what a request without a body means (None: it is invalid JSON)."""
    body = read_body(max_bytes)
    media = bottle.request.environ.get("CONTENT_TYPE", "").partition(";")[0].strip().lower()
    if body and media not in BODY_TYPES:
        # Also without any Content-Type: a browser may send a body so, as a CORS "simple" request.
        raise Invalid(415, "Unsupported Media Type")
    if media == BODY_TYPES[1] and not body.lstrip().startswith((b"{", b"[")):
        # HQ accepts a form field `payload` with the JSON; `curl -d '{...}'` sends plain JSON
        # under this content type, so a body that looks like JSON is read as JSON.
        try:
            values = parse_qs(body.decode(), errors="strict").get("payload")
        except UnicodeDecodeError:
            raise Invalid(400, "invalid form: not UTF-8") from None
        if values:
            body = values[0].encode()
    if not body.strip() and empty is not None:
        return empty
    return parse_json(body)


def parse_json(body):
    """Strict JSON (RFC 8259) from bytes. ujson is fast but lenient: it reads NaN and Infinity,
    turns 1e400 into inf and lets lone surrogates through; writing the value back strictly
    refuses all of those, at a fraction of the cost of a strict parser."""
    try:
        value = ujson.loads(body)
    except ValueError as e:  # also an integer beyond Python's 4300-digit conversion limit
        raise Invalid(400, f"invalid JSON: {e}") from None
    # Nesting cannot exceed the number of opening brackets: the walk is for the rare deep body.
    if body.count(b"[") + body.count(b"{") > MAX_DEPTH and nesting_exceeds(value, MAX_DEPTH):
        raise Invalid(400, f"invalid JSON: nested deeper than {MAX_DEPTH} levels")
    try:
        dump(value)
    except OverflowError:
        raise Invalid(400, "invalid JSON: NaN, Infinity and numbers beyond a double (e.g. 1e400) are not JSON") from None
    except UnicodeEncodeError:
        raise Invalid(400, "invalid JSON: a string holds a lone surrogate (\\ud800-\\udfff without its pair)") from None
    return value


def nesting_exceeds(value, limit):
    """True if arrays/objects nest more than `limit` levels (iterative: no recursion limit)."""
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
    return False




def is_id(text):
    return _ASCII_ID.fullmatch(text) is not None and int(text) <= MAX_ID


def parse_id(text):
    if not is_id(text):
        raise Invalid(422, f"The job id must be a number but '{text}'.")
    return int(text)


def query_text(name):
    """A query parameter as text (None when absent); bytes that are not UTF-8 are a 400."""
    raw = bottle.request.query.get(name)  # bottle keeps the raw bytes as latin-1 text
    if raw is None:
        return None
    try:
        return raw.encode("latin-1").decode("utf-8")
    except UnicodeError:
        raise Invalid(400, f"'{name}' is not valid UTF-8") from None


def query_int(name):
    text = query_text(name)
    if text is None or text == "":
        return None
    try:
        if _INTEGER.fullmatch(text):
            return int(text)
    except ValueError:  # more than 4300 digits
        pass
    raise Invalid(400, f"'{name}' must be an integer but '{text}'")


def query_bool(name):
    text = query_text(name)
    if text is None:
        return False
    text = text.lower()
    if text == "":
        return True  # a bare ?reverse
    if text not in _BOOLS:
        raise Invalid(400, f"'{name}' must be a boolean but '{text}'")
    return _BOOLS[text]


# RE2 (SPEC §11): linear time, Go's syntax; no fallback engine exists in this binding, so a
# pattern RE2 cannot run (backreferences, lookaround) is refused, never backtracked.
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a user's bad pattern is their 422, not a line on our stderr
_RE2_OPTIONS.never_capture = True  # only "does it match" is asked


_PLAIN = re.compile(r"(\^?)([A-Za-z0-9_\-/:@=,# ]*)(\$?)")  # a word both RE2 and str read literally


class TextFilter:
    """A `name`/`term` list filter: does an RE2 pattern match somewhere in a text (str -> bool).
    A plain word, maybe anchored (`^foo-`), is matched by str operations, which mean exactly the
    same and cost a fraction. Other patterns run in RE2, called directly (a third of the cost of
    the binding's .search()); names, urls, comments and statuses repeat across jobs, so `search`
    remembers its answers per text, while `search_unique` is for texts that never repeat (ids)."""
    MEMO_SIZE = 10000
    ID_BLOCK = 4096  # stored ids ruled out at once by RE2's prefilter (see id_searcher)

    def __init__(self, pattern):
        self.pattern = pattern
        plain = _PLAIN.fullmatch(pattern)
        if plain:
            self.search_unique = _plain_search(*plain.groups())
            self.search = _Memo(self.search_unique, self.MEMO_SIZE).__getitem__
            self.prefilter = None
            return
        match = re2.compile(pattern, _RE2_OPTIONS)._regexp.Match
        unanchored = re2._Anchor.UNANCHORED

        def search_unique(text):
            raw = text.encode("utf-8", "surrogatepass")  # an old log's lone surrogate must not fail a list
            return match(unanchored, raw, 0, len(raw))[0][0] >= 0

        self.search_unique = search_unique
        self.search = _Memo(search_unique, self.MEMO_SIZE).__getitem__
        # FilteredRE2: the literal strings any match must contain. None when the pattern needs none.
        self.prefilter = re2.Filter()
        self.prefilter.Add(pattern, _RE2_OPTIONS)
        self.prefilter.Compile()
        if self.prefilter.Match(b"", True):
            self.prefilter = None

    def id_searcher(self, ids):
        """search_unique for job ids (int -> bool), given the store's ids in ascending order.
        Every id is a new text, so each would cost one RE2 call (~0.6 us through the binding);
        instead a block of 4096 stored ids is ruled out at once when RE2's prefilter finds none
        of the literals a match needs in their digits (one call). Exact: a text's literals are
        among those of any text containing it, and a match needs them. The block is remembered
        as its id range: a store that keeps its ids in memory is one server, whose new ids are
        always above every stored one (SPEC §2), so no id appears inside a range later."""
        search_unique = self.search_unique
        if self.prefilter is None:
            return lambda job_id: search_unique(str(job_id))
        prefilter, block_size = self.prefilter, self.ID_BLOCK
        ruled_out = [1, 0]  # the id range of the last block ruled out (none yet)
        by_block = [True]  # off once a block is not ruled out: the literals needed are digits

        def search_id(job_id):
            lo, hi = ruled_out
            if lo <= job_id <= hi:
                return False
            if by_block[0]:
                start = bisect.bisect_left(ids, job_id) // block_size * block_size
                block = list(ids[start:start + block_size])
                if block and not prefilter.Match(str(block).encode(), True):
                    ruled_out[:] = block[0], block[-1]
                    if block[0] <= job_id <= block[-1]:
                        return False
                else:
                    by_block[0] = False
            return search_unique(str(job_id))

        return search_id


class _Memo(dict):
    """text -> answer, computed on a miss: a hit is one dict lookup, no Python frame (a filter
    asks about the same names, urls and statuses again and again)."""

    def __init__(self, compute, limit):
        super().__init__()
        self.compute, self.limit = compute, limit

    def __missing__(self, text):
        if len(self) >= self.limit:
            self.clear()
        found = self[text] = self.compute(text)
        return found


def _plain_search(start, word, end):
    if start and end:
        return lambda text: text == word
    if start:
        return lambda text: text.startswith(word)
    if end:
        return lambda text: text.endswith(word)
    return lambda text: word in text


def query_filter(name):
    text = query_text(name)
    if not text:
        return None
    try:
        return TextFilter(text)
    except re2.error as e:
        reason = e.args[0].decode("utf-8", "replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        raise Invalid(422, f"'{name}' is not a valid regular expression: {reason}") from None


# --- rendering stored jobs ---------------------------------------------------------------
_unrenderable_logged = set()


def job_dict(job):
    """job.to_dict(); ValueError for a payload nested deeper than a push may be (an older log's):
    it would render, but many clients' parsers (Python's json among them) cannot read it."""
    payload = job.payload
    if payload is not None and payload.count("[") + payload.count("{") > MAX_DEPTH:
        if nesting_exceeds(ujson.loads(payload), MAX_DEPTH - 1):  # the payload sits one level in
            raise ValueError(f"its payload is nested deeper than {MAX_DEPTH} levels")
    return job.to_dict()


def job_view(job):
    """job_dict(job), checked to be JSON. A job from an older log that cannot be JSON (a payload
    nested deeper than renders, NaN, a lone surrogate) is shown with "payload": null and a
    "renderError" saying why, so it never breaks a page; the error is logged once per job."""
    try:
        view = job_dict(job)
        dump(view)
        return view
    except Exception as e:  # noqa: BLE001 - whatever a stored job holds, the page must answer
        reason = str(e).encode("ascii", "backslashreplace").decode()
        if job.id not in _unrenderable_logged and len(_unrenderable_logged) < 10000:
            _unrenderable_logged.add(job.id)
            log.error("Job %d cannot be shown as JSON (%s): shown with payload null and renderError", job.id, reason)
    marker = f"the stored job cannot be shown as JSON: {reason}"
    try:
        view = job.to_dict()
        view["payload"] = None
        view["renderError"] = marker
        dump(view)
        return view
    except Exception:  # noqa: BLE001 - not only the payload: show what is certainly JSON
        return {"id": str(job.id), "status": job.status, "renderError": marker}


def render_job(job):
    try:
        return render(job_dict(job))
    except (ValueError, OverflowError):  # UnicodeEncodeError is a ValueError
        return render(job_view(job))


def render_page(jobs, next_id):
    """A list page, rendered RENDER_CHUNK jobs at a time: a chunk that fails is rendered job by
    job (job_view), and a long page yields to other requests between slices."""
    pretty = "pretty" in bottle.request.query
    items = []
    slice_end = time.perf_counter() + SLICE_SECONDS
    for start in range(0, len(jobs), RENDER_CHUNK):
        chunk = jobs[start:start + RENDER_CHUNK]
        try:
            text = dump([job_dict(job) for job in chunk], pretty)
        except (ValueError, OverflowError):
            text = dump([job_view(job) for job in chunk], pretty)
        # b"[...]" -> its items; pretty ones are indented one level deeper inside the page.
        items.append(b"  " + text[2:-2].replace(b"\n", b"\n  ") if pretty else text[1:-1])
        if time.perf_counter() > slice_end:
            gevent.sleep(0.001)  # > 0: sleep(0) may resume this greenlet before the loop polls for I/O
            slice_end = time.perf_counter() + SLICE_SECONDS
    tail = {"hasNext": next_id is not None}
    if next_id is not None:
        tail["next"] = str(next_id)
    tail["count"] = len(jobs)
    bottle.response.content_type = JSON_TYPE
    if not pretty:
        return b'{"jobs":[' + b",".join(items) + b"]," + dump(tail)[1:]
    jobs_text = b"[\n" + b",\n".join(items) + b"\n  ]" if items else b"[]"
    return b'{\n  "jobs": ' + jobs_text + b",\n" + dump(tail, True)[2:] + b"\n"


# --- routes ----------------------------------------------------------------------------
_ODD_PATH_CHAR = re.compile(r"[\x00-\x1f\x7f]")


def refuse_odd_paths():
    """A path that is not UTF-8 (bottle would silently drop the bad bytes: /job/%FF12 would
    read job 12) or holds control characters (a NUL fails os.path calls) is a clean 400."""
    raw = bottle.request.environ.get("bottle.raw_path", "")
    try:
        path = raw.encode("latin-1").decode("utf-8")
    except UnicodeError:
        path = None
    if path is None or _ODD_PATH_CHAR.search(path):
        body = {"status": 400, "error": "invalid path: not UTF-8 or a control character"}
        raise bottle.HTTPResponse(dump(body), 400, {"Content-Type": JSON_TYPE})


def make_app(store, dispatchers, config):
    app = bottle.Bottle(catchall=True)
    app.uninstall(True)  # bottle's JSON and template plugins: we render ourselves, they only cost time
    metrics = store.metrics
    app.install(metrics.route_plugin())  # outermost: it sees the status of every answer
    app.install(handle_errors)
    app.add_hook("before_request", refuse_odd_paths)
    add_api_routes(app, "", store, dispatchers, config)
    add_health_routes(app, store, metrics)
    if config.ui:
        add_api_routes(app, config.ui_basename + "/internal", store, dispatchers, config)
        add_ui_routes(app, config.ui_basename)

    def http_error(res):
        # Bottle's own errors (no route, wrong method, its 500) rendered like ours.
        if "bottle.route" not in bottle.request.environ:
            metrics.count_unmatched(bottle.request.method, res.status_code)
        if res.status_code >= 500:
            log.error("Internal error on %s %s: %s\n%s", bottle.request.method, bottle.request.path,
                      res.exception, res.traceback or "")
            return error_body(500, "Internal Server Error")
        return error_body(res.status_code, {404: "Not Found", 405: "Method Not Allowed"}.get(res.status_code, res.body))

    for code in (400, 404, 405, 413, 500):
        app.error_handler[code] = http_error
    return app


def add_health_routes(app, store, metrics):
    """SPEC §12: liveness, readiness (for load balancers and systemd) and the Prometheus scrape."""
    def healthz():
        return render({"status": "ok"})

    def readyz():
        reason = store.unready_reason()
        if reason:
            return error_body(503, reason)
        return render({"status": "ready"})

    def scrape():
        body, content_type = metrics.render(bottle.request.get_header("Accept"))
        bottle.response.content_type = content_type
        return body

    app.route("/healthz", "GET", healthz)
    app.route("/readyz", "GET", readyz)
    app.route("/metrics", "GET", scrape)


def add_api_routes(app, prefix, store, dispatchers, config):
    def info():
        return render({"version": __version__, "commitHash": __commit_hash__})

    def stats():
        counts = store.stats()
        return render({
            "queues": config.queues,
            "dispatchers": config.dispatchers,
            "maxWorkers": config.max_workers,
            "numWorkers": dispatchers.in_flight,
            **counts,
            # The HQ 2.x names (SPEC §10.5): its own `hq stats` reads these.
            "numJobsInQueue": counts["queueUsage"],
            "numJobsWaiting": counts["numWaitingJobs"],
            "numJobsRunning": counts["numRunningJobs"],
            "numStoredJobs": counts["numJobs"],
        })

    def push_job():
        view, duplicate = store.push(spec_from_request(read_json(config.max_body_bytes, empty={}), store.default_retry,
                                                       dispatchers.allowed_hosts))
        if duplicate:
            bottle.response.set_header("X-Hq-Duplicate", "true")
        return render(view)

    def push_jobs():
        body = read_json(config.max_body_bytes)
        if not isinstance(body, list) or not body:
            raise Invalid(400, "the body must be a non-empty JSON array of jobs")
        if len(body) > MAX_BATCH:
            raise Invalid(413, f"a batch holds at most {MAX_BATCH} jobs, not {len(body)}")
        specs = []
        for index, item in enumerate(body):
            try:
                specs.append(spec_from_request(item, store.default_retry, dispatchers.allowed_hosts))
            except Invalid as e:
                raise Invalid(e.status, f"jobs[{index}]: {e.message}") from None
        return render({"jobs": [view for view, _ in store.push_many(specs)]})

    def list_jobs():
        limit = query_int("limit")
        if not limit:
            limit = config.job_list_default_limit
        elif limit < 0:
            limit = 0
        begin = query_text("begin") or None
        if begin is not None:
            if not is_id(begin):
                raise Invalid(400, f"'begin' must be a job id but '{begin}'")
            begin = int(begin)
        reverse = query_bool("reverse")
        try:
            match = status_matcher(query_filter("name"), query_filter("term"), query_text("status") or None,
                                   getattr(store, "ids", None))  # a store that keeps its ids in memory
        except ValueError as e:
            raise Invalid(422, str(e)) from None
        jobs, next_id = store.list_jobs(begin, reverse, limit, match)
        return render_page(jobs, next_id)

    def get_job(job_id):
        return render_job(store.get(parse_id(job_id)))

    def delete_job(job_id):
        job_id = parse_id(job_id)
        store.delete(job_id)
        return render({"id": str(job_id)})

    def stop_job(job_id):
        job_id = parse_id(job_id)
        store.stop(job_id)
        return render({"id": str(job_id)})

    def restart_job(job_id):
        job_id = parse_id(job_id)
        body = read_json(config.max_body_bytes, empty={})
        if not isinstance(body, dict):
            raise Invalid(400, "the body must be a JSON object")
        copy = body.get("copy", False)
        if not isinstance(copy, bool):
            raise Invalid(400, "'copy' must be a boolean")
        return render(store.restart(job_id, copy))

    app.route(prefix + "/", "GET", info)
    app.route(prefix + "/stats", "GET", stats)
    app.route(prefix + "/stats/history", "GET", lambda: render(store.metrics.history()))
    app.route(prefix + "/job", "POST", push_job)
    app.route(prefix + "/jobs", "POST", push_jobs)
    app.route(prefix + "/job", "GET", list_jobs)
    app.route(prefix + "/job/<job_id>", "GET", get_job)
    app.route(prefix + "/job/<job_id>", "DELETE", delete_job)
    app.route(prefix + "/job/<job_id>/stop", "POST", stop_job)
    app.route(prefix + "/job/<job_id>/restart", "POST", restart_job)


def add_ui_routes(app, basename):
    def redirect():
        # 302 with a relative Location, as HQ (bottle's redirect() answers 303 on HTTP/1.1).
        raise bottle.HTTPResponse("", 302, {"Location": basename + "/"})

    root = os.path.realpath(UI_DIR)

    def page(path=""):
        if path == "internal" or path.startswith("internal/"):
            raise Invalid(404, "Not Found")  # an unknown route of the UI's API, not a page
        # index.html always goes through index() so its basename placeholder is filled in.
        target = os.path.realpath(os.path.join(root, path))
        if path and path != "index.html" and target.startswith(root + os.sep) and os.path.isfile(target):
            return bottle.static_file(os.path.relpath(target, root), root=root)
        return index()

    def index():
        try:
            with open(os.path.join(UI_DIR, "index.html"), encoding="utf-8") as f:
                html = f.read()
        except OSError:
            raise Invalid(404, "the web UI is not installed") from None
        bottle.response.content_type = "text/html; charset=UTF-8"
        return html.replace("__UI_BASENAME__", basename)

    mimetypes.add_type("text/javascript", ".js")
    app.route(basename, "GET", redirect)
    app.route(basename + "/", "GET", page)
    app.route(basename + "/<path:path>", "GET", page)

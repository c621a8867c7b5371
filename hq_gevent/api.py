"""HTTP routes: parse and validate, call the store or the dispatchers, render JSON. Nothing else."""
import logging
import mimetypes
import os
import re
from urllib.parse import parse_qs

import bottle
import ujson

from hq_gevent import __commit_hash__, __version__
from hq_gevent.job import InvalidJob, spec_from_request
from hq_gevent.store import JobConflict, JobNotFound, status_matcher
from hq_gevent.wal import WalError

log = logging.getLogger("hq_gevent")

JSON_TYPE = "application/json; charset=UTF-8"
UI_DIR = os.path.join(os.path.dirname(__file__), "ui")
MAX_ID = (1 << 64) - 1
MAX_BATCH = 1000
_BOOLS = {"1": True, "t": True, "true": True, "0": False, "f": False, "false": False}


class ApiError(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


def render(value, status=200):
    bottle.response.status = status
    bottle.response.content_type = JSON_TYPE
    if "pretty" in bottle.request.query:
        return ujson.dumps(value, ensure_ascii=False, escape_forward_slashes=False, indent=2) + "\n"
    return ujson.dumps(value, ensure_ascii=False, escape_forward_slashes=False)


def error_body(status, message):
    return render({"status": status, "error": message}, status)


def handle_errors(callback):
    """Bottle plugin: every known failure becomes {"status", "error"}; the unknown ones a logged 500."""
    def wrapper(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except bottle.HTTPResponse:
            raise
        except ApiError as e:
            return error_body(e.status, e.message)
        except InvalidJob as e:
            return error_body(e.status, e.message)
        except (JobNotFound, JobConflict) as e:
            return error_body(422, str(e))
        except WalError as e:
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
        try:
            length = int(length)
        except ValueError:
            raise ApiError(400, "invalid Content-Length") from None
        if length > max_bytes:
            raise ApiError(413, f"the request body is larger than max_body_bytes ({max_bytes} bytes)")
        body = environ["wsgi.input"].read(length)
    else:
        body = environ["wsgi.input"].read(max_bytes + 1)
        if len(body) > max_bytes:
            raise ApiError(413, f"the request body is larger than max_body_bytes ({max_bytes} bytes)")
    return body


def read_json(max_bytes, empty=None):
    """The decoded JSON body; a form field `payload` holding JSON text is accepted too."""
    body = read_body(max_bytes)
    if bottle.request.content_type.startswith("application/x-www-form-urlencoded"):
        # HQ accepts a form field `payload` with the JSON; `curl -d '{...}'` sends plain JSON
        # under this content type, so without that field the body itself is tried as JSON.
        values = parse_qs(body.decode("utf-8", "replace")).get("payload")
        if values:
            body = values[0]
    if not body.strip() and empty is not None:
        return empty
    try:
        return ujson.loads(body)
    except ValueError as e:
        raise ApiError(400, f"invalid JSON: {e}") from None


def parse_id(text):
    if not text.isdigit() or int(text) > MAX_ID:
        raise ApiError(422, f"The job id must be a number but '{text}'.")
    return int(text)


def query_int(name):
    text = bottle.request.query.get(name)
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise ApiError(400, f"'{name}' must be an integer but '{text}'") from None


def query_bool(name):
    if name not in bottle.request.query:
        return False
    text = bottle.request.query.get(name).lower()
    if text == "":
        return True  # a bare ?reverse
    if text not in _BOOLS:
        raise ApiError(400, f"'{name}' must be a boolean but '{text}'")
    return _BOOLS[text]


def query_regex(name):
    text = bottle.request.query.getunicode(name)
    if not text:
        return None
    try:
        return re.compile(text)
    except (re.error, OverflowError, RecursionError) as e:
        raise ApiError(422, f"'{name}' is not a valid regular expression: {e}") from None


# --- routes ----------------------------------------------------------------------------
def make_app(store, dispatchers, config):
    app = bottle.Bottle(catchall=True)
    app.uninstall(True)  # bottle's JSON and template plugins: we render ourselves, they only cost time
    app.install(handle_errors)
    add_api_routes(app, "", store, dispatchers, config)
    if config.ui:
        add_api_routes(app, config.ui_basename + "/internal", store, dispatchers, config)
        add_ui_routes(app, config.ui_basename)

    def http_error(res):
        # Bottle's own errors (no route, wrong method, its 500) rendered like ours.
        if res.status_code >= 500:
            log.error("Internal error on %s %s: %s\n%s", bottle.request.method, bottle.request.path,
                      res.exception, res.traceback or "")
            return error_body(500, "Internal Server Error")
        return error_body(res.status_code, {404: "Not Found", 405: "Method Not Allowed"}.get(res.status_code, res.body))

    for code in (400, 404, 405, 413, 500):
        app.error_handler[code] = http_error
    return app


def add_api_routes(app, prefix, store, dispatchers, config):
    def info():
        return render({"version": __version__, "commitHash": __commit_hash__})

    def stats():
        return render({
            "queues": config.queues,
            "dispatchers": config.dispatchers,
            "maxWorkers": config.max_workers,
            "queueUsage": store.queue_usage(),
            "numWaitingJobs": store.num_waiting,
            "numRunningJobs": store.num_running,
            "numWorkers": dispatchers.in_flight,
            "numJobs": len(store.jobs),
            "numScheduledJobs": store.num_scheduled,
            "numBackloggedJobs": len(store.backlog),
            "walBytes": store.wal.size,
        })

    def push_job():
        view, duplicate = store.push(spec_from_request(read_json(config.max_body_bytes), store.default_retry))
        if duplicate:
            bottle.response.set_header("X-Hq-Duplicate", "true")
        return render(view)

    def push_jobs():
        body = read_json(config.max_body_bytes)
        if not isinstance(body, list) or not body:
            raise ApiError(400, "the body must be a non-empty JSON array of jobs")
        if len(body) > MAX_BATCH:
            raise ApiError(413, f"a batch holds at most {MAX_BATCH} jobs, not {len(body)}")
        specs = []
        for index, item in enumerate(body):
            try:
                specs.append(spec_from_request(item, store.default_retry))
            except InvalidJob as e:
                raise ApiError(e.status, f"jobs[{index}]: {e.message}") from None
        return render({"jobs": [view for view, _ in store.push_many(specs)]})

    def list_jobs():
        limit = query_int("limit")
        if not limit:
            limit = config.job_list_default_limit
        elif limit < 0:
            limit = 0
        begin = bottle.request.query.get("begin") or None
        if begin is not None:
            if not begin.isdigit():
                raise ApiError(400, f"'begin' must be a job id but '{begin}'")
            begin = int(begin)
        reverse = query_bool("reverse")
        try:
            match = status_matcher(query_regex("name"), query_regex("term"), bottle.request.query.get("status") or None)
        except ValueError as e:
            raise ApiError(422, str(e)) from None
        jobs, next_id = store.list_jobs(begin, reverse, limit, match)
        body = {"jobs": [job.to_dict() for job in jobs], "hasNext": next_id is not None}
        if next_id is not None:
            body["next"] = str(next_id)
        body["count"] = len(jobs)
        return render(body)

    def get_job(job_id):
        return render(store.get(parse_id(job_id)).to_dict())

    def delete_job(job_id):
        job_id = parse_id(job_id)
        store.delete(job_id)
        return render({"id": str(job_id)})

    def stop_job(job_id):
        job_id = parse_id(job_id)
        dispatchers.stop(job_id)
        return render({"id": str(job_id)})

    def restart_job(job_id):
        job_id = parse_id(job_id)
        body = read_json(config.max_body_bytes, empty={})
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        copy = body.get("copy", False)
        if not isinstance(copy, bool):
            raise ApiError(400, "'copy' must be a boolean")
        return render(store.restart(job_id, copy))

    app.route(prefix + "/", "GET", info)
    app.route(prefix + "/stats", "GET", stats)
    app.route(prefix + "/job", "POST", push_job)
    app.route(prefix + "/jobs", "POST", push_jobs)
    app.route(prefix + "/job", "GET", list_jobs)
    app.route(prefix + "/job/<job_id>", "GET", get_job)
    app.route(prefix + "/job/<job_id>", "DELETE", delete_job)
    app.route(prefix + "/job/<job_id>/stop", "POST", stop_job)
    app.route(prefix + "/job/<job_id>/restart", "POST", restart_job)


def add_ui_routes(app, basename):
    def redirect():
        bottle.redirect(basename + "/")

    root = os.path.realpath(UI_DIR)

    def page(path=""):
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
            raise ApiError(404, "the web UI is not installed") from None
        bottle.response.content_type = "text/html; charset=UTF-8"
        return html.replace("__UI_BASENAME__", basename)

    mimetypes.add_type("text/javascript", ".js")
    app.route(basename, "GET", redirect)
    app.route(basename + "/", "GET", page)
    app.route(basename + "/<path:path>", "GET", page)

"""`hq-gevent` command line: `serve` runs the server; the other commands talk to one.

The client commands import only the standard library, requests and hq_gevent.client: they must
start fast and must never load (or monkey-patch with) gevent, which only `serve` needs.
"""
import argparse
import json
import os
import re
import sys
import time
from datetime import datetime, timezone

from hq_gevent import __version__

DEFAULT_ADDRESS = "http://127.0.0.1:19900"
TOKEN_FILE = "/etc/hq-gevent/tokens"  # made by the RPM (0640 root:hq-gevent); $HQ_TOKEN_FILE overrides
STATUSES = ("waiting", "running", "canceling", "success", "failure", "canceled", "unfinished", "unknown")
FINISHED = ("success", "failure", "canceled", "unknown")
COLORS = {"failure": "31", "success": "32", "running": "36", "unknown": "33",
          "canceled": "90", "canceling": "90", "unfinished": "2"}


class Failed(Exception):
    """A client-side error to print as `error: <message>` with exit code 1."""


def job_id_arg(text):
    # Checked by argparse, so a bad id is a usage error (exit 2) before any request is made.
    if not (text.isascii() and text.isdigit()) or int(text) >= 1 << 64:
        raise argparse.ArgumentTypeError(f"The job id must be a number but '{text}'.")
    return str(int(text))


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not '{text}'")
    return value


def seconds(text):
    try:
        value = float(text)
    except ValueError:
        value = -1
    if not value >= 0:  # also refuses nan, which would never time out
        raise argparse.ArgumentTypeError(f"must be a number of seconds, not '{text}'")
    return value


def build_parser():
    parser = argparse.ArgumentParser(prog="hq-gevent", description="A durable HTTP job queue server (HQ-compatible).")
    parser.add_argument("-v", "--version", action="version", version=f"hq-gevent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.required = True

    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("-c", "--config-file", default=os.environ.get("HQ_CONFIG"), help="TOML config file (env HQ_CONFIG)")
    serve.add_argument("-l", "--log-level", default=os.environ.get("HQ_LOG_LEVEL"), help="debug|info|warn|error (env HQ_LOG_LEVEL)")
    serve.set_defaults(func=run_serve)

    migrate = sub.add_parser(
        "migrate", help="copy every job of a WAL data_dir into PostgreSQL",
        description="Copy every job of a write-ahead log data_dir into a PostgreSQL database (store =\n"
                    "\"postgresql\"). The data_dir's server must be stopped. Running it again resumes an\n"
                    "interrupted copy and never duplicates a job.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    migrate.add_argument("--from-data-dir", required=True, metavar="DIR", help="the WAL server's data_dir")
    migrate.add_argument("--to-postgresql", metavar="DSN",
                         help="libpq connection string or URL (env HQ_POSTGRESQL_DSN)")
    migrate.add_argument("-c", "--config-file", default=os.environ.get("HQ_CONFIG"),
                         help="the WAL server's config, for its retry defaults (env HQ_CONFIG)")
    migrate.set_defaults(func=run_migrate)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-a", "--address", metavar="URL",
                        help=f"server address (env HQ_ADDRESS, default {DEFAULT_ADDRESS})")
    common.add_argument("--token", metavar="TOKEN",
                        help=f"API token (env HQ_TOKEN, safer: a flag shows in ps; else the first one in {TOKEN_FILE} if readable)")
    common.add_argument("--cacert", metavar="FILE", help="CA certificate (PEM) to verify an https server (env HQ_CACERT)")

    def command(name, func, help, description=None, epilog=None):
        p = sub.add_parser(name, parents=[common], help=help, description=description or help,
                           epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func, parser=p)
        return p

    push = command(
        "push", run_push, "push jobs; prints each new job id",
        "Push jobs. Each FILE (or '-' for stdin) holds a job object {url, payload, headers, timeout,\n"
        "name, comment, retry, delay | runAt, uniqueKey} or a JSON array of them; or give the job with\n"
        "--url and its options. Several jobs go in batches of 1000 (each stored all or nothing).\n"
        "Prints one id a line, in order; a duplicate uniqueKey prints the existing job's id.",
        "examples:\n  hq-gevent push job.json\n  echo '{\"url\": \"http://127.0.0.1:8080/\"}' | hq-gevent push -\n"
        "  hq-gevent push --url http://127.0.0.1:8080/resize --payload '{\"w\": 64}' --header X-Team:img\n"
        "  hq-gevent push job.json --retry 5 --min-backoff 2 --run-at 2026-12-24T18:00:00Z")
    push.add_argument("files", nargs="*", metavar="FILE", help="a JSON file with a job or an array of jobs, or '-' for stdin")
    push.add_argument("--url", help="the worker URL of a job given on the command line")
    push.add_argument("--payload", metavar="JSON", help="the job's payload, as JSON text (with --url)")
    push.add_argument("--name", help="the job's name (with --url)")
    push.add_argument("--comment", help="the job's comment (with --url)")
    push.add_argument("--header", action="append", default=[], metavar="K:V",
                      help="a header for the worker request; repeatable (with --url)")
    push.add_argument("--timeout", type=int, metavar="S", help="worker request time limit in seconds, 0 = none (with --url)")
    policy = push.add_argument_group("delivery policy (set on every job pushed, over the file's own)")
    policy.add_argument("--retry", type=positive_int, metavar="N", help="attempts in all, the first included (retry.maxAttempts)")
    policy.add_argument("--min-backoff", type=seconds, metavar="S", help="wait before the first retry (retry.minBackoff)")
    policy.add_argument("--max-backoff", type=seconds, metavar="S", help="longest wait between attempts (retry.maxBackoff)")
    when = policy.add_mutually_exclusive_group()
    when.add_argument("--delay", type=seconds, metavar="S", help="start no sooner than S seconds from now")
    when.add_argument("--run-at", metavar="TIME", help="start no sooner than TIME (RFC 3339, e.g. 2026-12-24T18:00:00Z)")
    policy.add_argument("--unique-key", metavar="K", help="push nothing if a job with this uniqueKey exists (one job only)")

    lst = command(
        "list", run_list, "list jobs",
        "List jobs as a table (ID NAME CREATED DURATION STATUS; -d adds COMMENT, URL, RUN AT,\n"
        "STARTED, FINISHED and ATTEMPTS), oldest first. With ids, show just those jobs. Pages\n"
        "through the server's list until -l jobs are shown or the list ends.")
    lst.add_argument("ids", nargs="*", type=job_id_arg, metavar="ID", help="show only these jobs")
    lst.add_argument("-q", "--quiet", action="store_true", help="print ids only")
    lst.add_argument("-d", "--detail", action="store_true",
                     help="add COMMENT, URL, RUN AT, STARTED, FINISHED and ATTEMPTS columns")
    lst.add_argument("-n", "--name", metavar="REGEX", help="only jobs whose name matches")
    lst.add_argument("-t", "--term", metavar="REGEX", help="only jobs whose name, id, comment, url or status matches")
    lst.add_argument("-r", "--reverse", action="store_true", help="newest first")
    lst.add_argument("-b", "--begin", type=job_id_arg, metavar="ID", help="start from this id (inclusive)")
    lst.add_argument("-s", "--status", choices=STATUSES, metavar="STATUS", help="only jobs in STATUS: " + "|".join(STATUSES))
    many = lst.add_mutually_exclusive_group()
    many.add_argument("-l", "--limit", type=positive_int, metavar="N", help="show at most N jobs")
    many.add_argument("--all", action="store_true", help="walk the whole list, ignoring the server's default limit")
    lst.add_argument("--json", action="store_true", help="print the list response as JSON instead of a table")

    info = command("info", run_info, "show a job as JSON",
                   "Show a job as indented JSON, its failed attempts (history) included.")
    info.add_argument("id", type=job_id_arg, metavar="ID")

    for name, func, help in (("stop", run_stop, "stop waiting or running jobs; prints their ids"),
                             ("delete", run_delete, "delete finished jobs; prints their ids")):
        p = command(name, func, help, help + ".\nGoes on past a failing id; exits 1 if any failed.")
        p.add_argument("ids", nargs="+", type=job_id_arg, metavar="ID")

    restart = command("restart", run_restart, "run finished jobs again; prints the ids that will run",
                      "Run finished jobs again (same id), or with --copy as new jobs (new ids).\n"
                      "Prints the id that will run; goes on past a failing id; exits 1 if any failed.")
    restart.add_argument("-c", "--copy", action="store_true", help="push a copy with a new id; leave the job as it is")
    restart.add_argument("ids", nargs="+", type=job_id_arg, metavar="ID")

    command("stats", run_stats, "show server statistics as JSON")

    wait = command("wait", run_wait, "wait until jobs finish",
                   "Wait until every job has finished; prints 'ID STATUS' as each one does. A job\n"
                   "waiting for a retry or for its runAt has not finished.\n"
                   "Exit status: 0 all succeeded, 1 any failed or was canceled (or an error), 2 timeout.",
                   "example:\n  hq-gevent push job.json | xargs hq-gevent wait --timeout 60")
    wait.add_argument("ids", nargs="+", type=job_id_arg, metavar="ID")
    wait.add_argument("--timeout", type=seconds, metavar="S", help="give up after S seconds (exit 2)")
    return parser


def run_serve(args):
    from hq_gevent.server import serve

    return serve(config_file=args.config_file, log_level=args.log_level)


def run_migrate(args):
    from hq_gevent.migrate import run

    return run(args)


# --- helpers --------------------------------------------------------------------------
def make_client(args):
    from hq_gevent.client import Client

    args.token_source = None
    token = args.token
    if token is not None:
        args.token_source = "--token" if token.strip() else None  # --token '' sends none
    elif os.environ.get("HQ_TOKEN", "").strip():
        token, args.token_source = os.environ["HQ_TOKEN"], "$HQ_TOKEN"
    else:
        path = token_file()
        token = read_token_file(path)
        if token:
            args.token_source = path
    cacert = args.cacert if args.cacert is not None else os.environ.get("HQ_CACERT", "")
    try:
        return Client(args.address or os.environ.get("HQ_ADDRESS") or DEFAULT_ADDRESS,
                      token=token or "", cacert=cacert)
    except ValueError as e:
        raise Failed(e)


def token_file():
    return os.environ.get("HQ_TOKEN_FILE") or TOKEN_FILE


def read_token_file(path):
    """The first token of the server's token file (one a line, '#' comments), or None when the
    file is absent or not readable by this user: then the CLI sends no token."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith("#"):
                    return line
    except (OSError, UnicodeDecodeError):
        pass
    return None


def auth_help(error, args):
    """The server's 401/403 text with what to do about it."""
    source = getattr(args, "token_source", None)
    if error.status == 403:
        return f"{error.error} (the token from {source} may only read)"
    if source:
        return f"{error.error} (the server refused the token from {source})"
    hint = f"{error.error} (give a token with --token or $HQ_TOKEN"
    path = token_file()
    if os.path.exists(path) and not os.access(path, os.R_OK):
        hint += f"; {path} is not readable by you"
    return hint + ")"


def out(text=""):
    # Flushed per line so a pipeline (`push ... | xargs wait`) sees each id as it comes.
    print(text, flush=True)


def warn(message):
    print(f"error: {message}", file=sys.stderr, flush=True)


def print_json(data):
    out(json.dumps(data, indent=2, ensure_ascii=False))


def parse_time(text):
    if not text:
        return None
    try:
        return datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None


def relative(text, now):
    """go-humanize style: "now", "3 minutes ago", "2 days from now"."""
    t = parse_time(text)
    if t is None:
        return text or ""
    delta = (now - t).total_seconds()
    suffix = "ago" if delta >= 0 else "from now"
    delta = abs(delta)
    if delta < 1:
        return "now"
    for limit, unit, size in ((60, "second", 1), (3600, "minute", 60), (86400, "hour", 3600),
                              (7 * 86400, "day", 86400), (30 * 86400, "week", 7 * 86400),
                              (365 * 86400, "month", 30 * 86400), (float("inf"), "year", 365 * 86400)):
        if delta < limit:
            n = int(delta // size)
            return f"{n} {unit}{'s' if n != 1 else ''} {suffix}"


def duration(started, finished):
    """Go-style duration with millisecond precision: 0s, 250ms, 1.5s, 2m3.04s, 1h0m2s."""
    a, b = parse_time(started), parse_time(finished)
    if a is None or b is None:
        return ""
    ms = max(0, round((b - a).total_seconds() * 1000))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, ms = divmod(ms, 3600_000)
    minutes, ms = divmod(ms, 60_000)
    secs = f"{ms / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{secs}"
    return f"{minutes}m{secs}" if minutes else secs


def attempts(job):
    """`2/5`: attempts made of the most allowed; blank for a server without retries (HQ)."""
    made, most = job.get("attempts"), (job.get("retry") or {}).get("maxAttempts")
    return "" if made is None else f"{made}/{most}" if most else str(made)


def one_line(text):
    return re.sub(r"\s+", " ", str(text or "")).strip()


def print_table(jobs, detail):
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    now = datetime.now(timezone.utc)
    if detail:
        header = ["ID", "NAME", "COMMENT", "URL", "CREATED", "RUN AT", "STARTED", "FINISHED", "DURATION",
                  "ATTEMPTS", "STATUS"]
    else:
        header = ["ID", "NAME", "CREATED", "DURATION", "STATUS"]
    rows = [header]
    for job in jobs:
        row = [job.get("id", ""), one_line(job.get("name")), relative(job.get("createdAt"), now)]
        if detail:
            row[2:2] = [one_line(job.get("comment")), one_line(job.get("url"))]
            row += [relative(job.get("runAt"), now), relative(job.get("startedAt"), now),
                    relative(job.get("finishedAt"), now)]
        row.append(duration(job.get("startedAt"), job.get("finishedAt")))
        if detail:
            row.append(attempts(job))
        row.append(job.get("status", ""))
        rows.append([str(c) for c in row])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for n, row in enumerate(rows):
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths)]
        status = row[-1]
        # Widths are measured on plain text; the status column is last, so escapes never misalign.
        if color and n and status in COLORS:
            status = f"\033[{COLORS[status]}m{status}\033[0m"
        out("  ".join(cells + [status]))


# --- commands -------------------------------------------------------------------------
def build_url_job(args, parser):
    job = {"url": args.url}
    if args.payload is not None:
        try:
            job["payload"] = json.loads(args.payload)
        except ValueError as e:
            parser.error(f"--payload is not valid JSON: {e}")
    if args.name is not None:
        job["name"] = args.name
    if args.comment is not None:
        job["comment"] = args.comment
    if args.header:
        headers = {}
        for item in args.header:
            key, sep, value = item.partition(":")
            if not sep or not key.strip():
                parser.error(f"--header must be KEY:VALUE, not '{item}'")
            headers[key.strip()] = value.strip()
        job["headers"] = headers
    if args.timeout is not None:
        job["timeout"] = args.timeout
    return job


def read_jobs(files):
    """[(source, job dict)]: a file holds a job or an array of jobs (source `file[i]`);
    everything is read and checked before anything is pushed."""
    jobs = []
    for name in files:
        try:
            text = sys.stdin.read() if name == "-" else open(name, encoding="utf-8").read()
        except OSError as e:
            raise Failed(f"{name}: {e.strerror or e}")
        except UnicodeDecodeError:
            raise Failed(f"{name}: not UTF-8 text")
        source = "stdin" if name == "-" else name
        try:
            job = json.loads(text)
        except ValueError as e:
            raise Failed(f"{source}: invalid JSON: {e}")
        if isinstance(job, list):
            named = [(f"{source}[{n}]", item) for n, item in enumerate(job)]
        else:
            named = [(source, job)]
        for where, item in named:
            if not isinstance(item, dict):
                raise Failed(f"{where}: a job must be a JSON object")
        jobs += named
    return jobs


def run_push(args, parser):
    url_options = [o for o, v in (("--payload", args.payload), ("--name", args.name), ("--comment", args.comment),
                                  ("--header", args.header), ("--timeout", args.timeout)) if v]
    if args.url is not None:
        if args.files:
            parser.error("give either FILEs or --url, not both")
        jobs = [("--url", build_url_job(args, parser))]
    else:
        if url_options:
            parser.error(f"{url_options[0]} needs --url")
        if not args.files:
            parser.error("give a job: FILE..., '-' for stdin, or --url")
        if args.files.count("-") > 1:
            parser.error("'-' (stdin) may be given once")
        jobs = read_jobs(args.files)
    if args.unique_key is not None and len(jobs) > 1:
        parser.error("--unique-key names one job; give each job of several its own uniqueKey")
    from hq_gevent.client import BATCH_SIZE, BatchError, with_policy

    retry = {key: value for key, value in (("maxAttempts", args.retry), ("minBackoff", args.min_backoff),
                                           ("maxBackoff", args.max_backoff)) if value is not None}
    jobs = [(source, with_policy(job, retry or None, args.delay, args.run_at, args.unique_key))
            for source, job in jobs]
    client = make_client(args)
    if len(jobs) == 1:
        job = client.push(jobs[0][1])
        out(job["id"])
        if job.duplicate:
            print(f"note: {job['id']} is the job already pushed with uniqueKey {job.get('uniqueKey')!r}; "
                  "nothing new was stored", file=sys.stderr)
        return 0
    # One batch a call, its ids printed before the next is sent: whatever stops the push later
    # (a refused job, a lost connection), the ids of the jobs stored are on stdout.
    for start in range(0, len(jobs), BATCH_SIZE):
        try:
            pushed = client.push_many([job for _, job in jobs[start:start + BATCH_SIZE]])
        except BatchError as e:
            where = f"{jobs[start + e.index][0]}: " if e.index is not None and start + e.index < len(jobs) else ""
            warn(where + e.reason)
            warn(f"{start} of {len(jobs)} jobs were pushed (the ids above), the rest were not"
                 if start else "nothing was pushed")
            return 1
        for job in pushed:
            out(job["id"])
    return 0


def run_list(args, parser):
    from hq_gevent.client import HQAuthError, HQError

    filters = {"name": args.name, "term": args.term, "reverse": args.reverse, "status": args.status}
    client = make_client(args)
    if args.ids:
        used = [f for f, v in (("-n", args.name), ("-t", args.term), ("-r", args.reverse), ("-b", args.begin),
                               ("-s", args.status), ("-l", args.limit), ("--all", args.all)) if v]
        if used:
            parser.error(f"{used[0]} cannot be combined with job ids")
        jobs, failed = [], False
        for i in args.ids:
            try:
                jobs.append(client.get(i))
            except HQAuthError:
                raise
            except HQError as e:
                warn(e.error)
                failed = True
        result = {"jobs": jobs, "hasNext": False, "count": len(jobs)}
    else:
        failed = False
        result = fetch_list(client, filters, args.begin, args.limit, args.all)
        if result.get("hasNext") and args.limit is None and not args.json:
            # Only the server's default limit stopped the list: say so, without touching stdout.
            print(f"note: more jobs follow; use --all, or -b {result.get('next')}", file=sys.stderr)
    if args.json:
        print_json(result)
    elif args.quiet:
        for job in result["jobs"]:
            out(job["id"])
    else:
        print_table(result["jobs"], args.detail)
    return 1 if failed else 0


def fetch_list(client, filters, begin, limit, walk_all):
    """--all follows `next` to the end; -l N asks for N and follows `next` while a page comes
    back short; with neither, one page, so the server's job_list_default_limit applies."""
    if walk_all:
        jobs = list(client.iter_jobs(begin=begin, **filters))
        return {"jobs": jobs, "hasNext": False, "count": len(jobs)}
    page = client.list(begin=begin, limit=limit, **filters)
    if not limit:
        return page
    jobs = list(page["jobs"])
    while len(jobs) < limit and page.get("hasNext") and page.get("next") not in (None, begin):
        begin = page["next"]
        page = client.list(begin=begin, limit=limit - len(jobs), **filters)
        jobs += page["jobs"]
    result = {"jobs": jobs[:limit], "hasNext": bool(page.get("hasNext"))}
    if result["hasNext"]:
        result["next"] = page.get("next")
    result["count"] = len(result["jobs"])
    return result


def run_info(args, parser):
    print_json(make_client(args).get(args.id))
    return 0


def run_stats(args, parser):
    print_json(make_client(args).stats())
    return 0


def each(ids, action):
    """Apply `action` to every id, printing the resulting id; go on past a job's error (not past
    an authorization error, which every id would repeat)."""
    from hq_gevent.client import HQAuthError, HQError

    failed = False
    for i in ids:
        try:
            out(action(i)["id"])
        except HQAuthError:
            raise
        except HQError as e:
            warn(e.error)
            failed = True
    return 1 if failed else 0


def run_stop(args, parser):
    return each(args.ids, make_client(args).stop)


def run_delete(args, parser):
    return each(args.ids, make_client(args).delete)


def run_restart(args, parser):
    client = make_client(args)
    return each(args.ids, lambda i: client.restart(i, copy=args.copy))


def run_wait(args, parser):
    from hq_gevent.client import HQAuthError, HQConnectionError, HQError

    client = make_client(args)
    pending = list(dict.fromkeys(args.ids))
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    failed = False
    interval = 0.05
    while pending:
        for i in list(pending):
            # A hung server must not hold `wait --timeout 5` for the client's full 30 s.
            left = None if deadline is None else deadline - time.monotonic()
            try:
                job = client.get(i, timeout=None if left is None else min(client.timeout, max(1.0, left)))
            except HQAuthError:
                raise
            except HQError as e:
                warn(e.error)
                failed = True
                pending.remove(i)
                continue
            except HQConnectionError:
                if deadline is None or time.monotonic() < deadline:
                    raise
                break  # the time is up while the server was silent: report the timeout below
            if job.get("status") in FINISHED:
                out(f"{i} {job['status']}")
                failed = failed or job["status"] != "success"
                pending.remove(i)
        if not pending:
            break
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            warn(f"timed out after {args.timeout:g}s waiting for {' '.join(pending)}")
            return 2
        time.sleep(interval if left is None else min(interval, left))
        interval = min(interval * 2, 1.0)
    return 1 if failed else 0


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.func in (run_serve, run_migrate):
        return args.func(args)
    from hq_gevent.client import HQAuthError, HQConnectionError, HQError

    try:
        return args.func(args, args.parser)
    except HQAuthError as e:
        warn(auth_help(e, args))
        return 1
    except HQConnectionError as e:
        hint = ""
        if "CERTIFICATE_VERIFY_FAILED" in e.reason or "certificate verify failed" in e.reason:
            hint = " (give the CA certificate that signed the server's with --cacert or $HQ_CACERT)"
        warn(f"{e}{hint}")
        return 1
    except (HQError, Failed) as e:
        warn(e.error if isinstance(e, HQError) else e)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`); silence the flush error Python would print at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())

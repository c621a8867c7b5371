"""The built-in web UI in a real headless Chromium (Debian's package, driven by Playwright).

Every test runs against a real hq-gevent server and a real worker app: jobs are pushed through the
HTTP API, the worker decides their outcome, and the browser only sees what the server serves under
the UI basename. Screenshots land in test-artifacts/ at the repo root.
"""
import os
import shutil
import time
from urllib.parse import urlsplit

import pytest
import requests

from conftest import ROOT, require_tool

ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
REFRESH_MS = 300  # the UI's auto-refresh interval in these tests (the default is 3 s)
WAIT_MS = 10_000  # upper bound for any single browser-side wait


@pytest.fixture(scope="module")
def browser():
    require_tool("chromium", "the web UI tests drive a real browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("the playwright package is required in CI (pip install -e '.[test]')")
        pytest.skip("the playwright package is not installed")
    exe = shutil.which("chromium")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, timeout=30_000)
        yield b
        b.close()


class UI:
    """One browser context + page, with the checks every test wants at the end."""

    def __init__(self, browser):
        self.context = browser.new_context(viewport={"width": 1280, "height": 800})
        self.context.add_init_script(f"window.HQ_REFRESH_MS = {REFRESH_MS};")
        self.page = self.context.new_page()
        self.page.set_default_timeout(WAIT_MS)
        self.base = "/ui"
        self.urls, self.errors, self.dialogs = [], [], []
        self.api_calls = []  # (url, Authorization header or None) of each call to the UI's API
        self.page.on("request", self._request)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", self._dialog)

    def _request(self, request):
        self.urls.append(request.url)
        if urlsplit(request.url).path.startswith(self.base + "/internal/"):
            self.api_calls.append((request.url, request.headers.get("authorization")))

    def _dialog(self, dialog):
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def open(self, srv, path="/"):
        """Load a UI page and wait for its first answer from the API."""
        self.page.goto(srv.url + self.base + path)
        if path.startswith("/job/"):
            self.page.wait_for_function(
                "document.querySelector('#job-view') && "
                "(+document.querySelector('#job-view').dataset.loads > 0 || !!document.querySelector('.msg-error'))")
        elif path == "/" or path.startswith("/?"):
            self.wait_refresh(0)

    def refreshes(self):
        return int(self.page.get_attribute("#dashboard", "data-refreshes"))

    def wait_refresh(self, after=None):
        """Wait until the dashboard has completed a load later than `after` (default: now)."""
        after = self.refreshes() if after is None else after
        self.page.wait_for_function(f"(document.querySelector('#dashboard')?.dataset.refreshes ?? -1) > {after}")

    def rows(self):
        """[(id, name, status text, status class)] as rendered, top to bottom."""
        return [tuple(r) for r in self.page.eval_on_selector_all(
            "#jobs-body tr[data-id]",
            """trs => trs.map(tr => [tr.dataset.id, tr.querySelector('.name').textContent,
                                    tr.querySelector('.status').textContent, tr.querySelector('.status').className])""")]

    def until(self, check, what, timeout=WAIT_MS / 1000):
        """Poll `check` (bounded) until it is true; the page refreshes on its own meanwhile."""
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; the page shows {self.rows()}")
            time.sleep(0.05)

    def ids(self):
        return [r[0] for r in self.rows()]

    def stat(self, key):
        return self.page.text_content(f"[data-stat={key}]").split("/")[0].strip()

    def no_horizontal_scroll(self):
        sw, cw = self.page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        assert sw <= cw, f"the page scrolls sideways: scrollWidth {sw} > clientWidth {cw}"

    def shot(self, name, full_page=False):
        ARTIFACTS.mkdir(exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / name), full_page=full_page)

    def close(self):
        self.context.close()
        assert not self.errors, f"JavaScript errors: {self.errors}"
        assert not self.dialogs, f"the page opened dialogs (injected script ran?): {self.dialogs}"
        outside = [u for u in self.urls if u.startswith("http") and not urlsplit(u).path.startswith(self.base)]
        assert not outside, f"the UI fetched URLs outside {self.base}: {outside}"


@pytest.fixture
def ui(browser):
    u = UI(browser)
    yield u
    u.close()


def wait_text(page, selector, text, timeout=WAIT_MS):
    """Wait until `selector`'s textContent equals `text` (bounded)."""
    page.wait_for_function(
        "([s, t]) => { const e = document.querySelector(s); return e && e.textContent.trim() === t; }",
        arg=[selector, text], timeout=timeout)


def push_done(srv, worker, **job):
    job.setdefault("url", worker.url + "/work")
    j = srv.push(**job)
    return srv.wait_job(j["id"])


# --- the dashboard ------------------------------------------------------------------------------

def test_dashboard_lists_jobs_with_their_statuses_and_stats(make_server, worker, ui):
    srv = make_server(dispatchers=1)  # one job in flight at a time, so a held job keeps the next waiting
    ok = push_done(srv, worker, name="ok-job")
    worker.respond(500, b"nope")
    bad = push_done(srv, worker, name="bad-job")
    worker.respond(200, b"OK")
    worker.hold()
    run = srv.push(url=worker.url + "/w", name="run-job")
    srv.wait_job(run["id"], statuses=("running",))
    queued = srv.push(url=worker.url + "/w", name="wait-job")
    stopped = srv.push(url=worker.url + "/w", name="stop-job")
    assert srv.api("POST", f"/job/{stopped['id']}/stop")[0] == 200
    srv.wait_job(stopped["id"], statuses=("canceled",))

    ui.open(srv)
    rows = ui.rows()
    expected = {ok["id"]: ("ok-job", "success"), bad["id"]: ("bad-job", "failure"), run["id"]: ("run-job", "running"),
                queued["id"]: ("wait-job", "waiting"), stopped["id"]: ("stop-job", "canceled")}
    assert {r[0]: (r[1], r[2]) for r in rows} == expected
    # Newest first by default; ids compared as 64-bit integers in Python, kept as strings in the page.
    assert [r[0] for r in rows] == sorted(expected, key=int, reverse=True)
    # One colour per status.
    colours = {r[2]: ui.page.eval_on_selector(f"#jobs-body tr[data-id='{r[0]}'] .status",
                                              "e => getComputedStyle(e).backgroundColor") for r in rows}
    assert len(set(colours.values())) == len(colours), colours
    assert all(r[3] == "status status-" + r[2] for r in rows)
    # Created is relative, exact on hover; a finished job shows a duration.
    created = ui.page.locator(f"#jobs-body tr[data-id='{ok['id']}'] time")
    assert ok["createdAt"] in created.get_attribute("title")
    assert created.text_content() in ("just now",) or created.text_content().endswith("ago")
    assert ui.page.text_content(f"#jobs-body tr[data-id='{ok['id']}'] td[data-label=Duration]").strip()
    # Stats as the server reports them (the ones that cannot move while the worker is held).
    stats = srv.api("GET", "/stats")[1]
    for key in ("numJobs", "numRunningJobs", "numWaitingJobs", "numScheduledJobs", "numWorkers"):
        assert ui.stat(key) == str(stats[key]), key
    assert (ui.stat("numJobs"), ui.stat("numRunningJobs"), ui.stat("numWaitingJobs")) == ("5", "1", "1")
    assert ui.stat("queueUsage").isdigit()
    ui.shot("dashboard.png")

    # Auto-refresh picks up the outcome without a reload.
    ui.page.evaluate("window.__same_page = true")
    worker.release()
    srv.wait_job(queued["id"])
    wait_text(ui.page, f"#jobs-body tr[data-id='{run['id']}'] .status", "success")
    wait_text(ui.page, f"#jobs-body tr[data-id='{queued['id']}'] .status", "success")
    wait_text(ui.page, "[data-stat=numRunningJobs]", "0")
    assert ui.page.evaluate("window.__same_page") is True


def test_auto_refresh_keeps_filters_and_scroll_and_can_pause(make_server, worker, ui):
    srv = make_server()
    for i in range(30):
        srv.push(url=worker.url + "/w", name=f"keep-{i}")
    last = srv.push(url=worker.url + "/w", name="other")
    srv.wait_job(last["id"])
    ui.open(srv)
    ui.page.fill("#f-name", "^keep")
    ui.page.press("#f-name", "Enter")
    ui.page.select_option("#f-limit", "50")
    ui.page.wait_for_function("document.querySelectorAll('#jobs-body tr[data-id]').length === 30")
    assert all(r[1].startswith("keep-") for r in ui.rows())
    assert "name=%5Ekeep" in ui.page.url and "limit=50" in ui.page.url

    ui.page.evaluate("window.scrollTo(0, 300)")
    ui.wait_refresh()
    ui.wait_refresh()
    assert ui.page.evaluate("window.scrollY") == 300
    assert ui.page.input_value("#f-name") == "^keep"

    new = srv.push(url=worker.url + "/w", name="keep-new")
    ui.page.wait_for_selector(f"#jobs-body tr[data-id='{new['id']}']")
    assert len(ui.rows()) == 31 and ui.page.evaluate("window.scrollY") == 300

    ui.page.click("#pause")
    assert ui.page.get_attribute("#pause", "aria-pressed") == "true"
    assert "paused" in ui.page.text_content("#updated")
    time.sleep(REFRESH_MS * 2 / 1000)  # a load already in flight when the button was pressed may still land
    count = ui.refreshes()
    hidden = srv.push(url=worker.url + "/w", name="keep-while-paused")
    srv.wait_job(hidden["id"])
    time.sleep(REFRESH_MS * 4 / 1000)
    assert ui.refreshes() == count
    assert hidden["id"] not in ui.ids()
    ui.page.click("#pause")
    ui.page.wait_for_selector(f"#jobs-body tr[data-id='{hidden['id']}']")
    assert ui.page.get_attribute("#pause", "aria-pressed") == "false"


def test_filters_narrow_the_list_and_paging_walks_every_job(make_server, worker, ui):
    srv = make_server()
    jobs = [srv.push(url=worker.url + "/w", name=("alpha-" if i % 2 == 0 else "beta-") + str(i), comment=f"c-{i}")
            for i in range(20)]
    srv.wait_job(jobs[-1]["id"])
    worker.respond(500, b"bad")
    failed = [srv.push(url=worker.url + "/w", name=f"beta-fail-{i}") for i in range(3)]
    for j in failed:
        srv.wait_job(j["id"])
    newest_first = sorted((j["id"] for j in jobs + failed), key=int, reverse=True)
    page = ui.page

    ui.open(srv)
    page.select_option("#f-limit", "10")
    ui.until(lambda: ui.ids() == newest_first[:10], "the first page of 10")
    seen = []
    for n in range(5):  # 23 jobs at 10 a page: 3 pages; bounded loop
        current = ui.ids()
        seen += current
        if page.is_disabled("#next-page"):
            break
        page.click("#next-page")
        ui.until(lambda: ui.ids() and ui.ids()[0] != current[0], f"page {n + 2}")
    assert seen == newest_first
    assert page.is_disabled("#next-page")
    page.click("#prev-page")
    ui.until(lambda: ui.ids() == newest_first[10:20], "the previous page")
    page.click("#first-page")
    ui.until(lambda: ui.ids() == newest_first[:10], "the first page again")
    assert page.is_disabled("#first-page") and page.is_disabled("#prev-page")

    page.click("#order")
    ui.until(lambda: ui.ids() == newest_first[::-1][:10], "oldest first")
    assert "oldest" in page.text_content("#order")

    page.select_option("#f-limit", "50")
    page.fill("#f-name", "^alpha-")
    page.click("#apply")
    alphas = [j["id"] for j in jobs[::2]]
    ui.until(lambda: ui.ids() == alphas, "the name filter")
    assert all(r[1].startswith("alpha-") for r in ui.rows())

    page.fill("#f-name", "")
    page.fill("#f-term", "^c-7$")  # term also matches the comment
    page.press("#f-term", "Enter")
    ui.until(lambda: ui.ids() == [jobs[7]["id"]], "the term filter")

    page.fill("#f-term", "")
    page.select_option("#f-status", "failure")  # a select applies at once
    ui.until(lambda: ui.ids() == [j["id"] for j in failed], "the status filter")
    assert {r[2] for r in ui.rows()} == {"failure"}

    # A bad regex: the server's own error text is shown, not a blank table.
    status, body = srv.api("GET", "/job?name=%28")
    assert status == 422
    page.fill("#f-name", "(")
    page.press("#f-name", "Enter")
    page.wait_for_selector(".msg-error")
    assert body["error"] in page.text_content(".msg-error")

    page.click("#clear")
    ui.until(lambda: ui.ids() == newest_first[::-1], "all jobs, oldest first, after Clear")
    assert not page.is_visible(".msg-error")


# --- the job page -------------------------------------------------------------------------------

def test_running_job_can_be_stopped_and_shows_canceled(make_server, worker, ui):
    srv = make_server()
    worker.hold()
    job = srv.push(url=worker.url + "/w", name="long")
    srv.wait_job(job["id"], statuses=("running",))
    ui.open(srv, f"/job/{job['id']}")
    wait_text(ui.page, "#job-status", "running")
    assert ui.page.text_content("#job-id") == job["id"]

    # Refused actions show the server's reason.
    ui.page.click("#act-restart")
    ui.page.wait_for_selector(".msg-error")
    assert f"The job {job['id']} is running now" in ui.page.text_content(".msg-error")

    ui.page.click("#act-stop")
    wait_text(ui.page, "#job-status", "canceled")
    assert srv.job(job["id"])["status"] == "canceled"
    wait_text(ui.page, "[data-field=canceled]", "true")
    ui.page.click("#act-stop")
    ui.page.wait_for_function(f"document.querySelector('.msg-error') && document.querySelector('.msg-error').textContent.includes('The job {job['id']} is not active')")


def test_failed_job_restart_and_copy_then_succeed(make_server, worker, ui):
    srv = make_server()
    worker.respond(500, b'{"reason": "db down"}')
    job = srv.push(url=worker.url + "/w", name="flaky", comment="retry me",
                   payload={"big": 9007199254740993, "nested": {"a": [1, 2]}}, headers={"X-Trace": "t1"})
    job = srv.wait_job(job["id"])
    assert job["status"] == "failure"
    ui.open(srv, f"/job/{job['id']}")
    wait_text(ui.page, "#job-status", "failure")
    # Every field of the record is on the page.
    shown = set(ui.page.eval_on_selector_all("#fields dt", "els => els.map(e => e.textContent)"))
    blocks = {"payload", "headers", "output"}
    assert set(job) - blocks <= shown
    for key in ("id", "name", "comment", "url", "statusCode", "err", "createdAt"):
        assert ui.page.text_content(f"[data-field={key}]").startswith(str(job[key])), key
    # Payload, headers and output pretty-printed; the 64-bit number survives exactly.
    payload = ui.page.text_content("#block-payload")
    assert "9007199254740993" in payload and '\n  "nested": {\n    "a": [' in payload
    assert '"X-Trace": "t1"' in ui.page.text_content("#block-headers")
    assert ui.page.text_content("#block-output") == '{\n  "reason": "db down"\n}'
    ui.shot("job.png", full_page=True)

    worker.respond(200, b"fixed")
    ui.page.click("#act-restart")
    wait_text(ui.page, "#job-status", "success")
    wait_text(ui.page, "#block-output", "fixed")
    assert ui.page.url.endswith(f"/job/{job['id']}")
    assert worker.job_ids().count(job["id"]) == 2

    ui.page.click("#act-copy")
    link = ui.page.wait_for_selector("#copy-link")
    copy_id = link.text_content().split()[-1]
    assert copy_id != job["id"]
    link.click()
    ui.page.wait_for_url(f"**/ui/job/{copy_id}")
    wait_text(ui.page, "#job-status", "success")
    copy = srv.job(copy_id)
    assert (copy["name"], copy["comment"], copy["payload"]) == ("flaky", "retry me", job["payload"])


def test_delete_asks_for_confirmation_and_removes_the_job(make_server, worker, ui):
    srv = make_server()
    worker.hold()
    job = srv.push(url=worker.url + "/w", name="to-delete")
    srv.wait_job(job["id"], statuses=("running",))
    ui.open(srv, f"/job/{job['id']}")

    ui.page.click("#act-delete")
    assert ui.page.is_visible("#confirm")
    ui.page.click("#cancel-delete")
    assert not ui.page.is_visible("#confirm")
    ui.page.click("#act-delete")
    ui.page.click("#confirm-delete")  # refused: it is running
    ui.page.wait_for_selector(".msg-error")
    assert job["id"] in ui.page.text_content(".msg-error")
    assert srv.job(job["id"])["status"] == "running"

    worker.release()
    wait_text(ui.page, "#job-status", "success")
    ui.page.click("#act-delete")
    ui.page.keyboard.press("Escape")  # Escape also backs out
    assert not ui.page.is_visible("#confirm")
    ui.page.click("#act-delete")
    ui.page.click("#confirm-delete")
    ui.page.wait_for_selector("#deleted")
    status, body = srv.api("GET", f"/job/{job['id']}")
    assert status == 422 and body["error"] == f"The job '{job['id']}' is not found"

    ui.page.click("#back")
    ui.page.wait_for_selector("#jobs-body tr.empty")
    assert ui.ids() == [] and ui.stat("numJobs") == "0"


def test_output_and_names_are_shown_as_text_never_as_html(make_server, worker, ui):
    srv = make_server()
    evil = '<script>alert(1)</script><img src=x onerror="alert(2)">'
    worker.respond(200, evil.encode())
    name = "<b onmouseover=alert(3)>bold</b>"
    job = push_done(srv, worker, name=name, comment=evil, payload={"html": evil})
    assert job["output"] == evil

    ui.open(srv)
    assert ui.rows()[0][1] == name
    assert ui.page.locator("#jobs-body b").count() == 0
    ui.open(srv, f"/job/{job['id']}")
    assert ui.page.text_content("#block-output") == evil
    assert ui.page.text_content("[data-field=comment]") == evil
    assert ui.page.text_content("[data-field=name]") == name
    assert ui.page.locator("#main script, #main img, #main b").count() == 0
    time.sleep(0.3)  # give an injected onerror handler the chance to fire (checked by ui.close)


def test_phone_width_has_no_sideways_scrolling(make_server, worker, ui):
    srv = make_server()
    long_name = "n" * 200  # one unbreakable word, the worst case for wrapping
    job = push_done(srv, worker, name=long_name, url=worker.url + "/" + "p" * 150, comment="c " * 80)
    push_done(srv, worker, name="short")
    ui.page.set_viewport_size({"width": 390, "height": 844})
    ui.open(srv)
    ui.no_horizontal_scroll()
    # Rows are laid out to fit, not hidden in a sideways-scrolling table either.
    assert ui.page.eval_on_selector(".table-wrap", "e => e.scrollWidth <= e.clientWidth")
    assert ui.page.is_visible("#next-page") and ui.page.is_visible("#pause")
    ui.shot("dashboard-phone.png", full_page=True)
    ui.open(srv, f"/job/{job['id']}")
    ui.no_horizontal_scroll()
    box = ui.page.locator("#act-delete").bounding_box()
    assert box["x"] + box["width"] <= 390
    ui.shot("job-phone.png", full_page=True)


def test_keyboard_reaches_filters_jobs_and_actions(make_server, worker, ui):
    srv = make_server()
    job = push_done(srv, worker, name="keyboard")
    ui.open(srv)
    page = ui.page
    focused = []
    for _ in range(40):  # bounded walk through the tab order
        page.keyboard.press("Tab")
        focused.append(page.evaluate("document.activeElement.id || document.activeElement.dataset.jobId || document.activeElement.tagName"))
        if focused[-1] == job["id"]:
            break
    for control in ("f-name", "f-term", "f-status", "apply", "order", "pause", job["id"]):
        assert control in focused, (control, focused)
    assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") == "solid"
    page.keyboard.press("Enter")
    page.wait_for_url(f"**/ui/job/{job['id']}")
    wait_text(page, "#job-status", "success")
    for _ in range(10):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "act-stop":
            break
    assert page.evaluate("document.activeElement.id") == "act-stop"
    page.keyboard.press("Enter")
    page.wait_for_selector(".msg-error")  # a finished job is not active: the server says so
    assert page.evaluate("document.activeElement.id") == "act-stop"  # focus stays where the user was


# --- serving --------------------------------------------------------------------------------------

def test_custom_basename_deep_links_and_redirect(make_server, worker, ui):
    srv = make_server(ui_basename="/console")
    ui.base = "/console"
    job = push_done(srv, worker, name="deep")
    ui.page.goto(srv.url + "/console")
    ui.page.wait_for_url(srv.url + "/console/")
    ui.wait_refresh(0)
    assert ui.ids() == [job["id"]]
    assert ui.page.get_attribute("#back, #home-link", "href") == "/console/"
    ui.open(srv, f"/job/{job['id']}")  # a deep link loads the app straight away
    wait_text(ui.page, "#job-status", "success")
    assert any(urlsplit(u).path == f"/console/internal/job/{job['id']}" for u in ui.urls)
    ui.open(srv, "/job/1")
    assert "The job '1' is not found" in ui.page.text_content(".msg-error")
    assert not ui.page.is_visible("#act-stop")
    ui.open(srv, "/no/such/page")
    ui.page.wait_for_selector("text=Page not found")


def test_dashboard_reports_a_lost_server_and_recovers(make_server, worker, ui):
    srv = make_server()
    job = push_done(srv, worker, name="survivor")
    ui.open(srv)
    assert srv.stop() == 0
    ui.page.wait_for_selector(".msg-error")
    assert "Cannot reach the server" in ui.page.text_content(".msg-error")
    assert ui.ids() == [job["id"]]  # the last good list stays on screen
    srv.start()
    ui.page.wait_for_selector(".msg-error", state="detached")
    assert ui.ids() == [job["id"]]


def test_ui_disabled_is_404(make_server):
    srv = make_server(ui=False)
    for path in ("/ui", "/ui/", "/ui/app.js", "/ui/job/1", "/ui/internal/stats"):
        r = requests.get(srv.url + path, allow_redirects=False, timeout=10)
        assert r.status_code == 404, path
    assert requests.get(srv.url + "/stats", timeout=10).status_code == 200


# --- delivery policy: attempts, history, runAt (SPEC §10) ------------------------------------------

def poll(fetch, ok, what, timeout=15):
    """Call `fetch` until `ok(result)` (bounded); returns that result."""
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {value}")
        time.sleep(0.05)


def countdown_seconds(page):
    """The job page's runAt countdown in whole seconds ("(in 1 min 4 s)" → 64, "(due now)" → 0)."""
    text = page.text_content("#runat-countdown").strip("() ")
    if text == "due now":
        return 0
    assert text.startswith("in "), text
    units = {"s": 1, "min": 60, "h": 3600, "d": 86400}
    parts = text[3:].split()
    return sum(int(n) * units[u] for n, u in zip(parts[::2], parts[1::2]))


def seconds_until(iso):
    from datetime import datetime
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() - time.time()


def test_job_page_shows_failed_attempts_and_counts_down_to_the_next(make_server, worker, ui):
    srv = make_server()
    worker.respond(500, b"db down")
    # Each backoff is drawn from [5, 10] s (equal jitter on a fixed 10 s): time enough to look at
    # the waiting job on a busy machine, short enough to see the next attempt.
    job = srv.push(url=worker.url + "/w", name="flaky", retry={"maxAttempts": 3, "minBackoff": 10, "maxBackoff": 10})
    first = poll(lambda: srv.job(job["id"]), lambda j: j["attempts"] == 1 and j["waiting"] and j["runAt"],
                 "the first failed attempt")
    later = srv.push(url=worker.url + "/w", name="later", delay=300)
    page = ui.page

    # The list marks the retrying job and the scheduled one, and counts both as scheduled.
    ui.open(srv)
    stats = srv.api("GET", "/stats")[1]
    assert stats["numScheduledJobs"] == 2, stats
    ui.until(lambda: ui.stat("numScheduledJobs") == "2", "the scheduled count")
    retry_row = f"#jobs-body tr[data-id='{job['id']}']"
    later_row = f"#jobs-body tr[data-id='{later['id']}']"
    assert page.get_attribute(retry_row, "data-retrying") == ""
    assert page.text_content(retry_row + " .tag-retry").startswith("retry 2 of 3 · ")
    assert page.get_attribute(later_row, "data-retrying") is None
    tag = page.text_content(later_row + " .tag-scheduled")
    assert tag.startswith("scheduled · in 4 min") or tag == "scheduled · in 5 min 0 s", tag
    assert page.locator(later_row + " .tag-retry").count() == 0

    ui.open(srv, f"/job/{job['id']}")
    wait_text(page, "#job-status", "waiting")
    assert page.text_content("[data-field=attempts]") == "1 of 3"
    assert page.text_content("[data-field=retry]") == "up to 3 attempts · backoff 10 s · no time limit"
    # The failed attempt, as the server recorded it.
    [att] = first["history"]
    assert (att["attempt"], att["statusCode"], att["err"]) == (1, 500, "Internal Server Error")
    cells = page.eval_on_selector_all("#history tbody tr", "trs => trs.map(tr => [...tr.cells].map(c => c.textContent))")
    assert len(cells) == 1 and (cells[0][0], cells[0][3], cells[0][4]) == ("1", "500", "Internal Server Error"), cells
    assert att["startedAt"] in page.get_attribute("#history tbody tr td:nth-child(2) time", "title")
    assert att["finishedAt"] in page.get_attribute("#history tbody tr td:nth-child(3) time", "title")
    # A live countdown to runAt, ticking between loads.
    assert page.text_content("[data-field=runAt]").startswith(first["runAt"])
    left = countdown_seconds(page)
    assert abs(left - seconds_until(first["runAt"])) <= 2, (left, first["runAt"])
    assert left <= 10
    if left > 1:
        page.wait_for_function(f"!document.querySelector('#runat-countdown') || "
                               f"!document.querySelector('#runat-countdown').textContent.includes('in {left} s')")
    ui.shot("job-retrying.png", full_page=True)

    # Attempt 2 fails too: the open page follows it without a reload.
    page.wait_for_function("document.querySelectorAll('#history tbody tr').length === 2", timeout=20_000)
    wait_text(page, "[data-field=attempts]", "2 of 3")
    second = srv.job(job["id"])
    assert [a["attempt"] for a in second["history"]] == [1, 2]
    assert page.eval_on_selector_all("#history tbody tr", "trs => trs.map(tr => tr.dataset.attempt)") == ["1", "2"]
    assert 0 <= countdown_seconds(page) <= 10
    # Stop cancels a job that waits for its retry: it is never sent again.
    page.click("#act-stop")
    wait_text(page, "#job-status", "canceled")
    assert page.locator("#runat-countdown").count() == 0
    time.sleep(1)
    assert worker.job_ids().count(job["id"]) == 2
    assert srv.job(job["id"])["status"] == "canceled"


# --- sign-in (SPEC §11) ------------------------------------------------------------------------

FULL_TOKEN = "ui-test-full-token-0123456789"
READ_TOKEN = "ui-test-read-token-0123456789"
TOKEN_KEY = "hq-gevent-token:/ui"


def start_with_tokens(srv, token=FULL_TOKEN, timeout=20):
    """Start `srv` (configured with tokens) and wait until it answers `token` (GET / needs one)."""
    srv.session.headers["Authorization"] = "Bearer " + token
    srv.start(wait=False)
    poll(lambda: (srv.proc.poll(), _status(srv)), lambda r: r[0] is not None or r[1] == 200,
         "the server to answer", timeout)
    assert srv.proc.poll() is None, srv.log()
    return srv


def _status(srv):
    try:
        return srv.request("GET", "/", timeout=1).status_code
    except requests.RequestException:
        return None


def sign_in(page, token):
    page.wait_for_selector("#sign-in")
    page.fill("#token", token)
    page.press("#token", "Enter")


def test_sign_in_on_401_keeps_the_token_for_the_session_and_signs_out(make_server, worker, ui):
    srv = start_with_tokens(make_server(start=False, auth_tokens=[FULL_TOKEN], auth_read_tokens=[READ_TOKEN]))
    worker.hold()
    job = srv.push(url=worker.url + "/w", name="guarded")
    srv.wait_job(job["id"], statuses=("running",))
    # The UI's own files are served without a token; its API is not.
    assert requests.get(srv.url + "/ui/app.js", timeout=10).status_code == 200
    assert requests.get(srv.url + "/ui/vendor/uplot/uPlot.iife.min.js", timeout=10).status_code == 200
    r = requests.get(srv.url + "/ui/internal/stats", timeout=10)
    assert r.status_code == 401 and r.json() == {"status": 401, "error": "Unauthorized"}
    page = ui.page

    page.goto(srv.url + f"/ui/job/{job['id']}")  # a deep link: the prompt first, then that page
    page.wait_for_selector("#sign-in")
    assert page.evaluate("document.activeElement.id") == "token"
    assert not page.is_visible("#sign-out")
    assert page.locator("#job-view").count() == 0
    ui.shot("sign-in.png")

    # A wrong token is refused and not kept.
    sign_in(page, "not-the-right-token-0123456789")
    page.wait_for_selector("#sign-in .msg-error")
    assert "refused" in page.text_content("#sign-in .msg-error")
    assert page.evaluate("sessionStorage.length") == 0
    assert page.locator("#job-view").count() == 0

    before = len(ui.api_calls)
    sign_in(page, FULL_TOKEN)
    wait_text(page, "#job-status", "running")
    assert page.evaluate(f"sessionStorage.getItem('{TOKEN_KEY}')") == FULL_TOKEN
    assert page.is_visible("#sign-out")
    page.wait_for_function("document.querySelector('#version').textContent.startsWith('v')")
    # Every API call after signing in carried the token.
    calls = ui.api_calls[before:]
    assert calls and all(auth == "Bearer " + FULL_TOKEN for _, auth in calls), calls

    # A full token may act.
    page.click("#act-stop")
    wait_text(page, "#job-status", "canceled")
    assert srv.job(job["id"])["status"] == "canceled"

    # The token lasts for the tab's session: a reload goes straight to the page.
    ui.open(srv)
    assert ui.ids() == [job["id"]] and page.locator("#sign-in").count() == 0
    assert ui.stat("numJobs") == "1"
    page.set_viewport_size({"width": 375, "height": 812})  # the header's Sign out fits a phone
    ui.no_horizontal_scroll()
    box = page.locator("#sign-out").bounding_box()
    assert box["x"] + box["width"] <= 375 and box["height"] >= 24, box
    ui.shot("signed-in-phone.png")

    # Sign out forgets it; the dashboard stops asking the server.
    page.click("#sign-out")
    page.wait_for_selector("#sign-in")
    assert page.evaluate("sessionStorage.length") == 0
    assert not page.is_visible("#sign-out")
    calls = len(ui.api_calls)
    time.sleep(REFRESH_MS * 4 / 1000)
    assert len(ui.api_calls) == calls, ui.api_calls[calls:]
    page.reload()
    page.wait_for_selector("#sign-in")
    assert all(auth is None for _, auth in ui.api_calls[calls:])

    # Another browser session has to sign in on its own.
    other = page.context.browser.new_context()
    try:
        tab = other.new_page()
        tab.goto(srv.url + "/ui/")
        tab.wait_for_selector("#sign-in")
    finally:
        other.close()


def test_read_only_token_can_look_but_not_act_and_a_revoked_token_asks_again(make_server, worker, ui):
    srv = start_with_tokens(make_server(start=False, auth_tokens=[FULL_TOKEN], auth_read_tokens=[READ_TOKEN]))
    worker.hold()
    job = srv.push(url=worker.url + "/w", name="look-only")
    srv.wait_job(job["id"], statuses=("running",))
    page = ui.page
    page.goto(srv.url + "/ui/")
    sign_in(page, READ_TOKEN)
    ui.wait_refresh(0)
    assert ui.ids() == [job["id"]]

    ui.open(srv, f"/job/{job['id']}")
    wait_text(page, "#job-status", "running")
    page.click("#act-stop")
    page.wait_for_selector(".msg-error")
    msg = page.text_content(".msg-error")
    assert "read-only" in msg and "403" in msg, msg
    page.evaluate("document.querySelector('.messages').replaceChildren()")
    page.click("#act-delete")
    page.click("#confirm-delete")
    page.wait_for_selector(".msg-error")
    assert "read-only" in page.text_content(".msg-error")
    assert srv.job(job["id"])["status"] == "running"
    assert page.locator("#sign-in").count() == 0  # a 403 is not a reason to sign in again
    worker.release()
    srv.wait_job(job["id"])

    # The server restarts with other read tokens: the page drops the stale one and asks again.
    ui.open(srv)
    assert srv.stop() == 0
    srv.config["auth_read_tokens"] = ["ui-test-other-read-0123456789"]
    start_with_tokens(srv)
    page.wait_for_selector("#sign-in", timeout=20_000)
    assert "no longer accepts" in page.text_content("#sign-in")
    assert page.evaluate("sessionStorage.length") == 0
    sign_in(page, FULL_TOKEN)
    ui.wait_refresh(0)
    assert ui.ids() == [job["id"]]
    assert page.url == srv.url + "/ui/"


# --- live charts (SPEC §12) ----------------------------------------------------------------------

# Pixels of a chart canvas by the nearest of the UI's series colours (strokes and fills, as in app.js);
# axes, grid, text and anti-aliased edges are "other".
PALETTE = {
    "success": ["#2b8a3e", "#b2dfbb"], "failure": ["#c92a2a", "#ef8f87"], "canceled": ["#5f6670", "#b4bac3"],
    "waiting": ["#1f5fbf"], "scheduled": ["#9c36b5"], "running": ["#0c8599"],
}
COUNT_COLOURS = """([sel, palette]) => {
  const c = document.querySelector(sel + ' canvas');
  if (!c || !c.width) return null;
  const rgb = h => [1, 3, 5].map(i => parseInt(h.slice(i, i + 2), 16));
  const refs = Object.entries(palette).flatMap(([k, hs]) => hs.map(h => [k, rgb(h)]));
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  const n = {other: 0};
  for (const k in palette) n[k] = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (d[i + 3] < 200) continue;
    let best = 'other', dist = 24 * 24 * 3;
    for (const [k, [r, g, b]] of refs) {
      const e = (d[i] - r) ** 2 + (d[i + 1] - g) ** 2 + (d[i + 2] - b) ** 2;
      if (e < dist) { dist = e; best = k; }
    }
    n[best]++;
  }
  return n;
}"""


def colours(page, sel):
    return page.evaluate(COUNT_COLOURS, [sel, PALETTE])


def chart_totals(page):
    return page.evaluate("""() => {
      const sum = a => a.reduce((x, y) => x + y, 0);
      const d = window.HQ_CHARTS.finished.data, g = window.HQ_CHARTS.gauges.data;
      const diff = (a, b) => a.map((v, i) => v - b[i]);
      const last = a => a[a.length - 1];
      // The finished chart's series are running sums, top of the stack first: all, success+failure, success.
      return {success: sum(d[3]), failure: sum(diff(d[2], d[3])), canceled: sum(diff(d[1], d[2])),
              points: d[0].length, step: d[0][1] - d[0][0], end: last(d[0]), serverEnd: window.HQ_CHARTS.history.end,
              waiting: last(g[1]), scheduled: last(g[2]), running: last(g[3])};
    }""")


def finished_counters(srv):
    from prometheus_client.parser import text_string_to_metric_families
    text = srv.request("GET", "/metrics").text
    return {s.labels["status"]: s.value for f in text_string_to_metric_families(text)
            if f.name == "hq_jobs_finished" for s in f.samples if s.name == "hq_jobs_finished_total"}


def test_charts_draw_and_match_the_servers_counters(make_server, worker, ui):
    srv = make_server(dispatchers=1)
    for i in range(5):
        push_done(srv, worker, name=f"ok-{i}")
    worker.respond(500, b"no")
    for i in range(3):
        push_done(srv, worker, name=f"bad-{i}")
    worker.respond(200, b"OK")
    worker.hold()
    held = srv.push(url=worker.url + "/w", name="held")
    srv.wait_job(held["id"], statuses=("running",))
    stopped = srv.push(url=worker.url + "/w", name="stopped")
    assert srv.api("POST", f"/job/{stopped['id']}/stop")[0] == 200
    queued = [srv.push(url=worker.url + "/w", name=f"queued-{i}") for i in range(3)]
    later = [srv.push(url=worker.url + "/w", name=f"later-{i}", delay=300) for i in range(2)]
    page = ui.page

    ui.open(srv)
    page.wait_for_function("window.HQ_CHARTS && window.HQ_CHARTS.updates > 0")
    wait_text(page, "#chart-finished-summary [data-total=success]", "5")
    wait_text(page, "#chart-finished-summary [data-total=failure]", "3")
    wait_text(page, "#chart-finished-summary [data-total=canceled]", "1")
    # The gauges are sampled once a second: wait for a sample of the settled state.
    stats = srv.api("GET", "/stats")[1]
    assert (stats["numRunningJobs"], stats["numScheduledJobs"]) == (1, 2), stats
    wait_text(page, "#chart-gauges-summary [data-now=running]", "1")
    wait_text(page, "#chart-gauges-summary [data-now=scheduled]", "2")

    # What the charts draw is what the server counted.
    status, hist = srv.api("GET", "/stats/history")
    assert status == 200 and hist["interval"] == 1
    assert {k: len(v) for k, v in hist["series"].items()} == {k: 600 for k in (
        "success", "failure", "canceled", "waiting", "scheduled", "running")}
    server = {k: sum(hist["series"][k]) for k in ("success", "failure", "canceled")}
    assert server == {"success": 5, "failure": 3, "canceled": 1}
    assert finished_counters(srv) == {"success": 5.0, "failure": 3.0, "canceled": 1.0}
    drawn = chart_totals(page)
    assert {k: drawn[k] for k in server} == server
    assert (drawn["points"], drawn["step"], drawn["end"]) == (600, 1, drawn["serverEnd"])
    assert abs(drawn["end"] - hist["end"]) <= 3
    assert drawn["running"] == hist["series"]["running"][-1] == 1
    assert drawn["scheduled"] == hist["series"]["scheduled"][-1] == 2
    assert drawn["waiting"] == hist["series"]["waiting"][-1] == 3

    # Both canvases are drawn, each series in its colour (the workload's second is a spike at the
    # right edge, a few pixels wide; the gauges part there at 3, 2 and 1).
    fin = poll(lambda: colours(page, "#chart-finished"), lambda n: n and n["success"] > 20, "the success series drawn")
    assert fin["failure"] > 10 and fin["canceled"] > 2, fin
    gauges = colours(page, "#chart-gauges")
    assert all(gauges[k] > 10 for k in ("waiting", "scheduled", "running")), gauges
    ui.shot("charts.png")

    # Refreshed with the list: the held and queued jobs finish and the chart follows, no reload.
    page.evaluate("window.__same_page = true")
    worker.release()
    srv.wait_job(queued[-1]["id"])
    wait_text(page, "#chart-finished-summary [data-total=success]", "9")
    wait_text(page, "#chart-gauges-summary [data-now=running]", "0")
    wait_text(page, "#chart-gauges-summary [data-now=waiting]", "0")
    assert chart_totals(page)["success"] == 9
    assert page.evaluate("window.__same_page") is True
    assert [srv.job(j["id"])["status"] for j in later] == ["waiting", "waiting"]


def test_charts_fit_a_phone(make_server, worker, ui):
    srv = make_server()
    for i in range(6):
        worker.respond(500 if i % 3 == 0 else 200, b"x")
        push_done(srv, worker, name=f"job-{i}")
    srv.push(url=worker.url + "/w", name="later", delay=600)
    page = ui.page
    page.set_viewport_size({"width": 375, "height": 812})
    ui.open(srv)
    wait_text(page, "#chart-finished-summary [data-total=success]", "4")
    wait_text(page, "#chart-gauges-summary [data-now=scheduled]", "1")
    ui.no_horizontal_scroll()
    boxes = [page.locator(sel).bounding_box() for sel in ("#chart-finished canvas", "#chart-gauges canvas")]
    for box in boxes:
        assert box["x"] >= 0 and box["x"] + box["width"] <= 375, box
        assert box["width"] >= 280 and box["height"] >= 100, box  # most of the width, not a thumbnail
    assert boxes[1]["y"] > boxes[0]["y"] + boxes[0]["height"]  # one above the other
    # Legends and totals are on screen, in a readable size.
    for sel in ("#chart-finished .u-legend", "#chart-gauges .u-legend", "#chart-finished-summary"):
        box = page.locator(sel).bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 375, (sel, box)
    size = page.eval_on_selector("#chart-finished .u-legend", "e => parseFloat(getComputedStyle(e).fontSize)")
    assert size >= 11
    poll(lambda: colours(page, "#chart-gauges"), lambda n: n and n["scheduled"] > 10, "the scheduled line drawn")
    ARTIFACTS.mkdir(exist_ok=True)
    page.locator("#charts").screenshot(path=str(ARTIFACTS / "charts-phone.png"))
    # Turned sideways, the charts go side by side and take their new width.
    page.set_viewport_size({"width": 812, "height": 375})
    page.wait_for_function("""() => ['#chart-finished', '#chart-gauges'].every(sel => {
        const box = document.querySelector(sel), c = box.querySelector('canvas').getBoundingClientRect();
        return Math.abs(c.width - box.clientWidth) <= 2; })""")
    side = [page.locator(sel).bounding_box() for sel in ("#chart-finished canvas", "#chart-gauges canvas")]
    assert abs(side[0]["y"] - side[1]["y"]) < 2 and side[0]["x"] + side[0]["width"] <= side[1]["x"], side
    assert side[0]["width"] != boxes[0]["width"]
    ui.no_horizontal_scroll()


def test_vendored_uplot_is_the_pinned_release_with_its_licence(make_server):
    """hq_gevent/ui/vendor/fetch-uplot.sh pins uPlot by version and tarball sha256; the committed
    files must be that release (re-run the script after changing the pin), and the UI serves them."""
    vendor = ROOT / "hq_gevent" / "ui" / "vendor"
    script = (vendor / "fetch-uplot.sh").read_text()
    version = next(line.split("=", 1)[1] for line in script.splitlines() if line.startswith("VERSION="))
    assert (vendor / "uplot" / "VERSION").read_text().strip() == version
    js = (vendor / "uplot" / "uPlot.iife.min.js").read_text()
    assert js.startswith(f"/*! https://github.com/leeoniya/uPlot (v{version}) */")
    licence = (vendor / "uplot" / "LICENSE").read_text()
    assert "MIT License" in licence and "Leon Sorokin" in licence
    srv = make_server()
    for name, ctype in (("uPlot.iife.min.js", "javascript"), ("uPlot.min.css", "text/css")):
        r = requests.get(f"{srv.url}/ui/vendor/uplot/{name}", timeout=10)
        assert r.status_code == 200 and ctype in r.headers["Content-Type"], (name, r.headers)
        assert r.content == (vendor / "uplot" / name).read_bytes()

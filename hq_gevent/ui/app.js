// hq-gevent web UI: plain DOM code, no framework, no build step.
// Rules kept throughout: data only ever reaches the page through textContent/attributes (never
// innerHTML), ids stay strings (they are 64-bit), and every request goes to <base>/internal/ so
// the UI works behind a proxy that exposes only the UI path.
"use strict";

(function () {
  const BASE = String(window.HQ_BASE || "/ui").replace(/\/+$/, "");
  const API = BASE + "/internal";
  // Tests shorten the interval through window.HQ_REFRESH_MS (set before this script runs).
  const REFRESH_MS = Number(window.HQ_REFRESH_MS) > 0 ? Number(window.HQ_REFRESH_MS) : 3000;
  const STATUSES = ["waiting", "running", "canceling", "success", "failure", "canceled", "unfinished", "unknown"];
  const ACTIVE = ["waiting", "running", "canceling"];
  const PAGE_SIZES = [10, 20, 50, 100];
  const DEFAULT_LIMIT = 20;
  const main = document.getElementById("main");

  // ---- small helpers ------------------------------------------------------------------------

  // h("a", {href: x, class: "y"}, "text", childNode...) — strings become text nodes.
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else if (k === "class") el.className = v;
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }

  // JSON numbers beyond double precision (e.g. a 64-bit id inside a payload) are kept verbatim
  // where the browser supports JSON.rawJSON, so pretty-printing never alters the data. Only those:
  // a number that is merely written differently (`5.0`, `1E3`) stays a number the code can use.
  const HAS_RAW = typeof JSON.rawJSON === "function";
  function parseJSON(text) {
    if (!HAS_RAW) return JSON.parse(text);
    return JSON.parse(text, (k, v, ctx) =>
      typeof v === "number" && ctx && typeof ctx.source === "string" && decimalKey(String(v)) !== decimalKey(ctx.source)
        ? JSON.rawJSON(ctx.source) : v);
  }

  // One spelling per decimal value: "5.0", "5" and "0.5e1" all give "5e0".
  function decimalKey(t) {
    const m = /^(-?)(\d+)(?:\.(\d+))?(?:[eE]([+-]?\d+))?$/.exec(t);
    if (!m) return t; // Infinity, NaN: never equal to a JSON source
    const frac = m[3] || "";
    let digits = (m[2] + frac).replace(/^0+/, "");
    if (!digits) return "0";
    const kept = digits.replace(/0+$/, "");
    const exp = parseInt(m[4] || "0", 10) - frac.length + (digits.length - kept.length);
    return m[1] + kept + "e" + exp;
  }

  class ApiError extends Error {
    constructor(message, status) { super(message); this.status = status || 0; }
  }

  // ---- sign-in (SPEC §11): the token lives for the browser session, per UI basename ----------

  const TOKEN_KEY = "hq-gevent-token:" + BASE;
  let memoryToken = null; // fallback when the browser refuses sessionStorage (e.g. some private modes)
  function getToken() {
    try { return sessionStorage.getItem(TOKEN_KEY); } catch (e) { return memoryToken; }
  }
  function setToken(t) {
    memoryToken = t;
    try {
      if (t === null) sessionStorage.removeItem(TOKEN_KEY); else sessionStorage.setItem(TOKEN_KEY, t);
    } catch (e) { /* memoryToken holds it */ }
    signOutBtn.hidden = t === null;
  }
  const signOutBtn = document.getElementById("sign-out");
  signOutBtn.hidden = !getToken();
  signOutBtn.addEventListener("click", () => {
    setToken(null);
    signIn("You are signed out.");
  });

  const FORBIDDEN_MSG = "Not allowed (HTTP 403): this token is read-only. Stopping, restarting, deleting or " +
    "pushing jobs needs a full token (auth_tokens); read-only tokens (auth_read_tokens) may only look.";

  // Raw request with the token; resolves to {resp, text} or throws ApiError on a network failure.
  async function send(method, path, body, token) {
    const opts = { method, headers: { Accept: "application/json" } };
    if (token) opts.headers.Authorization = "Bearer " + token;
    if (body !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    try {
      const resp = await fetch(API + path, opts);
      return { resp, text: await resp.text() };
    } catch (e) {
      throw new ApiError("Cannot reach the server: " + e.message);
    }
  }

  // Calls the API; resolves to the decoded body, or throws ApiError with the server's own text.
  // A 401 replaces the page with the sign-in form (the view that asked is abandoned).
  async function api(method, path, body) {
    const sentToken = getToken();
    const { resp, text } = await send(method, path, body, sentToken);
    let data = null;
    try { data = text ? parseJSON(text) : null; } catch (e) { /* not JSON: reported below */ }
    if (resp.status === 401) {
      // Only the first of several parallel 401s (or one after a newer sign-in) changes the page.
      if (getToken() === sentToken) {
        if (sentToken) setToken(null);
        signIn(sentToken ? "The server no longer accepts the token you signed in with. Sign in again." : "");
      }
      throw new ApiError("Sign-in required (HTTP 401)", 401);
    }
    if (resp.status === 403) throw new ApiError(FORBIDDEN_MSG, 403);
    if (!resp.ok) {
      const msg = data && typeof data.error === "string" ? data.error : (text || resp.statusText);
      throw new ApiError(msg + " (HTTP " + resp.status + ")", resp.status);
    }
    if (data === null) {
      const err = new ApiError("The server sent a response that is not JSON (HTTP " + resp.status + ")", resp.status);
      err.notJson = true;
      throw err;
    }
    return data;
  }

  // The sign-in form takes the place of the current view; after a good token the same address
  // is shown again, so a deep link survives signing in.
  function signIn(notice) {
    if (document.getElementById("sign-in")) return;
    document.title = "Sign in — hq-gevent";
    const tokenIn = h("input", { id: "token", name: "token", type: "password", autocomplete: "current-password",
      spellcheck: "false", required: true, "aria-describedby": "sign-in-help" });
    const submit = h("button", { type: "submit", id: "sign-in-submit" }, "Sign in");
    const msgs = messageBox();
    const form = h("form", { class: "sign-in", id: "sign-in", "aria-labelledby": "sign-in-title" },
      h("h1", { id: "sign-in-title" }, "Sign in"),
      h("p", { id: "sign-in-help", class: "muted" },
        "This server asks for an API token (one of its auth_tokens, or an auth_read_tokens token to look only). " +
        "It is kept in this browser tab until you sign out or close it."),
      h("label", { for: "token" }, "API token", tokenIn),
      submit, msgs);
    if (notice) msgs.show(notice, "ok");
    let busy = false;
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const token = tokenIn.value.trim();
      if (!token || busy) return;
      busy = true;
      form.setAttribute("aria-busy", "true");
      try {
        // Checked before it is kept, so a mistyped token gets an answer here, not a blank page.
        const { resp } = await send("GET", "/stats", undefined, token);
        if (resp.status === 401) {
          msgs.show("The server refused this token (HTTP 401).", "error");
          tokenIn.select();
          return;
        }
        setToken(token);
        showVersion();
        route();
        main.focus({ preventScroll: true });
      } catch (e) {
        msgs.show(e.message, "error");
      } finally {
        busy = false;
        form.removeAttribute("aria-busy");
      }
    });
    main.replaceChildren(form);
    tokenIn.focus();
  }

  function jobUrl(id) { return BASE + "/job/" + encodeURIComponent(id); }

  function relTime(iso, now) {
    const t = Date.parse(iso);
    if (!iso || isNaN(t)) return "";
    let s = Math.round((now - t) / 1000);
    const future = s < 0;
    s = Math.abs(s);
    let txt;
    if (s < 5) return "just now";
    if (s < 60) txt = s + " s";
    else if (s < 3600) txt = Math.floor(s / 60) + " min";
    else if (s < 86400) txt = Math.floor(s / 3600) + " h";
    else txt = Math.floor(s / 86400) + " d";
    return future ? "in " + txt : txt + " ago";
  }

  function fmtDuration(ms) {
    if (!(ms >= 0)) return "";
    if (ms < 1000) return Math.round(ms) + " ms";
    const s = ms / 1000;
    if (s < 60) return s.toFixed(1) + " s";
    const m = Math.floor(s / 60);
    if (m < 60) return m + " min " + Math.floor(s % 60) + " s";
    const hr = Math.floor(m / 60);
    if (hr < 24) return hr + " h " + (m % 60) + " min";
    return Math.floor(hr / 24) + " d " + (hr % 24) + " h";
  }

  // Finished jobs: finishedAt - startedAt; running ones: time so far.
  function jobDuration(job, now) {
    const st = Date.parse(job.startedAt);
    if (!job.startedAt || isNaN(st)) return "";
    const fin = job.finishedAt ? Date.parse(job.finishedAt) : now;
    return fmtDuration(fin - st);
  }

  function statusBadge(status) {
    const known = STATUSES.includes(status) ? status : "unknown";
    return h("span", { class: "status status-" + known, "data-status": status }, status);
  }

  // Time left until `iso`, to the second: "42 s", "3 min 5 s", "2 h 10 min", "1 d 4 h".
  function fmtCountdown(iso, now) {
    const left = Math.ceil((Date.parse(iso) - now) / 1000);
    if (!(left > 0)) return "due now";
    if (left < 60) return left + " s";
    if (left < 3600) return Math.floor(left / 60) + " min " + (left % 60) + " s";
    if (left < 86400) return Math.floor(left / 3600) + " h " + Math.floor((left % 3600) / 60) + " min";
    return Math.floor(left / 86400) + " d " + Math.floor((left % 86400) / 3600) + " h";
  }

  // SPEC §10.3: a job that failed an attempt and waits for the next one.
  function isRetrying(job) {
    return job.waiting === true && job.attempts > 0 && !!job.runAt;
  }

  // The list's mark for a job that waits for a later attempt: "retry 2 of 3 · in 4 s" for a
  // retrying job, "scheduled · in 5 min 0 s" for a first attempt with a future runAt.
  function nextAttemptTag(job, now) {
    if (job.waiting !== true || !job.runAt) return null;
    const when = fmtCountdown(job.runAt, now);
    const max = job.retry && job.retry.maxAttempts;
    if (isRetrying(job)) {
      return h("span", { class: "tag tag-retry", title: "next attempt at " + job.runAt },
        "retry " + (job.attempts + 1) + (max ? " of " + max : "") + " · " + (when === "due now" ? when : "in " + when));
    }
    return h("span", { class: "tag tag-scheduled", title: "runs at " + job.runAt },
      "scheduled · " + (when === "due now" ? when : "in " + when));
  }

  function timeCell(iso, now) {
    if (!iso) return h("span", { class: "muted" }, "—");
    return h("time", { datetime: iso, title: iso + " (" + new Date(iso).toLocaleString() + ")" }, relTime(iso, now));
  }

  // Pretty text for payload/headers/output; a string output is re-indented only if it is JSON.
  function pretty(value, isText) {
    if (isText) {
      if (typeof value !== "string") return String(value);
      const t = value.trim();
      if (t.startsWith("{") || t.startsWith("[")) {
        try { return JSON.stringify(parseJSON(t), null, 2); } catch (e) { /* plain text */ }
      }
      return value;
    }
    return JSON.stringify(value, null, 2);
  }

  function messageBox() {
    const box = h("div", { class: "messages", "aria-live": "polite" });
    box.show = (text, kind, extra) => {
      box.replaceChildren(h("p", { class: "msg msg-" + kind, role: kind === "error" ? "alert" : "status" }, text, extra || null));
    };
    box.clear = () => box.replaceChildren();
    return box;
  }

  async function showVersion() {
    try {
      const v = await api("GET", "/");
      document.getElementById("version").textContent = "v" + v.version;
    } catch (e) { /* the page itself reports connection problems */ }
  }

  // ---- dashboard ----------------------------------------------------------------------------

  function readQuery() {
    const q = new URLSearchParams(location.search);
    const limit = parseInt(q.get("limit"), 10);
    return {
      name: q.get("name") || "",
      term: q.get("term") || "",
      status: q.get("status") || "",
      reverse: q.get("reverse") !== "0",
      limit: PAGE_SIZES.includes(limit) ? limit : DEFAULT_LIMIT,
      begin: /^\d+$/.test(q.get("begin") || "") ? q.get("begin") : "",
    };
  }

  // Keeps the address bar in step with the filters so a view can be bookmarked or shared.
  function writeQuery(st) {
    const q = new URLSearchParams();
    if (st.name) q.set("name", st.name);
    if (st.term) q.set("term", st.term);
    if (st.status) q.set("status", st.status);
    if (!st.reverse) q.set("reverse", "0");
    if (st.limit !== DEFAULT_LIMIT) q.set("limit", String(st.limit));
    if (st.begin) q.set("begin", st.begin);
    const qs = q.toString();
    history.replaceState(null, "", BASE + "/" + (qs ? "?" + qs : ""));
  }

  // Waiting counts every job with status waiting; the charts split it into due ones and scheduled.
  const STAT_HELP = {
    numWaitingJobs: "Jobs with status waiting, scheduled ones included",
    numScheduledJobs: "Waiting jobs whose runAt (a retry or a delay) is still ahead",
  };

  function dashboard() {
    document.title = "Jobs — hq-gevent";
    const st = readQuery();
    const prevBegins = []; // begins of the pages before this one, for "Previous page"
    let paused = false, timer = null, generation = 0, refreshes = 0, lastUpdate = null;

    const statEls = {};
    const statDefs = [
      ["queueUsage", "Queue usage"], ["numWaitingJobs", "Waiting"], ["numScheduledJobs", "Scheduled"],
      ["numRunningJobs", "Running"], ["numWorkers", "Workers busy"], ["numJobs", "Stored jobs"],
    ];
    const stats = h("section", { class: "stats", "aria-label": "Server statistics" },
      statDefs.map(([key, label]) => {
        statEls[key] = h("span", { class: "stat-value", "data-stat": key }, "–");
        return h("div", { class: "stat", title: STAT_HELP[key] || null }, statEls[key], h("span", { class: "stat-label" }, label));
      }));
    const queueOf = h("span", { class: "stat-of" });

    const nameIn = h("input", { id: "f-name", name: "name", type: "search", placeholder: "regex", autocomplete: "off", spellcheck: "false" });
    const termIn = h("input", { id: "f-term", name: "term", type: "search", placeholder: "regex on name, id, comment, url, status", autocomplete: "off", spellcheck: "false" });
    const statusSel = h("select", { id: "f-status", name: "status" },
      h("option", { value: "" }, "any"), STATUSES.map((s) => h("option", { value: s }, s)));
    const limitSel = h("select", { id: "f-limit", name: "limit" }, PAGE_SIZES.map((n) => h("option", { value: n }, String(n))));
    nameIn.value = st.name; termIn.value = st.term; statusSel.value = st.status; limitSel.value = String(st.limit);

    const form = h("form", { class: "filters", role: "search", "aria-label": "Filter jobs" },
      h("label", { for: "f-name" }, "Name", nameIn),
      h("label", { for: "f-term" }, "Term", termIn),
      h("label", { for: "f-status" }, "Status", statusSel),
      h("label", { for: "f-limit" }, "Per page", limitSel),
      h("div", { class: "filter-buttons" },
        h("button", { type: "submit", id: "apply" }, "Apply"),
        h("button", { type: "button", id: "clear", onclick: clearFilters }, "Clear")));
    form.addEventListener("submit", (ev) => { ev.preventDefault(); applyFilters(); });
    // Selects apply at once; text fields on Enter / Apply so a half-typed regex is not sent.
    statusSel.addEventListener("change", applyFilters);
    limitSel.addEventListener("change", applyFilters);

    const orderBtn = h("button", { type: "button", id: "order", onclick: toggleOrder });
    const pauseBtn = h("button", { type: "button", id: "pause", onclick: togglePause, "aria-pressed": "false" });
    const updated = h("span", { id: "updated", class: "muted", "aria-live": "off" });
    const toolbar = h("div", { class: "toolbar" }, orderBtn, pauseBtn, updated);

    const tbody = h("tbody", { id: "jobs-body" });
    const table = h("table", { class: "jobs", id: "jobs" },
      h("caption", { class: "sr-only" }, "Jobs"),
      h("thead", {}, h("tr", {}, ["ID", "Name", "Created", "Duration", "Status"].map((c) => h("th", { scope: "col" }, c)))),
      tbody);

    const firstBtn = h("button", { type: "button", id: "first-page", onclick: firstPage }, "« First page");
    const prevBtn = h("button", { type: "button", id: "prev-page", onclick: prevPage }, "‹ Previous");
    const nextBtn = h("button", { type: "button", id: "next-page", onclick: nextPage }, "Next page ›");
    const pageInfo = h("span", { id: "page-info", class: "muted" });
    const pager = h("nav", { class: "pager", "aria-label": "Pages" }, firstBtn, prevBtn, nextBtn, pageInfo);

    const msgs = messageBox();
    const charts = liveCharts();
    const view = h("div", { id: "dashboard", "data-refreshes": "0" },
      h("h1", {}, "Jobs"), stats, charts.el, form, toolbar, msgs, h("div", { class: "table-wrap" }, table), pager);
    main.replaceChildren(view);
    let nextId = null;

    function labels() {
      orderBtn.textContent = st.reverse ? "Order: newest first" : "Order: oldest first";
      orderBtn.setAttribute("aria-label", st.reverse ? "Order: newest first (switch to oldest first)" : "Order: oldest first (switch to newest first)");
      pauseBtn.textContent = paused ? "▶ Resume auto-refresh" : "❚❚ Pause auto-refresh";
      pauseBtn.setAttribute("aria-pressed", paused ? "true" : "false");
      firstBtn.disabled = !st.begin;
      prevBtn.disabled = prevBegins.length === 0;
      nextBtn.disabled = !nextId;
      updated.textContent = (paused ? "Auto-refresh paused" : "Auto-refresh every " + REFRESH_MS / 1000 + " s") +
        (lastUpdate ? " · updated " + lastUpdate.toLocaleTimeString() : "");
    }

    function applyFilters() {
      st.name = nameIn.value.trim();
      st.term = termIn.value.trim();
      st.status = statusSel.value;
      st.limit = parseInt(limitSel.value, 10) || DEFAULT_LIMIT;
      st.begin = "";
      prevBegins.length = 0;
      reload();
    }
    function clearFilters() {
      nameIn.value = ""; termIn.value = ""; statusSel.value = "";
      applyFilters();
    }
    function toggleOrder() { st.reverse = !st.reverse; st.begin = ""; prevBegins.length = 0; reload(); }
    function togglePause() {
      paused = !paused;
      labels();
      if (paused) { clearTimeout(timer); timer = null; } else reload();
    }
    function firstPage() { st.begin = ""; prevBegins.length = 0; reload(); }
    function prevPage() { st.begin = prevBegins.pop() || ""; reload(); }
    function nextPage() {
      if (!nextId) return;
      prevBegins.push(st.begin);
      st.begin = nextId;
      reload();
    }

    function reload() {
      writeQuery(st);
      labels();
      return load(true);
    }

    function renderRows(jobs, now) {
      // Keep keyboard focus on the same job's link across a refresh.
      const focusedId = document.activeElement && document.activeElement.dataset ? document.activeElement.dataset.jobId : undefined;
      const rows = jobs.map((job) => h("tr", { "data-id": job.id, "data-status": job.status, "data-retrying": isRetrying(job) },
        h("td", { "data-label": "ID", class: "id" }, h("a", { href: jobUrl(job.id), "data-job-id": job.id }, job.id)),
        h("td", { "data-label": "Name", class: "name" }, job.name),
        h("td", { "data-label": "Created" }, timeCell(job.createdAt, now)),
        h("td", { "data-label": "Duration" }, jobDuration(job, now)),
        h("td", { "data-label": "Status" }, h("span", { class: "status-cell" }, statusBadge(job.status), nextAttemptTag(job, now)))));
      if (!rows.length) rows.push(h("tr", { class: "empty" }, h("td", { colspan: 5 }, "No jobs match.")));
      tbody.replaceChildren(...rows);
      if (focusedId !== undefined) {
        const again = tbody.querySelector('a[data-job-id="' + CSS.escape(focusedId) + '"]');
        if (again) again.focus({ preventScroll: true });
      }
    }

    async function load(userAction) {
      clearTimeout(timer);
      timer = null;
      if (!view.isConnected) return; // a timer that outlived the view (sign-in replaced it)
      const gen = ++generation; // answers to an older request are dropped
      const q = new URLSearchParams({ limit: String(st.limit), reverse: st.reverse ? "1" : "0" });
      if (st.name) q.set("name", st.name);
      if (st.term) q.set("term", st.term);
      if (st.status) q.set("status", st.status);
      if (st.begin) q.set("begin", st.begin);
      const scrollY = window.scrollY;
      const [statsRes, listRes, histRes] = await Promise.allSettled(
        [api("GET", "/stats"), api("GET", "/job?" + q), api("GET", "/stats/history")]);
      // Dropped when a newer load started, or when the view is gone (sign-in, another page).
      if (gen !== generation || !view.isConnected) return;
      const now = Date.now();
      const errors = [];
      if (statsRes.status === "fulfilled") {
        for (const [key] of statDefs) {
          const v = statsRes.value[key];
          statEls[key].textContent = v === undefined ? "–" : String(v);
        }
        if (statsRes.value.queues !== undefined) {
          queueOf.textContent = " / " + statsRes.value.queues;
          statEls.queueUsage.append(queueOf);
        }
      } else errors.push(statsRes.reason.message);
      // A server without the history route (404, or older ones that answer the UI page) just has
      // no charts; other failures are reported.
      if (histRes.status === "fulfilled") charts.update(histRes.value);
      else if (histRes.reason.status === 404 || histRes.reason.notJson) charts.unavailable("This server does not keep a stats history.");
      else if (statsRes.status === "fulfilled") errors.push(histRes.reason.message);
      if (listRes.status === "fulfilled") {
        const data = listRes.value;
        nextId = data.hasNext && data.next ? String(data.next) : null;
        renderRows(data.jobs || [], now);
        pageInfo.textContent = (data.jobs || []).length + " shown" + (st.begin ? " · from id " + st.begin : "");
      } else {
        errors.push(listRes.reason.message);
        if (userAction) { nextId = null; tbody.replaceChildren(); pageInfo.textContent = ""; }
      }
      lastUpdate = new Date(now);
      labels();
      if (errors.length) msgs.show(errors.join(" — "), "error"); else msgs.clear();
      window.scrollTo(window.scrollX, scrollY);
      refreshes++;
      view.dataset.refreshes = String(refreshes);
      if (!paused) timer = setTimeout(() => load(false), REFRESH_MS);
    }

    labels();
    load(true);
  }

  // ---- live charts of the last 10 minutes (uPlot, vendored under vendor/uplot) ---------------

  // Stacked bottom to top in this order; colours follow the status badges.
  const FINISHED = [
    { key: "success", stroke: "#2b8a3e", fill: "#b2dfbb" },
    { key: "failure", stroke: "#c92a2a", fill: "#ef8f87" },
    { key: "canceled", stroke: "#5f6670", fill: "#b4bac3" },
  ];
  const TOP_DOWN = FINISHED.slice().reverse();
  const GAUGES = [
    { key: "waiting", stroke: "#1f5fbf" },
    { key: "scheduled", stroke: "#9c36b5" },
    { key: "running", stroke: "#0c8599" },
  ];
  const CHART_HEIGHT = 170;

  function numbers(arr) { return Array.isArray(arr) ? arr.map((v) => (typeof v === "number" && isFinite(v) ? v : 0)) : []; }
  function total(arr) { return arr.reduce((a, b) => a + b, 0); }

  // The page's two charts. `update(history)` takes GET /stats/history as the server sent it; the
  // last answer and both uPlot instances stay on window.HQ_CHARTS for anyone inspecting the page.
  function liveCharts() {
    const finishedSummary = h("p", { class: "chart-summary", id: "chart-finished-summary" });
    const gaugesSummary = h("p", { class: "chart-summary", id: "chart-gauges-summary" });
    const finishedBox = h("div", { class: "chart-canvas", id: "chart-finished" });
    const gaugesBox = h("div", { class: "chart-canvas", id: "chart-gauges" });
    const note = h("p", { class: "muted charts-note", id: "charts-note", hidden: true });
    const figures = [
      h("figure", { class: "chart" }, h("figcaption", {}, h("h2", {}, "Jobs finished per second"), finishedSummary), finishedBox),
      h("figure", { class: "chart" }, h("figcaption", {}, h("h2", {}, "Jobs waiting, scheduled, running"), gaugesSummary), gaugesBox),
    ];
    const el = h("section", { class: "charts", id: "charts", "aria-label": "Last 10 minutes" }, figures, note);
    const state = { history: null, finished: null, gauges: null, updates: 0 };
    window.HQ_CHARTS = state;
    let raw = {}; // series by key, for the legend (the finished chart draws running sums)
    let resizer = null;

    function baseOptions(width, series) {
      const axis = { stroke: "#5b6475", grid: { stroke: "#e3e6eb", width: 1 }, ticks: { stroke: "#d9dde4", width: 1 } };
      // Clock time only (the charts always span the last 10 minutes): one row of labels.
      const xAxis = Object.assign({}, axis, { space: 60,
        values: (u, splits) => splits.map((t) => new Date(t * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })) });
      return {
        width, height: CHART_HEIGHT,
        series: [{}].concat(series),
        scales: { y: { range: (u, min, max) => [0, Math.max(4, Math.ceil((max || 0) * 1.1))] } },
        // Whole jobs only on the y axis.
        axes: [xAxis, Object.assign({}, axis, { size: 44, incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5, 1e6] })],
        cursor: { drag: { x: false, y: false, setScale: false } },
        legend: { live: true },
      };
    }

    function create() {
      const U = window.uPlot;
      const width = (box) => Math.max(200, box.clientWidth);
      // Stacked, top of the stack first: series 1 is the sum of all kinds, the last one success
      // alone. Bands fill between neighbouring sums and the last series down to zero. Drawn in
      // this order, the lower kinds' lines go over the upper ones, so a spike only a pixel wide
      // still shows its parts in their colours. The legend shows raw counts, not sums.
      const stacked = TOP_DOWN.map((k, i) => ({
        label: k.key, stroke: k.stroke, fill: i === TOP_DOWN.length - 1 ? k.fill : undefined, width: 1.5,
        points: { show: false },
        value: (u, v, si, idx) => (idx === null || !raw[k.key] ? "--" : String(raw[k.key][idx] ?? "--")),
      }));
      const finishedOpts = baseOptions(width(finishedBox), stacked);
      finishedOpts.bands = TOP_DOWN.slice(0, -1).map((k, i) => ({ series: [i + 1, i + 2], fill: k.fill }));
      state.finished = new U(finishedOpts, [[], [], [], []], finishedBox);
      const lines = GAUGES.map((k) => ({ label: k.key, stroke: k.stroke, width: 2, points: { show: false } }));
      state.gauges = new U(baseOptions(width(gaugesBox), lines), [[], [], [], []], gaugesBox);
      // Follows the page width (phone rotation, window resize).
      resizer = new ResizeObserver(() => {
        if (!el.isConnected) { resizer.disconnect(); return; }
        for (const [c, box] of [[state.finished, finishedBox], [state.gauges, gaugesBox]]) {
          if (c.width !== width(box)) c.setSize({ width: width(box), height: CHART_HEIGHT });
        }
      });
      resizer.observe(el);
    }

    function update(hist) {
      const series = hist && hist.series ? hist.series : {};
      raw = {};
      for (const k of FINISHED.concat(GAUGES)) raw[k.key] = numbers(series[k.key]);
      const n = Math.max(...Object.values(raw).map((a) => a.length));
      const step = Number(hist.interval) > 0 ? Number(hist.interval) : 1;
      const end = Number(hist.end) || Math.floor(Date.now() / 1000);
      const xs = Array.from({ length: n }, (_, i) => end - (n - 1 - i) * step);
      const pad = (a) => (a.length === n ? a : new Array(n - a.length).fill(0).concat(a)); // align to the newest slot
      for (const k in raw) raw[k] = pad(raw[k]);

      const span = n * step >= 120 ? Math.round((n * step) / 60) + " min" : n * step + " s";
      finishedSummary.replaceChildren("last " + span + ": ",
        ...FINISHED.flatMap((k, i) => [i ? " · " : "", h("span", { "data-total": k.key }, String(total(raw[k.key]))), " " + k.key]));
      gaugesSummary.replaceChildren("now: ",
        ...GAUGES.flatMap((k, i) => [i ? " · " : "", h("span", { "data-now": k.key }, String(n ? raw[k.key][n - 1] : 0)), " " + k.key]));
      note.hidden = true;
      figures.forEach((f) => { f.hidden = false; });
      state.history = hist;
      state.updates++;
      if (!window.uPlot) {
        note.textContent = "The chart library (vendor/uplot) did not load; totals only.";
        note.hidden = false;
        return;
      }
      if (!state.finished) create();
      let run = new Array(n).fill(0);
      const sums = FINISHED.map((k) => (run = run.map((v, i) => v + raw[k.key][i])));
      state.finished.setData([xs].concat(sums.reverse()));
      state.gauges.setData([xs].concat(GAUGES.map((k) => raw[k.key])));
    }

    function unavailable(text) {
      figures.forEach((f) => { f.hidden = true; });
      note.textContent = text;
      note.hidden = false;
    }

    return { el, update, unavailable };
  }

  // ---- job detail ---------------------------------------------------------------------------

  const FIELD_ORDER = ["id", "name", "comment", "url", "status", "createdAt", "startedAt", "finishedAt", "timeout",
    "waiting", "running", "success", "failure", "canceled", "statusCode", "err",
    "attempts", "runAt", "retry", "uniqueKey", "history"];
  const BLOCK_FIELDS = ["payload", "headers", "output"];
  const TIME_FIELDS = ["createdAt", "startedAt", "finishedAt"];

  function secondsText(v) { return typeof v === "number" ? v + " s" : scalarText(v); }

  // {"maxAttempts":3,"minBackoff":5,...} → "up to 3 attempts · backoff 5 s to 3600 s · no time limit"
  function retryText(r) {
    if (!r || typeof r !== "object") return scalarText(r);
    const parts = [r.maxAttempts === 1 ? "1 attempt (no retry)" : "up to " + r.maxAttempts + " attempts"];
    if (r.maxAttempts !== 1) {
      parts.push(r.minBackoff === r.maxBackoff ? "backoff " + secondsText(r.minBackoff)
        : "backoff " + secondsText(r.minBackoff) + " to " + secondsText(r.maxBackoff));
      parts.push(r.maxRetryDuration > 0 ? "retries stop " + secondsText(r.maxRetryDuration) + " after the first attempt" : "no time limit");
    }
    return parts.join(" · ");
  }

  // The failed attempts before the current one (SPEC §10.1 `history`), oldest first.
  function historyTable(history, now) {
    const rows = history.map((a) => h("tr", { "data-attempt": a.attempt },
      h("td", { "data-label": "Attempt" }, String(a.attempt)),
      h("td", { "data-label": "Started" }, timeCell(a.startedAt, now)),
      h("td", { "data-label": "Finished" }, timeCell(a.finishedAt, now)),
      h("td", { "data-label": "Status code", class: "mono" }, a.statusCode === null || a.statusCode === undefined ? "—" : String(a.statusCode)),
      h("td", { "data-label": "Error", class: "err" }, a.err || "—")));
    return h("div", { class: "table-wrap" },
      h("table", { class: "jobs attempts", id: "history" },
        h("caption", { class: "sr-only" }, "Failed attempts"),
        h("thead", {}, h("tr", {}, ["Attempt", "Started", "Finished", "Status code", "Error"].map((c) => h("th", { scope: "col" }, c)))),
        h("tbody", {}, rows)));
  }

  function countdownText(iso, now) {
    const left = fmtCountdown(iso, now);
    return left === "due now" ? "(due now)" : "(in " + left + ")";
  }

  function scalarText(v) {
    if (v === null || v === undefined) return "null";
    if (typeof v === "string") return v;
    return JSON.stringify(v);
  }

  function jobPage(id) {
    document.title = "Job " + id + " — hq-gevent";
    let timer = null, job = null, busy = false;
    // The runAt countdown ticks on its own, so it moves between the (slower) reloads.
    const ticker = setInterval(() => {
      if (!view.isConnected) { clearInterval(ticker); return; }
      const el = document.getElementById("runat-countdown");
      if (el) el.textContent = countdownText(el.dataset.runAt, Date.now());
    }, 1000);
    const title = h("h1", {}, "Job ", h("span", { class: "mono", id: "job-id" }, id), " ");
    const badgeSlot = h("span", { id: "job-status" });
    title.append(badgeSlot);
    const back = h("p", { class: "crumbs" }, h("a", { href: BASE + "/", id: "back" }, "← All jobs"));
    const msgs = messageBox();

    const buttons = {
      stop: h("button", { type: "button", id: "act-stop", onclick: () => act("stop") }, "Stop"),
      restart: h("button", { type: "button", id: "act-restart", onclick: () => act("restart") }, "Restart"),
      copy: h("button", { type: "button", id: "act-copy", onclick: () => act("copy") }, "Restart as copy"),
      del: h("button", { type: "button", id: "act-delete", class: "danger", onclick: askDelete }, "Delete"),
    };
    const confirmYes = h("button", { type: "button", id: "confirm-delete", class: "danger", onclick: () => act("delete") }, "Yes, delete it");
    const confirmNo = h("button", { type: "button", id: "cancel-delete", onclick: hideConfirm }, "Cancel");
    const confirmBox = h("div", { class: "confirm", id: "confirm", role: "group", "aria-label": "Confirm delete", hidden: true },
      h("span", {}, "Delete job " + id + " permanently?"), confirmYes, confirmNo);
    confirmBox.addEventListener("keydown", (ev) => { if (ev.key === "Escape") hideConfirm(); });
    const actions = h("div", { class: "actions", role: "group", "aria-label": "Actions" },
      buttons.stop, buttons.restart, buttons.copy, buttons.del);

    const fields = h("dl", { class: "fields", id: "fields" });
    const blocks = h("div", { class: "blocks" });
    const body = h("div", { id: "job-body" }, actions, confirmBox, msgs, fields, blocks);
    const view = h("div", { id: "job-view", "data-loads": "0" }, back, title, body);
    main.replaceChildren(view);
    let loads = 0;

    // Buttons stay enabled while a request runs (disabling a focused button would throw keyboard
    // focus back to the top of the page); `busy` drops extra clicks instead.
    function setBusy(b) {
      busy = b;
      actions.setAttribute("aria-busy", b ? "true" : "false");
      confirmBox.setAttribute("aria-busy", b ? "true" : "false");
    }

    function askDelete() {
      confirmBox.hidden = false;
      confirmNo.focus();
    }
    function hideConfirm() {
      confirmBox.hidden = true;
      buttons.del.focus();
    }

    async function act(kind) {
      if (busy) return;
      setBusy(true);
      const enc = encodeURIComponent(id);
      try {
        if (kind === "stop") {
          await api("POST", "/job/" + enc + "/stop");
          msgs.show("Stop requested.", "ok");
        } else if (kind === "restart") {
          await api("POST", "/job/" + enc + "/restart", { copy: false });
          msgs.show("Restarted: the job is queued again.", "ok");
        } else if (kind === "copy") {
          const copy = await api("POST", "/job/" + enc + "/restart", { copy: true });
          msgs.show("Restarted as a copy: ", "ok", h("a", { href: jobUrl(copy.id), id: "copy-link" }, "job " + copy.id));
        } else if (kind === "delete") {
          await api("DELETE", "/job/" + enc);
          clearTimeout(timer);
          confirmBox.hidden = true;
          body.replaceChildren(h("p", { class: "msg msg-ok", role: "status", id: "deleted" }, "Job " + id + " was deleted."));
          badgeSlot.replaceChildren();
          back.querySelector("a").focus();
          return;
        }
        if (kind !== "delete") confirmBox.hidden = true;
      } catch (e) {
        msgs.show(e.message, "error");
        if (kind === "delete") confirmBox.hidden = true;
      } finally {
        setBusy(false);
      }
      await load();
    }

    function render() {
      const now = Date.now();
      badgeSlot.replaceChildren(statusBadge(job.status));
      const keys = FIELD_ORDER.filter((k) => k in job)
        .concat(Object.keys(job).filter((k) => !FIELD_ORDER.includes(k) && !BLOCK_FIELDS.includes(k)).sort());
      const items = [];
      for (const k of keys) {
        const v = job[k];
        let dd;
        if (k === "status") dd = h("dd", {}, statusBadge(v));
        else if (TIME_FIELDS.includes(k) && v) dd = h("dd", {}, h("span", { class: "mono" }, v), " ", h("span", { class: "muted" }, "(" + relTime(v, now) + ")"));
        else if (k === "timeout") dd = h("dd", {}, v === 0 ? "0 (none)" : scalarText(v) + " s");
        else if (k === "attempts") {
          const max = job.retry && job.retry.maxAttempts;
          dd = h("dd", {}, String(v), max ? h("span", { class: "muted" }, " of " + max) : null);
        } else if (k === "runAt" && v) {
          // Ticks every second between loads (see countdown below).
          dd = h("dd", {}, h("span", { class: "mono" }, v), " ",
            h("span", { class: "countdown", id: "runat-countdown", "data-run-at": v }, countdownText(v, now)));
        } else if (k === "retry") dd = h("dd", {}, retryText(v));
        else if (k === "history" && Array.isArray(v)) {
          dd = h("dd", { class: v.length ? "" : "muted" },
            v.length ? v.length + " failed attempt" + (v.length > 1 ? "s" : "") + " (below)" : "none");
        }
        else dd = h("dd", { class: v === null || v === "" ? "muted" : "" }, v === "" ? "(empty)" : scalarText(v));
        dd.dataset.field = k;
        items.push(h("div", { class: "field" }, h("dt", {}, k), dd));
        if (k === "finishedAt") {
          items.push(h("div", { class: "field" }, h("dt", {}, "duration"), h("dd", { "data-field": "duration" }, jobDuration(job, now) || "—")));
        }
      }
      fields.replaceChildren(...items);
      const hist = Array.isArray(job.history) && job.history.length
        ? h("section", { class: "block", id: "attempts" }, h("h2", {}, "Failed attempts"), historyTable(job.history, now))
        : null;
      blocks.replaceChildren(...(hist ? [hist] : []), ...BLOCK_FIELDS.filter((k) => k in job).map((k) =>
        h("section", { class: "block" }, h("h2", {}, k),
          job[k] === null || job[k] === ""
            ? h("p", { id: "block-" + k, class: "muted empty-block" }, job[k] === null ? "null" : "(empty)")
            : h("pre", { id: "block-" + k, tabindex: "0", "aria-label": k }, pretty(job[k], k === "output")))));
    }

    async function load() {
      clearTimeout(timer);
      timer = null;
      if (!view.isConnected) return; // a timer that outlived the view (sign-in replaced it)
      try {
        job = await api("GET", "/job/" + encodeURIComponent(id));
      } catch (e) {
        msgs.show(e.message, "error");
        if (!job) { actions.hidden = true; }
        return;
      }
      actions.hidden = false;
      render();
      loads++;
      view.dataset.loads = String(loads);
      // Follow a job that is still moving; a finished job does not change by itself.
      if (ACTIVE.includes(job.status) && view.isConnected) timer = setTimeout(load, REFRESH_MS);
    }

    load();
  }

  function notFound() {
    document.title = "Not found — hq-gevent";
    main.replaceChildren(h("h1", {}, "Page not found"),
      h("p", {}, "There is nothing at ", h("code", {}, location.pathname), ". ", h("a", { href: BASE + "/" }, "Go to the job list"), "."));
  }

  // ---- routing on location.pathname (the server answers every path under the base with this page)
  function route() {
    let path = location.pathname;
    if (path.startsWith(BASE)) path = path.slice(BASE.length);
    path = path.replace(/\/+$/, "");
    const m = /^\/job\/(\d+)$/.exec(path);
    if (path === "" || path === "/index.html") dashboard();
    else if (m) jobPage(m[1]);
    else notFound();
  }

  showVersion();
  route();
})();

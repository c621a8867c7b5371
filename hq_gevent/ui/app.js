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
  // where the browser supports JSON.rawJSON, so pretty-printing never alters the data.
  const HAS_RAW = typeof JSON.rawJSON === "function";
  function parseJSON(text) {
    if (!HAS_RAW) return JSON.parse(text);
    return JSON.parse(text, (k, v, ctx) =>
      typeof v === "number" && ctx && typeof ctx.source === "string" && String(v) !== ctx.source
        ? JSON.rawJSON(ctx.source) : v);
  }

  class ApiError extends Error {}

  // Calls the API; resolves to the decoded body, or throws ApiError with the server's own text.
  async function api(method, path, body) {
    const opts = { method, headers: { Accept: "application/json" } };
    if (body !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    let resp, text;
    try {
      resp = await fetch(API + path, opts);
      text = await resp.text();
    } catch (e) {
      throw new ApiError("Cannot reach the server: " + e.message);
    }
    let data = null;
    try { data = text ? parseJSON(text) : null; } catch (e) { /* not JSON: reported below */ }
    if (!resp.ok) {
      const msg = data && typeof data.error === "string" ? data.error : (text || resp.statusText);
      throw new ApiError(msg + " (HTTP " + resp.status + ")");
    }
    if (data === null) throw new ApiError("The server sent a response that is not JSON (HTTP " + resp.status + ")");
    return data;
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

  function dashboard() {
    document.title = "Jobs — hq-gevent";
    const st = readQuery();
    const prevBegins = []; // begins of the pages before this one, for "Previous page"
    let paused = false, timer = null, generation = 0, refreshes = 0, lastUpdate = null;

    const statEls = {};
    const statDefs = [
      ["queueUsage", "Queue usage"], ["numWaitingJobs", "Waiting"], ["numRunningJobs", "Running"],
      ["numWorkers", "Workers busy"], ["numJobs", "Stored jobs"],
    ];
    const stats = h("section", { class: "stats", "aria-label": "Server statistics" },
      statDefs.map(([key, label]) => {
        statEls[key] = h("span", { class: "stat-value", "data-stat": key }, "–");
        return h("div", { class: "stat" }, statEls[key], h("span", { class: "stat-label" }, label));
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
    const view = h("div", { id: "dashboard", "data-refreshes": "0" },
      h("h1", {}, "Jobs"), stats, form, toolbar, msgs, h("div", { class: "table-wrap" }, table), pager);
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
      const rows = jobs.map((job) => h("tr", { "data-id": job.id, "data-status": job.status },
        h("td", { "data-label": "ID", class: "id" }, h("a", { href: jobUrl(job.id), "data-job-id": job.id }, job.id)),
        h("td", { "data-label": "Name", class: "name" }, job.name),
        h("td", { "data-label": "Created" }, timeCell(job.createdAt, now)),
        h("td", { "data-label": "Duration" }, jobDuration(job, now)),
        h("td", { "data-label": "Status" }, statusBadge(job.status))));
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
      const gen = ++generation; // answers to an older request are dropped
      const q = new URLSearchParams({ limit: String(st.limit), reverse: st.reverse ? "1" : "0" });
      if (st.name) q.set("name", st.name);
      if (st.term) q.set("term", st.term);
      if (st.status) q.set("status", st.status);
      if (st.begin) q.set("begin", st.begin);
      const scrollY = window.scrollY;
      const [statsRes, listRes] = await Promise.allSettled([api("GET", "/stats"), api("GET", "/job?" + q)]);
      if (gen !== generation) return;
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

  // ---- job detail ---------------------------------------------------------------------------

  const FIELD_ORDER = ["id", "name", "comment", "url", "status", "createdAt", "startedAt", "finishedAt", "timeout",
    "waiting", "running", "success", "failure", "canceled", "statusCode", "err"];
  const BLOCK_FIELDS = ["payload", "headers", "output"];
  const TIME_FIELDS = ["createdAt", "startedAt", "finishedAt"];

  function scalarText(v) {
    if (v === null || v === undefined) return "null";
    if (typeof v === "string") return v;
    return JSON.stringify(v);
  }

  function jobPage(id) {
    document.title = "Job " + id + " — hq-gevent";
    let timer = null, job = null, busy = false;
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
        else dd = h("dd", { class: v === null || v === "" ? "muted" : "" }, v === "" ? "(empty)" : scalarText(v));
        dd.dataset.field = k;
        items.push(h("div", { class: "field" }, h("dt", {}, k), dd));
        if (k === "finishedAt") {
          items.push(h("div", { class: "field" }, h("dt", {}, "duration"), h("dd", { "data-field": "duration" }, jobDuration(job, now) || "—")));
        }
      }
      fields.replaceChildren(...items);
      blocks.replaceChildren(...BLOCK_FIELDS.filter((k) => k in job).map((k) =>
        h("section", { class: "block" }, h("h2", {}, k),
          job[k] === null || job[k] === ""
            ? h("p", { id: "block-" + k, class: "muted empty-block" }, job[k] === null ? "null" : "(empty)")
            : h("pre", { id: "block-" + k, tabindex: "0", "aria-label": k }, pretty(job[k], k === "output")))));
    }

    async function load() {
      clearTimeout(timer);
      timer = null;
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
      if (ACTIVE.includes(job.status)) timer = setTimeout(load, REFRESH_MS);
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

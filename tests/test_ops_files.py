"""The operations files in etc/: Prometheus scrape example, alert rules, Grafana dashboard.

Checked with promtool (Debian package `prometheus`, installed by .ci/deps.sh): the rules load,
each alert fires on the situation it names and stays quiet on a healthy one (promtool's rule
unit tests on synthetic series), the scrape example loads, every dashboard query parses; every
metric name they use is one that /metrics exposes; and the real Prometheus, run with the scrape
example, scrapes a server that has tokens and evaluates every rule without error.
"""
import json
import os
import re
import shutil
import subprocess
import time

import bottle
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, free_port, require_tool
from hq_gevent.metrics import Metrics

ETC = ROOT / "etc"
RULES = ETC / "hq-gevent-alerts.yml"
SCRAPE = ETC / "prometheus.yml"
DASHBOARD = ETC / "grafana-dashboard.json"
METRIC_NAME = re.compile(r"\b((?:hq|process)_[a-z_]+)\b")
INSTANCE = 'job="hq-gevent", instance="hq:19900"'


def promtool(*args, cwd=None):
    require_tool("promtool", "checks the alert rules and the scrape example")
    done = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120, cwd=cwd)
    assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def dashboard():
    return json.loads(DASHBOARD.read_text())


def dashboard_queries():
    board = dashboard()
    queries = [target["expr"] for panel in board["panels"] for target in panel.get("targets", [])]
    queries += [var["query"]["query"] for var in board["templating"]["list"] if var["type"] == "query"]
    return queries


def rule_expressions():
    """The `expr:` values of the rules file (single-line or `|` blocks), without a YAML parser."""
    exprs, lines = [], RULES.read_text().splitlines()
    for i, line in enumerate(lines):
        key, _, rest = line.strip().partition(" ")
        if key != "expr:":
            continue
        if rest.strip() != "|":
            exprs.append(rest)
            continue
        indent = len(line) - len(line.lstrip())
        block = []
        for following in lines[i + 1:]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            block.append(following.strip())
        exprs.append(" ".join(block))
    return exprs


def without_annotations(text):
    """The rules with their annotations left out: promtool's unit tests compare annotations
    too, and the tests here are about when an alert fires and with which labels."""
    out, skip_deeper_than = [], None
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip())
        if skip_deeper_than is not None:
            if not line.strip() or indent > skip_deeper_than:
                continue
            skip_deeper_than = None
        if line.strip() == "annotations:":
            skip_deeper_than = indent
            continue
        out.append(line)
    return "\n".join(out) + "\n"


def test_alert_rules_load():
    if shutil.which("promtool") or os.environ.get("CI"):
        assert "SUCCESS: 8 rules found" in promtool("check", "rules", str(RULES))
        return
    yaml = pytest.importorskip("yaml", reason="neither promtool nor PyYAML to check the rules with")
    groups = yaml.safe_load(RULES.read_text())["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == 8
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def _alert(name, eval_time, series, fires, **extra_labels):
    """One promtool alert test: `series` {selector: values}; `fires` whether `name` fires at eval_time."""
    expected = []
    if fires:
        labels = {"job": "hq-gevent", "instance": "hq:19900", **extra_labels}
        expected = [{"exp_labels": labels}]
    return {
        "interval": "1m",
        "name": f"{name} {'fires' if fires else 'stays quiet'} at {eval_time}",
        "input_series": [{"series": selector, "values": values} for selector, values in series.items()],
        "alert_rule_test": [{"eval_time": eval_time, "alertname": name, "exp_alerts": expected}],
    }


def s(metric, **labels):
    extra = "".join(f', {key}="{value}"' for key, value in labels.items())
    return f"{metric}{{{INSTANCE}{extra}}}"


ALERT_CASES = [
    _alert("HqGeventDown", "10m", {s("up"): "1 1 0x10"}, True, severity="critical"),
    _alert("HqGeventDown", "3m", {s("up"): "1 1 0x10"}, False),  # down 1 minute: still pending
    _alert("HqStoreWriteErrors", "4m", {s("hq_store_write_errors_total"): "0 0 0 1x10"}, True, severity="critical"),
    _alert("HqStoreWriteErrors", "2m", {s("hq_store_write_errors_total"): "0 0 0 1x10"}, False),
    _alert("HqStoreWriteErrors", "12m", {s("hq_store_write_errors_total"): "0 0 0 1x10"}, False),  # healed
    _alert("HqStoreWritesSlow", "30m", {
        s("hq_store_write_duration_seconds_bucket", le="0.5"): "0x40",
        s("hq_store_write_duration_seconds_bucket", le="1.0"): "0+10x40",
        s("hq_store_write_duration_seconds_bucket", le="+Inf"): "0+10x40",
    }, True, severity="warning"),
    _alert("HqStoreWritesSlow", "30m", {
        s("hq_store_write_duration_seconds_bucket", le="0.005"): "0+10x40",
        s("hq_store_write_duration_seconds_bucket", le="+Inf"): "0+10x40",
    }, False),
    _alert("HqNoDeliveriesWhileJobsWait", "20m", {
        s("hq_jobs", state="waiting"): "5x30",
        s("hq_job_attempts_total", result="success"): "100x30",
        s("hq_job_attempts_total", result="failure"): "3x30",
    }, True, severity="critical", state="waiting"),
    _alert("HqNoDeliveriesWhileJobsWait", "20m", {
        s("hq_jobs", state="waiting"): "5x30",
        s("hq_job_attempts_total", result="success"): "100+10x30",
        s("hq_job_attempts_total", result="failure"): "3x30",
    }, False),
    _alert("HqNoDeliveriesWhileJobsWait", "20m", {  # idle: nothing waits, nothing to deliver
        s("hq_jobs", state="waiting"): "0x30",
        s("hq_job_attempts_total", result="success"): "100x30",
    }, False),
    _alert("HqQueueBackingUp", "35m", {s("hq_jobs", state="waiting"): "1000+100x40"}, True,
           severity="warning", state="waiting"),
    _alert("HqQueueBackingUp", "35m", {s("hq_jobs", state="waiting"): "5000x40"}, False),  # large but not growing
    _alert("HqJobsWaitLong", "30m", {
        s("hq_job_wait_seconds_bucket", le="1.0"): "0x40",
        s("hq_job_wait_seconds_bucket", le="60.0"): "0+1x40",
        s("hq_job_wait_seconds_bucket", le="300.0"): "0+10x40",
        s("hq_job_wait_seconds_bucket", le="+Inf"): "0+10x40",
    }, True, severity="warning"),
    _alert("HqJobsWaitLong", "30m", {
        s("hq_job_wait_seconds_bucket", le="1.0"): "0+10x40",
        s("hq_job_wait_seconds_bucket", le="+Inf"): "0+10x40",
    }, False),
    _alert("HqJobFailureRatioHigh", "30m", {
        s("hq_jobs_finished_total", status="failure"): "0+5x40",
        s("hq_jobs_finished_total", status="success"): "0+5x40",
        s("hq_jobs_finished_total", status="canceled"): "0x40",
    }, True, severity="warning"),
    _alert("HqJobFailureRatioHigh", "30m", {  # 2% fail: normal
        s("hq_jobs_finished_total", status="failure"): "0+1x40",
        s("hq_jobs_finished_total", status="success"): "0+49x40",
    }, False),
    _alert("HqJobFailureRatioHigh", "30m", {  # all fail, but only 10 jobs in 10 minutes: too few to judge
        s("hq_jobs_finished_total", status="failure"): "0+1x40",
        s("hq_jobs_finished_total", status="success"): "0x40",
    }, False),
    _alert("HqFileDescriptorsRunningOut", "15m", {s("process_open_fds"): "900x20", s("process_max_fds"): "1000x20"},
           True, severity="warning"),
    _alert("HqFileDescriptorsRunningOut", "15m", {s("process_open_fds"): "100x20", s("process_max_fds"): "1000x20"},
           False),
]


def test_each_alert_fires_on_its_situation_and_not_otherwise(tmp_path):
    rules = tmp_path / "rules.yml"
    rules.write_text(without_annotations(RULES.read_text()))
    named = {case["alert_rule_test"][0]["alertname"] for case in ALERT_CASES}
    assert named == set(re.findall(r"- alert: (\w+)", RULES.read_text())), "an alert without a test"
    tests = tmp_path / "rules_test.yml"  # JSON is YAML
    tests.write_text(json.dumps({"rule_files": [rules.name], "evaluation_interval": "1m", "tests": ALERT_CASES}))
    promtool("test", "rules", tests.name, cwd=tmp_path)


def test_scrape_example_loads_with_its_token_lines_enabled(tmp_path):
    token = tmp_path / "hq-gevent.token"
    token.write_text("a-read-token-of-at-least-16-chars\n")
    text = SCRAPE.read_text()
    assert "/usr/share/hq-gevent/hq-gevent-alerts.yml" in text
    text = text.replace("/usr/share/hq-gevent/hq-gevent-alerts.yml", str(RULES))
    enabled = re.sub(r"(?m)^    # (authorization:|  type: Bearer|  credentials_file: )(\S*)",
                     lambda m: "    " + m.group(1) + (str(token) if m.group(2) else ""), text)
    assert enabled.count("credentials_file: " + str(token)) == 1, enabled
    for variant, body in (("plain", text), ("token", enabled)):
        config = tmp_path / f"prometheus-{variant}.yml"
        config.write_text(body)
        out = promtool("check", "config", str(config))
        assert "SUCCESS: 8 rules found" in out


def test_dashboard_is_an_importable_grafana_dashboard():
    board = dashboard()
    assert board["title"] and board["uid"] and isinstance(board["schemaVersion"], int)
    variables = {var["name"]: var for var in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    taken = set()
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not cells & taken, f"panel {panel['title']!r} overlaps another"
        taken |= cells
        if panel["type"] == "row":
            continue
        assert panel["type"] in ("timeseries", "stat"), panel["type"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert 'instance=~"$instance"' in target["expr"], f"{panel['title']}: not filtered by $instance"
    titles = " ".join(panel["title"].lower() for panel in board["panels"])
    for topic in ("finished", "fail", "queue", "duration", "wait", "log"):
        assert topic in titles


def test_dashboard_queries_are_valid_promql(tmp_path):
    # promtool parses PromQL in rule files: each query becomes a recording rule, with
    # Grafana's variables replaced by what Grafana would send.
    grafana_vars = {"$__rate_interval": "1m", "$job": ".*", "$instance": ".*"}
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for n, query in enumerate(dashboard_queries()):
        for var, replacement in grafana_vars.items():
            query = query.replace(var, replacement)
        if query.startswith("label_values("):  # a Grafana function: check its selector
            query = query[len("label_values("):].rsplit(",", 1)[0]
        lines += [f"      - record: dashboard_query_{n}", f"        expr: {json.dumps(query)}"]
    rules = tmp_path / "dashboard-rules.yml"
    rules.write_text("\n".join(lines) + "\n")
    promtool("check", "rules", str(rules))


def exposed_families(text):
    """{family name: the sample names it exposes}."""
    return {family.name: {sample.name for sample in family.samples}
            for family in text_string_to_metric_families(text)}


def used_names():
    """{metric name: where it is used} over the alert rules and the dashboard."""
    names = {}
    for source, queries in (("alert rules", rule_expressions()), ("dashboard", dashboard_queries())):
        for query in queries:
            for name in METRIC_NAME.findall(query):
                names.setdefault(name, source)
    return names


def check_names_against(text):
    families = exposed_families(text)
    exposed = set().union(*families.values())
    used = used_names()
    assert {name: source for name, source in used.items() if name not in exposed} == {}
    shown = set(METRIC_NAME.findall(" ".join(dashboard_queries())))
    unshown = [family for family, names in families.items() if family.startswith("hq_") and not names & shown]
    assert unshown == [], "the dashboard leaves these metrics out"


def test_ops_files_use_only_exposed_metrics():
    """Against the Metrics the server exposes, rendered in-process."""
    assert len(rule_expressions()) == 8
    gauges = dict.fromkeys(("waiting", "scheduled", "running", "stored", "queue_usage", "workers_busy", "wal_bytes"), 0)
    metrics = Metrics(lambda: dict(gauges))
    app = bottle.Bottle()
    app.route("/job/<job_id>", "GET", lambda job_id: "")
    metrics.route_plugin().apply(app.routes[0].callback, app.routes[0])("1")  # labeled series appear once used
    check_names_against(metrics.render()[0].decode())


def test_ops_files_match_a_live_server(make_server, worker):
    srv = make_server(access_log_file="")
    srv.wait_job(srv.push(url=worker.url)["id"])  # labeled series appear once something happened
    response = srv.request("GET", "/metrics")
    assert response.status_code == 200, response.text
    check_names_against(response.text)


def test_prometheus_scrapes_a_live_server_with_the_example(make_server, worker, tmp_path):
    """The real Prometheus, configured by etc/prometheus.yml with its token lines enabled, scrapes
    a server that has tokens, sees the pushed jobs, and evaluates every alert rule without error."""
    require_tool("prometheus", "scrapes a live server with the example config")
    full, read = "full-token-for-the-scrape-test", "read-token-for-the-scrape-test"
    srv = make_server(start=False, access_log_file="", auth_tokens=[full], auth_read_tokens=[read])
    wait_healthy(srv.start(wait=False))
    srv.session.headers["Authorization"] = f"Bearer {full}"
    for _ in range(3):
        srv.wait_job(srv.push(url=worker.url)["id"])

    token = tmp_path / "hq-gevent.token"
    token.write_text(read + "\n")
    text = SCRAPE.read_text().replace("/usr/share/hq-gevent/hq-gevent-alerts.yml", str(RULES))
    text = text.replace('"127.0.0.1:19900"', f'"127.0.0.1:{srv.port}"')
    text = text.replace("scrape_interval: 15s", "scrape_interval: 1s").replace("evaluation_interval: 15s",
                                                                              "evaluation_interval: 1s")
    text = re.sub(r"(?m)^    # (authorization:|  type: Bearer|  credentials_file: )(\S*)",
                  lambda m: "    " + m.group(1) + (str(token) if m.group(2) else ""), text)
    config = tmp_path / "prometheus.yml"
    config.write_text(text)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api/v1"
    with open(tmp_path / "prometheus.log", "wb") as out:
        prometheus = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"], stdout=out, stderr=subprocess.STDOUT)
    try:
        def query(expr):
            try:
                answer = requests.get(f"{api}/query", params={"query": expr}, timeout=5).json()
            except requests.RequestException:
                return None
            result = answer["data"]["result"]
            return float(result[0]["value"][1]) if result else None

        deadline = time.monotonic() + 60
        while query('hq_jobs_pushed_total{job="hq-gevent"}') != 3:
            assert prometheus.poll() is None, (tmp_path / "prometheus.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()[-3000:]
            time.sleep(0.5)
        assert query('up{job="hq-gevent"}') == 1
        assert query('hq_jobs_finished_total{job="hq-gevent", status="success"}') == 3
        assert query('sum(hq_http_requests_total{job="hq-gevent", route="/job", method="POST"})') == 3
        assert query('process_resident_memory_bytes{job="hq-gevent"}') > 0

        while True:  # every rule evaluated at least once, none in error
            groups = requests.get(f"{api}/rules", timeout=5).json()["data"]["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            if len(rules) == 8 and all(rule.get("lastEvaluation", "").startswith("20") for rule in rules):
                break
            assert time.monotonic() < deadline, rules
            time.sleep(0.5)
        assert [(rule["name"], rule["health"], rule.get("lastError")) for rule in rules if rule["health"] != "ok"] == []
        firing = [rule["name"] for rule in rules if rule["state"] != "inactive"]
        assert firing == [], "a healthy idle server raised alerts"
    finally:
        prometheus.terminate()
        prometheus.wait(20)



def wait_healthy(srv, timeout=20):
    """Until /healthz answers (the server's own readiness wait would need a token here)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(srv.url + "/healthz", timeout=5).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline and srv.proc.poll() is None, srv.log()
        time.sleep(0.05)

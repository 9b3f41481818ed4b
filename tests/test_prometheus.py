"""The monitoring and deployment files against the real things: `sacmf serve` fed by the simulator, the
real Prometheus server scraping it, promtool, and the daemon's own config parser.

Why real parts: an alert or dashboard query with a typo in a metric name, a label the metric does not
have, or a PromQL mistake looks fine as YAML/JSON and silently shows nothing in production. Here every
dashboard query must return data from a live daemon, every alert rule must evaluate cleanly on live data
and pass its promtool unit tests, and every metric name used must exist in the daemon's exposition.

Needs `prometheus` and `promtool` (Debian package ``prometheus``; ``make test`` installs it). Without
them the Prometheus tests skip, except under ``CI=true``, where they fail: CI must never skip them.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.parse
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import torch

from daemon import config as config_mod
from tests.service_helpers import ROOT, Daemon, http, tiny_checkpoint

torch.set_num_threads(1)

DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "sacmf-dashboard.json"
STATEFULSET = DEPLOY / "kubernetes" / "statefulset.yaml"
# Series Prometheus itself writes for every target; the only non-daemon names the files may use.
PROMETHEUS_SERIES = {"up"}
# Grafana's interval variables; $group and $instance get one real value each (see grafana_substitute).
GRAFANA_INTERVALS = {"$__rate_interval": "10s", "$__range": "30s"}
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or"}
PROMQL_KEYWORDS |= {"unless", "offset", "inf", "nan", "atan2"}


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def require_prometheus() -> tuple[str, str]:
    """(prometheus, promtool) paths; skip when absent, but fail under CI, which installs them."""
    found = {name: shutil.which(name) for name in ("prometheus", "promtool")}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        reason = f"{' and '.join(missing)} not installed (Debian package prometheus; `make test` installs it)"
        if _ci():
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    return found["prometheus"], found["promtool"]  # type: ignore[return-value]


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: identifiers that are not functions, keywords or labels."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals (label values, regexes)
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range and subquery durations
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # label lists
    names = set()
    for m in re.finditer(r"(?<![\w:.$])[A-Za-z_:][\w:]*", s):
        if s[m.end() :].lstrip().startswith("(") or m.group(0).lower() in PROMQL_KEYWORDS:
            continue  # a function call or a keyword
        names.add(m.group(0))
    return names


def alert_rules() -> dict[str, str]:
    """alert name -> expr, read from alerts.yml without a YAML library (the venv has none).

    The file's layout is fixed by this test: ``- alert: NAME`` then ``expr:`` either inline or as a
    ``|`` block indented deeper than the ``expr:`` key.
    """
    rules: dict[str, str] = {}
    lines = ALERTS.read_text().splitlines()
    name = None
    for i, line in enumerate(lines):
        if m := re.match(r"\s*- alert: (\S+)$", line):
            name = m.group(1)
        elif (m := re.match(r"(\s*)expr: (.*)$", line)) and name is not None:
            indent, rest = len(m.group(1)), m.group(2).strip()
            if rest != "|":
                rules[name] = rest
            else:
                block = []
                for nxt in lines[i + 1 :]:
                    if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                        break
                    block.append(nxt.strip())
                rules[name] = " ".join(block).strip()
            name = None
    return rules


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels(dash: dict) -> list[dict]:
    """Every panel, including those nested in collapsed rows; rows themselves hold no queries."""
    out = []
    for p in dash["panels"]:
        out.extend(p.get("panels", []))
        if p["type"] != "row":
            out.append(p)
    return out


def dashboard_exprs(dash: dict) -> list[tuple[str, str]]:
    return [(p["title"], t.get("expr", "")) for p in dashboard_panels(dash) for t in p.get("targets", [])]


def grafana_substitute(expr: str, group: str, instance: str) -> str:
    """The query Grafana sends with one group and one replica selected. Not "All" (.*): an empty label
    matches .*, so a group filter on a metric without a group label would go unnoticed."""
    values = {**GRAFANA_INTERVALS, "$group": group, "$instance": instance}  # as regexes they match themselves
    for var, value in values.items():
        expr = expr.replace(var, value)
    return expr


def shard_configs() -> dict[int, str]:
    """ordinal -> the TOML text of config-<ordinal>.toml in the StatefulSet's ConfigMap (a ``|`` block)."""
    out: dict[int, str] = {}
    lines = STATEFULSET.read_text().splitlines()
    for i, line in enumerate(lines):
        if m := re.match(r"(\s+)config-(\d+)\.toml: \|$", line):
            indent = len(m.group(1))
            block = []
            for nxt in lines[i + 1 :]:
                if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                    break
                block.append(nxt[indent + 2 :])
            out[int(m.group(2))] = "\n".join(block)
    return out


def rfc3339(stamp: str) -> float:
    """Prometheus' nanosecond RFC 3339 timestamps as Unix seconds (fromisoformat takes microseconds)."""
    stamp = re.sub(r"(\.\d{6})\d*", r"\1", stamp).replace("Z", "+00:00")
    return datetime.fromisoformat(stamp).timestamp()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------------
# The daemon and a real Prometheus scraping it
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("prom-serve")
    tiny_checkpoint(tmp / "tiny.pt", "tiny-v1")
    d = Daemon(tmp, tmp / "tiny.pt")
    try:
        d.start()
        d.wait_results(lambda r: True, n=2)  # windows are flowing: every metric family has samples
        yield d
    finally:
        d.close()


class Prometheus:
    """The real server on loopback, temp TSDB, scraping the daemon and evaluating alerts.yml every 1 s."""

    def __init__(self, binary: str, tmp: Path, target: str) -> None:
        self.binary, self.tmp = binary, tmp
        self.config = tmp / "prometheus.yml"
        self.config.write_text(
            json.dumps(  # JSON is YAML
                {
                    "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(ALERTS)],
                    "scrape_configs": [{"job_name": "sacmf", "static_configs": [{"targets": [target]}]}],
                }
            )
        )
        self.target = target
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 20.0) -> Prometheus:
        for _attempt in range(3):  # the free port may be taken between choosing and binding it
            port = free_port()
            self.url = f"http://127.0.0.1:{port}"
            log = (self.tmp / "prometheus.log").open("w")
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={self.config}",
                    f"--storage.tsdb.path={self.tmp / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            log.close()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    if http(f"{self.url}/-/ready")[0] == 200:
                        return self
                except OSError:  # not listening yet
                    pass
                time.sleep(0.1)
            self.stop()
        log_tail = (self.tmp / "prometheus.log").read_text()[-2000:]
        raise AssertionError(f"prometheus did not become ready: {log_tail}")

    def api(self, path: str, **params: str) -> object:
        status, body = http(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}")
        answer = json.loads(body)
        assert status == 200 and answer["status"] == "success", (path, params, body[:500])
        return answer["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.api("query", query=expr)
        assert isinstance(data, dict)
        return data["result"]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(scope="module")
def prom(daemon: Daemon, tmp_path_factory) -> Iterator[Prometheus]:
    binary, _ = require_prometheus()
    server = Prometheus(binary, tmp_path_factory.mktemp("prometheus"), daemon.admin.removeprefix("http://"))
    try:
        yield server.start()
    finally:
        server.stop()


def wait_for(check, timeout: float = 30.0, interval: float = 0.5):
    """Poll ``check()`` until it returns a truthy value; the last falsy value explains a timeout."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(interval)


P99_LATENCY = "histogram_quantile(0.99, sum by (le) (rate(sacmf_window_latency_seconds_bucket[10s])))"


def test_prometheus_scrapes_windows_and_computes_the_latency_quantile(prom: Prometheus):
    def scraped() -> tuple[float, float] | None:
        windows = prom.query("sum(sacmf_windows_emitted_total)")
        p99 = prom.query(P99_LATENCY)
        if not windows or not p99:
            return None
        w, q = float(windows[0]["value"][1]), float(p99[0]["value"][1])
        return (w, q) if w > 0 and math.isfinite(q) else None

    got = wait_for(scraped)
    assert got, "no windows counted or no finite p99 window latency within 30 s"
    windows, p99 = got
    # A window closes only once data 100 ms (allowed_lateness_ms) past its end has arrived.
    assert p99 >= 0.1
    up = prom.query('up{job="sacmf"}')
    assert [float(s["value"][1]) for s in up] == [1.0]
    ready = prom.query("sacmf_ready")
    assert [float(s["value"][1]) for s in ready] == [1.0]


def test_alert_rules_load_and_evaluate_cleanly_on_live_data(prom: Prometheus):
    names = alert_rules()
    assert len(names) >= 10

    # Rules evaluated before the first scrape see no data and raise nothing: wait for two scrapes (a
    # rate needs two samples), then for every rule to have been evaluated again after that.
    assert wait_for(lambda: prom.query("count_over_time(sacmf_ready[10s]) >= 2"), timeout=20), "no scrapes"
    data_since = time.time()

    def evaluated() -> list[dict] | None:
        data = prom.api("rules")
        assert isinstance(data, dict)
        rules = [r for g in data["groups"] for r in g["rules"]]
        done = rules and all(r["health"] != "unknown" and rfc3339(r["lastEvaluation"]) > data_since for r in rules)
        return rules if done else None

    rules = wait_for(evaluated, timeout=20)
    assert rules, "rules were not evaluated on scraped data within 20 s"
    assert sorted(r["name"] for r in rules) == sorted(names)
    for r in rules:
        assert r["type"] == "alerting" and r["health"] == "ok", (r["name"], r.get("lastError"))
        assert r["duration"] > 0, f"{r['name']} has no `for:` duration"
        assert r["annotations"].get("summary") and r["annotations"].get("description"), r["name"]
        assert r["labels"].get("severity") in ("warning", "critical"), r["name"]
    # A healthy daemon raises nothing; only latency may be legitimately high on a loaded CI box.
    alerts = prom.api("alerts")
    assert isinstance(alerts, dict)
    active = {a["labels"]["alertname"] for a in alerts["alerts"]} - {"SacmfWindowLatencyObjectiveBreached"}
    assert not active, active


def test_every_dashboard_query_returns_data_from_the_live_daemon(prom: Prometheus):
    """Catches PromQL errors, wrong label names (a matcher on a label the metric lacks selects nothing)
    and aggregation mismatches in the dashboard, which Grafana would show as empty panels."""
    exprs = dashboard_exprs(dashboard())
    assert len(exprs) >= 20
    instance = prom.target

    def substitute(expr: str) -> str:
        return grafana_substitute(expr, "g1", instance)

    missing: list[str] = []

    def all_have_data() -> bool:  # rates need two scrapes inside the 10 s window: poll, bounded
        missing[:] = [f"{title}: {expr}" for title, expr in exprs if not prom.query(substitute(expr))]
        return not missing

    wait_for(all_have_data, timeout=30)
    assert not missing, "dashboard queries without data:\n" + "\n".join(missing)


# ----------------------------------------------------------------------------------------------------
# promtool
# ----------------------------------------------------------------------------------------------------


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    _, tool = require_prometheus()
    return subprocess.run([tool, *args], input=stdin, capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_promtool_checks_the_daemon_exposition(daemon: Daemon):
    out = promtool("check", "metrics", stdin=daemon.metrics_text())
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_accepts_the_config_rules_and_alert_unit_tests():
    config = promtool("check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert config.returncode == 0, config.stdout + config.stderr
    assert "alerts.yml" in config.stdout  # the config's rule_files resolved and were checked too
    rules = promtool("check", "rules", str(ALERTS))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in rules.stdout
    # alerts_test.yml: each alert fires for its faulty series, after its `for:`, and not for healthy ones
    tests = promtool("test", "rules", str(DEPLOY / "prometheus" / "alerts_test.yml"))
    assert tests.returncode == 0, tests.stdout + tests.stderr
    tested = set(re.findall(r"alertname: (\w+)", (DEPLOY / "prometheus" / "alerts_test.yml").read_text()))
    assert tested == set(alert_rules()), "every alert needs a promtool unit test"


# ----------------------------------------------------------------------------------------------------
# Metric names used by the dashboard and alerts exist (no Prometheus needed)
# ----------------------------------------------------------------------------------------------------


def test_metric_names_are_extracted_from_promql():
    expr = (
        'sum by (group, le) (rate(a_bucket{group=~"$group", x="by(y)"}[$__rate_interval])) '
        "/ on (job) group_left () b_total offset 5m > 1e-3 or histogram_quantile(0.9, c) and up"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c", "up"}


def test_every_metric_name_in_the_dashboard_and_alerts_is_exposed_by_the_daemon(daemon: Daemon):
    exposed = set(daemon.metrics())  # sample names: _total, _bucket, _count, _sum included
    dash = dashboard()
    used: dict[str, set[str]] = {}
    for title, expr in dashboard_exprs(dash):
        for name in metric_names(expr):
            used.setdefault(name, set()).add(f"dashboard panel {title!r}")
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            for name in re.findall(r"label_values\(\s*([A-Za-z_:][\w:]*)", var["definition"]):
                used.setdefault(name, set()).add(f"dashboard variable {var['name']}")
    for alert, expr in alert_rules().items():
        for name in metric_names(expr):
            used.setdefault(name, set()).add(f"alert {alert}")
    assert len(used) >= 25  # the extraction found the bulk of the names, not a fraction
    unknown = {name: sorted(where) for name, where in used.items() if name not in exposed | PROMETHEUS_SERIES}
    assert not unknown, f"metric names not in the daemon's /metrics: {unknown}"


def test_dashboard_structure():
    dash = dashboard()
    assert 36 <= dash["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables["DS_PROMETHEUS"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    assert variables["group"]["type"] == "query" and variables["group"]["includeAll"]
    panels = dashboard_panels(dash)
    ids = [p["id"] for p in dash["panels"]] + [p["id"] for p in panels if p not in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
        assert p["targets"], f"panel {p['title']!r} has no queries"
        for t in p["targets"]:
            assert t["expr"].strip(), f"panel {p['title']!r} has an empty query"
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24 and g["w"] > 0 and g["h"] > 0, p["title"]
    text = json.dumps(dash)
    for needed in (  # the brief's coverage, by metric
        "sacmf_windows_emitted_total",
        "sacmf_window_latency_seconds_bucket",
        "sacmf_inference_queue_depth",
        "sacmf_windows_dropped_total",
        "sacmf_ingest_rejected_messages_total",
        "sacmf_ingest_gap_messages_total",
        "sacmf_sensor_last_message_age_seconds",
        "sacmf_sensor_clock_offset_seconds",
        "sacmf_watermark_lag_seconds",
        "sacmf_fusion_modality_weight",
        "sacmf_fusion_mutual_information_nats",
        "sacmf_detections_total",
        "sacmf_model_info",
        "sacmf_model_reloads_total",
        "sacmf_ready",
    ):
        assert needed in text, needed
    assert 'group=~\\"$group\\"' in text  # the group variable filters the per-group panels


# ----------------------------------------------------------------------------------------------------
# Deployment files agree with the daemon (no Prometheus needed)
# ----------------------------------------------------------------------------------------------------


def test_kubernetes_shards_are_valid_configs_that_partition_the_groups():
    shards = shard_configs()
    sts = STATEFULSET.read_text()
    replicas = int(re.search(r"^\s+replicas: (\d+)", sts, re.M).group(1))
    assert sorted(shards) == list(range(replicas)), "one config-<ordinal>.toml per replica"
    assert "config-${HOSTNAME##*-}.toml" in sts  # the pod ordinal picks the shard
    grace = int(re.search(r"terminationGracePeriodSeconds: (\d+)", sts).group(1))
    seen: dict[str, int] = {}
    for ordinal, text in shards.items():
        cfg = config_mod.parse(tomllib.loads(text), f"config-{ordinal}.toml")  # raises ConfigError if invalid
        for group in cfg.ingest.groups:
            assert group not in seen, f"group {group} in shards {seen[group]} and {ordinal}"
            seen[group] = ordinal
        assert grace > cfg.shutdown_timeout_s + 5, "the kubelet must not SIGKILL a drain in progress"
        assert cfg.admin.host == "0.0.0.0"  # probes and Prometheus reach it from outside the pod
        assert f"containerPort: {cfg.admin.port}" in sts and f'prometheus.io/port: "{cfg.admin.port}"' in sts
        assert cfg.model.torch_threads > 0  # sched_getaffinity sees the node's cores, not the pod's limit
    probes = {"readinessProbe": "/readyz", "livenessProbe": "/healthz", "startupProbe": "/readyz"}
    for probe, path in probes.items():
        assert re.search(rf"{probe}:\s+httpGet:\s+path: {path}\s", sts), probe


def test_systemd_unit_and_dockerfile_match_the_daemon():
    cfg = config_mod.load(ROOT / "config.toml")
    unit = dict(
        line.split("=", 1)
        for line in (DEPLOY / "systemd" / "sacmf.service").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert float(unit["TimeoutStopSec"]) > cfg.shutdown_timeout_s  # systemd must not SIGKILL the drain
    assert unit["ExecReload"] == "/bin/kill -HUP $MAINPID" and unit["KillMode"] == "mixed"
    assert unit["ProtectSystem"] == "strict" and unit["Restart"] == "on-failure" and "ReadWritePaths" in unit
    assert unit["User"] != "root" or unit.get("DynamicUser") == "yes"

    docker = (DEPLOY / "Dockerfile").read_text()
    # The image rewrites config.toml with sed (Docker cannot run here): the patterns must still match,
    # and the result must be a valid config whose admin port the image exposes and health-checks.
    text = (ROOT / "config.toml").read_text()
    for pattern, replacement in re.findall(r"-e 's\|(.+?)\|(.+?)\|'", docker):
        assert re.search(pattern, text, re.M), f"Dockerfile sed {pattern!r} no longer matches config.toml"
        text = re.sub(pattern, replacement, text, flags=re.M)
    image_cfg = config_mod.parse(tomllib.loads(text), "image config")
    # the build's own check, run as the build runs it (from /, no weights in the image): it must pass
    check = re.search(r"sacmf (check-config[^\n]*?) /etc/sacmf/config\.toml", docker)
    assert check is not None, "the Dockerfile no longer checks its config"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.toml").write_text(text)
        run = subprocess.run(
            [sys.executable, "-m", "daemon.cli", *check.group(1).split(), str(Path(tmp) / "config.toml")],
            cwd="/", capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert image_cfg.admin.host == "0.0.0.0"
    # sensors outside the container reach its input (the default connected to the container's own loopback)
    assert image_cfg.ingest.bind and image_cfg.ingest.endpoints == ("tcp://0.0.0.0:5555",)
    assert "5555" in re.search(r"^EXPOSE (.+)$", docker, re.M).group(1).split()
    assert str(image_cfg.admin.port) in re.search(r"^EXPOSE (.+)$", docker, re.M).group(1).split()
    assert f"127.0.0.1:{image_cfg.admin.port}/healthz" in docker
    assert re.search(r"^STOPSIGNAL SIGTERM$", docker, re.M) and re.search(r"^USER (?!root)\w+", docker, re.M)

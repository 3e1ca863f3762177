"""deploy/monitoring/ is tested: the alert rules with promtool (``check rules`` and the unit
tests of deploy/monitoring/tests/ on synthetic series), the dashboard as Grafana JSON whose
queries parse, each alert's runbook section, and every metric the rules and the dashboard
name against the metrics the code defines (prometheus_client's registry once imbot's metric
modules are imported): a renamed metric must not leave a silent alert or an empty panel.

promtool is Debian's ``prometheus`` package (``make promtool`` installs it as root); without
it these tests fail saying so, unless IMBOT_SKIP_PROMTOOL=1 is set.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
import yaml

from tests.unit.test_deploy_schemas import (
    KubectlMissing,
    kubectl,
    render,
    schema_errors,
    skip_kubectl,
)

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
RULES_FILE = MONITORING / "prometheusrule.yaml"
RULE_TESTS = MONITORING / "tests"
DASHBOARD_FILE = MONITORING / "grafana-dashboard-imbot.json"
RUNBOOKS = ROOT / "docs" / "runbooks.md"
RUNBOOK_BASE = "https://github.com/imbot/imbot/blob/main/docs/runbooks.md"
# The plain rules file the unit tests' rule_files name (the PrometheusRule's spec).
PLAIN_RULES = "imbot-rules.yaml"

PROMTOOL_HELP = (
    "promtool is missing: `make promtool` installs Debian's prometheus package (as root), or "
    "`apt-get install -y --no-install-recommends prometheus`, or put a Prometheus release's "
    "promtool on PATH. Set IMBOT_SKIP_PROMTOOL=1 to skip the promtool checks explicitly."
)

# Where the code's metrics are defined: each room's metrics.py where it has one, and the
# modules that defined them before (imported when they exist; they must import cleanly).
METRIC_MODULES = (
    "imbot.gateway.app",
    "imbot.streams.boundary",
    "imbot.streams.stages",
    "imbot.streams.worker",
    "imbot.adapters.metrics",
    "imbot.sender.service",
    "imbot.sender.easemob",
    "imbot.sender.pacing",
)

# The figures the dashboard must show (issue 12, "Metrics, dashboard, alerts").
DASHBOARD_MUST_SHOW = {
    "imbot_gateway_callbacks_total",
    "imbot_gateway_callback_seconds_bucket",
    "imbot_gateway_publish_failures_total",
    "imbot_stage_messages_total",
    "imbot_stage_seconds_bucket",
    "imbot_stage_in_flight",
    "imbot_stage_retries_total",
    "imbot_consumer_lag",
    "imbot_dlq_records_total",
    "imbot_model_calls_total",
    "imbot_model_latency_seconds_bucket",
    "imbot_model_tokens_total",
    "imbot_model_cost_total",
    "imbot_budget_daily_cost",
    "imbot_model_circuit_state",
    "imbot_model_fallbacks_total",
    "imbot_route_decisions_total",
    "imbot_replies_total",
    "imbot_sender_parts_total",
    "imbot_easemob_requests_total",
    "imbot_feedback_total",
}

# Grafana's variables, replaced by values of the same kind before promtool parses a query.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "6h",
    "$namespace": "imbot",
    "$job": ".*",
}

# The identifiers a PromQL expression uses, once its string literals are taken out: a
# metric name is one of ours when it starts with imbot_ (a recording rule's would hold a
# colon, and is then not a metric of the code).
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_METRIC = re.compile(r"(?<![\w:])imbot_\w+(?![\w:])")
_SELECTOR = re.compile(r"(?<![\w:])(imbot_\w+)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
# Labels Prometheus adds to every target (the operator's namespace, pod, job, …; the
# stages' ServiceMonitor relabels `stage`), and a histogram's bucket bound.
TARGET_LABELS = frozenset(
    {"namespace", "job", "instance", "pod", "service", "endpoint", "container", "stage"}
)

Manifest = dict[str, Any]


def metric_names(expr: str) -> set[str]:
    """The imbot metric names ``expr`` selects."""
    return set(_METRIC.findall(_STRING.sub('""', expr)))


def selected_labels(expr: str) -> set[tuple[str, str]]:
    """(metric, label) of every label matcher in ``expr``'s selectors."""
    return {
        (metric, label)
        for metric, matchers in _SELECTOR.findall(_STRING.sub('""', expr))
        for label in _MATCHER.findall(matchers)
    }


def promtool() -> str:
    """promtool's path, or the test skipped (IMBOT_SKIP_PROMTOOL=1) or failed saying how."""
    found = shutil.which("promtool")
    if found is not None:
        return found
    if os.environ.get("IMBOT_SKIP_PROMTOOL") == "1":
        pytest.skip("IMBOT_SKIP_PROMTOOL=1: the promtool checks are skipped")
    pytest.fail(PROMTOOL_HELP, pytrace=False)


def run_promtool(*args: str, cwd: Path) -> None:
    result = subprocess.run(
        [promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"


@functools.cache
def prometheus_rule() -> Manifest:
    [rule] = [d for d in yaml.safe_load_all(RULES_FILE.read_text(encoding="utf-8")) if d]
    assert rule["kind"] == "PrometheusRule"
    return dict(rule)


def rules() -> Iterator[Manifest]:
    for group in prometheus_rule()["spec"]["groups"]:
        yield from group["rules"]


def alerts() -> list[Manifest]:
    return [r for r in rules() if "alert" in r]


@functools.cache
def dashboard() -> Manifest:
    loaded: Manifest = json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))
    return loaded


def dashboard_panels() -> Iterator[Manifest]:
    for panel in dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable."""
    found = [
        (f"panel {panel['title']!r} {target['refId']}", target["expr"])
        for panel in dashboard_panels()
        for target in panel.get("targets", [])
    ]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            found.append((f"variable {variable['name']}", variable["query"]["query"]))
    return found


def as_promql(query: str) -> str:
    """A dashboard query as Prometheus reads it: Grafana's variables replaced, and a
    ``label_values(selector, label)`` variable query reduced to its selector."""
    for name, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        query = query.replace("${" + name[1:] + "}", value).replace(name, value)
    values = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query, re.DOTALL)
    return values.group(1) if values else query


@functools.cache
def defined_metrics() -> frozenset[str]:
    """Every sample name the code's metrics can expose (``_total``, ``_bucket``, …)."""
    modules = {*METRIC_MODULES}
    modules |= {
        ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for path in (ROOT / "imbot").glob("*/metrics.py")
    }
    for name in sorted(modules):
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
    }
    names = {
        family.name + suffix
        for family in prometheus_client.REGISTRY.collect()
        if family.name.startswith("imbot_")
        for suffix in suffixes.get(family.type, ("",))
    }
    return frozenset(names)


def labels_of(sample_name: str) -> frozenset[str]:
    """The label names of the metric exposing ``sample_name``, as the code declares them."""
    defined_metrics()  # the modules imported
    # prometheus_client has no public view of a metric's declared label names when it has
    # no children yet (collect() then yields no sample): read the collector's own.
    collector = prometheus_client.REGISTRY._names_to_collectors[sample_name]
    names = frozenset(getattr(collector, "_labelnames", ()))
    return names | {"le"} if sample_name.endswith("_bucket") else names


@pytest.fixture(scope="module")
def promtool_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the PrometheusRule's spec as a plain rules file (promtool reads no
    custom resource) and the unit tests beside it."""
    promtool()
    directory = tmp_path_factory.mktemp("promtool")
    (directory / PLAIN_RULES).write_text(
        yaml.safe_dump(prometheus_rule()["spec"], sort_keys=False), encoding="utf-8"
    )
    for test in sorted(RULE_TESTS.glob("*.yaml")):
        shutil.copy(test, directory / test.name)
    return directory


# -- promtool ---------------------------------------------------------------------------------


def test_promtool_checks_the_rules(promtool_dir: Path) -> None:
    run_promtool("check", "rules", PLAIN_RULES, cwd=promtool_dir)


def test_the_rule_unit_tests_pass(promtool_dir: Path) -> None:
    tests = sorted(p.name for p in RULE_TESTS.glob("*.yaml"))
    assert tests
    run_promtool("test", "rules", *tests, cwd=promtool_dir)


def test_promtool_would_catch_a_wrong_expectation(promtool_dir: Path) -> None:
    # The unit tests compare labels and annotations: a wrong figure fails them.
    original = (promtool_dir / "gateway.yaml").read_text(encoding="utf-8")
    assert "10% of the AI callbacks" in original
    broken = promtool_dir / "broken.yaml"
    broken.write_text(original.replace("10% of the AI callbacks", "11% of the AI callbacks"))
    result = subprocess.run(
        [promtool(), "test", "rules", broken.name],
        cwd=promtool_dir,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "10% of the AI callbacks" in result.stdout + result.stderr  # what it got


def test_the_dashboard_queries_parse(tmp_path: Path) -> None:
    # promtool parses PromQL only in rules: each query becomes a recording rule.
    queries = dashboard_queries()
    assert len(queries) > 30
    group = {
        "name": "dashboard",
        "rules": [
            {"record": f"dashboard:query_{i}", "expr": as_promql(expr)}
            for i, (_, expr) in enumerate(queries)
        ],
    }
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [group]}), encoding="utf-8")
    run_promtool("check", "rules", path.name, cwd=tmp_path)


# -- every alert tested, documented and labelled ------------------------------------------------


def _rule_tests() -> list[Manifest]:
    return [
        case
        for path in sorted(RULE_TESTS.glob("*.yaml"))
        for test in yaml.safe_load(path.read_text(encoding="utf-8"))["tests"]
        for case in test.get("alert_rule_test", [])
    ]


def test_every_alert_has_a_test_where_it_fires_and_one_where_it_does_not() -> None:
    names = [a["alert"] for a in alerts()]
    assert len(names) >= 9
    assert len(names) == len(set(names)), "alert names must be unique"
    cases = _rule_tests()
    fires = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert not set(names) - fires, f"no test where these fire: {sorted(set(names) - fires)}"
    assert not set(names) - quiet, f"no test where these stay quiet: {sorted(set(names) - quiet)}"
    assert not (fires | quiet) - set(names), "tests of alerts that do not exist"


def test_every_alert_has_a_severity_a_duration_and_annotations() -> None:
    for alert in alerts():
        name = alert["alert"]
        assert alert["labels"]["severity"] in {"page", "ticket"}, name
        assert re.fullmatch(r"\d+[smh]", alert["for"]), f"{name}: a for: duration"
        annotations = alert["annotations"]
        assert annotations["summary"].strip(), name
        assert annotations["description"].strip(), name
        assert annotations["runbook_url"] == f"{RUNBOOK_BASE}#{name.lower()}", name


def test_every_alert_has_its_runbook_section() -> None:
    text = RUNBOOKS.read_text(encoding="utf-8")
    sections = set(re.findall(r"^## (Imbot\w+)\s*$", text, re.MULTILINE))
    names = {a["alert"] for a in alerts()}
    assert names <= sections, f"no runbook section for {sorted(names - sections)}"
    assert sections <= names, f"runbook sections of no alert: {sorted(sections - names)}"


def test_the_kustomization_states_the_runbook_base_url() -> None:
    assert RUNBOOK_BASE in (MONITORING / "kustomization.yaml").read_text(encoding="utf-8")


# -- the dashboard ------------------------------------------------------------------------------


def test_the_dashboard_is_grafana_json_with_its_variables() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 36
    assert board["uid"]
    assert board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "job"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"]["uid"] == "${datasource}"
    assert variables["job"]["includeAll"]
    assert variables["job"]["multi"]


def test_every_panel_is_placed_and_queries_the_templated_datasource() -> None:
    panels = list(dashboard_panels())
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    known = {"row", "timeseries", "stat", "state-timeline", "gauge", "bargauge", "table"}
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        title, pos = panel["title"], panel["gridPos"]
        assert panel["type"] in known, title
        assert 0 <= pos["x"] < pos["x"] + pos["w"] <= 24, title
        covered = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not covered & cells, f"{title}: overlaps another panel"
        cells |= covered
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", title
        assert panel.get("description"), f"{title}: say what it shows"
        assert panel["targets"], title
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", title
            assert target["refId"], title
            assert target["expr"].strip(), title
            # Every query is of the chosen namespace and job.
            assert 'namespace="$namespace"' in target["expr"], f"{title}: {target['expr']}"
            assert 'job=~"$job"' in target["expr"], f"{title}: {target['expr']}"


def test_the_dashboard_shows_the_figures_the_product_promises() -> None:
    shown = {name for _, expr in dashboard_queries() for name in metric_names(expr)}
    assert not DASHBOARD_MUST_SHOW - shown, f"not on the dashboard: {DASHBOARD_MUST_SHOW - shown}"


# -- metrics named exist in the code --------------------------------------------------------------


def test_every_metric_the_rules_and_the_dashboard_name_is_defined_in_the_code() -> None:
    named = {
        (f"alert {r['alert']}" if "alert" in r else f"rule {r['record']}", name)
        for r in rules()
        for name in metric_names(r["expr"])
    } | {(where, name) for where, expr in dashboard_queries() for name in metric_names(expr)}
    assert len({name for _, name in named}) >= 25
    defined = defined_metrics()
    missing: dict[str, list[str]] = {}
    for where, name in sorted(named):
        if name not in defined:
            missing.setdefault(name, []).append(where)
    assert not missing, "metrics no imbot module defines:\n" + "\n".join(
        f"  {name} (used by {len(uses)}: {', '.join(uses[:3])}{', …' if len(uses) > 3 else ''})"
        for name, uses in missing.items()
    )


def test_every_label_the_rules_and_the_dashboard_match_on_is_the_metrics() -> None:
    exprs = [(f"alert {r['alert']}", r["expr"]) for r in alerts()] + dashboard_queries()
    used = {(where, metric, label) for where, e in exprs for metric, label in selected_labels(e)}
    assert len(used) > 40
    defined = defined_metrics()
    wrong = sorted(
        f"{where}: {metric} has no label {label!r} (it has {sorted(labels_of(metric))})"
        for where, metric, label in used
        if metric in defined and label not in labels_of(metric) | TARGET_LABELS
    )
    assert not wrong, "\n".join(wrong)


def test_the_metric_check_reads_names_as_prometheus_does() -> None:
    assert metric_names(
        'sum by (le) (rate(imbot_a_bucket{job=~"imbot_x"}[5m])) / ns:imbot_b:rate5m + imbot_c'
    ) == {"imbot_a_bucket", "imbot_c"}
    defined = defined_metrics()
    assert {"imbot_gateway_callbacks_total", "imbot_gateway_callback_seconds_bucket"} <= defined
    assert "imbot_gateway_callbacks" not in defined  # a counter is read with _total
    assert selected_labels('imbot_a{x="1", y!~"imbot_b{z=1}"} + imbot_c {\n w=~"."}') == {
        ("imbot_a", "x"),
        ("imbot_a", "y"),
        ("imbot_c", "w"),
    }
    assert labels_of("imbot_gateway_callback_seconds_bucket") == {"outcome", "le"}


# -- rendered with kustomize ----------------------------------------------------------------------


def test_the_monitoring_kustomization_renders_a_rule_and_the_dashboard() -> None:
    if skip_kubectl():
        pytest.skip("IMBOT_SKIP_KUBECTL=1: not rendered")
    try:
        kubectl()
    except KubectlMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    objects = render(MONITORING)
    invalid = {m["kind"]: errors for m in objects if (errors := schema_errors(m))}
    assert not invalid, invalid
    [configmap] = [m for m in objects if m["kind"] == "ConfigMap"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"][DASHBOARD_FILE.name]) == dashboard()
    [rule] = [m for m in objects if m["kind"] == "PrometheusRule"]
    assert rule["spec"] == prometheus_rule()["spec"]

"""deploy/monitoring: the Prometheus alert rules pass ``promtool check rules`` and their unit
tests (``promtool test rules``, Debian package ``prometheus``), every alert is tested firing
and quiet, the Grafana dashboard is valid and each of its queries parses, and every metric
the rules and the dashboard read is one Enclave (or its gate module inside Synapse) exports,
so a renamed metric cannot leave an alert silently watching nothing."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from bridge.config import check_secrets, load_config
from bridge.gate.module import GateMetrics
from bridge.root import Root
from devstack.monitoring import (
    ALERTS,
    MONITORING,
    alert_rules,
    dashboard,
    dashboard_exprs,
    panels,
    used_names,
)

ROOT = Path(__file__).resolve().parents[3]
RULE_TESTS = sorted((MONITORING / "tests").glob("*.yml"))
MONITORING_DOC = ROOT / "docs" / "operators" / "monitoring.md"
SEVERITIES = {"critical", "warning", "info"}
# what Grafana substitutes before a query reaches Prometheus
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$instance": ".*"}
# series Prometheus makes itself (not a metric anyone exports)
PROMETHEUS_OWN = {"up"}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: install the Debian package 'prometheus' "
                    "(deploy/install.sh does)")
    return path


def run_promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def substituted(expr: str) -> str:
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"a Grafana variable left in {expr!r}"
    return expr


# -- the alert rules ---------------------------------------------------------------------------
def test_promtool_checks_the_rules() -> None:
    result = run_promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    assert RULE_TESTS, "no rule tests in deploy/monitoring/tests"
    result = run_promtool("test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_TESTS), result.stdout


def test_the_unit_tests_catch_a_changed_rule(tmp_path: Path) -> None:
    # the same tests against rules with one threshold moved must fail: they check values
    (tmp_path / "tests").mkdir()
    text = ALERTS.read_text(encoding="utf-8")
    changed = text.replace("enclave_inbox_oldest_pending_age_seconds) > 120",
                           "enclave_inbox_oldest_pending_age_seconds) > 100000")
    assert changed != text
    (tmp_path / "alerts.yml").write_text(changed, encoding="utf-8")
    for t in RULE_TESTS:
        shutil.copy(t, tmp_path / "tests" / t.name)
    result = run_promtool("test", "rules", *(str(tmp_path / "tests" / t.name)
                                             for t in RULE_TESTS))
    assert result.returncode != 0
    assert "EnclaveInboxLagging" in result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_quiet() -> None:
    fired: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert doc["rule_files"] == ["../alerts.yml"], path
        for test in doc["tests"]:
            for case in test.get("alert_rule_test", []):
                (fired if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names - fired == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested staying quiet"
    assert (fired | quiet) - names == set(), "tests of alerts that do not exist"


def test_every_alert_has_severity_annotations_and_a_runbook_section() -> None:
    doc = MONITORING_DOC.read_text(encoding="utf-8")
    headings = {h.strip().lower() for h in re.findall(r"^#{2,4} (.+)$", doc, re.M)}
    problems = []
    for rule in alert_rules():
        name = rule["alert"]
        if rule.get("labels", {}).get("severity") not in SEVERITIES:
            problems.append(f"{name}: severity not one of {sorted(SEVERITIES)}")
        ann = rule.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            if not ann.get(key):
                problems.append(f"{name}: no {key}")
        if ann.get("runbook_url") != f"docs/operators/monitoring.md#{name.lower()}":
            problems.append(f"{name}: runbook_url {ann.get('runbook_url')!r}")
        if name.lower() not in headings:
            problems.append(f"{name}: no section '### {name}' in {MONITORING_DOC.name}")
        # an alert on a level (not a count over a window) waits before it pages
        if "increase(" not in rule["expr"] and not rule.get("for"):
            problems.append(f"{name}: no for:")
    assert not problems, "\n".join(problems)


# -- the dashboard -----------------------------------------------------------------------------
def test_dashboard_is_an_importable_grafana_dashboard() -> None:
    dash = dashboard()
    assert dash["schemaVersion"] >= 39
    assert dash["uid"] and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert [i["name"] for i in dash["__inputs"]] == ["DS_PROMETHEUS"]
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for p in panels(dash):
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
        assert p["targets"], f"{p['title']}: no query"
        grid = p["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, p["title"]
    titles = " ".join(p["title"].lower() for p in panels(dash))
    for topic in ("events received", "processing lag", "parked", "quarantined", "gate",
                  "job", "directory sync", "purged", "archived", "announcement", "leader"):
        assert topic in titles, f"no panel about {topic}"


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    exprs = dashboard_exprs()
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": substituted(expr)}
        for i, (_, expr) in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


# -- the metric names --------------------------------------------------------------------------
def exported_names(registry: CollectorRegistry) -> set[str]:
    """The series names a registry's families expose (a counter ``x``: ``x_total``; a
    histogram: ``_bucket``, ``_count``, ``_sum``), whether or not they have samples yet."""
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count",
                                                                    "_sum")}
    return {m.name + s for m in registry.collect() for s in suffixes[m.type]}


@pytest.fixture
def enclave_names(config_dir: Callable[..., Path]) -> set[str]:
    loaded = load_config(config_dir())
    return exported_names(Root(loaded, check_secrets(loaded), extensions=[]).metrics.registry)


def test_every_metric_the_rules_and_dashboard_use_is_exported(
        enclave_names: set[str]) -> None:
    module_names = exported_names(_gate_registry())
    assert not module_names & enclave_names, "the gate module and Enclave share a name"
    used = used_names()
    assert len(used) >= 20, sorted(used)
    missing = {n: sorted(w) for n, w in used.items()
               if n not in enclave_names | module_names | PROMETHEUS_OWN}
    assert not missing, f"not exported by Enclave or its gate module: {missing}"
    # the gate module's metrics are what the gate alerts read
    assert {"enclave_gate_module_checks_total",
            "enclave_gate_module_unreachable_total"} <= set(used)


def test_the_name_check_catches_a_renamed_metric(enclave_names: set[str]) -> None:
    # what the test above relies on: a name Enclave does not export is not in the set
    assert "enclave_inbox_oldest_pending_age_seconds" in enclave_names
    assert "enclave_inbox_oldest_pending_age" not in enclave_names
    assert "enclave_job_runs_total" in enclave_names and "enclave_job_runs" not in enclave_names


def _gate_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    GateMetrics(registry)
    return registry

"""What deploy/monitoring's alert rules and Grafana dashboard read: the files, their queries
and the Enclave metric names in them. Shared by the unit test of the files
(tests/unit/deploy/test_monitoring.py) and the integration test that scrapes a running
Enclave (tests/integration/test_operator_logs.py), so both check the same names."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from .stack import REPO_ROOT

MONITORING = REPO_ROOT / "deploy" / "monitoring"
ALERTS = MONITORING / "alerts.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
METRIC_NAME = re.compile(r"\b(enclave_[a-z0-9_]+)\b")


def alert_rules(path: Path = ALERTS) -> list[dict[str, Any]]:
    """The alerting rules of a Prometheus rules file (recording rules left out)."""
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) of every query of the dashboard."""
    return [(p["title"], t["expr"]) for p in panels(dashboard()) if p["type"] != "row"
            for t in p.get("targets", [])]


def used_names() -> dict[str, set[str]]:
    """Metric name -> where it is used (alert names, dashboard panel titles)."""
    used: dict[str, set[str]] = {}
    for rule in alert_rules():
        for name in METRIC_NAME.findall(rule["expr"]):
            used.setdefault(name, set()).add(rule["alert"])
    for title, expr in dashboard_exprs():
        for name in METRIC_NAME.findall(expr):
            used.setdefault(name, set()).add(f"panel {title!r}")
    return used

"""contrib/prometheus-alerts.yml and contrib/grafana-dashboard.json: valid for the tools
that load them, and naming only metrics a running gsmtp exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from tests.integration.harness import REPOSITORY, GsmtpProcess

ALERTS = REPOSITORY / "contrib" / "prometheus-alerts.yml"
DASHBOARD = REPOSITORY / "contrib" / "grafana-dashboard.json"
ALERTS_TEST = REPOSITORY / "tests" / "monitoring" / "alerts_test.yml"
# Metrics another part of issue 11 adds (the reload that applies): the rules may name
# them before they are in this branch's scrape. Nothing else may be missing.
OWNED_ELSEWHERE = frozenset(
    {
        "gsmtp_config_last_reload_successful",
        "gsmtp_config_last_reload_success_timestamp_seconds",
    }
)
_METRIC = re.compile(r"\bgsmtp_[a-z0-9_]+\b")


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return found


def named_metrics() -> set[str]:
    text = ALERTS.read_text() + DASHBOARD.read_text()
    return set(_METRIC.findall(text))


def scraped_names(gsmtp: GsmtpProcess) -> set[str]:
    return {name.partition("{")[0] for name in gsmtp.metrics()}


def test_alert_rules_pass_promtool() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alerts_fire_on_the_series_gsmtp_exports() -> None:
    """promtool's rule unit tests: down, certificate, reload, queue age, rejects spike."""
    result = subprocess.run(
        [promtool(), "test", "rules", ALERTS_TEST.name],
        cwd=ALERTS_TEST.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dashboard_is_grafana_json_with_a_query_in_every_panel() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["panels"]
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert _METRIC.search(target["expr"]), (panel["title"], target["expr"])


def test_every_metric_the_rules_and_dashboard_name_is_scraped(gsmtp: GsmtpProcess) -> None:
    named = named_metrics()
    assert {"gsmtp_rejects_total", "gsmtp_tls_cert_not_after_timestamp_seconds"} <= named
    missing = named - scraped_names(gsmtp) - OWNED_ELSEWHERE
    assert not missing, f"named in contrib/ but not exported: {sorted(missing)}"


def test_the_rules_use_prometheus_up_for_a_target_down() -> None:
    assert re.search(r"expr: up\{job=\"gsmtp\"\} == 0", ALERTS.read_text())

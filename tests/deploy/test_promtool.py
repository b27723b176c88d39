"""deploy/prometheus with Prometheus's own checker (`promtool`, Debian's `prometheus` package): the scrape
config and the rules it loads are valid, and the alerting rules behave as intended under
`promtool test rules` (tests/deploy/alerts_test.yml), with negative controls showing the tool does fail."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from _deploy_files import ALERTS, PROMETHEUS_CONFIG, alert_rules, load_yaml, require_tool

UNIT_TESTS = Path(__file__).with_name("alerts_test.yml")


@pytest.fixture(scope="module")
def promtool():
    return require_tool("promtool", "prometheus")


def run(promtool, *args, cwd=None):
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_check_config_accepts_the_scrape_config_and_its_rule_file(promtool):
    out = run(promtool, "check", "config", str(PROMETHEUS_CONFIG))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 rule files found" in out.stdout + out.stderr       # the rules are loaded from the config


def test_check_rules_accepts_every_rule(promtool):
    out = run(promtool, "check", "rules", str(ALERTS))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(alert_rules())} rules found" in out.stdout + out.stderr


def test_check_rules_refuses_a_broken_expression(promtool, tmp_path):
    rules = load_yaml(ALERTS)
    rules["groups"][0]["rules"][0]["expr"] = "sum(rate(adapter_serve_requests_total[5m]"
    broken = tmp_path / "broken.yml"
    broken.write_text(yaml.safe_dump(rules))
    assert run(promtool, "check", "rules", str(broken)).returncode != 0


def test_every_alert_has_a_unit_test():
    alerts = {rule["alert"] for rule in alert_rules() if "alert" in rule}
    tested = {case["alertname"] for test in load_yaml(UNIT_TESTS)["tests"] for case in test["alert_rule_test"]
              if case["exp_alerts"]}
    assert alerts == tested


def test_alerts_fire_when_they_should_and_stay_silent_otherwise(promtool):
    out = run(promtool, "test", "rules", UNIT_TESTS.name, cwd=UNIT_TESTS.parent)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_a_wrong_expectation_fails_the_unit_tests(promtool, tmp_path):
    spec = load_yaml(UNIT_TESTS)
    spec["rule_files"] = [str(ALERTS)]
    case = next(c for t in spec["tests"] for c in t["alert_rule_test"] if c["alertname"] == "AdapterServeDown"
                and c["exp_alerts"])
    case["eval_time"] = "1m"                       # before its `for: 2m` has passed: must not fire yet
    (tmp_path / "wrong.yml").write_text(yaml.safe_dump(spec))
    out = run(promtool, "test", "rules", "wrong.yml", cwd=tmp_path)
    assert out.returncode != 0 and "AdapterServeDown" in out.stdout + out.stderr

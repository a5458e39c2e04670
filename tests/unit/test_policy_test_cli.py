"""``enclave policy test``: the shipped suite against config.example.yaml, a wrong expectation
(exit 1 and a readable diff), bad input (exit 2, naming the case and its line), JSON output
and directory facts from a directory file."""

from __future__ import annotations

import shutil
from pathlib import Path

import orjson
import pytest
import yaml

from bridge.cli import main
from bridge.config import load_config
from bridge.config.loader import parse_yaml_model
from bridge.config.policy_cases import PolicyCases
from bridge.policy.cases import CaseInputError, CaseRunner

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config.example.yaml"
SAMPLE = ROOT / "deploy" / "policy-tests" / "sample-policy.cases.yaml"
S = "corp.example.com"


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(["policy", "test", "-c", str(EXAMPLE), *args])
    out, err = capsys.readouterr()
    return rc, out, err


def write(tmp_path: Path, text: str, name: str = "cases.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_the_shipped_suite_passes_against_the_example_config(
        capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, str(SAMPLE))
    n = len(yaml.safe_load(SAMPLE.read_text())["cases"])
    assert n >= 25
    assert (rc, err) == (0, "")
    assert f"{n} cases: {n} passed, 0 failed" in out


def test_every_action_is_exercised_by_the_shipped_suite() -> None:
    cases = yaml.safe_load(SAMPLE.read_text())["cases"]
    assert {c["action"] for c in cases} == {"invite", "join", "dm", "user_search",
                                            "create_room", "membership", "state_event",
                                            "classify"}
    assert {c["expect"].get("decision") for c in cases} >= {"allow", "deny"}


WRONG = """\
now: 2026-12-01
people:
  "@alice:corp.example.com": {}
  "@rita:corp.example.com": {groups: [research]}
  "@tom:corp.example.com": {department: Trading}
cases:
  - name: staff may message staff
    who: "@rita:corp.example.com"
    action: dm
    target: "@alice:corp.example.com"
    expect: {decision: allow, rule_id: dms.staff_staff}
  - name: research may talk to trading (wrong)
    who: "@rita:corp.example.com"
    action: dm
    target: "@tom:corp.example.com"
    expect: {decision: allow, rule_id: dms.staff_staff, reason: welcome}
"""


def test_a_wrong_expectation_fails_with_a_readable_diff(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = write(tmp_path, WRONG)
    rc, out, err = run(capsys, str(p))
    assert (rc, err) == (1, "")
    assert "FAIL case 1: research may talk to trading (wrong)" in out
    assert f"({p}, line 12)" in out  # the case's line in the case file
    lines = out.splitlines()
    i = lines.index("  decision  expected allow")
    assert lines[i + 1].split() == ["got", "deny"]
    j = lines.index("  rule_id   expected dms.staff_staff")
    assert lines[j + 1].split() == ["got", "barrier-research-trading"]
    assert "  reason    expected contains 'welcome'" in lines
    # the rule that decided, with its line in the config
    line = load_config(EXAMPLE).line_of("policy.barriers[0]")
    assert (f"decided by barrier-research-trading at policy.barriers[0] ({EXAMPLE}, "
            f"line {line})") in out
    assert "case 0" not in out  # passing cases are not listed without -v
    assert out.rstrip().endswith(f"2 cases: 1 passed, 1 failed ({p} against the policy "
                                 f"of {EXAMPLE})")


def test_json_output_for_ci(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, str(write(tmp_path, WRONG)), "--format", "json")
    assert rc == 1
    doc = orjson.loads(out)
    assert (doc["cases"], doc["passed"], doc["failed"]) == (2, 1, 1)
    (r,) = doc["results"]
    assert r["index"] == 1 and r["line"] == 12 and not r["passed"]
    assert r["got"]["rule_id"] == "barrier-research-trading"
    assert r["got"]["decision"] == "deny"
    assert {m["field"] for m in r["mismatches"]} == {"decision", "rule_id", "reason"}
    rc, out, _ = run(capsys, str(SAMPLE), "--format", "json", "-v")
    doc = orjson.loads(out)
    assert rc == 0 and doc["failed"] == 0 and len(doc["results"]) == doc["cases"]


@pytest.mark.parametrize(("text", "expected"), [
    ("cases:\n  - who: '@a:corp.example.com'\n    action: dm\n    target: '@b:x'\n"
     "    expect: {decision: allow, rule_id: x}\n    colour: red\n",
     "at cases[0].colour (line 6): unknown key"),
    ("cases:\n  - who: '@a:corp.example.com'\n    action: fly\n"
     "    expect: {decision: allow, rule_id: x}\n",
     "at cases[0].action (line 3): Input should be"),
    ("cases:\n  - who: '@a:corp.example.com'\n    action: dm\n    target: bob\n"
     "    expect: {decision: allow, rule_id: x}\n",
     "'bob' is not a Matrix user id"),
    ("cases:\n  - who: '@a:corp.example.com'\n    action: invite\n    target: '@b:x'\n"
     "    expect: {decision: allow, rule_id: x}\n",
     "at cases[0] (line 2): Value error, action invite needs 'where' (the room)"),
    ("cases:\n  - who: '@a:corp.example.com'\n    action: dm\n    target: '@b:x'\n"
     "    expect: {decision: allow}\n",
     "give 'expect.decision' and 'expect.rule_id'"),
    ("cases: []\n", "at cases (line 1): List should have at least 1 item"),
    ("cases:\n  - who: '@a:corp.example.com'\n    who: '@b:corp.example.com'\n",
     "duplicate key"),
    ("cases: [\n", "invalid YAML"),
])
def test_bad_case_files_exit_2_naming_case_and_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str) -> None:
    p = write(tmp_path, text)
    rc, out, err = run(capsys, str(p))
    assert rc == 2
    assert out == ""
    assert err.startswith(f"Error in case file in {p}:")
    assert expected in err


def test_directory_facts_of_a_remote_user_are_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = write(tmp_path, "cases:\n  - who: {user: '@x:elsewhere.example', groups: [hr]}\n"
                        "    action: dm\n    target: '@b:corp.example.com'\n"
                        "    expect: {decision: allow, rule_id: x}\n")
    rc, _, err = run(capsys, str(p))
    assert rc == 2
    assert "cases[0]: @x:elsewhere.example is not a user of corp.example.com" in err


def test_missing_files_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, str(tmp_path / "nope.yaml"))
    assert rc == 2 and "cannot read the file" in err
    p = write(tmp_path, "directory: people.yaml\n" + WRONG.split("\n", 1)[1])
    rc, _, err = run(capsys, str(p))
    assert rc == 2 and "people.yaml: no such file" in err


def test_people_from_a_directory_file(tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """People of a directory file (the file source's format) become staff with their
    groups and department, under the user ids the config's mapping gives them."""
    shutil.copy(ROOT / "deploy" / "local" / "directory.yaml", tmp_path / "people.yaml")
    people = yaml.safe_load((tmp_path / "people.yaml").read_text())["people"]
    a, b = people[0]["username"], people[1]["username"]
    p = write(tmp_path, f"""\
directory: people.yaml
cases:
  - who: "@{a}:{S}"
    action: dm
    target: "@{b}:{S}"
    expect: {{decision: allow, rule_id: dms.staff_staff, kind: staff}}
  - who: "@nobody:{S}"
    action: dm
    target: "@{b}:{S}"
    expect: {{decision: deny, rule_id: dms.staff_external, kind: external}}
""")
    rc, out, _ = run(capsys, str(p))
    assert rc == 0, out
    assert "2 cases: 2 passed" in out


def test_the_runner_answers_like_the_policy_and_caches_per_time() -> None:
    loaded = load_config(EXAMPLE)
    cases, _ = parse_yaml_model(PolicyCases, SAMPLE.read_text())
    cfg = loaded.config
    runner = CaseRunner(cfg.policy, server_name=S,
                        service_users=[cfg.bot_user_id, cfg.admin_user_id],
                        service_prefix=cfg.appservice.namespace_prefix,
                        people=cases.people, now_ms=0)
    results = runner.run(cases)
    assert all(r.passed for r in results)
    # the file's `now` and the one case with its own, each with the inline-facts case
    assert len(runner._policies) == 3
    with pytest.raises(CaseInputError):
        CaseRunner(cfg.policy, server_name=S, service_users=[], service_prefix="x_",
                   people={"@a:other.example": cases.people["@alice:corp.example.com"]},
                   now_ms=0)


def test_people_from_the_configs_file_source(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copy(ROOT / "deploy" / "local" / "directory.yaml", tmp_path / "directory.yaml")
    cfg = yaml.safe_load(EXAMPLE.read_text())
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))  # source: directory.yaml
    a = yaml.safe_load((tmp_path / "directory.yaml").read_text())["people"][0]["username"]
    p = write(tmp_path, f"""\
directory: config
cases:
  - who: "@{a}:{S}"
    action: user_search
    target: "@mallory:evil.example"
    expect: {{decision: deny, rule_id: dms.staff_external, kind: staff}}
""")
    rc = main(["policy", "test", "-c", str(tmp_path / "config.yaml"), str(p)])
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    del cfg["directory"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    rc = main(["policy", "test", "-c", str(tmp_path / "config.yaml"), str(p)])
    out, err = capsys.readouterr()
    assert rc == 2 and "'config' needs a directory source of type file" in err


def test_policy_diff_refuses_configs_it_cannot_compare(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Refused before any secret is read or any server is asked."""
    cfg = yaml.safe_load(EXAMPLE.read_text())
    old, new = tmp_path / "old.yaml", tmp_path / "new.yaml"
    old.write_text(yaml.safe_dump(cfg))
    other = {**cfg, "homeserver": {**cfg["homeserver"], "server_name": "other.example"}}
    new.write_text(yaml.safe_dump(other))
    assert main(["policy", "diff", str(old), str(new)]) == 2
    assert "different homeservers" in capsys.readouterr().err
    bare = {k: v for k, v in cfg.items() if k not in ("policy", "retention")}
    old.write_text(yaml.safe_dump(bare))
    new.write_text(yaml.safe_dump(bare))
    assert main(["policy", "diff", str(old), str(new)]) == 3
    assert "neither configuration has a policy: section" in capsys.readouterr().err
    new.write_text("policy: {colour: red}\n")
    assert main(["policy", "diff", str(old), str(new)]) == 3
    assert "Error in configuration" in capsys.readouterr().err

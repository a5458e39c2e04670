"""``enclave policy test`` speed: generated case files against the sample policy.

    .venv/bin/python bench/policy_test.py [--cases 1000,10000] [--rounds 5] [--no-json]

For each size, a case file of that many cases is generated from the shipped suite
(``deploy/policy-tests/sample-policy.cases.yaml``, every action): each generated case is one
of the suite's, with its people renamed so that every case of the file asks about its own
users (no answer is memoised from an earlier case; the directory facts grow with the file),
and its expectation kept, so every case must pass. Timed:

* **end to end**: ``python -m bridge policy test -c config.example.yaml FILE`` in a
  subprocess, interpreter start, imports, YAML parsing, validation and output included
  (issue target: 1,000 cases in <= 5 s);
* **in process**: :func:`bridge.cli.policy.run_policy_test` (load, parse, validate, run);
  and the run alone (:meth:`CaseRunner.run` on the parsed file);
* the interpreter with Enclave's CLI imported and nothing run (``python -m bridge --help``),
  the floor of every end-to-end figure.

Medians (and min/max) of ``--rounds`` runs; the machine's load average is recorded with
them (2 shared cores). Results: ``bench/results/policy-test-<date>.json``. Asserts nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import REPO, git_rev
from bridge.cli.policy import run_policy_test
from bridge.config import load_config
from bridge.config.loader import parse_yaml_model
from bridge.config.policy_cases import PolicyCases
from bridge.policy.cases import CaseRunner

CONFIG = REPO / "config.example.yaml"
SAMPLE = REPO / "deploy" / "policy-tests" / "sample-policy.cases.yaml"
SERVER = "corp.example.com"


def rename(value: Any, names: dict[str, str]) -> Any:
    """``value`` with every local user id of the suite's people renamed."""
    if isinstance(value, str):
        for old, new in names.items():
            value = value.replace(old, new)
        return value
    if isinstance(value, list):
        return [rename(v, names) for v in value]
    if isinstance(value, dict):
        return {rename(k, names): rename(v, names) for k, v in value.items()}
    return value


def generate(n: int) -> dict[str, Any]:
    suite = yaml.safe_load(SAMPLE.read_text())
    base_people: dict[str, Any] = suite["people"]
    # the case-level people (`who: {user: ...}`) are renamed too
    locals_ = sorted({*base_people, "@nina:corp.example.com", "@bob:corp.example.com"})
    people: dict[str, Any] = {}
    cases = []
    for i in range(n):
        template = suite["cases"][i % len(suite["cases"])]
        names = {u: u.replace(":", f"-{i}:", 1) for u in locals_}
        for u, facts in base_people.items():
            people[names[u]] = facts
        case = rename(template, names)
        case["name"] = f"{template['name']} #{i}"
        cases.append(case)
    return {"now": suite["now"], "people": people, "cases": cases}


def timed(fn: Any, rounds: int) -> dict[str, float]:
    """Wall time (median, min, max) and CPU time (median; user + system, this process and
    the subprocesses it waited for): on a shared machine the CPU time moves less."""
    xs, cpu = [], []
    for _ in range(rounds):
        r0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
            resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        fn()
        xs.append(time.perf_counter() - t)
        r1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
            resource.RUSAGE_CHILDREN)
        cpu.append(sum(b.ru_utime + b.ru_stime - a.ru_utime - a.ru_stime
                       for a, b in zip(r0, r1, strict=True)))
    return {"median_s": round(statistics.median(xs), 3), "min_s": round(min(xs), 3),
            "max_s": round(max(xs), 3), "cpu_median_s": round(statistics.median(cpu), 3)}


def cli(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "bridge", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    if done.returncode not in (0,):
        raise SystemExit(f"enclave {' '.join(args)} exited {done.returncode}:\n"
                         f"{done.stdout[-2000:]}{done.stderr[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="1000,10000")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-json", action="store_true")
    args = ap.parse_args()
    sizes = [int(s) for s in args.cases.split(",")]
    results: dict[str, Any] = {"meta": {**git_rev(), "date": dt.date.today().isoformat(),
                                        "python": sys.version.split()[0],
                                        "cpus": os.cpu_count(),
                                        "loadavg_before": os.getloadavg(),
                                        "rounds": args.rounds}, "sizes": {}}
    floor = timed(lambda: cli("--help"), args.rounds)
    results["cli_start"] = floor
    print(f"python -m bridge --help (interpreter + CLI imports): {floor['median_s']:.3f} s "
          f"median, CPU {floor['cpu_median_s']:.2f} s")
    loaded = load_config(CONFIG)
    cfg = loaded.config
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            path = Path(tmp) / f"cases-{n}.yaml"
            path.write_text(yaml.safe_dump(generate(n), sort_keys=False))
            size_kb = path.stat().st_size // 1024
            e2e = timed(lambda path=path: cli("policy", "test", "-c", str(CONFIG),
                                              str(path)), args.rounds)
            inproc = timed(lambda path=path: run_policy_test(str(CONFIG), str(path)),
                           args.rounds)
            _, results_once = run_policy_test(str(CONFIG), str(path))
            failed = sum(not r.passed for r in results_once)
            cases, _ = parse_yaml_model(PolicyCases, path.read_text(), with_lines=False)

            def run_only(cases: PolicyCases = cases) -> None:
                CaseRunner(cfg.policy, server_name=SERVER,
                           service_users=[cfg.bot_user_id, cfg.admin_user_id],
                           service_prefix=cfg.appservice.namespace_prefix,
                           people=cases.people, now_ms=0).run(cases)

            run_alone = timed(run_only, args.rounds)
            row = {"file_kb": size_kb, "failed": failed, "end_to_end": e2e,
                   "in_process": inproc, "run_only": run_alone,
                   "cases_per_s_run_only": round(n / run_alone["median_s"])}
            results["sizes"][str(n)] = row
            print(f"{n:>6} cases ({size_kb} KiB, {failed} failed): end to end "
                  f"{e2e['median_s']:.2f} s (min {e2e['min_s']:.2f}, max {e2e['max_s']:.2f}, "
                  f"CPU {e2e['cpu_median_s']:.2f} s)"
                  f", in process {inproc['median_s']:.2f} s, run alone "
                  f"{run_alone['median_s']:.3f} s ({row['cases_per_s_run_only']} cases/s)"
                  + ("   target <= 5 s: " + ("met" if e2e["median_s"] <= 5 else "NOT met")
                     if n == 1000 else ""))
    results["meta"]["loadavg_after"] = os.getloadavg()
    if not args.no_json:
        out = REPO / "bench" / "results" / f"policy-test-{dt.date.today().isoformat()}.json"
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"saved {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()

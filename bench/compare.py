"""A/B comparison of a benchmark between two revisions, in one run (issue 18's "no regression").

    .venv/bin/python bench/compare.py ingest|gate_latency [--base REV] [--head REV]
        [--rounds N] [--args "..."] [--cell "..."]... [--note TEXT] [--keep-worktrees]

Both revisions are checked out as throwaway ``git worktree``s under ``var/compare/``
(gitignored) and the bench is run alternately on each, in interleaved rounds with the same
parameters: per round and per cell, base then head or head then base (the order flips
every time), so load from other work on this shared 2-core machine hits both sides alike.
Each run is a subprocess with the working directory set to its tree and ``PYTHONPATH`` to
that tree's copy of every project the venv has installed editable (Enclave, and the dev
launchers in whatever folder the tree keeps them): the venv's editable installs point at
another checkout, and a pre-flight check proves each package resolves inside the tree. So
that tree's ``bridge``/``bots`` are imported, and the Synapse the gate bench starts loads
that tree's gate module.

**Each revision runs its own bench driver** (``bench/<name>.py`` as committed there), not
the current driver against both: the drivers reach the product through imports the
refactor moves (``bench/_gate_policy.py`` takes ``StaffRecord`` from
``bridge.directory.model`` at the base and ``bridge.model.people`` at head;
``bench/gate_latency.py`` starts Synapse through ``bridge.devstack`` at the base and the
``devstack`` package that left ``bridge/`` at head), so the current driver cannot import the
base's product. Each tree therefore also uses its own devstack. The measuring code must be
the same on both sides for the ratio to mean anything: the script records whether the driver
files (``DRIVERS``) differ between the two revisions and prints the diff's size when they do
(between the default base and main on 2026-12-06: only those two import lines).

The head side is a worktree of a commit too (default ``HEAD``): uncommitted changes are not
measured (a warning says so), and the benches' result files, which they write into their
own tree, never touch the checked-out ``bench/results``.

The default base is 49f2bcb, main just before the first merge of issue 18's refactor
(bc2261e "Merge issue 18 part: one composition root ..."; its first parent). The first
#18 commit, 2d1d20e, branched earlier (from b14533d), but main took non-#18 work after that
(completeness check, read-back before a resend) that head has too; 49f2bcb has it and none
of #18, so the comparison isolates the refactor.

Every run's figures are read from the JSON the bench writes (``ingest.py --json``,
``gate_latency.py`` always); per metric the medians over the rounds for base and head, the
ratio head/base and both sides' ranges are printed ("overlap" marks a difference inside the
run-to-run spread), and everything (every run's figures too) goes to
``bench/results/compare-<bench>-<date>.json``. Raw per-run files stay in
``var/compare/runs-<stamp>/``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "var" / "compare"
DEFAULT_BASE = "49f2bcb52f6dba0e8754c929e790129df4a049ec"  # main before issue 18's first merge
DRIVERS = ("bench/_common.py", "bench/ingest.py", "bench/gate_latency.py",
           "bench/_gate_policy.py", "bench/_servers.py")
RUN_TIMEOUT_S = 900

Metrics = dict[str, float | None]


# -- what each bench reports ------------------------------------------------------------------

def _ingest_metrics(doc: dict[str, Any]) -> Metrics:
    out: Metrics = {}
    for c in doc["cells"]:
        key = f"{c['server']} {c['size']}-event"
        out[f"{key} txn/s"] = c["txn_per_s"]
        if c["size"] > 1:
            out[f"{key} events/s"] = c["events_per_s"]
        out[f"{key} p50 ms"] = c["p50_ms"]
        out[f"{key} p99 ms"] = c["p99_ms"]
        out[f"{key} CPU µs/txn"] = c["server_cpu_us_per_txn"]
        inbox = c.get("inbox") or {}
        if inbox:
            out[f"{key} processed events/s during load"] = inbox["processed_per_s_during_run"]
            out[f"{key} drain s"] = inbox["drain_s"]
            out[f"{key} stored exactly once (1 = yes)"] = float(bool(inbox["stored_exactly"]))
        out[f"{key} noise: other programs % of a core"] = c["other_cpu_pct"]
    return out


def _gate_metrics(doc: dict[str, Any]) -> Metrics:
    ep = doc["endpoint"]
    out: Metrics = {}
    for q in ("p50", "p90", "p99"):
        out[f"endpoint {q} ms (from scheduled send)"] = ep["latency"][f"{q}_ms"]
    for q in ("p50", "p99"):
        out[f"endpoint {q} ms (from actual send)"] = ep["service"][f"{q}_ms"]
    out["endpoint errors"] = float(sum(ep["errors"].values()))
    out["endpoint server CPU % of a core"] = ep["server_cpu_pct"]
    out["endpoint noise: other programs, cores"] = ep["other_busy_cores"]
    syn = doc.get("synapse")
    if syn is not None:
        for mode in ("off", "on", "off-again"):
            for q in ("p50", "p99"):
                out[f"synapse invite, gate {mode}, {q} ms"] = syn[mode][f"{q}_ms"]
        # what the gate adds to an invite: on against the mean of the two runs without it
        out["synapse invite p50 added by the gate ms"] = (
            syn["on"]["p50_ms"] - (syn["off"]["p50_ms"] + syn["off-again"]["p50_ms"]) / 2)
        if syn["on"]["gate_checks_in_synapse_log"] <= 0:
            raise RuntimeError("the gate module was not asked during the 'on' invites")
    return out


# higher is better for these; lower for every other metric except the informational ones
HIGHER_BETTER = ("txn/s", "events/s", "stored exactly once")
INFORMATIONAL = ("noise:",)


@dataclass(frozen=True)
class Bench:
    script: str
    args: tuple[str, ...]  # every run
    cells: tuple[tuple[str, ...], ...]  # one run per cell and side per round
    results_glob: str
    metrics: Callable[[dict[str, Any]], Metrics]
    rounds: int  # default; each round runs every cell once per side


BENCHES = {
    # one run per (server, size): short, so base and head runs of a cell sit close in time
    "ingest": Bench(
        script="bench/ingest.py",
        args=("--duration", "5", "--warmup", "1", "--wait-quiet", "0", "--json"),
        cells=tuple(("--servers", s, "--sizes", n) for n in ("100", "1")
                    for s in ("enclave-sqlite", "enclave-postgres")),
        results_glob="ingest-*.json", metrics=_ingest_metrics, rounds=5),
    # the real separation policy as decider (what docs/benchmarks/separation.md reports)
    "gate_latency": Bench(
        script="bench/gate_latency.py",
        args=("--decider", "_gate_policy:decider()", "--rate", "500", "--seconds", "10",
              "--warmup", "2", "--invites", "50", "--wait-quiet", "0"),
        cells=((),), results_glob="gate_latency.json", metrics=_gate_metrics, rounds=5),
}


# -- trees ------------------------------------------------------------------------------------

def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


def worktree(sha: str, label: str) -> Path:
    """A clean detached checkout of ``sha`` under var/compare (reused when already there)."""
    path = WORK / f"{label}-{sha[:12]}"
    if path.exists():
        if git("rev-parse", "HEAD", cwd=path) != sha:
            raise SystemExit(f"{path} exists at another commit; remove it with "
                             f"'git worktree remove --force {path}'")
        git("reset", "-q", "--hard", cwd=path)
        git("clean", "-qfd", cwd=path)
    else:
        WORK.mkdir(parents=True, exist_ok=True)
        git("worktree", "add", "-q", "--detach", str(path), sha)
    # compile once up front, so no side's first run pays for it
    subprocess.run([sys.executable, "-m", "compileall", "-q", "bridge", "bots", "bench"],
                   cwd=path, check=True, stdout=subprocess.DEVNULL)
    return path


def editable_sources() -> list[tuple[Path, list[str]]]:
    """(folder inside its checkout, top-level packages) of each project this venv has
    installed editable from a git checkout: Enclave itself, and its dev launchers wherever
    they live at the time. Read from the venv, so no package name is written here."""
    out: list[tuple[Path, list[str]]] = []
    for dist in importlib.metadata.distributions():
        info = json.loads(dist.read_text("direct_url.json") or "{}")
        if not info.get("dir_info", {}).get("editable"):
            continue
        src = Path(urllib.parse.urlparse(info["url"]).path).resolve()
        try:
            top = Path(git("rev-parse", "--show-toplevel", cwd=src)).resolve()
        except (OSError, subprocess.CalledProcessError):
            continue
        out.append((src.relative_to(top), (dist.read_text("top_level.txt") or "").split()))
    return out


def tree_env(tree: Path) -> dict[str, str]:
    """The environment of a run in ``tree``: its copies of the editable projects first on
    the path (the venv's editable finders point at another checkout)."""
    paths = [str(tree)] + [str(tree / rel) for rel, _ in editable_sources()
                           if rel != Path() and (tree / rel).is_dir()]
    # replace, never extend: an inherited PYTHONPATH would import another tree's code
    return {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}


def preflight(tree: Path) -> list[str]:
    """Prove that a process started like the runs imports this tree's copy of every
    editable package the tree has; the packages checked."""
    names = [n for rel, pkgs in editable_sources() for n in pkgs if (tree / rel / n).is_dir()]
    code = ("import importlib, sys\n"
            "for n in sys.argv[1:]: print(importlib.import_module(n).__file__)")
    out = subprocess.run([sys.executable, "-c", code, *names], cwd=tree, env=tree_env(tree),
                         check=True, capture_output=True, text=True).stdout.split()
    for n, f in zip(names, out, strict=True):
        if not Path(f).resolve().is_relative_to(tree.resolve()):
            raise SystemExit(f"{tree}: {n} is imported from {f}, outside the tree")
    return names


def drivers_diff(base: str, head: str) -> dict[str, Any]:
    stat = git("diff", "--numstat", base, head, "--", *DRIVERS)
    return {"identical": not stat, "numstat": stat.splitlines()}


# -- one run ----------------------------------------------------------------------------------

def busy_cores_since(prev: tuple[float, float]) -> float:
    busy, t0 = prev
    return (machine_busy() - busy) / (time.monotonic() - t0)


def machine_busy() -> float:
    f = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def run_once(bench: Bench, tree: Path, args: list[str], cell: tuple[str, ...],
             keep: Path) -> dict[str, Any]:
    """Run the bench once in ``tree``; its figures (or the error), its output kept as
    ``keep``.json/.log."""
    results = tree / "bench" / "results"
    before = {p: p.stat().st_mtime_ns for p in results.glob(bench.results_glob)}
    cmd = [sys.executable, bench.script, *args, *cell]
    load = os.getloadavg()[0]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=tree, env=tree_env(tree), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
    wall = time.monotonic() - t0
    keep.with_suffix(".log").write_text(proc.stdout + proc.stderr)
    run: dict[str, Any] = {"command": shlex.join(cmd[1:]), "wall_s": wall,
                           "loadavg_1m_before": load}
    try:
        if proc.returncode != 0:
            raise RuntimeError(f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}")
        written = [p for p in results.glob(bench.results_glob)
                   if before.get(p) != p.stat().st_mtime_ns]
        if len(written) != 1:
            raise RuntimeError(f"expected one new results file, found {written}")
        shutil.copy2(written[0], keep.with_suffix(".json"))
        doc = json.loads(written[0].read_text())
        measured = doc["meta"]["git"]["commit"]
        if measured != git("rev-parse", "HEAD", cwd=tree):
            raise RuntimeError(f"the bench measured {measured}, not this tree")
        run["metrics"] = bench.metrics(doc)
    except Exception as e:  # recorded and reported; the other runs go on
        run["error"] = str(e)
    finally:
        # leave the tree as checked out for the next run
        git("checkout", "-q", "--", "bench/results", cwd=tree)
        git("clean", "-qf", "--", "bench/results", cwd=tree)
    return run


# -- summary ----------------------------------------------------------------------------------

def direction(metric: str) -> str:
    if any(m in metric for m in INFORMATIONAL):
        return "info"
    return "higher" if any(m in metric for m in HIGHER_BETTER) else "lower"


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    names: list[str] = []
    for r in runs:
        names += [m for m in r.get("metrics", {}) if m not in names]
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        row: dict[str, Any] = {"better": direction(name)}
        for side in ("base", "head"):
            vals = [r["metrics"][name] for r in runs if r["side"] == side
                    and r.get("metrics", {}).get(name) is not None]
            row[side] = statistics.median(vals) if vals else None
            row[f"{side}_range"] = [min(vals), max(vals)] if vals else None
            row[f"{side}_n"] = len(vals)
        b, h = row["base"], row["head"]
        row["ratio"] = h / b if b and h is not None else None
        br, hr = row["base_range"], row["head_range"]
        row["ranges_overlap"] = (br is not None and hr is not None
                                 and br[0] <= hr[1] and hr[0] <= br[1])
        out[name] = row
    return out


def fmt(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"


def print_summary(summary: dict[str, dict[str, Any]], meta: dict[str, Any]) -> None:
    print(f"\n{meta['bench']}: base {meta['base'][:9]} vs head {meta['head'][:9]}, "
          f"{meta['rounds']} rounds, medians (ranges)")
    width = max(len(n) for n in summary) if summary else 10
    print(f"{'metric':{width}}  {'base':>22}  {'head':>22}  {'head/base':>9}  better")
    def side(r: dict[str, Any], s: str) -> str:
        rng = r[f"{s}_range"]
        return f"{fmt(r[s])} ({fmt(rng[0])}–{fmt(rng[1])})" if rng else "–"

    for name, r in summary.items():
        ratio = f"{r['ratio']:.3f}" if r["ratio"] is not None else "–"
        flag = r["better"] + (", overlap" if r["ranges_overlap"] else "")
        print(f"{name:{width}}  {side(r, 'base'):>22}  {side(r, 'head'):>22}  {ratio:>9}  {flag}")


# -- main -------------------------------------------------------------------------------------

def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bench", choices=sorted(BENCHES))
    p.add_argument("--base", default=DEFAULT_BASE, help="revision before (default: %(default).9s)")
    p.add_argument("--head", default="HEAD", help="revision after (default: HEAD)")
    p.add_argument("--rounds", type=int,
                   help="runs per side and cell (default 5)")
    p.add_argument("--args", help="the bench's arguments for every run, replacing the default")
    p.add_argument("--cell", action="append",
                   help="extra arguments of one cell (repeatable), replacing the default cells")
    p.add_argument("--note", default="", help="recorded with the results (e.g. machine load)")
    p.add_argument("--keep-worktrees", action="store_true",
                   help="leave var/compare/<rev> checkouts for the next comparison")
    a = p.parse_args()

    bench = BENCHES[a.bench]
    a.rounds = a.rounds or bench.rounds
    args = shlex.split(a.args) if a.args is not None else list(bench.args)
    cells = tuple(tuple(shlex.split(c)) for c in a.cell) if a.cell else bench.cells
    base, head = git("rev-parse", a.base + "^{commit}"), git("rev-parse", a.head + "^{commit}")
    if a.head == "HEAD" and git("status", "--porcelain", "--", "bridge", "bots", "bench"):
        print("warning: uncommitted changes under bridge/ bots/ bench/ are not measured "
              "(head is the commit HEAD)", file=sys.stderr)
    drivers = drivers_diff(base, head)
    if not drivers["identical"]:
        print("warning: the bench drivers differ between base and head (each side runs its "
              "own):\n  " + "\n  ".join(drivers["numstat"]), file=sys.stderr)

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    keep = WORK / f"runs-{a.bench}-{stamp}"
    keep.mkdir(parents=True)
    trees = {"base": worktree(base, "base"), "head": worktree(head, "head")}
    imported = {side: preflight(tree) for side, tree in trees.items()}
    started = dt.datetime.now().isoformat(timespec="seconds")
    load0, busy0 = os.getloadavg(), (machine_busy(), time.monotonic())
    runs: list[dict[str, Any]] = []
    try:
        for rnd in range(a.rounds):
            for i, cell in enumerate(cells):
                order = ("base", "head") if (rnd + i) % 2 == 0 else ("head", "base")
                for side in order:
                    label = f"round {rnd + 1}/{a.rounds} {side} {' '.join(cell) or a.bench}"
                    print(f"… {label}", file=sys.stderr, flush=True)
                    name = f"r{rnd + 1}-c{i + 1}-{side}"
                    run = run_once(bench, trees[side], args, cell, keep / name)
                    run.update(side=side, round=rnd + 1, cell=list(cell))
                    if "error" in run:
                        print(f"  FAILED: {run['error']}", file=sys.stderr, flush=True)
                    runs.append(run)
    finally:
        if not a.keep_worktrees:
            for tree in trees.values():
                with contextlib.suppress(subprocess.CalledProcessError):
                    git("worktree", "remove", "--force", str(tree))

    meta = {
        "bench": a.bench, "base": base, "head": head, "rounds": a.rounds,
        "bench_args": args, "cells": [list(c) for c in cells],
        "drivers": drivers, "imported_from_own_tree": imported, "started": started,
        "finished": dt.datetime.now().isoformat(timespec="seconds"),
        "command": shlex.join(["python", "bench/compare.py", *sys.argv[1:]]),
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": list(load0), "loadavg_at_end": list(os.getloadavg()),
        # everything, these benches included: more than ~1.5 of 2 means others were busy too
        "machine_busy_cores_mean": busy_cores_since(busy0),
        "note": a.note, "raw_runs_dir": str(keep.relative_to(REPO)),
        "failed_runs": sum("error" in r for r in runs),
    }
    summary = summarise(runs)
    print_summary(summary, meta)
    path = REPO / "bench" / "results" / f"compare-{a.bench}-{dt.date.today().isoformat()}.json"
    path.write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=2) + "\n")
    print(f"written to {path.relative_to(REPO)}; raw runs in {keep.relative_to(REPO)}")
    if meta["failed_runs"]:
        print(f"{meta['failed_runs']} run(s) failed: see 'error' in the runs", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

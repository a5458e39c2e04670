"""Directory diff benchmark: the pure plan of a 100,000-person directory, no servers.

    .venv/bin/python bench/directory_diff.py [--people 100000] [--departments 50]
                                             [--repeat 3] [--quick] [--json]

Builds a synthetic :class:`DirectorySnapshot` (N people in D departments, department heads as
managers, groups: one per department, ``managers``, ``it-admins``, ``all-staff`` and project
groups), then the state a previous sync would have left: Enclave's ``known`` records and a
:class:`HomeserverView` with every account and one managed room per department (members
joined, heads at power 50 through ``managers: true``, it-admins at 100). Then 1% of people
change (half display names, a quarter department moves, a quarter disabled) and
``map_people`` + ``diff_directory`` (which calls ``desired_rooms``) are timed with
perf_counter; ``desired_rooms`` is also timed on its own.

Each measurement runs in a fresh subprocess that does only this, so its peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss``) is the diff's plus its inputs'. The RSS just before
the diff starts is reported too, and the diff's own peak: the kernel's peak-RSS mark is reset
(``/proc/self/clear_refs`` = 5) before the diff, so VmHWM afterwards is the diff's peak.
``--repeat`` runs that many subprocesses; the median time and the largest RSS are shown.
Prints figures and the targets (<= 2 s, <= 300 MB); asserts nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
sys.path.insert(0, str(REPO))
from _common import git_rev  # noqa: E402  (bench/ is on sys.path)

SERVER = "corp.example.com"
BOT = f"@enclave:{SERVER}"
TARGET_S = 2.0
TARGET_MB = 300.0
GIVEN = ("Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy",
         "Zoë", "José", "Åsa", "Łukasz", "Mei", "Ngozi", "Priya", "Sven", "Yuki")
SURNAMES = ("Smith", "Jones", "Müller", "García", "Nguyen", "Kowalski", "O'Brien", "Rossi",
            "Tanaka", "Okafor", "Dubois", "Andersson", "Singh", "Cohen", "Silva", "Novak")
TITLES = ("Engineer", "Senior Engineer", "Analyst", "Designer", "Accountant", "Consultant")
LOCATIONS = ("Berlin", "London", "Paris", "Madrid", "Warsaw", "Stockholm", "Remote")


def proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def maxrss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux


# -- the child: build, then time the diff -----------------------------------------------------

def child(n: int, n_dep: int, seed: int) -> dict[str, Any]:
    from bridge.config.directory import DirectoryConfig
    from bridge.model.people import DirectorySnapshot, Group, Person
    from bridge.policy.directory import (
        AccountState,
        HomeserverView,
        PersonRecord,
        RoomView,
        desired_rooms,
        diff_directory,
    )
    from bridge.policy.mapping import map_people

    t_build0 = time.perf_counter()
    rng = random.Random(seed)
    ids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(n)]

    def dept_of(i: int) -> int:  # 0-based person index -> 1-based department
        return i % n_dep + 1

    heads = {d: ids[d - 1] for d in range(1, n_dep + 1)}  # the first of each department
    people: list[Person] = []
    for i, pid in enumerate(ids):
        d = dept_of(i)
        given, sn = rng.choice(GIVEN), rng.choice(SURNAMES)
        head = i < n_dep
        people.append(Person(
            id=pid, username=f"user{i + 1:06d}", display_name=f"{given} {sn}",
            email=f"user{i + 1:06d}@{SERVER}",
            title="Head of Department" if head else rng.choice(TITLES),
            department=f"Department {d:02d}", location=rng.choice(LOCATIONS),
            manager=None if head else heads[d]))
    groups = [Group(id=f"dept-{d:02d}", name=f"Department {d:02d}",
                    members=frozenset(ids[i] for i in range(d - 1, n, n_dep)))
              for d in range(1, n_dep + 1)]
    groups.append(Group(id="managers", name="Department heads",
                        members=frozenset(heads.values())))
    admins = rng.sample(ids[n_dep:], 5)
    groups.append(Group(id="it-admins", name="IT", members=frozenset(admins)))
    groups.append(Group(id="all-staff", name="Everyone", members=frozenset(ids)))
    n_projects = max(1, n // 500)
    for g in range(n_projects):
        groups.append(Group(id=f"project-{g:04d}", name=f"Project {g}",
                            members=frozenset(rng.sample(ids, min(50, n)))))
    before = DirectorySnapshot.build(people, groups, source="synthetic")

    config = DirectoryConfig.model_validate({
        "source": {"type": "file", "path": "people.yaml"},
        "mapping": {"localpart_template": "{username}"},
        "managed_rooms": [{
            "id": "dept", "for_each": "department", "name": "{value}", "alias": "dept-{slug}",
            "power": [{"managers": True, "level": 50}, {"group": "it-admins", "level": 100}],
        }],
    })

    def reserved(lp: str) -> bool:
        return lp in ("enclave", "enclave-admin") or lp.startswith("_enclave_")

    def is_enclave_user(u: str) -> bool:
        return u == BOT

    # the state a previous sync left behind
    prev = map_people(before.people.values(), config.mapping, SERVER, known={},
                      reserved=reserved)
    known = {pid: PersonRecord(pid, mu.user_id, "active", mu.person.email, mu.displayname)
             for pid, mu in prev.users.items()}
    accounts = {mu.user_id: AccountState(mu.user_id, mu.displayname)
                for mu in prev.users.values()}
    accounts[BOT] = AccountState(BOT, "Enclave")
    rooms: dict[str, RoomView] = {}
    for key, d in desired_rooms(config.managed_rooms, prev.users).items():
        members = {u: "join" for u in d.members}
        members[BOT] = "join"
        rooms[key] = RoomView(
            room_id=f"!{key.replace('/', '-').replace(' ', '')}:{SERVER}", members=members,
            power_levels={"users": {BOT: 100, **d.power}, "users_default": 0,
                          "events_default": 0, "state_default": 50})
    view = HomeserverView(accounts=accounts, rooms=rooms, leaver_rooms={})
    # a sync process never holds the previous snapshot: drop it before building this one
    people = list(before.people.values())
    del prev, before
    gc.collect()

    # 1% changes (never a head): half renamed, a quarter moved, a quarter disabled
    total = max(4, round(n * 0.01))
    names, moves = total // 2, total // 4
    disabled = total - names - moves
    chosen = rng.sample(range(n_dep, n), total)
    changed = list(people)
    for k, i in enumerate(chosen):
        p = changed[i]
        if k < names:
            changed[i] = Person(**{**_fields(p), "display_name": f"Renamed Person {i}"})
        elif k < names + moves:
            d = dept_of(i) % n_dep + 1
            changed[i] = Person(**{**_fields(p), "department": f"Department {d:02d}"})
        else:
            changed[i] = Person(**{**_fields(p), "disabled": True})
    snapshot = DirectorySnapshot.build(changed, groups, source="synthetic")
    expected = {"update_account": names, "deactivate_account": disabled, "kick": moves,
                "invite": moves, "join": moves}
    known_ids = {pid: r.user_id for pid, r in known.items()}
    del people, changed
    build_s = time.perf_counter() - t_build0

    gc.collect()
    rss_before = proc_status_kb("VmRSS")
    maxrss_inputs = maxrss_kb()
    try:  # reset the peak-RSS mark: VmHWM afterwards is the diff's own peak
        Path("/proc/self/clear_refs").write_text("5")
        reset_ok = proc_status_kb("VmHWM") <= rss_before + 1024
    except OSError:
        reset_ok = False

    t0 = time.perf_counter()
    mapping = map_people(snapshot.people.values(), config.mapping, SERVER, known=known_ids,
                         reserved=reserved)
    t1 = time.perf_counter()
    plan = diff_directory(snapshot, mapping.users, known, view, config,
                          now_ms=int(time.time() * 1000), bot_user_id=BOT,
                          is_enclave_user=is_enclave_user)
    t2 = time.perf_counter()
    hwm_diff = proc_status_kb("VmHWM")
    maxrss_total = maxrss_kb()
    active = {pid: mu for pid, mu in mapping.users.items() if not mu.person.disabled}
    t3 = time.perf_counter()
    desired_rooms(config.managed_rooms, active)
    desired_s = time.perf_counter() - t3
    return {
        "people": n, "departments": n_dep, "groups": len(snapshot.groups),
        "build_inputs_s": build_s,
        "map_s": t1 - t0, "diff_s": t2 - t1, "map_plus_diff_s": t2 - t0,
        "desired_rooms_s": desired_s,
        "rss_before_diff_kb": rss_before, "maxrss_inputs_kb": maxrss_inputs,
        # clear_refs also resets ru_maxrss: the process peak is the larger of the two
        "maxrss_total_kb": max(maxrss_total, maxrss_inputs),
        "diff_peak_kb": hwm_diff if reset_ok else None,
        "diff_own_kb": (hwm_diff - rss_before) if reset_ok else None,
        "peak_reset_worked": reset_ok,
        "planned_by_kind": plan.count(), "expected_by_kind": expected,
        "plan_matches": plan.count() == expected, "findings": len(plan.findings),
        "records_to_save": len(plan.records), "refused_mappings": len(mapping.refused),
    }


def _fields(p: Any) -> dict[str, Any]:
    return {f: getattr(p, f) for f in ("id", "username", "display_name", "email", "title",
                                       "department", "location", "manager", "disabled",
                                       "groups")}


# -- the parent: fresh subprocesses, report ---------------------------------------------------

def run_child(args: argparse.Namespace) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", "--people", str(args.people),
         "--departments", str(args.departments), "--seed", str(args.seed)],
        cwd=REPO, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"child failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])




def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--people", type=int, default=100_000)
    p.add_argument("--departments", type=int, default=50)
    p.add_argument("--repeat", type=int, default=3, help="fresh subprocesses; median time")
    p.add_argument("--quick", action="store_true", help="10,000 people")
    p.add_argument("--seed", type=int, default=20_240_601)
    p.add_argument("--json", action="store_true",
                   help="also write bench/results/directory-diff-<date>-<people>.json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.people = 10_000
    if args.child:
        print(json.dumps(child(args.people, args.departments, args.seed)))
        return 0

    runs = []
    for i in range(args.repeat):
        print(f"… run {i + 1}/{args.repeat} ({args.people} people)", file=sys.stderr,
              flush=True)
        runs.append(run_child(args))
    med = {k: statistics.median(r[k] for r in runs)
           for k in ("map_s", "diff_s", "map_plus_diff_s", "desired_rooms_s", "build_inputs_s")}
    mb = 1024.0
    peak = max(r["maxrss_total_kb"] for r in runs) / mb
    before = max(r["rss_before_diff_kb"] for r in runs) / mb
    own = [r["diff_own_kb"] for r in runs if r["diff_own_kb"] is not None]
    r0 = runs[0]
    print()
    print(f"directory diff: {args.people} people, {args.departments} departments, "
          f"{r0['groups']} groups, one managed room per department; 1% changed; "
          f"median of {args.repeat} fresh processes; {os.cpu_count()} CPUs")
    print(f"{'':28} {'median':>8} {'runs':>24}")
    for k, label in (("map_s", "map_people s"), ("diff_s", "diff_directory s"),
                     ("map_plus_diff_s", "map + diff s"),
                     ("desired_rooms_s", "desired_rooms alone s"),
                     ("build_inputs_s", "(building the inputs s)")):
        print(f"{label:28} {med[k]:8.3f} {'  '.join(f'{r[k]:.3f}' for r in runs):>24}")
    print(f"{'RSS before the diff MB':28} {before:8.1f}")
    if own:
        print(f"{'diff own peak over it MB':28} {max(own) / mb:8.1f}")
    print(f"{'process peak RSS MB':28} {peak:8.1f}   (ru_maxrss; inputs alone peaked at "
          f"{max(r['maxrss_inputs_kb'] for r in runs) / mb:.1f})")
    print(f"plan: {', '.join(f'{k} {v}' for k, v in sorted(r0['planned_by_kind'].items()))}"
          f"; expected {'matched' if r0['plan_matches'] else 'NOT matched: '}"
          f"{'' if r0['plan_matches'] else r0['expected_by_kind']}; findings "
          f"{r0['findings']}, records to save {r0['records_to_save']}")
    tgts = [
        {"target": "map_people + diff_directory <= 2 s", "value": f"{med['map_plus_diff_s']:.3f} s",
         "met": med["map_plus_diff_s"] <= TARGET_S},
        {"target": "peak RSS <= 300 MB (whole process: inputs + diff)",
         "value": f"{peak:.1f} MB", "met": peak <= TARGET_MB},
    ]
    print("targets:")
    for t in tgts:
        print(f"  {'MET    ' if t['met'] else 'NOT MET'}  {t['target']}: {t['value']}")
    if args.json:
        meta = {"date": dt.datetime.now().isoformat(timespec="seconds"),
                "command": " ".join([Path(sys.executable).name, *sys.argv]),
                "cpus": os.cpu_count(), "python": platform.python_version(),
                "platform": platform.platform(), "git": git_rev(),
                "loadavg_at_end": os.getloadavg()}
        outdir = BENCH / "results"
        outdir.mkdir(exist_ok=True)
        path = outdir / f"directory-diff-{dt.date.today().isoformat()}-{args.people}.json"
        path.write_text(json.dumps({"meta": meta, "median": med, "peak_rss_mb": peak,
                                    "rss_before_diff_mb": before, "runs": runs,
                                    "targets": tgts}, indent=2))
        print(f"results written to {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

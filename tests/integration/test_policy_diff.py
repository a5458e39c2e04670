"""``enclave policy diff OLD NEW`` against a real Synapse: the rooms as the homeserver has
them, the directory view of a real sync, and two policies. The new one adds a department
barrier (existing rooms: remove) and drops a classification rule; the diff names exactly
the member who would be removed from the one mixed room and the direct chat across the
barrier, the room whose class (and so retention period) changes, and changes nothing.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from .directory_helpers import joined, members, open_sync, uid, write_config
from .harness import REPO_ROOT, Stack, subprocess_env

pytestmark = pytest.mark.integration

PEOPLE = [
    {"id": "31", "username": "rita", "display_name": "Rita Research", "department": "Research",
     "groups": ["research"]},
    {"id": "32", "username": "tom", "display_name": "Tom Trader", "department": "Trading"},
    {"id": "33", "username": "alice", "display_name": "Alice Eng", "department": "Engineering"},
]
OLD_POLICY: dict[str, Any] = {
    "room_classes": [{"id": "internal"}, {"id": "external", "allow": {"staff": True}}],
    "classify": [{"id": "cls-ext-name", "room_class": "external", "name": "^\\[EXT\\]"}],
}
NEW_POLICY: dict[str, Any] = {
    **OLD_POLICY,
    "classify": [],
    "barriers": [{"id": "barrier-research-trading", "existing": "remove",
                  "between": [{"groups": ["research"]},
                              {"attributes": {"department": ["Trading"]}}]}],
}


def retention(tmp_path: Path) -> dict[str, Any]:
    return {"archive": {"path": str(tmp_path / "archive")}, "default": {"keep": "1y"},
            "classes": [{"id": "keep-external", "room_class": "external", "keep": "30d"}]}


async def make_room(stack: Stack, creator: str, name: str | None, *others: str,
                    direct: bool = False) -> str:
    body: dict[str, Any] = {"preset": "private_chat", "invite": list(others)}
    if name is not None:
        body["name"] = name
    if direct:  # as Element opens a direct chat
        body.update(preset="trusted_private_chat", is_direct=True)
    room = (await stack.hs("POST", "/_matrix/client/v3/createRoom", body,
                           as_user=creator))["room_id"]
    for u in others:
        await stack.hs("POST", f"/_matrix/client/v3/rooms/{urllib.parse.quote(room)}/join",
                       {}, as_user=u)
    return room


def policy_diff(old: Path, new: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", "policy", "diff", str(old), str(new), *args],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)


async def test_policy_diff_names_the_removed_member_and_the_reclassified_room(
        stack: Stack, tmp_path: Path) -> None:
    (tmp_path / "directory.yaml").write_text(yaml.safe_dump({"people": PEOPLE}))
    old = write_config(stack, tmp_path, {"source": {"type": "file", "path": "directory.yaml"},
                                         "interval_minutes": 0})
    cfg = yaml.safe_load(old.read_text())
    cfg["policy"] = OLD_POLICY
    cfg["retention"] = retention(tmp_path)
    old.write_text(yaml.safe_dump(cfg, sort_keys=False))
    new = tmp_path / "new.yaml"
    new.write_text(yaml.safe_dump({**cfg, "policy": NEW_POLICY}, sort_keys=False))

    async with open_sync(old) as sync:  # the directory view: who is staff, in which group
        first = await sync.run()
    assert first.ok, first.failed
    rita, tom, alice = uid("rita"), uid("tom"), uid("alice")
    mixed = await make_room(stack, rita, "Research and trading", tom, alice)
    ext = await make_room(stack, alice, "[EXT] Vendor talk", rita)
    lunch = await make_room(stack, alice, "Lunch", tom)
    dm = await make_room(stack, rita, None, tom, direct=True)

    done = await asyncio.to_thread(policy_diff, old, new, "--format", "json")
    assert done.returncode == 0, done.stderr
    d = orjson.loads(done.stdout)
    assert d["rooms"] >= 3 and d["changed"] is True
    # the mixed room and the direct chat between the two sides; Tom leaves both (his own
    # membership, as reconciliation does for a local user)
    assert sorted((r["room_id"], r["user"], r["rule_id"]) for r in d["removed"]) == sorted([
        (mixed, tom, "barrier-research-trading"), (dm, tom, "barrier-research-trading")])
    assert {r["room_id"]: r["room_class"] for r in d["removed"]} == {mixed: "internal",
                                                                      dm: "dm"}
    assert [(c["room_id"], c["old_class"], c["old_rule"], c["new_class"], c["new_rule"])
            for c in d["class_changes"]] == [
        (ext, "external", "cls-ext-name", "internal", "default_class")]
    assert [(c["room_id"], c["old"], c["new"]) for c in d["retention_changes"]] == [
        (ext, "30 days by keep-external (retention.classes[0], class)",
         "1 year by retention.default (retention.default, default)")]
    assert d["no_longer_removed"] == [] and d["standing_changes"] == []
    assert lunch not in done.stdout

    text = await asyncio.to_thread(policy_diff, old, new)
    assert text.returncode == 0, text.stderr
    assert (f"  {tom} from {mixed} (Research and trading) [internal] by "
            "barrier-research-trading") in text.stdout
    assert (f"  {ext} ([EXT] Vendor talk): external (cls-ext-name) -> internal "
            "(default_class)") in text.stdout
    assert "nothing was changed" in text.stdout
    # --exit-code for CI: 1 when something would change, 0 for the same policy
    assert (await asyncio.to_thread(policy_diff, old, new, "--exit-code")).returncode == 1
    same = await asyncio.to_thread(policy_diff, old, old, "--exit-code")
    assert same.returncode == 0, same.stdout + same.stderr
    assert "no change for current rooms" in same.stdout

    # nothing was applied: Tom is still in the mixed room and the direct chat
    assert joined(await members(stack, mixed)) == {rita, tom, alice}
    assert joined(await members(stack, dm)) == {rita, tom}

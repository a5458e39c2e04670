"""The ``retention:`` section: good configs parse; every problem names its path and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config import ConfigError, parse_config
from bridge.config.models import EnclaveConfig
from bridge.config.retention import RetentionConfig

BASE = """\
homeserver:
  url: http://127.0.0.1:8008
  server_name: corp.example.com
appservice:
  public_url: http://127.0.0.1:29330
  as_token:
    file: secrets/as_token
  hs_token:
    env: ENCLAVE_HS_TOKEN
"""
# lines 10-13
POLICY = """\
policy:
  room_classes:
    - id: internal
    - id: external
"""


def parse(text: str) -> EnclaveConfig:
    return parse_config(BASE + text, source="test.yaml")


def problems_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        parse(text)
    return ei.value.problems


@pytest.mark.parametrize(
    ("text", "check"),
    [
        pytest.param("", lambda c: c.retention is None, id="absent"),
        pytest.param(
            "retention: {}\n",
            lambda c: c.retention.default.keep_ms == 365 * 86_400_000
            and c.retention.dms.id == "retention-dms" and c.retention.dms.keep_ms is not None
            and c.retention.archive.keep_ms is None and c.retention.media.keep is None
            and c.retention.archive.path == Path("var/archive")
            and c.retention.purge.window_events == 5000 and c.retention.adjust_power == 50,
            id="defaults",
        ),
        pytest.param(
            POLICY + "retention:\n  classes:\n"
            "    - {id: r-int, room_class: internal, keep: 2y, adjustable_by: moderators,"
            " min: 30d, max: forever, archive_keep: forever}\n"
            "    - {id: r-ext, room_class: external, keep: 12h}\n",
            lambda c: [k.keep_ms for k in c.retention.classes] == [730 * 86_400_000,
                                                                    12 * 3_600_000]
            and c.retention.classes[0].min_ms == 30 * 86_400_000
            and c.retention.classes[0].max_ms is None
            and c.retention.classes[0].archive_keep_ms is None,
            id="classes-known-to-policy",
        ),
        pytest.param(
            "retention:\n  classes: [{id: r1, room_class: anything, keep: 1w}]\n",
            lambda c: c.retention.classes[0].room_class == "anything",
            id="no-policy-no-class-check",
        ),
        pytest.param(
            "retention:\n  media: {keep: forever}\n  archive: {path: /srv/archive}\n",
            lambda c: c.retention.media.keep == "forever" and c.retention.media.keep_ms is None
            and c.retention.archive.path == Path("/srv/archive"),
            id="media-forever-vs-null",
        ),
        pytest.param(
            "retention:\n  dms: {keep: 90d, adjustable_by: moderators, min: 90d, max: 90d}\n",
            lambda c: c.retention.dms.min_ms == c.retention.dms.keep_ms == c.retention.dms.max_ms,
            id="bounds-inclusive",
        ),
        pytest.param(
            "retention:\n  visibility: {text: 'Kept {period} {{not a field}}', notice: topic}\n",
            lambda c: c.retention.visibility.notice == "topic", id="escaped-braces",
        ),
    ],
)
def test_good(text: str, check) -> None:
    assert check(parse(text))


# (text, expected problem prefix "at PATH (line N)", words in the message)
@pytest.mark.parametrize(
    ("text", "where", "words"),
    [
        pytest.param(
            POLICY + "retention:\n  classes:\n"
            "    - {id: r-int, room_class: internal, keep: 2y}\n"
            "    - {id: r-x, room_class: secret, keep: 2y}\n",
            "retention.classes[1].room_class (line 17)", ["'secret'", "internal, external"],
            id="unknown-class",
        ),
        pytest.param(
            POLICY + "retention:\n  classes:\n"
            "    - id: r-x\n      keep: 2y\n      room_class: nope\n",
            "retention.classes[0].room_class (line 18)", ["'nope'"],
            id="unknown-class-line-of-key",
        ),
        pytest.param(
            "retention:\n  classes:\n"
            "    - {id: r1, room_class: a, keep: 60d, min: 90d, max: 30d}\n",
            "retention.classes[0].max (line 12)", ["shorter than min"], id="min-above-max",
        ),
        pytest.param(
            "retention:\n  classes:\n    - {id: r1, room_class: a, keep: 10d, min: 30d}\n",
            "retention.classes[0].keep (line 12)", ["shorter than min"], id="keep-below-min",
        ),
        pytest.param(
            "retention:\n  dms:\n    keep: forever\n    max: 3650d\n",
            "retention.dms.keep (line 12)", ["longer than max"], id="keep-above-max-forever",
        ),
        pytest.param(
            "retention:\n  dms: {keep: 30d, min: forever}\n",
            "retention.dms.min (line 11)", ["cannot be 'forever'"], id="min-forever",
        ),
        pytest.param(
            "retention:\n  default: {keep: 90 days}\n",
            "retention.default.keep (line 11)", ["'90 days' is not a duration"],
            id="bad-duration-words",
        ),
        pytest.param(
            "retention:\n  default: {keep: 90}\n",
            "retention.default.keep (line 11)", ["bare number has no unit"],
            id="bad-duration-number",
        ),
        pytest.param(
            "retention:\n  archive:\n    keep: 0d\n",
            "retention.archive.keep (line 12)", ["longer than zero"], id="zero-duration",
        ),
        pytest.param(
            "retention:\n  media: {keep: 3mo}\n",
            "retention.media.keep (line 11)", ["not a duration"], id="bad-unit",
        ),
        pytest.param(
            "retention:\n  classes:\n"
            "    - {id: r1, room_class: a, keep: 2y, archive_keep: 1y}\n",
            "retention.classes[0].archive_keep (line 12)", ["shorter than keep"],
            id="archive-shorter-than-keep",
        ),
        pytest.param(
            "retention:\n  classes:\n    - {id: r1, room_class: dm, keep: 1y}\n",
            "retention.classes[0].room_class (line 12)", ["retention.dms"], id="dm-class",
        ),
        pytest.param(
            "retention:\n  classes:\n    - {id: r1, room_class: a, keep: 1y}\n"
            "    - {id: r1, room_class: b, keep: 1y}\n",
            "retention.classes[1].id (line 13)", ["already used at retention.classes[0].id"],
            id="duplicate-id",
        ),
        pytest.param(
            "retention:\n  classes:\n    - {id: retention-dms, room_class: a, keep: 1y}\n",
            "retention.classes[0].id (line 12)", ["already used at retention.dms.id"],
            id="id-of-dms",
        ),
        pytest.param(
            "retention:\n  classes:\n    - {id: retention.default, room_class: a, keep: 1y}\n",
            "retention.classes[0].id (line 12)", ["reserved"], id="reserved-id",
        ),
        pytest.param(
            "retention:\n  classes:\n    - {id: r1, room_class: a, keep: 1y}\n"
            "    - {id: r2, room_class: a, keep: 2y}\n",
            "retention.classes[1].room_class (line 13)", ["already has a period"],
            id="class-twice",
        ),
        pytest.param(
            "retention:\n  classes:\n    - {id: r1, room_class: a, keep: 1y,"
            " adjustable_by: admins}\n",
            "retention.classes[0].adjustable_by (line 12)", ["'nobody' or 'moderators'"],
            id="adjustable-by",
        ),
        pytest.param(
            "retention:\n  visibility:\n    text: 'Kept for {days}'\n",
            "retention.visibility.text (line 12)", ["{period}"], id="bad-placeholder",
        ),
        pytest.param(
            "retention:\n  purge: {window_events: 0}\n",
            "retention.purge.window_events (line 11)", ["greater than or equal to 1"],
            id="window-zero",
        ),
        pytest.param(
            "retention:\n  purge: {windows: 5}\n",
            "retention.purge.windows (line 11)", ["unknown key"], id="typo",
        ),
    ],
)
def test_problem_names_path_and_line(text: str, where: str, words: list[str]) -> None:
    problems = problems_of(text)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"at {where}: "), problems
    for w in words:
        assert w in problems[0], problems


def test_every_unknown_class_is_reported() -> None:
    problems = problems_of(POLICY + "retention:\n  classes:\n"
                           "    - {id: r1, room_class: a, keep: 1y}\n"
                           "    - {id: r2, room_class: internal, keep: 1y}\n"
                           "    - {id: r3, room_class: b, keep: 1y}\n")
    assert [p.split(":")[0] for p in problems] == [
        "at retention.classes[0].room_class (line 16)",
        "at retention.classes[2].room_class (line 18)",
    ]


def test_invalid_policy_reports_its_own_errors_only() -> None:
    # the class check needs a valid policy; a broken one is not blamed on retention
    problems = problems_of("policy:\n  default_class: nope\n"
                           "retention:\n  classes: [{id: r1, room_class: x, keep: 1y}]\n")
    assert len(problems) == 1 and problems[0].startswith("at policy"), problems


def test_models_are_frozen_and_strict() -> None:
    cfg = RetentionConfig.model_validate({"default": {"keep": "30d"}})
    with pytest.raises(ValueError):
        cfg.default.keep = "1d"  # type: ignore[misc]
    with pytest.raises(ValueError):
        RetentionConfig.model_validate({"purge": {"window_events": "10"}})


S3 = ("retention:\n  archive:\n    s3:\n      endpoint_url: http://127.0.0.1:8333\n"
      "      bucket: enclave-archive\n")


def test_s3_archive_config() -> None:
    cfg = parse(S3 + "      access_key_id: AKIAEXAMPLE\n"
                "      secret_access_key: {env: ENCLAVE_S3_SECRET}\n"
                "      prefix: prod/\n      lock_mode: governance\n")
    s3 = cfg.retention.archive.s3  # type: ignore[union-attr]
    assert s3 is not None and s3.bucket == "enclave-archive" and s3.prefix == "prod/"
    assert s3.lock_mode == "governance" and s3.region == "us-east-1"
    assert s3.secret_access_key is not None and s3.secret_access_key.env == "ENCLAVE_S3_SECRET"
    assert parse("retention: {}\n").retention.archive.s3 is None  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("extra", "where", "words"),
    [
        pytest.param("      secret_access_key: hunter2hunter2\n",
                     "retention.archive.s3.secret_access_key", ["never written inline"],
                     id="inline-secret"),
        pytest.param("      access_key_id: AKIAEXAMPLE\n",
                     "retention.archive.s3.secret_access_key", ["give both"], id="half-pair"),
        pytest.param("      lock_mode: legal\n", "retention.archive.s3.lock_mode",
                     ["compliance"], id="lock-mode"),
        pytest.param("      prefix: /abs\n", "retention.archive.s3.prefix", ["pattern"],
                     id="prefix"),
        pytest.param("      versioning: false\n", "retention.archive.s3.versioning",
                     ["unknown key"], id="typo"),
    ],
)
def test_s3_archive_config_problems(extra: str, where: str, words: list[str]) -> None:
    problems = problems_of(S3 + extra)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"at {where}"), problems
    for w in words:
        assert w in problems[0], problems
    assert "hunter2" not in problems[0]

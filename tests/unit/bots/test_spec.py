"""Announcement texts: variables per person, webhook fields escaped, JSON round trip."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from bots.announcements.audience import Audience
from bots.announcements.service import spec_for
from bots.announcements.spec import AnnouncementSpec, compose, fill, fill_webhook, lookup
from bots.markdown import message_content, render_html
from bridge.config.bots import AnnouncementConfig
from bridge.model.people import StaffRecord

SAM = StaffRecord("@sam:x", "2", True, "sam", "Sam Seller", department="Sales",
                  location="Berlin", title="Rep")


def test_compose_fills_person_variables_and_adds_the_ack_hint() -> None:
    spec = AnnouncementSpec(title="Update for {department}",
                            body="Hi {first_name} ({name}, {job_title} in {location}), "
                                 "as of {date}: use {{braces}}.",
                            audience=Audience(all_staff=True), require_ack=True)
    md = compose(spec, date="Monday 5 January 2026", staff=SAM, user_id="@sam:x")
    assert md.startswith("### 📣 Update for Sales\n\n")
    assert "Hi Sam (Sam Seller, Rep in Berlin), as of Monday 5 January 2026: use {braces}." in md
    assert md.endswith("react with ✅ or reply `!ack`._")
    # someone the directory does not know: their localpart
    assert "Hi nobody" in compose(spec, date="d", staff=None, user_id="@nobody:x")


def test_fill_leaves_unknown_names_alone() -> None:
    assert fill("{name} {unknown} {{x}}", {"name": "A"}) == "A {unknown} {x}"


def test_webhook_fields_are_filled_and_escaped() -> None:
    payload = {"alert": {"name": "Disk *full*", "hosts": ["db1", "db2"]},
               "link": "[click](javascript:x)", "n": 3}
    out = fill_webhook("{{alert.name}} on {{ alert.hosts.1 }} ({{n}}) {{missing}} {{link}}",
                       payload)
    assert out == r"Disk \*full\* on db2 (3)  \[click\]\(javascript:x\)"
    html = render_html(out)
    assert "<em>" not in html and "<a " not in html
    assert lookup(payload, "alert.hosts.5") is None
    # a payload cannot smuggle a {name} variable in
    assert "{name}" not in fill(fill_webhook("{{x}}", {"x": "{name}"}), {"name": "SECRET"})


def test_spec_json_round_trip_and_from_config() -> None:
    cfg = AnnouncementConfig.model_validate({
        "id": "policy", "title": "Policy", "body": "Read it, {name}",
        "audience": {"department": ["Sales"]}, "require_ack": True,
        "reminders": {"after": "1d", "count": 2, "escalate_to_manager": True},
        "expires_after": "7d",
        "schedule": {"cron": "0 9 * * mon", "timezone": "Europe/Berlin"}})
    spec = spec_for(cfg)
    assert spec.reminder_after_ms == 86_400_000 and spec.reminder_count == 2
    assert spec.escalate and spec.expires_after_ms == 7 * 86_400_000
    assert spec.timezone == "Europe/Berlin" and spec.personal
    assert AnnouncementSpec.from_json(spec.to_json()) == spec
    assert spec.room_identity.startswith("audience-")


def test_markdown_is_rendered_and_raw_html_escaped() -> None:
    c = message_content("**Hi** <script>x</script>", notice=True)
    assert c["msgtype"] == "m.notice" and c["body"] == "**Hi** <script>x</script>"
    assert c["formatted_body"] == "<p><strong>Hi</strong> &lt;script&gt;x&lt;/script&gt;</p>"


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"body": "Hi {name}", "delivery": {"mode": "room"}}, "need delivery mode 'dm'"),
        ({"body": "Hi {nmae}"}, "unknown variable"),
        ({"reminders": {"after": "1d"}}, "reminders need require_ack"),
        ({"schedule": {"cron": "61 * * * *"}}, "not a cron expression"),
        ({"schedule": {"cron": "0 9 * * *", "at": "2026-01-01T09:00"}}, "exactly one"),
        ({"schedule": {"at": "tomorrow"}}, "not an ISO date-time"),
        ({"schedule": {"cron": "0 9 * * *", "timezone": "Mars/Olympus"}}, "unknown time zone"),
        ({"audience": {}}, "an audience needs"),
        ({"audience": {"users": ["sam"]}}, "not a Matrix user id"),
        ({"require_ack": True, "reminders": {"after": "soon"}}, "not a duration"),
    ],
)
def test_config_errors(patch: dict, message: str) -> None:
    base = {"id": "x", "title": "T", "body": "B", "audience": {"all_staff": True}}
    with pytest.raises(ValidationError, match=message):
        AnnouncementConfig.model_validate({**base, **patch})

"""Webhook authentication and rate limiting (the route itself: integration test)."""

from __future__ import annotations

from bots.announcements.webhooks import TokenBucket, sign, verify_signature, verify_token


def test_hmac_signature_of_exactly_the_body() -> None:
    body = b'{"name": "x"}'
    good = sign("s3cret", body)
    assert good.startswith("sha256=") and len(good) == 7 + 64
    assert verify_signature("s3cret", body, good)
    assert verify_signature("s3cret", body, good[7:])  # bare hex
    assert verify_signature("s3cret", body, good.upper().replace("SHA256=", "sha256="))
    assert not verify_signature("s3cret", body + b" ", good)
    assert not verify_signature("other", body, good)
    assert not verify_signature("s3cret", body, None)
    assert not verify_signature("s3cret", body, "sha256=")


def test_bearer_token() -> None:
    assert verify_token("tok", "Bearer tok")
    assert not verify_token("tok", "Bearer toke")
    assert not verify_token("tok", "tok")
    assert not verify_token("tok", None)


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    b = TokenBucket(per_minute=6, burst=2)  # one every 10 s
    assert b.take(100.0) == 0 and b.take(100.0) == 0
    wait = b.take(100.0)
    assert 9.9 < wait <= 10.0
    assert b.take(105.0) > 0  # half a token
    assert b.take(110.1) == 0

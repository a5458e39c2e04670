"""check_hs_token: how the homeserver authenticates to Enclave."""

from __future__ import annotations

import orjson
import pytest

from bridge.matrix.appservice import check_hs_token

TOKEN = "hs-token-0123456789"


@pytest.mark.parametrize(
    ("authorization", "query", "expected"),
    [
        pytest.param(None, None, (401, "M_UNAUTHORIZED"), id="no-credentials"),
        pytest.param(f"Bearer {TOKEN}", None, None, id="header-only"),
        pytest.param(None, TOKEN, None, id="query-only"),
        pytest.param(f"Bearer {TOKEN}", TOKEN, None, id="both-equal"),
        pytest.param(f"bearer {TOKEN}", None, None, id="scheme-case-insensitive"),
        pytest.param(f"Bearer   {TOKEN}  ", None, None, id="extra-spaces"),
        pytest.param("Bearer wrong", None, (403, "M_FORBIDDEN"), id="wrong-header"),
        pytest.param(None, "wrong", (403, "M_FORBIDDEN"), id="wrong-query"),
        pytest.param(f"Bearer {TOKEN}", "other", (403, "M_FORBIDDEN"), id="disagree"),
        pytest.param("Bearer other", TOKEN, (403, "M_FORBIDDEN"), id="disagree-header-wrong"),
        pytest.param("Bearer wrong", "wrong", (403, "M_FORBIDDEN"), id="both-equal-but-wrong"),
        pytest.param(f"Basic {TOKEN}", None, (401, "M_UNAUTHORIZED"), id="non-bearer-scheme"),
        pytest.param(TOKEN, None, (401, "M_UNAUTHORIZED"), id="no-scheme"),
        pytest.param("Bearer ", None, (401, "M_UNAUTHORIZED"), id="empty-bearer"),
        pytest.param("Bearer", None, (401, "M_UNAUTHORIZED"), id="bare-bearer"),
        pytest.param("Bearer    ", None, (401, "M_UNAUTHORIZED"), id="blank-bearer"),
        pytest.param(f"Basic {TOKEN}", TOKEN, None, id="non-bearer-header-query-ok"),
        pytest.param(None, "", (403, "M_FORBIDDEN"), id="empty-query"),
        pytest.param(f"Bearer {TOKEN}x", None, (403, "M_FORBIDDEN"), id="prefix-match"),
        pytest.param(f"Bearer {TOKEN[:-1]}", None, (403, "M_FORBIDDEN"), id="truncated"),
        pytest.param("Bearer hs-tökén", None, (403, "M_FORBIDDEN"), id="non-ascii"),
        pytest.param([f"Bearer {TOKEN}", "Bearer wrong"], None, (401, "M_UNAUTHORIZED"),
                     id="two-headers-right-first"),
        pytest.param(["Bearer wrong", f"Bearer {TOKEN}"], None, (401, "M_UNAUTHORIZED"),
                     id="two-headers-right-last"),
        pytest.param([f"Bearer {TOKEN}"] * 2, None, (401, "M_UNAUTHORIZED"),
                     id="two-equal-headers"),
        pytest.param(None, [TOKEN, "wrong"], (401, "M_UNAUTHORIZED"), id="two-query-tokens"),
        pytest.param([f"Bearer {TOKEN}"], [TOKEN], None, id="one-of-each-as-lists"),
        pytest.param([], [], (401, "M_UNAUTHORIZED"), id="empty-lists"),
    ],
)
def test_check_hs_token(authorization: str | list[str] | None, query: str | list[str] | None,
                        expected: tuple[int, str] | None) -> None:
    resp = check_hs_token(authorization, query, TOKEN.encode())
    if expected is None:
        assert resp is None
        return
    assert resp is not None
    assert (resp.status, resp.content_type) == (expected[0], "application/json")
    body = orjson.loads(resp.body)
    assert body["errcode"] == expected[1]
    assert isinstance(body["error"], str) and body["error"]
    assert TOKEN not in body["error"]

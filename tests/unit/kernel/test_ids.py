"""The parts of a Matrix id: the first ":" splits localpart and server (which may carry a port)."""

from __future__ import annotations

import pytest

from bridge.kernel.ids import localpart_of, server_of


@pytest.mark.parametrize(("mxid", "local", "server"), [
    ("@alice:corp.example.com", "alice", "corp.example.com"),
    ("@alice:corp.example.com:8448", "alice", "corp.example.com:8448"),
    ("@a.b=c/d:127.0.0.1:8008", "a.b=c/d", "127.0.0.1:8008"),
    ("!abc:corp.example.com", "!abc", "corp.example.com"),
    ("!v12roomidwithoutserver", "!v12roomidwithoutserver", ""),
    ("@nocolon", "nocolon", ""),
])
def test_parts(mxid: str, local: str, server: str) -> None:
    assert server_of(mxid) == server
    if mxid.startswith("@"):
        assert localpart_of(mxid) == local

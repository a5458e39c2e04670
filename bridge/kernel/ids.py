"""Matrix identifiers: the parts of a user id (``@localpart:server``) and of a room id with
a server part (``!opaque:server``; room version 12 ids have none). The localpart cannot
contain ``:``, so the first ``:`` splits the two (the server part may carry a port)."""

from __future__ import annotations


def localpart_of(user_id: str) -> str:
    """The localpart of a user id, without the sigil (``@alice:corp`` → ``alice``)."""
    return user_id[1:].partition(":")[0] if user_id[:1] == "@" else user_id.partition(":")[0]


def server_of(matrix_id: str) -> str:
    """The server part of a user or room id ("" when there is none, as in a v12 room id)."""
    return matrix_id.partition(":")[2]

"""An inbox handler for the console test: a message whose body is ``park me`` always
fails, so the inbox parks it and the console can requeue it."""

from __future__ import annotations

from typing import Any

from bridge.matrix.inbox import FunctionHandler


def factory(services: Any) -> FunctionHandler:
    async def handle(event: dict[str, Any], meta: Any) -> list[Any]:
        content = event.get("content") or {}
        if event.get("type") == "m.room.message" and content.get("body") == "park me":
            raise RuntimeError("console test: this event always fails")
        return []

    return FunctionHandler("console-park", handle)

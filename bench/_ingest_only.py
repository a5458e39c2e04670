"""Analysis variant for bench/ingest.py: Enclave with its InboxProcessor never started.

    .venv/bin/python bench/ingest.py --servers enclave-sqlite enclave-postgres \\
        --enclave-launcher bench/_ingest_only.py --drain-timeout 0.1

Shows what the HTTP endpoint + durable inbox cost on their own (events stay pending), to
separate ingest from processing. Not how Enclave runs: never compare it against targets.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bridge.matrix.inbox import InboxProcessor


async def _not_started(self: InboxProcessor) -> None:
    return None


InboxProcessor.start = _not_started  # type: ignore[method-assign]

from bridge.cli import main  # noqa: E402

sys.exit(main(["run", "-c", sys.argv[1]]))

"""The one rule for a CSV cell a spreadsheet will not run as a formula (CSV injection).

Every CSV Enclave writes (the export's ``messages.csv``, the console's audit download, the
announcement reports) passes its cells through :func:`csv_cell`.
"""

from __future__ import annotations

import re
from typing import Any

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# a Matrix id in the spec's grammar holds no parenthesis, quote, pipe or bang: it cannot
# carry a function call, so it stays readable (``@alice:corp.test``, not ``'@alice:...``)
_MATRIX_ID = re.compile(r"^[@!#$][A-Za-z0-9._=\-/+]+:[A-Za-z0-9.\-\[\]:]+$")


def csv_cell(value: Any) -> str:
    """``value`` as a safe CSV cell: None is empty; text starting like a formula (``= + -
    @``, tab, CR) gets a leading ``'``, except a well-formed Matrix id."""
    text = "" if value is None else str(value)
    if text.startswith(_FORMULA_START) and not _MATRIX_ID.match(text):
        return "'" + text
    return text

"""The one CSV-injection guard every CSV Enclave writes uses."""

from __future__ import annotations

import pytest

from bridge.kernel.spreadsheet import csv_cell


@pytest.mark.parametrize(("cell", "out"), [
    ("=HYPERLINK(\"x\")", "'=HYPERLINK(\"x\")"), ("=1+1", "'=1+1"), ("+1", "'+1"),
    ("-1", "'-1"), ("@SUM(A1)", "'@SUM(A1)"), ("\tx", "'\tx"), ("\rx", "'\rx"),
    # a well-formed Matrix id stays readable; anything that only looks like one does not
    ("@alice:corp.test", "@alice:corp.test"), ("!room:corp.test", "!room:corp.test"),
    ("@a(1):x", "'@a(1):x"), ("@cmd|' /C calc'!A0", "'@cmd|' /C calc'!A0"),
    ("plain", "plain"), (None, ""), (42, "42"),
])
def test_csv_cells(cell: object, out: str) -> None:
    assert csv_cell(cell) == out

"""CSV files as users make them: Excel's UTF-8 byte-order mark, ``;`` or tab separators, spaces after
the commas, CRLF line ends. Every CSV histodistill reads (MIL labels, slide lists) goes through
`read_table`, so each of them accepts the same files and explains a header it cannot use.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

from histodistill.errors import UserError

DELIMITERS = (",", ";", "\t")
_NAMES = {",": "comma", ";": "semicolon", "\t": "tab"}


@dataclass
class Table:
    """Rows as dicts keyed by the stripped header names; ``delimiter`` is the one that was read."""

    path: Path
    header: list[str]
    rows: list[dict[str, str]]
    delimiter: str
    lines: list[int]  # the line each row ends on in the file, 1-based, for messages

    def how_read(self) -> str:
        """``read as comma-separated with header ['case_id', 'slide_id']``: for messages about the header."""
        return f"read as {_NAMES[self.delimiter]}-separated with header {self.header}"


def sniff_delimiter(header_line: str) -> str:
    """The separator of a CSV, from its header line: whichever of , ; tab occurs most (comma on a tie
    or when none does, i.e. a one-column file)."""
    counts = {d: header_line.count(d) for d in DELIMITERS}
    best = max(DELIMITERS, key=lambda d: counts[d])  # max keeps the first (the comma) on ties
    return best if counts[best] else ","


def read_table(path: str | os.PathLike, what: str, required: tuple[str, ...] = ()) -> Table:
    """Read ``path``; ``what`` names it in messages (``"labels CSV"``); ``required`` columns must exist.

    Values and header names are stripped of surrounding spaces; rows that are entirely empty are skipped.
    Raises `UserError` for a missing or non-UTF-8 file, an empty one, or missing columns (saying how
    the header was read).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        # utf-8-sig drops Excel's byte-order mark (and reads files without one the same).
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f'{what} {path} is not UTF-8 text: save it as "CSV UTF-8" (Excel) or UTF-8') from None
    first = next((line for line in text.splitlines() if line.strip()), None)
    if first is None:
        raise UserError(
            f"{what} {path} is empty: it needs a header line"
            + (f" with {','.join(required)}" if required else "")
        )
    delimiter = sniff_delimiter(first)
    # newline="": the csv module itself handles CRLF, also inside quoted fields.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, skipinitialspace=True)
    records = [
        ([cell.strip() for cell in record], reader.line_num)
        for record in reader
        if any(cell.strip() for cell in record)
    ]
    header, body = records[0][0], records[1:]
    table = Table(
        path,
        header,
        [dict(zip(header, record, strict=False)) for record, _ in body],
        delimiter,
        [line for _, line in body],
    )
    missing = [c for c in required if c not in header]
    if missing:
        raise UserError(
            f"{what} {path} lacks column(s) {missing} ({table.how_read()}): its header must include "
            f"{','.join(required)}"
        )
    for row in table.rows:
        for column in header:
            row.setdefault(column, "")  # short rows: missing trailing cells are empty
    return table

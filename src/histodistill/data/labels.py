"""Class labels as users write them in CSVs: one spelling per class, no missing values, counts said aloud.

Every CSV label column histodistill trains or evaluates on (`histodistill.data.bags.read_labels`, the
`CsvDataset` manifest, `probe --labels`) goes through `clean_labels`:

- a missing label (empty, ``NA``, ``N/A``, ``NaN``, ``null``, ``None``, ``-``, ``?``) is refused, naming
  its lines: training on it as a class of its own would be silently wrong;
- numerically equal spellings are one class, written canonically (``1.0`` and ``1`` are ``1``,
  ``0.50`` is ``0.5``): a spreadsheet that saved some rows as floats must not make a 4-class task of a
  binary one;
- labels that differ only in case (``tumor`` / ``Tumor``) are refused, naming both spellings: they are
  almost always one class, but which spelling is meant is the user's call.

`class_order` sorts classes (numerically when all are numbers) and `describe_classes` is the line
printed before training: each class with its count.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from histodistill.errors import UserError

MISSING = frozenset({"", "na", "n/a", "#n/a", "nan", "null", "none", "-", "?"})


def _lines(lines: Sequence[int]) -> str:
    shown = ", ".join(str(line) for line in lines[:8])
    return shown + (f" and {len(lines) - 8} more" if len(lines) > 8 else "")


def _number(label: str) -> float | None:
    try:
        value = float(label)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def canonical(label: str) -> str:
    """One spelling per number (``1.0``, ``01``, ``1e0`` -> ``1``; ``0.50`` -> ``0.5``); text as it is."""
    value = _number(label)
    if value is None:
        return label
    return str(int(value)) if value.is_integer() else repr(value)


def clean_labels(labels: Sequence[str], lines: Sequence[int], source: str) -> list[str]:
    """``labels`` (one per row, stripped) in their `canonical` spelling; ``lines`` are the rows' CSV line
    numbers and ``source`` names the file in messages (``labels CSV x.csv``).

    Raises `UserError` naming the lines of missing labels, or both spellings of labels that differ only
    in case.
    """
    missing = [line for label, line in zip(labels, lines, strict=True) if label.lower() in MISSING]
    if missing:
        raise UserError(
            f"{source}: {len(missing)} row(s) have no label (empty or NA) on line(s) {_lines(missing)}: "
            "give every row a label, or remove those rows"
        )
    cleaned = [canonical(label) for label in labels]
    spellings: dict[str, Counter] = {}
    for label in cleaned:
        spellings.setdefault(label.casefold(), Counter())[label] += 1
    clashes = [counts for counts in spellings.values() if len(counts) > 1]
    if clashes:
        shown = "; ".join(
            " vs ".join(f"{name!r} ({n} rows)" for name, n in sorted(counts.items())) for counts in clashes
        )
        raise UserError(
            f"{source}: labels that differ only in case: {shown}; they would be separate classes: "
            "write each class one way (or rename one if they really are different classes)"
        )
    return cleaned


def class_order(labels: Sequence[str] | set[str]) -> list[str]:
    """Distinct labels sorted numerically when every one is a number (``2`` before ``10``), else
    alphabetically, so ``1`` / ``positive`` / ``tumor`` comes after ``0`` / ``negative`` / ``normal`` and is
    the positive class."""
    distinct = set(labels)
    if all(_number(label) is not None for label in distinct):
        return sorted(distinct, key=float)
    return sorted(distinct)


def describe_classes(labels: Sequence[str], unit: str, source: str) -> str:
    """``labels.csv: 2 classes: 0 (12 slides), 1 (8 slides)``: the line said before training on ``labels``."""
    counts = Counter(labels)
    classes = class_order(counts)
    listed = ", ".join(f"{name} ({counts[name]} {unit})" for name in classes)
    return f"{source}: {len(classes)} classes: {listed}"

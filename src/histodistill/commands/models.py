"""List every registered pathology foundation model: what it gives and what it needs.

  histodistill models           name, embedding, dim, input px, mpp, gated, what to install, hub repository

The table is histodistill.models.foundation.FOUNDATION_MODELS; docs/models.md gives its sources.
"""

from __future__ import annotations

import argparse

HELP = "list the registered pathology foundation models: embedding and its dim, input size, mpp, gated, needs"
COLUMNS = ("name", "embedding", "dim", "input", "mpp", "gated", "needs", "hub")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def rows() -> list[tuple[str, ...]]:
    """One row of `COLUMNS` per registered foundation model, in the table's order."""
    from histodistill.models.foundation import FOUNDATION_MODELS

    gated = {True: "yes", False: "no", None: "?"}
    return [
        (
            m.name,
            m.embedding,
            str(m.dim),
            f"{m.preprocess.input_size} px",
            str(m.preprocess.mpp),
            gated[m.gated],
            m.requires or "-",
            m.hub_id or (m.weights_file or "-"),
        )
        for m in FOUNDATION_MODELS
    ]


def run(args: argparse.Namespace) -> None:
    table = [COLUMNS, *rows()]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS) - 1)]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])
    print(
        "\ngated: accept the terms on the model's Hugging Face page and log in (hf auth login); '?': see the "
        "card. "
        'needs: histodistill[hf] = pip install "histodistill[hf]"; conch, musk: the authors\' packages, '
        "which histodistill lists but does not build. Sources: docs/models.md"
    )

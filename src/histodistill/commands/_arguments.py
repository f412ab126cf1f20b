"""Argument types shared by the subcommands (a module, not a command: its name starts with ``_``)."""

from __future__ import annotations

import argparse
from pathlib import Path


def output_folder(value: str) -> str:
    """``type=`` of an ``--out`` folder: an existing file there is refused while the arguments are parsed,
    before any work (otherwise the first ``mkdir`` deep inside a stage fails with a traceback)."""
    if Path(value).exists() and not Path(value).is_dir():
        raise argparse.ArgumentTypeError(f"{value} is a file, not a folder: pass a folder to write into")
    return value

"""What every benchmark script shares: the machine description, a fair timer, and where results go.

Each `benchmarks/<name>.py` measures one thing and calls `write_section(name, markdown)`, which
writes `docs/benchmarks/<name>.md`; `benchmarks/run_all.py` runs them all and assembles
`docs/benchmarks.md`. Figures are ratios against a baseline measured in the same run, so they
stay meaningful across machines; the machine is recorded beside them.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS_DIR = ROOT / "docs" / "benchmarks"


def machine_description() -> str:
    """CPU model and core count, the CPU kernels torch runs (its instruction set), memory, torch version and
    accelerator, in one line.

    The instruction set is there because it changes results, not only speed: the same seeded MoMA benchmark
    trains a teacher of balanced accuracy 0.799 with oneDNN's AVX-512 kernels and 0.853 with its AVX2 ones
    (docs/benchmarks/moma.md), and "AMD EPYC" alone does not say which a host had.
    """
    import torch

    from histodistill.features.throughput import cpu_model

    cpu = cpu_model()
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    kernels = torch.backends.cpu.get_cpu_capability()
    if os.environ.get("ONEDNN_MAX_CPU_ISA"):  # a cap that get_cpu_capability does not see
        kernels += f" (oneDNN capped at {os.environ['ONEDNN_MAX_CPU_ISA']})"
    return (
        f"{cpu}, {os.cpu_count()} cores, {kernels} kernels, {memory_gib:.0f} GiB RAM, {device}, "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1, sync: bool = False) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs (CUDA-synchronised if
    asked)."""
    import torch

    def once() -> float:
        if sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(warmup):
        once()
    return statistics.median(once() for _ in range(repeats))


def mean_sd(values: list[float]) -> str:
    """``0.812 ± 0.015`` (sample sd; ``± 0`` for a single value)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


PART = "<!-- part: "  # starts a part of a section that a script writes on its own (`write_part`)


def write_section(name: str, title: str, body: str, command: str | None = None) -> Path:
    """Write one benchmark's results (with machine and date) to ``docs/benchmarks/<name>.md``; the parts
    that `write_part` wrote into it stay after them. ``command``: what measured them (default
    ``python benchmarks/<name>.py``)."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = command or f"python benchmarks/{name}.py"
    header = f"## {title}\n\n_Machine: {machine_description()}. Measured {stamp} by `{command}`._"
    text = f"{header}\n\n{body.strip()}\n"
    path = SECTIONS_DIR / f"{name}.md"
    old = path.read_text() if path.is_file() else ""
    parts = old[old.index(PART) :] if PART in old else ""
    return _write(path, text + ("\n" + parts if parts else ""), text)


def write_part(name: str, key: str, title: str, command: str, body: str) -> Path:
    """Write (or replace) the part ``key`` of ``docs/benchmarks/<name>.md``: a ``###`` subsection with its
    own machine and date, measured by ``command``; the rest of the file stays as it was."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    marker = f"{PART}{key} -->"
    block = (
        f"{marker}\n### {title}\n\n_Machine: {machine_description()}. Measured {stamp} by `{command}`._\n\n"
        f"{body.strip()}\n"
    )
    path = SECTIONS_DIR / f"{name}.md"
    old = path.read_text() if path.is_file() else ""
    if marker in old:
        start = old.index(marker)
        following = old.find(PART, start + len(marker))
        new = old[:start] + block + ("\n" + old[following:] if following >= 0 else "")
    else:
        new = old + ("\n" if old else "") + block
    return _write(path, new, block)


def _write(path: Path, text: str, shown: str) -> Path:
    from histodistill.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(text)
    print(shown)
    return path

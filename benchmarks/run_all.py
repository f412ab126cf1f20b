"""Run every benchmark script and assemble docs/benchmarks.md from their sections.

    python benchmarks/run_all.py            # run all, then assemble
    python benchmarks/run_all.py --assemble # only re-assemble from docs/benchmarks/*.md

Each script writes its own section (docs/benchmarks/<name>.md) with the machine and date, so a
section can be refreshed alone (`python -m benchmarks.<name>`) and the page re-assembled.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, SECTIONS_DIR  # noqa: E402

# The order sections appear in: the pipeline's order.
ORDER = ("tiling", "extract", "sdmae", "moma", "mcmkd", "mil", "distill", "gpu", "demo")


def scripts() -> list[str]:
    found = {p.stem for p in (ROOT / "benchmarks").glob("*.py")} - {"__init__", "common", "run_all"}
    return sorted(found, key=lambda name: (ORDER.index(name) if name in ORDER else len(ORDER), name))


def assemble() -> Path:
    sections = sorted(
        SECTIONS_DIR.glob("*.md"),
        key=lambda p: (ORDER.index(p.stem) if p.stem in ORDER else len(ORDER), p.stem),
    )
    intro = (
        "# Benchmarks\n\n"
        "Every figure here is produced by a script in `benchmarks/` and is a ratio against a baseline\n"
        "measured in the same run, or a quality score with its spread; each section names the machine it\n"
        "ran on. Regenerate everything with `python benchmarks/run_all.py`, or one section with\n"
        "`python -m benchmarks.<name>` followed by `python benchmarks/run_all.py --assemble`.\n"
    )
    text = intro + "".join("\n" + path.read_text() for path in sections)
    target = ROOT / "docs" / "benchmarks.md"
    target.write_text(text)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--assemble", action="store_true", help="only assemble docs/benchmarks.md from the sections"
    )
    parser.add_argument(
        "--only", nargs="*", default=None, help="run only these benchmark scripts (names without .py)"
    )
    args = parser.parse_args()
    failed = []
    if not args.assemble:
        for name in args.only or scripts():
            print(f"== benchmarks/{name}.py", flush=True)
            if subprocess.call([sys.executable, "-m", f"benchmarks.{name}"], cwd=ROOT) != 0:
                failed.append(name)
    print(f"wrote {assemble()}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

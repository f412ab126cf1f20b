"""Run every benchmark script and assemble docs/benchmarks.md from their sections.

    python benchmarks/run_all.py              # run all that need no demo, then assemble
    python benchmarks/run_all.py --demo DIR   # and those that read a finished `histodistill demo --out DIR`
    python benchmarks/run_all.py --assemble   # only re-assemble from docs/benchmarks/*.md

Each script writes its own section (docs/benchmarks/<name>.md) with the machine and date, so a
section can be refreshed alone (`python -m benchmarks.<name>`) and the page re-assembled.

Which modules are scripts (those with a ``__main__`` block) and what each needs (its own `add_argument`
calls) is read from their source, so a new script or helper needs no list here: a script with a ``--demo``
option is given run_all's ``--demo DIR``, and without it is skipped with a line that says how to run it; a
script with another required option (``--teacher``...) is skipped the same way.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, SECTIONS_DIR  # noqa: E402

# The order sections appear in: the pipeline's order.
ORDER = ("tiling", "extract", "sdmae", "moma", "mcmkd", "mil", "distill", "gpu", "demo")


def scripts() -> list[str]:
    """The benchmark scripts, in page order: the modules of benchmarks/ that run as a program (a top-level
    ``if __name__ == "__main__":``), this one excepted; the helpers they share (common, tuning_slides) have
    none."""
    found = {
        path.stem
        for path in (ROOT / "benchmarks").glob("*.py")
        if path.stem != "run_all" and _runs_as_script(path)
    }
    return sorted(found, key=lambda name: (ORDER.index(name) if name in ORDER else len(ORDER), name))


def _runs_as_script(path: Path) -> bool:
    return any(
        isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'"
        for node in ast.parse(path.read_text()).body
    )


def options(script: Path) -> dict[str, bool]:
    """``{"--demo": True, "--work": False, ...}``: the options ``script`` declares with ``add_argument``, each
    with whether it is required (a literal ``required=True``), read from its source without running it."""
    found = {}
    for node in ast.walk(ast.parse(script.read_text())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "add_argument"
        ):
            required = any(
                keyword.arg == "required"
                and isinstance(keyword.value, ast.Constant)
                and keyword.value.value is True
                for keyword in node.keywords
            )
            for arg in node.args:
                if isinstance(arg, ast.Constant) and str(arg.value).startswith("--"):
                    found[arg.value] = required
    return found


def command(name: str, demo: Path | None) -> tuple[list[str] | None, str]:
    """How run_all runs ``benchmarks/<name>.py`` (the argv), or ``None`` and why it cannot."""
    declared = options(ROOT / "benchmarks" / f"{name}.py")
    argv = [sys.executable, "-m", f"benchmarks.{name}"]
    needs = [option for option, required in declared.items() if required and option != "--demo"]
    if needs:
        usage = " ".join(f"{option} {option[2:].upper()}" for option in needs)
        return None, (
            f"it needs {', '.join(needs)}, which run_all cannot give it: "
            f"run `python -m benchmarks.{name} {usage}` (see its docstring)"
        )
    if "--demo" in declared:
        if demo is None:
            return None, (
                "it reads a finished demo: run `python benchmarks/run_all.py --demo DIR` (or "
                f"`python -m benchmarks.{name} --demo DIR`), DIR a `histodistill demo --out DIR` folder"
            )
        argv += ["--demo", str(demo)]
    return argv, ""


def assemble() -> Path:
    sections = sorted(
        SECTIONS_DIR.glob("*.md"),
        key=lambda p: (ORDER.index(p.stem) if p.stem in ORDER else len(ORDER), p.stem),
    )
    intro = (
        "# Benchmarks\n\n"
        "Every figure here is produced by a script in `benchmarks/` and is a ratio against a baseline\n"
        "measured in the same run, or a quality score with its spread; each section names the machine it\n"
        "ran on. Regenerate everything with `python benchmarks/run_all.py --demo DIR`, DIR a finished\n"
        "`histodistill demo --out DIR` that the scripts with a `--demo` option read (without `--demo` they\n"
        "are skipped, each with a line saying how to run it), or one section with\n"
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
    parser.add_argument(
        "--demo",
        type=Path,
        default=None,
        help="a finished `histodistill demo --out DIR` folder, given to the scripts that read one "
        "(those with a --demo option); without it they are skipped, each with a line",
    )
    args = parser.parse_args()
    if args.demo is not None and not args.demo.is_dir():
        parser.error(
            f"--demo {args.demo}: no such folder; give a finished `histodistill demo --out DIR` folder"
        )
    unknown = sorted(set(args.only or []) - set(scripts()))
    if unknown:
        parser.error(f"--only {' '.join(unknown)}: no such script; choose from {', '.join(scripts())}")
    plan = {name: command(name, args.demo) for name in ([] if args.assemble else args.only or scripts())}
    if args.only:  # asked for by name: a script that cannot run is an error before any work, not a skip
        for name, (argv, why) in plan.items():
            if argv is None:
                parser.error(f"--only {name}: {why}")
    failed, skipped = [], []
    for name, (argv, why) in plan.items():
        if argv is None:
            print(f"== skipped benchmarks/{name}.py: {why}", flush=True)
            skipped.append(name)
            continue
        print(f"== benchmarks/{name}.py", flush=True)
        if subprocess.call(argv, cwd=ROOT) != 0:
            failed.append(name)
    print(f"wrote {assemble()}")
    if skipped:
        print(f"skipped (see above): {', '.join(skipped)}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Run demo stages in order, each once: a finished stage leaves ``<out>/<stage>/stage.json`` and is
skipped next time, so an interrupted demo resumes where it stopped.

A stage is a function ``(DemoContext) -> dict`` returning a short summary (numbers worth printing).
The runner times each stage and writes ``<out>/timings.json`` for the report.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from histodistill.errors import UserError
from histodistill.io import write_json


@dataclass(frozen=True)
class DemoContext:
    out: Path
    quick: bool  # the smoke run: every stage on a slice of the data
    device: str  # "cpu" or "cuda"
    overwrite: bool
    # Every size the results depend on (slides, epochs, ...: `histodistill.demo.stages.SIZES`), recorded
    # with each finished stage.
    sizes: Mapping[str, float] = field(default_factory=dict)

    def stage_dir(self, name: str) -> Path:
        path = self.out / name
        path.mkdir(parents=True, exist_ok=True)
        return path


@dataclass(frozen=True)
class Stage:
    name: str
    description: str
    run: Callable[[DemoContext], dict]


def _record_path(context: DemoContext, stage: Stage) -> Path:
    return context.out / stage.name / "stage.json"


def read_record(path: Path) -> dict:
    """A finished stage's record (``<out>/<stage>/stage.json``). One that cannot be read leaves its stage's
    state unknown: refused (`UserError`, with the fix), rather than taken as finished or silently run again."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict) or not {"summary", "seconds"} <= record.keys():
        raise UserError(f"{path} is not a readable stage record: delete it to run that stage again, or pass "
                        "--overwrite to run every stage again")
    return record


def run_stages(stages: list[Stage], context: DemoContext, log: Callable[[str], None] = print) -> dict[str, dict]:
    """Run (or skip) every stage; returns ``{stage: record}`` with each record's summary and seconds.

    Raises `UserError` before any stage runs when ``context.out`` holds finished stages of other sizes
    (``--quick`` vs the full demo, or sizes of an earlier version): skipping them would mix two runs'
    results in one report; and when a stage's folder is a file or its record unreadable."""
    check_stage_folders(stages, context)
    # Each finished stage's record, read once: checked here, reused when the stage is skipped.
    finished = {} if context.overwrite else {stage.name: read_record(_record_path(context, stage))
                                             for stage in stages if _record_path(context, stage).exists()}
    check_same_size(finished, context)
    context.out.mkdir(parents=True, exist_ok=True)
    records: dict[str, dict] = {}
    for index, stage in enumerate(stages, 1):
        record_path = _record_path(context, stage)
        header = f"[{index}/{len(stages)}] {stage.name}: {stage.description}"
        if stage.name in finished:
            records[stage.name] = finished[stage.name]
            log(f"{header} (done before, skipped)")
            continue
        log(header)
        # Written before each stage, so a stage (the report) sees the timings of the ones before it.
        write_json(context.out / "timings.json", {name: rec["seconds"] for name, rec in records.items()})
        start = time.perf_counter()
        summary = stage.run(context)
        record = {"summary": summary, "seconds": round(time.perf_counter() - start, 2), "quick": context.quick,
                  "sizes": dict(context.sizes)}
        write_json(record_path, record)
        records[stage.name] = record
        log(f"    done in {record['seconds']:.1f} s: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
    write_json(context.out / "timings.json", {name: rec["seconds"] for name, rec in records.items()})
    return records


def check_stage_folders(stages: list[Stage], context: DemoContext) -> None:
    """Refuse a file standing where a stage writes its folder (its first ``mkdir`` would fail mid-run)."""
    if files := [context.out / stage.name for stage in stages if (context.out / stage.name).is_file()]:
        raise UserError(f"{files[0]} is a file where the demo writes its {files[0].name} stage: move it away, "
                        "or use another --out")


def check_same_size(records: dict[str, dict], context: DemoContext) -> None:
    """Refuse to resume into finished stages (``{stage: record}``) recorded with another ``quick`` or other
    ``sizes`` than this run's (a record without sizes predates them, so it cannot be trusted to match)."""
    other_kind = [name for name, record in records.items() if record.get("quick", context.quick) != context.quick]
    if other_kind:
        made, asked = ("the full demo", "--quick") if context.quick else ("--quick", "the full demo")
        raise UserError(f"{context.out} holds stages finished by {made} ({', '.join(other_kind)}), and this run is {asked}: "
                        f"resuming would skip them and mix both in one report. Use another --out, or --overwrite "
                        "to run every stage again")
    other_sizes = [name for name, record in records.items() if record.get("sizes") != dict(context.sizes)]
    if other_sizes:
        recorded = records[other_sizes[0]].get("sizes") or "none (an earlier version)"
        raise UserError(f"{context.out} holds stages finished with other sizes than this run's ({', '.join(other_sizes)}: "
                        f"recorded {recorded}, now {dict(context.sizes)}): resuming would skip them and mix both in "
                        "one report. Use another --out, or --overwrite to run every stage again")


def format_timings(records: dict[str, dict]) -> str:
    width = max(len(name) for name in records)
    lines = [f"  {name:<{width}}  {rec['seconds']:7.1f} s" for name, rec in records.items()]
    total = sum(rec["seconds"] for rec in records.values())
    return "\n".join([*lines, f"  {'total':<{width}}  {total:7.1f} s"])

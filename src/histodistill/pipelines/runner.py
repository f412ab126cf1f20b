"""Run a pipeline's stages in order, each once: a finished stage leaves ``<out>/<stage>/stage.json`` and is
skipped next time (after its outputs are verified), so an interrupted pipeline resumes where it stopped;
the stages after one that runs again run again too.

Shared by the demo (`histodistill.demo`) and `histodistill distill` (`histodistill.pipelines.distill`).
A stage is a function ``(context) -> dict`` returning a short summary (numbers worth printing). Its record
holds the summary, its wall time and every setting of the run; a folder finished with other values of the
settings a stage's outputs depend on (`Stage.settings`) is refused before any stage runs, naming the setting
that differs. The runner writes
``<out>/timings.json`` (seconds per stage) for the report.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from histodistill.errors import UserError
from histodistill.io import write_json

RECORD = "stage.json"
TIMINGS = "timings.json"


class StageContext(Protocol):
    """What the runner needs of a pipeline's context (the pipeline adds its own fields)."""

    out: Path
    overwrite: bool

    @property
    def settings(self) -> Mapping[str, Any]: ...  # every setting the outputs depend on, JSON values


@dataclass(frozen=True)
class Stage:
    """One step. ``settings``: the keys of the context's settings its outputs depend on, the ones a resume
    must match (None: all of them);
    ``verify(context)``: why a recorded stage's outputs cannot be trusted (None when they can), e.g. a file
    deleted since; such a stage runs again."""

    name: str
    description: str
    run: Callable[[Any], dict]
    settings: tuple[str, ...] | None = None
    verify: Callable[[Any], str | None] | None = None


def record_path(out: Path, stage: str) -> Path:
    return out / stage / RECORD


def read_record(path: Path) -> dict:
    """A finished stage's record (``<out>/<stage>/stage.json``). One that cannot be read leaves its stage's
    state unknown: refused (`UserError`, with the fix), rather than taken as finished or silently run
    again."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict) or not {"summary", "seconds"} <= record.keys():
        raise UserError(
            f"{path} is not a readable stage record: delete it to run that stage again, or pass "
            "`overwrite=True` to run every stage again"
        )
    return record


def run_stages(
    stages: list[Stage], context: StageContext, log: Callable[[str], None] = print
) -> dict[str, dict]:
    """Run (or skip) every stage; returns ``{stage: record}`` with each record's summary, seconds and
    settings.

    Raises `UserError` before any stage runs when ``context.out`` holds a stage finished with other settings
    (`check_settings`), a stage's folder is a file, or a record is unreadable."""
    check_stage_folders(stages, context.out)
    # Each finished stage's record, read once: checked here, reused when the stage is skipped.
    finished = (
        {}
        if context.overwrite
        else {
            stage.name: read_record(record_path(context.out, stage.name))
            for stage in stages
            if record_path(context.out, stage.name).exists()
        }
    )
    check_settings(stages, finished, context)
    context.out.mkdir(parents=True, exist_ok=True)
    records: dict[str, dict] = {}
    ran = False  # once a stage runs, every later one runs too: its inputs may have changed
    for index, stage in enumerate(stages, 1):
        header = f"[{index}/{len(stages)}] {stage.name}: {stage.description}"
        problem = stage.verify(context) if stage.name in finished and stage.verify and not ran else None
        if stage.name in finished and problem is None and not ran:
            records[stage.name] = finished[stage.name]
            log(f"{header} (done before, skipped)")
            continue
        log(header + (f" (recorded as done, but {problem}: running it again)" if problem else ""))
        if not ran:  # this stage and every later one run: the later ones' records describe older inputs, and
            # one left behind by an interruption would be skipped next time
            for later in stages[index:]:
                record_path(context.out, later.name).unlink(missing_ok=True)
        # Written before each stage, so a stage (the report) sees the timings of the ones before it.
        write_json(context.out / TIMINGS, {name: rec["seconds"] for name, rec in records.items()})
        start, ran = time.perf_counter(), True
        summary = stage.run(context)
        # all of them: what the run was
        record = {
            "summary": summary,
            "seconds": round(time.perf_counter() - start, 2),
            "settings": dict(context.settings),
        }
        write_json(record_path(context.out, stage.name), record)
        records[stage.name] = record
        log(f"    done in {record['seconds']:.1f} s: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
    write_json(context.out / TIMINGS, {name: rec["seconds"] for name, rec in records.items()})
    return records


def check_stage_folders(stages: list[Stage], out: Path) -> None:
    """Refuse a file standing where a stage writes its folder (its first ``mkdir`` would fail mid-run)."""
    if files := [out / stage.name for stage in stages if (out / stage.name).is_file()]:
        raise UserError(
            f"{files[0]} is a file where the {files[0].name} stage writes its folder: move it away, "
            "or use another `out=...`"
        )


def check_settings(stages: list[Stage], records: Mapping[str, dict], context: StageContext) -> None:
    """Refuse to resume into a finished stage (``{stage: record}``) recorded with other settings than this
    run's: skipping it would mix two runs' results. Names the first setting that differs, in stage order.
    A stage that declares its settings is compared on those alone (a record holds every setting, and one of an
    earlier version may hold settings since retired); one that declares none (None) on every key of either
    side."""
    for stage in stages:
        if stage.name not in records:
            continue
        path = record_path(context.out, stage.name)
        recorded, now = records[stage.name].get("settings"), dict(context.settings)
        if recorded is None:
            raise UserError(
                f"{path} records no settings (an earlier version wrote it): pass `overwrite=True` to run "
                "every stage again, or another `out=...`"
            )
        keys = (
            [*now, *(key for key in recorded if key not in now)] if stage.settings is None else stage.settings
        )
        for key in keys:
            if recorded.get(key, "(unset)") != now.get(key, "(unset)"):
                raise UserError(
                    f"{key} {_shown(recorded.get(key, '(unset)'))} != {_shown(now.get(key, '(unset)'))} "
                    f"in {path} (recorded there != this run): pass `overwrite=True` to run every stage "
                    "again, or another `out=...`"
                )


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def format_timings(records: dict[str, dict]) -> str:
    width = max(len(name) for name in records)
    lines = [f"  {name:<{width}}  {rec['seconds']:7.1f} s" for name, rec in records.items()]
    total = sum(rec["seconds"] for rec in records.values())
    return "\n".join([*lines, f"  {'total':<{width}}  {total:7.1f} s"])

"""The shared stage runner: settings per stage, the setting that differs named, outputs verified."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from histodistill.errors import UserError
from histodistill.pipelines.runner import Stage, run_stages


@dataclass(frozen=True)
class Context:
    out: Path
    overwrite: bool = False
    settings: dict = field(default_factory=dict)


def _stages(calls: list[str]) -> list[Stage]:
    def make(name, settings):
        def run(context):
            calls.append(name)
            (context.out / name).mkdir(parents=True, exist_ok=True)
            (context.out / name / "out.txt").write_text(name)
            return {}

        def verify(context):
            return None if (context.out / name / "out.txt").exists() else "out.txt is missing"

        return Stage(name, name, run, settings=settings, verify=verify)

    return [make("a", ("size",)), make("b", ("steps",)), make("c", ())]


def test_a_change_of_a_setting_a_stage_declares_is_named_with_its_record(tmp_path):
    calls: list[str] = []
    run_stages(_stages(calls), Context(tmp_path, settings={"size": 1, "steps": 200}), log=lambda _: None)
    with pytest.raises(
        UserError,
        match=r"^steps 200 != 500 in .*/b/stage.json \(recorded there != this run\): "
        r"pass `overwrite=True` to run every stage again, or another `out=\.\.\.`$",
    ):
        run_stages(_stages(calls), Context(tmp_path, settings={"size": 1, "steps": 500}), log=lambda _: None)
    assert calls == ["a", "b", "c"]


def test_a_recorded_stage_whose_output_is_gone_runs_again_and_so_do_the_stages_after_it(tmp_path):
    calls: list[str] = []
    context = Context(tmp_path, settings={"size": 1, "steps": 2})
    run_stages(_stages(calls), context, log=lambda _: None)
    (tmp_path / "b" / "out.txt").unlink()
    lines: list[str] = []
    run_stages(_stages(calls), context, log=lines.append)
    assert calls == ["a", "b", "c", "b", "c"]
    assert "(done before, skipped)" in lines[0] and "out.txt is missing: running it again" in lines[1]


def test_a_stage_that_declares_its_settings_ignores_other_recorded_keys_but_not_its_own(tmp_path):
    """Records of an earlier version hold every setting with every stage: a stage that now declares fewer is
    compared on those alone, so such a folder resumes; an undeclared stage (None) still compares every key."""
    import json

    calls: list[str] = []
    old = {"size": 1, "steps": 2, "retired": "x"}
    run_stages(_stages(calls), Context(tmp_path, settings=old), log=lambda _: None)
    for name in ("a", "b", "c"):  # as the earlier version wrote them: the full settings dict
        record = json.loads((tmp_path / name / "stage.json").read_text())
        (tmp_path / name / "stage.json").write_text(json.dumps({**record, "settings": old}))
    run_stages(
        _stages(calls), Context(tmp_path, settings={"size": 1, "steps": 2, "new": 7}), log=lambda _: None
    )
    assert calls == ["a", "b", "c"]  # nothing refused, nothing ran again
    with pytest.raises(UserError, match=r"^steps 2 != 3 in .*/b/stage.json"):
        run_stages(_stages(calls), Context(tmp_path, settings={"size": 1, "steps": 3}), log=lambda _: None)
    every = [Stage("a", "a", lambda context: {})]  # declares none: every key of either side counts
    with pytest.raises(UserError, match=r"^retired x != \(unset\) in .*/a/stage.json"):
        run_stages(every, Context(tmp_path, settings={"size": 1, "steps": 2}), log=lambda _: None)


def test_an_interrupted_rerun_leaves_no_record_of_a_later_stage_to_skip_next_time(tmp_path):
    """a runs again (its output went missing); the run is killed in b: c's record, of c's run on a's earlier
    output, must not let the next run skip c."""
    calls: list[str] = []
    context = Context(tmp_path, settings={"size": 1, "steps": 2})
    run_stages(_stages(calls), context, log=lambda _: None)
    (tmp_path / "a" / "out.txt").unlink()
    stages = _stages(calls)
    stages[1] = Stage("b", "b", lambda context: 1 / 0, settings=("steps",))
    with pytest.raises(ZeroDivisionError):
        run_stages(stages, context, log=lambda _: None)
    assert not (tmp_path / "c" / "stage.json").exists()
    run_stages(_stages(calls), context, log=lambda _: None)
    assert calls == ["a", "b", "c", "a", "b", "c"]

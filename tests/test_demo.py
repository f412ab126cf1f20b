"""`histodistill demo`: stages run once, in order, resume after a failure; the whole quick chain runs."""

from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

import pytest

from histodistill.cli import main
from histodistill.demo.runner import DemoContext
from histodistill.demo.stages import recorded_sizes
from histodistill.errors import UserError
from histodistill.pipelines.runner import Stage, run_stages


def _context(tmp_path, overwrite=False) -> DemoContext:
    return DemoContext(out=tmp_path / "demo", quick=True, device="cpu", overwrite=overwrite)


def _stages(calls: list[str], fail_on: str | None = None) -> list[Stage]:
    def make(name):
        def run(context):
            calls.append(name)
            if name == fail_on:
                raise RuntimeError(f"{name} broke")
            (context.stage_dir(name) / "out.txt").write_text(name)
            return {"n": len(calls)}

        return Stage(name, f"stage {name}", run)

    return [make(name) for name in ("a", "b", "c")]


def test_stages_run_in_order_once_and_are_skipped_when_done(tmp_path):
    calls: list[str] = []
    records = run_stages(_stages(calls), _context(tmp_path), log=lambda _: None)
    assert calls == ["a", "b", "c"]
    assert list(records) == ["a", "b", "c"] and records["b"]["summary"] == {"n": 2}
    timings = json.loads((tmp_path / "demo" / "timings.json").read_text())
    assert list(timings) == ["a", "b", "c"] and all(seconds >= 0 for seconds in timings.values())
    run_stages(_stages(calls), _context(tmp_path), log=lambda _: None)
    assert calls == ["a", "b", "c"]  # nothing ran again
    run_stages(_stages(calls), _context(tmp_path, overwrite=True), log=lambda _: None)
    assert calls == ["a", "b", "c"] * 2


def test_a_failed_stage_is_not_recorded_and_the_next_run_resumes_there(tmp_path):
    calls: list[str] = []
    with pytest.raises(RuntimeError, match="b broke"):
        run_stages(_stages(calls, fail_on="b"), _context(tmp_path), log=lambda _: None)
    assert calls == ["a", "b"]
    assert not (tmp_path / "demo" / "b" / "stage.json").exists()
    run_stages(_stages(calls), _context(tmp_path), log=lambda _: None)
    assert calls == ["a", "b", "b", "c"]  # a was done; b and c run


def test_a_folder_of_the_other_size_is_refused_before_any_stage_runs(tmp_path, capsys):
    calls: list[str] = []
    run_stages(_stages(calls), _context(tmp_path), log=lambda _: None)  # a --quick run
    full = DemoContext(out=tmp_path / "demo", quick=False, device="cpu", overwrite=False)
    with pytest.raises(UserError, match=r"quick true != false in .*demo/a/stage.json"):
        run_stages(_stages(calls), full, log=lambda _: None)
    assert calls == ["a", "b", "c"]  # nothing ran, nothing was skipped into the full run
    run_stages(
        _stages(calls),
        DemoContext(out=full.out, quick=False, device="cpu", overwrite=True),
        log=lambda _: None,
    )
    assert calls == ["a", "b", "c"] * 2
    # The command: exit 2 and one line, before the samples stage (which would fetch) runs.
    out = tmp_path / "cli"
    (out / "samples").mkdir(parents=True)
    (out / "samples" / "stage.json").write_text(json.dumps({"summary": {}, "seconds": 1.0, "quick": False}))
    assert main(["demo", "--quick", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and str(out) in err[0] and "--overwrite" in err[0]


def test_a_folder_of_other_sizes_or_of_unrecorded_sizes_is_refused(tmp_path):
    calls: list[str] = []
    out = tmp_path / "demo"
    run_stages(_stages(calls), DemoContext(out, True, "cpu", False, sizes={"slides": 60}), log=lambda _: None)
    # --quick of an earlier version (60 slides) resumed by this one (20): refused, nothing runs.
    with pytest.raises(
        UserError,
        match=r"slides 60 != 20 in .*demo/a/stage.json \(recorded there != this run\): "
        r"pass `overwrite=True`",
    ):
        run_stages(
            _stages(calls), DemoContext(out, True, "cpu", False, sizes={"slides": 20}), log=lambda _: None
        )
    assert calls == ["a", "b", "c"]
    # A record written before sizes were recorded cannot be trusted to match.
    record = json.loads((out / "b" / "stage.json").read_text())
    del record["settings"]
    (out / "b" / "stage.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match=r"b/stage.json records no settings \(an earlier version wrote it\)"):
        run_stages(
            _stages(calls), DemoContext(out, True, "cpu", False, sizes={"slides": 60}), log=lambda _: None
        )
    with pytest.raises(UserError, match="does not record the demo's sizes"):
        recorded_sizes(out, "b")
    assert recorded_sizes(out, "a") == {"slides": 60}


def test_an_unreadable_record_or_a_file_in_a_stage_folders_place_is_refused_before_any_stage(tmp_path):
    calls: list[str] = []
    out = tmp_path / "demo"
    run_stages(_stages(calls), _context(tmp_path), log=lambda _: None)
    (out / "b" / "stage.json").write_text("")  # e.g. a disk that filled up under another tool
    with pytest.raises(UserError, match=r"b/stage.json is not a readable stage record: delete it"):
        run_stages(_stages(calls), _context(tmp_path), log=lambda _: None)
    assert calls == ["a", "b", "c"]
    # --overwrite reruns all
    run_stages(_stages(calls), _context(tmp_path, overwrite=True), log=lambda _: None)
    assert calls == ["a", "b", "c"] * 2
    shutil.rmtree(out / "c")
    (out / "c").write_text("not a folder")
    for overwrite in (False, True):
        with pytest.raises(UserError, match=r"/c is a file where the c stage writes its folder"):
            run_stages(_stages(calls), _context(tmp_path, overwrite=overwrite), log=lambda _: None)
    assert calls == ["a", "b", "c"] * 2


def test_a_folder_the_previous_demo_finished_resumes_into_the_distill_stage(tmp_path):
    """Records of the demo before the distill stage hold every size with every stage (no mcmkd_steps) and a
    stage `mcmkd` since retired: samples..moma are skipped, distill and every stage after it run. A change of
    a size a finished stage declares is still refused, naming it."""
    import dataclasses

    from histodistill.demo.stages import SIZES, STAGES

    out = tmp_path / "demo"
    old = {"quick": True, **{key: value for key, value in SIZES[True].items() if key != "mcmkd_steps"}}
    for name in (
        "samples",
        "data",
        "tiles",
        "sdmae",
        "mae",
        "teacher",
        "moma",
        "mcmkd",
        "features",
        "mil",
        "heatmaps",
        "report",
    ):
        (out / name).mkdir(parents=True)
        (out / name / "stage.json").write_text(json.dumps({"summary": {}, "seconds": 1.0, "settings": old}))
    calls: list[str] = []
    stages = [
        dataclasses.replace(stage, run=lambda context, name=stage.name: calls.append(name) or {})
        for stage in STAGES
    ]
    run_stages(stages, DemoContext(out, True, "cpu", False, sizes=SIZES[True]), log=lambda _: None)
    assert calls == ["distill", "features", "mil", "heatmaps", "report"]
    record = json.loads((out / "distill" / "stage.json").read_text())
    assert record["settings"] == {"quick": True, **SIZES[True]}  # every size recorded, mcmkd_steps now too
    calls.clear()
    for key, value in (("student_epochs", 2), ("mcmkd_steps", 5)):
        sizes = {**SIZES[True], key: value}
        with pytest.raises(
            UserError, match=rf"^{key} {SIZES[True][key]} != {value} in .*demo/(moma|distill)/stage.json"
        ):
            run_stages(stages, DemoContext(out, True, "cpu", False, sizes=sizes), log=lambda _: None)
    assert calls == []


def test_a_rerun_features_stage_keeps_the_tiles_per_s_measured_when_the_same_folder_was_extracted(tmp_path):
    from histodistill.demo.stages import _keep_measured_rates

    previous = tmp_path / "extractors.json"
    previous.write_text(
        json.dumps(
            {
                "kd_student": {"features_dir": "f/kd", "tiles_per_s": 150.0},
                "mae_vit": {"features_dir": "f/old_mae", "tiles_per_s": 600.0},
            }
        )
    )
    # measured now
    rows = {
        "kd_student": {"features_dir": "f/kd", "tiles_per_s": None},  # skipped: every slide done before
        "mae_vit": {"features_dir": "f/mae", "tiles_per_s": None},  # another folder: nothing to keep
        "ce_student": {"features_dir": "f/ce", "tiles_per_s": 90.0},
    }
    _keep_measured_rates(rows, previous)
    assert [row["tiles_per_s"] for row in rows.values()] == [150.0, None, 90.0]
    _keep_measured_rates(rows, tmp_path / "absent.json")  # a first run: nothing before
    assert rows["mae_vit"]["tiles_per_s"] is None


def test_cuda_without_a_gpu_is_refused_clearly(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["demo", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "--device cpu" in capsys.readouterr().err


@pytest.mark.samples
@pytest.mark.slow
def test_quick_demo_runs_the_whole_chain_and_resumes(tmp_path, sample_file, capsys):
    sample_file("cmu_small_region")  # skips unless the samples are cached
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    from histodistill.demo.stages import SIZES, STAGES, TABLE_ROWS

    for stage in STAGES:
        assert (out / stage.name / "stage.json").is_file(), stage.name
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["extractors"]
    assert [(row["label"], row["name"]) for row in rows] == list(TABLE_ROWS)  # the rows, in its order
    for row in rows:
        low, high = row["slide_auroc_ci"]
        assert 0 <= low <= row["slide_auroc"] <= high <= 1 and row["tiles_per_s"] > 0, row
        assert 0 <= row["tile_probe_auroc"] <= 1, row
    assert summary["verdict"].startswith("Distillation ")
    # MoMA and MCM-KD learn from the SD-MAE ViT: its head for logit KD, its features for MCM-KD's cache.
    assert (out / "teacher" / "head.ckpt").is_file() and list((out / "distill").glob("teacher/features_*"))
    # The demo's MCM-KD, features and slide task of teacher, un-tuned and tuned student ran in distill, once.
    from histodistill.demo.stages import DISTILLED

    extractors = json.loads((out / "features" / "extractors.json").read_text())
    assert all(Path(extractors[name]["features_dir"]).is_relative_to(out / "distill") for name in DISTILLED)
    assert not [name for name in DISTILLED if (out / "mil" / name).exists()]
    assert (out / "distill" / "report.html").is_file() and "histodistill distill` (MCM-KD" in summary[
        "verdict"
    ]
    assert "the student keeps " in summary["verdict"]
    assert all(row["parameters"] > 0 and 0 < row["probe_balanced_accuracy"] <= 1 for row in rows[:-1])
    probe = json.loads((out / "sdmae" / "run" / "probe.json").read_text())["linear_probe_balanced_accuracy"]
    assert set(probe) == {"sdmae", "random_init"} and all(1 / 3 - 0.1 < v <= 1 for v in probe.values())
    assert list(out.glob("heatmaps/*.png"))
    page = (out / "report.html").read_text()
    assert html.escape(summary["verdict"]) in page and "student (MCM-KD)" in page
    assert 'id="s-stages"' in page and 'id="s-mil"' in page and 'id="s-heatmaps"' in page
    # the report opens on the extractor table
    assert page.index('id="s-summary"') < page.index('id="s-stages"')
    assert "a smoke run of every stage" in page  # the quick table is not mistaken for a result
    assert all(
        json.loads((out / stage.name / "stage.json").read_text())["settings"]
        == {"quick": True, **SIZES[True]}
        for stage in STAGES
    )
    # Every demo_out/... path a shipped recipe or doc points users at is one the demo wrote.
    root = Path(__file__).resolve().parents[1]
    texts = [
        p.read_text()
        for p in [*root.glob("configs/**/*.yaml"), *root.glob("docs/**/*.md"), root / "README.md"]
    ]
    named = {m for text in texts for m in re.findall(r"demo_out/([\w./-]*\w)", text)}
    assert named and not [p for p in named if not (out / p).exists()]
    capsys.readouterr()
    assert main(["demo", "--quick", "--out", str(out)]) == 0  # finished stages are skipped
    assert capsys.readouterr().out.count("done before, skipped") == len(STAGES)


def test_random_control_keeps_the_checkpoints_preprocessing_with_other_weights(tmp_path):
    """Rebuilt from the timm name alone, the control of a 64-px student was exported at 224 px."""
    import torch

    from conftest import write_supervised_checkpoint
    from histodistill.demo.stages import random_init_like
    from histodistill.models.backbones import create_backbone

    checkpoint, teacher = write_supervised_checkpoint(tmp_path / "student.ckpt", backbone="tiny/resnet18-64")
    control = create_backbone(random_init_like(checkpoint, tmp_path / "control"))
    trained = teacher.backbone.spec
    assert (control.spec.name, control.spec.timm_name) == (trained.name, trained.timm_name)
    assert control.spec.preprocess == trained.preprocess and control.spec.preprocess.input_size == 64
    config = json.loads((tmp_path / "control" / "config.json").read_text())
    assert (
        config["pretrained_cfg"]["input_size"] == [3, 64, 64] and config["histodistill"]["source"] == "random"
    )
    weights = teacher.backbone.model.state_dict()
    assert not torch.equal(control.model.conv1.weight, weights["conv1.weight"])


def test_slide_task_trains_mil_on_one_thread_and_restores_the_count(tmp_path, monkeypatch):
    import types

    import torch

    import histodistill.eval.mil_cv
    import histodistill.eval.slide_task
    from histodistill.demo.slide_task import MIL_SETTINGS, run_slide_task

    seen, before = [], torch.get_num_threads()

    def cross_validate(features, labels, out, config, *, overwrite, log):
        seen.append(
            (
                torch.get_num_threads(),
                config.seeds,
                config.train.lr,
                config.val_fraction,
                config.train.early_stop,
                overwrite,
            )
        )
        return types.SimpleNamespace(runs=[out / "seed_0", out / "seed_1"])

    monkeypatch.setattr(histodistill.eval.mil_cv, "cross_validate", cross_validate)
    monkeypatch.setattr(
        histodistill.eval.slide_task, "slide_task_scores", lambda runs, tumour: {"runs": len(runs)}
    )
    torch.set_num_threads(2)
    try:
        assert run_slide_task({"a": tmp_path}, tmp_path, tmp_path / "out", 64, seeds=2, workers=1) == {
            "a": {"runs": 2}
        }
        assert seen == [(1, 2, MIL_SETTINGS["lr"], 0.2, "none", True)] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_distill_verdict_names_the_best_student_and_checks_every_target():
    from histodistill.demo.stages import STUDENTS, distill_verdict

    def row(name, auroc, rate, label=None):
        return {"name": name, "label": label or name, "slide_auroc": auroc, "tiles_per_s": rate}

    students = [row(name, 0.70, 150.0) for name in STUDENTS]
    students[2] = row(STUDENTS[2], 0.87, 150.0, "student (KD)")
    rows = [row("sdmae_vit", 0.92, 50.0, "teacher"), *students]
    verdict = distill_verdict(rows)
    assert verdict.startswith("Distillation pays") and "student (KD)" in verdict  # 0.87 >= 0.85, 95 %, 3.0x
    assert "95%" in verdict and "3.0x" in verdict
    rows[0] = row("sdmae_vit", 0.92, 100.0, "teacher")  # 1.5x: too slow a student to be worth it
    assert distill_verdict(rows).startswith("Distillation does not yet pay")
    rows[0] = row("sdmae_vit", 0.99, 50.0, "teacher")  # 88 % of the teacher
    assert distill_verdict(rows).startswith("Distillation does not yet pay")

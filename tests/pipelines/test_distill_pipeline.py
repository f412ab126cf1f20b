"""`histodistill distill`: the whole chain on semi-synthetic slides with a tiny hf-hub teacher (from a fake
hub cache, offline) and a tiny student; resume after a kill in each stage; refusals before any stage."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from histodistill.cli import main
from histodistill.errors import UserError
from histodistill.samples.synthetic_slides import Source, make_slides

TILE = 64  # the tiny teacher's input size: tiles default to it


def _sources() -> dict[str, list[Source]]:
    """Benign: pink gradients; tumour: a bluish checkerboard (as tests/samples/test_synthetic_slides.py)."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, 192)[None, :, None]
    benign = [
        np.clip(np.array([220, 130, 170]) - 40 * ramp + rng.normal(0, 2, (192, 192, 3)), 0, 255).astype(
            np.uint8
        )
        for _ in range(2)
    ]
    checker = ((np.indices((160, 160)) // 4).sum(0) % 2)[..., None]
    tumor = np.clip(np.array([90, 70, 160]) + 70 * checker, 0, 255).astype(np.uint8)
    return {"benign": [Source(f"b{i}", im) for i, im in enumerate(benign)], "tumor": [Source("t", tumor)]}


def _teacher_export(folder: Path) -> Path:
    """A tiny ViT (64 px, 192-d) saved as an export folder (config.json + model.safetensors)."""
    import torch

    from histodistill.features.export import save_backbone
    from histodistill.models.backbones import create_backbone

    torch.manual_seed(0)
    return save_backbone(create_backbone("tiny/vit-tiny-p8-64", pretrained=False), folder)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict[str, Path]:
    """8 slides (4 per class) of a 5 x 5 grid of 64-px tiles at 0.5 mpp, their labels, a tiny teacher."""
    root = tmp_path_factory.mktemp("cohort")
    labels = make_slides(
        root / "synth", n_slides=8, seed=0, tile_px=TILE, grid=5, sources=_sources(), workers=1
    )
    return {
        "slides": root / "synth" / "slides",
        "labels": labels,
        "teacher": _teacher_export(root / "tiny-vit"),
    }


@pytest.fixture
def hub_teacher(cohort, fake_hf_cache) -> str:
    """The tiny teacher as `hf-hub:lab/tiny-vit`, laid out as the hub cache holds it (offline)."""
    fake_hf_cache(
        "lab/tiny-vit", {name: cohort["teacher"] / name for name in ("config.json", "model.safetensors")}
    )
    return "hf-hub:lab/tiny-vit"


def _argv(cohort, out: Path, teacher: str, *extra: str, labels: bool = True) -> list[str]:
    return [
        "distill",
        "--teacher",
        teacher,
        "--student",
        "tiny/resnet18-64",
        "--student-random-init",
        "--slides",
        str(cohort["slides"]),
        "--out",
        str(out),
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--num-workers",
        "0",
        "--extract-batch-size",
        "32",
        "--folds",
        "2",
        "--mil-epochs",
        "2",
        "--device",
        "cpu",
        *(["--labels", str(cohort["labels"])] if labels else []),
        *extra,
    ]


STAGES = ("tiles", "teacher", "fit", "export", "features", "compare", "report")
# A shipped recipe other than the method's default, MCM-KD's targets and windows, and two MIL CV seeds (what
# the demo's distill stage sets).
TUNED = (
    "--recipe",
    "mcmkd/tiny_cpu.yaml",
    "--target-norm",
    "standardize",
    "--loss",
    "mse",
    "--window-stride",
    "2",
    "--mil-seeds",
    "2",
    "--mil-val-fraction",
    "0.25",
)


@pytest.mark.slow
def test_distill_runs_end_to_end_from_a_hub_teacher_and_resumes_after_a_kill_in_each_stage(
    cohort, hub_teacher, tmp_path, capsys, caplog, one_torch_thread
):
    out = tmp_path / "run"
    assert main(_argv(cohort, out, hub_teacher, *TUNED)) == 0
    printed = capsys.readouterr().out
    assert "starts from random weights" in printed and all(f"] {stage}:" in printed for stage in STAGES)
    assert all((out / stage / "stage.json").is_file() for stage in STAGES)
    summary = json.loads((out / "summary.json").read_text())
    for name in ("teacher", "student_untuned", "student"):
        row = summary[name]
        assert {"name", "slide_auroc", "slide_auroc_ci", "tiles_per_s", "parameters"} <= row.keys()
        low, high = row["slide_auroc_ci"]
        assert (
            0 <= low <= row["slide_auroc"] <= high <= 1 and row["tiles_per_s"] > 0 and row["parameters"] > 0
        )
    assert summary["teacher"]["name"] == hub_teacher
    assert summary["student_untuned"]["parameters"] == summary["student"]["parameters"]
    assert set(summary["retention"]) == {"value", "ci"} and len(summary["retention"]["ci"]) == 2
    assert summary["verdict"].startswith("the student keeps ") and "x its speed" in summary["verdict"]
    assert (
        summary["fit"]["steps"] == 3
        and summary["fit"]["unlabeled"]
        and summary["fit"]["student_start"] == "random"
    )
    # No second teacher pass: the teacher's slide features ARE the MCM-KD cache, and its MIL run read them.
    cache = out / "teacher" / "features_hf-hub-lab-tiny-vit"
    assert Path(summary["teacher"]["features_dir"]) == cache and (cache / "teacher_cache.json").is_file()
    assert str(cache) in (out / "compare" / "teacher" / "config.yaml").read_text()
    assert not list((out / "features").glob("*/features_hf-hub*"))
    fit_config = (out / "fit" / "run" / "config.yaml").read_text()
    assert "rebuild_cache: false" in fit_config and f"cache_dir: {out / 'teacher'}" in fit_config
    # --recipe (tiny_cpu's lr 1e-3, not resnet50_s3_p224's 1e-4) with the MCM-KD options over it.
    assert all(
        line in fit_config
        for line in ("lr: 0.001", "target_norm: standardize", "loss: mse", "window_stride: 2")
    )
    # --mil-seeds 2: two CV runs per model, on the same folds for the three (same labels, same seeds).
    splits = [
        sorted(p.read_text() for p in (out / "compare" / name / f"seed_{seed}" / "splits").glob("*.csv"))
        for seed in (0, 1)
        for name in ("teacher", "student_untuned", "student")
    ]
    assert (
        splits[0]
        and splits[:3] == [splits[0]] * 3
        and splits[3:] == [splits[3]] * 3
        and splits[0] != splits[3]
    )
    assert "val_fraction: 0.25" in (out / "compare" / "teacher" / "config.yaml").read_text()
    # Exported as a timm local-dir with its model card; the un-tuned student is literally the start weights.
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in (out / "export").iterdir()}
    page = (out / "report.html").read_text()
    assert (
        "the student keeps" in page
        and "data:image/png;base64" in page
        and "unlabeled, as the paper does" in page
    )

    # Run again: every stage verified and skipped.
    assert main(_argv(cohort, out, hub_teacher, *TUNED)) == 0
    assert capsys.readouterr().out.count("done before, skipped") == len(STAGES)

    # A kill mid-stage: its record never written, a half-written temporary left, finished files kept. The
    # rerun completes it (the teacher cache resumes slide by slide, the fit from its last.ckpt) and every
    # stage after.
    (cache / "teacher_cache.json").unlink()
    (cache / "synth_001.h5").unlink()
    (cache / ".synth_001.x1y2.tmp.h5").write_bytes(b"half")
    (out / "teacher" / "stage.json").unlink()
    caplog.clear()
    assert main(_argv(cohort, out, hub_teacher, *TUNED)) == 0
    assert capsys.readouterr().out.count("done before, skipped") == 1  # tiles only
    assert "Restored all states from the checkpoint" in caplog.text  # the fit resumed from its last.ckpt
    assert (
        all((out / s / "stage.json").is_file() for s in STAGES) and (cache / "teacher_cache.json").is_file()
    )
    assert json.loads((out / "summary.json").read_text())["fit"]["steps"] == 3  # resumed, not trained further
    # The last stage killed after its summary was removed: only it runs again.
    (out / "summary.json").unlink()
    (out / "report" / "stage.json").unlink()
    assert main(_argv(cohort, out, hub_teacher, *TUNED)) == 0
    assert capsys.readouterr().out.count("done before, skipped") == len(STAGES) - 1
    assert (out / "summary.json").is_file()
    # A recorded stage whose output went missing is run again (verified before it is skipped).
    (out / "export" / "model.safetensors").unlink()
    assert main(_argv(cohort, out, hub_teacher, *TUNED)) == 0
    assert "model.safetensors is missing: running it again" in capsys.readouterr().out
    assert (out / "export" / "model.safetensors").is_file()

    # Other settings: refused before any stage, naming the setting and the record.
    assert main(_argv(cohort, out, hub_teacher, *TUNED, "--steps", "5")) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert errors == [
        f"error: steps 3 != 5 in {out / 'fit' / 'stage.json'} (recorded there != this run): pass "
        "--overwrite to run every stage again, or another --out"
    ]
    assert main(_argv(cohort, out, hub_teacher, *TUNED[:-4], "--mil-seeds", "3")) == 2
    assert f"error: mil_seeds 2 != 3 in {out / 'compare' / 'stage.json'}" in capsys.readouterr().err


@pytest.mark.slow
def test_without_labels_it_reports_feature_agreement_on_held_out_slides(
    cohort, tmp_path, capsys, one_torch_thread
):
    out = tmp_path / "run"
    assert main(_argv(cohort, out, str(cohort["teacher"]), "--holdout", "0.25", labels=False)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teacher"]["slide_auroc"] is None and summary["retention"] == {"value": None, "ci": None}
    assert summary["agreement"]["slides"] == "held_out" and -1 <= summary["agreement"]["student_cosine"] <= 1
    assert summary["teacher"]["feature_cka"] == pytest.approx(1.0)
    assert summary["fit"]["slides_held_out"] == 2 and summary["fit"]["slides_fit"] == 6
    # Read by library callers and CLI users alike (summary.json, the report): both spellings of the setting.
    assert "slide labels (`labels` / `--labels`) are needed for the AUROC comparison" in summary["verdict"]
    assert "tiles of the held-out slides;" in summary["verdict"]
    held_out = json.loads((out / "fit" / "held_out.json").read_text())
    fit_config = (out / "fit" / "run" / "config.yaml").read_text()
    assert len(held_out) == 2 and all(
        f"- {slide}" in fit_config.split("exclude_slides:")[1] for slide in held_out
    )


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_input_is_refused_with_one_line_before_any_stage(cohort, tmp_path, capsys):
    teacher = str(cohort["teacher"])
    out = tmp_path / "run"
    other = tmp_path / "other.csv"
    other.write_text("case_id,slide_id,label\nc1,nope,a\nc2,slide_001,b\n")
    thin = tmp_path / "thin.csv"
    with open(cohort["labels"]) as handle:
        rows = list(csv.DictReader(handle))
    thin.write_text(
        "case_id,slide_id,label\n"
        + "".join(f"{r['case_id']},{r['slide_id']},{r['label']}\n" for r in rows[:3])
    )
    cases = {
        "hf-hub:lab/not-cached": ("--teacher", "hf-hub:lab/not-cached"),
        "no-such-net": ("--student", "no-such-net"),
        "are not among the 8 slides": ("--labels", str(other)),
        "too few cases per class": ("--labels", str(thin)),
        "--patch-labels DIR_OR_CSV": ("--method", "moma"),
        "no such file or folder": ("--teacher-weights", str(tmp_path / "missing.bin")),
        "--recipe nope.yaml: neither a recipe under": ("--recipe", "nope.yaml"),
        "--recipe moma/tiny_cpu.yaml fits histodistill.methods.moma.MoMA, not "
        "histodistill.methods.mcmkd.MCMKD: "
        "pass a recipe of --method mcmkd": ("--recipe", "moma/tiny_cpu.yaml"),
        "--target-norm is MCM-KD's: drop it for --method moma": (
            "--method",
            "moma",
            "--target-norm",
            "standardize",
        ),
        "--window-stride 0: must be positive": ("--window-stride", "0"),
        "--mil-seeds 0: must be at least 1": ("--mil-seeds", "0"),
        "--mil-val-fraction 1.0: must be in [0, 1)": ("--mil-val-fraction", "1"),
        "--mil-lr 0.0: must be positive": ("--mil-lr", "0"),
        "--mil-workers 0: must be at least 1": ("--mil-workers", "0"),
    }
    for expected, pairs in cases.items():
        argv = _argv(cohort, out, teacher)
        for option, value in zip(pairs[::2], pairs[1::2], strict=True):
            if option in argv:
                argv[argv.index(option) + 1] = value
            else:
                argv += [option, value]
        assert main(argv) == 2, expected
        assert expected in _one_error_line(capsys)
        assert not out.exists(), expected  # nothing ran, nothing was written


def test_a_python_caller_is_told_the_parameters_not_the_flags(tmp_path):
    """The library speaks Python (issue 31): `distill` names `steps=0`, the command renders --steps 0."""
    from histodistill.errors import ConfigError
    from histodistill.pipelines.distill import DistillConfig, prepare

    with pytest.raises(ConfigError, match=r"^`steps=0`: must be at least 1$"):
        prepare(DistillConfig(teacher="t", student="s", out=tmp_path / "out", steps=0))
    with pytest.raises(UserError, match=r"^pass `slides=FOLDER` \(slides to tile\), or `coords=\.\.\.`"):
        prepare(DistillConfig(teacher="t", student="s", out=tmp_path / "out"))


def test_the_verdict_names_a_setting_for_python_callers_and_cli_users_alike():
    # The verdict is report text (summary.json, report.html, the log), not an error the CLI renders: it names
    # each setting both ways, never a bare flag that a Python caller cannot pass.
    from histodistill.pipelines.distill_compare import _verdict

    results = {"student_cosine": 0.71, "tiles": 500, "slides": "all", "models": {}}
    verdict = _verdict(results, 8.0, labelled=False)
    assert verdict == (
        "the student runs at 8x the teacher's speed and its features agree with the teacher's at cosine 0.71 "
        "on 500 tiles of the fit slides (hold slides out of the fit with `holdout` / `--holdout` to measure "
        "on unseen ones); slide labels (`labels` / `--labels`) are needed for the AUROC comparison"
    )
    held_out = _verdict(results | {"slides": "held_out"}, 8.0, labelled=False)
    assert "on 500 tiles of the held-out slides;" in held_out and "holdout" not in held_out


def test_the_command_shows_the_pipelines_lines_with_its_flags(tmp_path, capsys, monkeypatch):
    # The pipeline logs in Python (`coords=...`), as a library caller passed it; the command prints its flags.
    import histodistill.pipelines.distill as pipeline

    def fake_distill(config, log=print):
        log(f"`coords={config.coords}`: 3 slide(s); the teacher t expects 0.5 mpp")
        log("the teacher t records no mpp: tiles at 0.5 mpp (pass `mpp=...` to choose)")

    monkeypatch.setattr(pipeline, "distill", fake_distill)
    coords = tmp_path / "tiles"
    argv = [
        "distill",
        "--teacher",
        "t",
        "--student",
        "s",
        "--out",
        str(tmp_path / "run"),
        "--coords",
        str(coords),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"--coords {coords}: 3 slide(s)" in out and "(pass --mpp to choose)" in out and "`" not in out


def test_clam_coords_with_slides_are_described_cached_and_cut_into_windows(cohort, tmp_path, capsys):
    import h5py

    from histodistill.data.context_windows import context_windows_of_dir
    from histodistill.pipelines.distill import DistillConfig, _mcmkd_overrides, cache_teacher, prepare
    from histodistill.wsi.coords import read_coords
    from histodistill.wsi.tiling import tile_slide

    clam = tmp_path / "clam" / "patches"
    clam.mkdir(parents=True)
    slides = sorted(cohort["slides"].glob("*.tif"))[:3]
    for (
        path
    ) in slides:  # our tiles of 3 slides, rewritten as create_patches_fp writes them: no mpp, no slide path
        tile_slide(path, tmp_path / "tiles", target_mpp=0.5, patch_size=TILE)
        coords, _ = read_coords(tmp_path / "tiles" / "patches" / f"{path.stem}.h5")
        with h5py.File(clam / f"{path.stem}.h5", "w") as handle:
            handle["coords"] = coords
            handle["coords"].attrs.update(
                patch_size=TILE, patch_level=0, downsample=np.array([1.0, 1.0]), name=path.stem
            )
    argv = _argv(cohort, tmp_path / "run", str(cohort["teacher"]), "--coords", str(clam.parent), labels=False)
    without_slides = argv[: argv.index("--slides")] + argv[argv.index("--slides") + 2 :]
    assert main(without_slides) == 2  # CLAM coords name no slide
    assert "pass --slides DIR" in _one_error_line(capsys)

    config = DistillConfig(
        teacher=str(cohort["teacher"]),
        student="tiny/resnet18-64",
        student_random_init=True,
        out=tmp_path / "run",
        coords=clam.parent,
        slides=cohort["slides"],
        device="cpu",
        num_workers=0,
    )
    lines = []
    context = prepare(config, log=lines.append)
    assert context.slide_ids == tuple(path.stem for path in slides) and context.slides_dir == cohort["slides"]
    described = [line for line in lines if line.startswith(f"`coords={clam.parent}`: ")]  # not a CLI flag
    assert (
        len(described) == 1
        and "3 slide(s); synth_000.h5: tiles of 64 px = 64 level-0 px at level 0 (mpp unknown)"
        in described[0]
    )
    assert "the teacher " in described[0] and " expects " in described[0]
    overrides = _mcmkd_overrides(context)  # the fit finds the slides too
    assert overrides[overrides.index("--data.init_args.slides_dir") + 1] == str(cohort["slides"])
    summary = cache_teacher(context)  # stage 2 reads the tiles through --slides
    cache = Path(summary["features_dir"])
    assert sorted(path.stem for path in cache.glob("*.h5")) == list(context.slide_ids)
    theirs = context_windows_of_dir(clam, cache, side=3, slides_dir=context.slides_dir)
    ours = context_windows_of_dir(tmp_path / "tiles" / "patches", cache, side=3)
    assert len(theirs) == len(ours) > 0
    for index in (0, len(ours) - 1):
        for mine, other in zip(theirs[index], ours[index], strict=True):
            assert torch.equal(mine, other)


def _summary(labelled: bool = True) -> dict:
    """summary.json as the report stage writes it (the contract), for a cohort of 40 slides."""

    def row(name, auroc, ci, rate, params):
        return {
            "name": name,
            "slide_auroc": auroc if labelled else None,
            "slide_auroc_ci": ci if labelled else None,
            "balanced_accuracy": 0.8 if labelled else None,
            "tiles_per_s": rate,
            "forward_tiles_per_s": rate * 2,
            "parameters": params,
            "projected_hours": round(1e8 / rate / 3600, 1),
            "features_dir": "f",
        }

    return {
        "teacher": row("pathology/uni", 0.9, [0.82, 0.96], 300.0, 303_000_000),
        "student_untuned": row("resnet18 (start: imagenet)", 0.8, [0.7, 0.88], 2400.0, 11_000_000),
        "student": row("resnet18 (MCM-KD)", 0.87, [0.79, 0.94], 2400.0, 11_000_000),
        "retention": {"value": 0.967, "ci": [0.9, 1.02]} if labelled else {"value": None, "ci": None},
        "speedup": 8.0,
        "speed_measure": "end-to-end extraction",
        "projection": {"slides": 10_000, "tiles_per_slide": 10_000, "unit": "GPU-hours"},
        "machine": {"cpu": "Some CPU", "cores": 16, "gpu": "NVIDIA H100", "device": "cuda"},
        "fit": {
            "method": "mcmkd",
            "steps": 2000,
            "slides_fit": 36,
            "slides_held_out": 4,
            "student_start": "imagenet",
            "unlabeled": True,
        },
        "verdict": "the student keeps 97% [95 % CI 90%, 102%] of the teacher's slide AUROC at 8x its speed",
        **({} if labelled else {"agreement": {"student_cosine": 0.71, "tiles": 500, "slides": "held_out"}}),
    }


def test_the_report_opens_on_the_verdict_the_three_models_and_their_auroc_plot(tmp_path):
    from histodistill.eval.report import build_report

    (tmp_path / "summary.json").write_text(json.dumps(_summary()))
    (tmp_path / "timings.json").write_text(json.dumps({"fit": 12.0}))
    page = build_report(tmp_path).read_text()
    assert page.index("the student keeps 97%") < page.index('id="s-stages"')
    assert "pathology/uni" in page and "resnet18 (start: imagenet)" in page and "0.870 [0.790, 0.940]" in page
    assert page.count("data:image/png;base64") == 1  # the AUROC plot
    assert "96.7% [95 % CI 90.0%, 102.0%]" in page and "8.0x" in page and "GPU-hours for 10k slides" in page
    assert "NVIDIA H100" in page and "unlabeled, as the paper does" in page and "4 held out" in page
    assert "histodistill distill" in page
    (tmp_path / "summary.json").write_text(json.dumps(_summary(labelled=False)))
    page = build_report(tmp_path).read_text()
    assert (
        "data:image/png" not in page
        and "the AUROC comparison needs a labels CSV" in page
        and "cosine 0.71" in page
    )


@pytest.mark.browser
def test_the_distill_report_renders_in_headless_chromium(tmp_path):
    playwright = pytest.importorskip(
        "playwright.sync_api", reason="playwright is installed with the dev extra"
    )
    executable = next(
        (path for name in ("chromium", "chromium-browser", "google-chrome") if (path := shutil.which(name))),
        None,
    )
    if executable is None:
        pytest.skip("no Chromium on this machine: install Debian's `chromium` package (CI does)")
    from histodistill.eval.report import build_report

    (tmp_path / "summary.json").write_text(json.dumps(_summary()))
    (tmp_path / "timings.json").write_text(json.dumps({"fit": 12.0}))
    page_path, errors = build_report(tmp_path), []
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(page_path.as_uri())
            page.wait_for_load_state("load")
            assert page.locator("#s-summary table tr").count() == 4  # header + the three models
            page.wait_for_function("Array.from(document.images).every(i => i.complete)")
            assert page.evaluate("Array.from(document.images).map(i => i.naturalWidth > 0)") == [True]
        finally:
            browser.close()
    assert errors == []


@pytest.mark.slow
def test_moma_fits_on_labelled_patches_and_the_report_says_it_is_not_unlabeled(
    cohort, tmp_path, one_torch_thread
):
    from conftest import make_image_folder

    patches = make_image_folder(tmp_path / "patches", per_class=4, size=TILE)
    out = tmp_path / "run"
    argv = _argv(
        cohort, out, str(cohort["teacher"]), "--method", "moma", "--patch-labels", str(patches), labels=False
    )
    argv[argv.index("--steps") + 1] = "2"
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["fit"]["method"] == "moma"
        and summary["fit"]["steps"] == 2
        and not summary["fit"]["unlabeled"]
    )
    assert summary["agreement"]["student_cosine"] is None  # MoMA's heads do not map to the teacher's features
    assert "trains on the labelled patches given" in (out / "report.html").read_text()
    assert "num_classes: 3" in (out / "fit" / "run" / "config.yaml").read_text()


def test_coords_of_an_earlier_tiling_replace_stage_one_given_as_the_folder_or_its_patches(cohort, tmp_path):
    from histodistill.pipelines.distill import DistillConfig, prepare, tile_slides
    from histodistill.wsi.tiling import tile_slide

    for path in sorted(cohort["slides"].glob("*.tif"))[:3]:
        tile_slide(path, tmp_path / "tiles", target_mpp=0.5, patch_size=TILE)
    for coords in (tmp_path / "tiles", tmp_path / "tiles" / "patches"):
        config = DistillConfig(
            teacher=str(cohort["teacher"]),
            student="tiny/resnet18-64",
            student_random_init=True,
            out=tmp_path / "run",
            coords=coords,
            holdout=0.34,
        )
        context = prepare(config, log=lambda _: None)
        assert context.tiles_dir == tmp_path / "tiles" and len(context.slide_ids) == 3
        assert len(context.held_out) == 1 and context.held_out[0] in context.slide_ids
        assert (context.tile_px, context.tile_mpp, context.teacher_dim) == (TILE, 0.5, 192)
        assert tile_slides(context) == {"coords": str(coords), "slides": 3}

"""`histodistill distill`: a foundation-model teacher -> the lab's own fast student, with proof on slides.

One resumable chain of the library's stages (`histodistill.pipelines.runner`), everything under ``out``:

```
tiles/     1 tile the slides at the teacher's tile size and mpp (skipped with --coords)
teacher/   2 the teacher's feature of every tile, once: the MCM-KD cache AND the teacher's slide features
fit/       3 the student's start weights (student_start/), the fit (run/: a `histodistill fit` run directory)
export/    4 the tuned student as a timm local-dir folder with its model card
features/  5a every slide's features from the tuned and the un-tuned student; throughput of the three models
compare/   5b with labels: ABMIL k-fold CV by case on each model's features, same folds; without: agreement
report/    6 summary.json (the contract) and report.html at the top of ``out``
```

The contract of ``<out>/summary.json`` (read by the report, the demo and the benchmarks): ``teacher``,
``student_untuned`` and ``student``, each with ``name``, ``slide_auroc``, ``slide_auroc_ci`` (two numbers),
``balanced_accuracy``, ``tiles_per_s`` (end to end), ``forward_tiles_per_s``, ``parameters`` and
``projected_hours``; ``retention: {value, ci}`` (student / teacher slide AUROC, paired bootstrap CI);
``speedup``; ``machine``; ``verdict``. Without labels the AUROCs and retention are null and ``agreement``
holds the feature agreement. docs/distill.md describes every stage, file and choice.

The inputs and their checks are `histodistill.pipelines.distill_config` (`DistillConfig`, `prepare`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from histodistill.eval.report import DISTILL_MODELS as MODELS
from histodistill.eval.report import SUMMARY_JSON
from histodistill.pipelines.distill_config import DistillConfig, DistillContext, prepare
from histodistill.pipelines.runner import Stage, format_timings, read_record, record_path, run_stages

# Optimiser steps between the fit's mid-run checkpoints (last.ckpt), so a killed fit loses at most these.
CHECKPOINT_EVERY_STEPS = 500


# ---- stages ------------------------------------------------------------------------------------------
def tile_slides(context: DistillContext) -> dict:
    """Stage 1: tissue and tile grid of every slide at the teacher's tile size and mpp."""
    from tqdm.auto import tqdm

    from histodistill.io import visible_files
    from histodistill.wsi.formats import SLIDE_SUFFIXES
    from histodistill.wsi.tiling import tile_slide

    if context.config.coords is not None:
        return {"coords": str(context.config.coords), "slides": len(context.slide_ids)}
    slides = visible_files(context.config.slides, tuple(SLIDE_SUFFIXES))
    results = [
        tile_slide(
            path,
            context.tiles_dir,
            target_mpp=context.tile_mpp,
            patch_size=context.tile_px,
            overwrite=context.overwrite,
        )
        for path in tqdm(slides, desc="tile", unit="slide", dynamic_ncols=True)
    ]
    empty = [result.slide_id for result in results if result.n_tiles == 0]
    if empty:
        print(
            f"warning: {len(empty)} slide(s) without tissue tiles (e.g. {empty[0]}): see "
            f"{context.tiles_dir}/qc"
        )
    return {
        "slides": len(results),
        "tiles": sum(result.n_tiles for result in results),
        "mpp": context.tile_mpp,
        "patch_size": context.tile_px,
    }


def cache_teacher(context: DistillContext) -> dict:
    """Stage 2: the teacher's feature of every tile, once (`ensure_teacher_cache`). These files are both the
    MCM-KD targets and the teacher's slide features in the comparison."""

    from histodistill.features.teacher_cache import cache_features_dir, ensure_teacher_cache
    from histodistill.features.throughput import timed_extraction

    config = context.config
    folder, tiles_per_s = timed_extraction(
        lambda: ensure_teacher_cache(
            context.tiles_dir,
            context.out / "teacher",
            config.teacher,
            config.teacher_weights,
            rebuild=True,
            batch_size=config.extract_batch_size,
            num_workers=config.num_workers,
            precision=context.precision,
            slides_dir=context.slides_dir,
        ),
        cache_features_dir(context.out / "teacher", config.teacher),
    )
    return _throughput(config.teacher, folder, tiles_per_s, context, weights=config.teacher_weights)


def _throughput(
    model: str | Path,
    folder: Path,
    tiles_per_s: float | None,
    context: DistillContext,
    weights: Path | None = None,
) -> dict:
    """A model's row: its features folder, end-to-end (``tiles_per_s``, `timed_extraction`) and forward-only
    tiles/s, and parameters."""
    from histodistill.features.throughput import forward_rate, parameters
    from histodistill.models.backbones import create_backbone

    backbone = create_backbone(model, weights=weights)
    return {
        "features_dir": str(folder),
        "tiles_per_s": tiles_per_s,
        "forward_tiles_per_s": forward_rate(backbone, context.device, precision=context.precision),
        "parameters": parameters(backbone),
    }


def student_start_dir(context: DistillContext) -> Path:
    return context.out / "fit" / "student_start"


def run_dir(context: DistillContext) -> Path:
    return context.out / "fit" / "run"


def models_json(out: Path) -> Path:
    """features/models.json of a distill folder ``out``: each model's row (features folder, tiles/s,
    parameters)."""
    return out / "features" / "models.json"


def compare_dir(out: Path) -> Path:
    """Where a distill folder ``out`` keeps each model's MIL CV run (``<model>/``, `slide_cv`)."""
    return out / "compare"


def fit_student(context: DistillContext) -> dict:
    """Stage 3: the student's start weights saved (the un-tuned student of the comparison), then the fit
    through the recipe (`fit_recipe`: the code `histodistill fit` runs), budgeted in optimiser steps."""
    import torch

    from histodistill.features.export import EXPORT_CONFIG, save_backbone
    from histodistill.io import write_json
    from histodistill.models.backbones import create_backbone
    from histodistill.pipelines.recipes import fit_recipe

    config = context.config
    start = student_start_dir(context)
    if not (start / EXPORT_CONFIG).is_file() or context.overwrite:  # config.json is written last
        torch.manual_seed(config.seed)  # the random start, when asked for, is the seed's
        save_backbone(
            create_backbone(
                config.student, pretrained=not config.student_random_init, weights=config.student_weights
            ),
            start,
        )
    write_json(context.out / "fit" / "held_out.json", list(context.held_out))
    common = [
        "--seed_everything",
        str(config.seed),
        "--trainer.max_epochs",
        "-1",
        "--trainer.max_steps",
        str(config.steps),
        "--trainer.log_every_n_steps",
        str(min(50, config.steps)),
        "--trainer.callbacks",
        json.dumps([_step_checkpoint(context)]),
    ]
    if config.batch_size:
        common += ["--data.init_args.batch_size", str(config.batch_size)]
    common += ["--data.init_args.num_workers", str(config.num_workers)]
    overrides = _mcmkd_overrides(context) if config.method == "mcmkd" else _moma_overrides(context)
    metrics = fit_recipe(
        context.recipe, run_dir(context), [*common, *overrides], context.device, config.devices
    )
    loss = metrics.get("final", {}).get("train/loss")
    return {
        "method": config.method,
        "steps": metrics.get("global_step"),
        "train_loss": round(loss, 4) if isinstance(loss, float) else loss,
        "slides_fit": len(context.slide_ids) - len(context.held_out),
        "slides_held_out": len(context.held_out),
    }


def _step_checkpoint(context: DistillContext) -> dict:
    """last.ckpt every `CHECKPOINT_EVERY_STEPS` steps too (the run directory's own one is written per epoch,
    and a large cohort's fit may be a fraction of an epoch)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from histodistill.pipelines.recipes import class_spec

    return class_spec(
        ModelCheckpoint,
        dirpath=str(run_dir(context) / "checkpoints"),
        filename="last",
        save_top_k=1,
        every_n_train_steps=CHECKPOINT_EVERY_STEPS,
        enable_version_counter=False,
    )


def _mcmkd_overrides(context: DistillContext) -> list[str]:
    config = context.config
    # None: the recipe's
    given = {
        "--model.init_args.target_norm": config.target_norm,
        "--model.init_args.loss": config.loss,
        "--data.init_args.window_stride": config.window_stride,
    }
    return [
        *(part for key, value in given.items() if value is not None for part in (key, str(value))),
        "--model.init_args.student",
        str(student_start_dir(context)),
        "--model.init_args.teacher_dim",
        str(context.teacher_dim),
        "--data.init_args.tiles_dir",
        str(context.tiles_dir),
        "--data.init_args.slides_dir",
        str(context.slides_dir) if context.slides_dir else "null",
        "--data.init_args.teacher",
        config.teacher,
        "--data.init_args.teacher_weights",
        str(config.teacher_weights) if config.teacher_weights else "null",
        # The teacher as stage 2 cached it, with its weights (a recipe may say otherwise, e.g. tiny_cpu's
        # random teacher): the cache is found under that teacher's name.
        "--data.init_args.teacher_pretrained",
        "true",
        "--data.init_args.cache_dir",
        str(context.out / "teacher"),
        "--data.init_args.rebuild_cache",
        "false",  # stage 2 built it: the fit must find exactly those files
        "--data.init_args.extract_precision",
        context.precision,
        "--data.init_args.exclude_slides",
        json.dumps(list(context.held_out)),
    ]


def _moma_overrides(context: DistillContext) -> list[str]:
    from histodistill.data.datasets import CsvDataset, ImageFolderDataset
    from histodistill.pipelines.recipes import class_spec

    config = context.config
    labels = Path(config.patch_labels)
    if labels.is_dir():
        train, classes = class_spec(ImageFolderDataset, root=str(labels)), ImageFolderDataset(labels).classes
    else:
        train, classes = (
            class_spec(CsvDataset, csv=str(labels), root=str(labels.parent)),
            CsvDataset(labels).classes,
        )
    return [
        "--model.init_args.backbone",
        str(student_start_dir(context)),
        "--model.init_args.student_init",
        "imagenet",  # the student's own weights: student_start/
        "--model.init_args.num_classes",
        str(len(classes)),
        "--model.init_args.teacher",
        config.teacher,
        "--model.init_args.teacher_weights",
        str(config.teacher_weights) if config.teacher_weights else "null",
        "--data.init_args.train",
        json.dumps(train),
        "--data.init_args.val",
        "null",
    ]


def export_student(context: DistillContext) -> dict:
    """Stage 4: the tuned student as a timm ``local-dir`` folder with its model card."""
    from histodistill.engine.run_dir import last_checkpoint
    from histodistill.features.export import export_checkpoint

    out = export_checkpoint(
        last_checkpoint(run_dir(context)), context.out / "export", overwrite=True, model_card=True
    )
    return {"export": str(out)}


def extract_students(context: DistillContext) -> dict:
    """Stage 5a: every slide's features from the tuned and the un-tuned student (timed), beside the teacher's
    row from stage 2 (its cache is its slide features: no second teacher pass). Writes
    features/models.json."""

    from histodistill.features.extract import extract_slides
    from histodistill.features.throughput import timed_extraction
    from histodistill.io import write_json

    config = context.config
    teacher = read_record(record_path(context.out, "teacher"))["summary"]
    rows = {"teacher": {"name": config.teacher, **teacher}}
    for name, model in (("student_untuned", student_start_dir(context)), ("student", context.out / "export")):
        folder, tiles_per_s = timed_extraction(
            lambda model=model, name=name: extract_slides(
                model,
                context.tiles_dir,
                context.out / "features" / name,
                batch_size=config.extract_batch_size,
                num_workers=config.num_workers,
                device=context.device,
                precision=context.precision,
                slides_dir=context.slides_dir,
            ),
            context.out / "features" / name,
        )
        rows[name] = {
            "name": _student_name(context, name),
            **_throughput(model, folder, tiles_per_s, context),
        }
    write_json(models_json(context.out), rows)
    return {f"{name}_tiles_per_s": row["tiles_per_s"] for name, row in rows.items()}


def _student_name(context: DistillContext, row: str) -> str:
    config = context.config
    if row == "student_untuned":
        return f"{config.student} (start: {context.student_start})"
    return f"{config.student} ({config.method.upper().replace('MCMKD', 'MCM-KD').replace('MOMA', 'MoMA')})"


def compare(context: DistillContext) -> dict:
    """Stage 5b: with labels, slide-level ABMIL CV by case on each model's features (the same folds);
    without, the students' feature agreement with the teacher. Writes compare/results.json."""
    from histodistill.io import write_json
    from histodistill.pipelines.distill_compare import agreement, slide_cv

    rows = json.loads(models_json(context.out).read_text())
    folders = {name: Path(rows[name]["features_dir"]) for name in MODELS}
    if context.config.labels is not None:
        results = slide_cv(folders, context.config, compare_dir(context.out), context.device)
        summary = {f"{name}_auroc": results["models"][name]["slide_auroc"] for name in MODELS}
    else:
        results = agreement(
            folders, context.held_out or context.slide_ids, run_dir(context), context.config.method
        )
        results["slides"] = "held_out" if context.held_out else "all"
        summary = {
            "student_cosine": results["student_cosine"],
            "student_cka": results["models"]["student"]["cka"],
        }
    write_json(compare_dir(context.out) / "results.json", results)
    return summary


def write_summary(context: DistillContext) -> dict:
    """Stage 6: summary.json (atomically) and report.html at the top of ``out``."""
    from histodistill.eval.report import build_report
    from histodistill.io import write_json
    from histodistill.pipelines.distill_compare import summary

    rows = json.loads(models_json(context.out).read_text())
    results = json.loads((compare_dir(context.out) / "results.json").read_text())
    fit = read_record(record_path(context.out, "fit"))["summary"]
    document = summary(rows, results, fit, context)
    write_json(context.out / SUMMARY_JSON, document)
    build_report(context.out)
    return {"verdict": document["verdict"]}


def _missing(*parts: str) -> Callable[[DistillContext], str | None]:
    """A stage's ``verify``: the first of its outputs (relative to ``out``) that is missing."""

    def verify(context: DistillContext) -> str | None:
        for part in parts:
            if not (context.out / part).exists():
                return f"{context.out / part} is missing"
        return None

    return verify


def _teacher_cache_stale(context: DistillContext) -> str | None:
    from histodistill.features.teacher_cache import cache_features_dir, cache_key, stale_reasons

    config = context.config
    reasons = stale_reasons(
        cache_features_dir(context.out / "teacher", config.teacher),
        cache_key(context.tiles_dir / "patches", config.teacher, config.teacher_weights),
    )
    return f"the teacher cache is stale ({reasons[0]})" if reasons else None


TILING = ("slides", "coords", "tile_mpp", "tile_px")
STAGES = [
    Stage("tiles", "tile the slides at the teacher's tile size and mpp", tile_slides, settings=TILING),
    Stage(
        "teacher",
        "the teacher's features of every tile, once (MCM-KD cache = teacher slide features)",
        cache_teacher,
        settings=("teacher", "teacher_weights"),
        verify=_teacher_cache_stale,
    ),
    Stage(
        "fit",
        "fit the student (optimiser steps; resumes from its last checkpoint)",
        fit_student,
        settings=(
            "student",
            "student_weights",
            "student_random_init",
            "method",
            "patch_labels",
            "recipe",
            "steps",
            "batch_size",
            "window_stride",
            "target_norm",
            "loss",
            "holdout",
            "seed",
            "devices",
        ),
        verify=_missing("fit/run/checkpoints/last.ckpt", "fit/student_start/config.json"),
    ),
    Stage(
        "export",
        "export the tuned student (timm local-dir + model card)",
        export_student,
        settings=(),
        verify=_missing("export/config.json", "export/model.safetensors"),
    ),
    Stage(
        "features",
        "every slide's features from the tuned and un-tuned student; tiles/s of all three",
        extract_students,
        settings=(),
        verify=_missing("features/models.json"),
    ),
    Stage(
        "compare",
        "slide-level ABMIL CV on each model's features (or, without labels, feature agreement)",
        compare,
        settings=(
            "labels",
            "folds",
            "mil_model",
            "mil_epochs",
            "mil_seeds",
            "mil_lr",
            "mil_weight_decay",
            "mil_val_fraction",
        ),
        verify=_missing("compare/results.json"),
    ),
    Stage(
        "report",
        "summary.json and report.html",
        write_summary,
        settings=(),
        verify=_missing(SUMMARY_JSON, "report.html"),
    ),
]


def distill(config: DistillConfig, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) the whole chain; returns summary.json's content. Raises `UserError` before any stage
    runs for bad input (`prepare`) and for a folder finished with other settings (naming the setting)."""
    import time

    start = time.perf_counter()
    context = prepare(config, log)
    log(
        f"teacher {config.teacher}: tiles of {context.tile_px} px at {context.tile_mpp} mpp; student "
        f"{config.student} starts from {context.student_start} weights; {config.method} for {config.steps} "
        f"steps on {len(context.slide_ids) - len(context.held_out)} of {len(context.slide_ids)} slides "
        f"(unlabeled), on {context.device}"
    )
    records = run_stages(STAGES, context, log)
    log(f"\nhistodistill distill finished in {time.perf_counter() - start:.1f} s; outputs in {config.out}/")
    log(format_timings(records))
    document = json.loads((config.out / SUMMARY_JSON).read_text())
    log(document["verdict"])
    return document

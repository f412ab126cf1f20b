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
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from histodistill.errors import UserError
from histodistill.eval.mil_config import MIL_MODEL_NAMES
from histodistill.eval.report import DISTILL_MODELS as MODELS
from histodistill.pipelines.runner import Stage, format_timings, read_record, record_path, run_stages

METHOD_RECIPES = {"mcmkd": "mcmkd/resnet50_s3_p224.yaml", "moma": "moma/heterogeneous_vit_to_resnet18.yaml"}
# Optimiser steps between the fit's mid-run checkpoints (last.ckpt), so a killed fit loses at most these.
CHECKPOINT_EVERY_STEPS = 500


def _option(help: str, choices: tuple[str, ...] | None = None) -> dict:
    return {"metadata": {"help": help, "choices": choices}}


@dataclass(frozen=True)
class DistillConfig:
    """Everything `distill` takes; `histodistill distill` builds its options from these fields (names with
    ``-`` for ``_``, defaults and help from here)."""

    teacher: str = field(**_option("the teacher: anything `extract --model` takes (pathology/uni, a timm name, "
                                   "hf-hub:ORG/NAME, a histodistill .ckpt or export folder)"))
    student: str = field(**_option("the student: a timm name (ImageNet weights by default), a registered name, "
                                   "a histodistill .ckpt or export folder"))
    out: Path = field(**_option("the output folder of every stage (resumable)"))
    slides: Path | None = field(default=None, **_option(
        "folder of slides (not recursive); with --coords: where the coords' slides are (needed for CLAM/TRIDENT "
        "coords, or if the slides moved)"))
    coords: Path | None = field(default=None, **_option(
        "coords of an earlier tiling to use instead of tiling: `histodistill tile`'s, CLAM's or TRIDENT's (the "
        "folder holding patches/, or patches/ itself)"))
    labels: Path | None = field(default=None, **_option(
        "slide labels CSV case_id,slide_id,label: the AUROC comparison (without: feature agreement)"))
    teacher_weights: Path | None = field(default=None, **_option(
        "a local weights file for the teacher (gated weights downloaded once)"))
    student_weights: Path | None = field(default=None, **_option("a local weights file the student starts from"))
    student_random_init: bool = field(default=False, **_option(
        "start the student from random weights (seed --seed) instead of its ImageNet weights"))
    method: Literal["mcmkd", "moma"] = field(default="mcmkd", **_option(
        "mcmkd: masked context modelling on the slides' tiles, unlabeled (the default); moma: needs --patch-labels"))
    patch_labels: Path | None = field(default=None, **_option(
        "MoMA's labelled patches: an image folder (class/image) or a CSV path,label"))
    steps: int = field(default=2000, **_option("the fit's budget in optimiser steps"))
    batch_size: int | None = field(default=None, **_option("windows (MCM-KD) or patches (MoMA) per device per "
                                                           "step (default: the recipe's, 32 / 64)"))
    mpp: float | None = field(default=None, **_option("tile resolution in microns per pixel (default: the teacher's)"))
    patch_size: int | None = field(default=None, **_option("tile side in pixels (default: the teacher's input size)"))
    holdout: float = field(default=0.0, **_option(
        "share of the slides kept out of the fit (MCM-KD fine-tunes on the target cohort, unlabeled, as the paper)"))
    folds: int = field(default=5, **_option("ABMIL cross-validation folds by case (with --labels)"))
    mil_model: str = field(default="abmil", **_option("the MIL model compared", choices=MIL_MODEL_NAMES))
    mil_epochs: int = field(default=20, **_option("MIL training epochs per fold"))
    devices: int = field(default=1, **_option("GPUs for the fit (DDP when more than one)"))
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", **_option(
        "where to extract and train: auto = cuda when a GPU is visible"))
    num_workers: int = field(default=4, **_option("data loader workers"))
    extract_batch_size: int = field(default=64, **_option("tiles per forward pass when extracting"))
    seed: int = field(default=0, **_option("seed of the student's random start, the hold-out draw, the fit, the folds"))
    overwrite: bool = field(default=False, **_option("run every stage again, replacing earlier outputs"))


@dataclass(frozen=True)
class DistillContext:
    """A checked `DistillConfig` with what follows from it (resolved before any stage runs)."""

    config: DistillConfig
    device: str  # "cpu" or "cuda"
    tile_mpp: float
    tile_px: int
    slide_ids: tuple[str, ...]
    held_out: tuple[str, ...]
    student_start: str  # "imagenet", "random", "weights:<file>" or a checkpoint's/export's own: where it starts
    teacher_dim: int

    @property
    def out(self) -> Path:
        return self.config.out

    @property
    def overwrite(self) -> bool:
        return self.config.overwrite

    @property
    def settings(self) -> dict:
        """What the outputs depend on (recorded with each stage; a resume must match)."""
        config = {key: str(value) if isinstance(value, Path) else value
                  for key, value in dataclasses.asdict(self.config).items()}
        for key in ("out", "overwrite", "device", "num_workers", "extract_batch_size"):
            del config[key]
        return {**config, "tile_mpp": self.tile_mpp, "tile_px": self.tile_px}

    @property
    def tiles_dir(self) -> Path:
        """The tiling output (holding ``patches/``): ours, or --coords (given as that folder or its patches/)."""
        coords = self.config.coords
        if coords is None:
            return self.out / "tiles"
        return coords.parent if coords.name == "patches" and not (coords / "patches").is_dir() else coords

    @property
    def slides_dir(self) -> Path | None:
        """Where the slides of --coords are (CLAM and TRIDENT coords do not name them): --slides, else None."""
        return self.config.slides if self.config.coords is not None else None

    @property
    def precision(self) -> str:
        return "bf16" if self.device == "cuda" else "32"


# ---- checks, before any stage -------------------------------------------------------------------------
def prepare(config: DistillConfig, log: Callable[[str], None] = print) -> DistillContext:
    """Check every input and resolve the defaults; raises `UserError` (one line, the fix) before any work:
    bad paths, a teacher whose weights cannot be had, an unknown student, labels that do not match the
    slides, too few cases per class for the folds, MoMA without patch labels."""
    from histodistill.distributed import resolve_device
    from histodistill.models.backbones import create_backbone

    _check_numbers(config)
    _check_paths(config)
    slide_ids = _slide_ids(config)
    if config.labels is not None:
        _check_labels(config.labels, slide_ids, config.folds)
    try:
        teacher = create_backbone(config.teacher, weights=config.teacher_weights)
    except UserError as error:
        raise UserError(f"--teacher {config.teacher}: {error} (for distill: --teacher-weights FILE)") from None
    student_start = ("random" if config.student_random_init else
                     f"weights:{config.student_weights}" if config.student_weights else
                     "its own (checkpoint or export)" if Path(config.student).exists() else "imagenet")
    try:
        create_backbone(config.student, pretrained=not config.student_random_init, weights=config.student_weights)
    except UserError as error:
        raise UserError(f"--student {config.student}: {error} (for distill: --student-weights FILE or "
                        "--student-random-init)") from None
    device = str(resolve_device(config.device))
    pre = teacher.preprocess
    if config.coords is not None:
        log(_describe_coords(config, pre.mpp))
    if config.mpp is None and pre.mpp is None:
        log(f"the teacher {config.teacher} records no mpp: tiles at 0.5 mpp (pass --mpp to choose)")
    rng = random.Random(config.seed)
    held_out = tuple(sorted(rng.sample(sorted(slide_ids), round(config.holdout * len(slide_ids)))))
    if len(held_out) == len(slide_ids):
        raise UserError(f"--holdout {config.holdout} keeps all {len(slide_ids)} slides out of the fit: lower it")
    return DistillContext(config=config, device=device.split(":")[0], tile_mpp=config.mpp or pre.mpp or 0.5,
                          tile_px=config.patch_size or pre.input_size, slide_ids=tuple(sorted(slide_ids)),
                          held_out=held_out, student_start=student_start, teacher_dim=teacher.num_features)


def _check_numbers(config: DistillConfig) -> None:
    if config.steps < 1:
        raise UserError(f"--steps must be at least 1, got {config.steps}")
    if not 0 <= config.holdout < 1:
        raise UserError(f"--holdout must be in [0, 1), got {config.holdout}")
    if config.devices < 1:
        raise UserError(f"--devices must be at least 1, got {config.devices}")
    for name in ("mpp", "patch_size", "batch_size"):
        if (value := getattr(config, name)) is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if config.student_random_init and config.student_weights:
        raise UserError("--student-random-init and --student-weights contradict each other: pass one of them")
    if config.method == "moma" and config.patch_labels is None:
        raise UserError("--method moma trains on labelled patches: pass --patch-labels DIR_OR_CSV (an image folder "
                        "class/image, or a CSV path,label)")
    if config.method == "mcmkd" and config.patch_labels is not None:
        raise UserError("--patch-labels is MoMA's: pass --method moma, or drop --patch-labels for MCM-KD")


def _check_paths(config: DistillConfig) -> None:
    named = {"--slides": config.slides, "--coords": config.coords, "--labels": config.labels,
             "--teacher-weights": config.teacher_weights, "--student-weights": config.student_weights,
             "--patch-labels": config.patch_labels}
    for option, path in named.items():
        if path is not None and not Path(path).exists():
            raise UserError(f"{option} {path}: no such file or folder")
    if config.slides is None and config.coords is None:
        raise UserError("pass --slides FOLDER (slides to tile), or --coords of an earlier tile/CLAM/TRIDENT run "
                        "(with --slides for CLAM/TRIDENT coords)")


def _slide_ids(config: DistillConfig) -> list[str]:
    """The cohort: the slide files of --slides, or the slide ids of the coords files of --coords (ours, CLAM's
    or TRIDENT's), each of whose slides must be found (`find_slide`: in --slides, else where the coords say)."""
    from histodistill.io import visible_files
    from histodistill.wsi.coords import coords_files, find_slide, read_coords
    from histodistill.wsi.formats import SLIDE_SUFFIXES

    if config.coords is not None:
        tilings = {path: read_coords(path)[1] for path in coords_files(config.coords)}
        for path, attrs in tilings.items():
            find_slide(path, attrs, config.slides)
        return [attrs["slide_id"] for attrs in tilings.values()]
    if not Path(config.slides).is_dir():
        raise UserError(f"--slides {config.slides}: expected a folder of slides")
    slides = visible_files(config.slides, tuple(SLIDE_SUFFIXES))
    if not slides:
        raise UserError(f"--slides {config.slides}: no slide files in this folder (looked for "
                        f"{', '.join(sorted(SLIDE_SUFFIXES))})")
    return [path.stem for path in slides]


def _describe_coords(config: DistillConfig, teacher_mpp: float | None) -> str:
    """One line: what the tiles of --coords are (the first file's; CLAM states no mpp, TRIDENT a magnification)
    and the mpp the teacher expects, which distill cannot check for coords without an mpp."""
    from histodistill.wsi.coords import coords_files, read_coords

    files = coords_files(config.coords)
    attrs = read_coords(files[0])[1]
    if "target_mpp" in attrs:
        resolution = f"at {float(attrs['target_mpp']):g} mpp"
    elif "target_magnification" in attrs:
        resolution = f"at {float(attrs['target_magnification']):g}x magnification (mpp unknown)"
    else:
        resolution = f"at level {attrs.get('patch_level', '?')} (mpp unknown)"
    expects = f"{teacher_mpp:g} mpp" if teacher_mpp else "no particular mpp"
    return (f"--coords {config.coords}: {len(files)} slide(s); {files[0].name}: tiles of {attrs['patch_size']} px = "
            f"{attrs['patch_size_level0']} level-0 px {resolution}; the teacher {config.teacher} expects {expects}")


def _check_labels(labels: Path, slide_ids: list[str], folds: int) -> None:
    from histodistill.data.bags import read_labels
    from histodistill.data.splits import check_cases_per_class

    rows = read_labels(labels)
    missing = sorted({row.slide_id for row in rows} - set(slide_ids))
    if missing:
        raise UserError(f"--labels {labels}: {len(missing)} labelled slide(s) are not among the {len(slide_ids)} "
                        f"slides (e.g. {', '.join(missing[:3])}): fix the slide_id column or the slides")
    if len({row.label for row in rows}) < 2:
        raise UserError(f"--labels {labels}: every slide has the same label; the AUROC needs two classes at least")
    check_cases_per_class(rows, folds, validation=False)  # the CV trains without a validation part


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
    results = [tile_slide(path, context.tiles_dir, target_mpp=context.tile_mpp, patch_size=context.tile_px,
                          overwrite=context.overwrite)
               for path in tqdm(slides, desc="tile", unit="slide", dynamic_ncols=True)]
    empty = [result.slide_id for result in results if result.n_tiles == 0]
    if empty:
        print(f"warning: {len(empty)} slide(s) without tissue tiles (e.g. {empty[0]}): see {context.tiles_dir}/qc")
    return {"slides": len(results), "tiles": sum(result.n_tiles for result in results), "mpp": context.tile_mpp,
            "patch_size": context.tile_px}


def cache_teacher(context: DistillContext) -> dict:
    """Stage 2: the teacher's feature of every tile, once (`ensure_teacher_cache`). These files are both the
    MCM-KD targets and the teacher's slide features in the comparison."""

    from histodistill.features.teacher_cache import cache_features_dir, ensure_teacher_cache
    from histodistill.features.throughput import timed_extraction

    config = context.config
    folder, tiles_per_s = timed_extraction(lambda: ensure_teacher_cache(
        context.tiles_dir, context.out / "teacher", config.teacher, config.teacher_weights, rebuild=True,
        batch_size=config.extract_batch_size, num_workers=config.num_workers, precision=context.precision,
        slides_dir=context.slides_dir), cache_features_dir(context.out / "teacher", config.teacher))
    return _throughput(config.teacher, folder, tiles_per_s, context, weights=config.teacher_weights)


def _throughput(model: str | Path, folder: Path, tiles_per_s: float | None, context: DistillContext,
                weights: Path | None = None) -> dict:
    """A model's row: its features folder, end-to-end (``tiles_per_s``, `timed_extraction`) and forward-only
    tiles/s, and parameters."""
    from histodistill.features.throughput import forward_rate, parameters
    from histodistill.models.backbones import create_backbone

    backbone = create_backbone(model, weights=weights)
    return {"features_dir": str(folder), "tiles_per_s": tiles_per_s,
            "forward_tiles_per_s": forward_rate(backbone, context.device, precision=context.precision),
            "parameters": parameters(backbone)}


def student_start_dir(context: DistillContext) -> Path:
    return context.out / "fit" / "student_start"


def run_dir(context: DistillContext) -> Path:
    return context.out / "fit" / "run"


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
        save_backbone(create_backbone(config.student, pretrained=not config.student_random_init,
                                      weights=config.student_weights), start)
    write_json(context.out / "fit" / "held_out.json", list(context.held_out))
    common = ["--seed_everything", str(config.seed), "--trainer.max_epochs", "-1",
              "--trainer.max_steps", str(config.steps), "--trainer.log_every_n_steps", str(min(50, config.steps)),
              "--trainer.callbacks", json.dumps([_step_checkpoint(context)])]
    if config.batch_size:
        common += ["--data.init_args.batch_size", str(config.batch_size)]
    common += ["--data.init_args.num_workers", str(config.num_workers)]
    overrides = _mcmkd_overrides(context) if config.method == "mcmkd" else _moma_overrides(context)
    metrics = fit_recipe(METHOD_RECIPES[config.method], run_dir(context), [*common, *overrides], context.device,
                         config.devices)
    loss = metrics.get("final", {}).get("train/loss")
    return {"method": config.method, "steps": metrics.get("global_step"),
            "train_loss": round(loss, 4) if isinstance(loss, float) else loss,
            "slides_fit": len(context.slide_ids) - len(context.held_out), "slides_held_out": len(context.held_out)}


def _step_checkpoint(context: DistillContext) -> dict:
    """last.ckpt every `CHECKPOINT_EVERY_STEPS` steps too (the run directory's own one is written per epoch,
    and a large cohort's fit may be a fraction of an epoch)."""
    return {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(run_dir(context) / "checkpoints"), "filename": "last", "save_top_k": 1,
                          "every_n_train_steps": CHECKPOINT_EVERY_STEPS, "enable_version_counter": False}}


def _mcmkd_overrides(context: DistillContext) -> list[str]:
    config = context.config
    return [
        "--model.init_args.student", str(student_start_dir(context)),
        "--model.init_args.teacher_dim", str(context.teacher_dim),
        "--data.init_args.tiles_dir", str(context.tiles_dir),
        "--data.init_args.slides_dir", str(context.slides_dir) if context.slides_dir else "null",
        "--data.init_args.teacher", config.teacher,
        "--data.init_args.teacher_weights", str(config.teacher_weights) if config.teacher_weights else "null",
        "--data.init_args.cache_dir", str(context.out / "teacher"),
        "--data.init_args.rebuild_cache", "false",  # stage 2 built it: the fit must find exactly those files
        "--data.init_args.extract_precision", context.precision,
        "--data.init_args.exclude_slides", json.dumps(list(context.held_out)),
    ]


def _moma_overrides(context: DistillContext) -> list[str]:
    from histodistill.data.datasets import CsvDataset, ImageFolderDataset

    config = context.config
    labels = Path(config.patch_labels)
    if labels.is_dir():
        train, classes = ({"class_path": "histodistill.data.datasets.ImageFolderDataset",
                           "init_args": {"root": str(labels)}}, ImageFolderDataset(labels).classes)
    else:
        train, classes = ({"class_path": "histodistill.data.datasets.CsvDataset",
                           "init_args": {"csv": str(labels), "root": str(labels.parent)}}, CsvDataset(labels).classes)
    return [
        "--model.init_args.backbone", str(student_start_dir(context)),
        "--model.init_args.student_init", "imagenet",  # the student's own weights: student_start/
        "--model.init_args.num_classes", str(len(classes)),
        "--model.init_args.teacher", config.teacher,
        "--model.init_args.teacher_weights", str(config.teacher_weights) if config.teacher_weights else "null",
        "--data.init_args.train", json.dumps(train), "--data.init_args.val", "null",
    ]


def export_student(context: DistillContext) -> dict:
    """Stage 4: the tuned student as a timm ``local-dir`` folder with its model card."""
    from histodistill.engine.run_dir import last_checkpoint
    from histodistill.features.export import export_checkpoint

    out = export_checkpoint(last_checkpoint(run_dir(context)), context.out / "export", overwrite=True,
                            model_card=True)
    return {"export": str(out)}


def extract_students(context: DistillContext) -> dict:
    """Stage 5a: every slide's features from the tuned and the un-tuned student (timed), beside the teacher's
    row from stage 2 (its cache is its slide features: no second teacher pass). Writes features/models.json."""

    from histodistill.features.extract import extract_slides
    from histodistill.features.throughput import timed_extraction
    from histodistill.io import write_json

    config = context.config
    teacher = read_record(record_path(context.out, "teacher"))["summary"]
    rows = {"teacher": {"name": config.teacher, **teacher}}
    for name, model in (("student_untuned", student_start_dir(context)), ("student", context.out / "export")):
        folder, tiles_per_s = timed_extraction(lambda model=model, name=name: extract_slides(
            model, context.tiles_dir, context.out / "features" / name, batch_size=config.extract_batch_size,
            num_workers=config.num_workers, device=context.device, precision=context.precision,
            slides_dir=context.slides_dir), context.out / "features" / name)
        rows[name] = {"name": _student_name(context, name), **_throughput(model, folder, tiles_per_s, context)}
    write_json(context.out / "features" / "models.json", rows)
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

    rows = json.loads((context.out / "features" / "models.json").read_text())
    folders = {name: Path(rows[name]["features_dir"]) for name in MODELS}
    if context.config.labels is not None:
        results = slide_cv(folders, context.config, context.out / "compare", context.device)
        summary = {f"{name}_auroc": results["models"][name]["slide_auroc"] for name in MODELS}
    else:
        results = agreement(folders, context.held_out or context.slide_ids, run_dir(context), context.config.method)
        results["slides"] = "held_out" if context.held_out else "all"
        summary = {"student_cosine": results["student_cosine"], "student_cka": results["models"]["student"]["cka"]}
    write_json(context.out / "compare" / "results.json", results)
    return summary


def write_summary(context: DistillContext) -> dict:
    """Stage 6: summary.json (atomically) and report.html at the top of ``out``."""
    from histodistill.eval.report import build_report
    from histodistill.io import write_json
    from histodistill.pipelines.distill_compare import summary

    rows = json.loads((context.out / "features" / "models.json").read_text())
    results = json.loads((context.out / "compare" / "results.json").read_text())
    fit = read_record(record_path(context.out, "fit"))["summary"]
    document = summary(rows, results, fit, context)
    write_json(context.out / "summary.json", document)
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
    reasons = stale_reasons(cache_features_dir(context.out / "teacher", config.teacher),
                            cache_key(context.tiles_dir / "patches", config.teacher, config.teacher_weights))
    return f"the teacher cache is stale ({reasons[0]})" if reasons else None


TILING = ("slides", "coords", "tile_mpp", "tile_px")
STAGES = [
    Stage("tiles", "tile the slides at the teacher's tile size and mpp", tile_slides, settings=TILING),
    Stage("teacher", "the teacher's features of every tile, once (MCM-KD cache = teacher slide features)",
          cache_teacher, settings=("teacher", "teacher_weights"), verify=_teacher_cache_stale),
    Stage("fit", "fit the student (optimiser steps; resumes from its last checkpoint)", fit_student,
          settings=("student", "student_weights", "student_random_init", "method", "patch_labels", "steps",
                    "batch_size", "holdout", "seed", "devices"),
          verify=_missing("fit/run/checkpoints/last.ckpt", "fit/student_start/config.json")),
    Stage("export", "export the tuned student (timm local-dir + model card)", export_student, settings=(),
          verify=_missing("export/config.json", "export/model.safetensors")),
    Stage("features", "every slide's features from the tuned and un-tuned student; tiles/s of all three",
          extract_students, settings=(), verify=_missing("features/models.json")),
    Stage("compare", "slide-level ABMIL CV on each model's features (or, without labels, feature agreement)",
          compare, settings=("labels", "folds", "mil_model", "mil_epochs"), verify=_missing("compare/results.json")),
    Stage("report", "summary.json and report.html", write_summary, settings=(),
          verify=_missing("summary.json", "report.html")),
]


def distill(config: DistillConfig, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) the whole chain; returns summary.json's content. Raises `UserError` before any stage
    runs for bad input (`prepare`) and for a folder finished with other settings (naming the setting)."""
    import time

    start = time.perf_counter()
    context = prepare(config, log)
    log(f"teacher {config.teacher}: tiles of {context.tile_px} px at {context.tile_mpp} mpp; student {config.student} "
        f"starts from {context.student_start} weights; {config.method} for {config.steps} steps on "
        f"{len(context.slide_ids) - len(context.held_out)} of {len(context.slide_ids)} slides (unlabeled), on "
        f"{context.device}")
    records = run_stages(STAGES, context, log)
    log(f"\nhistodistill distill finished in {time.perf_counter() - start:.1f} s; outputs in {config.out}/")
    log(format_timings(records))
    document = json.loads((config.out / "summary.json").read_text())
    log(document["verdict"])
    return document

"""`histodistill distill`'s inputs: `DistillConfig` (every option, typed, with its help: the command builds
its options from it), `DistillContext` (a checked config with what follows from it) and `prepare`, which
checks every input before any stage runs (`histodistill.pipelines.distill` runs the stages).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from histodistill.errors import ConfigError, UserError
from histodistill.eval.mil_config import MIL_MODEL_NAMES, TrainConfig

# The recipe each method fits by default (configs/<recipe>; --recipe chooses another).
METHOD_RECIPES = {"mcmkd": "mcmkd/resnet50_s3_p224.yaml", "moma": "moma/heterogeneous_vit_to_resnet18.yaml"}
# MCM-KD's target normalisations and losses (`histodistill.losses.masked_context`'s `TargetNorm` and
# `LossKind`; named here so that building the command's options does not import torch; a test keeps the two
# equal).
TARGET_NORMS = ("layer_norm", "standardize")
MCMKD_LOSSES = ("cosine", "smooth_l1", "mse")
# Options only MCM-KD's recipe has (refused with --method moma).
MCMKD_ONLY = ("target_norm", "loss", "window_stride")


def _option(help: str, choices: tuple[str, ...] | None = None) -> dict:
    return {"metadata": {"help": help, "choices": choices}}


@dataclass(frozen=True)
class DistillConfig:
    """Everything `distill` takes; `histodistill distill` builds its options from these fields (names with
    ``-`` for ``_``, defaults and help from here)."""

    teacher: str = field(
        **_option(
            "the teacher: anything `extract --model` takes (pathology/uni, a timm name, "
            "hf-hub:ORG/NAME, a histodistill .ckpt or export folder)"
        )
    )
    student: str = field(
        **_option(
            "the student: a timm name (ImageNet weights by default), a registered name, "
            "a histodistill .ckpt or export folder"
        )
    )
    out: Path = field(**_option("the output folder of every stage (resumable)"))
    slides: Path | None = field(
        default=None,
        **_option(
            "folder of slides (not recursive); with --coords: where the coords' slides are (needed for "
            "CLAM/TRIDENT coords, or if the slides moved)"
        ),
    )
    coords: Path | None = field(
        default=None,
        **_option(
            "coords of an earlier tiling to use instead of tiling: `histodistill tile`'s, CLAM's or "
            "TRIDENT's (the folder holding patches/, or patches/ itself)"
        ),
    )
    labels: Path | None = field(
        default=None,
        **_option(
            "slide labels CSV case_id,slide_id,label: the AUROC comparison (without: feature agreement)"
        ),
    )
    teacher_weights: Path | None = field(
        default=None, **_option("a local weights file for the teacher (gated weights downloaded once)")
    )
    student_weights: Path | None = field(
        default=None, **_option("a local weights file the student starts from")
    )
    student_random_init: bool = field(
        default=False,
        **_option("start the student from random weights (seed --seed) instead of its ImageNet weights"),
    )
    method: Literal["mcmkd", "moma"] = field(
        default="mcmkd",
        **_option(
            "mcmkd: masked context modelling on the slides' tiles, unlabeled (the default); moma: needs "
            "--patch-labels"
        ),
    )
    patch_labels: Path | None = field(
        default=None, **_option("MoMA's labelled patches: an image folder (class/image) or a CSV path,label")
    )
    recipe: str | None = field(
        default=None,
        **_option(
            "the fit's recipe: a shipped one under configs/ (e.g. mcmkd/tiny_cpu.yaml) or a YAML file; the "
            f"options below override it (default: {METHOD_RECIPES['mcmkd']} for mcmkd, "
            f"{METHOD_RECIPES['moma']} for moma)"
        ),
    )
    steps: int = field(default=2000, **_option("the fit's budget in optimiser steps"))
    batch_size: int | None = field(
        default=None,
        **_option("windows (MCM-KD) or patches (MoMA) per device per step (default: the recipe's, 32 / 64)"),
    )
    window_stride: int | None = field(
        default=None,
        **_option(
            "MCM-KD: every Nth tile (in x and y) is a window centre; 1 overlaps windows, so an epoch shows a "
            "tile in up to 9 windows, 3 about once (default: the recipe's, 1)"
        ),
    )
    target_norm: str | None = field(
        default=None,
        **_option(
            "MCM-KD: the teacher features as targets: layer_norm per tile, or standardize per dimension over "
            "the teacher cache (default: the recipe's, layer_norm as the paper)",
            choices=TARGET_NORMS,
        ),
    )
    loss: str | None = field(
        default=None,
        **_option(
            "MCM-KD: the loss against the normalised targets (default: the recipe's, cosine as the paper)",
            choices=MCMKD_LOSSES,
        ),
    )
    mpp: float | None = field(
        default=None, **_option("tile resolution in microns per pixel (default: the teacher's)")
    )
    patch_size: int | None = field(
        default=None, **_option("tile side in pixels (default: the teacher's input size)")
    )
    holdout: float = field(
        default=0.0,
        **_option(
            "share of the slides kept out of the fit (MCM-KD fine-tunes on the target cohort, unlabeled, as "
            "the paper)"
        ),
    )
    folds: int = field(default=5, **_option("ABMIL cross-validation folds by case (with --labels)"))
    mil_model: str = field(default="abmil", **_option("the MIL model compared", choices=MIL_MODEL_NAMES))
    mil_epochs: int = field(default=20, **_option("MIL training epochs per fold"))
    mil_seeds: int = field(
        default=1,
        **_option(
            "MIL CV seeds (--seed, --seed + 1, ...): each repeats the k-fold CV on other folds; AUROCs are "
            "the mean over seeds of the pooled out-of-fold AUROC"
        ),
    )
    mil_lr: float = field(default=TrainConfig.lr, **_option("MIL learning rate (AdamW)"))
    mil_weight_decay: float = field(default=TrainConfig.weight_decay, **_option("MIL weight decay (AdamW)"))
    mil_val_fraction: float = field(
        default=0.0,
        **_option("share of each fold's training cases held out of MIL training (validation curves only)"),
    )
    mil_workers: int | None = field(
        default=None,
        **_option(
            "MIL cross-validations run side by side, one process and one thread each (the same results for "
            "any count; each holds its model's features in memory): default one per usable CPU core on a "
            "CPU (at most 3), 1 on a GPU"
        ),
    )
    devices: int = field(default=1, **_option("GPUs for the fit (DDP when more than one)"))
    device: Literal["auto", "cpu", "cuda"] = field(
        default="auto", **_option("where to extract and train: auto = cuda when a GPU is visible")
    )
    num_workers: int = field(default=4, **_option("data loader workers"))
    extract_batch_size: int = field(default=64, **_option("tiles per forward pass when extracting"))
    seed: int = field(
        default=0, **_option("seed of the student's random start, the hold-out draw, the fit, the folds")
    )
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
    student_start: (
        str  # "imagenet", "random", "weights:<file>" or a checkpoint's/export's own: where it starts
    )
    teacher_dim: int
    recipe: Path  # the fit's recipe file (--recipe, else the method's `METHOD_RECIPES`)

    @property
    def out(self) -> Path:
        return self.config.out

    @property
    def overwrite(self) -> bool:
        return self.config.overwrite

    @property
    def settings(self) -> dict:
        """What the outputs depend on (recorded with each stage; a resume must match)."""
        config = {
            key: str(value) if isinstance(value, Path) else value
            for key, value in dataclasses.asdict(self.config).items()
        }
        # Not what the outputs depend on: where and how fast (the MIL CV's files are the same for any
        # `mil_workers`, tested).
        for key in ("out", "overwrite", "device", "num_workers", "extract_batch_size", "mil_workers"):
            del config[key]
        return {**config, "tile_mpp": self.tile_mpp, "tile_px": self.tile_px}

    @property
    def tiles_dir(self) -> Path:
        """The tiling output (holding ``patches/``): ours, or --coords (given as that folder or its
        patches/)."""
        coords = self.config.coords
        if coords is None:
            return self.out / "tiles"
        return coords.parent if coords.name == "patches" and not (coords / "patches").is_dir() else coords

    @property
    def slides_dir(self) -> Path | None:
        """Where the slides of --coords are (CLAM and TRIDENT coords do not name them): --slides, else
        None."""
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
    recipe = _recipe(config)
    slide_ids = _slide_ids(config)
    if config.labels is not None:
        _check_labels(config.labels, slide_ids, config.folds, validation=config.mil_val_fraction > 0)
    try:
        teacher = create_backbone(config.teacher, weights=config.teacher_weights)
    except UserError as error:
        raise UserError(
            f"`teacher={config.teacher}`: {error} (for distill: `teacher_weights=FILE`)"
        ) from None
    student_start = (
        "random"
        if config.student_random_init
        else f"weights:{config.student_weights}"
        if config.student_weights
        else "its own (checkpoint or export)"
        if Path(config.student).exists()
        else "imagenet"
    )
    try:
        create_backbone(
            config.student, pretrained=not config.student_random_init, weights=config.student_weights
        )
    except UserError as error:
        raise UserError(
            f"`student={config.student}`: {error} (for distill: `student_weights=FILE` or "
            "`student_random_init=True`)"
        ) from None
    device = str(resolve_device(config.device))
    pre = teacher.preprocess
    if config.coords is not None:
        log(_describe_coords(config, pre.mpp))
    if config.mpp is None and pre.mpp is None:
        log(f"the teacher {config.teacher} records no mpp: tiles at 0.5 mpp (pass `mpp=...` to choose)")
    rng = random.Random(config.seed)
    held_out = tuple(sorted(rng.sample(sorted(slide_ids), round(config.holdout * len(slide_ids)))))
    if len(held_out) == len(slide_ids):
        raise UserError(
            f"`holdout={config.holdout}` keeps all {len(slide_ids)} slides out of the fit: lower it"
        )
    return DistillContext(
        config=config,
        device=device.split(":")[0],
        tile_mpp=config.mpp or pre.mpp or 0.5,
        tile_px=config.patch_size or pre.input_size,
        slide_ids=tuple(sorted(slide_ids)),
        held_out=held_out,
        student_start=student_start,
        teacher_dim=teacher.num_features,
        recipe=recipe,
    )


def _check_numbers(config: DistillConfig) -> None:
    if config.steps < 1:
        raise ConfigError(f"`steps={config.steps}`: must be at least 1")
    if not 0 <= config.holdout < 1:
        raise ConfigError(f"`holdout={config.holdout}`: must be in [0, 1)")
    for name in ("devices", "mil_workers"):
        if (value := getattr(config, name)) is not None and value < 1:
            raise ConfigError(f"`{name}={value}`: must be at least 1")
    for name in ("mpp", "patch_size", "batch_size", "window_stride", "mil_lr"):
        if (value := getattr(config, name)) is not None and value <= 0:
            raise ConfigError(f"`{name}={value}`: must be positive")
    if config.mil_seeds < 1:
        raise ConfigError(f"`mil_seeds={config.mil_seeds}`: must be at least 1")
    if config.mil_weight_decay < 0:
        raise ConfigError(f"`mil_weight_decay={config.mil_weight_decay}`: must be at least 0")
    if not 0 <= config.mil_val_fraction < 1:
        raise ConfigError(f"`mil_val_fraction={config.mil_val_fraction}`: must be in [0, 1)")
    for name, choices in (("target_norm", TARGET_NORMS), ("loss", MCMKD_LOSSES)):
        if (value := getattr(config, name)) is not None and value not in choices:
            raise ConfigError(f"`{name}={value}`: choose one of {', '.join(choices)}")
    if config.method == "moma" and (
        given := [name for name in MCMKD_ONLY if getattr(config, name) is not None]
    ):
        raise ConfigError(
            f"`{given[0]}=...` is MCM-KD's: drop it for `method=moma` (set MoMA's own in its `recipe=...`)"
        )
    if config.student_random_init and config.student_weights:
        raise ConfigError(
            "`student_random_init=True` and `student_weights=...` contradict each other: pass one of them"
        )
    if config.method == "moma" and config.patch_labels is None:
        raise ConfigError(
            "`method=moma` trains on labelled patches: pass `patch_labels=DIR_OR_CSV` (an image folder "
            "class/image, or a CSV path,label)"
        )
    if config.method == "mcmkd" and config.patch_labels is not None:
        raise ConfigError(
            "`patch_labels=...` is MoMA's: pass `method=moma`, or drop `patch_labels=...` for MCM-KD"
        )


def _check_paths(config: DistillConfig) -> None:
    named = {
        "slides": config.slides,
        "coords": config.coords,
        "labels": config.labels,
        "teacher_weights": config.teacher_weights,
        "student_weights": config.student_weights,
        "patch_labels": config.patch_labels,
    }
    for name, path in named.items():
        if path is not None and not Path(path).exists():
            raise UserError(f"`{name}={path}`: no such file or folder")
    if config.slides is None and config.coords is None:
        raise UserError(
            "pass `slides=FOLDER` (slides to tile), or `coords=...` of an earlier tile/CLAM/TRIDENT run "
            "(with `slides=...` for CLAM/TRIDENT coords)"
        )


def _slide_ids(config: DistillConfig) -> list[str]:
    """The cohort: the slide files of --slides, or the slide ids of the coords files of --coords (ours, CLAM's
    or TRIDENT's), each of whose slides must be found (`find_slide`: in --slides, else where the coords
    say)."""
    from histodistill.io import visible_files
    from histodistill.wsi.coords import coords_files, find_slide, read_coords
    from histodistill.wsi.formats import SLIDE_SUFFIXES

    if config.coords is not None:
        tilings = {path: read_coords(path)[1] for path in coords_files(config.coords)}
        for path, attrs in tilings.items():
            find_slide(path, attrs, config.slides)
        return [attrs["slide_id"] for attrs in tilings.values()]
    if not Path(config.slides).is_dir():
        raise UserError(f"`slides={config.slides}`: expected a folder of slides")
    slides = visible_files(config.slides, tuple(SLIDE_SUFFIXES))
    if not slides:
        raise UserError(
            f"`slides={config.slides}`: no slide files in this folder (looked for "
            f"{', '.join(sorted(SLIDE_SUFFIXES))})"
        )
    return [path.stem for path in slides]


def _describe_coords(config: DistillConfig, teacher_mpp: float | None) -> str:
    """One line: what the tiles of --coords are (the first file's; CLAM states no mpp, TRIDENT a
    magnification) and the mpp the teacher expects, which distill cannot check for coords without an mpp."""
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
    return (
        f"`coords={config.coords}`: {len(files)} slide(s); {files[0].name}: tiles of {attrs['patch_size']} "
        f"px = {attrs['patch_size_level0']} level-0 px {resolution}; the teacher {config.teacher} expects "
        f"{expects}"
    )


def _recipe(config: DistillConfig) -> Path:
    """The fit's recipe file: --recipe, a shipped recipe under configs/ or a YAML file, else the method's;
    it must fit the method's model (its ``model.class_path`` that of the method's own recipe)."""
    from histodistill.pipelines.recipes import configs_dir, recipe_model

    default = configs_dir() / METHOD_RECIPES[config.method]
    if config.recipe is None:
        return default
    shipped = configs_dir() / config.recipe
    path = shipped if shipped.is_file() else Path(config.recipe)
    if not path.is_file():
        raise UserError(
            f"`recipe={config.recipe}`: neither a recipe under {configs_dir()} (e.g. "
            f"{', '.join(METHOD_RECIPES.values())}) nor a YAML file"
        )
    model, expected = recipe_model(path), recipe_model(default)
    if model != expected:
        raise UserError(
            f"`recipe={config.recipe}` fits {model}, not {expected}: pass a recipe of "
            f"`method={config.method}` (e.g. {METHOD_RECIPES[config.method]})"
        )
    return path.resolve()


def _check_labels(labels: Path, slide_ids: list[str], folds: int, validation: bool) -> None:
    from histodistill.data.bags import read_labels
    from histodistill.data.splits import check_cases_per_class

    rows = read_labels(labels)
    missing = sorted({row.slide_id for row in rows} - set(slide_ids))
    if missing:
        raise UserError(
            f"`labels={labels}`: {len(missing)} labelled slide(s) are not among the {len(slide_ids)} "
            f"slides (e.g. {', '.join(missing[:3])}): fix the slide_id column or the slides"
        )
    if len({row.label for row in rows}) < 2:
        raise UserError(
            f"`labels={labels}`: every slide has the same label; the AUROC needs two classes at least"
        )
    check_cases_per_class(rows, folds, validation=validation)  # validation: --mil-val-fraction > 0

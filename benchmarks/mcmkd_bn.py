"""MCM-KD's BatchNorm statistics: updated on painted windows (default) or frozen (``freeze_bn_stats``)?

During MCM-KD fine-tuning the student's BatchNorm running statistics are, by default, updated on 3×3
context windows with masked cells painted over; after fine-tuning the student extracts single tiles, so
BatchNorm normalises single tiles with window statistics. ``freeze_bn_stats: true`` keeps the running
statistics the student started with.

This benchmark takes a finished ``histodistill demo`` output DIR and reruns the MCM-KD fit of the demo's
distill stage (`histodistill.demo.stages.distill_mcmkd`: `configs/mcmkd/tiny_cpu.yaml`, the trained MoMA
ResNet-18 as the start, the SD-MAE ViT teacher's cache of DIR, batch 8, the demo's step budget and window
stride: `mcmkd_overrides`) twice, BatchNorm statistics updated and frozen, then measures for each:

- agreement with the teacher where the student is used: mean cosine between the student's per-cell
  prediction on a **single tile** and the teacher feature of that tile, normalised as the run's targets
  (the demo's `MCMKD_TARGETS`), over every tile;
- the same on the training view: visible and masked cells of 3×3 windows (fixed masks);
- the demo's slide task (`histodistill.demo.slide_task.run_slide_task`: ABMIL, k-fold CV by case over
  several seeds, same folds for every row): slide AUROC [95 % CI], balanced accuracy, localisation AUROC;

and the slide task of the un-tuned MoMA student, the reference both must beat. It replaces the earlier
mode on random teacher and student (no knowledge to keep or lose, so it could not answer the question).

Run: ``histodistill demo --out DIR [--quick]`` first, then ``python -m benchmarks.mcmkd_bn --demo DIR``.
DIR is only read; everything is written under ``--work``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from benchmarks.common import markdown_table, write_section
from benchmarks.mcmkd import RECIPE, SIDE
from histodistill.cli import main as cli
from histodistill.data.context_windows import context_windows_of_dir, window_transform
from histodistill.demo.slide_task import run_slide_task
from histodistill.demo.stages import (
    EXTRACTORS,
    MCMKD_TARGETS,
    MCMKD_WINDOW_STRIDE,
    SLIDE_TILE_PX,
    mcmkd_overrides,
    recorded_sizes,
)
from histodistill.errors import UserError
from histodistill.features.extract import extract_slides
from histodistill.features.teacher_cache import ensure_teacher_cache
from histodistill.losses.masked_context import masked_context_loss
from histodistill.methods.mcmkd import MCMKD
from histodistill.models.backbones import create_backbone
from histodistill.models.cell_mask import random_cell_mask
from histodistill.models.weights import read_checkpoint


@torch.no_grad()
def teacher_agreement(model: MCMKD, tiles: Path, cache: Path, side: int, stride: int = 1) -> dict[str, float]:
    """Mean cosine to the teacher of visible (and, for side > 1, masked) cells over the windows of ``side``
    (every ``stride``-th tile as a window centre, as `context_windows_of_dir`)."""
    model.eval()
    dataset = context_windows_of_dir(
        tiles / "patches",
        cache,
        side,
        1.0 if side == 1 else 0.66,
        transform=window_transform(model.backbone.spec.preprocess, side),
        window_stride=stride,
    )
    generator = torch.Generator().manual_seed(0)  # the same masks for every model
    sums, counts = {"visible": 0.0, "masked": 0.0}, {"visible": 0, "masked": 0}
    for windows, _, valid, teacher in DataLoader(dataset, batch_size=32):
        masked = (
            random_cell_mask(len(valid), valid.shape[1], model.mask_ratio, generator=generator)
            if side > 1
            else torch.zeros_like(valid)
        )
        losses = masked_context_loss(
            model.predict_cells(windows, masked),
            teacher,
            masked,
            valid,
            "cosine",
            1.0,
            1.0,
            1.0,
            model.target_norm,
            model.target_mean,
            model.target_std,
        )
        for part, cells in (("visible", ~masked & valid), ("masked", masked & valid)):
            n = int(cells.sum())
            if n:
                sums[part] += (1 - float(losses[part])) * n
                counts[part] += n
    return {part: sums[part] / counts[part] for part in sums if counts[part]}


def demo_inputs(demo: Path) -> dict:
    """The paths the MCM-KD fit of the demo's distill stage used, whether the demo ran ``--quick`` and the
    fit's final train loss (from the stage records)."""
    paths = {
        "teacher": demo.joinpath(*EXTRACTORS["sdmae_vit"]),
        "student": demo.joinpath(*EXTRACTORS["moma_student"]),
        "tiles": demo / "tiles" / "slides",
        "slides": demo / "data" / "slides",
        "cache": demo / "distill" / "teacher",
        "stage": demo / "distill" / "stage.json",
        "fit": demo / "distill" / "fit" / "stage.json",
    }
    missing = [str(path) for path in paths.values() if not path.exists()]
    if missing:
        raise UserError(
            f"{missing[0]} is missing: --demo must be a finished `histodistill demo --out DIR` output"
        )
    quick = json.loads(paths["stage"].read_text())["settings"]["quick"]
    return {
        **paths,
        "quick": bool(quick),
        "loss": json.loads(paths["fit"].read_text())["summary"]["train_loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--demo", required=True, help="a finished `histodistill demo` output directory (only read)"
    )
    parser.add_argument(
        "--work", default="/tmp/histodistill_bench_mcmkd_bn", help="scratch directory (emptied first)"
    )
    parser.add_argument(
        "--window-stride",
        type=int,
        default=MCMKD_WINDOW_STRIDE,
        help="MCM-KD window stride (default: the demo's)",
    )
    parser.add_argument("--seeds", type=int, default=3, help="CV seeds of the slide task")
    parser.add_argument("--epochs", type=int, default=None, help="ABMIL epochs (default: the demo's)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the machine is shared)")
    args = parser.parse_args()
    demo = demo_inputs(Path(args.demo))
    task = recorded_sizes(Path(args.demo), "distill")
    stride = args.window_stride
    epochs = args.epochs or task["mil_epochs"]
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    load_start, total = os.getloadavg()[0], time.perf_counter()

    # A copy of the demo's teacher cache: the recipe may rebuild a stale cache, and DIR stays untouched.
    shutil.copytree(demo["cache"], work / "teacher_cache")
    teacher = str(demo["teacher"])
    teacher_dim = create_backbone(teacher).num_features
    cache = ensure_teacher_cache(demo["tiles"], work / "teacher_cache", teacher)

    cosines, final_loss, features = (
        {},
        {},
        {
            "moma_student": extract_slides(
                demo["student"], demo["tiles"], work / "features_moma", device="cpu"
            )
        },
    )
    for frozen in (False, True):
        run_dir = work / f"frozen_{frozen}"
        with contextlib.redirect_stdout(io.StringIO()):
            code = cli(
                [
                    "fit",
                    "--config",
                    str(RECIPE),
                    "--trainer.default_root_dir",
                    str(run_dir),
                    "--trainer.accelerator",
                    "cpu",
                    "--trainer.enable_progress_bar",
                    "false",
                    "--trainer.enable_model_summary",
                    "false",
                    *mcmkd_overrides(
                        demo["student"],
                        demo["teacher"],
                        demo["tiles"],
                        work / "teacher_cache",
                        task["mcmkd_steps"],
                    ),
                    "--model.init_args.freeze_bn_stats",
                    str(frozen).lower(),
                    "--data.init_args.window_stride",
                    str(stride),
                ]
            )
        if code != 0:
            raise SystemExit(f"MCM-KD fine-tuning failed (freeze_bn_stats={frozen})")
        checkpoint = run_dir / "checkpoints" / "last.ckpt"
        final_loss[frozen] = json.loads((run_dir / "metrics.json").read_text())["final"]["train/loss"]
        model = MCMKD(
            student=str(demo["student"]),
            teacher_dim=teacher_dim,
            pretrained=False,
            freeze_bn_stats=frozen,
            target_norm=MCMKD_TARGETS["target_norm"],
        )
        model.load_state_dict(read_checkpoint(checkpoint)["state_dict"])
        name = "mcmkd_frozen_bn" if frozen else "mcmkd_updated_bn"
        cosines[name] = (
            teacher_agreement(model, demo["tiles"], cache, 1),
            teacher_agreement(model, demo["tiles"], cache, SIDE, stride),
        )
        features[name] = extract_slides(checkpoint, demo["tiles"], work / f"features_{name}", device="cpu")

    scores = run_slide_task(
        features,
        demo["slides"],
        work / "mil",
        SLIDE_TILE_PX,
        folds=task["folds"],
        seeds=args.seeds,
        epochs=epochs,
    )
    labels = {
        "moma_student": "MoMA student, not fine-tuned (reference)",
        "mcmkd_updated_bn": "MCM-KD, BN statistics updated on windows (default)",
        "mcmkd_frozen_bn": "MCM-KD, BN statistics frozen (`freeze_bn_stats`)",
    }
    rows = []
    for name, label in labels.items():
        single, window = cosines.get(name, ({}, {}))
        s = scores[name]
        rows.append(
            [
                label,
                *(
                    f"{part[key]:.3f}" if part else "—"
                    for part, key in ((single, "visible"), (window, "visible"), (window, "masked"))
                ),
                f"{s['auroc']:.3f} [{s['auroc_ci'][0]:.3f}, {s['auroc_ci'][1]:.3f}]",
                f"{s['balanced_accuracy']:.3f}",
                "—" if s["localisation_auroc"] is None else f"{s['localisation_auroc']:.3f}",
            ]
        )
    slides = scores["moma_student"]["slides"]
    per_seed = "; ".join(
        f"{name} " + ", ".join(f"{v:.3f}" for v in scores[name]["auroc_per_seed"]) for name in labels
    )
    body = f"""
Input: `{args.demo}`, a `histodistill demo{" --quick" if demo["quick"] else ""}` output ({
        slides
    } semi-synthetic slides,
{SLIDE_TILE_PX}-px tiles at 0.5 mpp). Both MCM-KD runs are the demo's MCM-KD stage rerun from the same start
(the trained MoMA ResNet-18 student, seed 0), same data, same cached targets of the SD-MAE ViT teacher:
{task["mcmkd_steps"]} steps of `configs/mcmkd/tiny_cpu.yaml`, batch 8, window stride {
        stride
    }, once with BatchNorm
statistics updated on the painted windows, once frozen (the default run reproduces the demo's own MCM-KD fit:
final train loss {final_loss[False]:.4f}, demo {demo["loss"]:.4f}).

{
        markdown_table(
            [
                "student",
                "cos to teacher, single tiles",
                "cos, window visible cells",
                "cos, window masked cells",
                "slide AUROC [95 % CI]",
                "balanced accuracy",
                "localisation AUROC",
            ],
            rows,
        )
    }

Cosines are means over every tile (single tiles: the student's use after fine-tuning) or over every
visible / masked tissue cell of the 3×3 windows with ≥ 6 of 9 tissue cells, window stride {stride} as in
training (the training view, fixed masks); the un-tuned student has no head, so no cosine. Slide task: ABMIL \
on each student's tile
features (standardised, `histodistill mil`'s default), {task["folds"]}-fold CV by case × {args.seeds} seed(s)
(the same folds for every row at a seed), {epochs} epochs; AUROC of the pooled out-of-fold probabilities,
mean over seeds, 95 % CI a bootstrap over slides (`histodistill.eval.slide_task`). AUROC per seed: {per_seed}.

Total time: {time.perf_counter() - total:.0f} s ({args.threads} torch threads for training and extraction,
1 for MIL); load average (1 min) {load_start:.1f} at the start, {
        os.getloadavg()[0]:.1f} at the end, on a shared machine.
"""
    write_section("mcmkd_bn", "MCM-KD: BatchNorm statistics updated on windows vs frozen", body)


if __name__ == "__main__":
    main()

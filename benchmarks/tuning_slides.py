"""Tuning slides: where issue 26's levers are tried, so no choice is made on the demo's test folds.

60 semi-synthetic slides from another generator seed (1; the demo's are 0), tiled as the demo tiles, and the
two scores the demo reports, measured on them for any set of checkpoints:
- tile probe AUROC: a linear probe told every tile's tumour label, CV by slide, no MIL;
- slide AUROC [95 % CI]: the demo's ABMIL cross-validation (its MIL settings, folds by case, CV seeds,
  epochs).

Used by `benchmarks/sdmae_levers.py` and `benchmarks/student_levers.py`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from histodistill.demo.slide_task import exact_tumour, run_slide_task
from histodistill.demo.stages import SLIDE_TILE_PX, TILE_MPP
from histodistill.eval.slide_task import tile_probe_auroc
from histodistill.features.extract import extract_slides
from histodistill.samples.synthetic_slides import make_slides
from histodistill.wsi.tiling import tile_slide

TUNING_SEED = 1  # the tuning slides' generator seed (the demo's slides are seed 0)
TUNING_SLIDES = 60


@dataclass(frozen=True)
class TuningSlides:
    slides_dir: Path  # `make_slides` output: slides/, masks/, labels.csv
    tiles_dir: Path  # `tile_slide` output of every slide: patches/*.h5
    slide_ids: list[str]


def tuning_slides(work: Path) -> TuningSlides:
    """Make (once) and tile the tuning slides under ``work``: ``work/slides`` and ``work/tiles/slides``."""
    slides = work / "slides"
    if not (slides / "labels.csv").is_file():
        make_slides(slides, n_slides=TUNING_SLIDES, seed=TUNING_SEED, tile_px=SLIDE_TILE_PX, grid=8)
    tiles = work / "tiles" / "slides"
    for path in sorted(slides.rglob("*.tif")):
        tile_slide(path, tiles, target_mpp=TILE_MPP, patch_size=SLIDE_TILE_PX, min_tissue=0.5)
    with open(slides / "labels.csv", newline="") as handle:
        slide_ids = [row["slide_id"] for row in csv.DictReader(handle)]
    return TuningSlides(slides, tiles, slide_ids)


def score_extractors(
    checkpoints: dict[str, Path], tuning: TuningSlides, work: Path, sizes: dict
) -> dict[str, dict]:
    """``{name: {tile_probe, auroc, auroc_ci, ...}}`` of each checkpoint on the tuning slides (the slide
    scores of `histodistill.eval.slide_task.slide_task_scores`): its
    features under ``work/features/<name>``, ABMIL runs under ``work/mil/<name>``; ``sizes`` are the demo's
    recorded sizes (folds, CV seeds, MIL epochs). Finished features are reused; MIL runs are redone."""
    tumour = exact_tumour(tuning.slides_dir, SLIDE_TILE_PX)
    folders = {
        name: extract_slides(checkpoint, tuning.tiles_dir, work / "features" / name, device="cpu")
        for name, checkpoint in checkpoints.items()
    }
    slide_scores = run_slide_task(
        folders,
        tuning.slides_dir,
        work / "mil",
        SLIDE_TILE_PX,
        folds=sizes["folds"],
        seeds=sizes["seeds"],
        epochs=sizes["mil_epochs"],
    )
    return {
        name: {
            **slide_scores[name],
            "tile_probe": tile_probe_auroc(folder, tuning.slide_ids, tumour, folds=sizes["folds"]),
        }
        for name, folder in folders.items()
    }


def slide_cell(score: dict) -> str:
    """``0.912 [0.850, 0.960]``: a slide AUROC with its 95 % CI (``auroc``, ``auroc_ci`` of
    `histodistill.eval.slide_task.slide_task_scores`), as the demo's tables print it."""
    low, high = score["auroc_ci"]
    return f"{score['auroc']:.3f} [{low:.3f}, {high:.3f}]"


def scores_description(sizes: dict) -> str:
    """What the tuning slides' two scores are, for a benchmark page; ``sizes`` as in `score_extractors`."""
    folds, seeds = sizes["folds"], sizes["seeds"]
    return (
        f"{TUNING_SLIDES} tuning slides (generator seed {TUNING_SEED}, not the demo's): tile probe AUROC (a "
        f"linear probe told every tile's tumour label, {folds}-fold CV by slide, no MIL) and slide AUROC "
        f"[95 % CI] (ABMIL with the demo's MIL settings, {folds}-fold CV by case × {seeds} seeds)"
    )

"""MCM-KD's BatchNorm statistics: updated on painted windows (default) or frozen (``freeze_bn_stats``)?

During MCM-KD fine-tuning the student's BatchNorm running statistics are, by default, updated on 3×3
context windows with masked cells painted over; after fine-tuning the student extracts single tiles, so
BatchNorm normalises single tiles with window statistics. ``freeze_bn_stats: true`` keeps the running
statistics the student started with. This benchmark trains both from the same start, same seed, same
data (one epoch of `configs/mcmkd/tiny_cpu.yaml` on the semi-synthetic slides of `benchmarks.mcmkd`), then
measures, for each:

- agreement with the teacher where the student is used: mean cosine between the student's per-cell
  prediction on a **single tile** and the (LayerNorm-ed) teacher feature of that tile, over every tile;
- the same on the training view: visible and masked cells of 3×3 windows (fixed masks);
- ABMIL slide AUROC (k-fold CV by case) on per-tile features of each student.

Run: ``python -m benchmarks.mcmkd_bn`` (needs the cached samples: `histodistill samples fetch`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from benchmarks.common import markdown_table, mean_sd, write_section
from benchmarks.mcmkd import RECIPE, SIDE, STUDENT, TEACHER, TEACHER_DIM, TILE, mil_auroc
from histodistill.cli import main as cli
from histodistill.data.context_windows import context_windows_of_dir, window_transform
from histodistill.features.extract import extract_slides
from histodistill.features.teacher_cache import ensure_teacher_cache
from histodistill.losses.masked_context import masked_context_loss
from histodistill.methods.mcmkd import MCMKD
from histodistill.models.cell_mask import random_cell_mask
from histodistill.models.weights import read_checkpoint
from histodistill.samples.synthetic_slides import make_slides
from histodistill.wsi.tiling import tile_slide


@torch.no_grad()
def teacher_agreement(model: MCMKD, tiles: Path, cache: Path, side: int) -> dict[str, float]:
    """Mean cosine to the teacher of visible (and, for side > 1, masked) cells over all windows of ``side``."""
    model.eval()
    dataset = context_windows_of_dir(tiles / "patches", cache, side, 1.0 if side == 1 else 0.66,
                                     transform=window_transform(model.backbone.spec.preprocess, side))
    generator = torch.Generator().manual_seed(0)  # the same masks for every model
    sums, counts = {"visible": 0.0, "masked": 0.0}, {"visible": 0, "masked": 0}
    for windows, _, valid, teacher in DataLoader(dataset, batch_size=32):
        masked = (random_cell_mask(len(valid), valid.shape[1], model.mask_ratio, generator=generator) if side > 1
                  else torch.zeros_like(valid))
        losses = masked_context_loss(model.predict_cells(windows, masked), teacher, masked, valid, "cosine", 1.0, 1.0, 1.0)
        for part, cells in (("visible", ~masked & valid), ("masked", masked & valid)):
            n = int(cells.sum())
            if n:
                sums[part] += (1 - float(losses[part])) * n
                counts[part] += n
    return {part: sums[part] / counts[part] for part in sums if counts[part]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/histodistill_bench_mcmkd_bn", help="scratch directory (emptied first)")
    parser.add_argument("--slides", type=int, default=16, help="number of semi-synthetic slides (half positive)")
    parser.add_argument("--grid", type=int, default=6, help="synthetic cells per slide side (cells of 64 px)")
    parser.add_argument("--folds", type=int, default=4, help="MIL cross-validation folds (0: skip the MIL column)")
    parser.add_argument("--epochs", type=int, default=30, help="maximum MIL epochs per fold")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the machine is shared)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter()

    labels_csv = make_slides(work / "synthetic", n_slides=args.slides, seed=0, tile_px=TILE, grid=args.grid)
    for slide in sorted((work / "synthetic" / "slides").glob("*.tif")):
        tile_slide(slide, work / "tiles", target_mpp=0.5, patch_size=TILE, min_tissue=0.5)
    tiles = work / "tiles"
    cache = ensure_teacher_cache(tiles, tiles, TEACHER, rebuild=True, batch_size=64)

    rows = []
    for name, frozen in (("updated on windows (default)", False), ("frozen (freeze_bn_stats)", True)):
        run_dir = work / f"frozen_{frozen}"
        with contextlib.redirect_stdout(io.StringIO()):
            code = cli(["fit", "--config", str(RECIPE), "--trainer.default_root_dir", str(run_dir),
                        "--data.init_args.tiles_dir", str(tiles), "--model.init_args.freeze_bn_stats", str(frozen).lower(),
                        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"])
        assert code == 0, f"MCM-KD fine-tuning failed (freeze_bn_stats={frozen})"
        checkpoint = run_dir / "checkpoints" / "last.ckpt"
        model = MCMKD(student=STUDENT, teacher_dim=TEACHER_DIM, pretrained=False, freeze_bn_stats=frozen)
        model.load_state_dict(read_checkpoint(checkpoint)["state_dict"])
        single, windows = teacher_agreement(model, tiles, cache, 1), teacher_agreement(model, tiles, cache, SIDE)
        auroc = "not run"
        if args.folds:
            features = extract_slides(checkpoint, tiles, work / f"features_{frozen}", batch_size=64, device="cpu")
            auroc = mean_sd(mil_auroc(features, labels_csv, args.folds, args.epochs))
        rows.append([name, f"{single['visible']:.3f}", f"{windows['visible']:.3f}", f"{windows['masked']:.3f}", auroc])

    auroc_note = (f" With {args.folds} folds of {args.slides} slides the AUROC sd is wide." if args.folds
                  else " MIL was not run (`--folds 0`).")
    body = f"""
Same start (random `{STUDENT}`, seed 0), same data and masks: one epoch of `configs/mcmkd/tiny_cpu.yaml` on
{args.slides} semi-synthetic slides ({TILE}-px tiles at 0.5 mpp), random `{TEACHER}` teacher (no hub offline),
once with BatchNorm statistics updated on the painted windows, once frozen.

{markdown_table(["BatchNorm statistics", "cos to teacher, single tiles", "cos, window visible cells",
                 "cos, window masked cells", f"ABMIL AUROC ({args.folds} folds)"], rows)}

Cosines are means over every tile (single tiles: the student's use after fine-tuning) or over every
visible / masked tissue cell of the 3×3 windows with ≥ 6 of 9 tissue cells (the training view, fixed
masks). The teacher and the student start are random, so this measures the train-window → single-tile
transfer of the distillation, not pathology knowledge.{auroc_note}

Total time: {time.perf_counter() - total:.0f} s ({args.threads} torch threads).
"""
    write_section("mcmkd_bn", "MCM-KD: BatchNorm statistics updated on windows vs frozen", body)


if __name__ == "__main__":
    main()

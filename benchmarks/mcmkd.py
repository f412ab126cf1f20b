"""MCM-KD on semi-synthetic slides: does one epoch of fine-tuning help MIL, and what does the teacher cache
save?

Pipeline, all on this CPU: `make_slides` (real stain-normalised tiles, half the slides with a tumour
region) -> `tile_slide` (64-px tiles at 0.5 mpp) -> the teacher's cache (`ensure_teacher_cache`, i.e.
`extract` with the teacher) -> one epoch of `histodistill fit --config configs/mcmkd/tiny_cpu.yaml` on
those tiles -> features of every tile from the un-tuned student, the tuned student (per patch and with
``--context-window 3``) and the teacher -> ABMIL with k-fold CV by case (`histodistill.eval.mil`).

Also measured, as ratios against a baseline of the same run: extraction throughput of each extractor
(baseline: the teacher), and the time of fine-tuning steps that read the cache vs steps that run the
teacher on every tissue cell of every window (`LiveTeacherMCMKD`, defined here only for this
comparison; baseline: the cache). A model-only forward comparison at the real recipe's sizes (ResNet-50
student vs a ViT-L/16 teacher with UNI's architecture, 224 px, random weights) puts the tiny models'
ratio in context.

Needs the cached samples (`histodistill samples fetch`). Run: ``python -m benchmarks.mcmkd``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from benchmarks.common import markdown_table, mean_sd, median_seconds, write_section
from histodistill.cli import main as cli
from histodistill.data.bags import BagDataset, class_names, make_bags, read_labels
from histodistill.data.context_windows import context_windows_of_dir, window_transform
from histodistill.data.splits import make_splits
from histodistill.data.transforms import build_transform
from histodistill.eval.mil import TrainConfig, run_fold
from histodistill.features.extract import extract_slides
from histodistill.features.teacher_cache import ensure_teacher_cache
from histodistill.methods.mcmkd import MCMKD
from histodistill.models.backbones import Backbone, create_backbone
from histodistill.samples.synthetic_slides import make_slides
from histodistill.wsi.coords import read_coords
from histodistill.wsi.tiling import tile_slide

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "mcmkd" / "tiny_cpu.yaml"
STUDENT, TEACHER, TEACHER_DIM = "tiny/resnet18-64", "tiny/vit-tiny-p8-64", 192  # as in the recipe
SIDE, TILE = 3, 64


class LiveTeacherMCMKD(MCMKD):
    """BENCHMARK ONLY, not part of the toolkit: MCM-KD whose training step runs the frozen teacher on every
    tissue cell of each window, as a method without a cache would. Batches carry the raw uint8 window; the
    student gets it normalised as `window_transform` does, the teacher gets each cell alone with its own
    eval transform, exactly what the cache holds."""

    def __init__(self, teacher: Backbone, **kwargs) -> None:
        super().__init__(**kwargs)
        self.teacher = teacher.eval().requires_grad_(False)
        self.teacher_transform = build_transform("eval", teacher.spec.preprocess, train=False)
        self.student_transform = window_transform(self.backbone.spec.preprocess, SIDE)

    def train(self, mode: bool = True) -> LiveTeacherMCMKD:
        super().train(mode)
        self.teacher.eval()  # frozen: never in training mode (dropout, norm statistics)
        return self

    def objective(self, batch) -> dict[str, torch.Tensor]:
        raw, cell_coords, valid, _ = batch  # (B, 3, P, P) uint8, (B, S, 2), (B, S), (B, S, 0)
        b, _, side_px, _ = raw.shape
        p = side_px // SIDE
        cells = raw.reshape(b, 3, SIDE, p, SIDE, p).permute(0, 2, 4, 1, 3, 5)  # (B, s, s, 3, p, p), row-major
        # tissue cells only, as in the cache
        cells = cells.reshape(b * SIDE * SIDE, 3, p, p)[valid.reshape(-1)]
        teacher = torch.zeros(b * SIDE * SIDE, TEACHER_DIM)
        with torch.no_grad():
            teacher[valid.reshape(-1)] = self.teacher(self.teacher_transform(cells))  # (n_valid, D)
        batch = (
            self.student_transform(raw),
            cell_coords,
            valid,
            teacher.reshape(b, SIDE * SIDE, TEACHER_DIM),
        )
        return super().objective(batch)


def train_seconds(method: MCMKD, loader: DataLoader) -> float:
    """Wall time of training steps (read, objective, backward, AdamW) over every batch of ``loader``."""
    optimizer = torch.optim.AdamW(method.parameters(), lr=1e-3)
    method.train()
    start = time.perf_counter()
    for batch in loader:
        loss = method.objective(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def cache_vs_live(tiles: Path, cache: Path, windows: int, batch_size: int) -> dict[str, float]:
    """Seconds for the same ``windows`` windows (same order, same seeds) with the cache and with a live
    teacher."""

    def method(live: bool) -> MCMKD:
        torch.manual_seed(0)
        kwargs = dict(student=STUDENT, teacher_dim=TEACHER_DIM, pretrained=False)
        return (
            LiveTeacherMCMKD(create_backbone(TEACHER, pretrained=False), **kwargs)
            if live
            else MCMKD(**kwargs)
        )

    seconds = {}
    for name, live in (("cache", False), ("live teacher", True)):
        model = method(live)
        transform = None if live else window_transform(model.backbone.spec.preprocess, SIDE)
        dataset = context_windows_of_dir(
            tiles / "patches", None if live else cache, SIDE, 0.66, transform=transform
        )
        subset = Subset(dataset, range(min(windows, len(dataset))))
        torch.manual_seed(1)  # the same masks in both runs
        seconds[name] = train_seconds(model, DataLoader(subset, batch_size=batch_size))
    seconds["windows"] = len(subset)
    return seconds


def mil_auroc(features_dir: Path, labels_csv: Path, folds: int, epochs: int) -> list[float]:
    """ABMIL test AUROC per fold (CV by case, the `histodistill mil` defaults but lr 5e-4)."""
    rows = read_labels(labels_csv)
    classes = class_names(rows)
    dataset = BagDataset(features_dir, make_bags(rows, classes))
    config = TrainConfig(epochs=epochs, lr=5e-4, patience=10, seed=0, device="cpu")
    results = [
        run_fold(k, dataset, split, "abmil", len(classes), config)
        for k, split in enumerate(make_splits(rows, folds, seed=0))
    ]
    return [float(r.metrics["auroc"]) for r in results]


def forward_ratio(batch: int) -> tuple[float, float]:
    """Model-only forward seconds per image at the real recipe's sizes: ResNet-50 and ViT-L/16 (UNI's
    shape)."""
    times, images = [], torch.randn(batch, 3, 224, 224)
    for name in ("resnet50", "vit_large_patch16_224"):
        model = create_backbone(name, pretrained=False).eval()  # timing only
        with torch.inference_mode():
            times.append(median_seconds(lambda m=model: m(images), repeats=3, warmup=1) / batch)
    return times[0], times[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--work", default="/tmp/histodistill_bench_mcmkd", help="scratch directory (emptied first)"
    )
    parser.add_argument(
        "--slides", type=int, default=16, help="number of semi-synthetic slides (half positive)"
    )
    parser.add_argument("--grid", type=int, default=6, help="synthetic cells per slide side (cells of 64 px)")
    parser.add_argument("--folds", type=int, default=4, help="MIL cross-validation folds")
    parser.add_argument("--epochs", type=int, default=30, help="maximum MIL epochs per fold")
    parser.add_argument(
        "--timing-windows", type=int, default=24, help="windows timed with the cache and live"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the machine is shared)")
    parser.add_argument(
        "--skip-real-sizes", action="store_true", help="skip the ResNet-50 vs ViT-L forward timing"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)  # every timing below is of a fresh run, never of a skip
    total = time.perf_counter()

    labels_csv = make_slides(work / "synthetic", n_slides=args.slides, seed=0, tile_px=TILE, grid=args.grid)
    for slide in sorted((work / "synthetic" / "slides").glob("*.tif")):
        tile_slide(slide, work / "tiles", target_mpp=0.5, patch_size=TILE, min_tissue=0.5)
    tiles = work / "tiles"
    n_tiles = sum(len(read_coords(p)[0]) for p in (tiles / "patches").glob("*.h5"))

    features: dict[str, Path] = {}
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    features["teacher (tiny ViT, random)"] = ensure_teacher_cache(
        tiles, tiles, TEACHER, rebuild=True, batch_size=64, pretrained=False
    )
    seconds["teacher (tiny ViT, random)"] = time.perf_counter() - start

    run_dir = work / "mcmkd_tuned"
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        code = cli(
            [
                "fit",
                "--config",
                str(RECIPE),
                "--trainer.default_root_dir",
                str(run_dir),
                "--data.init_args.tiles_dir",
                str(tiles),
                "--trainer.enable_progress_bar",
                "false",
                "--trainer.enable_model_summary",
                "false",
            ]
        )
    assert code == 0, "MCM-KD fine-tuning failed"
    fit_seconds = time.perf_counter() - start
    checkpoint = run_dir / "checkpoints" / "last.ckpt"

    for name, model, context in (
        ("student, un-tuned", STUDENT, None),
        ("student, MCM-KD", checkpoint, None),
        ("student, MCM-KD, context 3", checkpoint, SIDE),
    ):
        start = time.perf_counter()
        # the un-tuned student is random
        features[name] = extract_slides(
            model,
            tiles,
            work / "features",
            batch_size=64,
            device="cpu",
            context_window=context,
            pretrained=False,
        )
        seconds[name] = time.perf_counter() - start

    auroc = {
        name: mil_auroc(folder, labels_csv, args.folds, args.epochs) for name, folder in features.items()
    }
    timing = cache_vs_live(tiles, features["teacher (tiny ViT, random)"], args.timing_windows, batch_size=4)
    real = None if args.skip_real_sizes else forward_ratio(batch=1)

    teacher_rate = n_tiles / seconds["teacher (tiny ViT, random)"]
    rows = [
        [
            name,
            mean_sd(auroc[name]),
            f"{n_tiles / seconds[name]:.1f}",
            f"{n_tiles / seconds[name] / teacher_rate:.2f}",
        ]
        for name in features
    ]
    windows = len(context_windows_of_dir(tiles / "patches", None, SIDE, 0.66))
    per_window = {k: timing[k] / timing["windows"] for k in ("cache", "live teacher")}
    live_rows = [
        [k, f"{1000 * v:.0f}", f"{v * windows:.0f}", f"{v / per_window['cache']:.2f}"]
        for k, v in per_window.items()
    ]
    real_text = (
        ""
        if real is None
        else (
            f"\nAt the real recipe's sizes (model-only forward, batch 1, 224 px, random weights): ResNet-50 "
            f"{1000 * real[0]:.0f} ms/image, ViT-L/16 (UNI's architecture) {1000 * real[1]:.0f} ms/image: "
            f"the student extracts **{real[1] / real[0]:.1f}×** faster than a UNI-sized teacher, and a live "
            "teacher would cost 9 such forwards per 3×3 window.\n"
        )
    )
    body = f"""
{args.slides} semi-synthetic slides (`make_slides`: real stain-normalised tiles, half with a tumour region,
{args.grid}×{args.grid} cells of {TILE} px at 0.5 mpp), tiled into {n_tiles} tiles of {TILE} px; {windows} 3×3
windows with ≥ 6 of 9 tissue cells. Student `{STUDENT}` and teacher `{TEACHER}` are both **randomly
initialised** (no model hub offline): the teacher's features carry no pathology knowledge, so this
checks that the pipeline runs end to end and what it costs, not the paper's accuracy gain.
MCM-KD = one epoch of `configs/mcmkd/tiny_cpu.yaml` on these tiles ({fit_seconds:.0f} s for the whole
`histodistill fit` run, cache already built).

**Slide classification (ABMIL, {args.folds}-fold CV by case, ≤ {args.epochs} epochs, lr 5e-4; test AUROC
mean ± sd over folds) and extraction throughput (`extract_slides` on all {n_tiles} tiles, batch 64, one
process; baseline: the teacher, whose run is the cache build):**

{markdown_table(["features", "MIL AUROC", "tiles/s", "× teacher"], rows)}

**Fine-tuning with the cache vs with a live teacher** (the same {timing["windows"]} windows, batch 4, same
seeds; a training step = read + objective + backward + AdamW; baseline: the cache; epoch = {windows} windows):

{markdown_table(["teacher features from", "ms / window", "s / epoch (est.)", "× cache"], live_rows)}

The live variant (`LiveTeacherMCMKD` in this script, not in the toolkit) runs the teacher on every tissue
cell of every window, so each tile passes through the teacher about 9 times per epoch; the cache runs it
once per tile, before training ({seconds["teacher (tiny ViT, random)"]:.0f} s here), and is reused by every
later run with the same teacher and tiling.
{real_text}
Timings share 2 CPU cores with other work: rows of the same architecture (un-tuned vs MCM-KD student)
show how much end-to-end rates on one run wander. The `fit` run's time includes Lightning's start-up and
the run directory; the per-window rows above are the training steps alone. With {args.folds} folds of
{args.slides} slides each test fold holds {args.slides // args.folds} slides, so the AUROC sd is wide: read
the MIL column as "the features carry slide-level signal", not as a ranking.

Total time of this benchmark: {time.perf_counter() - total:.0f} s ({args.threads} torch threads).
"""
    write_section("mcmkd", "MCM-KD: fine-tuning for MIL, context extraction, teacher cache", body)


if __name__ == "__main__":
    main()

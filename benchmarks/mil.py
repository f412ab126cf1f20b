"""MIL on the semi-synthetic slides: slide AUROC per extractor × MIL model, and attention localisation.

Pipeline, all on this CPU: `make_slides` (real tiles, known tumour cells) → `tile_slide` →
`extract_slides` per extractor → `histodistill mil` per model (k-fold by case) → for each positive
slide, the AUROC of its out-of-fold instance scores against the true tumour tiles (localisation).

Extractors: a random-init ResNet-18 (no pretrained weights are reachable offline), a colour-only
control (LAB mean and sd of each tile: the slide task must NOT be solvable from colour once the
sources are stain-normalised), and two trained ones from `histodistill demo` when its outputs exist
(or given with ``--sdmae CKPT`` / ``--supervised CKPT``): the SD-MAE ViT and the small supervised CNN
(the demo's ResNet-34 teacher, trained on the labeled nuclei).
The mean-pooling model is the baseline the attention models are compared with.

Needs the cached samples (`histodistill samples fetch`). Run: ``python -m benchmarks.mil``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import time
from pathlib import Path

import h5py
import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score

from benchmarks.common import markdown_table, mean_sd, write_section
from histodistill.cli import main as cli
from histodistill.features.extract import extract_slides, model_slug
from histodistill.io import atomic_path
from histodistill.samples.stain_norm import rgb_to_lab
from histodistill.samples.synthetic_slides import make_slides, tumor_tile_labels
from histodistill.wsi.slide import open_slide
from histodistill.wsi.tiling import read_coords, tile_slide

ROOT = Path(__file__).resolve().parents[1]
DEMO_OUT = ROOT / "demo_out"  # where `histodistill demo` writes when run from the repository root
MODELS = ("mean", "abmil", "transmil")
# TransMIL at its paper width (512) takes minutes per fold on a shared 2-core CPU; 128 keeps the run short.
MODEL_ARGS = {"mean": [], "abmil": [], "transmil": ["--hidden-dim", "128"]}


def colour_features(patches_dir: Path, out_dir: Path) -> Path:
    """Per tile: LAB mean and sd (6 numbers), the colour-only control extractor."""
    for coords_path in sorted(patches_dir.glob("*.h5")):
        if (out_dir / coords_path.name).exists():
            continue
        coords, attrs = read_coords(coords_path)
        slide = open_slide(attrs["slide_path"])
        size = int(attrs["patch_size_level0"])
        feats = []
        for x, y in coords:
            lab = rgb_to_lab(slide.read_region((int(x), int(y)), 0, (size, size))).reshape(-1, 3)
            feats.append(np.concatenate([lab.mean(0), lab.std(0)]))
        with atomic_path(out_dir / coords_path.name) as tmp, h5py.File(tmp, "w") as handle:
            handle["features"] = np.asarray(feats, np.float32)
            handle["coords"] = coords
            handle.attrs.update(patch_size_level0=size)
    return out_dir


def localisation(run_dir: Path, masks_dir: Path, labels: dict[str, str], tile_px: int) -> list[float]:
    """Per positive slide: AUROC of its instance scores for 'this tile is tumour'."""
    values = []
    for slide_id, label in labels.items():
        if label != "positive":
            continue
        with h5py.File(run_dir / "attention" / f"{slide_id}.h5") as handle:
            coords, scores = handle["coords"][:], handle["scores"][:]
        truth = tumor_tile_labels(masks_dir, slide_id, coords, tile_px)
        if 0 < truth.sum() < len(truth):
            values.append(float(roc_auc_score(truth, scores)))
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/histodistill_bench_mil", help="scratch directory")
    parser.add_argument("--slides", type=int, default=20, help="number of semi-synthetic slides")
    parser.add_argument("--grid", type=int, default=8, help="cells per slide side")
    parser.add_argument("--tile-px", type=int, default=160, help="tile size in pixels at 0.5 mpp")
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--sdmae", default=str(DEMO_OUT / "sdmae" / "run" / "checkpoints" / "last.ckpt"),
                        help="SD-MAE checkpoint (.ckpt) to add as an extractor (default: the demo's, if it exists)")
    parser.add_argument("--supervised", default=str(DEMO_OUT / "teacher" / "run" / "checkpoints" / "last.ckpt"),
                        help="supervised CNN checkpoint (.ckpt) to add as an extractor (default: the demo's "
                        "ResNet-34 teacher, if it exists)")
    args = parser.parse_args()
    work = Path(args.work)
    timings = {}

    start = time.perf_counter()
    labels_csv = make_slides(work / "synthetic", n_slides=args.slides, seed=0, tile_px=args.tile_px, grid=args.grid)
    labels = dict(line.split(",")[1:3] for line in labels_csv.read_text().splitlines()[1:])
    for slide in sorted((work / "synthetic" / "slides").glob("*.tif")):
        tile_slide(slide, work / "tiles", target_mpp=0.5, patch_size=args.tile_px, min_tissue=0.5)
    timings["make + tile"] = time.perf_counter() - start

    extractors: dict[str, Path] = {}
    start = time.perf_counter()
    extractors["colour (LAB mean+sd)"] = colour_features(work / "tiles" / "patches", work / "features_colour")
    timings["colour features"] = time.perf_counter() - start
    trained = {"SD-MAE ViT (demo)": args.sdmae, "supervised ResNet-34 (demo)": args.supervised}
    backbones = {"resnet18 (random init)": "resnet18"} | {k: v for k, v in trained.items() if Path(v).is_file()}
    for name, model in backbones.items():
        start = time.perf_counter()
        # One --out per extractor: the demo's checkpoints are all named run/checkpoints/last.ckpt.
        out = work / "features" / model_slug(name)
        # pretrained=False: the random-init baseline is meant; checkpoints carry their own weights anyway.
        extractors[name] = extract_slides(model, work / "tiles", out, batch_size=32, device="cpu", pretrained=False)
        timings[f"extract {name}"] = time.perf_counter() - start

    rows, heatmap_run, n_tiles = [], None, 0
    for name, features_dir in extractors.items():
        for model in MODELS:
            run_dir = work / "runs" / f"{model_slug(name)}_{model}"
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                code = cli(["mil", "--features", str(features_dir), "--labels", str(labels_csv), "--model", model,
                            "--folds", str(args.folds), "--epochs", str(args.epochs), "--lr", "5e-4", "--patience", "10",
                            "--out", str(run_dir), "--overwrite", "--seed", "0", *MODEL_ARGS[model]])
            assert code == 0, f"mil failed for {name} / {model}"
            seconds = time.perf_counter() - start
            metrics = json.loads((run_dir / "metrics.json").read_text())
            auroc = [fold["auroc"] for fold in metrics["folds"]]
            loc = localisation(run_dir, work / "synthetic" / "masks", labels, args.tile_px)
            rows.append([name, model, mean_sd(auroc), mean_sd([f["balanced_accuracy"] for f in metrics["folds"]]),
                         mean_sd(loc) if loc else "n/a", f"{seconds:.0f}"])
            if name.startswith("resnet18") and model == "abmil":
                heatmap_run = run_dir
    for coords_path in (work / "tiles" / "patches").glob("*.h5"):
        n_tiles += len(read_coords(coords_path)[0])

    if heatmap_run is not None:
        positive = next(s for s, label in labels.items() if label == "positive")
        cli(["heatmap", "--run", str(heatmap_run), "--slides", str(work / "synthetic" / "slides"), "--slide-id", positive,
             "--top-k", "6", "--thumbnail-size", "640"])
        with Image.open(heatmap_run / "figures" / "heatmaps" / f"{positive}_heatmap.png") as png:
            small = png.convert("RGB").resize((800, round(png.height * 800 / png.width)), Image.Resampling.LANCZOS)
            small = small.quantize(256)  # a palette PNG keeps the committed figure small
            with atomic_path(ROOT / "docs" / "img" / "mil_heatmap.png") as tmp:
                small.save(tmp, optimize=True)

    body = f"""
{args.slides} semi-synthetic slides ({labels_csv.parent}: half positive, {args.grid}×{args.grid} cells of
{args.tile_px} px at 0.5 mpp, {n_tiles} tissue tiles in all), {args.folds}-fold CV by case, at most
{args.epochs} epochs, AdamW lr 5e-4, TransMIL width 128 (not 512, for CPU time), early stopping on validation loss (patience 10). Slide AUROC and
balanced accuracy: mean ± sd over folds. Localisation: per positive slide, the AUROC of the out-of-fold
instance scores (attention for ABMIL/TransMIL, instance logits for mean pooling) against the true tumour
tiles; mean ± sd over positive slides. The colour-only extractor is a control: near 0.5 means the stain
normalisation removed the colour shortcut.

{markdown_table(["extractor", "MIL model", "slide AUROC", "balanced acc.", "localisation AUROC", "seconds"], rows)}

Stage times (s): {", ".join(f"{k} {v:.0f}" for k, v in timings.items())}.
Trained extractors come from `histodistill demo` (its `sdmae` and `teacher` stages: a tiny SD-MAE ViT
pretrained on the sample slide's tiles, and a ResNet-34 trained on the labeled hgsc nuclei); they are
left out when the demo has not been run ({", ".join(k for k in trained if k not in backbones) or "none left out"}).
No ImageNet or pathology weights are reachable offline.
"""
    write_section("mil", "MIL on semi-synthetic slides", body)


if __name__ == "__main__":
    main()

"""The slide task on a set of extractors, shared by the demo's ``features`` and ``mil`` stages and
``benchmarks/mil.py``, so both measure the same way:

- `measure_extractors`: tile features of every slide per extractor, timed (tiles/s end to end), with
  each network's parameter count and linear-probe balanced accuracy on the nuclei task;
- `run_slide_task`: `histodistill mil` per extractor and CV seed, then the scores of
  `histodistill.eval.slide_task` (slide AUROC [95 % CI], balanced accuracy, localisation).
"""

from __future__ import annotations

import time
from pathlib import Path

from histodistill.errors import UserError

COLOUR = None  # the model value that stands for the colour-only control in `measure_extractors`
# `histodistill mil` options of the slide task, chosen on tuning slides (generator seed 1, never the
# demo's seed-0 slides; docs/mil.md): with early stopping on a validation part of ~10 slides, folds kept
# epoch 1-5 models (SD-MAE ViT 0.51 vs 0.66 for a fixed 40 epochs at lr 2e-3).
MIL_OPTIONS = ("--lr", "2e-3", "--weight-decay", "1e-2", "--early-stop", "none")


def probe_nuclei(model: str | Path, nuclei_dir: Path, out_dir: Path, device: str) -> float:
    """Linear-probe balanced accuracy of ``model``'s frozen features on the nuclei task
    (``nuclei_dir/{train,test}``); features are cached under ``out_dir``."""
    from histodistill.eval.probe import linear_probe, load_patch_features
    from histodistill.features.extract import extract_images

    feats = {split: load_patch_features(extract_images(model, nuclei_dir / split, out_dir / split, device=device))
             for split in ("train", "test")}
    result = linear_probe(feats["train"].features, feats["train"].labels, feats["test"].features,
                          feats["test"].labels, seed=0)
    return round(float(result.metrics["balanced_accuracy"]), 3)


def measure_extractors(models: dict[str, str | Path | None], tiles_dir: Path, out_dir: Path, nuclei_dir: Path,
                       device: str) -> dict[str, dict]:
    """``{name: {features_dir, tiles_per_s, parameters, probe_balanced_accuracy}}``; a model of `COLOUR`
    is the colour-only control (no parameters, no probe). Features go to ``out_dir/<name>/features_*``,
    probe features to ``out_dir/probe/<name>``. ``tiles_per_s`` counts only the slides extracted by this
    call (a resumed extraction skips finished slides), and is None when every slide was already done."""
    from histodistill.features.colour import colour_features
    from histodistill.features.extract import extract_slides
    from histodistill.features.throughput import extraction_rate, finished_slides, parameters
    from histodistill.models.backbones import create_backbone

    rows = {}
    for name, model in models.items():
        done_before = {slide for folder in (out_dir / name).glob("features_*") for slide in finished_slides(folder)}
        start = time.perf_counter()
        if model is COLOUR:
            folder = colour_features(tiles_dir, out_dir / name)
        else:
            folder = extract_slides(model, tiles_dir, out_dir / name, device=device)
        rows[name] = {
            "features_dir": str(folder), "tiles_per_s": extraction_rate(folder, done_before, time.perf_counter() - start),
            "parameters": 0 if model is COLOUR else parameters(create_backbone(model)),
            "probe_balanced_accuracy": None if model is COLOUR else probe_nuclei(model, nuclei_dir,
                                                                                 out_dir / "probe" / name, device),
        }
    return rows


def _mil_run(argv: list[str]) -> tuple[int, str]:
    """One `histodistill mil` run on one intra-op thread; returns (exit code, what it printed), so runs in
    parallel processes print whole, one after another."""
    import contextlib
    import io

    import torch

    from histodistill.cli import main as cli

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            code = cli(argv)
    finally:
        torch.set_num_threads(threads)
    return code, printed.getvalue()


def mil_workers(device: str) -> int:
    """Parallel `histodistill mil` processes: one per usable CPU core on the CPU (a bag of a few dozen
    tiles is too small to split over threads, so cores are used by running folds' runs side by side);
    one on a GPU, which a single run already keeps busy."""
    from histodistill.distributed import usable_cpus

    return usable_cpus() if device == "cpu" else 1


def run_slide_task(features: dict[str, Path], slides_dir: Path, out: Path, tile_px: int, *, model: str = "abmil",
                   folds: int = 5, seeds: int = 3, epochs: int = 40, device: str = "cpu",
                   extra: list[str] | None = None, workers: int | None = None) -> dict[str, dict]:
    """``{extractor: scores}`` for features folders ``{extractor: <features_*> dir}`` of the slides in
    ``slides_dir`` (`make_slides` output: ``labels.csv``, ``masks/``); runs go to ``out/<extractor>/seed_<s>``.
    The same seed gives the same folds for every extractor (the splits depend on the labels and seed only).
    Runs are independent and seeded, so ``workers`` parallel processes (default `mil_workers`) give the
    same files as one; each run's output is printed whole when it ends."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    runs = {name: [out / name / f"seed_{seed}" for seed in range(seeds)] for name in features}
    argvs = [["mil", "--features", str(features[name]), "--labels", str(slides_dir / "labels.csv"), "--model", model,
              "--folds", str(folds), "--epochs", str(epochs), *MIL_OPTIONS, "--seed", str(seed), "--out", str(run),
              "--device", device, "--overwrite", *(extra or [])]
             for name in features for seed, run in enumerate(runs[name])]
    workers = min(workers or mil_workers(device), len(argvs))
    if workers > 1:
        # spawn, not fork: a forked child would inherit the parent's torch thread pools mid-state.
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            outcomes = list(pool.map(_mil_run, argvs))
    else:
        outcomes = [_mil_run(argv) for argv in argvs]
    for argv, (code, printed) in zip(argvs, outcomes, strict=True):
        print(printed, end="")
        if code != 0:
            raise UserError(f"`histodistill {' '.join(argv)}` failed (see the message above)")
    return score_runs(runs, slides_dir, tile_px)


def score_runs(runs: dict[str, list[Path]], slides_dir: Path, tile_px: int) -> dict[str, dict]:
    """``{extractor: scores}`` (`histodistill.eval.slide_task.slide_task_scores`) of finished `histodistill mil`
    runs ``{extractor: [run dir per CV seed]}`` on the slides of ``slides_dir`` (their exact tumour masks)."""
    from histodistill.eval.slide_task import slide_task_scores

    tumour = exact_tumour(slides_dir, tile_px)
    return {name: slide_task_scores(paths, tumour) for name, paths in runs.items()}


def exact_tumour(slides_dir: Path, tile_px: int):
    """``tumour(slide_id, coords (N, 2)) -> (N,) bool``: which tiles of a slide in ``slides_dir`` (`make_slides`
    output) lie in its exact tumour mask; what localisation and tile-probe AUROCs are scored against."""
    from histodistill.samples.synthetic_slides import tumor_tile_labels

    def tumour(slide_id, coords):
        return tumor_tile_labels(slides_dir / "masks", slide_id, coords, tile_px)

    return tumour

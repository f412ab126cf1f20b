"""The slide task on a set of extractors: `histodistill mil` per extractor and CV seed, then the
scores of `histodistill.eval.slide_task` (slide AUROC [95 % CI], balanced accuracy, localisation).

Shared by the demo's ``mil`` stage and ``benchmarks/mil.py``, so both measure the same way.
"""

from __future__ import annotations

from pathlib import Path

from histodistill.errors import UserError


def run_slide_task(features: dict[str, Path], slides_dir: Path, out: Path, tile_px: int, *, model: str = "abmil",
                   folds: int = 5, seeds: int = 3, epochs: int = 40, device: str = "cpu",
                   extra: list[str] | None = None) -> dict[str, dict]:
    """``{extractor: scores}`` for features folders ``{extractor: <features_*> dir}`` of the slides in
    ``slides_dir`` (`make_slides` output: ``labels.csv``, ``masks/``); runs go to ``out/<extractor>/seed_<s>``.
    The same seed gives the same folds for every extractor (the splits depend on the labels and seed only)."""
    from histodistill.cli import main as cli
    from histodistill.eval.slide_task import slide_task_scores
    from histodistill.samples.synthetic_slides import tumor_tile_labels

    def tumour(slide_id, coords):
        return tumor_tile_labels(slides_dir / "masks", slide_id, coords, tile_px)

    results = {}
    for name, folder in features.items():
        runs = [out / name / f"seed_{seed}" for seed in range(seeds)]
        for seed, run in enumerate(runs):
            argv = ["mil", "--features", str(folder), "--labels", str(slides_dir / "labels.csv"), "--model", model,
                    "--folds", str(folds), "--epochs", str(epochs), "--lr", "5e-4", "--seed", str(seed),
                    "--out", str(run), "--device", device, "--overwrite", *(extra or [])]
            if cli(argv) != 0:
                raise UserError(f"`histodistill {' '.join(argv)}` failed (see the message above)")
        results[name] = slide_task_scores(runs, tumour)
    return results

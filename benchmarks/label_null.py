"""The slide task's null: the demo's MIL on labels shuffled across cases, for issue 26's "controls at chance".

The random-init control scores above chance on the demo's slides (0.63 in every full run). That can mean
one of two things: the task leaks its labels to anything (the folds, the bags, the scoring), or random
convolutions keep some of the morphology that separates tumour (its tile probe, 0.71, says they do). Shuffled
labels tell the two apart: with the labels drawn at random, every extractor must score at chance whatever
its features hold. Reads a finished ``histodistill demo`` DIR (its features and sizes), runs the demo's ABMIL
cross-validation (`histodistill.demo.slide_task.run_slide_task`: its MIL settings, folds by case, CV seeds)
on the teacher's and the random-init control's features against labels permuted across cases (seeded), and
writes a part of docs/benchmarks/distill.md.

    python -m benchmarks.label_null --demo DIR [--work runs/benchmarks/label_null]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from benchmarks.common import markdown_table, write_part
from benchmarks.tuning_slides import slide_cell
from histodistill.demo.slide_task import run_slide_task
from histodistill.demo.stages import SLIDE_TILE_PX, recorded_sizes

PERMUTATION_SEED = 0
EXTRACTORS = {"teacher": "sdmae_vit", "random-init": "random_init_resnet18"}


def permuted_slides(demo_slides: Path, out: Path, seed: int) -> Path:
    """A slides folder under ``out`` for `run_slide_task`: the demo's masks, and its labels.csv with the
    labels permuted across cases (every slide of a case keeps one label; the class counts stay)."""
    with open(demo_slides / "labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    cases = sorted({row["case_id"] for row in rows})
    label_of = {row["case_id"]: row["label"] for row in rows}
    shuffled = dict(
        zip(cases, np.random.default_rng(seed).permutation([label_of[c] for c in cases]), strict=True)
    )
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "labels.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["case_id", "slide_id", "label"])
        writer.writeheader()
        writer.writerows({**row, "label": shuffled[row["case_id"]]} for row in rows)
    if not (out / "masks").exists():
        (out / "masks").symlink_to((demo_slides / "masks").resolve())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, required=True, help="a finished `histodistill demo` folder")
    parser.add_argument("--work", type=Path, default=Path("runs/benchmarks/label_null"))
    args = parser.parse_args()
    sizes = recorded_sizes(args.demo, "mil")
    folders = json.loads((args.demo / "features" / "extractors.json").read_text())
    slides = permuted_slides(args.demo / "data" / "slides", args.work / "slides", PERMUTATION_SEED)
    scores = run_slide_task(
        {row: Path(folders[name]["features_dir"]) for row, name in EXTRACTORS.items()},
        slides,
        args.work / "mil",
        SLIDE_TILE_PX,
        folds=sizes["folds"],
        seeds=sizes["seeds"],
        epochs=sizes["mil_epochs"],
    )
    rows = [[row, slide_cell(score)] for row, score in scores.items()]
    body = (
        f"The demo's {scores['teacher']['slides']} slides with their labels permuted across cases (seed "
        f"{PERMUTATION_SEED}; the class counts kept), ABMIL with the demo's MIL settings, "
        f"{sizes['folds']}-fold CV by case × "
        f"{sizes['seeds']} seeds, the same features as the demo's table. Both rows should be at chance, the "
        "teacher's included: a score above it would mean the task leaks labels.\n\n"
        + markdown_table(["extractor", "slide AUROC on permuted labels [95 % CI]"], rows)
    )
    write_part(
        "distill",
        "label_null",
        "The slide task's null: shuffled labels",
        "python -m benchmarks.label_null --demo DIR",
        body,
    )


if __name__ == "__main__":
    main()

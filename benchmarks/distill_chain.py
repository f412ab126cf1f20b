"""The demo's distillation chain as one table: does a distilled student keep the teacher's slide AUROC?

Reads a ``histodistill demo`` output DIR (only read; its ``features`` stage at least finished) and writes
docs/benchmarks/distill.md: the issue-26 table (rows `teacher`, `student (un-tuned)`, `student (MCM-KD)`,
`student (MoMA)`, `student (KD)`, `student (CE)`, `MAE ViT`, `random-init`, `colour-only`; columns slide AUROC
[95 % CI], tile-probe AUROC, tiles/s, parameters; slide AUROC and the verdict sentence once the ``mil`` stage
finished, the tile probe computed here otherwise), and the diagnosis: per extractor the linear CKA of its tile
features with the teacher's; the patch probe on the nuclei task; the students' training steps and loss
curves (start, middle, end).

    python -m benchmarks.distill_chain --demo DIR [--label "60 slides, ..."]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from benchmarks.common import markdown_table, write_section
from histodistill.data.feature_files import load_slides, open_feature_folder
from histodistill.demo.slide_task import exact_tumour
from histodistill.demo.stages import SLIDE_TILE_PX, TABLE_ROWS, recorded_sizes
from histodistill.eval.metrics import linear_cka
from histodistill.eval.slide_task import tile_probe_auroc

MAX_TILES = 4000  # CKA on the first tiles of the slides, in slide order (its cost grows with N·D²)
RUNS = {
    "student (MoMA)": "moma/run",
    "student (KD)": "moma/kd",
    "student (CE)": "moma/vanilla",
    "student (MCM-KD)": "distill/fit/run",
    "teacher (SD-MAE)": "sdmae/run",
    "MAE ViT": "mae/run",
}


def tiles(folder: Path, slide_ids: list[str]) -> np.ndarray:
    slides = load_slides(open_feature_folder(folder), slide_ids)
    return np.concatenate([slides[s].features for s in slide_ids])[:MAX_TILES]  # (N, D)


def curve(run: Path) -> tuple[int | None, str]:
    """(optimiser steps, "first → middle → last" train loss) of a fit run."""
    steps = json.loads((run / "metrics.json").read_text()).get("global_step")
    losses = [
        float(r["train/loss"]) for r in csv.DictReader((run / "metrics.csv").open()) if r.get("train/loss")
    ]
    shown = " → ".join(f"{losses[i]:.3f}" for i in (0, len(losses) // 2, -1)) if losses else "–"
    return steps, shown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", required=True, help="a finished `histodistill demo` output directory")
    parser.add_argument(
        "--label", default="", help="what run this is (sizes, machine state), printed above the table"
    )
    args = parser.parse_args()
    demo = Path(args.demo)
    finished = (demo / "summary.json").is_file()
    summary = json.loads((demo / "summary.json").read_text()) if finished else None
    sizes = recorded_sizes(demo, "features")
    extractors = json.loads((demo / "features" / "extractors.json").read_text())
    slides = demo / "data" / "slides"
    with open(slides / "labels.csv", newline="") as handle:
        slide_ids = [row["slide_id"] for row in csv.DictReader(handle)]
    folders = {name: Path(extractors[name]["features_dir"]) for _, name in TABLE_ROWS}
    teacher = tiles(folders["sdmae_vit"], slide_ids)
    by_name = {row["name"]: row for row in summary["extractors"]} if finished else {}
    probes = {
        name: (
            by_name[name]["tile_probe_auroc"]
            if finished
            else tile_probe_auroc(
                folders[name], slide_ids, exact_tumour(slides, SLIDE_TILE_PX), folds=sizes["folds"]
            )
        )
        for name in folders
    }

    table, diagnosis = [], []
    for label, name in TABLE_ROWS:
        row, rate = by_name.get(name), extractors[name].get("tiles_per_s")
        slide = (
            f"{row['slide_auroc']:.3f} [{row['slide_auroc_ci'][0]:.3f}, {row['slide_auroc_ci'][1]:.3f}]"
            if row
            else "not measured"
        )
        table.append(
            [
                label,
                slide,
                f"{probes[name]:.3f}",
                f"{rate:.0f}" if rate else "–",
                f"{extractors[name]['parameters']:,}",
            ]
        )
        cka = linear_cka(tiles(folders[name], slide_ids), teacher)
        per_seed = " / ".join(f"{v:.3f}" for v in row["slide_auroc_per_seed"]) if row else "–"
        probe = extractors[name].get("probe_balanced_accuracy")
        diagnosis.append([label, f"{cka:.3f}", f"{probe:.3f}" if probe is not None else "–", per_seed])
    training = [
        [label, *curve(demo / run)] for label, run in RUNS.items() if (demo / run / "metrics.csv").is_file()
    ]
    verdict = (
        f"**{summary['verdict']}**"
        if finished
        else "_The MIL stage did not run: no slide AUROC, no verdict._"
    )

    body = f"""{args.label}

{sizes["slides"]} semi-synthetic slides (generator seed 0), ABMIL {sizes["mil_epochs"]} epochs, \
{sizes["folds"]}-fold CV by
case × {sizes["seeds"]} seed(s); slide AUROC of the out-of-fold predictions, mean over seeds, 95 % bootstrap \
CI
over slides. Tile probe: a linear probe told every tile's tumour label, {sizes["folds"]}-fold CV by slide, \
no MIL.
tiles/s: end-to-end extraction on this machine, in one process, one extractor after another. The un-tuned
student is the MoMA student MCM-KD starts from (the same numbers as `student (MoMA)`).

{verdict}

{markdown_table(["extractor", "slide AUROC [95 % CI]", "tile probe AUROC", "tiles/s", "parameters"], table)}

**Diagnosis.** CKA = linear CKA of the extractor's tile features with the teacher's (first {MAX_TILES:,} \
tiles);
patch probe = linear-probe balanced accuracy on the nuclei task; per seed = slide AUROC per CV seed.

{markdown_table(["extractor", "CKA with teacher", "patch probe", "slide AUROC per seed"], diagnosis)}

Training (optimiser steps; train loss first → middle → last):

{markdown_table(["run", "steps", "train loss"], training)}
"""
    write_section(
        "distill",
        "The demo's distillation chain: teacher, students, controls",
        body,
        command="python -m benchmarks.distill_chain --demo DIR",
    )


if __name__ == "__main__":
    main()

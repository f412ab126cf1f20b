"""MoMA, KD and CE students under the papers' levers, on tuning slides: issue 26's "MoMA >= KD >= CE on
slides" target, which the full demo missed (second run: 0.538, 0.522, 0.768).

Reads a finished ``histodistill demo`` DIR (its nuclei task, SD-MAE ViT teacher and teacher head, its three
students) and trains the three students again under each lever, with the demo's recipe
(`histodistill.demo.stages.train_students`) otherwise:
- ``labels``: every training nucleus instead of the 25 % subset (which tiles the fit sees);
- ``layer``: MoMA's key from the middle of the teacher's pyramid instead of its pooled output (the teacher
  layer; KD and CE do not read it);
- ``start``: the students start from the demo's distilled student (the MCM-KD export) instead of random
  weights: a tissue-pretrained start standing in for the paper's ImageNet start, which this machine cannot
  download (the student's start).
Scores every student on the tuning slides (`benchmarks/tuning_slides.py`, never the demo's slides) beside its
nuclei validation balanced accuracy, and writes a part of docs/benchmarks/distill.md.

    python -m benchmarks.student_levers --demo DIR [--levers labels layer start] [--start-weights FILE]
        [--work runs/benchmarks/student_levers]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import markdown_table, write_part
from benchmarks.tuning_slides import score_extractors, scores_description, slide_cell, tuning_slides
from histodistill.demo.runner import DemoContext
from histodistill.demo.stages import LABEL_FRACTION, recorded_sizes, train_students

# The teacher layer lever: the middle of the ViT's five pyramid positions
# (`histodistill.models.intermediates`; the demo's 4-block teacher: block 2 of 4), instead of the pooled
# output MoMA's official code distils.
MIDDLE_LAYER = 2
# The three students of `train_students`: run folder, the row's name.
STUDENTS = (("run", "MoMA"), ("kd", "KD"), ("vanilla", "CE"))


def nuclei_bacc(run: Path) -> float:
    """The run's final nuclei validation balanced accuracy (its metrics.json)."""
    return json.loads((run / "metrics.json").read_text())["final"]["val/balanced_accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, required=True, help="a finished `histodistill demo` folder")
    parser.add_argument("--work", type=Path, default=Path("runs/benchmarks/student_levers"))
    parser.add_argument(
        "--levers",
        nargs="+",
        choices=("labels", "layer", "start"),
        default=["labels", "layer", "start"],
        help="which to try",
    )
    parser.add_argument(
        "--start-weights",
        type=Path,
        help="the start lever's weights (default: DIR/distill/export/model.safetensors, the demo's distilled "
        "student)",
    )
    args = parser.parse_args()
    sizes = recorded_sizes(args.demo, "moma")
    tuning = tuning_slides(args.work)
    subset = f"train_{round(LABEL_FRACTION * 100)}pct.csv"
    distilled = args.start_weights or args.demo / "distill" / "export" / "model.safetensors"
    # lever: (the nuclei it trains on, its start overrides, what the table says of them)
    random_start = ("--model.init_args.student_init", "random")
    levers = {
        "labels": ("train", random_start, "100 % of the labels, random start"),
        "layer": (
            subset,
            (*random_start, "--model.init_args.teacher_layer", str(MIDDLE_LAYER)),
            f"{round(LABEL_FRACTION * 100)} % of the labels, random start, MoMA's key from the teacher's "
            f"pyramid position {MIDDLE_LAYER} (of 0–4)",
        ),
        "start": (
            subset,
            ("--model.init_args.student_init", "imagenet", "--model.init_args.weights", str(distilled)),
            f"{round(LABEL_FRACTION * 100)} % of the labels, start: a distilled student (MCM-KD)",
        ),
    }
    levers = {name: lever for name, lever in levers.items() if name in args.levers}
    runs = {"demo": args.demo / "moma"}
    for lever, (train, start, _) in levers.items():
        # The demo's layout for what the students read: its nuclei, teacher and teacher head.
        context = DemoContext(args.work / lever, quick=False, device="cpu", overwrite=False, sizes=sizes)
        for part in ("data", "sdmae", "teacher"):
            link = context.out / part
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to((args.demo / part).resolve())
        train_students(context, context.out / "students", train, start)
        runs[lever] = context.out / "students"
    checkpoints = {
        f"{lever}_{folder}": root / folder / "checkpoints" / "last.ckpt"
        for lever, root in runs.items()
        for folder, _ in STUDENTS
    }
    scores = score_extractors(checkpoints, tuning, args.work, sizes)
    described = {
        "demo": f"{round(LABEL_FRACTION * 100)} % of the labels, random start",
        **{k: v[2] for k, v in levers.items()},
    }
    rows = [
        [
            f"student ({name})",
            lever,
            described[lever],
            f"{nuclei_bacc(root / folder):.3f}",
            f"{scores[f'{lever}_{folder}']['tile_probe']:.3f}",
            slide_cell(scores[f"{lever}_{folder}"]),
        ]
        for lever, root in runs.items()
        for folder, name in STUDENTS
    ]
    body = (
        f"{scores_description(sizes)}; nuclei: the students' validation balanced accuracy on the demo's "
        "nuclei task. The demo's MoMA recipe (ResNet-18, the SD-MAE ViT teacher frozen, "
        f"{sizes['student_epochs']} epochs); each lever changes one thing from the demo's run (`demo`).\n\n"
        + markdown_table(
            ["student", "lever", "fit", "nuclei bal. acc.", "tile probe AUROC", "slide AUROC [95 % CI]"], rows
        )
    )
    write_part(
        "distill",
        "student_levers",
        "The papers' levers for MoMA ≥ KD ≥ CE on slides: the labels the fit sees, the teacher layer, the "
        "student's start",
        f"python -m benchmarks.student_levers --demo DIR --levers {' '.join(args.levers)}",
        body,
    )


if __name__ == "__main__":
    main()

"""MoMA vs the classic distillation baselines on the real hgsc nuclei task, with limited labels.

A teacher (a wider ResNet-18-style CNN) is trained supervised on the full training split; students (a narrow
ResNet-18-style CNN) are trained on 10 % and 100 % of the training nuclei with vanilla CE, KD, FitNet, CRD,
every kd_zoo baseline (AT, SP, CC, VID, RKD, PKT, AB, FT, FSP, NST, SemCKD, SimKD, SRRL) and MoMA (frozen
teacher: the architectures differ), 3 seeds each, and scored on the spatially separate test split (balanced
accuracy, macro-F1). The step time of each method relative to a CE-only step is measured in the same run.
Sizes are cut so a run fits on a 2-core CPU: 64-px crops resized to 32 px, a fixed number of SGD steps, a
1024-key queue and 4096 CRD negatives.

    python -m benchmarks.moma [--steps 100] [--seeds 3] [--methods CE,KD,AT ...] [--budget-minutes 60]

Each finished run is saved under ``--cache`` (default runs/benchmarks/moma/, keyed by all settings), so an
interrupted or budget-limited run resumes where it stopped; rows with fewer seeds than asked say so.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import markdown_table, mean_sd, median_seconds, write_section

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
STUDENT = {"backbone": "resnet18", "pretrained": False, "backbone_kwargs": {"channels": [16, 32, 64, 128]}}
TEACHER = {"backbone": "resnet18", "pretrained": False, "backbone_kwargs": {"channels": [32, 64, 128, 256]}}
SIZE, BATCH = 32, 32


def prepare(images: np.ndarray) -> torch.Tensor:
    """(N, 64, 64, 3) uint8 crops -> (N, 3, 32, 32) float, ImageNet-normalised."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # (N, 3, H, W)
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    return (x - IMAGENET_MEAN) / IMAGENET_STD


def augment(x: torch.Tensor) -> torch.Tensor:
    """Random flips and 90-degree turns per batch (nuclei have no orientation)."""
    if torch.rand(()) < 0.5:
        x = x.flip(-1)
    return torch.rot90(x, int(torch.randint(4, ())), dims=(-2, -1))


def train(module, images, labels, steps, seed, lr=0.05):
    """SGD (m 0.9, wd 1e-4), cosine to lr·1e-3 over ``steps``, batches of 32 drawn with replacement."""
    torch.manual_seed(seed)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    module.train()
    n = len(labels)
    for step in range(steps):
        index = torch.randint(n, (min(BATCH, n),))
        optimizer_step(module, optimizer, (augment(images[index]), labels[index], index), step)
        schedule.step()
    return module


def optimizer_step(module, optimizer, batch, step: int) -> None:
    """One training step as Lightning's loop runs it: the batch-start hook, the objective, backward,
    optimiser step."""
    module.on_train_batch_start(batch, step)
    loss = module.objective(batch)["loss"]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


@torch.no_grad()
def score(module, images, labels) -> tuple[float, float]:
    from sklearn.metrics import balanced_accuracy_score, f1_score

    module.eval()
    predictions = torch.cat([module(images[i : i + 256]).argmax(1) for i in range(0, len(images), 256)])
    return (
        balanced_accuracy_score(labels.numpy(), predictions.numpy()),
        f1_score(labels.numpy(), predictions.numpy(), average="macro"),
    )


# kd_zoo baselines: Distill arguments as in configs/kd/effnet_b0_512_<name>.yaml (the official weights).
ZOO_ARGS = {
    "AT": {"feature": "at", "w_feature": 1000.0},
    "SP": {"feature": "sp", "w_feature": 3000.0, "w_kd": 0.0},
    "CC": {"feature": "cc", "w_feature": 0.02, "feature_options": {"feat_dim": 128}},
    "VID": {"feature": "vid", "w_feature": 1.0, "w_kd": 0.0},
    "RKD": {"feature": "rkd", "w_feature": 1.0, "w_kd": 0.0},
    "PKT": {"feature": "pkt", "w_feature": 30000.0, "w_kd": 0.0},
    "AB": {"feature": "ab", "w_feature": 0.0, "w_kd": 0.0, "init_steps": "1/8"},
    "FT": {"feature": "ft", "w_feature": 200.0, "w_kd": 0.0, "init_steps": "1/8"},
    # FSP needs equal channels: the student's stem, layer2..4 (64, 32, 64, 128) against the wider
    # teacher's stem, layer1..3 (64, 32, 64, 128).
    "FSP": {
        "feature": "fsp",
        "w_feature": 0.0,
        "w_kd": 0.0,
        "init_steps": "1/8",
        "student_layers": [0, 2, 3, 4],
        "teacher_layers": [0, 1, 2, 3],
    },
    "NST": {"feature": "nst", "w_feature": 50.0, "w_kd": 0.0},
    "SemCKD": {"feature": "semckd", "w_feature": 50.0, "w_kd": 0.0, "feature_options": {"batch_size": BATCH}},
    "SimKD": {"feature": "simkd", "w_feature": 1.0, "w_ce": 0.0, "w_kd": 0.0},
    "SRRL": {"feature": "srrl", "w_feature": 1.0},
}
METHODS = ["CE", "KD", "FitNet", "CRD", *ZOO_ARGS, "MoMA"]


def build_student(method: str, teacher_ckpt: str, num_samples: int, steps: int = 100):
    from histodistill.methods.distill import Distill
    from histodistill.methods.moma import MoMA
    from histodistill.methods.supervised import Supervised

    common = {"num_classes": 3, **STUDENT}
    if method == "CE":
        return Supervised(**common)
    if method == "MoMA":
        return MoMA(teacher=teacher_ckpt, teacher_update="frozen", queue_size=1024, **common)
    if method in ZOO_ARGS:
        args = dict(ZOO_ARGS[method])
        if args.get("init_steps") == "1/8":  # RepDistiller: 30 of 240 epochs of pre-training stage
            args["init_steps"] = max(1, steps // 8)
        return Distill(teacher=teacher_ckpt, **args, **common)
    feature, weight = {"KD": ("none", 0.0), "FitNet": ("hint", 100.0), "CRD": ("crd", 0.8)}[method]
    options = {"num_samples": num_samples, "nce_k": 4096, "feat_dim": 512} if feature == "crd" else None
    return Distill(teacher=teacher_ckpt, feature=feature, w_feature=weight, feature_options=options, **common)


def mean_or_none(values: list[float]) -> str:
    """Mean ± sd over seeds; a single seed has no spread to show, and no seed means not run."""
    if not values:
        return "not run"
    return mean_sd(values) if len(values) > 1 else f"{values[0]:.3f} (one seed)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="SGD steps per student run (batch 32)")
    parser.add_argument("--teacher-steps", type=int, default=300, help="SGD steps for the teacher")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per method and label fraction")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared CPU)"
    )
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS)
    )
    parser.add_argument(
        "--cache", type=Path, default=Path("runs/benchmarks/moma"), help="finished runs (resumable)"
    )
    parser.add_argument(
        "--budget-minutes",
        type=float,
        default=None,
        help="start no new student run after this long; the table reports the seeds done",
    )
    args = parser.parse_args()
    methods = [m for m in METHODS if m in args.methods.split(",")]
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown or "CE" not in methods:
        parser.error(
            f"--methods: unknown {sorted(unknown)}" if unknown else "--methods must include CE (the baseline)"
        )
    torch.set_num_threads(args.threads)

    from histodistill.methods.base import backbone_record
    from histodistill.methods.supervised import Supervised
    from histodistill.samples.nuclei import load_nuclei_task, stratified_subset

    task = load_nuclei_task(crop_size=64)
    train_x, test_x = prepare(task.train_images), prepare(task.test_images)
    train_y, test_y = torch.from_numpy(task.train_labels), torch.from_numpy(task.test_labels)

    from histodistill.io import atomic_path, write_json

    start = time.monotonic()
    cache = args.cache / f"steps{args.steps}_teacher{args.teacher_steps}"
    cache.mkdir(parents=True, exist_ok=True)
    teacher_ckpt = str(cache / "teacher.ckpt")
    torch.manual_seed(0)
    teacher = Supervised(num_classes=3, **TEACHER)
    if Path(teacher_ckpt).is_file():  # resume: the same teacher as the runs already cached
        teacher.load_state_dict(torch.load(teacher_ckpt, map_location="cpu", weights_only=True)["state_dict"])
    else:
        train(teacher, train_x, train_y, args.teacher_steps, seed=0)
        with atomic_path(teacher_ckpt) as tmp:
            torch.save(
                {"state_dict": teacher.state_dict(), "histodistill_backbone": backbone_record(teacher)}, tmp
            )
    teacher_score = score(teacher, test_x, test_y)

    # Step time first (short, and the same batch for every method): student step incl. teacher forward.
    batch = (train_x[:BATCH], train_y[:BATCH], torch.arange(BATCH))
    timings = {}
    for method in methods:
        student = build_student(method, teacher_ckpt, len(train_y), steps=0).train()
        optimizer = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=1e-3)
        timings[method] = median_seconds(
            lambda s=student, o=optimizer: optimizer_step(s, o, batch, 0), repeats=15, warmup=3
        )

    # Seeds outermost, so a budget-limited run has every method for the first seeds.
    fractions = (0.1, 1.0)
    for seed in range(args.seeds):
        for fraction in fractions:
            subset = torch.from_numpy(stratified_subset(task.train_labels, fraction, seed=seed))
            x, y = train_x[subset], train_y[subset]
            for method in methods:
                path = cache / f"{fraction:g}_{seed}_{method}.json"
                if path.is_file() and len(json.loads(path.read_text())) == 2:
                    continue
                if args.budget_minutes is not None and time.monotonic() - start > 60 * args.budget_minutes:
                    break
                torch.manual_seed(seed)
                student = build_student(method, teacher_ckpt, len(y), args.steps)
                result = score(train(student, x, y, args.steps, seed), test_x, test_y)
                write_json(path, list(result))
                print(f"{fraction:.0%} seed {seed} {method}: {result}", flush=True)

    rows, missing = [], []
    for fraction in fractions:
        for method in methods:
            done = [
                json.loads(p.read_text())
                for seed in range(args.seeds)
                if (p := cache / f"{fraction:g}_{seed}_{method}.json").is_file()
            ]
            if len(done) < args.seeds:
                missing.append(f"{fraction:.0%} {method} ({len(done)}/{args.seeds} seeds)")
            rows.append(
                [
                    f"{fraction:.0%} ({len(stratified_subset(task.train_labels, fraction))} nuclei)",
                    method,
                    f"{len(done)}/{args.seeds}",
                    mean_or_none([r[0] for r in done]),
                    mean_or_none([r[1] for r in done]),
                    f"×{timings[method] / timings['CE']:.2f}",
                ]
            )
    incomplete = (
        f"**Incomplete run** (stopped by --budget-minutes {args.budget_minutes} or interrupted): fewer "
        f"seeds than asked for {'; '.join(missing)}. Rerun the same command to finish; finished runs are "
        "kept."
        if missing
        else ""
    )

    body = f"""
Task: hgsc_nest nuclei (3 classes: {", ".join(task.class_names)}), {len(train_y)} training and {len(test_y)} \
test
nuclei from a spatial split; 64-px crops resized to {SIZE} px. Students: ResNet-18 layout with 16-128 \
channels,
{args.steps} SGD steps (batch {BATCH}, lr 0.05, cosine), flips/rot90. Teacher: ResNet-18 layout with 32-256
channels trained supervised on the full training split for {args.teacher_steps} steps. MoMA runs with a frozen
teacher (different widths, so no EMA), KD on, a 1024-key queue; CRD with 512-d embeddings and 4096 negatives;
FitNet's regressor is MoMA's ConvReg (1×1 conv + BN + ReLU). The kd_zoo rows use the official weights of
configs/kd/effnet_b0_512_<name>.yaml (MoMA's script where it ran the method, else RepDistiller's, which runs \
SP,
VID, RKD, PKT, AB, FT, FSP and NST without KD; tuned by their authors for batch 64 and longer runs, not \
re-tuned
here); AB, FT and FSP spend the first {max(1, args.steps // 8)} steps in their pre-training
stage; FSP pairs the student's stem + layer2..4 with the teacher's stem + layer1..3 (equal channels).
Mean ± sd over {args.seeds} seeds (seed = label subset and initialisation). torch threads: {args.threads}.
Methods in this run: {", ".join(methods)}.

{incomplete}

Teacher on the test split: balanced accuracy {teacher_score[0]:.3f}, macro-F1 {teacher_score[1]:.3f}.

{markdown_table(["labels", "student", "seeds", "balanced accuracy", "macro-F1", "step time / CE"], rows)}

Step time: median of 15 optimiser steps (after 3 warm-up) of each student incl. its teacher forward, batch
{BATCH} at {SIZE} px, CPU, measured once per method in this run; CE {timings["CE"] * 1e3:.1f} ms per step.

What this can and cannot show: one 1500×1500 image gives ~1,300 nuclei, the test split is one region of the
same image, and the runs are a few minutes of CPU training at 32 px. Differences of a few points between
methods are within the seed spread and should not be read as a ranking; the paper's claims (EfficientNet-B0,
512 px, 50 epochs, thousands of patches, cross-cohort tests) are not reproduced here. The table does show that
every method trains on real H&E, whether a distillation term breaks the student at its official weight, and
what each method costs per step over plain CE.
"""
    write_section("moma", "MoMA and distillation baselines on hgsc nuclei (limited labels)", body)


if __name__ == "__main__":
    main()

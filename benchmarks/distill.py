"""`histodistill distill`: how much faster the students run than the teacher, and what they keep on slides.

1. Throughput: the forward pass alone (`histodistill.features.throughput.forward_rate`, random weights: speed
   does not depend on them) of foundation-model-sized teachers (ViT-B/16, ViT-L/16 = UNI's size, 224 px) and
   ResNet-18/50 students, with the hours each would take for 10,000 slides of 10,000 tiles on this machine.
2. The whole command on the semi-synthetic cohort (`histodistill.samples.synthetic_slides`, real sample
   tissue; needs `histodistill samples fetch`): a tiny ViT teacher with random weights, a tiny ResNet-18
   student from random weights, MCM-KD for a few hundred steps, ABMIL 5-fold CV: the summary's retention
   and speed-up. A check that the chain measures what it claims on a CPU, not a claim about UNI.

    python -m benchmarks.distill [--slides 40] [--steps 200] [--skip-pipeline]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from benchmarks.common import markdown_table, write_section

TEACHERS = ("vit_base_patch16_224", "vit_large_patch16_224")
STUDENTS = ("resnet18", "resnet50")


def throughput_rows(device: str, seconds: float) -> list[list[object]]:
    import torch

    from histodistill.features.throughput import forward_rate, parameters, projected_hours
    from histodistill.models.backbones import create_backbone

    rates, sizes = {}, {}
    for name in (*TEACHERS, *STUDENTS):
        torch.manual_seed(0)
        backbone = create_backbone(name, pretrained=False)
        sizes[name] = parameters(backbone)
        rates[name] = forward_rate(
            backbone,
            device,
            batch_size=8 if device == "cpu" else 256,
            seconds=seconds,
            precision="bf16" if device == "cuda" else "32",
        )
    # Ratios against ViT-L/16 (UNI's size), measured in the same run.
    rows = [
        [
            name,
            f"{sizes[name] / 1e6:.1f} M",
            f"{rates[name]:,.1f}",
            f"{rates[name] / rates[TEACHERS[-1]]:.1f}x",
            f"{projected_hours(rates[name]):,.0f}",
        ]
        for name in rates
    ]
    return rows


def pipeline_summary(slides: int, steps: int, device: str) -> dict:
    from histodistill.pipelines.distill import DistillConfig, distill
    from histodistill.samples.synthetic_slides import make_slides

    with tempfile.TemporaryDirectory() as tmp:
        labels = make_slides(Path(tmp) / "cohort", n_slides=slides, seed=1, tile_px=64, grid=8)
        teacher = Path(tmp) / "teacher"
        _save_random(teacher)
        return distill(
            DistillConfig(
                teacher=str(teacher),
                student="tiny/resnet18-64",
                student_random_init=True,
                out=Path(tmp) / "run",
                slides=Path(tmp) / "cohort" / "slides",
                labels=labels,
                steps=steps,
                batch_size=8,
                num_workers=0,
                folds=5,
                mil_epochs=20,
                device=device,
            )
        )


def _save_random(folder: Path) -> None:
    import torch

    from histodistill.features.export import save_backbone
    from histodistill.models.backbones import create_backbone

    torch.manual_seed(0)
    save_backbone(create_backbone("tiny/vit-tiny-p8-64", pretrained=False), folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slides", type=int, default=40)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=5.0, help="forward-pass timing per model")
    parser.add_argument("--skip-pipeline", action="store_true")
    args = parser.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    unit = "GPU-hours" if device == "cuda" else "CPU-hours"
    rows = throughput_rows(device, args.seconds)
    body = [
        "### Throughput (forward pass, 224 px, "
        + ("bf16, batch 256" if device == "cuda" else "float32, batch 8")
        + ")\n",
        markdown_table(
            ["model", "parameters", "tiles/s", "vs ViT-L/16", f"{unit} per 10k slides x 10k tiles"], rows
        ),
        "\nRandom weights (speed does not depend on them). The projection divides 10^8 tiles by the forward "
        "rate: reading and resizing tiles come on top (the end-to-end rate `distill` reports per model).\n",
    ]
    if device == "cpu":
        body.append(
            "No GPU in this session: the GPU section (UNI-sized ViT-L/16 teacher against ResNet-18 and "
            "ResNet-50 students in bf16, GPU-hours per 10,000 slides) is not measured yet; run "
            "`python -m benchmarks.distill` on a GPU machine to add it.\n"
        )
    if not args.skip_pipeline:
        summary = pipeline_summary(args.slides, args.steps, device)
        table = [
            [
                summary[key]["name"],
                "{:.3f} [{:.3f}, {:.3f}]".format(
                    summary[key]["slide_auroc"], *summary[key]["slide_auroc_ci"]
                ),
                summary[key]["tiles_per_s"],
                summary[key]["parameters"],
            ]
            for key in ("teacher", "student_untuned", "student")
        ]
        retention = summary["retention"]
        ci = ", ".join("unbounded" if v is None else f"{v:.3f}" for v in retention["ci"])
        body += [
            f"### The command on {args.slides} semi-synthetic slides ({args.steps} MCM-KD steps)\n",
            markdown_table(["model", "slide AUROC [95 % CI]", "tiles/s (end to end)", "parameters"], table),
            f"\nRetention {retention['value']:.3f} [{ci}], speed-up {summary['speedup']}x "
            f"({summary['speed_measure']}). Verdict: {summary['verdict']}.\n",
            "The teacher is a tiny ViT with random weights and the student starts from random weights: this "
            "checks that the chain runs and measures on a CPU; the retention of a real teacher (UNI, "
            "Virchow2...) needs its weights and a GPU.\n",
        ]
    body.append(
        f"Load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (a shared machine: "
        "read the ratios, measured in the same run, rather than the absolute rates).\n"
    )
    write_section("distill_command", "distill: teacher vs students", "\n".join(body))


if __name__ == "__main__":
    main()

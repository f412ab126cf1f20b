"""Run by torchrun (2 CPU processes, gloo) for tests/distributed/test_ddp_training.py.

    torchrun --nproc-per-node 2 ddp_worker.py OUT DATA

1. Loss level, a global batch of 8 split 4 + 4: SD-MAE's self-distillation centre and CRD's memory;
   each rank saves what it holds and its loss to OUT/losses_rank<r>.pt.
2. `histodistill fit` with --trainer.strategy ddp --trainer.devices 2 of the tiny recipes, one or two
   steps each: supervised (with validation; its checkpoint is then the teacher), SD-MAE, MoMA, CRD.
   `ddp_probe.KeepRankState` saves each rank's buffers to OUT/<name>/rank<r>.pt.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from histodistill.cli import main
from histodistill.losses.crd import CRDLoss
from histodistill.losses.self_distillation import SelfDistillationLoss

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def loss_level(out: Path, rank: int, world: int = 2) -> None:
    """The inputs of a global batch of 8 (the same on every rank and in the test), then this rank's share
    (all 8 with ``world`` 1)."""
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    features_s, features_t = torch.randn(8, 12, generator=g), torch.randn(8, 10, generator=g)
    index, contrast = torch.arange(8) * 2, torch.randint(0, 20, (8, 6), generator=g)
    contrast[:, 0] = index
    half = slice(8 // world * rank, 8 // world * (rank + 1))

    sd = SelfDistillationLoss(16).train()
    sd_loss = sd(student[half], teacher[half])
    # the same initial memories on every rank, as DDP's initial broadcast would make them
    torch.manual_seed(0)
    crd = CRDLoss(12, 10, num_data=20, feat_dim=6, nce_k=5)
    crd_loss = crd(features_s[half], features_t[half], index[half], contrast[half])
    torch.save(
        {
            "sdmae_loss": sd_loss.detach(),
            "center": sd.center.clone(),
            "crd_loss": crd_loss.detach(),
            **{name: value.clone() for name, value in crd.memory.named_buffers()},
        },
        out / f"losses_rank{rank}.pt",
    )


def fit(out: Path, name: str, config: str, data: Path, *extra: str) -> None:
    code = main(
        [
            "fit",
            "--config",
            str(CONFIGS / config),
            "--trainer.default_root_dir",
            str(out / name),
            "--trainer.strategy",
            "ddp",
            "--trainer.devices",
            "2",
            "--trainer.accelerator",
            "cpu",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.enable_model_summary",
            "false",
            "--trainer.callbacks+=ddp_probe.KeepRankState",
            "--data.init_args.batch_size",
            "2",
            *extra,
        ]
    )
    if code:
        raise SystemExit(f"fit {name} exited with {code}")


if __name__ == "__main__":
    out, data = Path(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    loss_level(out, rank)

    train, val = (
        ("--data.init_args.train.init_args.root", str(data / "train")),
        ("--data.init_args.val.init_args.root", str(data / "val")),
    )
    with warnings.catch_warnings(record=True) as caught:  # the filters in force, recorded instead of shown
        fit(
            out,
            "supervised",
            "supervised/tiny_cpu.yaml",
            data,
            *train,
            *val,
            "--model.init_args.num_classes",
            "2",
            "--trainer.max_epochs",
            "1",
        )
    (out / f"warnings_rank{rank}.txt").write_text("\n".join(str(w.message) for w in caught))
    teacher = str(out / "supervised" / "checkpoints" / "last.ckpt")
    fit(out, "sdmae", "sdmae/tiny_cpu.yaml", data, *train, "--trainer.max_steps", "1")
    one_step = (
        "--trainer.max_steps",
        "1",
        "--trainer.limit_val_batches",
        "0",
        "--model.init_args.num_classes",
        "2",
        "--model.init_args.teacher",
        teacher,
    )
    fit(out, "moma", "moma/tiny_cpu.yaml", data, *train, *val, *one_step)
    fit(
        out,
        "crd",
        "kd/tiny_crd.yaml",
        data,
        "--data.init_args.train.init_args.dataset.init_args.root",
        str(data / "train"),
        *val,
        *one_step,
    )

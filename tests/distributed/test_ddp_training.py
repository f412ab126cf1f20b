"""DDP training on 2 CPU processes (gloo, launched by torchrun): what must agree across ranks does, and
where the loss does not depend on how the batch is split, 2 x B/2 matches 1 x B.

One launch runs every case (`ddp_worker.py`); each test reads what the ranks saved.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from ddp_launch import torchrun
from ddp_worker import loss_level

from conftest import make_image_folder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """The launch's output folder, and what one process computes on the whole global batch."""
    out = tmp_path_factory.mktemp("ddp")
    make_image_folder(out / "data" / "train", classes=("a", "b"), per_class=4, size=16, seed=0)
    make_image_folder(out / "data" / "val", classes=("a", "b"), per_class=2, size=16, seed=1)
    # A fifth image: 5 samples on 2 ranks, so the evaluation sampler pads one rank with a repeated sample.
    shutil.copy(out / "data" / "train" / "b" / "0.png", out / "data" / "val" / "b" / "extra.png")
    run = torchrun("ddp_worker.py", str(out), str(out / "data"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    single = out / "single"
    single.mkdir()
    loss_level(single, rank=0, world=1)
    return out


def load(path):
    return torch.load(path, weights_only=True)


def test_sdmae_centre_is_all_reduced_and_matches_one_process_on_the_global_batch(ranks):
    r0, r1, one = (load(ranks / p) for p in ("losses_rank0.pt", "losses_rank1.pt", "single/losses_rank0.pt"))
    torch.testing.assert_close(r0["center"], r1["center"], rtol=0, atol=0)
    torch.testing.assert_close(r0["center"], one["center"])
    # The loss is a per-sample mean: DDP's gradient average of two halves is the mean of the whole batch.
    torch.testing.assert_close((r0["sdmae_loss"] + r1["sdmae_loss"]) / 2, one["sdmae_loss"])
    fit0, fit1 = load(ranks / "sdmae" / "rank0.pt"), load(ranks / "sdmae" / "rank1.pt")
    centre = next(name for name in fit0["buffers"] if name.endswith("center"))
    assert fit0["global_step"] == 1 and fit0["buffers"][centre].abs().sum() > 0
    assert torch.equal(fit0["buffers"][centre], fit1["buffers"][centre])


def test_crd_memory_takes_every_ranks_samples_and_matches_one_process(ranks):
    r0, r1, one = (load(ranks / p) for p in ("losses_rank0.pt", "losses_rank1.pt", "single/losses_rank0.pt"))
    for name in ("memory_student", "memory_teacher", "z_student", "z_teacher"):
        torch.testing.assert_close(r0[name], r1[name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(r0[name], one[name], msg=name)
    torch.testing.assert_close((r0["crd_loss"] + r1["crd_loss"]) / 2, one["crd_loss"])
    fit0, fit1 = load(ranks / "crd" / "rank0.pt"), load(ranks / "crd" / "rank1.pt")
    memories = [name for name in fit0["buffers"] if "memory_" in name]
    assert len(memories) == 2
    for name in memories:
        assert torch.equal(fit0["buffers"][name], fit1["buffers"][name]), name


def test_moma_queue_takes_the_keys_of_both_ranks(ranks):
    fit0, fit1 = load(ranks / "moma" / "rank0.pt"), load(ranks / "moma" / "rank1.pt")
    assert fit0["global_step"] == 1
    # One step, batch 2 per rank: both ranks enqueued the same 2 x 2 keys.
    assert int(fit0["buffers"]["queue.pointer"]) == int(fit1["buffers"]["queue.pointer"]) == 4
    assert torch.equal(fit0["buffers"]["queue.queue"], fit1["buffers"]["queue.queue"])


def test_validation_metrics_are_those_of_the_whole_validation_set_once_on_every_rank(ranks):
    fit0, fit1 = load(ranks / "supervised" / "rank0.pt"), load(ranks / "supervised" / "rank1.pt")
    for record in (fit0["val"], fit1["val"]):
        assert record["samples"] == 5
        assert record["logged"] == pytest.approx(record["whole_set"], rel=1e-5)
    # Lightning's advice to reduce epoch metrics across devices does not apply to gathered metrics.
    assert "sync_dist" not in (ranks / "warnings_rank0.txt").read_text()

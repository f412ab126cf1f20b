"""SeededAugmentation: an item's random draws depend on (seed, epoch, index) only."""

from __future__ import annotations

import numpy as np
import torch

from histodistill.data.datamodule import SeededAugmentation


class _Draws(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 5

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.rand(4) + index  # an augmentation's draws from torch's global generator


def test_items_are_seeded_from_seed_epoch_and_index_on_the_cpu_generator_alone(monkeypatch):
    dataset = SeededAugmentation(_Draws(), seed=7)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    item = dataset[2 * 5 + 3]  # epoch 2, index 3
    assert torch.equal(torch.get_rng_state(), before)  # the caller's generator is restored
    torch.manual_seed(int(np.random.SeedSequence([7, 2, 3]).generate_state(1)[0]))
    assert torch.equal(item, torch.rand(4) + 3)

    def all_devices(seed):  # seeds CUDA/XPU/MTIA too: milliseconds per item where they are not initialised
        raise AssertionError("torch.manual_seed called per item")

    monkeypatch.setattr(torch, "manual_seed", all_devices)
    assert torch.equal(dataset[13], item)

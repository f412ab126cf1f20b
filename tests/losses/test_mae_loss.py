"""Reconstruction targets and the masked-patch MSE, against hand computations."""

from __future__ import annotations

import statistics

import pytest
import torch

from histodistill.losses.mae import channel_norm_target, masked_patch_mse, patch_norm_target


def test_masked_mse_matches_hand_computation_and_ignores_visible_patches():
    pred = torch.tensor([[[1.0, 2.0], [0.0, 0.0], [3.0, 1.0]]])  # (1, 3, 2)
    target = torch.tensor([[[0.0, 0.0], [5.0, 5.0], [1.0, 1.0]]])
    mask = torch.tensor([[1.0, 0.0, 1.0]])  # patch 1 visible
    # masked patches: ((1 + 4) / 2 + (4 + 0) / 2) / 2
    assert masked_patch_mse(pred, target, mask).item() == pytest.approx((2.5 + 2.0) / 2)
    perturbed = pred.clone()
    perturbed[0, 1] = torch.tensor([100.0, -7.0])
    assert masked_patch_mse(perturbed, target, mask).item() == masked_patch_mse(pred, target, mask).item()


def test_patch_norm_target_uses_unbiased_variance():
    values = [0.0, 1.0, 2.0, 5.0, 7.0, 9.0]
    target = patch_norm_target(torch.tensor([[values]]))
    mean, var = statistics.fmean(values), statistics.variance(values)  # variance: n - 1
    expected = [(v - mean) / (var + 1e-6) ** 0.5 for v in values]
    torch.testing.assert_close(target[0, 0], torch.tensor(expected))


def test_channel_norm_target_normalises_each_channel_over_its_pixels():
    # One 2x2 patch, 3 channels, flattened in (p, q, c) order: pixel k channel c at index 3k + c.
    pixels = torch.tensor([[0.1, 0.5, 0.9], [0.2, 0.5, 0.1], [0.4, 0.6, 0.3], [0.3, 0.8, 0.7]])  # (p·p, C)
    target = channel_norm_target(pixels.reshape(1, 1, 12))[0, 0].reshape(4, 3)
    for c in range(3):
        column = pixels[:, c].tolist()
        mean, std = statistics.fmean(column), statistics.stdev(column)
        expected = [(v - mean) / (std + 1e-6) for v in column]
        torch.testing.assert_close(target[:, c], torch.tensor(expected))


def test_targets_differ_between_mae_and_sdmae():
    patches = torch.rand(1, 2, 12)
    assert not torch.allclose(patch_norm_target(patches), channel_norm_target(patches))

"""Cell masking: the requested number of cells per window, never all or none, and the fill really painted."""

from __future__ import annotations

import pytest
import torch

from histodistill.models.cell_mask import CellMasker, masked_cell_count, random_cell_mask


@pytest.mark.parametrize(
    ("cells", "ratio", "expected"), [(9, 0.5, 4), (9, 0.0, 1), (9, 1.0, 8), (4, 0.75, 3), (2, 0.5, 1)]
)
def test_masked_cell_count_keeps_one_masked_and_one_visible(cells, ratio, expected):
    assert masked_cell_count(cells, ratio) == expected


def test_random_mask_has_requested_count_and_differs_per_window():
    mask = random_cell_mask(64, 9, 0.5, generator=torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == (64, 9)
    assert (mask.sum(dim=1) == 4).all()
    assert len({tuple(row.tolist()) for row in mask}) > 30  # independent draws per window


def test_random_mask_is_seeded():
    first = random_cell_mask(8, 9, 0.5, generator=torch.Generator().manual_seed(3))
    again = random_cell_mask(8, 9, 0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, again)


@pytest.mark.parametrize("fill", ["mean", "learned"])
def test_masked_pixels_carry_the_fill_and_visible_pixels_are_untouched(fill):
    side, tile = 3, 4
    masker = CellMasker(fill=fill)
    if fill == "learned":
        with torch.no_grad():
            masker.mask_token.copy_(torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1))
    images = torch.randn(2, 3, side * tile, side * tile)
    mask = random_cell_mask(2, side * side, 0.5, generator=torch.Generator().manual_seed(1))
    out = masker(images, mask)
    fill_value = masker.mask_token.view(3)
    for b in range(2):
        for cell in range(side * side):
            i, j = divmod(cell, side)
            block = (slice(None), slice(i * tile, (i + 1) * tile), slice(j * tile, (j + 1) * tile))
            if mask[b, cell]:
                assert torch.equal(out[b][block], fill_value.view(3, 1, 1).expand(3, tile, tile))
            else:
                assert torch.equal(out[b][block], images[b][block])


def test_learned_fill_gets_a_gradient():
    masker = CellMasker(fill="learned")
    mask = torch.tensor([[True, False, False, True]])
    masker(torch.randn(1, 3, 4, 4), mask).sum().backward()
    assert masker.mask_token.grad is not None and masker.mask_token.grad.abs().sum() > 0

"""Grid pooling must line up with the tiles of the window, and the head must map every cell alike."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from histodistill.models.grid_head import GridHead, grid_pool, spatial_features, tokens_to_map


class PixelwiseNet(nn.Module):
    """A per-pixel network (1x1 convolutions only): its feature at a pixel depends on that pixel alone."""

    feature_kind = "map"

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 5, 1))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize("side", [2, 3])
def test_pooled_cell_equals_feature_of_its_tile_alone(side):
    torch.manual_seed(0)
    net, tile = PixelwiseNet(), 8
    window = torch.randn(2, 3, side * tile, side * tile)
    cells = grid_pool(spatial_features(net, window), side)  # (B, s*s, C)
    assert cells.shape == (2, side * side, 5)
    for i in range(side):
        for j in range(side):
            alone = window[:, :, i * tile : (i + 1) * tile, j * tile : (j + 1) * tile]
            expected = net.forward_features(alone).mean(dim=(2, 3))
            torch.testing.assert_close(cells[:, i * side + j], expected, rtol=1e-5, atol=1e-6)


def test_cells_are_row_major():
    fmap = torch.arange(9.0).view(1, 1, 3, 3)  # value = 3 * row + column
    assert grid_pool(fmap, 3)[0, :, 0].tolist() == list(range(9))


def test_tokens_to_map_drops_prefix_tokens_and_keeps_raster_order():
    patch_tokens = torch.arange(2 * 4 * 6.0).view(2, 4, 6)  # (B, 4 patches, D=6)
    tokens = torch.cat([torch.full((2, 1, 6), -1.0), patch_tokens], dim=1)  # a class token in front
    fmap = tokens_to_map(tokens, num_prefix_tokens=1)
    assert fmap.shape == (2, 6, 2, 2)
    torch.testing.assert_close(fmap[:, :, 1, 0], patch_tokens[:, 2])  # token 2 = row 1, column 0


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_head_is_shared_across_cells(kind):
    torch.manual_seed(0)
    head = GridHead(5, 7, kind=kind, hidden_dim=11)
    cells = torch.randn(2, 9, 5)
    out = head(cells)
    assert out.shape == (2, 9, 7) and torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 4], head(cells[:, 4:5])[:, 0])  # a cell's output ignores the others
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_head_rejects_unknown_kind():
    with pytest.raises(ValueError, match="linear"):
        GridHead(5, 7, kind="transformer")

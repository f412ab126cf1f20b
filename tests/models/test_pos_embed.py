"""Fixed sin-cos position tables: equal to their closed forms, and frozen inside the encoder."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from histodistill.models.pos_embed import sincos_1d, sincos_2d
from histodistill.models.vit_mae import prepare_vit_for_masking


def test_2d_table_matches_mae_formula():
    rows, cols, dim = 3, 4, 16
    table = sincos_2d((rows, cols), dim, num_prefix_tokens=1)
    assert table.shape == (1 + rows * cols, dim)
    assert torch.all(table[0] == 0)  # the cls token has no position
    quarter = dim // 4
    for r in range(rows):
        for c in range(cols):
            expected = []
            for coordinate in (c, r):  # column first, then row (MAE's channel order)
                angles = [coordinate / 10000 ** (i / quarter) for i in range(quarter)]
                expected += [math.sin(a) for a in angles] + [math.cos(a) for a in angles]
            torch.testing.assert_close(table[1 + r * cols + c], torch.tensor(expected), atol=1e-6, rtol=0)


def test_1d_table_matches_interleaved_formula():
    length, dim = 7, 10
    table = sincos_1d(length, dim)
    assert table.shape == (length, dim)
    for pos in range(length):
        for j in range(dim):
            angle = pos / 10000 ** (2 * (j // 2) / dim)
            expected = math.sin(angle) if j % 2 == 0 else math.cos(angle)
            assert table[pos, j].item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(("kind", "class_token"), [("2d", True), ("1d", False)])
def test_encoder_table_is_fixed_and_not_trainable(kind, class_token):
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        num_classes=0,
        img_size=32,
        patch_size=8,
        depth=1,
        class_token=class_token,
        global_pool="token" if class_token else "avg",
    )
    prepare_vit_for_masking(vit, kind)
    prefix = 1 if class_token else 0
    expected = sincos_2d((4, 4), 192, prefix) if kind == "2d" else sincos_1d(16, 192, prefix)
    torch.testing.assert_close(vit.pos_embed[0], expected)
    assert not vit.pos_embed.requires_grad
    assert all(p is not vit.pos_embed for p in vit.parameters() if p.requires_grad)

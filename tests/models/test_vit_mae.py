"""Masked ViT encoding and the MAE / SD-MAE decoders."""

from __future__ import annotations

import pytest
import timm
import torch

from histodistill.models.vit_mae import (
    MAEDecoder,
    SDMAEDecoder,
    encode_visible,
    patchify,
    prepare_vit_for_masking,
    random_masking,
    unpatchify,
)


def tiny_vit(class_token: bool = True, kind: str = "2d"):
    kwargs = {
        "img_size": 32,
        "patch_size": 8,
        "embed_dim": 64,
        "depth": 2,
        "num_heads": 2,
        "class_token": class_token,
        "global_pool": "token" if class_token else "avg",
        "fc_norm": False,
    }
    vit = timm.create_model("vit_small_patch16_224", num_classes=0, **kwargs)
    prepare_vit_for_masking(vit, kind)
    return vit.eval(), kwargs


def test_patchify_order_and_inverse():
    images = torch.randn(2, 3, 8, 12)
    patches = patchify(images, 4)  # (2, 6, 48)
    assert patches.shape == (2, 6, 48)
    # Patch 4 = row 1, column 1; its element (p=2, q=3, c=1) is pixel (4+2, 4+3) of channel 1.
    assert patches[1, 4, (2 * 4 + 3) * 3 + 1] == images[1, 1, 6, 7]
    torch.testing.assert_close(unpatchify(patches, 4, (2, 3)), images)


def test_random_masking_properties():
    b, length, ratio = 6, 20, 0.75
    mask = random_masking(b, length, ratio, generator=torch.Generator().manual_seed(0))
    keep = int(length * (1 - ratio))
    assert mask.num_visible == keep == mask.ids_keep.shape[1]
    assert torch.all((mask.mask == 0).sum(dim=1) == keep)
    arange = torch.arange(length).expand(b, -1)
    # ids_restore inverts the shuffle, and the mask is 0 exactly at the kept indices, in original order.
    assert torch.equal(torch.gather(mask.ids_shuffle, 1, mask.ids_restore), arange)
    expected = torch.ones(b, length)
    expected.scatter_(1, mask.ids_keep, 0.0)
    assert torch.equal(mask.mask, expected)
    assert len({tuple(sorted(row.tolist())) for row in mask.ids_keep}) > 1  # differs per sample


def test_masking_rule_is_int_of_kept_fraction():
    assert random_masking(1, 144, 0.6).num_visible == int(144 * 0.4)
    assert random_masking(1, 196, 0.75).num_visible == 49


@pytest.mark.parametrize(("class_token", "kind"), [(True, "2d"), (False, "1d")])
def test_unmasked_encoding_equals_timm_forward(class_token, kind):
    vit, _ = tiny_vit(class_token, kind)
    images = torch.randn(2, 3, 32, 32)
    mask = random_masking(2, 16, 0.0, generator=torch.Generator().manual_seed(1))
    prefix = vit.num_prefix_tokens
    with torch.no_grad():
        tokens = encode_visible(vit, images, mask.ids_keep)  # patch tokens in shuffled order
        reference = vit.forward_features(images)
    unshuffled = torch.gather(tokens[:, prefix:], 1, mask.ids_restore[..., None].expand(-1, -1, 64))
    torch.testing.assert_close(unshuffled, reference[:, prefix:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens[:, :prefix], reference[:, :prefix], atol=1e-5, rtol=1e-5)


def test_blocks_see_only_visible_tokens():
    vit, _ = tiny_vit(class_token=True)
    seen = []
    vit.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    mask = random_masking(3, 16, 0.75)
    out = encode_visible(vit, torch.randn(3, 3, 32, 32), mask.ids_keep)
    assert seen == [1 + 4] and out.shape == (3, 5, 64)


def test_encoder_flops_scale_with_visible_tokens():
    from torch.utils.flop_counter import FlopCounterMode

    vit, _ = tiny_vit(class_token=False, kind="1d")
    images = torch.randn(2, 3, 32, 32)

    def flops(ratio: float) -> int:
        with FlopCounterMode(display=False) as counter:
            encode_visible(vit, images, random_masking(2, 16, ratio).ids_keep)
        return counter.get_total_flops()

    full, quarter = flops(0.0), flops(0.75)
    # The patch embedding runs on every patch; the blocks (most of the cost) on a quarter of them.
    assert 0.2 < quarter / full < 0.35


def test_exported_encoder_loads_strictly_into_timm():
    vit, kwargs = tiny_vit(class_token=False, kind="1d")
    exported = timm.create_model("vit_small_patch16_224", num_classes=0, **kwargs).eval()
    result = exported.load_state_dict(vit.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(exported(images), vit(images))


def test_mae_decoder_shapes_and_cls_dropped():
    vit, _ = tiny_vit(class_token=True)
    decoder = MAEDecoder(64, (4, 4), 8, dim=32, depth=1, num_heads=2)
    mask = random_masking(2, 16, 0.75)
    tokens = encode_visible(vit, torch.randn(2, 3, 32, 32), mask.ids_keep)
    pred = decoder(tokens, mask.ids_restore)
    assert pred.shape == (2, 16, 8 * 8 * 3) and torch.isfinite(pred).all()
    pred.sum().backward()
    assert all(p.grad is not None for p in decoder.parameters())


def test_sdmae_decoder_outputs_and_bridge_without_bias():
    decoder = SDMAEDecoder(64, (4, 4), 8, dim=32, depth=1, num_heads=2)
    assert decoder.bridge.bias is None
    mask = random_masking(2, 16, 0.75)
    pred, visible = decoder(torch.randn(2, 4, 64), mask)
    assert pred.shape == (2, 12, 192) and visible.shape == (2, 4, 32)
    # Separate norms: the visible outputs are normalised by norm_visible only.
    with torch.no_grad():
        decoder.norm_visible.bias.fill_(3.0)
    _, shifted = decoder(torch.randn(2, 4, 64), mask)
    assert shifted.mean().item() == pytest.approx(3.0, abs=0.2)

"""Transform recipes: output shape/dtype/normalisation, determinism of eval, the HED stain round trip."""

from __future__ import annotations

import pytest
import torch

from histodistill.data.transforms import (
    RECIPES,
    HEDJitter,
    RandomRot90,
    build_transform,
    hed_to_rgb,
    rgb_to_hed,
)
from histodistill.errors import UserError
from histodistill.models.backbones import Preprocess

PRE = Preprocess(mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0), input_size=32, mpp=0.5)


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("train", [True, False])
def test_every_recipe_gives_a_normalised_float_tensor_at_the_input_size(recipe, train):
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 48, 40), dtype=torch.uint8)
    out = build_transform(recipe, PRE, train)(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_eval_normalises_with_the_backbone_mean_and_std():
    image = torch.full((3, 40, 40), 255, dtype=torch.uint8)  # white: 1.0 after scaling
    out = build_transform("eval", PRE, train=False)(image)
    expected = torch.tensor([(1 - 0.5) / 0.5, (1 - 0.25) / 0.25, 1.0])
    torch.testing.assert_close(out.mean(dim=(1, 2)), expected)


def test_train_false_is_deterministic_for_every_recipe():
    image = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    for recipe in RECIPES:
        transform = build_transform(recipe, PRE, train=False)
        assert torch.equal(transform(image), transform(image)), recipe


def test_random_recipes_do_vary():
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    transform = build_transform("he", PRE, train=True)
    outputs = [transform(image) for _ in range(6)]
    assert any(not torch.equal(outputs[0], other) for other in outputs[1:])


def test_unknown_recipe_is_a_user_error():
    with pytest.raises(UserError, match="unknown transform recipe 'fancy'"):
        build_transform("fancy", PRE, train=True)


def test_hed_round_trip_is_identity():
    rgb = torch.rand(3, 16, 16, dtype=torch.float64) * 0.98 + 0.01
    torch.testing.assert_close(hed_to_rgb(rgb_to_hed(rgb)), rgb)


def test_hed_of_pure_haematoxylin_is_only_haematoxylin():
    # An image made of one unit of haematoxylin: OD = its stain vector, so intensity = exp(-vector).
    from histodistill.data.transforms import RGB_FROM_HED

    rgb = torch.exp(-RGB_FROM_HED[0]).reshape(3, 1, 1)
    torch.testing.assert_close(rgb_to_hed(rgb).flatten(), torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))


def test_hed_jitter_without_jitter_keeps_the_image_and_with_jitter_changes_it():
    image = torch.randint(30, 250, (3, 16, 16), dtype=torch.uint8)
    unchanged = HEDJitter(sigma=0.0, bias=0.0)(image)
    assert (unchanged.int() - image.int()).abs().max() <= 1  # uint8 rounding only
    torch.manual_seed(0)
    assert not torch.equal(HEDJitter(sigma=0.2, bias=0.2)(image), image)


def test_rot90_is_exact_and_covers_all_turns():
    image = torch.arange(16, dtype=torch.uint8).reshape(1, 4, 4).expand(3, 4, 4)
    torch.manual_seed(0)
    seen = {tuple(RandomRot90()(image)[0, 0].tolist()) for _ in range(40)}
    assert len(seen) == 4

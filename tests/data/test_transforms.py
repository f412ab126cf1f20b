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


def _randaugment_of(recipe: str, preprocess: Preprocess):
    from timm.data.auto_augment import RandAugment

    from histodistill.data.transforms import TorchSeeded

    found = [
        op.transform
        for op in build_transform(recipe, preprocess, train=True).transforms
        if isinstance(op, TorchSeeded) and isinstance(op.transform, RandAugment)
    ]
    assert len(found) == 1
    return found[0]


# MoMA's dataset/RandAugment.py op list for 'rand' (its PosterizeTpu is timm's 'Posterize').
MOMA_OPS = [
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
]


def test_randaugment_is_momas_rand_m10_n2_mstd05():
    from timm.data.auto_augment import LEVEL_TO_ARG

    imagenet = Preprocess(input_size=32)  # ImageNet mean/std, as MoMA normalises
    augment = _randaugment_of("randaugment", imagenet)
    assert augment.num_layers == 2 and augment.choice_weights is None
    assert [op.name for op in augment.ops] == MOMA_OPS
    for op in augment.ops:
        assert op.prob == 0.5 and op.magnitude == 10 and op.magnitude_std == 0.5
        assert op.kwargs["fillcolor"] == (124, 116, 104)  # round(255 · ImageNet mean), MoMA's img_mean
        assert "interpolation" not in op.hparams  # bilinear or bicubic drawn per op, as MoMA
    # Strength at the mean magnitude (MoMA's level functions): 30°, shear 0.3, enhance 1 ± 0.9.
    assert abs(LEVEL_TO_ARG["Rotate"](10, {})[0]) == 30
    assert abs(LEVEL_TO_ARG["ShearX"](10, {})[0]) == pytest.approx(0.3)
    assert LEVEL_TO_ARG["Color"](10, {})[0] in (pytest.approx(0.1), pytest.approx(1.9))


def test_finetune_recipe_is_maes_timm_transform():
    from timm.data.random_erasing import RandomErasing

    from histodistill.data.transforms import TorchSeeded

    augment = _randaugment_of("finetune", Preprocess(input_size=32))
    assert [op.name for op in augment.ops][:4] == ["AutoContrast", "Equalize", "Invert", "Rotate"]
    assert "PosterizeIncreasing" in [op.name for op in augment.ops]  # 'inc1': the increasing variants
    assert all(op.magnitude == 9 and op.magnitude_std == 0.5 and op.prob == 0.5 for op in augment.ops)
    erasing = [
        op.transform
        for op in build_transform("finetune", Preprocess(input_size=32), True).transforms
        if isinstance(op, TorchSeeded) and isinstance(op.transform, RandomErasing)
    ]
    assert len(erasing) == 1 and erasing[0].probability == 0.25 and erasing[0].mode == "pixel"


def test_timm_augmentations_follow_torchs_seed_and_leave_pythons_alone():
    import random

    image = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    transform = build_transform("finetune", PRE, train=True)
    random.seed(123)
    before = random.random()
    random.seed(123)
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        outs.append(transform(image))
    torch.manual_seed(8)
    other = transform(image)
    assert random.random() == before  # Python's global generator was restored
    torch.testing.assert_close(outs[0], outs[1])
    assert not torch.equal(outs[0], other)


def test_linprobe_recipe_is_the_official_linear_probe_augmentation():
    # main_linprobe.py / run_mae_eval_linear.py: RandomResizedCrop(224, interpolation=3) (their single-draw
    # subclass, default scale and ratio), RandomHorizontalFlip(), ToTensor, Normalize.
    from torchvision.transforms import v2

    from histodistill.data.transforms import SingleDrawResizedCrop

    crop, flip, to_float, normalise = build_transform("linprobe", PRE, train=True).transforms
    assert isinstance(crop, SingleDrawResizedCrop) and crop.size == 32
    assert crop.scale == (0.08, 1.0) and crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert isinstance(flip, v2.RandomHorizontalFlip) and flip.p == 0.5
    assert isinstance(normalise, v2.Normalize) and normalise.mean == list(PRE.mean)


def test_single_draw_crop_clips_the_box_to_the_image_instead_of_falling_back_to_a_centre_crop():
    # The whole area at aspect 4/3 on a 40 x 40 image: width round(sqrt(1600 * 4/3)) = 46 is clipped to 40,
    # height round(sqrt(1600 * 3/4)) = 35 stays; torchvision's version gives up and centre-crops 40 x 30.
    from torchvision.transforms import v2

    from histodistill.data.transforms import SingleDrawResizedCrop

    image = torch.arange(40, dtype=torch.uint8).view(1, 40, 1).expand(3, 40, 40) * 6  # rows 0, 6, ..., 234
    torch.manual_seed(0)
    out = SingleDrawResizedCrop(40, scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3))(image)
    crops = [
        v2.functional.resized_crop(
            image, top, 0, 35, 40, [40, 40], interpolation=v2.InterpolationMode.BICUBIC, antialias=True
        )
        for top in range(6)
    ]
    assert any(torch.equal(out, crop) for crop in crops)
    centre = v2.functional.resized_crop(
        image, 5, 0, 30, 40, [40, 40], interpolation=v2.InterpolationMode.BICUBIC, antialias=True
    )
    assert not torch.equal(out, centre)
    torch.manual_seed(0)
    small = SingleDrawResizedCrop(16)(image)  # a random area and aspect: still the output size
    assert small.shape == (3, 16, 16) and small.dtype == torch.uint8

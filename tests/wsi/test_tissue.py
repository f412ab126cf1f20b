"""Tissue mask: Otsu by hand, the synthetic slide's boxes, glass, pen, dark edges, holes, specks."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import GLASS_RGB, make_tissue_image
from histodistill.wsi.slide import open_slide
from histodistill.wsi.tissue import TissueConfig, otsu_threshold, tissue_mask


def box_mask(shape, boxes) -> np.ndarray:
    mask = np.zeros(shape, bool)
    for x0, y0, x1, y1 in boxes:
        mask[y0:y1, x0:x1] = True
    return mask


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


def test_otsu_matches_the_between_class_variance_by_hand():
    # Values 0.1 (x30), 0.5 (x10), 0.9 (x60). Cut between 0.1|0.5: w=(.3,.7), means (.1, .843),
    # between = .3*.7*(.743)^2 = .1159; cut 0.5|0.9: w=(.4,.6), means (.2, .9), between = .4*.6*.49 = .1176.
    values = np.repeat([0.1, 0.5, 0.9], [30, 10, 60])
    threshold = otsu_threshold(values)
    assert 0.5 < threshold <= 0.9
    values = np.repeat([0.1, 0.5, 0.9], [60, 10, 30])  # mirrored: now the low cut wins
    assert 0.1 < otsu_threshold(values) <= 0.5


def test_mask_of_the_synthetic_slide_is_its_boxes(tiny_slide):
    thumb = open_slide(tiny_slide.path).get_thumbnail(256)  # 256 x 192: 4 level-0 px per mask px
    mask = tissue_mask(thumb)
    expected = box_mask(mask.shape, [tuple(v // 4 for v in box) for box in tiny_slide.tissue_boxes])
    assert iou(mask, expected) > 0.97


def test_glass_only_gives_an_empty_mask():
    rng = np.random.default_rng(0)
    glass = np.clip(np.array(GLASS_RGB) + rng.normal(0, 3, (200, 300, 3)), 0, 255).astype(np.uint8)
    assert not tissue_mask(glass).any()


def test_near_white_edges_pen_and_dark_borders_are_not_tissue():
    tissue_box = (100, 60, 220, 160)
    image = make_tissue_image(320, 240, [tissue_box], seed=3)
    rng = np.random.default_rng(4)
    image[:, :30] = np.clip(np.array((228, 222, 234)) + rng.normal(0, 4, (240, 30, 3)), 0, 255)  # tinted glass
    image[:, 280:] = np.linspace(242, 200, 40)[None, :, None].astype(np.uint8)  # grey vignetting
    image[20:26, 40:300] = (40, 150, 60)  # green pen line
    image[180:215, 40:90] = (30, 60, 170)  # blue pen blob
    image[225:, :] = (15, 15, 15)  # black slide edge
    mask = tissue_mask(image, TissueConfig(min_area=0.001))
    expected = box_mask(mask.shape, [tissue_box])
    assert mask[~expected].mean() < 0.002
    assert mask[expected].mean() > 0.97


def test_holes_are_filled_up_to_max_hole_area_and_specks_dropped():
    image = make_tissue_image(200, 200, [(20, 20, 180, 180), (190, 190, 194, 194)], seed=5)
    image[60:66, 60:66] = GLASS_RGB  # 36 px hole: 0.09 % of the image
    image[100:160, 100:160] = GLASS_RGB  # 3600 px hole: 9 %
    mask = tissue_mask(image, TissueConfig(max_hole_area=0.01, min_area=0.001))
    assert mask[60:66, 60:66].all()
    assert not mask[105:155, 105:155].any()
    assert not mask[190:194, 190:194].any()  # 16 px speck < 0.1 %
    assert not tissue_mask(image, TissueConfig(max_hole_area=0.0))[61:65, 61:65].any()


@pytest.mark.samples
def test_sample_slide_mask_covers_the_skin_but_not_the_glass(sample_file):
    slide = open_slide(sample_file("cmu_small_region"))
    thumb = slide.get_thumbnail(1024)
    mask = tissue_mask(thumb)
    assert 0.1 < mask.mean() < 0.9
    glass = thumb.min(axis=2) > 225  # bright and grey: unmistakably glass
    assert mask[glass].mean() < 0.05

"""Semi-synthetic slides (from injected synthetic sources) and the Reinhard normalisation they use."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import tifffile
from sklearn.metrics import roc_auc_score

from histodistill.errors import UserError
from histodistill.samples.stain_norm import lab_stats, lab_to_rgb, reinhard_normalize, rgb_to_lab
from histodistill.samples.synthetic_slides import (
    STAIN_JITTER_LOG_SD,
    STAIN_JITTER_MEAN,
    TISSUE_LIGHTNESS,
    Source,
    crop_fraction,
    hgsc_nest_sources,
    make_slides,
    tumor_tile_labels,
)

TILE, GRID = 32, 6


def sources(seed: int = 0) -> dict[str, list[Source]]:
    """Benign: smooth pink gradients. Tumour: a bluish 4-px checkerboard (a period-8 texture that
    survives colour normalisation and JPEG), so pasted tumour tiles can be found again in the slide."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, 96)[None, :, None]
    benign = [
        np.clip(np.array([220, 130, 170]) - 40 * ramp + rng.normal(0, 2, (96, 96, 3)), 0, 255).astype(
            np.uint8
        )
        for _ in range(2)
    ]
    checker = ((np.indices((80, 80)) // 4).sum(0) % 2)[..., None]
    tumor = [np.clip(np.array([90, 70, 160]) + 70 * checker, 0, 255).astype(np.uint8)]
    return {"benign": [Source(f"b{i}", im) for i, im in enumerate(benign)], "tumor": [Source("t", tumor[0])]}


def is_checkerboard(tile: np.ndarray) -> bool:
    """A 4-px checkerboard (any turn, flip or phase) differs most from itself shifted by 4 px and
    hardly at all shifted by 8 px; a smooth gradient differs alike at both shifts."""
    tile = tile.astype(float).mean(-1)
    shift4, shift8 = np.abs(tile[:, 4:] - tile[:, :-4]).mean(), np.abs(tile[:, 8:] - tile[:, :-8]).mean()
    return bool(shift4 > 3 * shift8 + 1)


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    labels = make_slides(
        out,
        n_slides=6,
        seed=3,
        tile_px=TILE,
        grid=GRID,
        sources=sources(),
        tumor_fraction=(0.2, 0.3),
        workers=3,
    )
    return out, labels


def test_labels_are_balanced_and_files_exist(slides):
    out, labels = slides
    with labels.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["label"] for r in rows].count("positive") == 3 and len(rows) == 6
    for row in rows:
        assert (out / "slides" / f"{row['slide_id']}.tif").is_file()
        mask = np.load(out / "masks" / f"{row['slide_id']}.npy")
        assert mask.shape == (GRID, GRID) and mask.any() == (row["label"] == "positive")
    meta = json.loads((out / "synthetic.json").read_text())
    assert meta["semi_synthetic"] and meta["tile_px"] == TILE


def test_tumor_mask_matches_pasted_region(slides):
    out, labels = slides
    with labels.open() as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        image = tifffile.imread(out / "slides" / f"{row['slide_id']}.tif", key=0)
        assert image.shape == (GRID * TILE, GRID * TILE, 3)
        mask = np.load(out / "masks" / f"{row['slide_id']}.npy")
        for r in range(GRID):
            for c in range(GRID):
                tile = image[r * TILE : (r + 1) * TILE, c * TILE : (c + 1) * TILE]
                assert is_checkerboard(tile) == mask[r, c], (row["slide_id"], r, c)
        if mask.any():  # one 4-connected region
            seen, stack = set(), [tuple(np.argwhere(mask)[0])]
            while stack:
                r, c = stack.pop()
                if (r, c) in seen or not (0 <= r < GRID and 0 <= c < GRID) or not mask[r, c]:
                    continue
                seen.add((r, c))
                stack += [(r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)]
            assert len(seen) == mask.sum()


def test_same_seed_gives_identical_files_whatever_the_threads(slides, tmp_path):
    out, _ = slides  # rendered by 3 threads
    make_slides(
        tmp_path,
        n_slides=6,
        seed=3,
        tile_px=TILE,
        grid=GRID,
        sources=sources(),
        tumor_fraction=(0.2, 0.3),
        workers=1,
    )
    written = sorted((out / "slides").glob("*.tif")) + sorted((out / "masks").glob("*.npy"))
    assert len(written) == 12
    for path in [*written, out / "labels.csv", out / "synthetic.json"]:
        assert (tmp_path / path.relative_to(out)).read_bytes() == path.read_bytes(), path.name
    other = tmp_path / "other"
    make_slides(
        other, n_slides=6, seed=4, tile_px=TILE, grid=GRID, sources=sources(), tumor_fraction=(0.2, 0.3)
    )
    assert (other / "slides" / "synth_000.tif").read_bytes() != (
        out / "slides" / "synth_000.tif"
    ).read_bytes()


def test_tumor_tile_labels_map_coords_to_mask(tmp_path):
    mask = np.zeros((3, 4), bool)
    mask[2, 1] = True  # row 2 (y), column 1 (x)
    np.save(tmp_path / "s.npy", mask)
    coords = np.array([[TILE, 2 * TILE], [2 * TILE, TILE], [0, 0]])
    assert tumor_tile_labels(tmp_path, "s", coords, TILE).tolist() == [True, False, False]


def test_missing_samples_name_the_fetch_command(monkeypatch, tmp_path):
    monkeypatch.setenv("HISTODISTILL_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(UserError, match="histodistill samples fetch"):
        make_slides(tmp_path / "out", n_slides=2)


def test_lab_round_trip_and_reinhard_moves_stats_to_target():
    rng = np.random.default_rng(0)
    image = rng.integers(40, 230, (20, 20, 3)).astype(np.uint8)
    assert np.abs(lab_to_rgb(rgb_to_lab(image)).astype(int) - image).max() <= 1
    white = np.array([[[255, 255, 255]]], np.uint8)
    np.testing.assert_allclose(rgb_to_lab(white)[0, 0], [100, 0, 0], atol=0.01)
    target_mean, target_std = np.array([60.0, 25.0, -10.0]), np.array([10.0, 6.0, 5.0])
    source = np.clip(np.array([200, 120, 160]) + rng.normal(0, 15, (40, 40, 3)), 0, 255).astype(np.uint8)
    mean, std = lab_stats(reinhard_normalize(source, target_mean, target_std))
    np.testing.assert_allclose(mean, target_mean, atol=0.6)
    np.testing.assert_allclose(std, target_std, rtol=0.1)


def test_tissue_tiles_colour_statistics_sit_around_the_target_alike_for_both_classes(slides):
    """Per-tile Reinhard, repeated until it converges, on a lossless slide, to the slide set's target moved
    by class-independent jitter: every tissue tile's LAB mean and sd lie within the jitter of the target,
    the jitter is there, and no statistic tells tumour from benign tiles. (One pass, or JPEG's chroma
    subsampling, left residuals of 1-2 LAB units that a colour-only classifier read at tile AUROC 0.92-0.94;
    ten passes without jitter left 0.05-0.2 units whose spread differed by class, read at 0.67.)"""
    out, _ = slides
    meta = json.loads((out / "synthetic.json").read_text())
    mean, sd = np.array(meta["stain_target_lab_mean"]), np.array(meta["stain_target_lab_std"])
    stats, tumour = [], []
    for slide in meta["slides"]:
        image = tifffile.imread(out / "slides" / f"{slide['slide_id']}.tif", key=0)
        mask = np.load(out / "masks" / f"{slide['slide_id']}.npy")
        for r in range(GRID):
            for c in range(GRID):
                tile = image[r * TILE : (r + 1) * TILE, c * TILE : (c + 1) * TILE]
                if rgb_to_lab(tile)[..., 0].mean() < TISSUE_LIGHTNESS:  # not glass
                    stats.append(np.concatenate(lab_stats(tile, TISSUE_LIGHTNESS)))
                    tumour.append(mask[r, c])
    stats, tumour = np.array(stats), np.array(tumour)  # (N, 6), (N,)
    assert 10 <= tumour.sum() <= len(tumour) - 10
    shift = (stats[:, :3] - mean) / STAIN_JITTER_MEAN  # (N, 3) in jitter sds
    ratio = np.log(stats[:, 3:] / sd) / STAIN_JITTER_LOG_SD
    assert np.abs(shift).max() < 5 and np.abs(ratio).max() < 5
    assert np.all(shift.std(0) > 0.6) and np.all(ratio.std(0) > 0.6)  # each tile has its own target (sd ~1)
    aurocs = [roc_auc_score(tumour, column) for column in stats.T]
    assert all(0.25 < value < 0.75 for value in aurocs), aurocs


def test_repeated_reinhard_reaches_the_target_where_one_pass_does_not_and_stacks_match_single_images():
    rng = np.random.default_rng(0)
    target_mean, target_std = np.array([54.0, 34.0, -30.0]), np.array([16.5, 9.0, 11.5])
    # Dark, saturated purple: one pass clips out of gamut and misses the target by units.
    dark = np.clip(np.array([70, 20, 110]) + rng.normal(0, 25, (3, 32, 32, 3)), 0, 255).astype(np.uint8)
    once = np.concatenate(lab_stats(reinhard_normalize(dark, target_mean, target_std, 85.0), 85.0), axis=-1)
    assert np.abs(once - np.concatenate([target_mean, target_std])).max() > 0.5
    repeated = reinhard_normalize(dark, target_mean, target_std, 85.0, iterations=10)
    stats = np.concatenate(lab_stats(repeated, 85.0), axis=-1)  # (3, 6): one row per image
    np.testing.assert_allclose(stats, np.tile(np.concatenate([target_mean, target_std]), (3, 1)), atol=0.1)
    assert np.array_equal(
        repeated[1], reinhard_normalize(dark[1], target_mean, target_std, 85.0, iterations=10)
    )
    # A target per image: each image reaches its own, as it would alone.
    means, stds = target_mean + rng.normal(0, 2, (3, 3)), target_std * np.exp(rng.normal(0, 0.1, (3, 3)))
    own = reinhard_normalize(dark, means, stds, 85.0, iterations=10)
    np.testing.assert_allclose(
        np.concatenate(lab_stats(own, 85.0), axis=-1), np.hstack([means, stds]), atol=0.25
    )
    assert np.array_equal(own[2], reinhard_normalize(dark[2], means[2], stds[2], 85.0, iterations=10))


def test_hgsc_nest_sources_keep_to_the_held_out_side_and_the_typed_nuclei():
    """Tumour crops: mostly neoplastic nuclei; benign crops: none; both only right of split_x."""
    types = np.zeros((40, 60), np.int64)
    types[:, 30:45] = 3  # a neoplastic band, half of it left of the split
    types[:, 45:] = 1  # connective right of it
    types[:, :10] = 3  # neoplastic on the training side only
    image = np.full((40, 60, 3), 120, np.uint8)
    roles = hgsc_nest_sources(image, types, split_x=36, tile_px=8)
    tumour, benign = roles["tumor"].allowed, roles["benign"].allowed  # (33, 53) top-lefts
    assert tumour.shape == (33, 53)
    assert not tumour[:, :36].any() and not benign[:, :36].any()  # the training side never gives a crop
    assert tumour[:, 36:38].all() and not tumour[:, 45:].any()  # crops over the band (x < 45 - 8 + ...)
    assert benign[:, 45:].all() and not benign[:, 36:44].any()


def test_crop_fraction_is_each_crops_share_of_true_pixels():
    mask = np.zeros((5, 6), bool)
    mask[1:3, 2:4] = True
    fraction = crop_fraction(mask, 2)
    assert fraction.shape == (4, 5)
    assert fraction[1, 2] == 1.0 and fraction[0, 1] == 0.25 and fraction[3, 0] == 0.0


def test_tumour_fraction_follows_the_range_asked_for(tmp_path):
    make_slides(
        tmp_path, n_slides=8, seed=1, tile_px=TILE, grid=GRID, sources=sources(), tumor_fraction=(0.4, 0.5)
    )
    for slide in json.loads((tmp_path / "synthetic.json").read_text())["slides"]:
        if slide["tumor_tiles"]:
            assert 0.35 <= slide["tumor_tiles"] / slide["tissue_tiles"] <= 0.55, slide


def test_lab_to_rgb_gives_the_codes_of_the_srgb_formula_out_of_gamut_included():
    """The boundary search returns what rounding 255 x sRGB(clip(linear)) gives, per the sRGB standard."""
    rng = np.random.default_rng(1)
    lab = np.stack([rng.uniform(0, 100, 20000), rng.uniform(-90, 90, 20000), rng.uniform(-90, 90, 20000)], -1)
    fy = (lab[:, 0] + 16) / 116
    f = np.stack([fy + lab[:, 1] / 500, fy, fy - lab[:, 2] / 200], axis=-1)
    xyz = np.where(f > 6 / 29, f**3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * np.array([0.95047, 1.0, 1.08883])
    to_rgb = np.linalg.inv(
        [
            [0.4124564, 0.3575761, 0.1804375],
            [0.2126729, 0.7151522, 0.0721750],
            [0.0193339, 0.1191920, 0.9503041],
        ]
    )
    linear = np.clip(xyz @ to_rgb.T, 0, 1)
    srgb = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    np.testing.assert_array_equal(lab_to_rgb(lab), np.round(srgb * 255).astype(np.uint8))


def test_unlabeled_tissue_is_the_nest_left_of_the_split_and_the_target_image(monkeypatch, tmp_path):
    """The pretraining tissue beside the sample slide: hgsc_nest only left of the split the slides' sources
    start at (so no slide pixel is in it), and the TIA Toolbox image whole, at the slides' mpp."""
    from PIL import Image

    import histodistill.samples.nuclei as nuclei
    import histodistill.samples.registry as registry
    import histodistill.samples.synthetic_slides as synthetic
    from histodistill.wsi.slide import open_slide

    nest = np.random.default_rng(0).integers(0, 255, (50, 90, 3), dtype=np.uint8)
    target = tmp_path / "target.png"
    Image.fromarray(np.full((40, 30, 3), 200, np.uint8)).save(target)
    monkeypatch.setattr(nuclei, "load_hgsc", lambda: (nest, np.zeros((50, 90)), np.zeros((50, 90))))
    monkeypatch.setattr(synthetic, "_nest_split_x", lambda instance_mask, type_mask: 61)
    monkeypatch.setattr(registry, "fetch", lambda name: {"tiatoolbox_target": target}[name])
    paths = synthetic.unlabeled_tissue(tmp_path / "out", mpp=0.5)
    assert [p.name for p in paths] == ["hgsc_nest_train_side.tif", "tiatoolbox_target.tif"]
    nest_slide, target_slide = open_slide(paths[0]), open_slide(paths[1])
    assert nest_slide.dimensions == (61, 50) and nest_slide.mpp == pytest.approx(0.5)
    assert np.array_equal(nest_slide.read_region((0, 0), 0, (61, 50))[..., :3], nest[:, :61])  # lossless
    assert target_slide.dimensions == (30, 40)

"""The teacher cache: looked up by coordinates, stale caches caught, rebuilt only when asked."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from histodistill.data.feature_files import EXTRACTOR_JSON
from histodistill.data.teacher_features import TeacherFeatures
from histodistill.errors import UserError
from histodistill.features import teacher_cache
from histodistill.features.teacher_cache import (
    CACHE_RECORD,
    cache_features_dir,
    cache_key,
    ensure_teacher_cache,
    stale_reasons,
)
from histodistill.io import write_json
from histodistill.wsi.coords import write_coords

COORDS = np.array([[0, 0], [64, 0], [0, 64], [64, 64]], dtype=np.int64)


TEACHER = "tiny/vit-tiny-p8-64"


def write_features(path, coords, features, **attrs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as h5:
        h5["features"], h5["coords"] = features.astype(np.float32), coords
        h5.attrs.update(attrs)


@pytest.fixture
def tiles(tmp_path):
    """A tiling output folder with one 2 x 2-tile slide."""
    attrs = dict(
        patch_size=64,
        patch_level=0,
        patch_size_level0=64,
        mpp=0.5,
        target_mpp=0.5,
        overlap=0,
        slide_path=str(tmp_path / "s.tif"),
        slide_id="s",
    )
    write_coords(tmp_path / "tiles" / "patches" / "s.h5", COORDS, attrs)
    return tmp_path / "tiles"


def complete_cache(tiles, teacher=TEACHER):
    """What `extract` + our record leave behind: features with their tiling attrs, extractor.json, record."""
    features_dir = cache_features_dir(tiles, teacher)
    write_features(features_dir / "s.h5", COORDS, np.arange(8.0).reshape(4, 2), patch_size=64, target_mpp=0.5)
    write_json(features_dir / EXTRACTOR_JSON, {"extractor": teacher, "weights_sha256": "0" * 64})
    write_json(features_dir / CACHE_RECORD, cache_key(tiles / "patches", teacher, None))
    return features_dir


def test_lookup_returns_rows_in_cell_order_with_zeros_for_invalid_cells(tmp_path):
    order = np.array([2, 0, 3, 1])  # the file's rows are not in the order the cells ask for
    write_features(
        tmp_path / "f.h5", COORDS[order], (10 * order[:, None] + np.array([[0, 1]])).astype(np.float32)
    )
    cells = np.array([[64, 64], [0, 0], [128, 0], [64, 0]])
    out = TeacherFeatures(tmp_path / "f.h5").lookup(cells, np.array([True, True, False, True]))
    np.testing.assert_array_equal(out, [[30, 31], [0, 1], [0, 0], [10, 11]])


def test_a_tile_missing_from_the_cache_is_a_user_error(tmp_path):
    write_features(tmp_path / "f.h5", COORDS[:2], np.zeros((2, 3)))
    with pytest.raises(UserError, match="rebuild_cache"):
        TeacherFeatures(tmp_path / "f.h5").lookup(COORDS, np.ones(4, bool))


def test_a_complete_cache_is_used_as_is(tiles):
    features_dir = complete_cache(tiles)
    assert features_dir == tiles / "features_tiny-vit-tiny-p8-64"
    assert ensure_teacher_cache(tiles, tiles, TEACHER) == features_dir


@pytest.mark.parametrize("change", ["teacher", "weights", "patch_size", "tiles", "no_record"])
def test_a_stale_cache_is_refused_naming_the_cache_and_the_option(tiles, tmp_path, change):
    features_dir = complete_cache(tiles)
    weights = None
    if change == "teacher":  # another teacher's features copied into this teacher's folder
        write_json(features_dir / EXTRACTOR_JSON, {"extractor": "tiny/resnet18-64"})
    elif change == "weights":
        weights = tmp_path / "w.safetensors"
        weights.write_bytes(b"other weights")
    elif change == "patch_size":  # the slide was tiled again with larger tiles since
        with h5py.File(tiles / "patches" / "s.h5", "a") as h5:
            h5["coords"].attrs["patch_size"] = 128
    elif change == "tiles":
        write_features(features_dir / "s.h5", COORDS[:3], np.zeros((3, 2)), patch_size=64, target_mpp=0.5)
    else:
        (features_dir / CACHE_RECORD).unlink()
    assert stale_reasons(features_dir, cache_key(tiles / "patches", TEACHER, weights))
    with pytest.raises(UserError, match=r"cache .*data\.init_args\.rebuild_cache: true") as error:
        ensure_teacher_cache(tiles, tiles, TEACHER, weights)
    assert str(features_dir) in str(error.value)


def test_rebuild_runs_extract_once_and_records_the_key(tiles, monkeypatch):
    calls = []

    def fake_extract_slides(model, coords_dir, out_dir, **kwargs):
        calls.append((model, coords_dir, out_dir))
        complete = cache_features_dir(out_dir, model)
        write_features(complete / "s.h5", COORDS, np.ones((4, 5)), patch_size=64, target_mpp=0.5)
        write_json(complete / EXTRACTOR_JSON, {"extractor": model})

    monkeypatch.setattr(teacher_cache, "extract_slides", fake_extract_slides)
    ensure_teacher_cache(tiles, tiles, TEACHER, rebuild=True)
    ensure_teacher_cache(tiles, tiles, TEACHER, rebuild=True)  # now fresh: no second extraction
    assert calls == [(TEACHER, tiles, tiles)]
    assert not stale_reasons(cache_features_dir(tiles, TEACHER), cache_key(tiles / "patches", TEACHER, None))


def test_an_interrupted_build_resumes_and_a_stale_or_damaged_cache_is_computed_again(tiles, monkeypatch):
    overwrites = []

    def fake_extract_slides(model, coords_dir, out_dir, overwrite=False, **kwargs):
        overwrites.append(overwrite)
        complete = cache_features_dir(out_dir, model)
        write_features(complete / "s.h5", COORDS, np.ones((4, 5)), patch_size=64, target_mpp=0.5)
        write_json(complete / EXTRACTOR_JSON, {"extractor": model})

    monkeypatch.setattr(teacher_cache, "extract_slides", fake_extract_slides)
    features_dir = complete_cache(tiles)
    (features_dir / CACHE_RECORD).unlink()  # killed before the record: extract keeps the slides it finished
    ensure_teacher_cache(tiles, tiles, TEACHER, rebuild=True)
    (features_dir / "s.h5").write_bytes(b"half")  # damaged after the record: not trusted, computed again
    assert stale_reasons(features_dir, cache_key(tiles / "patches", TEACHER, None)) == [
        "slide s: cached for None, tiled as {'target_mpp': 0.5, 'patch_size': 64, 'tiles': 4}"
    ]
    ensure_teacher_cache(tiles, tiles, TEACHER, rebuild=True)
    assert overwrites == [False, True]


def test_a_cache_whose_extract_left_out_unreadable_tiles_is_fresh_and_names_them(tiles, tmp_path):
    # Issue 29: extract leaves out tiles of a corrupt JPEG tile; the cache then held fewer rows than the
    # coords and counted as stale for ever, and a lookup of such a tile blamed "a different tiling".
    from histodistill.data.feature_files import UNREADABLE_ATTR
    from histodistill.wsi.slide import UnreadableRegion

    features_dir = cache_features_dir(tiles, TEACHER)
    write_features(
        features_dir / "s.h5",
        COORDS[:3],
        np.ones((3, 2)),
        patch_size=64,
        target_mpp=0.5,
        slide_path=str(tmp_path / "s.tif"),
        **{UNREADABLE_ATTR: 1},
    )
    with h5py.File(features_dir / "s.h5", "a") as handle:
        handle["coords"].attrs["patch_size_level0"] = 64
    write_json(features_dir / EXTRACTOR_JSON, {"extractor": TEACHER})
    write_json(features_dir / CACHE_RECORD, cache_key(tiles / "patches", TEACHER, None))
    assert ensure_teacher_cache(tiles, tiles, TEACHER) == features_dir  # not stale: 3 rows + 1 unreadable
    with pytest.raises(
        UnreadableRegion,
        match=r"s.tif: the 64 x 64 px region at level-0 \(64, 64\), level 0, "
        r"cannot be read \(left out of the teacher cache .*s.h5 as unreadable\)",
    ):
        TeacherFeatures(features_dir / "s.h5").lookup(COORDS, np.ones(4, bool))


def test_clam_coords_are_cached_under_their_slide_and_keyed_on_the_level0_tile(tiny_slide, tmp_path):
    # CLAM's create_patches_fp: 64-px tiles at level 1 (downsample 2), no mpp and no slide path.
    tiles = tmp_path / "clam"
    clam = dict(patch_size=64, patch_level=1, downsample=np.array([2.0, 2.0]), name="tiny_slide")
    write_coords(tiles / "patches" / "tiny_slide.h5", COORDS * 2 + 128, clam)
    key = cache_key(tiles / "patches", TEACHER, None, pretrained=False)
    assert key["slides"] == {"tiny_slide": {"patch_size_level0": 128, "patch_size": 64, "tiles": 4}}
    with pytest.raises(
        UserError, match="`slides_dir=DIR`"
    ):  # the slide is not named: found only with slides_dir
        ensure_teacher_cache(tiles, tmp_path, TEACHER, rebuild=True, pretrained=False)
    features_dir = ensure_teacher_cache(
        tiles, tmp_path, TEACHER, rebuild=True, pretrained=False, slides_dir=tiny_slide.path.parent
    )
    assert TeacherFeatures(features_dir / "tiny_slide.h5").dim == 192
    assert not stale_reasons(features_dir, key)  # the features carry patch_size_level0: fresh as computed
    clam["downsample"] = np.array([4.0, 4.0])  # tiled again at level 2: 256 level-0 px per tile
    write_coords(tiles / "patches" / "tiny_slide.h5", COORDS * 2 + 128, clam)
    assert stale_reasons(features_dir, cache_key(tiles / "patches", TEACHER, None, pretrained=False)) == [
        "slide tiny_slide: cached for {'patch_size_level0': 128, 'patch_size': 64, 'tiles': 4}, "
        "tiled as {'patch_size_level0': 256, 'patch_size': 64, 'tiles': 4}"
    ]

"""`histodistill extract`: features for every tile, the layout CLAM/TRIDENT read, resumable and atomic."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from histodistill.cli import main
from histodistill.data.feature_files import open_feature_folder
from histodistill.data.slide_dataset import SlideTileDataset
from histodistill.data.transforms import build_transform
from histodistill.distributed import resolve_device
from histodistill.errors import UserError
from histodistill.features import extract
from histodistill.features.extract import extract_slide, features_folder_name, model_slug, state_dict_sha256
from histodistill.models.backbones import create_backbone
from histodistill.wsi.coords import read_coords
from histodistill.wsi.tiling import tile_slide

MODEL = "tiny/resnet18-64"


@pytest.fixture
def tiles(tiny_slide, tmp_path):
    """A tiling output of two slides (the tiny slide under two names) at 1.0 mpp, 64-px tiles."""
    out = tmp_path / "tiles"
    for name in ("slide_a", "slide_b"):
        copy = shutil.copy(tiny_slide.path, tmp_path / f"{name}.tif")
        tile_slide(copy, out, target_mpp=1.0, patch_size=64)
    return out


def _extract(tiles, out, *extra):
    # a weights file is the other explicit choice
    random_init = () if "--weights" in extra else ("--random-init",)
    return main(
        [
            "extract",
            "--model",
            MODEL,
            *random_init,
            "--coords",
            str(tiles),
            "--out",
            str(out),
            "--workers",
            "0",
            "--batch-size",
            "4",
            *extra,
        ]
    )


def test_features_per_slide_match_the_model_on_each_tile(tiles, tmp_path):
    out = tmp_path / "features"
    assert _extract(tiles, out) == 0
    folder = out / "features_tiny-resnet18-64-random-init"
    assert sorted(p.name for p in folder.iterdir()) == ["extractor.json", "slide_a.h5", "slide_b.h5"]

    torch.manual_seed(0)  # --random-init builds the model with seed 0
    backbone = create_backbone(MODEL, pretrained=False).eval()
    record = json.loads((folder / "extractor.json").read_text())
    assert record["weights_sha256"] == state_dict_sha256(backbone.model)
    assert record["mean"] == [0.485, 0.456, 0.406] and record["input_size"] == 64 and record["mpp"] == 0.5
    assert record["num_features"] == record["feature_dim"] == 512 and record["extractor"] == MODEL

    with h5py.File(folder / "slide_a.h5") as handle:
        features, coords = handle["features"][:], handle["coords"][:]
        assert handle.attrs["slide_id"] == "slide_a"
    expected_coords, _ = read_coords(tiles / "patches" / "slide_a.h5")
    assert features.dtype == np.float32 and features.shape == (len(expected_coords), 512)
    assert coords.dtype == np.int64 and np.array_equal(coords, expected_coords)
    dataset = SlideTileDataset(
        tiles / "patches" / "slide_a.h5",
        transform=build_transform("eval", backbone.spec.preprocess, train=False),
    )
    with torch.no_grad():
        direct = backbone(torch.stack([dataset[i][0] for i in (0, len(dataset) - 1)]))
    np.testing.assert_allclose(features[[0, -1]], direct.numpy(), rtol=1e-4, atol=1e-5)


def test_rerun_skips_finished_slides_and_redoes_missing_ones(tiles, tmp_path):
    out = tmp_path / "features"
    assert _extract(tiles, out) == 0
    folder = out / "features_tiny-resnet18-64-random-init"
    stamp_a = (folder / "slide_a.h5").stat().st_mtime_ns
    before = h5py.File(folder / "slide_b.h5")["features"][:]
    (folder / "slide_b.h5").unlink()
    assert _extract(tiles, out) == 0
    assert (folder / "slide_a.h5").stat().st_mtime_ns == stamp_a  # skipped
    # same seeded model
    np.testing.assert_array_equal(h5py.File(folder / "slide_b.h5")["features"][:], before)


def test_an_interrupted_slide_leaves_no_file_and_is_redone(tiles, tmp_path, monkeypatch):
    calls = []

    def crash_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = extract.extract_slide
    monkeypatch.setattr(extract, "extract_slide", crash_on_second)
    out = tmp_path / "features"
    assert _extract(tiles, out) == 130
    folder = out / "features_tiny-resnet18-64-random-init"
    assert sorted(p.name for p in folder.iterdir()) == ["extractor.json", "slide_a.h5"]  # no partial file
    monkeypatch.setattr(extract, "extract_slide", real)
    assert _extract(tiles, out) == 0
    assert (folder / "slide_b.h5").exists()


def test_features_of_other_weights_are_not_mixed_into_a_folder(tiles, tmp_path, capsys):
    out = tmp_path / "features"
    first, other = tmp_path / "first.pth", tmp_path / "other.pth"
    for seed, path in ((4, first), (5, other)):
        torch.manual_seed(seed)
        torch.save(create_backbone(MODEL, pretrained=False).model.state_dict(), path)
    assert _extract(tiles, out, "--weights", str(first)) == 0
    assert _extract(tiles, out, "--weights", str(other)) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _extract(tiles, out, "--weights", str(other), "--overwrite") == 0


def test_missing_coords_folder_is_explained(tmp_path, capsys):
    assert (
        main(
            ["extract", "--model", MODEL, "--random-init", "--coords", str(tmp_path), "--out", str(tmp_path)]
        )
        == 2
    )
    assert "histodistill tile" in capsys.readouterr().err


def test_image_folder_features(tmp_path):
    rng = np.random.default_rng(0)
    for label in ("stroma", "tumour"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (80, 72, 3), dtype=np.uint8)).save(
                tmp_path / "images" / label / f"{i}.png"
            )
    assert (
        main(
            [
                "extract",
                "--model",
                MODEL,
                "--random-init",
                "--images",
                str(tmp_path / "images"),
                "--out",
                str(tmp_path / "f"),
                "--workers",
                "0",
            ]
        )
        == 0
    )
    with h5py.File(tmp_path / "f" / "features_tiny-resnet18-64-random-init" / "features.h5") as handle:
        assert handle["features"].shape == (6, 512) and handle["features"].dtype == np.float32
        assert handle["labels"][:].tolist() == [0, 0, 0, 1, 1, 1]
        assert handle["paths"].asstr()[0] == "stroma/0.png"
        assert list(handle.attrs["classes"]) == ["stroma", "tumour"]


def test_image_features_of_an_earlier_run_are_reused_and_others_refused(tmp_path, capsys):
    # Issue 29: the demo's features stage printed "... features.h5 exists; pass --overwrite" about the file
    # its own sdmae stage had written: the same weights and images are reused and said so, not reported as a
    # conflict.
    from conftest import make_image_folder

    images = make_image_folder(tmp_path / "images", per_class=2)
    argv = [
        "extract",
        "--model",
        MODEL,
        "--random-init",
        "--images",
        str(images),
        "--out",
        str(tmp_path / "f"),
        "--workers",
        "0",
    ]
    assert main(argv) == 0
    target = tmp_path / "f" / "features_tiny-resnet18-64-random-init" / "features.h5"
    stamp = target.stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"reusing {target}: extracted earlier" in out and "exists; pass --overwrite" not in out
    assert target.stat().st_mtime_ns == stamp
    (images / "a" / "extra.png").write_bytes((images / "a" / "0.png").read_bytes())
    assert main(argv) == 2  # another image folder under the same name: refused, not silently reused
    assert "holds features of another image folder" in capsys.readouterr().err


def test_empty_slide_gives_empty_arrays():
    backbone = create_backbone(MODEL, pretrained=False).eval()
    features, coords, unreadable = extract_slide(backbone, [], batch_size=2)
    assert features.shape == (0, 512) and coords.shape == (0, 2) and coords.dtype == np.int64


def test_random_init_features_get_a_folder_of_their_own(tiles, tmp_path):
    # Issue 29: --random-init features went to features_resnet50, the pretrained weights' folder name.
    assert features_folder_name("resnet50", pretrained=False) == "features_resnet50-random-init"
    assert features_folder_name("resnet50") == "features_resnet50"
    assert (
        features_folder_name("tiny/resnet18-64", False, 3) == "features_tiny-resnet18-64-random-init-context3"
    )
    out = tmp_path / "features"
    assert _extract(tiles, out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["features_tiny-resnet18-64-random-init"]
    # The readers that look for one features_* folder find it.
    assert open_feature_folder(out).directory == out / "features_tiny-resnet18-64-random-init"


def test_model_slug(tmp_path):
    ckpt = tmp_path / "moma_run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.touch()
    (tmp_path / "exported").mkdir()
    assert model_slug("tiny/resnet18-64") == "tiny-resnet18-64"
    assert model_slug("hf-hub:MahmoodLab/UNI") == "hf-hub-MahmoodLab-UNI"
    assert model_slug(ckpt) == "moma_run-last"
    assert model_slug(tmp_path / "exported") == "exported"


def test_weights_hash_follows_the_weights_not_the_object():
    torch.manual_seed(0)
    a = create_backbone(MODEL, pretrained=False)
    torch.manual_seed(0)
    b = create_backbone(MODEL, pretrained=False)
    assert state_dict_sha256(a.model) == state_dict_sha256(b.model)
    with torch.no_grad():
        b.model.conv1.weight[0, 0, 0, 0] += 1
    assert state_dict_sha256(a.model) != state_dict_sha256(b.model)


def test_cuda_without_a_gpu_is_a_user_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="`device=cpu`"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


def _truncate(path, fraction=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def test_rerun_redoes_damaged_outputs_and_says_why(tiles, tmp_path, capsys):
    out = tmp_path / "features"
    assert _extract(tiles, out) == 0
    folder = out / "features_tiny-resnet18-64-random-init"
    before = {s: h5py.File(folder / f"{s}.h5")["features"][:] for s in ("slide_a", "slide_b")}
    _truncate(folder / "slide_b.h5")  # what `mil` died on with an OSError, and a rerun took as done
    with h5py.File(folder / "slide_a.h5", "a") as handle:  # rows of another tiling
        features, coords = handle["features"][:-1], handle["coords"][:-1]
        del handle["features"], handle["coords"]
        handle["features"], handle["coords"] = features, coords
    capsys.readouterr()
    assert _extract(tiles, out) == 0
    printed = capsys.readouterr().out
    assert "redoing slide_b.h5" in printed and "cannot be read" in printed
    assert (
        "redoing slide_a.h5" in printed
        and f"has {len(features)} rows but its coords file has {len(features) + 1}" in printed
    )
    for slide_id, features in before.items():
        np.testing.assert_array_equal(h5py.File(folder / f"{slide_id}.h5")["features"][:], features)


def test_a_model_giving_non_finite_features_stops_naming_the_slide(tiles, tmp_path, capsys, monkeypatch):
    real = extract.extract_slide

    def one_inf(*args, **kwargs):
        features, coords, unreadable = real(*args, **kwargs)
        features[2, 7] = np.inf
        return features, coords, unreadable

    monkeypatch.setattr(extract, "extract_slide", one_inf)
    out = tmp_path / "features"
    assert _extract(tiles, out) == 2
    err = capsys.readouterr().err
    assert "1 of" in err and "slide slide_a" in err and err.count("error:") == 1
    assert not (out / "features_tiny-resnet18-64-random-init" / "slide_a.h5").exists()

"""Shared fixtures: tiny slides made on the fly, and the real sample data when it is cached."""

from __future__ import annotations

import atexit
import csv
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from histodistill.wsi.tiff_writer import write_pyramid_tiff

# One thread per test process: the suite runs on 2 cores as 2 pytest-xdist workers, and tiny tensors gain
# nothing from intra-op threads (on a busy machine, 2 threads made collation 100x slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Tests never touch the model hub: offline mode and an empty Hugging Face cache (set before huggingface_hub is
# imported, which reads them once), so a test that forgets --random-init fails loudly, here and on every
# machine.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="histodistill-tests-hf-")
# one per test process, removed with it
atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)
os.environ.pop("HF_HUB_CACHE", None)

# Lightning binds its log handlers to sys.stderr when first imported. Imported here, at collection, they
# bind the session's stream; imported inside a test that uses capsys, they would bind that test's stream,
# which is closed afterwards, and every later Lightning log line would print a "Logging error" traceback.
import lightning  # noqa: E402, F401

GLASS_RGB = (242, 240, 244)  # near-white background of a scanned slide

# The quick demo is the suite's longest test (~4 minutes on one core): its file is scheduled first (with
# --no-loadscope-reorder in pyproject.toml), so the other worker runs every other test beside it instead of
# the demo starting when most else is done.
LONGEST_FIRST = "test_demo.py"


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name != LONGEST_FIRST)  # stable: the rest keep their order


@dataclass(frozen=True)
class TinySlide:
    """A synthetic slide with tissue exactly inside ``tissue_boxes`` (x0, y0, x1, y1 at level 0)."""

    path: Path
    mpp: float
    size: tuple[int, int]  # (width, height) at level 0
    tissue_boxes: tuple[tuple[int, int, int, int], ...]


def make_tissue_image(width: int, height: int, boxes, seed: int = 0) -> np.ndarray:
    """Glass everywhere, H&E-like pink/purple texture inside each box: (height, width, 3) uint8."""
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), np.uint8)
    image[:] = GLASS_RGB
    for x0, y0, x1, y1 in boxes:
        h, w = y1 - y0, x1 - x0
        eosin = np.array([225, 120, 170], np.float32)
        hematoxylin = np.array([90, 60, 150], np.float32)
        mix = rng.random((h, w, 1), dtype=np.float32) ** 3  # mostly pink with purple specks (nuclei)
        texture = eosin * (1 - mix) + hematoxylin * mix + rng.normal(0, 8, (h, w, 3))
        image[y0:y1, x0:x1] = np.clip(texture, 0, 255).astype(np.uint8)
    return image


@pytest.fixture
def one_torch_thread():
    """Tiny matrices on a shared 2-core machine run ~10x faster on one thread than on two."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_slide(tmp_path) -> TinySlide:
    """A 1024 x 768 pyramidal TIFF at 0.5 mpp with two tissue squares aligned to a 128-px grid."""
    boxes = ((128, 128, 512, 384), (640, 384, 896, 640))
    image = make_tissue_image(1024, 768, boxes)
    path = write_pyramid_tiff(tmp_path / "tiny_slide.tif", image, mpp=0.5, tile=128)
    return TinySlide(path=path, mpp=0.5, size=(1024, 768), tissue_boxes=boxes)


def write_corrupt_slide(path: Path, levels: bool = True) -> tuple[Path, tuple[int, int]]:
    """A 1024 x 1024 JPEG-tiled pyramidal TIFF at 0.5 mpp, tissue everywhere, whose level-0 tile at (256, 256)
    has the second half of its entropy-coded data replaced by noise (a corrupt tile as real archives hold
    them); ``levels=False`` writes level 0 only, so tissue detection reads the damaged level too. Returns the
    path and the damaged tile's level-0 top-left."""
    import tifffile

    from histodistill.wsi.tiff_writer import write_pyramid_tiff

    image = make_tissue_image(1024, 1024, [(0, 0, 1024, 1024)], seed=1)
    write_pyramid_tiff(path, image, mpp=0.5, tile=256, min_level_size=64 if levels else 1024)
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[5], tif.pages[0].databytecounts[5]  # row 1, column 1
    data = bytearray(path.read_bytes())
    half = count // 2
    data[offset + half : offset + count - 2] = (
        np.random.default_rng(0).integers(0, 256, count - 2 - half, dtype=np.uint8).tobytes()
    )
    path.write_bytes(bytes(data))
    return path, (256, 256)


@pytest.fixture
def sample_file():
    """``sample_file(name)`` -> path of a cached real sample, or skip the test when it is not cached."""
    from histodistill.samples.registry import cached_path

    def get(name: str) -> Path:
        path = cached_path(name)
        if path is None:
            pytest.skip(f"sample {name!r} is not cached: run `histodistill samples fetch {name}`")
        return path

    return get


def make_image_folder(
    root: Path, classes=("a", "b", "c"), per_class: int = 4, size: int = 32, seed: int = 0
) -> Path:
    """``root/<class>/<i>.png``: RGB noise whose brightness depends on the class (a learnable task)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for index, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 80, (size, size, 3)) + 60 * index
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture
def patch_folders(tmp_path) -> Path:
    """``<tmp>/demo_out/nuclei/{train,val}/{a,b,c}/*.png``: the layout of configs/supervised/tiny_cpu.yaml."""
    root = tmp_path / "demo_out" / "nuclei"
    make_image_folder(root / "train", per_class=4, seed=0)
    make_image_folder(root / "val", per_class=2, seed=1)
    return root


def write_supervised_checkpoint(
    path: Path, num_classes: int = 3, seed: int = 1, **backbone
) -> tuple[Path, object]:
    """A supervised run's checkpoint as `histodistill fit` writes it (weights + backbone record): a teacher.

    ``backbone`` holds `Supervised` arguments (``backbone=..., backbone_kwargs=...``; default
    tiny/resnet18-64).
    """
    import torch

    from histodistill.methods.base import backbone_record
    from histodistill.methods.supervised import Supervised

    torch.manual_seed(seed)
    teacher = Supervised(
        num_classes=num_classes, **({"backbone": "tiny/resnet18-64", "pretrained": False} | backbone)
    )
    torch.save({"state_dict": teacher.state_dict(), "histodistill_backbone": backbone_record(teacher)}, path)
    return path, teacher


@pytest.fixture
def distill_inputs(tmp_path) -> dict[str, Path]:
    """What a distillation recipe needs to run tiny: train/val image folders (3 classes, 16 px) and a
    supervised teacher checkpoint of ``tiny/resnet18-64``."""
    inputs = {
        "train": tmp_path / "data" / "train",
        "val": tmp_path / "data" / "val",
        "teacher": tmp_path / "teacher.ckpt",
    }
    make_image_folder(inputs["train"], per_class=4, size=16, seed=0)
    make_image_folder(inputs["val"], per_class=2, size=16, seed=1)
    write_supervised_checkpoint(inputs["teacher"])
    return inputs


# `histodistill fit` flags for a quiet one-epoch test run.
QUIET_ONE_EPOCH = [
    "--trainer.max_epochs",
    "1",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
    "--data.init_args.batch_size",
    "4",
]


# Feature folders as other tools write them (read by `histodistill.data.feature_files`).
def tile_grid(n: int) -> np.ndarray:
    """(n, 2) level-0 top-left corners of 256-px tiles, four to a row."""
    return np.stack([np.arange(n) % 4 * 256, np.arange(n) // 4 * 256], 1)


def write_clam_features(feat_dir, slide_id, features):
    """As CLAM's extract_features_fp.py: h5_files/<id>.h5 appended batch by batch (resizable datasets,
    coords int32, no attributes), then pt_files/<id>.pt = torch.save(torch.from_numpy(features))."""
    import h5py
    import torch

    (feat_dir / "h5_files").mkdir(parents=True, exist_ok=True)
    (feat_dir / "pt_files").mkdir(parents=True, exist_ok=True)
    with h5py.File(feat_dir / "h5_files" / f"{slide_id}.h5", "w") as handle:
        for key, value in (("features", features), ("coords", tile_grid(len(features)).astype(np.int32))):
            handle.create_dataset(
                key, data=value, maxshape=(None, value.shape[1]), chunks=(1, value.shape[1])
            )
    torch.save(torch.from_numpy(features), feat_dir / "pt_files" / f"{slide_id}.pt")


def write_trident_features(job_dir, slide_id, features, encoder="uni_v1"):
    """As TRIDENT's extract_patch_features: <job>/<mag>x_<px>px_<ov>px_overlap/features_<encoder>/<id>.h5,
    coords attrs copied from the coords file, features attrs name/savetodir. Returns the features folder."""
    import h5py

    folder = job_dir / "20x_256px_0px_overlap" / f"features_{encoder}"
    folder.mkdir(parents=True, exist_ok=True)
    with h5py.File(folder / f"{slide_id}.h5", "w") as handle:
        handle["features"] = features
        handle["coords"] = tile_grid(len(features)).astype(np.int64)
        handle["features"].attrs.update(name=slide_id, savetodir=str(folder))
        handle["coords"].attrs.update(
            patch_size=256,
            patch_size_level0=512,
            level0_magnification=40,
            target_magnification=20,
            overlap=0,
            name=slide_id,
        )
    return folder


@pytest.fixture
def fake_hf_cache(tmp_path, monkeypatch):
    """``put(repo_id, {filename: path}, repo_type="model")`` lays files out as the Hugging Face hub cache does
    (``models--org--name/refs/main`` -> ``snapshots/<commit>/<filename>``; ``datasets--`` for datasets;
    filenames may hold sub-folders) in a fresh cache that
    huggingface_hub (offline) reads from; returns the cache folder."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def put(repo_id: str, files: dict[str, Path], repo_type: str = "model") -> Path:
        repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
        commit = "0" * 40
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True, exist_ok=True)
        for name, source in files.items():
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, snapshot / name)
        return cache

    return put


PLANTED_DIM = 8  # feature width of `planted_features`


def planted_features(tmp_path: Path, n_cases: int = 24, seed: int = 0):
    """MIL features: PLANTED_DIM wide, 12-24 tiles per slide, one slide per case. Positive slides carry 3
    instances shifted along feature 0; negatives are noise only.
    Returns (features dir, labels CSV, {slide_id: indices of planted instances})."""
    import h5py

    rng = np.random.default_rng(seed)
    features_dir, planted = tmp_path / "features", {}
    features_dir.mkdir()
    rows = []
    for c in range(n_cases):
        slide_id, positive = f"slide{c:02d}", c % 2 == 1
        n = int(rng.integers(12, 25))
        feats = rng.normal(0, 1, (n, PLANTED_DIM)).astype(np.float32)
        coords = np.stack([np.arange(n) % 5 * 256, np.arange(n) // 5 * 256], 1).astype(np.int64)
        if positive:
            planted[slide_id] = rng.choice(n, 3, replace=False)
            feats[planted[slide_id], 0] += 4.0
        with h5py.File(features_dir / f"{slide_id}.h5", "w") as handle:
            handle["features"], handle["coords"] = feats, coords
            handle["coords"].attrs["patch_size_level0"] = 256
        rows.append((f"case{c:02d}", slide_id, "tumor" if positive else "normal"))
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as handle:
        csv.writer(handle).writerows([("case_id", "slide_id", "label"), *rows])
    return features_dir, labels, planted

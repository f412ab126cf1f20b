"""Frozen-backbone features for every tile of every slide, or for a folder of labelled patches.

Slides: ``<out>/features_<slug>/<slide_id>.h5`` with ``features`` (N, D) float32 and ``coords`` (N, 2)
int64 (CLAM/TRIDENT layout), one per coords file of a tiling output, plus ``extractor.json`` beside
them. Patches: one ``features.h5`` with ``features``, ``labels``, ``paths`` and a ``classes`` attribute.

Every file is written atomically (the format is `histodistill.data.feature_files`'s), and a rerun skips a
slide only when its file checks out (`histodistill.data.feature_files.is_finished`): one interrupted half-way,
truncated or damaged is redone. Images are prepared in the DataLoader workers with the backbone's own eval
transform (resize + centre crop to its input size, its mean/std).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from histodistill.data.datasets import ImageFolderDataset
from histodistill.data.feature_files import (
    EXTRACTOR_JSON,
    PATCH_FEATURES,
    UNREADABLE_ATTR,
    coords_rows,
    is_finished,
    problems_of,
    record_unreadable,
    require_finite,
    write_patch_features,
    write_slide_features,
)
from histodistill.data.slide_dataset import SlideTileDataset
from histodistill.data.transforms import build_transform
from histodistill.distributed import Share, local_device, resolve_device, write_json_once
from histodistill.errors import UserError
from histodistill.features.context_extract import centre_cell_extraction, context_suffix
from histodistill.io import reporting_full_disk, write_json
from histodistill.models.backbones import Backbone, seeded_backbone
from histodistill.wsi.coords import coords_files, find_slide, read_coords, tiling_attrs


def model_slug(model: str | os.PathLike) -> str:
    """A folder-safe name for the ``model`` argument: ``tiny/resnet18-64`` -> ``tiny-resnet18-64``,
    ``hf-hub:MahmoodLab/UNI`` -> ``hf-hub-MahmoodLab-UNI``, ``runs/moma/checkpoints/last.ckpt`` ->
    ``moma-last`` (the run's folder names the checkpoint), an exported directory -> its name."""
    text = str(model)
    path = Path(text)
    if path.exists():
        parent = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        text = path.name if path.is_dir() else f"{parent.name}-{path.stem}" if parent.name else path.stem
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "model"


def features_folder_name(
    model: str | os.PathLike, pretrained: bool = True, context_window: int | None = None
) -> str:
    """``features_<slug>`` (`model_slug`), with ``-random-init`` for random weights, so they never share a
    folder name with the pretrained weights' features, and ``-context<S>`` for context-window features."""
    random_init = "" if pretrained else "-random-init"
    return f"features_{model_slug(model)}{random_init}{context_suffix(context_window)}"


def state_dict_sha256(model: nn.Module) -> str:
    """SHA-256 over the weights as loaded (names, dtypes, shapes, bytes): the same weights hash the same
    whatever file format, checkpoint or hub they came from."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        # 0-d buffers (BN counters) cannot be viewed as bytes
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def extractor_record(backbone: Backbone, model_arg: str, weights_sha256: str) -> dict[str, Any]:
    """What ``extractor.json`` says about the features: which network, which weights, which preprocessing."""
    pre = backbone.spec.preprocess
    return {
        "extractor": str(model_arg),
        "weights_sha256": weights_sha256,
        "mean": list(pre.mean),
        "std": list(pre.std),
        "input_size": pre.input_size,
        "mpp": pre.mpp,
        "num_features": backbone.num_features,
        "feature_dim": backbone.num_features,
        "weights_source": backbone.spec.source,  # "random" only when pretrained=False asked for it
        "spec": backbone.spec.to_dict(),
    }


@torch.inference_mode()
def extract_features(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    precision: str = "32",
    desc: str = "tiles",
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``model`` (images (B, 3, S, S) -> (B, D)) over a dataset of ``(image, other)`` pairs.

    Returns ``features`` (N, D) float32 and the stacked ``other`` values (N, ...) as numpy, in dataset
    order (coords for slide tiles, labels for patch datasets). The model is used as it is (move it to
    ``device`` and put it in eval mode first, see `prepare_model`).
    """
    device = torch.device(device)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    features, others = [], []
    with tqdm(total=len(dataset), desc=desc, unit="tile", leave=False, dynamic_ncols=True) as bar:
        for images, other in loader:
            images = images.to(device, non_blocking=True)
            if device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast:
                batch = model(images)  # (B, D)
            features.append(batch.float().cpu())
            others.append(torch.as_tensor(other))
            bar.update(len(images))
    if not features:
        return np.zeros((0, int(getattr(model, "num_features", 0))), np.float32), np.zeros((0,), np.int64)
    return torch.cat(features).numpy(), torch.cat(others).numpy()


def extract_slide(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    precision: str = "32",
    desc: str = "tiles",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features (N, D) float32 and coords (N, 2) int64 of one slide's readable tiles (a `SlideTileDataset`),
    and the coords (U, 2) int64 of the tiles the slide file could not give (datasets built with
    ``mark_unreadable`` give coords (x, y, readable); plain (x, y) ones are all readable)."""
    features, marked = extract_features(model, dataset, batch_size, num_workers, device, precision, desc)
    marked = marked.reshape(len(features), -1) if len(features) else np.zeros((0, 2))  # (N, 2) or (N, 3)
    marked = marked.astype(np.int64)
    readable = marked[:, 2].astype(bool) if marked.shape[1] == 3 else np.ones(len(marked), bool)
    coords = marked[:, :2].reshape(-1, 2)
    return features[readable], coords[readable], coords[~readable]


def prepare_model(backbone: Backbone, device: torch.device) -> Backbone:
    """Eval mode on ``device``; channels_last on CUDA, where convolutions run faster in it."""
    backbone = backbone.to(device).eval()
    if device.type == "cuda":
        backbone = backbone.to(memory_format=torch.channels_last)
    return backbone


def extract_slides(
    model: str | os.PathLike,
    coords_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str = "auto",
    precision: str = "32",
    overwrite: bool = False,
    context_window: int | None = None,
    slides_dir: str | os.PathLike | None = None,
    slide_ext: str | None = None,
    share: Share | None = None,
    pretrained: bool = True,
) -> Path:
    """Features for every slide of a tiling output (``coords_dir/patches/*.h5``, or that ``patches/``
    folder itself; ours, CLAM's or TRIDENT's); returns the features folder.

    Finished slides are skipped unless ``overwrite``. A folder already holding features of other
    weights is refused (mixing extractors in one folder would silently corrupt a MIL run).
    ``context_window`` s: each tile's feature is the centre cell of the s x s window around it
    (`histodistill.features.context_extract`), written to ``features_<slug>-context<s>``.
    The folder is named by `features_folder_name` (``-random-init`` for random weights).
    ``slides_dir``: the folder holding ``<slide_id><slide_ext>`` for coords that do not name their slide
    (CLAM, TRIDENT) or whose slides moved; every slide is found before any work starts.
    Each features file's ``coords`` carries the tiling's attributes (`tiling_attrs`).
    ``share``: only this process's share of the sorted slides, on its local GPU
    (`histodistill.distributed.this_process`; default: every slide).
    ``pretrained=False`` extracts with random weights (see `create_backbone`).
    """

    share = share or Share()
    all_files = coords_files(coords_dir)
    files = share.select(all_files)
    if share.count > 1:
        print(share.describe(len(files), len(all_files)))
    tilings = {path: read_coords(path)[1] for path in files}
    slide_of = {path: find_slide(path, attrs, slides_dir, slide_ext) for path, attrs in tilings.items()}
    backbone = seeded_backbone(model, weights, pretrained)
    record = extractor_record(backbone, str(model), state_dict_sha256(backbone.model))
    record["context_window"] = context_window
    features_dir = Path(out_dir) / features_folder_name(model, pretrained, context_window)
    transform = build_transform("eval", backbone.spec.preprocess, train=False)
    net, tiles_of = backbone, partial(SlideTileDataset, transform=transform, mark_unreadable=True)
    if context_window is not None:  # checked here, before anything is written
        net, tiles_of = centre_cell_extraction(backbone, context_window)
    write_json_once(features_dir / EXTRACTOR_JSON, record, share, replace=overwrite)
    _check_same_extractor(features_dir / EXTRACTOR_JSON, record, overwrite)

    torch_device = resolve_device(local_device(device, share))
    prepare_model(backbone, torch_device)  # in place (nn.Module.to), so `net` wraps the prepared backbone
    # A full disk names the file, this run's need (N x D float32 features and N x 2 int64 coords per slide,
    # plus HDF5's few KB) and that a rerun resumes.
    needed = sum(coords_rows(path) or 0 for path in files) * (4 * record["feature_dim"] + 16) + 8192 * len(
        files
    )
    with reporting_full_disk(features_dir, lambda: needed):
        for coords_path in tqdm(files, desc="slides", unit="slide", dynamic_ncols=True):
            tiling = tilings[coords_path]
            target = features_dir / f"{tiling['slide_id']}.h5"
            if not overwrite and is_finished(target, coords_path, record["feature_dim"]):
                continue
            dataset = tiles_of(coords_path, slide_of[coords_path])
            features, coords, unreadable = extract_slide(
                net, dataset, batch_size, num_workers, torch_device, precision, desc=tiling["slide_id"]
            )
            require_finite(features, f"slide {tiling['slide_id']}", str(model))
            attrs = {
                "slide_id": tiling["slide_id"],
                "slide_path": str(slide_of[coords_path]),
                "extractor": str(model),
                "weights_sha256": record["weights_sha256"],
                **tiling_attrs(tiling),
                UNREADABLE_ATTR: len(unreadable),
            }
            if context_window is not None:
                attrs["context_window"] = context_window
            record_unreadable(features_dir, tiling["slide_id"], unreadable, len(coords) + len(unreadable))
            write_slide_features(target, features, coords, attrs, tiling_attrs(tiling))
    return features_dir


def extract_images(
    model: str | os.PathLike,
    images_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str = "auto",
    precision: str = "32",
    overwrite: bool = False,
    pretrained: bool = True,
) -> Path:
    """Features of an image folder (``root/<class>/<image>``) into ``<out>/features_<slug>/features.h5``:
    ``features`` (N, D) float32, ``labels`` (N,) int64, ``paths`` (N,) relative to the root, attr
    ``classes``."""

    features_dir = Path(out_dir) / features_folder_name(model, pretrained)
    target = features_dir / PATCH_FEATURES
    dataset = ImageFolderDataset(images_dir)  # checked before the model is loaded (perhaps from the hub)
    paths = [str(path.relative_to(dataset.root)) for path, _ in dataset.samples]
    backbone = seeded_backbone(model, weights, pretrained)
    record = extractor_record(backbone, str(model), state_dict_sha256(backbone.model))
    dataset.transform = build_transform("eval", backbone.spec.preprocess, train=False)
    if target.exists() and not overwrite:
        if (problem := problems_of(target)) is None:
            _reuse_or_refuse(target, record, paths)
            return target
        print(f"redoing {target}: {problem}")
    torch_device = resolve_device(device)
    backbone = prepare_model(backbone, torch_device)
    features, labels = extract_features(
        backbone, dataset, batch_size, num_workers, torch_device, precision, "images"
    )
    require_finite(features, f"image folder {images_dir}", str(model))
    attrs = {
        "classes": list(dataset.classes),
        "extractor": str(model),
        "weights_sha256": record["weights_sha256"],
    }
    write_patch_features(target, features, labels, paths, attrs)
    write_json(features_dir / EXTRACTOR_JSON, record)
    return target


def _reuse_or_refuse(target: Path, record: dict[str, Any], paths: list[str]) -> None:
    """Reuse a finished ``features.h5`` of the same weights and images, saying so (a run's own earlier output,
    e.g. the demo's, is no conflict); refuse one of other weights or other images (`UserError`)."""
    with h5py.File(target, "r") as handle:
        previous = handle.attrs.get("weights_sha256")
        stored = handle["paths"][:] if "paths" in handle else []
        same_images = [p.decode() if isinstance(p, bytes) else str(p) for p in stored] == paths
    if previous != record["weights_sha256"] or not same_images:
        what = "other weights" if previous != record["weights_sha256"] else "another image folder"
        raise UserError(
            f"{target} holds features of {what}; use another `out_dir=...` or pass `overwrite=True` "
            "to extract again"
        )
    print(
        f"reusing {target}: extracted earlier from these images with these weights (overwriting extracts "
        "again)"
    )


def _check_same_extractor(path: Path, record: dict[str, Any], overwrite: bool) -> None:
    if overwrite or not path.exists():
        return
    previous = json.loads(path.read_text())
    if previous.get("weights_sha256") != record["weights_sha256"]:
        raise UserError(
            f"{path.parent} holds features of other weights ({previous.get('extractor')}, sha256 "
            f"{str(previous.get('weights_sha256'))[:12]}...); use another `out_dir=...` or pass "
            "`overwrite=True` to redo every slide"
        )

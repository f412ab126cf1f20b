"""Labeled patch datasets: an image folder with one subfolder per class, a CSV manifest, HDF5 arrays.

Each returns ``(transform(image), label)`` with ``image`` a uint8 tensor (3, H, W) and ``label`` an
int, and lists its class names in ``.classes`` (label ``i`` is ``classes[i]``). ``transform`` is a
plain attribute: `PatchDataModule` sets it in ``setup()`` once the backbone's preprocessing is known.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from histodistill.data.labels import canonical, class_order, clean_labels
from histodistill.data.table import read_table
from histodistill.errors import UserError
from histodistill.io import is_hidden_or_temporary

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")

Transform = Callable[[torch.Tensor], torch.Tensor] | None


def read_image(path: Path) -> torch.Tensor:
    """An image file as a uint8 tensor (3, H, W); `UserError` naming the file if it cannot be read."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))  # (H, W, 3)
    except (OSError, UnidentifiedImageError) as error:
        raise UserError(f"cannot read image {path}: {error}. Remove or replace the file.") from error
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (3, H, W)


class _ImageFiles(Dataset):
    """Labeled image files: subclasses fill ``self.samples`` with ``(path, label index)`` and
    ``self.classes``."""

    samples: list[tuple[Path, int]]
    transform: Transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        image = read_image(path)
        return (self.transform(image) if self.transform else image), label


class ImageFolderDataset(_ImageFiles):
    """``root/<class name>/<image>`` (the NCT-CRC-HE-100K layout); classes sorted by folder name."""

    def __init__(self, root: str | os.PathLike, transform: Transform = None) -> None:
        self.root = Path(root)
        self.transform = transform
        if not self.root.is_dir():
            what = "is a file, not a folder" if self.root.exists() else "does not exist"
            # The tiny recipes read the nuclei task at demo_out/data/nuclei/{train,test}: say what writes it.
            maker = (
                f"; `histodistill samples make-nuclei --out {self.root.parent}` writes the sample nuclei "
                "task there"
                if self.root.name in ("train", "test") and not self.root.exists()
                else ""
            )
            raise UserError(
                f"image folder {self.root} {what}: pass a folder with one subfolder per class "
                f"(root/<class>/<image>){maker}"
            )
        self.classes = sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not is_hidden_or_temporary(p)
        )
        if not self.classes:
            raise UserError(
                f"image folder {self.root} has no class subfolders (expected root/<class>/<image>)"
            )
        self.samples: list[tuple[Path, int]] = []
        for index, name in enumerate(self.classes):
            # Hidden anywhere below the class folder (`._x.png` resource forks, `.ipynb_checkpoints/`) is not
            # data.
            files = sorted(
                p
                for p in (self.root / name).rglob("*")
                if p.suffix.lower() in IMAGE_EXTENSIONS
                and not any(is_hidden_or_temporary(part) for part in p.relative_to(self.root / name).parts)
            )
            if not files:
                raise UserError(
                    f"class folder {self.root / name} holds no images ({', '.join(IMAGE_EXTENSIONS)}): "
                    "add images or remove the folder"
                )
            self.samples += [(path, index) for path in files]


class CsvDataset(_ImageFiles):
    """A manifest ``path,label[,split]`` with image paths relative to the CSV (or to ``root``).

    The class list comes from the whole file, so every split shares one label mapping; pass
    ``classes`` to fix the order (then a label outside it is an error). ``split`` keeps only the
    rows whose ``split`` column equals it.
    """

    def __init__(
        self,
        csv: str | os.PathLike,
        root: str | os.PathLike | None = None,
        split: str | None = None,
        classes: list[str] | None = None,
        transform: Transform = None,
    ) -> None:
        self.csv_path = Path(csv)
        self.transform = transform
        root = Path(root) if root is not None else self.csv_path.parent
        rows = self._read_rows()
        labels = {row["label"] for row in rows}
        self.classes = [canonical(c) for c in classes] if classes is not None else class_order(labels)
        unknown = sorted(labels - set(self.classes))
        if unknown:
            raise UserError(
                f"{self.csv_path}: labels {unknown} are not in classes {self.classes}; "
                "fix the CSV or the dataset's `classes` list"
            )
        if split is not None:
            rows = [row for row in rows if row.get("split") == split]
            if not rows:
                raise UserError(f"{self.csv_path} has no rows with split == {split!r}")
        index = {name: i for i, name in enumerate(self.classes)}
        self.samples = [(root / row["path"], index[row["label"]]) for row in rows]

    def _read_rows(self) -> list[dict[str, str]]:
        table = read_table(self.csv_path, "CSV manifest", ("path", "label"))
        if not table.rows:
            raise UserError(f"CSV manifest {self.csv_path} has no rows")
        labels = clean_labels(
            [row["label"] for row in table.rows], table.lines, f"CSV manifest {self.csv_path}"
        )
        return [{**row, "label": label} for row, label in zip(table.rows, labels, strict=True)]


class HDF5ArrayDataset(Dataset):
    """Images and labels in HDF5 arrays, the PatchCamelyon layout: ``x`` (N, H, W, 3) uint8 in one file,
    ``y`` (N, 1, 1, 1) (or any shape with N first and one value per image) in another (or the same).

    Images are read lazily; the file is opened once per process (per DataLoader worker), because an
    h5py handle cannot be shared across a fork.
    """

    def __init__(
        self,
        x_path: str | os.PathLike,
        y_path: str | os.PathLike | None = None,
        x_key: str = "x",
        y_key: str = "y",
        classes: list[str] | None = None,
        transform: Transform = None,
    ) -> None:
        self.x_path = Path(x_path)
        self.y_path = Path(y_path) if y_path is not None else self.x_path
        self.x_key = x_key
        self.transform = transform
        with self._open(self.x_path) as handle:
            if x_key not in handle:
                raise UserError(f"{self.x_path} has no dataset {x_key!r} (found {sorted(handle.keys())})")
            shape = handle[x_key].shape
        if len(shape) != 4 or shape[-1] != 3:
            raise UserError(f"{self.x_path}:{x_key} has shape {shape}; expected (N, H, W, 3) images")
        with self._open(self.y_path) as handle:
            if y_key not in handle:
                raise UserError(f"{self.y_path} has no dataset {y_key!r} (found {sorted(handle.keys())})")
            labels = np.asarray(handle[y_key]).reshape(handle[y_key].shape[0], -1)  # (N, values per image)
        if labels.shape[1] != 1:
            raise UserError(
                f"{self.y_path}:{y_key} holds {labels.shape[1]} values per image; expected one label"
            )
        if labels.shape[0] != shape[0]:
            raise UserError(
                f"{self.x_path}:{x_key} has {shape[0]} images but {self.y_path}:{y_key} has "
                f"{labels.shape[0]} labels; they must match one to one"
            )
        self.labels = labels[:, 0].astype(np.int64)  # (N,)
        self.classes = (
            list(classes) if classes is not None else [str(i) for i in range(int(self.labels.max()) + 1)]
        )
        if self.labels.min() < 0 or self.labels.max() >= len(self.classes):
            raise UserError(
                f"{self.y_path}:{y_key} has labels outside 0..{len(self.classes) - 1} "
                f"for classes {self.classes}"
            )
        self._handle: h5py.File | None = None
        self._pid: int | None = None

    def _open(self, path: Path) -> h5py.File:
        try:
            return h5py.File(path, "r")
        except OSError as error:
            raise UserError(f"cannot open HDF5 file {path}: {error}") from error

    def _images(self) -> h5py.Dataset:
        if self._handle is None or self._pid != os.getpid():
            self._handle = self._open(self.x_path)
            self._pid = os.getpid()
        return self._handle[self.x_key]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        # (3, H, W)
        image = torch.from_numpy(np.asarray(self._images()[index], dtype=np.uint8)).permute(2, 0, 1)
        return (self.transform(image) if self.transform else image), int(self.labels[index])

    def __getstate__(self) -> dict:
        # Workers (spawned or pickled) open their own handle.
        state = dict(self.__dict__)
        state["_handle"] = None
        state["_pid"] = None
        return state

"""A dataset wrapper that adds each sample's index: ``(image, label) -> (image, label, index)``.

CRD keeps one memory row per training sample and needs to know which rows a batch holds. Wrap the
training dataset in a recipe (``class_path: histodistill.data.indexed_dataset.IndexedDataset``,
``init_args.dataset: {class_path: ..., init_args: ...}``); validation data stays unwrapped.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset


class IndexedDataset(Dataset):
    """``transform`` and ``classes`` are the wrapped dataset's, so a data module can set them as usual."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        return (*self.dataset[index], index)

    @property
    def transform(self):
        return self.dataset.transform

    @transform.setter
    def transform(self, value) -> None:
        self.dataset.transform = value

    @property
    def classes(self) -> list[str]:
        return self.dataset.classes

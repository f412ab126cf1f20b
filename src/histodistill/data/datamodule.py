"""`PatchDataModule`: train/val/test patch datasets prepared the way the method's backbone expects.

The datasets are given in YAML as ``class_path`` + ``init_args`` (any dataset with a writable
``transform`` attribute: `ImageFolderDataset`, `CsvDataset`, `HDF5ArrayDataset`, `SlideTilesDataset`);
transforms are recipe names (`histodistill.data.transforms`). In ``setup()`` the module reads the
backbone's preprocessing from ``trainer.lightning_module.preprocess``, so mean/std and input size
always match the model being trained.

Training data is reproducible and resumable: epoch ``e``'s order comes from ``seed + e`` (a
`DistributedSampler`, which also shards the data under DDP) and the augmentation of sample ``i`` in
epoch ``e`` from its own generator seeded with (seed, e, i). Nothing depends on the global random
state, the number of workers or whether they persist, so a run resumed at epoch ``e`` sees exactly
the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import os

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from histodistill.data.transforms import build_transform
from histodistill.errors import ConfigError, UserError


class EpochIndexSampler(DistributedSampler):
    """A `DistributedSampler` that yields ``epoch * N + index``, so the dataset (`SeededAugmentation`)
    knows the epoch even inside persistent worker processes, which never see ``set_epoch``."""

    def __iter__(self):
        size = len(self.dataset)
        return (self.epoch * size + index for index in super().__iter__())


class SeededAugmentation(Dataset):
    """Wraps a training dataset: item ``epoch * N + index`` is ``dataset[index]`` drawn with torch's
    generator seeded from (seed, epoch, index), then the generator is restored."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int):
        epoch, index = divmod(key, len(self.dataset))
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only, the one fork_rng restores: torch.manual_seed also seeds CUDA/XPU/MTIA,
            # formatting a stack trace per call where they are not initialised (7x the cost of a small item).
            torch.default_generator.manual_seed(
                int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0])
            )
            return self.dataset[index]


class PatchDataModule(L.LightningDataModule):
    """Patch datasets for any method.

    Args:
        train: training dataset (labeled ``(image, label)`` or unlabeled ``(image, coords)``).
        val: validation dataset, or None for methods without validation (self-supervised pretraining).
        test: test dataset for ``trainer.test``, or None.
        batch_size: samples per device per step (the effective batch multiplies it by devices × accumulation).
        num_workers: DataLoader worker processes (0 reads in the main process).
        train_transform: recipe for training data (eval, basic, randaugment, mae, sdmae, linprobe, he,
        finetune). eval_transform: recipe for validation/test data, applied with ``train=False``
        (deterministic). seed: base of the per-epoch shuffling seed; None uses the run's ``seed_everything``
        value.
    """

    def __init__(
        self,
        train: Dataset,
        val: Dataset | None = None,
        test: Dataset | None = None,
        batch_size: int = 64,
        num_workers: int = 4,
        train_transform: str = "basic",
        eval_transform: str = "eval",
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"`batch_size={batch_size}`: must be >= 1")
        self.datasets = {"train": train, "val": val, "test": test}
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self.seed = seed

    @property
    def classes(self) -> list[str] | None:
        """Class names of the training data (None for unlabeled data)."""
        return getattr(self.datasets["train"], "classes", None)

    def setup(self, stage: str | None = None) -> None:
        preprocess = self.trainer.lightning_module.preprocess
        for split, dataset in self.datasets.items():
            if dataset is None:
                continue
            if not hasattr(dataset, "transform"):
                raise UserError(
                    f"data.init_args.{split}: {type(dataset).__name__} has no `transform` attribute; "
                    "use a histodistill dataset or give yours one"
                )
            train = split == "train"
            dataset.transform = build_transform(
                self.train_transform if train else self.eval_transform, preprocess, train
            )

    def _loader(self, dataset: Dataset, sampler=None, drop_last: bool = False) -> DataLoader:
        workers = self.num_workers
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=drop_last,
        )

    def train_dataloader(self) -> DataLoader:
        dataset = self.datasets["train"]
        seed = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        trainer = self.trainer
        sampler = EpochIndexSampler(
            dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, seed=seed
        )
        if len(dataset) // trainer.world_size < self.batch_size:
            raise UserError(
                f"the training set has {len(dataset)} samples, fewer than one batch per device "
                f"(`batch_size={self.batch_size}`); lower the batch size"
            )
        # drop_last keeps every step's batch the same size (BatchNorm and the lr scaling assume it).
        return self._loader(SeededAugmentation(dataset, seed), sampler=sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.datasets["val"]) if self.datasets["val"] is not None else []

    def test_dataloader(self) -> DataLoader | list:
        return self._loader(self.datasets["test"]) if self.datasets["test"] is not None else []

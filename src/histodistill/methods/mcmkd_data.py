"""`ContextWindowDataModule`: MCM-KD's training data, context windows with cached teacher features.

In ``prepare_data()`` (global rank 0 only, the others wait) it builds a missing cache when asked to; in
``setup()`` (every rank) it makes sure the teacher cache matches the teacher and the tiling
(`histodistill.features.teacher_cache.ensure_teacher_cache`), checks the model's ``teacher_dim`` against
it, normalises windows with the student's mean/std (``trainer.lightning_module.preprocess``) and, for
``target_norm: standardize``, gives the module the per-dimension statistics of the cache's training tiles.
Loading, shuffling and DDP sharding are `PatchDataModule`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from lightning.pytorch.utilities import rank_zero_info

from histodistill.data.context_windows import context_windows_of_dir, window_transform
from histodistill.data.datamodule import PatchDataModule
from histodistill.data.teacher_features import TeacherFeatures, feature_statistics
from histodistill.errors import ConfigError
from histodistill.features.teacher_cache import ensure_teacher_cache
from histodistill.io import visible_files


class ContextWindowDataModule(PatchDataModule):
    """Context windows of every coords file in ``patches_dir``.

    Args:
        tiles_dir: a tiling output folder, ours, CLAM's or TRIDENT's (its ``patches/`` holds one coords .h5
        per
            slide).
        slides_dir: the folder of the slides, for coords that do not name them (CLAM, TRIDENT) or whose slides
            moved (default: each coords file's ``slide_path``).
        teacher: the teacher backbone (registered name, timm name, hf-hub id, .ckpt or export dir).
        teacher_weights: a local weights file for the teacher (e.g. UNI's pytorch_model.bin).
        teacher_pretrained: a teacher name loads its published weights; False builds it randomly
            initialised (tests and the CPU demo only: random targets teach nothing).
        cache_dir: the teacher's features live in ``<cache_dir>/features_<teacher slug>``, the folder
            ``histodistill extract --model TEACHER --coords TILES_DIR --out CACHE_DIR`` writes (default:
            tiles_dir).
        rebuild_cache: recompute a missing or stale cache with the teacher instead of refusing it.
        side: s, the window is s x s tiles (odd s centres the window on its anchor tile).
        min_fraction: the least fraction of a window's s*s cells that must be tissue tiles (1 = all).
        window_stride: anchor a window on every k-th tile column and row only. 1: overlapping windows, one
            epoch shows each tile as a target in up to s*s windows; s: disjoint windows, at most once.
        mpp: override of the slides' microns per pixel (for slides whose metadata lacks it).
        exclude_slides: slide ids kept out of training (held-out slides, `histodistill distill --holdout`).
        batch_size: windows per device per step.
        num_workers: DataLoader worker processes (0 reads in the main process).
        extract_batch_size: tiles per teacher forward pass when the cache is built.
        extract_precision: ``32`` or ``bf16`` (autocast) for the teacher when the cache is built.
        seed: base of the per-epoch shuffling seed; None uses the run's seed.
    """

    def __init__(
        self,
        tiles_dir: str,
        teacher: str,
        teacher_weights: str | None = None,
        teacher_pretrained: bool = True,
        cache_dir: str | None = None,
        rebuild_cache: bool = False,
        side: int = 3,
        min_fraction: float = 1.0,
        window_stride: int = 1,
        mpp: float | None = None,
        exclude_slides: list[str] | None = None,
        batch_size: int = 16,
        num_workers: int = 4,
        extract_batch_size: int = 64,
        extract_precision: Literal["32", "bf16"] = "32",
        seed: int | None = None,
        slides_dir: str | None = None,
    ) -> None:
        super().__init__(train=None, batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.tiles_dir = Path(tiles_dir)
        self.slides_dir = Path(slides_dir) if slides_dir else None
        self.teacher, self.teacher_weights, self.teacher_pretrained = (
            teacher,
            teacher_weights,
            teacher_pretrained,
        )
        self.cache_dir = Path(cache_dir) if cache_dir else self.tiles_dir
        self.rebuild_cache = rebuild_cache
        self.side, self.min_fraction, self.mpp = side, min_fraction, mpp
        self.window_stride = window_stride
        self.exclude_slides = list(exclude_slides or [])
        self.extract_batch_size, self.extract_precision = extract_batch_size, extract_precision
        # The cache lives on a filesystem every node sees: build it on global rank 0 only (Lightning's
        # default, once per node, had several nodes write the same files at once); the other ranks wait
        # at Lightning's barrier after prepare_data and then read the finished cache in setup().
        self.prepare_data_per_node = False

    def prepare_data(self) -> None:
        ensure_teacher_cache(
            self.tiles_dir,
            self.cache_dir,
            self.teacher,
            self.teacher_weights,
            self.rebuild_cache,
            self.extract_batch_size,
            self.num_workers,
            self.extract_precision,
            self.teacher_pretrained,
            self.slides_dir,
        )

    def setup(self, stage: str | None = None) -> None:
        features_dir = ensure_teacher_cache(
            self.tiles_dir,
            self.cache_dir,
            self.teacher,
            self.teacher_weights,
            pretrained=self.teacher_pretrained,
        )
        module = self.trainer.lightning_module
        dataset = context_windows_of_dir(
            self.tiles_dir / "patches",
            features_dir,
            self.side,
            self.min_fraction,
            transform=window_transform(module.preprocess, self.side),
            mpp=self.mpp,
            window_stride=self.window_stride,
            exclude=self.exclude_slides,
            slides_dir=self.slides_dir,
        )
        cached_dim = TeacherFeatures(visible_files(features_dir, (".h5",))[0]).dim
        if getattr(module, "teacher_dim", cached_dim) != cached_dim:
            raise ConfigError(
                f"`teacher_dim={module.teacher_dim}` but the teacher cache {features_dir} holds "
                f"{cached_dim}-d features of {self.teacher}: set `teacher_dim={cached_dim}`"
            )
        if getattr(module, "target_norm", "layer_norm") == "standardize":
            # Statistics over the training slides' tiles only (held-out slides stay unseen), once per setup;
            # the module keeps them in its checkpoint.
            files = [
                path for path in visible_files(features_dir, (".h5",)) if path.stem not in self.exclude_slides
            ]
            mean, std, count = feature_statistics(files)
            module.set_target_statistics(mean, std)
            rank_zero_info(
                f"MCM-KD targets standardised per dimension with the statistics of {count} tiles "
                f"of {len(files)} slides in {features_dir}"
            )
        self.datasets["train"] = dataset

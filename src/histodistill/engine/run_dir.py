"""The run directory: where a `histodistill fit` run writes everything, and what it gets by default.

```
<run dir>/                      trainer.default_root_dir (default runs/<config stem>)
  config.yaml                   the resolved config: rerun it with `histodistill fit --config`
  metrics.csv                   every logged value, per step / epoch (CSVLogger)
  metrics.json                  final and best metrics at the end (RunSummary)
  tensorboard/                  TensorBoard events
  checkpoints/last.ckpt         end of the latest epoch: what ``resume`` continues from
  checkpoints/best-<name>.ckpt  best value of each metric the method monitors: weights only (no optimiser
  state) figures/                      PNGs written by the method (confusion matrices, ...)
```
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from histodistill.engine.callbacks import RunSummary, StepReseed
from histodistill.errors import UserError
from histodistill.io import unwritable_reason
from histodistill.models.weights import first_line


def last_checkpoint(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints" / "last.ckpt"


def default_run_dir(config_paths: list[str | os.PathLike] | None) -> Path:
    """``runs/<stem of the last config file>`` (``runs/fit`` without a config file)."""
    stem = Path(str(config_paths[-1])).stem if config_paths else "fit"
    return Path("runs") / stem


def check_run_dir(run_dir: str | os.PathLike, resume: bool, overwrite: bool) -> Path | None:
    """The checkpoint to resume from (None for a fresh run); refuse to silently reuse a finished run, and a
    ``trainer.default_root_dir`` where no folder can be made (empty, a file, or under a file)."""
    if (reason := unwritable_reason(run_dir, "folder")) is not None:
        raise UserError(f"trainer.default_root_dir: {reason}")
    last = last_checkpoint(run_dir)
    if resume:
        if not last.is_file():
            raise UserError(
                f"`resume=True`: {last} does not exist; run without `resume=True` to start, "
                "or set trainer.default_root_dir to the run you want to continue"
            )
        return last
    if last.is_file() and not overwrite:
        raise UserError(
            f"{run_dir} already holds a run ({last}): add `resume=True` to continue it, "
            "`overwrite=True` to start it again in place, or choose another trainer.default_root_dir"
        )
    return None


# What torch and Lightning say when a checkpoint's weights or optimiser groups do not fit the model.
MISMATCH_MESSAGES = ("Error(s) in loading state_dict", "doesn't match the size of optimizer's group")


@contextmanager
def resuming_a_checkpoint_that_fits(checkpoint: Path | None):
    """Turn the error of a resumed ``checkpoint`` whose weights or optimiser groups do not fit the model into
    one `UserError`: the recipe or the code changed since the run (a traceback before)."""
    try:
        yield
    except (RuntimeError, ValueError) as error:
        if checkpoint is None or not any(message in str(error) for message in MISMATCH_MESSAGES):
            raise
        raise UserError(
            f"{checkpoint} does not fit this model ({first_line(error)}): the recipe or the code changed "
            "since the run. Resume with the run's own config.yaml, or set `overwrite=True` to start again"
        ) from None


def default_loggers(run_dir: str | os.PathLike) -> list:
    """metrics.csv directly in the run directory and TensorBoard events in ``tensorboard/``."""
    return [
        CSVLogger(save_dir=str(run_dir), name="", version=""),
        TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="", default_hp_metric=False),
    ]


def default_callbacks(model: L.LightningModule, run_dir: str | os.PathLike) -> list[L.Callback]:
    """last.ckpt every epoch, best-<name>.ckpt (weights only) for each of the method's ``checkpoint_monitors``
    (``{name: (metric, "max" | "min")}``), per-step reseeding, the learning rate, metrics.json."""
    directory = Path(run_dir) / "checkpoints"
    # enable_version_counter=False: overwriting replaces files instead of adding "-v1" copies.
    # Without a monitor, save_top_k=1 keeps exactly the latest epoch: filename "last" makes it last.ckpt.
    callbacks: list[L.Callback] = [
        ModelCheckpoint(dirpath=directory, filename="last", save_top_k=1, enable_version_counter=False)
    ]
    for name, (monitor, mode) in getattr(model, "checkpoint_monitors", {}).items():
        callbacks.append(
            ModelCheckpoint(
                dirpath=directory,
                filename=f"best-{name}",
                monitor=monitor,
                mode=mode,
                save_top_k=1,
                auto_insert_metric_name=False,
                enable_version_counter=False,
                # What a best checkpoint is for (a teacher, extraction, export, testing) needs the weights and
                # our backbone record, not the optimiser state that doubles or triples its size; resuming
                # uses last.ckpt.
                save_weights_only=True,
            )
        )
    callbacks += [StepReseed(), LearningRateMonitor(logging_interval="step"), RunSummary(run_dir)]
    return callbacks

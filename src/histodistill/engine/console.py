"""Lightning's console output without its noise: advertisements and warnings that are wrong for our
methods go, every other warning stays.

- The "💡 Tip: ... litlogger" line that every Trainer prints is an advertisement, not information.
- "You passed in a `val_dataloader` but have no `validation_step`": our masked-pretraining methods (MAE,
  SD-MAE, MCM-KD) have no validation step by design, while the recipes' data modules still hold a
  validation split (the reconstruction figures use it). For a user's own class the warning stays.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import lightning as L
from lightning.pytorch.utilities.model_helpers import is_overridden

# Where Lightning's rank_zero_info logs (lightning_utilities rebinds its logger to one of these).
_RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
_ADVERTS = ("💡 Tip:",)
_NO_VALIDATION_STEP = "You passed in a `val_dataloader` but have no `validation_step`"


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(_ADVERTS)


def drop_lightning_adverts() -> None:
    """Filter Lightning's advertisement lines out of its rank-zero log (idempotent)."""
    for name in _RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropAdverts) for f in logger.filters):
            logger.addFilter(_DropAdverts())


@contextmanager
def expected_warnings_silenced(model: L.LightningModule) -> Iterator[None]:
    """Silence, while fitting ``model``, the warnings our own classes make by design (see module doc)."""
    with warnings.catch_warnings():
        ours = type(model).__module__.startswith("histodistill.")
        if ours and not is_overridden("validation_step", model):
            warnings.filterwarnings("ignore", message=f".*{_NO_VALIDATION_STEP}")
        yield

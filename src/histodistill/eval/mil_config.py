"""How a MIL cross-validation is configured: the one place for its defaults.

Plain dataclasses without torch, so `histodistill mil --help` (which builds its options from these
defaults) stays fast; `histodistill.eval.mil` trains with `TrainConfig` and
`histodistill.eval.mil_cv.cross_validate` runs a `CVConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

MIL_MODEL_NAMES = ("abmil", "transmil", "mean", "clam_sb", "clam_mb")
EARLY_STOP = ("none", "val_loss", "val_auroc")
# The validation share held out when early stopping is on and `CVConfig.val_fraction` is not given.
VAL_FRACTION_FOR_EARLY_STOP = 0.2


@dataclass
class TrainConfig:
    """How each fold is trained (the `histodistill mil` options of the same names).

    ``early_stop`` is off by default: on the 1-10 validation slides of a small cohort it picked
    epoch-1 to -5 models and lowered the slide AUROC (docs/mil.md), so the last epoch is kept.
    ``seed`` is the first CV seed: seed s seeds the splits, each fold's initialisation (s + fold) and
    its shuffling. ``feature_norm`` ``standardize`` z-scores each feature dimension with the fold's training
    tiles' mean and sd (`histodistill.models.mil.Standardized`, stored with the model); ``none`` feeds raw
    features, as CLAM and TRIDENT do. On raw self-supervised ViT features ABMIL stays at chance (the demo's
    SD-MAE ViT: pooled slide AUROC 0.51 raw vs 0.89 standardised, 10 epochs, docs/mil.md), so it is the
    default for every caller, the library's as the CLI's.
    ``batch_size``: bags per step, padded with a mask, their mean loss and one AdamW step; B > 1 takes
    ceil(n / B) steps an epoch instead of n, which changes the optimisation (docs/mil.md).
    """

    epochs: int = 50
    lr: float = 2e-4
    weight_decay: float = 1e-4
    early_stop: Literal["none", "val_loss", "val_auroc"] = "none"
    patience: int = 10
    batch_size: int = 1
    seed: int = 0
    device: str = "auto"
    feature_norm: Literal["standardize", "none"] = "standardize"
    # the MIL model's own arguments (hidden_dim, CLAM's, ...)
    model_kwargs: dict = field(default_factory=dict)

    def model_arguments(self) -> dict:
        """What `histodistill.models.mil.create_mil` gets besides name and sizes (also saved with the
        model)."""
        return {"standardize": self.feature_norm == "standardize", **self.model_kwargs}


@dataclass
class CVConfig:
    """k-fold cross-validation by case, repeated over ``seeds`` CV seeds (``train.seed``,
    ``train.seed + 1``, ...): seed s splits the cases with seed s, so every features folder run with the
    same labels and seed gets the same folds.

    ``val_fraction`` None: `VAL_FRACTION_FOR_EARLY_STOP` of each fold's training cases are held out when
    ``train.early_stop`` is on, none when it is off (no slide is kept from training for nothing).
    ``by_case``: one bag per case; ``drop_empty``: leave out slides without tissue tiles (else an error).
    ``batched``: train all folds × seeds as one stacked model (`histodistill.eval.mil_stacked`; the same
    results as one at a time, 1.3-1.5x less CPU time on an idle 2-core CPU, M times the activation memory);
    False, or a model that cannot be stacked (TransMIL, CLAM-MB), trains them one at a time.
    """

    model: Literal["abmil", "transmil", "mean", "clam_sb", "clam_mb"] = "abmil"
    folds: int = 5
    seeds: int = 1
    val_fraction: float | None = None
    by_case: bool = False
    drop_empty: bool = False
    batched: bool = True
    train: TrainConfig = field(default_factory=TrainConfig)

    def resolved_val_fraction(self) -> float:
        if self.val_fraction is not None:
            return self.val_fraction
        return 0.0 if self.train.early_stop == "none" else VAL_FRACTION_FOR_EARLY_STOP

"""Train and evaluate a MIL slide classifier per cross-validation fold.

A short, visible loop rather than a Lightning Trainer: a MIL fold trains a small head on a few
hundred in-memory bags of different lengths, early-stops on a validation metric and is rebuilt for
every fold; the loop is shorter than the Trainer set-up it would replace, and starts instantly on a
CPU. It keeps `fit`'s run-directory conventions (`histodistill.eval.mil_cv` writes it).

Per fold: AdamW with weight decay (no decay on biases, norms and tokens, `histodistill.optim.optimizer`),
the model's own objective (``model.loss``: bag cross-entropy, plus CLAM's instance loss), ``epochs`` epochs
with the last kept, or (``early_stop``) the best epoch by validation loss or AUROC kept, stopping after
``patience`` epochs without improvement. `histodistill.eval.mil_cv` runs the folds.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from histodistill.data.bags import BagDataset, collate_bags
from histodistill.data.splits import Split
from histodistill.distributed import resolve_device
from histodistill.errors import UserError
from histodistill.eval.metrics import classification_metrics, ovr_auroc
from histodistill.eval.mil_config import TrainConfig
from histodistill.models.mil import Standardized, create_mil
from histodistill.optim.optimizer import OptimConfig, build_optimizer

REPORTED_METRICS = ("auroc", "balanced_accuracy", "macro_f1", "accuracy")


@dataclass
class Predictions:
    """Model outputs over a dataset, in dataset order."""

    bag_ids: list[str]
    labels: np.ndarray  # (n,) int
    probs: np.ndarray  # (n, C) float
    scores: list[np.ndarray]  # per bag, (N_bag,) instance scores
    loss: float  # mean cross-entropy


@dataclass
class FoldResult:
    fold: int
    model: nn.Module  # the best epoch's weights, on the CPU
    best_epoch: int
    history: list[dict]  # one row per epoch: epoch, train_loss, val_loss, val_auroc
    test: Predictions
    metrics: dict  # REPORTED_METRICS (+ whatever classification_metrics adds) on the test part


def autocast(device: torch.device):
    """bf16 autocast on a GPU (the bag embedding dominates and is safe in bf16); full precision on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate_bags, generator=generator
    )


def non_finite_loss_error(bag_ids: list[str], runs: str = "") -> UserError:
    """A step's loss became NaN or inf (``runs``: which of runs trained together, if any)."""
    where = f"bags {bag_ids}" + (f" of {runs}" if runs else "")
    return UserError(
        f"the MIL training loss became non-finite ({where}); nothing was saved for this fold. "
        "Lower `lr=...`, and check the features for extreme values"
    )


def overflow_error(lr: float, runs: str = "") -> UserError:
    """An optimiser step wrote inf/NaN into the weights (``runs``: which of runs trained together, if any)."""
    where = f" in {runs}" if runs else ""
    return UserError(
        f"the MIL optimiser step overflowed{where} (`lr={lr:.4g}`: the weights became non-finite); "
        "nothing was saved for this fold. Lower `lr=...`"
    )


def train_epoch(
    model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, device: torch.device
) -> float:
    """One pass over the training bags; returns the mean loss per bag."""
    model.train()
    parameters = list(model.parameters())  # checked after every step, listed once
    total, count = 0.0, 0
    for batch in loader:
        labels = batch["labels"].to(device)
        with autocast(device):
            output = model(batch["features"].to(device), batch["mask"].to(device))  # logits (B, C)
        loss = model.loss(output, labels)  # the model's objective: bag CE, plus CLAM's instance loss
        if not torch.isfinite(loss):
            raise non_finite_loss_error(batch["bag_ids"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # The fused AdamW step writes an overflow (an absurd learning rate) into the weights instead of
        # raising, so the weights are checked after every step: a fold's last step could otherwise be saved as
        # inf/NaN.
        if not torch.isfinite(torch.nn.utils.get_total_norm(parameters)):
            raise overflow_error(optimizer.param_groups[0]["lr"])
        total += loss.item() * len(labels)
        count += len(labels)
    return total / max(count, 1)


@torch.no_grad()
def predict(model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 1) -> Predictions:
    model.eval()
    bag_ids, labels, probs, scores, losses = [], [], [], [], []
    for batch in _loader(dataset, batch_size, shuffle=False, seed=0):
        with autocast(device):
            out = model(batch["features"].to(device), batch["mask"].to(device))
        logits = out.logits.float().cpu()
        losses.append(F.cross_entropy(logits, batch["labels"], reduction="sum").item())
        probs.append(logits.softmax(dim=1).numpy())
        labels.append(batch["labels"].numpy())
        bag_ids += batch["bag_ids"]
        for b, mask in enumerate(batch["mask"]):
            scores.append(out.scores[b, mask.to(device)].float().cpu().numpy())
    n = len(bag_ids)
    return Predictions(
        bag_ids, np.concatenate(labels), np.concatenate(probs), scores, sum(losses) / max(n, 1)
    )


def auroc(predictions: Predictions) -> float:
    """The one-vs-rest AUROC alone: every epoch's validation needs only this of `classification_metrics`."""
    return ovr_auroc(predictions.labels, predictions.probs.astype(np.float64))


def train_fold(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset | None,
    config: TrainConfig,
    log: Callable[[dict], None] = lambda row: None,
) -> tuple[nn.Module, int, list[dict]]:
    """Train ``model``; returns (the best epoch's model, that epoch, the per-epoch history).

    Without a validation set, or with ``early_stop="none"``, every epoch runs and the last is kept.
    """
    device = resolve_device(config.device)
    model.to(device)
    optim = OptimConfig(name="adamw", lr=config.lr, weight_decay=config.weight_decay, schedule="constant")
    optimizer = build_optimizer(model, optim, config.lr, fused=True)
    loader = _loader(train_set, config.batch_size, shuffle=True, seed=config.seed)
    watch = config.early_stop if val_set is not None and len(val_set) else "none"
    best_value, best_epoch, best_state, history = -math.inf, 0, None, []
    for epoch in range(1, config.epochs + 1):
        row = {"epoch": epoch, "train_loss": train_epoch(model, loader, optimizer, device)}
        if val_set is not None and len(val_set):
            val = predict(model, val_set, device, config.batch_size)
            row |= {"val_loss": val.loss, "val_auroc": auroc(val)}
        history.append(row)
        log(row)
        value = {
            "val_loss": -row.get("val_loss", 0.0),
            "val_auroc": row.get("val_auroc", 0.0),
            "none": epoch,
        }[watch]
        if best_state is None or value > best_value:
            best_value, best_epoch, best_state = value, epoch, copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= config.patience and watch != "none":
            break
    model.load_state_dict(best_state)
    return model.cpu(), best_epoch, history


def split_indices(dataset: BagDataset, split: Split) -> dict[str, list[int]]:
    """Dataset indices per part; a bag belongs to the part of its slides (splits are by case)."""
    part_of = {slide: part for part, slides in split.items() for slide in slides}
    indices: dict[str, list[int]] = {part: [] for part in split}
    for i, bag in enumerate(dataset.bags):
        part = part_of.get(bag.slide_ids[0])
        if part is not None:
            indices[part].append(i)
    return indices


def check_val_for_early_stop(splits: list[Split], early_stop: str, source: str) -> None:
    """Early stopping needs a validation part in every fold; a fold without one is refused before any
    training (rather than silently trained for every epoch). ``source`` names where the splits came from."""
    if empty := [fold for fold, split in enumerate(splits) if not split["val"]]:
        raise UserError(
            f"{source}: fold(s) {', '.join(map(str, empty))} have no validation part, so "
            f"`early_stop={early_stop}` has nothing to watch; pass `early_stop=none` to train every fold for "
            "`epochs=...`, or hold out a validation part (`val_fraction=...` > 0, or a val column in your "
            "`splits_dir=...`)"
        )


def check_val_has_every_class(dataset: BagDataset, splits: list[Split], num_classes: int) -> None:
    """AUROC needs every class in each validation part; say so before any training starts."""
    for fold, split in enumerate(splits):
        present = {dataset.bags[i].label for i in split_indices(dataset, split)["val"]}
        if len(present) < num_classes:
            raise UserError(
                f"fold {fold}: the validation part lacks some classes, so val AUROC is undefined; "
                "use `early_stop=val_loss`, a larger `val_fraction=...`, or other `splits_dir=...`"
            )


def build_fold_model(
    fold: int,
    dataset: BagDataset,
    train_part: list[int],
    model_name: str,
    num_classes: int,
    config: TrainConfig,
) -> nn.Module:
    """A fresh model for ``fold``, initialised with seed ``config.seed + fold``; a `Standardized` one gets the
    statistics of the training part's instances only. Training it draws its dropout masks from the global RNG
    as this leaves it."""
    torch.manual_seed(config.seed + fold)
    model = create_mil(model_name, dataset.feature_dim, num_classes, **config.model_arguments())
    if isinstance(model, Standardized):
        model.fit(torch.cat([dataset[i]["features"] for i in train_part]))  # (sum of N, D)
    return model


def evaluate_fold(
    fold: int,
    trained: tuple[nn.Module, int, list[dict]],
    dataset: BagDataset,
    test_part: list[int],
    num_classes: int,
    batch_size: int,
) -> FoldResult:
    """The fold's result: ``trained`` (model, best epoch, history, as `train_fold` returns) on its test
    part."""
    model, best_epoch, history = trained
    test = predict(model, Subset(dataset, test_part), torch.device("cpu"), batch_size)
    metrics = classification_metrics(test.labels, test.probs, num_classes)
    return FoldResult(fold, model, best_epoch, history, test, metrics)


def run_fold(
    fold: int,
    dataset: BagDataset,
    split: Split,
    model_name: str,
    num_classes: int,
    config: TrainConfig,
    log: Callable[[dict], None] = lambda row: None,
) -> FoldResult:
    """Build a fresh seeded model, train it on the fold's train part, evaluate on its test part."""
    parts = split_indices(dataset, split)
    model = build_fold_model(fold, dataset, parts["train"], model_name, num_classes, config)
    fold_config = dataclasses.replace(config, seed=config.seed + fold)  # each fold shuffles differently
    trained = train_fold(
        model, Subset(dataset, parts["train"]), Subset(dataset, parts["val"]), fold_config, log
    )
    return evaluate_fold(fold, trained, dataset, parts["test"], num_classes, config.batch_size)

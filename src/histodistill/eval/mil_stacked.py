"""Train the M runs of one cross-validation (its folds × seeds) together, as one stacked model.

Training one small MIL head at a time spends much of each single-bag step around the step (the data
loader, the optimiser's Python, checks, many tiny matrix products); here every step takes one bag of
each run through one model holding all M runs' weights (`histodistill.models.mil_stacked`), one
backward and one optimiser call. Each run keeps everything it has when trained alone with
`histodistill.eval.mil.train_fold`:

- its model, as `create_mil` built it (its seed, its `Standardized` statistics);
- its bags in its own order: each epoch's order comes from a `DataLoader` with the run's generator seed,
  exactly as `train_fold`'s loader draws it; bags of different lengths are padded to the longest of the
  step with masks (padding never changes a bag's output);
- its dropout masks, drawn from its own generator in its own shapes (on a CPU): the global RNG state
  right after its model was built is the stream its sequential training draws from;
- its optimiser: AdamW with `train_fold`'s groups and settings (`build_optimizer` on the run's model),
  the same fused kernel, stepped only for the runs that had a bag this step; a run whose epoch has
  ended (folds differ by a bag) or that stopped early keeps its weights and AdamW state untouched;
- its validation, early stopping and best epoch.

So training computes what one-at-a-time training computes, in another float order: the tests check
weights and predictions to 1e-5 over short runs; over long ones the two separate as any change of rounding
separates a run from itself, and agree in distribution (docs/mil.md, "Folds trained together"). Models that
cannot be stacked (TransMIL, CLAM-MB) raise `NotStackable`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from torch.optim.adamw import adamw
from torch.utils.data import DataLoader, Dataset, Subset

from histodistill.data.bags import BagDataset
from histodistill.data.splits import Split
from histodistill.distributed import resolve_device
from histodistill.eval.metrics import ovr_auroc
from histodistill.eval.mil import (
    FoldResult,
    autocast,
    build_fold_model,
    evaluate_fold,
    non_finite_loss_error,
    overflow_error,
    split_indices,
)
from histodistill.eval.mil_config import TrainConfig
from histodistill.models.mil import MILHead, MILOutput, Standardized
from histodistill.models.mil_stacked import NotStackable, set_dropout, stack_mil, unstack_state
from histodistill.optim.optimizer import OptimConfig, build_optimizer

__all__ = ["NotStackable", "Run", "run_folds", "train_runs"]


def _run_part(output: MILOutput, start: int, stop: int) -> MILOutput:
    """The output of bags ``start`` … ``stop`` − 1 of a stacked batch (every per-bag field sliced)."""
    return MILOutput(*(None if field is None else field[start:stop] for field in output))


@dataclass
class Run:
    """One training run: what `train_fold` is given for one fold of one CV seed.

    ``generator`` is the run's dropout stream: for results equal to `train_fold`, the global RNG's
    state right after ``model`` was built (``torch.Generator().set_state(torch.get_rng_state())``); None
    seeds one with ``seed``. ``name`` says which run an error is about (e.g. ``fold 2, seed 1``).
    """

    model: nn.Module
    train: Dataset
    val: Dataset | None
    seed: int
    generator: torch.Generator | None = None
    log: Callable[[dict], None] = lambda row: None
    name: str = "run"


@dataclass
class _Bags:
    """One part (train or val) of one run: features (N_i, D) per bag, labels, ids."""

    features: list[torch.Tensor]
    labels: list[int]
    ids: list[str]

    @classmethod
    def of(cls, dataset: Dataset | None) -> _Bags:
        items = [dataset[i] for i in range(len(dataset))] if dataset is not None else []
        return cls(
            [item["features"] for item in items],
            [item["label"] for item in items],
            [item["bag_id"] for item in items],
        )


@dataclass
class _Step:
    """M·B padded bag slots, run-major: run m's bags (or nothing) in slots m·B … m·B + B − 1."""

    features: torch.Tensor  # (M·B, N, D)
    mask: torch.Tensor  # (M·B, N) bool
    labels: torch.Tensor  # (M·B,)
    shapes: list[tuple[int, int] | None]  # per run: (its bags, their longest length), None without bags
    ids: list[list[str]]


def _step(parts: list[_Bags], chosen: list[list[int]], per_run: int, dim: int) -> _Step:
    """Gather each run's ``chosen`` bag positions into one padded batch; an empty slot gets one zero
    instance (a fully masked bag would give NaN attention; no loss is taken of it)."""
    blank = torch.zeros(1, dim)
    features, labels, shapes, ids = [], [], [], []
    for part, positions in zip(parts, chosen, strict=True):
        bags = [part.features[i] for i in positions]
        features += bags + [blank] * (per_run - len(bags))
        labels += [part.labels[i] for i in positions] + [0] * (per_run - len(bags))
        shapes.append((len(bags), max(len(b) for b in bags)) if bags else None)
        ids.append([part.ids[i] for i in positions])
    lengths = torch.tensor([len(f) for f in features])
    padded = pad_sequence(features, batch_first=True)  # (M·B, N, D)
    mask = torch.arange(padded.shape[1])[None] < lengths[:, None]  # (M·B, N)
    return _Step(padded, mask, torch.tensor(labels), shapes, ids)


class _MaskedAdamW:
    """`train_fold`'s AdamW for every run: its parameter groups and settings (`build_optimizer` on one
    run's model), the same fused kernel, applied to each run's slices of the stacked parameters. A run
    left out of a step keeps its weights, moments and step count as they were."""

    def __init__(self, stacked: nn.Module, template: nn.Module, config: TrainConfig, runs: int) -> None:
        optim = OptimConfig(name="adamw", lr=config.lr, weight_decay=config.weight_decay, schedule="constant")
        reference = build_optimizer(template, optim, config.lr, fused=True)
        name_of = {id(p): name for name, p in template.named_parameters()}
        params = dict(stacked.named_parameters())
        self.groups = []
        for group in reference.param_groups:
            names = [name_of[id(p)] for p in group["params"]]
            slices = [params[n].detach().unbind(0) for n in names]  # per parameter: M views
            moments = [
                (torch.zeros_like(params[n]).unbind(0), torch.zeros_like(params[n]).unbind(0)) for n in names
            ]
            steps = [
                [torch.zeros((), dtype=torch.float32, device=params[n].device) for _ in range(runs)]
                for n in names
            ]
            settings = {k: group[k] for k in ("lr", "weight_decay", "eps")} | dict(
                zip(("beta1", "beta2"), group["betas"], strict=True)
            )
            self.groups.append((names, slices, moments, steps, settings))
        self._picked: dict[int, tuple] = {}

    @torch.no_grad()
    def step(self, grads: dict[str, torch.Tensor], stepping: list[int]) -> None:
        """One AdamW step for the runs ``stepping`` with ``grads`` {name: (M, …)}."""
        for g, (names, slices, moments, steps, settings) in enumerate(self.groups):
            if not names:
                continue
            pick = [(k, m) for m in stepping for k in range(len(names))]
            if self._picked.get(g, (None,))[0] != pick:  # the same runs step almost every time: lists kept
                self._picked[g] = (
                    pick,
                    [slices[k][m] for k, m in pick],
                    [moments[k][0][m] for k, m in pick],
                    [moments[k][1][m] for k, m in pick],
                    [steps[k][m] for k, m in pick],
                )
            _, weights, averages, squares, counts = self._picked[g]
            per_run_grads = [grads[n].unbind(0) for n in names]
            adamw(
                weights,
                [per_run_grads[k][m] for k, m in pick],
                averages,
                squares,
                [],
                counts,
                fused=True,
                amsgrad=False,
                maximize=False,
                **settings,
            )


@torch.no_grad()
def _validate(
    stacked: nn.Module, parts: list[_Bags], runs: list[int], per_run: int, dim: int, device: torch.device
) -> dict[int, dict]:
    """Validation loss (mean cross-entropy) and AUROC of each run in ``runs`` on its own part."""
    stacked.eval()
    sums = {m: 0.0 for m in runs}
    probs: dict[int, list[np.ndarray]] = {m: [] for m in runs}
    longest = max((len(parts[m].ids) for m in runs), default=0)
    for start in range(0, longest, per_run):
        chosen = [
            list(range(start, min(start + per_run, len(p.ids)))) if m in runs else []
            for m, p in enumerate(parts)
        ]
        step = _step(parts, chosen, per_run, dim)
        with autocast(device):
            logits = stacked(step.features.to(device), step.mask.to(device)).logits.float().cpu()  # (M·B, C)
        losses = F.cross_entropy(logits, step.labels, reduction="none")
        for m in runs:
            slots = slice(m * per_run, m * per_run + len(chosen[m]))
            sums[m] += losses[slots].sum().item()
            probs[m].append(logits[slots].softmax(dim=1).numpy())
    return {
        m: {
            "val_loss": sums[m] / len(parts[m].ids),
            "val_auroc": ovr_auroc(np.array(parts[m].labels), np.concatenate(probs[m]).astype(np.float64)),
        }
        for m in runs
    }


@dataclass
class _Progress:
    """A run's early-stopping state, as `train_fold` keeps it."""

    watch: str
    history: list[dict] = field(default_factory=list)
    best_value: float = -math.inf
    best_epoch: int = 0
    best_state: dict | None = None
    done: bool = False


def train_runs(runs: list[Run], config: TrainConfig) -> list[tuple[nn.Module, int, list[dict]]]:
    """Train ``runs`` together; per run what `train_fold` returns for it: (its model with the best epoch's
    weights, on the CPU; that epoch; the per-epoch history ``epoch, train_loss[, val_loss, val_auroc]``).
    ``config.seed`` is not used: each run has its own ``seed``.

    Raises `NotStackable` (before any training) when the models cannot be stacked, and `UserError` when a
    run's loss becomes non-finite or a step overflows its weights, as `train_fold` does (an overflow is found
    at the run's next step or at the epoch's end, before anything of the epoch is kept).
    """
    device = resolve_device(config.device)
    stacked = stack_mil([run.model for run in runs]).to(device)
    count, per_run, dim = len(runs), config.batch_size, runs[0].train[0]["features"].shape[1]
    optimizer = _MaskedAdamW(stacked, runs[0].model, config, count)
    loss = _objective(runs[0].model, count, per_run)
    parameters = dict(stacked.named_parameters())
    generators = [run.generator or torch.Generator().manual_seed(run.seed) for run in runs]
    train, val = [_Bags.of(run.train) for run in runs], [_Bags.of(run.val) for run in runs]
    # The order each run's own `train_fold` loader gives: a DataLoader over positions draws from its generator
    # exactly as one over the bags does (one seed, then one permutation per epoch).
    orders = [
        DataLoader(
            range(len(part.ids)),
            batch_size=per_run,
            shuffle=True,
            collate_fn=list,
            generator=torch.Generator().manual_seed(run.seed),
        )
        for run, part in zip(runs, train, strict=True)
    ]
    progress = [_Progress(config.early_stop if len(part.ids) else "none") for part in val]
    finite_at_start = _finite(parameters)
    for epoch in range(1, config.epochs + 1):
        active = [m for m in range(count) if not progress[m].done]
        if not active:
            break
        batches = {m: list(orders[m]) for m in active}
        totals = torch.zeros(count, dtype=torch.float64)
        stacked.train()
        for s in range(max(len(b) for b in batches.values())):
            chosen = [batches[m][s] if m in batches and s < len(batches[m]) else [] for m in range(count)]
            stepping = [m for m in range(count) if chosen[m]]
            step = _step(train, chosen, per_run, dim)
            set_dropout(stacked, generators if device.type == "cpu" else None, step.shapes)
            with autocast(device):
                output = stacked(step.features.to(device), step.mask.to(device))
            run_losses = loss(output, step.labels.to(device), chosen, stepping)
            if not torch.isfinite(run_losses).all():
                if finite_at_start:  # weights given non-finite are the loss's error, as in `train_fold`
                    _check_weights(parameters, runs, config.lr)  # an earlier step's overflow shows here first
                bad = [m for m, value in zip(stepping, run_losses, strict=True) if not torch.isfinite(value)]
                raise non_finite_loss_error(
                    [i for m in bad for i in step.ids[m]], "; ".join(runs[m].name for m in bad)
                )
            grads = torch.autograd.grad(run_losses.sum(), list(parameters.values()))
            optimizer.step(dict(zip(parameters, grads, strict=True)), stepping)
            totals[stepping] += run_losses.detach().double().cpu() * torch.tensor(
                [len(chosen[m]) for m in stepping]
            )
        # An overflowing step (an absurd lr) writes inf/NaN into its run's weights: the run's next loss is
        # then non-finite (checked above), and the epoch's last step is checked here, before anything is kept.
        _check_weights(parameters, runs, config.lr)
        validation = _validate(stacked, val, [m for m in active if len(val[m].ids)], per_run, dim, device)
        for m in active:
            row = {
                "epoch": epoch,
                "train_loss": totals[m].item() / max(len(train[m].ids), 1),
            } | validation.get(m, {})
            _record(progress[m], row, epoch, config.patience, stacked, m)
            runs[m].log(row)
    results = []
    for m, run in enumerate(runs):
        with torch.no_grad():
            for name, parameter in run.model.named_parameters():
                parameter.copy_(progress[m].best_state[name])
        results.append((run.model.cpu(), progress[m].best_epoch, progress[m].history))
    return results


def _objective(model: nn.Module, count: int, per_run: int) -> Callable:
    """Each stepping run's objective on its own bags, as its model's ``loss`` computes it alone:
    ``(stacked output, labels (M·B,), chosen, stepping) -> (len(stepping),)``. The plain bag cross-entropy
    (every model but CLAM's) is one call for all runs, the mean over each run's bags; another objective
    (CLAM-SB's instance loss) is called per run on its part of the output."""
    inner = model.mil if isinstance(model, Standardized) else model
    if type(inner).loss is not MILHead.loss:

        def per_run_loss(output, labels, chosen, stepping):
            return torch.stack(
                [
                    model.loss(
                        _run_part(output, m * per_run, m * per_run + len(chosen[m])),
                        labels[m * per_run : m * per_run + len(chosen[m])],
                    )
                    for m in stepping
                ]
            )

        return per_run_loss

    def bag_cross_entropy(output, labels, chosen, stepping):
        # (M, B)
        per_bag = F.cross_entropy(output.logits.float(), labels, reduction="none").view(count, per_run)
        bags = torch.tensor([len(c) for c in chosen], device=per_bag.device)[:, None]  # (M, 1)
        # (M, B): 1/B_m, 0 if empty
        share = (torch.arange(per_run, device=per_bag.device) < bags) / bags.clamp_min(1)
        # An empty slot's loss is left out, not multiplied by 0 (it may be inf for a run whose weights
        # overflowed).
        return per_bag.where(share > 0, 0.0).mul(share).sum(1)[stepping]

    return bag_cross_entropy


def _finite(parameters: dict[str, torch.Tensor]) -> bool:
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(list(parameters.values()))))


def _check_weights(parameters: dict[str, torch.Tensor], runs: list[Run], lr: float) -> None:
    """`train_fold`'s overflow error, naming the runs whose weights are no longer finite."""
    if not _finite(parameters):
        bad = [
            m for m in range(len(runs)) if not all(torch.isfinite(p[m]).all() for p in parameters.values())
        ]
        raise overflow_error(lr, "; ".join(runs[m].name for m in bad))


def _record(progress: _Progress, row: dict, epoch: int, patience: int, stacked: nn.Module, run: int) -> None:
    """`train_fold`'s bookkeeping for one epoch of one run: history, best epoch and weights, stopping."""
    progress.history.append(row)
    value = {"val_loss": -row.get("val_loss", 0.0), "val_auroc": row.get("val_auroc", 0.0), "none": epoch}[
        progress.watch
    ]
    if progress.best_state is None or value > progress.best_value:
        progress.best_value, progress.best_epoch, progress.best_state = (
            value,
            epoch,
            unstack_state(stacked, run),
        )
    elif epoch - progress.best_epoch >= patience and progress.watch != "none":
        progress.done = True


def run_folds(
    dataset: BagDataset,
    folds: list[tuple[int, int, Split]],
    model_name: str,
    num_classes: int,
    config: TrainConfig,
    logs: list[Callable[[dict], None]],
) -> list[FoldResult]:
    """`histodistill.eval.mil.run_fold` for every (CV seed, fold, split) of ``folds``, trained together: each
    model built, trained (`train_runs`) and tested as `run_fold` does with ``config`` at that seed. ``logs``:
    each run's per-epoch callback. Raises `NotStackable` for a model that must train alone."""
    runs, parts = [], []
    for (seed, fold, split), log in zip(folds, logs, strict=True):
        part = split_indices(dataset, split)
        model = build_fold_model(
            fold, dataset, part["train"], model_name, num_classes, replace(config, seed=seed)
        )
        # what its dropout would draw from alone
        generator = torch.Generator().set_state(torch.get_rng_state())
        runs.append(
            Run(
                model,
                Subset(dataset, part["train"]),
                Subset(dataset, part["val"]),
                seed + fold,
                generator,
                log,
                f"seed {seed} fold {fold}",
            )
        )
        parts.append(part)
    trained = train_runs(runs, config)
    return [
        evaluate_fold(fold, result, dataset, part["test"], num_classes, config.batch_size)
        for (_, fold, _), result, part in zip(folds, trained, parts, strict=True)
    ]

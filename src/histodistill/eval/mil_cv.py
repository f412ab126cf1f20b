"""k-fold cross-validation by case of a MIL slide classifier, repeated over CV seeds: `cross_validate`,
from a features folder and a labels CSV to a run directory. `histodistill mil`, the demo and
`histodistill distill` all call it.

The figure it reports is the **pooled out-of-fold AUROC**: every bag is tested exactly once per CV seed
(by the fold model that never trained on it), and the AUROC of all those predictions together is taken,
with a 95 % percentile bootstrap CI over bags (`histodistill.eval.metrics.bootstrap_auroc`). With several
seeds it is the mean over seeds of each seed's pooled AUROC, the CI resampling the same bags for every
seed. Per-fold AUROCs are reported after it: a test fold of a few bags moves its AUROC by 0.1 or more per
bag, and a fold with one class has none ("n/a").

Run directory (``out``)::

    config.yaml          the resolved configuration, features and labels
    metrics.json         {"pooled": {auroc, auroc_ci, balanced_accuracy, n_bags}, ..., "auroc_per_seed":
    [...],
                          "folds": [{seed, fold, n_test, n_test_per_class, auroc|null, ...}]}
    predictions.csv      out-of-fold probabilities per bag (`histodistill.eval.mil_outputs`)
    splits/ checkpoints/ attention/ tensorboard/ figures/ metrics.csv   of the CV seed (one seed)
    seed_<s>/            with several seeds: each seed's complete run (the files above, for that seed)

With one seed (the default) ``out`` is that seed's run, as `histodistill heatmap --run` expects.

Error and log messages name the parameters as `` `name=value` `` (`histodistill.errors`: a command renders
them as its flags).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histodistill.eval.mil_config import EARLY_STOP, MIL_MODEL_NAMES, CVConfig, TrainConfig

__all__ = ["CVConfig", "CVResult", "OutOfFold", "TrainConfig", "cross_validate", "report_lines", "seed_runs"]

SMALL_TEST_CLASS = 5  # fewer test bags of a class than this in a fold: its per-fold AUROC is noise, say so


@dataclass
class OutOfFold:
    """Out-of-fold predictions, one row per bag (in the labels' order), S bags, R CV seeds, C classes."""

    bag_ids: list[str]
    id_column: str  # "slide_id", or "case_id" when bags are whole cases
    labels: np.ndarray  # (S,) class index
    probs: np.ndarray  # (S, C) mean over CV seeds
    probs_per_seed: np.ndarray  # (R, S, C)
    folds: np.ndarray  # (R, S) the test fold of each bag at each seed


@dataclass
class CVResult:
    """What `cross_validate` measured (also in ``out/metrics.json``)."""

    # pooled out-of-fold AUROC (binary: the last class is positive; else macro one-vs-rest), mean over seeds
    auroc: float
    auroc_ci: tuple[float, float]  # 95 % bootstrap CI over bags
    balanced_accuracy: float  # pooled out-of-fold (argmax), mean over seeds
    folds: list[dict]  # per (seed, fold): seed, fold, n_test, n_test_per_class, auroc (None: one class), ...
    predictions: OutOfFold
    classes: list[str]
    out: Path
    auroc_per_seed: list[float]
    seeds: list[int]
    runs: list[Path]  # the run directory of each seed (``out`` itself with one seed)


def seed_runs(out: str | Path, seeds: list[int]) -> list[Path]:
    """Where each CV seed's run lives: ``out`` with one seed, else ``out/seed_<s>``."""
    out = Path(out)
    return [out] if len(seeds) == 1 else [out / f"seed_{s}" for s in seeds]


def _check_config(config: CVConfig) -> None:
    from histodistill.errors import ConfigError

    if config.model not in MIL_MODEL_NAMES:
        raise ConfigError(
            f"`model={config.model}` is not a MIL model: choose one of {', '.join(MIL_MODEL_NAMES)}"
        )
    if config.train.early_stop not in EARLY_STOP:
        raise ConfigError(f"`early_stop={config.train.early_stop}`: choose one of {', '.join(EARLY_STOP)}")
    for name, value in (
        ("seeds", config.seeds),
        ("epochs", config.train.epochs),
        ("batch_size", config.train.batch_size),
        ("patience", config.train.patience),
    ):
        if value < 1:
            raise ConfigError(f"`{name}={value}` must be at least 1")
    if not config.train.lr > 0:
        raise ConfigError(f"`lr={config.train.lr}` must be positive")


def _test_fold_warnings(
    seed: int, splits: list[dict], bags_of: dict[str, tuple[str, str]], classes: list[str], by_case: bool
) -> list[str]:
    """One warning per seed naming the test folds with fewer than `SMALL_TEST_CLASS` bags of a class."""
    small = []
    for fold, split in enumerate(splits):
        counts = _class_counts(split["test"], bags_of, classes)
        if thin := [f"{c} {n}" for c, n in counts.items() if n < SMALL_TEST_CLASS]:
            small.append(f"fold {fold} ({', '.join(thin)})")
    if not small:
        return []
    unit = "cases" if by_case else "slides"
    return [
        f"warning: seed {seed}: test folds with fewer than {SMALL_TEST_CLASS} {unit} of a class: "
        f"{'; '.join(small)}. Their per-fold AUROCs are noise (n/a with one class); read the pooled "
        "out-of-fold AUROC"
    ]


def _class_counts(
    slide_ids: list[str], bags_of: dict[str, tuple[str, str]], classes: list[str]
) -> dict[str, int]:
    """Test bags per class of a fold's slides (a case bag counted once)."""
    bags = {bags_of[s] for s in slide_ids if s in bags_of}  # (bag_id, class name)
    return {c: sum(1 for _, label in bags if label == c) for c in classes}


def cross_validate(
    features: str | Path,
    labels: str | Path,
    out: str | Path,
    config: CVConfig,
    *,
    splits_dir: str | Path | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> CVResult:
    """Train and test ``config.model`` in ``config.folds``-fold CV by case × ``config.seeds`` CV seeds on the
    features in ``features`` (any layout `histodistill.data.feature_files.open_feature_folder` reads) and the
    ``case_id,slide_id,label`` CSV ``labels``; write the run directory ``out`` (module docstring) and return
    the pooled out-of-fold AUROC [95 % CI], balanced accuracy, per-fold numbers and predictions.

    ``splits_dir``: your own CLAM ``splits_<k>.csv`` instead of ``config.folds`` (every seed uses them; the
    seeds then differ in initialisation and order). ``log`` receives every progress and warning line.

    Raises `UserError` before anything is written: a finished run in ``out`` (without ``overwrite``), a bad
    configuration, unreadable features or labels, a single class, too few cases per class for the folds,
    early stopping without a validation part.
    """
    from histodistill.data.bags import (
        BagDataset,
        class_names,
        describe_labels,
        empty_bags,
        empty_bags_error,
        make_bags,
        read_labels,
    )
    from histodistill.data.feature_files import load_slides, open_feature_folder, shown
    from histodistill.data.splits import make_splits, read_splits_dir
    from histodistill.errors import UserError
    from histodistill.eval import mil

    out = Path(out)
    if (out / "metrics.json").exists() and not overwrite:
        raise UserError(
            f"{out} already holds a finished MIL run: pass `overwrite=True` or choose another `out=...`"
        )
    _check_config(config)
    # Everything is read and checked before anything is written to `out`.
    folder = open_feature_folder(features)
    rows = labelled = read_labels(labels)
    slides = load_slides(folder, [r.slide_id for r in rows])
    dropped: list[str] = []
    if empty := empty_bags(make_bags(rows, class_names(rows), by_case=config.by_case), slides):
        if not config.drop_empty:
            raise empty_bags_error(empty, folder.describe())
        dropped = [s for bag in empty for s in bag.slide_ids]
        rows = [r for r in rows if r.slide_id not in dropped]
        log(f"`drop_empty=True`: left out {len(dropped)} slide(s) without tissue tiles: {shown(dropped)}")
    classes = class_names(rows)
    log(describe_labels(rows, labels))  # each class and its count, before training
    if len(classes) < 2:
        raise UserError(f"labels {labels} have a single label {classes}: MIL needs at least two classes")
    dataset = BagDataset(folder, make_bags(rows, classes, by_case=config.by_case), slides)
    seeds = [config.train.seed + i for i in range(config.seeds)]
    val_fraction = config.resolved_val_fraction()
    if splits_dir is not None:
        given = [
            {part: [s for s in ids if s not in dropped] for part, ids in split.items()}
            for split in read_splits_dir(splits_dir, labelled)
        ]
        splits = {seed: given for seed in seeds}
    else:
        splits = {seed: make_splits(rows, config.folds, val_fraction, seed) for seed in seeds}
    early_stop = config.train.early_stop
    for seed_splits in splits.values():
        if early_stop != "none":
            mil.check_val_for_early_stop(
                seed_splits, early_stop, "`splits_dir=...`" if splits_dir else "`val_fraction=0`"
            )
        if early_stop == "val_auroc":
            mil.check_val_has_every_class(dataset, seed_splits, len(classes))

    if early_stop == "none":
        log(
            f"early stopping off: every fold trains {config.train.epochs} epochs and keeps the last"
            + (
                f" ({val_fraction:.0%} of training cases held out for validation curves)"
                if val_fraction
                else ""
            )
        )
    else:
        log(
            f"early stopping on {early_stop}: the best epoch of at most {config.train.epochs} is kept, "
            f"patience {config.train.patience}"
            + (
                ""
                if splits_dir
                else f", {val_fraction:.0%} of each fold's training cases held out for validation"
            )
        )
    bags_of = {s: (bag.bag_id, classes[bag.label]) for bag in dataset.bags for s in bag.slide_ids}
    for seed in seeds[:1] if splits_dir is not None else seeds:  # given splits are the same for every seed
        for line in _test_fold_warnings(seed, splits[seed], bags_of, classes, config.by_case):
            log(line)

    _clear_run(out)
    _write_config(out, features, labels, splits_dir, config, val_fraction)
    runs = seed_runs(out, seeds)
    results = _train(runs, dataset, splits, seeds, config, len(classes), log)
    per_seed = [
        _run_seed(
            run,
            dataset,
            splits[seed],
            results[seed],
            dataclasses.replace(config.train, seed=seed),
            config,
            classes,
            dropped,
            log,
            run_metrics=len(seeds) > 1,
        )
        for seed, run in zip(seeds, runs, strict=True)
    ]
    return _pool(out, per_seed, seeds, runs, dataset, classes, dropped, config, log)


# What a run writes in `out`: cleared before a run starts, so an overwritten or interrupted run of other
# seeds or folds leaves nothing behind that could be read as this run's (a stale attention/ for heatmaps).
RUN_ENTRIES = (
    "config.yaml",
    "metrics.json",
    "metrics.csv",
    "predictions.csv",
    "splits",
    "checkpoints",
    "attention",
    "tensorboard",
    "figures",
)


def _clear_run(out: Path) -> None:
    import re
    import shutil

    seeds = [path for path in out.glob("seed_*") if re.fullmatch(r"seed_-?\d+", path.name)]
    for path in [*(out / name for name in RUN_ENTRIES), *seeds]:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _write_config(out: Path, features, labels, splits_dir, config: CVConfig, val_fraction: float) -> None:
    import yaml

    from histodistill.io import atomic_path

    resolved = dataclasses.asdict(config) | {"val_fraction": val_fraction}
    options = {
        "features": str(features),
        "labels": str(labels),
        "splits_dir": None if splits_dir is None else str(splits_dir),
    } | resolved
    with atomic_path(out / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(options, sort_keys=False))


@dataclass
class _SeedRun:
    """One CV seed's out-of-fold predictions, in dataset order, and its per-fold rows."""

    probs: np.ndarray  # (S, C)
    folds: np.ndarray  # (S,) the fold that tested each bag, -1 where none did
    fold_rows: list[dict]


def _train(
    runs: list[Path],
    dataset,
    splits: dict[int, list[dict]],
    seeds: list[int],
    config: CVConfig,
    num_classes: int,
    log: Callable[[str], None],
) -> dict[int, list]:
    """Every fold of every CV seed trained and tested: ``{seed: [FoldResult per fold]}``. With
    ``config.batched`` all of them train together as one stacked model (`histodistill.eval.mil_stacked`: the
    same results as one at a time); a model that cannot be stacked trains one run at a time, and a line says
    why."""
    import contextlib

    from torch.utils.tensorboard import SummaryWriter

    from histodistill.eval import mil, mil_stacked

    folds = [(seed, fold, split) for seed in seeds for fold, split in enumerate(splits[seed])]
    run_of = dict(zip(seeds, runs, strict=True))
    with contextlib.ExitStack() as stack:
        writers = [
            stack.enter_context(SummaryWriter(str(run_of[seed] / "tensorboard" / f"fold_{fold}")))
            for seed, fold, _ in folds
        ]

        def board(writer):
            def log_row(row: dict) -> None:
                for name, value in row.items():
                    if name != "epoch":
                        writer.add_scalar(name.replace("_", "/", 1), value, row["epoch"])

            return log_row

        boards = [board(writer) for writer in writers]
        results = None
        if config.batched and len(folds) > 1:
            try:
                results = mil_stacked.run_folds(
                    dataset, folds, config.model, num_classes, config.train, boards
                )
            except mil_stacked.NotStackable as why:
                log(f"training the {len(folds)} runs (folds x seeds) one at a time, not together: {why}")
        if results is None:
            results = [
                mil.run_fold(
                    fold,
                    dataset,
                    split,
                    config.model,
                    num_classes,
                    dataclasses.replace(config.train, seed=seed),
                    log_row,
                )
                for (seed, fold, split), log_row in zip(folds, boards, strict=True)
            ]
    by_seed: dict[int, list] = {seed: [] for seed in seeds}
    for (seed, _, _), result in zip(folds, results, strict=True):
        by_seed[seed].append(result)
    return by_seed


def _run_seed(
    run: Path,
    dataset,
    splits: list[dict],
    results: list,
    train: TrainConfig,
    config: CVConfig,
    classes: list[str],
    dropped: list[str],
    log: Callable[[str], None],
    run_metrics: bool,
) -> _SeedRun:
    """Write one CV seed's run directory from its trained folds ``results``."""
    from histodistill.data.feature_files import shown
    from histodistill.data.splits import write_split
    from histodistill.eval import mil_outputs
    from histodistill.io import write_json

    for k, split in enumerate(splits):
        write_split(run / "splits" / f"splits_{k}.csv", split)
    description = {
        "model": config.model,
        "in_dim": dataset.feature_dim,
        "classes": classes,
        "model_kwargs": train.model_arguments(),
    }
    for result in results:
        auroc = result.metrics["auroc"]
        log(
            f"seed {train.seed} fold {result.fold}: {len(result.test.bag_ids)} test bags, epoch "
            f"{result.best_epoch} kept, test AUROC {'n/a' if np.isnan(auroc) else f'{auroc:.3f}'}"
        )
        mil_outputs.save_model(run, result, description)

    index_of = {bag.bag_id: i for i, bag in enumerate(dataset.bags)}
    total = np.zeros((len(dataset.bags), len(classes)))
    tested = np.zeros(len(dataset.bags))
    folds = np.full(len(dataset.bags), -1)
    for result in results:
        for bag_id, probs in zip(result.test.bag_ids, result.test.probs, strict=True):
            i = index_of[bag_id]
            total[i] += probs
            tested[i] += 1
            folds[i] = result.fold if folds[i] < 0 else folds[i]
    if (tested > 1).any():  # only given splits can test a bag twice
        log(
            f"seed {train.seed}: {int((tested > 1).sum())} bag(s) are in the test part of several folds; "
            "their out-of-fold probabilities are the mean over those folds"
        )
    probs = total / np.maximum(tested, 1)[:, None]
    fold_rows = [_fold_row(train.seed, r, classes) for r in results]
    seed_run = _SeedRun(probs, folds, fold_rows)

    id_column = "case_id" if config.by_case else "slide_id"
    mil_outputs.write_history(run / "metrics.csv", results)
    mil_outputs.write_predictions(run / "predictions.csv", results, classes, id_column)
    if without_coords := mil_outputs.write_attention(run, dataset, results, classes):
        log(
            f"no attention files for {len(without_coords)} slide(s) whose features have no coords "
            f"(CLAM pt_files): {shown(without_coords)}; pass CLAM's h5_files for heatmaps"
        )
    mil_outputs.plot_roc(run / "figures" / "roc.png", results, classes)
    if run_metrics:  # a seed's own pooled scores, beside the seeds' pooled ones in the parent
        labels = np.array([bag.label for bag in dataset.bags])
        kept = folds >= 0
        pooled = _pooled(labels[kept], probs[kept][None], classes)
        write_json(
            run / "metrics.json",
            {
                "pooled": pooled,
                "model": config.model,
                "classes": classes,
                "seed": train.seed,
                "dropped_empty": dropped,
                "folds": fold_rows,
            },
        )
    return seed_run


def _fold_row(seed: int, result, classes: list[str]) -> dict:
    """A fold's JSON row: AUROC None (not NaN, not 0) when its test part holds one class."""
    from histodistill.eval.mil import REPORTED_METRICS

    counts = np.bincount(result.test.labels, minlength=len(classes))
    row = {
        "seed": seed,
        "fold": result.fold,
        "best_epoch": result.best_epoch,
        "n_test": len(result.test.bag_ids),
        "n_test_per_class": {c: int(n) for c, n in zip(classes, counts, strict=True)},
    }
    for name in REPORTED_METRICS:
        value = float(result.metrics[name])
        row[name] = None if np.isnan(value) else value
    return row


def _pooled(labels: np.ndarray, probs: np.ndarray, classes: list[str], n_boot: int = 2000) -> dict:
    """Pooled out-of-fold scores of ``probs`` (R, S, C) (R seeds) against ``labels`` (S,)."""
    from sklearn.metrics import balanced_accuracy_score

    from histodistill.eval.metrics import bootstrap_auroc

    auroc, low, high = bootstrap_auroc(labels, probs, n_boot)
    balanced = float(np.mean([balanced_accuracy_score(labels, p.argmax(1)) for p in probs]))
    return {
        "auroc": auroc,
        "auroc_ci": [low, high],
        "balanced_accuracy": balanced,
        "n_bags": int(len(labels)),
    }


def _pool(
    out: Path,
    per_seed: list[_SeedRun],
    seeds: list[int],
    runs: list[Path],
    dataset,
    classes: list[str],
    dropped: list[str],
    config: CVConfig,
    log: Callable[[str], None],
) -> CVResult:
    """Pool the seeds' out-of-fold predictions, write ``out/metrics.json`` (and with several seeds
    ``out/predictions.csv``), and return the result."""
    from histodistill.data.feature_files import shown
    from histodistill.eval import mil_outputs
    from histodistill.eval.metrics import ovr_auroc
    from histodistill.io import write_json

    folds = np.stack([s.folds for s in per_seed])  # (R, S_all)
    kept = (folds >= 0).all(axis=0)  # bags tested at every seed (all of them, unless given splits skip some)
    if not kept.all():
        never = [bag.bag_id for bag, k in zip(dataset.bags, kept, strict=True) if not k]
        log(
            f"{len(never)} bag(s) are in no test part of the given splits, so have no out-of-fold prediction "
            f"and are not scored: {shown(never)}"
        )
    bags = [bag for bag, k in zip(dataset.bags, kept, strict=True) if k]
    labels = np.array([bag.label for bag in bags])
    probs = np.stack([s.probs[kept] for s in per_seed])  # (R, S, C)
    predictions = OutOfFold(
        [bag.bag_id for bag in bags],
        "case_id" if config.by_case else "slide_id",
        labels,
        probs.mean(0),
        probs,
        folds[:, kept],
    )
    pooled = _pooled(labels, probs, classes)
    per_seed_auroc = [ovr_auroc(labels, p) for p in probs]
    fold_rows = [row for s in per_seed for row in s.fold_rows]
    write_json(
        out / "metrics.json",
        {
            "pooled": pooled,
            "model": config.model,
            "classes": classes,
            "seeds": seeds,
            "folds_per_seed": len(per_seed[0].fold_rows),
            "auroc_per_seed": per_seed_auroc,
            "dropped_empty": dropped,
            "folds": fold_rows,
        },
    )
    if len(seeds) > 1:
        mil_outputs.write_pooled_predictions(out / "predictions.csv", predictions, classes, seeds)
    return CVResult(
        pooled["auroc"],
        tuple(pooled["auroc_ci"]),
        pooled["balanced_accuracy"],
        fold_rows,
        predictions,
        classes,
        out,
        per_seed_auroc,
        seeds,
        runs,
    )


def report_lines(result: CVResult) -> list[str]:
    """What `histodistill mil` prints: the pooled AUROC [95 % CI] first, then one row per (seed, fold),
    "n/a" where a test fold holds one class."""
    from histodistill.eval.mil import REPORTED_METRICS

    low, high = result.auroc_ci
    unit = "cases" if result.predictions.id_column == "case_id" else "slides"
    folds = len({row["fold"] for row in result.folds})
    lines = [
        f"pooled out-of-fold AUROC {result.auroc:.3f} [95 % CI {low:.3f}, {high:.3f}], balanced accuracy "
        f"{result.balanced_accuracy:.3f} ({len(result.predictions.bag_ids)} {unit}, {folds} folds x "
        f"{len(result.seeds)} seed(s))"
    ]
    if len(result.seeds) > 1:
        lines.append(
            "pooled AUROC per seed: "
            + ", ".join(
                f"{seed}: {value:.3f}"
                for seed, value in zip(result.seeds, result.auroc_per_seed, strict=True)
            )
        )
    lines.append(
        f"{'seed':>5} {'fold':>5} {'n_test':>7} " + " ".join(f"{name:>18}" for name in REPORTED_METRICS)
    )
    for row in result.folds:
        values = " ".join(f"{'n/a' if row[n] is None else f'{row[n]:.3f}':>18}" for n in REPORTED_METRICS)
        lines.append(f"{row['seed']:>5} {row['fold']:>5} {row['n_test']:>7} {values}")
    return lines

"""What `histodistill distill` proves: the teacher, the un-tuned and the tuned student compared on slides.

- `slide_cv`: with slide labels, the library's MIL cross-validation (`histodistill.eval.mil_cv`) on each
  model's features, the same folds for all three (same labels, same CV seed), and the retention (student /
  teacher slide AUROC) with a paired bootstrap CI over the same bags;
- `agreement`: without labels, how close the students' tile features are to the teacher's;
- `summary`: the content of ``summary.json``, the contract the report, the demo and the benchmarks read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from histodistill.eval.report import DISTILL_MODELS as MODELS

MAX_AGREEMENT_TILES = 20_000  # tiles pooled for the CKA (a (n, n)-free formula, but n x d matrices in memory)


def slide_cv(folders: dict[str, Path], config, out: Path, device: str) -> dict:
    """ABMIL (``config.mil_model``) k-fold CV by case over ``config.mil_seeds`` CV seeds (runs in
    ``out/<model>``, or ``out/<model>/seed_<s>`` with several: `histodistill.eval.mil_cv.seed_runs`) on each
    of ``folders`` (``{model: features folder}``) against ``config.labels``, the three side by side
    (`histodistill.eval.mil_cv_many.cross_validate_many`, ``config.mil_workers`` processes); returns
    ``{models: {name: {slide_auroc, slide_auroc_ci, balanced_accuracy, run}}, retention, retention_untuned:
    {value, ci}, bags, folds, mil_model}``. ``config`` is a `DistillConfig`."""
    from histodistill.errors import UserError
    from histodistill.eval.metrics import paired_bootstrap_auroc
    from histodistill.eval.mil_cv import CVConfig, TrainConfig
    from histodistill.eval.mil_cv_many import cross_validate_many

    cv = CVConfig(
        model=config.mil_model,
        folds=config.folds,
        seeds=config.mil_seeds,
        val_fraction=config.mil_val_fraction,
        train=TrainConfig(
            epochs=config.mil_epochs,
            lr=config.mil_lr,
            weight_decay=config.mil_weight_decay,
            seed=config.seed,
            device=device,
        ),
    )
    # overwrite: a CV interrupted in this stage is run again whole (minutes, against the fit's hours).
    results = cross_validate_many(
        {name: folders[name] for name in MODELS},
        config.labels,
        out,
        cv,
        workers=config.mil_workers,
        log=lambda line: print(f"  {line}"),
    )
    teacher = results["teacher"].predictions
    for name in MODELS:
        if results[name].predictions.bag_ids != teacher.bag_ids:  # the paired bootstrap needs the same bags
            raise UserError(
                f"the {name}'s MIL run scored other slides than the teacher's: a slide lacks features in "
                f"one of {', '.join(str(f) for f in folders.values())}; rerun with `overwrite=True`"
            )
    retention = {
        name: paired_bootstrap_auroc(
            teacher.labels, teacher.probs_per_seed, results[name].predictions.probs_per_seed, seed=config.seed
        ).ratio
        for name in ("student", "student_untuned")
    }
    return {
        "models": {
            name: {
                "slide_auroc": round(result.auroc, 4),
                "slide_auroc_ci": [round(v, 4) for v in result.auroc_ci],
                "balanced_accuracy": round(result.balanced_accuracy, 4),
                "run": str(result.out),
            }
            for name, result in results.items()
        },
        "retention": _interval(retention["student"]),
        "retention_untuned": _interval(retention["student_untuned"]),
        "bags": len(teacher.bag_ids),
        "folds": config.folds,
        "mil_model": config.mil_model,
    }


def _interval(value: tuple[float, float, float]) -> dict:
    """``{value, ci}`` for JSON; a bound that is not finite (resamples where the teacher's AUROC is 0, on a
    few slides) is None: the interval is unbounded there."""
    point, low, high = (round(v, 4) if math.isfinite(v) else None for v in value)
    return {"value": point, "ci": [low, high]}


def agreement(folders: dict[str, Path], slide_ids: Sequence[str], fit_run: Path, method: str) -> dict:
    """Feature agreement with the teacher on the tiles of ``slide_ids``, for labels-free runs:

    - ``student_cosine``: mean cosine between the MCM-KD student's prediction of each tile's teacher feature
      (its fitted projection head on the tile's pooled feature: the visible-cell prediction it was trained
      on, one tile as a 1 x 1 window) and the teacher's feature, normalised as the run's targets were;
      None for MoMA, whose heads map to a contrastive space, not to the teacher's features;
    - ``models.<name>.cka``: linear CKA (Kornblith et al. 2019) of each model's tile features with the
      teacher's, which needs no mapping between their dimensions (the teacher's own is 1).
    """
    import h5py
    import torch

    from histodistill.data.feature_files import COORDS, FEATURES
    from histodistill.losses.masked_context import normalise_targets

    features: dict[str, list[np.ndarray]] = {name: [] for name in MODELS}
    for slide_id in slide_ids:
        coords = None
        for name in MODELS:
            path = folders[name] / f"{slide_id}.h5"
            if not path.is_file():
                break
            with h5py.File(path, "r") as handle:
                values, order = handle[FEATURES][:], handle[COORDS][:]
            if coords is not None and not np.array_equal(coords, order):
                raise ValueError(
                    f"{path}: tiles in another order than the teacher's; the features were not "
                    "extracted from the same coords"
                )
            coords = order
            features[name].append(values)
    stacked = {name: np.concatenate(parts)[:MAX_AGREEMENT_TILES] for name, parts in features.items() if parts}
    if not stacked or len(stacked["teacher"]) < 2:
        return {"student_cosine": None, "models": {name: {"cka": None} for name in MODELS}, "tiles": 0}
    cosine = None
    head, statistics = _mcmkd_head(fit_run) if method == "mcmkd" else (None, None)
    if head is not None:
        with torch.no_grad():
            predicted = head(torch.from_numpy(stacked["student"]))  # (N, D_teacher)
            norm = "layer_norm" if statistics is None else "standardize"
            target = normalise_targets(
                torch.from_numpy(stacked["teacher"]), norm, *(statistics or (None, None))
            )
            cosine = round(float(torch.nn.functional.cosine_similarity(predicted, target, dim=-1).mean()), 4)
    from histodistill.eval.metrics import linear_cka

    return {
        "student_cosine": cosine,
        "tiles": int(len(stacked["teacher"])),
        "models": {name: {"cka": round(linear_cka(stacked[name], stacked["teacher"]), 4)} for name in MODELS},
    }


def _mcmkd_head(run_dir: Path):
    """The fitted MCM-KD projection head (`GridHead`: student dim -> teacher dim) from the run's last
    checkpoint, and its target statistics ``(mean, std)`` when the run standardised its targets (else
    None)."""
    from histodistill.engine.run_dir import last_checkpoint
    from histodistill.models.grid_head import GridHead
    from histodistill.models.weights import read_checkpoint

    full = read_checkpoint(last_checkpoint(run_dir))["state_dict"]
    state = {key.removeprefix("head."): value for key, value in full.items() if key.startswith("head.")}
    statistics = (full["target_mean"], full["target_std"]) if "target_mean" in full else None
    if "net.weight" in state:  # linear: (D_teacher, D_student)
        head = GridHead(state["net.weight"].shape[1], state["net.weight"].shape[0], kind="linear")
    else:  # mlp: net.0 (hidden, D_student), net.2 (D_teacher, hidden)
        hidden, in_dim = state["net.0.weight"].shape
        head = GridHead(in_dim, state["net.2.weight"].shape[0], kind="mlp", hidden_dim=hidden)
    head.load_state_dict(state)
    return head.eval(), statistics


def summary(rows: dict[str, dict], results: dict, fit: dict, context) -> dict:
    """``summary.json``: each model's row (``rows``: features/models.json) with its slide scores
    (``results``: compare/results.json), retention, speed-up, projection, machine and the verdict sentence.
    ``context`` is the run's `DistillContext`."""
    from histodistill.features.throughput import (
        PROJECTED_SLIDES,
        PROJECTED_TILES_PER_SLIDE,
        machine,
        projected_hours,
    )

    labelled = "retention" in results
    rate = "tiles_per_s" if all(rows[name]["tiles_per_s"] for name in MODELS) else "forward_tiles_per_s"
    document: dict = {}
    for name in MODELS:
        scores = results["models"][name] if labelled else {}
        document[name] = {
            "name": rows[name]["name"],
            "slide_auroc": scores.get("slide_auroc"),
            "slide_auroc_ci": scores.get("slide_auroc_ci"),
            "balanced_accuracy": scores.get("balanced_accuracy"),
            "tiles_per_s": rows[name]["tiles_per_s"],
            "forward_tiles_per_s": rows[name]["forward_tiles_per_s"],
            "parameters": rows[name]["parameters"],
            "projected_hours": projected_hours(rows[name][rate]),
            "features_dir": rows[name]["features_dir"],
            **({} if labelled else {"feature_cka": results["models"][name]["cka"]}),
        }
    speedup = round(rows["student"][rate] / rows["teacher"][rate], 2) if rows["teacher"][rate] else None
    unit = "GPU-hours" if context.device == "cuda" else "CPU-hours"
    document.update(
        {
            "retention": results.get("retention", {"value": None, "ci": None}),
            "retention_untuned": results.get("retention_untuned", {"value": None, "ci": None}),
            "speedup": speedup,
            "speed_measure": "end-to-end extraction" if rate == "tiles_per_s" else "forward pass only",
            "projection": {
                "slides": PROJECTED_SLIDES,
                "tiles_per_slide": PROJECTED_TILES_PER_SLIDE,
                "unit": unit,
            },
            "machine": {**machine(context.device), "device": context.device},
            "fit": {
                **fit,
                "student_start": context.student_start,
                "unlabeled": context.config.method == "mcmkd",
            },
            "verdict": _verdict(results, speedup, labelled),
        }
    )
    if labelled:
        document["mil"] = {key: results[key] for key in ("bags", "folds", "mil_model")}
    else:
        document["agreement"] = {
            "student_cosine": results["student_cosine"],
            "tiles": results["tiles"],
            "slides": results["slides"],
        }
    return document


def _percent(value: float | None) -> str:
    return "unbounded" if value is None else f"{value:.0%}"


def _setting(name: str) -> str:
    """A `DistillConfig` field named in text that library callers and CLI users both read (the verdict: in
    summary.json, the report and the log), which no command rewrites as it does errors
    (`histodistill.errors`): both spellings, `` `holdout` / `--holdout` `` (the command's option is the field
    with ``-`` for ``_``)."""
    return f"`{name}` / `--{name.replace('_', '-')}`"


def _verdict(results: dict, speedup: float | None, labelled: bool) -> str:
    speed = f"{speedup:g}x" if speedup else "an unmeasured multiple of"
    if labelled:
        value, low, high = (_percent(v) for v in (results["retention"]["value"], *results["retention"]["ci"]))
        return (
            f"the student keeps {value} [95 % CI {low}, {high}] of the teacher's slide AUROC at {speed} "
            "its speed"
        )
    cosine = results["student_cosine"]
    held_out = results["slides"] == "held_out"
    where = "held-out" if held_out else "fit"
    agree = (
        f"its features agree with the teacher's at cosine {cosine:.2f} on {results['tiles']} tiles of the "
        f"{where} slides"
        if cosine is not None
        else f"its features have linear CKA "
        f"{results['models']['student']['cka']:.2f} with the teacher's on the {where} slides"
    )
    unseen = (
        ""
        if held_out
        else f" (hold slides out of the fit with {_setting('holdout')} to measure on unseen ones)"
    )
    return (
        f"the student runs at {speed} the teacher's speed and {agree}{unseen}; slide labels "
        f"({_setting('labels')}) are needed for the AUROC comparison"
    )

"""What a `histodistill mil` run leaves in its run directory, and how to read it back
(`histodistill.eval.mil_cv` says which files pool several CV seeds).

```
<out>/config.yaml            resolved options           <out>/metrics.json   pooled + per fold
<out>/metrics.csv            per-epoch history           <out>/predictions.csv
<out>/splits/splits_<k>.csv  CLAM layout                 <out>/figures/roc.png
<out>/checkpoints/fold_<k>.safetensors + model.json      <out>/tensorboard/fold_<k>/
<out>/attention/<slide_id>.h5  out-of-fold instance scores: coords (N, 2), scores (N,)
```
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures go to files; never open a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from histodistill.data.bags import BagDataset  # noqa: E402
from histodistill.errors import UserError  # noqa: E402
from histodistill.eval.mil import FoldResult  # noqa: E402
from histodistill.io import atomic_hdf5, atomic_path, write_json  # noqa: E402
from histodistill.models.mil import create_mil  # noqa: E402

MODEL_JSON = "model.json"


def save_model(run_dir: Path, result: FoldResult, description: dict) -> Path:
    """Best weights of one fold as safetensors; ``model.json`` (written once) says how to rebuild them."""
    path = run_dir / "checkpoints" / f"fold_{result.fold}.safetensors"
    state = {k: v.contiguous() for k, v in result.model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"fold": str(result.fold), "best_epoch": str(result.best_epoch)})
    write_json(run_dir / "checkpoints" / MODEL_JSON, description)
    return path


def load_model(run_dir: str | os.PathLike, fold: int) -> tuple[torch.nn.Module, dict]:
    """Rebuild fold ``fold``'s best model from a run directory; returns (model in eval mode, model.json)."""
    checkpoints = Path(run_dir) / "checkpoints"
    if not (checkpoints / MODEL_JSON).is_file():
        raise UserError(
            f"{checkpoints / MODEL_JSON} not found: is {run_dir} the --out of a `histodistill mil` run?"
        )
    description = json.loads((checkpoints / MODEL_JSON).read_text())
    model = create_mil(
        description["model"],
        description["in_dim"],
        len(description["classes"]),
        **description["model_kwargs"],
    )
    model.load_state_dict(load_file(str(checkpoints / f"fold_{fold}.safetensors")))
    return model.eval(), description


def probability_text(p: float) -> str:
    """A probability as predictions.csv holds it: 9 significant digits, so a float32 reads back exactly.
    Six decimals rounded probabilities near 0 and 1 into ties, and AUROCs scored from the file fell short of
    those computed in memory (a teacher's 0.904 read 0.903 on the full demo)."""
    return f"{float(p):.9g}"


def write_predictions(
    path: Path, results: list[FoldResult], classes: list[str], id_column: str = "slide_id"
) -> None:
    """``<id_column>,label,prob_<class>...,fold`` per test bag (``case_id`` when bags are whole cases)."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([id_column, "label", *(f"prob_{c}" for c in classes), "fold"])
        for result in results:
            test = result.test
            for bag_id, label, probs in zip(test.bag_ids, test.labels, test.probs, strict=True):
                writer.writerow([bag_id, classes[label], *(probability_text(p) for p in probs), result.fold])


def write_pooled_predictions(path: Path, predictions, classes: list[str], seeds: list[int]) -> None:
    """Out-of-fold predictions of several CV seeds (`histodistill.eval.mil_cv.OutOfFold`), one row per bag:
    ``<id_column>,label,prob_<class>...`` (the mean over seeds), then per seed s ``fold_seed<s>`` and
    ``prob_<class>_seed<s>``."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                predictions.id_column,
                "label",
                *(f"prob_{c}" for c in classes),
                *(name for s in seeds for name in (f"fold_seed{s}", *(f"prob_{c}_seed{s}" for c in classes))),
            ]
        )
        for i, bag_id in enumerate(predictions.bag_ids):
            per_seed = [
                value
                for r in range(len(seeds))
                for value in (
                    int(predictions.folds[r, i]),
                    *(probability_text(p) for p in predictions.probs_per_seed[r, i]),
                )
            ]
            writer.writerow(
                [
                    bag_id,
                    classes[predictions.labels[i]],
                    *(probability_text(p) for p in predictions.probs[i]),
                    *per_seed,
                ]
            )


def write_history(path: Path, results: list[FoldResult]) -> None:
    """Every fold's per-epoch losses and validation AUROC, one row per (fold, epoch)."""
    columns = ["fold", "epoch", "train_loss", "val_loss", "val_auroc"]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, restval="")
        writer.writeheader()
        for result in results:
            for row in result.history:
                writer.writerow({"fold": result.fold} | row)


def write_attention(
    run_dir: Path, dataset: BagDataset, results: list[FoldResult], classes: list[str]
) -> list[str]:
    """Out-of-fold instance scores per slide (a case bag is cut back into its slides), with the tile
    coords, the label (index and class name) and the features file's tiling attributes
    (``patch_size_level0``...) for the heatmap.

    Slides whose features file has no coords (CLAM's pt_files) get no attention file; returns their ids.
    """
    index_of = {bag.bag_id: i for i, bag in enumerate(dataset.bags)}
    without_coords = []
    for result in results:
        for bag_id, scores, label in zip(
            result.test.bag_ids, result.test.scores, result.test.labels, strict=True
        ):
            item = dataset[index_of[bag_id]]
            for s, slide_id in enumerate(dataset.bags[index_of[bag_id]].slide_ids):
                if not dataset.has_coords[slide_id]:
                    without_coords.append(slide_id)
                    continue
                rows = (item["slide_index"] == s).numpy()
                with atomic_hdf5(run_dir / "attention" / f"{slide_id}.h5") as out:
                    out["coords"] = item["coords"].numpy()[rows]  # (N_slide, 2) level-0 top-left
                    out["scores"] = scores[rows].astype(np.float32)  # (N_slide,)
                    out.attrs.update({k: v for k, v in dataset.attrs[slide_id].items() if np.isscalar(v)})
                    out.attrs.update(
                        fold=result.fold, bag_id=bag_id, label=int(label), label_name=classes[int(label)]
                    )
    return without_coords


def plot_roc(path: Path, results: list[FoldResult], classes: list[str]) -> None:
    """ROC curves: one per fold for the positive class (binary), or one per class one-vs-rest over
    every fold's test predictions (more than two classes)."""
    figure, axes = plt.subplots(figsize=(5.5, 5))
    if len(classes) == 2:
        for r in results:
            if len(np.unique(r.test.labels)) == 2:
                fpr, tpr, _ = roc_curve(r.test.labels, r.test.probs[:, 1])
                axes.plot(
                    fpr,
                    tpr,
                    label=f"fold {r.fold} (AUROC {roc_auc_score(r.test.labels, r.test.probs[:, 1]):.3f})",
                )
        axes.set_title(f"ROC for {classes[1]!r} per fold")
    else:
        labels = np.concatenate([r.test.labels for r in results])
        probs = np.concatenate([r.test.probs for r in results])
        for c, name in enumerate(classes):
            if 0 < (labels == c).sum() < len(labels):
                fpr, tpr, _ = roc_curve(labels == c, probs[:, c])
                axes.plot(
                    fpr, tpr, label=f"{name} vs rest (AUROC {roc_auc_score(labels == c, probs[:, c]):.3f})"
                )
        axes.set_title("one-vs-rest ROC, all folds' test predictions")
    axes.plot([0, 1], [0, 1], "--", color="grey", linewidth=1)
    axes.set_xlabel("false positive rate")
    axes.set_ylabel("true positive rate")
    axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=110)
    plt.close(figure)

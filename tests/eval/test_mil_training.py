"""MIL training end to end through the CLI (`histodistill mil` -> `eval.mil_cv.cross_validate`) on features
with a planted signal."""

from __future__ import annotations

import argparse
import csv
import json
from collections import Counter

import h5py
import numpy as np
import pytest
import torch

from conftest import PLANTED_DIM, planted_features
from histodistill.cli import main
from histodistill.data.bags import BagDataset, class_names, make_bags, read_labels
from histodistill.data.splits import read_split
from histodistill.eval.mil_outputs import load_model

# Per-model settings that learn the planted signal within 12 epochs (TransMIL narrowed to stay fast).
FAST = {
    "abmil": ["--lr", "2e-3"],
    "mean": ["--lr", "5e-3"],
    "transmil": ["--lr", "1e-3", "--hidden-dim", "32"],
    "clam_sb": ["--lr", "1e-3", "--hidden-dim", "64"],
    "clam_mb": ["--lr", "1e-3", "--hidden-dim", "64"],
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("model", sorted(FAST))
def test_mil_run_learns_planted_signal_and_writes_run_directory(tmp_path, model, capsys):
    features_dir, labels, planted = planted_features(tmp_path)
    out = tmp_path / "run"
    argv = [
        "mil",
        "--features",
        str(features_dir),
        "--labels",
        str(labels),
        "--model",
        model,
        "--folds",
        "3",
        "--out",
        str(out),
        "--epochs",
        "12",
        "--seed",
        "1",
        *FAST[model],
    ]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["classes"] == ["normal", "tumor"] and len(metrics["folds"]) == 3
    assert metrics["pooled"]["auroc"] > 0.8 and metrics["pooled"]["n_bags"] == 24, metrics
    low, high = metrics["pooled"]["auroc_ci"]
    assert low <= metrics["pooled"]["auroc"] <= high
    printed = capsys.readouterr().out
    # pooled first, then folds
    assert printed.index("pooled out-of-fold AUROC") < printed.index("balanced_accuracy")
    assert "early stopping off" in printed
    for name in (
        "config.yaml",
        "metrics.csv",
        "figures/roc.png",
        "checkpoints/fold_2.safetensors",
        "splits/splits_0.csv",
    ):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard" / "fold_0").glob("events.out.tfevents.*"))
    with (out / "predictions.csv").open() as handle:
        predictions = list(csv.DictReader(handle))
    assert sorted(p["slide_id"] for p in predictions) == [f"slide{c:02d}" for c in range(24)]
    assert all(abs(float(p["prob_normal"]) + float(p["prob_tumor"]) - 1) < 1e-4 for p in predictions)
    if model in ("abmil", "clam_sb", "clam_mb"):
        # Attention finds the planted instances: the top-scored tile of most positive slides is one.
        hits = 0
        for slide_id, indices in planted.items():
            with h5py.File(out / "attention" / f"{slide_id}.h5") as handle:
                hits += int(np.argmax(handle["scores"][:]) in indices)
                assert handle.attrs["patch_size_level0"] == 256
                assert handle.attrs["label_name"] == "tumor"  # the class name, for the heatmap's title
        # Chance is about 2 of 12 (3 planted among 12-24 tiles). After 12 epochs (the last kept) the count
        # varies by seed: ABMIL on standardised features 10, 10, 10 at seeds 1-3; CLAM-SB 8, CLAM-MB 11 at
        # seed 1 (width 512; the test runs width 64).
        assert hits >= 6, f"top attention on a planted instance in only {hits}/12 positive slides"
    assert main(argv) == 2, "a finished run is not silently overwritten"


def test_saved_model_reproduces_out_of_fold_predictions(tmp_path, capsys):
    features_dir, labels, _ = planted_features(tmp_path, n_cases=12)
    out = tmp_path / "run"
    assert (
        main(
            [
                "mil",
                "--features",
                str(features_dir),
                "--labels",
                str(labels),
                "--folds",
                "2",
                "--out",
                str(out),
                "--epochs",
                "3",
                "--model",
                "abmil",
            ]
        )
        == 0
    )
    # Issue 29: the classes and their counts are said before training.
    counts = Counter(row.label for row in read_labels(labels))
    assert (
        f"{labels}: 2 classes: normal ({counts['normal']} slides), tumor ({counts['tumor']} slides)"
        in capsys.readouterr().out.splitlines()
    )
    with (out / "predictions.csv").open() as handle:
        row = next(r for r in csv.DictReader(handle) if r["fold"] == "1")
    model, description = load_model(out, 1)
    rows = read_labels(labels)
    data = BagDataset(features_dir, make_bags(rows, class_names(rows)))
    item = next(i for i in data if i["bag_id"] == row["slide_id"])
    with torch.no_grad():
        prob = model(item["features"][None]).logits.softmax(1)[0, 1].item()
    assert description["classes"] == ["normal", "tumor"]
    assert prob == pytest.approx(float(row["prob_tumor"]), abs=1e-5)


def test_same_seed_same_metrics(tmp_path):
    features_dir, labels, _ = planted_features(tmp_path, n_cases=12)
    results = []
    for name in ("a", "b"):
        assert (
            main(
                [
                    "mil",
                    "--features",
                    str(features_dir),
                    "--labels",
                    str(labels),
                    "--folds",
                    "2",
                    "--out",
                    str(tmp_path / name),
                    "--epochs",
                    "3",
                    "--model",
                    "abmil",
                    "--seed",
                    "5",
                ]
            )
            == 0
        )
        results.append((tmp_path / name / "predictions.csv").read_text())
    assert results[0] == results[1]


def test_val_auroc_with_a_one_class_validation_part_is_a_user_error(tmp_path, capsys):
    features_dir, labels, _ = planted_features(tmp_path, n_cases=8)
    splits = tmp_path / "splits"
    splits.mkdir()
    ids = [f"slide{c:02d}" for c in range(8)]
    (splits / "splits_0.csv").write_text(
        ",train,val,test\n"
        + "".join(
            f"{i},{a},{b},{t}\n"
            for i, (a, b, t) in enumerate(
                [(ids[0], ids[2], ids[6]), (ids[1], ids[4], ids[7]), (ids[3], "", ""), (ids[5], "", "")]
            )
        )
    )
    code = main(
        [
            "mil",
            "--features",
            str(features_dir),
            "--labels",
            str(labels),
            "--splits",
            str(splits),
            "--out",
            str(tmp_path / "run"),
            "--early-stop",
            "val_auroc",
        ]
    )
    assert code == 2
    assert "--early-stop val_loss" in capsys.readouterr().err


def test_early_stopping_is_off_by_default_holds_out_no_validation_and_without_a_validation_part_is_refused(
    tmp_path, capsys
):
    features_dir, labels, _ = planted_features(tmp_path, n_cases=12)
    common = [
        "mil",
        "--features",
        str(features_dir),
        "--labels",
        str(labels),
        "--folds",
        "2",
        "--epochs",
        "3",
    ]
    assert (
        main([*common, "--early-stop", "val_loss", "--val-fraction", "0", "--out", str(tmp_path / "stop")])
        == 2
    )
    err = capsys.readouterr().err
    assert (
        err.startswith("error: --val-fraction 0: fold(s) 0, 1 have no validation part")
        and "--early-stop none" in err
    )
    assert not (tmp_path / "stop").exists()  # refused before anything is written
    assert main([*common, "--out", str(tmp_path / "fixed")]) == 0
    assert "early stopping off: every fold trains 3 epochs and keeps the last" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "fixed" / "metrics.json").read_text())
    assert [fold["best_epoch"] for fold in metrics["folds"]] == [3, 3]  # every epoch ran, the last kept
    for k in range(2):
        split = read_split(tmp_path / "fixed" / "splits" / f"splits_{k}.csv")
        assert split["val"] == [] and len(split["train"]) + len(split["test"]) == 12
    # Asked for, early stopping holds out a validation part (0.2 of the training cases) and says so.
    assert main([*common, "--early-stop", "val_loss", "--out", str(tmp_path / "early")]) == 0
    assert "early stopping on val_loss" in capsys.readouterr().out
    assert read_split(tmp_path / "early" / "splits" / "splits_0.csv")["val"]


def _shared_offset(features_dir):
    """Make planted features look like SSL ViT features: one large vector shared by every tile, the signal a
    small shift (signal 4 x 0.05 = 0.2 over +-40)."""
    offset = np.linspace(-40, 40, PLANTED_DIM).astype(np.float32)
    for path in features_dir.glob("*.h5"):
        with h5py.File(path, "r+") as handle:
            handle["features"][...] = handle["features"][:] * 0.05 + offset


def test_the_library_standardizes_by_default_as_the_cli_does(tmp_path):
    """The demo's full run (and `distill`) call `cross_validate` with the library's defaults; those trained on
    raw features while `histodistill mil` standardised, and ABMIL sat at chance on the SD-MAE ViT's features
    (pooled AUROC 0.495 over 15 folds; 0.888 once standardised). One default, in `TrainConfig`."""
    from histodistill.commands.mil import add_arguments
    from histodistill.eval.mil_config import TrainConfig
    from histodistill.eval.mil_cv import CVConfig, cross_validate

    features_dir, labels, _ = planted_features(tmp_path)
    _shared_offset(features_dir)
    result = cross_validate(
        features_dir,
        labels,
        tmp_path / "run",
        CVConfig(folds=3, train=TrainConfig(epochs=12, lr=5e-4)),
        log=lambda line: None,
    )
    assert result.auroc > 0.85, result.auroc
    assert load_model(tmp_path / "run", 0)[1]["model_kwargs"]["standardize"] is True
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.get_default("feature_norm") == TrainConfig().feature_norm == "standardize"


def test_feature_norm_fits_on_training_tiles_only_and_finds_a_signal_under_a_shared_offset(tmp_path):
    """SSL ViT features: one large vector shared by every tile, the signal a small shift. Standardised,
    ABMIL finds it in a few epochs; the statistics are the fold's training tiles', stored in its
    checkpoint."""
    features_dir, labels, _ = planted_features(tmp_path)
    _shared_offset(features_dir)
    results = {}
    for norm in ("standardize", "none"):
        out = tmp_path / norm
        assert (
            main(
                [
                    "mil",
                    "--features",
                    str(features_dir),
                    "--labels",
                    str(labels),
                    "--folds",
                    "3",
                    "--out",
                    str(out),
                    "--epochs",
                    "12",
                    "--patience",
                    "12",
                    "--lr",
                    "5e-4",
                    "--feature-norm",
                    norm,
                ]
            )
            == 0
        )
        results[norm] = json.loads((out / "metrics.json").read_text())["pooled"]["auroc"]
    # Measured (pooled out-of-fold AUROC): 0.917 standardised, 0.604 raw.
    assert results["standardize"] > 0.85 and results["standardize"] > results["none"] + 0.1, results
    model, description = load_model(tmp_path / "standardize", 0)
    assert description["model_kwargs"]["standardize"] is True
    with (tmp_path / "standardize" / "splits" / "splits_0.csv").open() as handle:
        train_ids = [row["train"] for row in csv.DictReader(handle) if row["train"]]
    train = []
    for slide_id in train_ids:
        with h5py.File(features_dir / f"{slide_id}.h5") as handle:
            train.append(handle["features"][:])
    train = np.concatenate(train)
    np.testing.assert_allclose(model.mean.numpy(), train.mean(0), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(model.std.numpy(), train.std(0, ddof=1), rtol=1e-4)


@pytest.mark.parametrize("bags_per_step", ["1", "3"])
def test_one_at_a_time_writes_the_predictions_of_the_default_batched_run(tmp_path, capsys, bags_per_step):
    features_dir, labels, _ = planted_features(tmp_path, n_cases=12)
    probabilities = {}
    for name, extra in (("together", []), ("alone", ["--one-at-a-time"])):
        argv = [
            "mil",
            "--features",
            str(features_dir),
            "--labels",
            str(labels),
            "--folds",
            "3",
            "--seeds",
            "2",
            "--epochs",
            "3",
            "--lr",
            "2e-3",
            "--batch-size",
            bags_per_step,
            "--out",
            str(tmp_path / name),
            *extra,
        ]
        assert main(argv) == 0
        assert f"batch_size: {bags_per_step}\n" in (tmp_path / name / "config.yaml").read_text()
        with (tmp_path / name / "predictions.csv").open() as handle:
            probabilities[name] = [
                [float(v) for k, v in row.items() if k.startswith("prob_")] for row in csv.DictReader(handle)
            ]
    np.testing.assert_allclose(probabilities["together"], probabilities["alone"], atol=1e-5)
    assert "one at a time" not in capsys.readouterr().out  # ABMIL trains together, silently

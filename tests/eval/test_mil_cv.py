"""`histodistill.eval.mil_cv.cross_validate`: pooled out-of-fold AUROC with a CI, per-fold n/a, CV seeds,
checks before writing; the bootstrap helpers it and `distill` use."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from conftest import planted_features
from histodistill.cli import main
from histodistill.errors import UserError
from histodistill.eval.metrics import bootstrap_auroc, bootstrap_picks, ovr_aurocs, paired_bootstrap_auroc
from histodistill.eval.mil_cv import CVConfig, TrainConfig, cross_validate

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def quick(**kwargs) -> CVConfig:
    return CVConfig(**{"folds": 2, "train": TrainConfig(epochs=2, lr=2e-3)} | kwargs)


def write_splits(folder, tests: list[list[str]], slide_ids: list[str]) -> None:
    """CLAM splits_<k>.csv: each fold tests ``tests[k]`` and trains on every other slide."""
    folder.mkdir()
    for k, test in enumerate(tests):
        train = [s for s in slide_ids if s not in test]
        rows = [
            f"{i},{train[i] if i < len(train) else ''},,{test[i] if i < len(test) else ''}"
            for i in range(len(train))
        ]
        (folder / f"splits_{k}.csv").write_text(",train,val,test\n" + "\n".join(rows) + "\n")


def hand_auroc(labels: list[int], scores: list[float]) -> float:
    """The probability that a positive outscores a negative (ties count half), pair by pair."""
    positives = [s for y, s in zip(labels, scores, strict=True) if y == 1]
    negatives = [s for y, s in zip(labels, scores, strict=True) if y == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def test_test_folds_of_two_slides_one_of_one_class_show_na_and_the_pooled_auroc(tmp_path, capsys):
    """The user report: test folds of 2 slides printed a fold AUROC of 0.000 and a mean of 0.200 ± 0.447."""
    features, labels, _ = planted_features(tmp_path, n_cases=10)  # odd slides are tumour
    ids = [f"slide{c:02d}" for c in range(10)]
    # folds 0 (normal only) and 4 (tumour only) hold one class
    tests = [
        ["slide00", "slide02"],
        ["slide04", "slide01"],
        ["slide06", "slide03"],
        ["slide08", "slide05"],
        ["slide07", "slide09"],
    ]
    write_splits(tmp_path / "splits", tests, ids)
    out = tmp_path / "run"
    assert (
        main(
            [
                "mil",
                "--features",
                str(features),
                "--labels",
                str(labels),
                "--splits",
                str(tmp_path / "splits"),
                "--epochs",
                "3",
                "--lr",
                "2e-3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert [fold["auroc"] is None for fold in metrics["folds"]] == [True, False, False, False, True]
    fold_rows = [
        line.split() for line in printed.splitlines() if line.split()[:2] in (["0", "0"], ["0", "4"])
    ]
    assert len(fold_rows) == 2 and all(row[3] == "n/a" for row in fold_rows), printed
    assert "warning: seed 0: test folds with fewer than 5 slides of a class" in printed
    with (out / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    expected = hand_auroc([int(r["label"] == "tumor") for r in rows], [float(r["prob_tumor"]) for r in rows])
    assert metrics["pooled"]["auroc"] == pytest.approx(expected, abs=1e-6)
    assert metrics["pooled"]["n_bags"] == 10
    # The classes and their counts come first (issue 29), then the run's settings.
    assert printed.splitlines()[0] == f"{labels}: 2 classes: normal (5 slides), tumor (5 slides)"
    assert printed.splitlines()[1].startswith("early stopping off")
    assert f"pooled out-of-fold AUROC {expected:.3f} [95 % CI" in printed


def test_library_result_equals_its_files_and_seeds_repeat_with_the_same_folds_for_any_features(
    tmp_path, capsys
):
    features, labels, _ = planted_features(tmp_path, n_cases=12)
    one = cross_validate(features, labels, tmp_path / "one", quick(), log=lambda line: None)
    two = cross_validate(features, labels, tmp_path / "two", quick(seeds=2), log=lambda line: None)
    assert one.runs == [tmp_path / "one"] and two.runs == [
        tmp_path / "two" / "seed_0",
        tmp_path / "two" / "seed_1",
    ]
    assert two.seeds == [0, 1] and len(two.folds) == 4 and [f["seed"] for f in two.folds] == [0, 0, 1, 1]
    # Seed 0 of a two-seed run is the one-seed run: same folds, same initialisation, same predictions.
    np.testing.assert_allclose(two.predictions.probs_per_seed[0], one.predictions.probs, atol=1e-6)
    np.testing.assert_allclose(two.predictions.probs, two.predictions.probs_per_seed.mean(0))
    for k in range(2):
        assert (tmp_path / "one" / "splits" / f"splits_{k}.csv").read_text() == (
            tmp_path / "two" / "seed_0" / "splits" / f"splits_{k}.csv"
        ).read_text()
    # The point is the mean of the seeds' pooled AUROCs, each the AUROC of all out-of-fold predictions.
    labels_ = two.predictions.labels
    per_seed = [roc_auc_score(labels_, p[:, 1]) for p in two.predictions.probs_per_seed]
    assert two.auroc_per_seed == pytest.approx(per_seed) and two.auroc == pytest.approx(np.mean(per_seed))
    assert two.auroc_ci[0] <= two.auroc <= two.auroc_ci[1]
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["pooled"]["auroc"] == pytest.approx(two.auroc) and metrics["pooled"]["auroc_ci"] == list(
        two.auroc_ci
    )
    assert json.loads((tmp_path / "two" / "seed_1" / "metrics.json").read_text())["pooled"][
        "auroc"
    ] == pytest.approx(per_seed[1])
    with (tmp_path / "two" / "predictions.csv").open() as handle:
        row = next(csv.DictReader(handle))
    i = two.predictions.bag_ids.index(row["slide_id"])
    assert float(row["prob_tumor_seed1"]) == pytest.approx(two.predictions.probs_per_seed[1, i, 1], abs=1e-6)
    assert int(row["fold_seed1"]) == two.predictions.folds[1, i]
    assert main(["heatmap", "--run", str(tmp_path / "two")]) == 2  # a CV folder of seeds: say which to pass
    assert "pass one of them as --run (seed_0, seed_1 in" in capsys.readouterr().err
    # Other features, same labels and seed: the same folds.
    (tmp_path / "other").mkdir()
    other, _, _ = planted_features(tmp_path / "other", n_cases=12, seed=3)
    cross_validate(other, labels, tmp_path / "three", quick(), log=lambda line: None)
    assert (tmp_path / "three" / "splits" / "splits_1.csv").read_text() == (
        tmp_path / "one" / "splits" / "splits_1.csv"
    ).read_text()


def test_too_few_cases_is_refused_before_anything_is_written_naming_folds_and_splits(tmp_path, capsys):
    features, labels, _ = planted_features(tmp_path, n_cases=8)  # 4 cases per class
    with pytest.raises(UserError, match="`folds=5`") as info:
        cross_validate(features, labels, tmp_path / "run", quick(folds=5))
    assert "`splits_dir=...`" in str(info.value)
    assert not (tmp_path / "run").exists()
    assert (
        main(
            [
                "mil",
                "--features",
                str(features),
                "--labels",
                str(labels),
                "--folds",
                "5",
                "--out",
                str(tmp_path / "run"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: too few cases per class for --folds 5:") and "(--splits)" in err
    assert not (tmp_path / "run").exists()


def test_a_finished_run_is_kept_unless_overwrite_which_removes_only_the_old_runs_files(tmp_path):
    features, labels, _ = planted_features(tmp_path, n_cases=8)
    cross_validate(features, labels, tmp_path / "run", quick(), log=lambda line: None)
    with pytest.raises(UserError, match="`overwrite=True`"):
        cross_validate(features, labels, tmp_path / "run", quick(), log=lambda line: None)
    (tmp_path / "run" / "notes.txt").write_text("mine")
    three = cross_validate(
        features, labels, tmp_path / "run", quick(seeds=2), overwrite=True, log=lambda line: None
    )
    # The one-seed run's files are gone (a stale attention/ would be drawn as this run's); others are kept.
    assert not (tmp_path / "run" / "attention").exists() and not (tmp_path / "run" / "splits").exists()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "config.yaml",
        "metrics.json",
        "notes.txt",
        "predictions.csv",
        "seed_0",
        "seed_1",
    ]
    assert three.runs == [tmp_path / "run" / "seed_0", tmp_path / "run" / "seed_1"]


def test_mil_renders_the_librarys_parameters_as_its_flags(tmp_path, capsys):
    """`cross_validate` names `folds=...` and `splits_dir=...`; `histodistill mil` prints --folds and
    --splits."""
    features_dir, labels, _ = planted_features(tmp_path)
    with pytest.raises(UserError, match=r"`folds=50`.*lower `folds=\.\.\.`.*`splits_dir=\.\.\.`"):
        cross_validate(features_dir, labels, tmp_path / "lib", CVConfig(folds=50), log=lambda line: None)
    assert (
        main(
            [
                "mil",
                "--features",
                str(features_dir),
                "--labels",
                str(labels),
                "--folds",
                "50",
                "--out",
                str(tmp_path / "cli"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: too few cases per class for --folds 50") and "lower --folds," in err
    assert err.endswith("(--splits)") and "`" not in err and len(err.splitlines()) == 1


def test_bootstrap_auroc_of_class_probabilities_is_the_ovr_auroc_and_binary_matches_positive_probs():
    rng = np.random.default_rng(0)
    labels = np.r_[0, 1, 2, rng.integers(0, 3, 27)]
    probs = rng.dirichlet(np.ones(3), size=(2, 30))  # (R, S, C)
    point, low, high = bootstrap_auroc(labels, probs, n_boot=200)
    expected = np.mean([roc_auc_score(labels, p, multi_class="ovr", average="macro") for p in probs])
    assert point == pytest.approx(expected) and low < point < high
    picks = bootstrap_picks(labels, 50, seed=4)
    assert picks.shape == (50, 30) and all(len(np.unique(labels[p])) == 3 for p in picks)
    np.testing.assert_allclose(
        ovr_aurocs(labels[picks], probs[0][picks]),
        [roc_auc_score(labels[p], probs[0][p], multi_class="ovr") for p in picks],
    )
    binary = (labels == 2).astype(int)
    two = np.stack([1 - probs[..., 2], probs[..., 2]], -1)
    assert bootstrap_auroc(binary, probs[..., 2], n_boot=100) == bootstrap_auroc(binary, two, n_boot=100)


def test_paired_bootstrap_resamples_the_bags_once_for_both_models():
    rng = np.random.default_rng(1)
    labels = np.r_[0, 1, rng.integers(0, 2, 38)]
    a = rng.random((1, 40)) + 0.3 * labels
    b = a + 0.2 * labels + 0.05 * rng.random((1, 40))  # b = a plus a little more signal
    paired = paired_bootstrap_auroc(labels, a, b, n_boot=300, seed=2)
    auroc_a, auroc_b = roc_auc_score(labels, a[0]), roc_auc_score(labels, b[0])
    assert paired.a[0] == pytest.approx(auroc_a) and paired.b[0] == pytest.approx(auroc_b)
    assert paired.difference[0] == pytest.approx(auroc_b - auroc_a)
    assert paired.ratio[0] == pytest.approx(auroc_b / auroc_a)
    # The CI bounds are percentiles of b - a computed on the very same resampled bags.
    picks = bootstrap_picks(labels, 300, seed=2)
    diffs = [roc_auc_score(labels[p], b[0, p]) - roc_auc_score(labels[p], a[0, p]) for p in picks]
    assert paired.difference[1:] == pytest.approx(tuple(np.percentile(diffs, [2.5, 97.5])))
    # Pairing cancels what the models share: the difference's CI is narrower than either AUROC's.
    assert paired.difference[2] - paired.difference[1] < paired.a[2] - paired.a[1]
    same = paired_bootstrap_auroc(labels, a, a, n_boot=100)
    assert same.difference == (0.0, 0.0, 0.0) and same.ratio == (1.0, 1.0, 1.0)


def test_predictions_file_keeps_every_float32_probability_exactly():
    # Regression: six decimals made ties of probabilities near 0 and 1, so AUROCs read from predictions.csv
    # (the demo's tables) fell short of the in-memory ones (distill's summary).
    from histodistill.eval.mil_outputs import probability_text

    probs = np.array([1 - 2**-24, 1 - 2**-23, 0.9999990, 0.5, 3e-7, 1e-30, 0.0, 1.0], dtype=np.float32)
    read = np.array([float(probability_text(p)) for p in probs], dtype=np.float32)
    assert np.array_equal(read, probs)
    assert len({probability_text(p) for p in probs[:3]}) == 3  # f"{p:.6f}" gives "1.000000" for all three

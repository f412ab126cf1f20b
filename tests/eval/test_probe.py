"""Probes: the kNN vote against the formula by hand, the linear probe on separable data, the CLI outputs."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest

from histodistill.cli import main
from histodistill.eval.probe import knn_probe, linear_classifier, linear_probe


def test_knn_vote_matches_the_formula_by_hand():
    train = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    train_y = np.array([0, 1, 1])
    test = np.array([[2.0, 0.2], [0.1, 2.0]])  # only the first is checked by hand
    # cosine similarities of the test point to each training point, then the 2 nearest vote with exp(s/T)
    unit = test[0] / np.linalg.norm(test[0])
    sims = [unit @ (t / np.linalg.norm(t)) for t in train]  # [0.995, 0.0995, 0.774]
    T = 0.5
    # class 0, class 1 (point 1 is not in the top 2)
    votes = np.array([math.exp(sims[0] / T), math.exp(sims[2] / T)])
    expected = votes / votes.sum()
    result = knn_probe(train, train_y, test, np.array([0, 1]), k=2, temperature=T)
    np.testing.assert_allclose(result.probs[0], expected, rtol=1e-5)
    assert result.predictions.tolist() == [0, 1]


def _clusters(n_per_class=12, classes=3, dim=8, seed=0, spread=0.3):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (classes, dim))
    x = np.concatenate([c + rng.normal(0, spread, (n_per_class, dim)) for c in centres]).astype(np.float32)
    y = np.repeat(np.arange(classes), n_per_class)
    return x, y


@pytest.mark.parametrize("C", [None, 0.5])
def test_linear_probe_separates_separable_classes(C):
    x, y = _clusters()
    test_x, test_y = _clusters(seed=0, spread=0.3)[0][::2], y[::2]
    result = linear_probe(x, y, test_x, test_y, seed=0, C=C)
    assert result.metrics["accuracy"] == 1.0 and result.metrics["auroc"] == 1.0
    assert result.probs.shape == (len(test_y), 3)
    np.testing.assert_allclose(result.probs.sum(axis=1), 1.0, atol=1e-6)


def test_linear_probe_class_missing_from_training_gets_zero_probability():
    x, y = _clusters(n_per_class=6)
    keep = y < 2
    result = linear_probe(x[keep], y[keep], x, y, seed=0, num_classes=3)
    assert result.probs.shape == (len(y), 3) and (result.probs[:, 2] == 0).all()


def _write_features(path, x, y, classes):
    with h5py.File(path, "w") as handle:
        handle["features"] = x
        handle["labels"] = y
        handle.create_dataset(
            "paths",
            data=np.array([f"{classes[c]}/{i}.png" for i, c in enumerate(y)], dtype=object),
            dtype=h5py.string_dtype(),
        )
        handle.attrs["classes"] = classes


# three classes, and two of three (binary, one absent)
@pytest.mark.parametrize("classes", [(0, 1, 2), (0, 2)])
def test_linear_classifier_gives_the_probe_probabilities_on_raw_features(classes):
    """The teacher head for logit KD: the probe's scaler folded into one Linear, so softmax(logits) on raw
    features equals the fitted probe's predict_proba (the probe scores test features with the same model)."""
    import torch

    rng = np.random.default_rng(0)
    y = np.repeat(classes, 30)
    x = rng.normal(size=(len(y), 4)) * [1.0, 5.0, 0.2, 2.0] + [3.0, -4.0, 1.0, 0.0]
    x[:, 0] += 2.0 * y  # separable along one raw axis
    probe = linear_probe(x, y, x, y, seed=0, num_classes=3)
    layer = linear_classifier(x, y, num_classes=3, seed=0)
    with torch.no_grad():
        probs = torch.softmax(layer(torch.as_tensor(x, dtype=torch.float32)), dim=1).numpy()
    np.testing.assert_allclose(probs, probe.probs, atol=1e-4)
    assert layer.weight.shape == (3, 4)


def test_cli_cross_validation_writes_metrics_and_figures_and_repeats(tmp_path):
    x, y = _clusters(n_per_class=10, spread=1.5)
    _write_features(tmp_path / "features.h5", x, y, ["a", "b", "c"])
    args = ["probe", "--features", str(tmp_path), "--folds", "3", "--seeds", "0", "1", "--k", "5"]
    assert main([*args, "--out", str(tmp_path / "p1")]) == 0
    results = json.loads((tmp_path / "p1" / "probe.json").read_text())
    assert results["protocol"] == "3-fold CV" and results["classes"] == ["a", "b", "c"]
    for name in ("linear", "knn"):
        assert len(results[name]["runs"]) == 6
        assert set(results[name]["mean"]) == {
            "accuracy",
            "balanced_accuracy",
            "macro_f1",
            "auroc",
            "kappa_qw",
        }
        assert results[name]["mean"]["accuracy"] > 0.8
        assert (tmp_path / "p1" / f"confusion_{name}.png").stat().st_size > 0
    assert main([*args, "--out", str(tmp_path / "p2")]) == 0
    again = json.loads((tmp_path / "p2" / "probe.json").read_text())
    assert (
        again["linear"]["runs"] == results["linear"]["runs"]
        and again["knn"]["runs"] == results["knn"]["runs"]
    )


def test_cli_train_test_and_relabelling(tmp_path):
    x, y = _clusters(n_per_class=8)
    _write_features(tmp_path / "train.h5", x, y, ["a", "b", "c"])
    _write_features(tmp_path / "test.h5", x[::2], y[::2], ["a", "b", "c"])
    assert (
        main(
            [
                "probe",
                "--train",
                str(tmp_path / "train.h5"),
                "--test",
                str(tmp_path / "test.h5"),
                "--seeds",
                "0",
                "--out",
                str(tmp_path / "tt"),
            ]
        )
        == 0
    )
    results = json.loads((tmp_path / "tt" / "probe.json").read_text())
    assert results["protocol"] == "train/test" and results["linear"]["mean"]["accuracy"] == 1.0

    # Relabel: classes a and b merged into "ab", c dropped.
    rows = ["path,label"] + [f"{'abc'[c]}/{i}.png,{'ab' if c < 2 else 'x'}" for i, c in enumerate(y) if c < 2]
    rows += [f"c/{i}.png,c" for i, c in enumerate(y) if c == 2][:3]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    assert (
        main(
            [
                "probe",
                "--features",
                str(tmp_path / "train.h5"),
                "--labels",
                str(tmp_path / "labels.csv"),
                "--folds",
                "3",
                "--seeds",
                "0",
                "--k",
                "3",
                "--out",
                str(tmp_path / "rl"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "rl" / "probe.json").read_text())["classes"] == ["ab", "c"]


def test_cli_errors_name_the_fix(tmp_path, capsys):
    x, y = _clusters(n_per_class=2)
    _write_features(tmp_path / "features.h5", x, y, ["a", "b", "c"])
    assert main(["probe", "--features", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err  # the library names `folds=5`, the command its option
    assert (
        err.startswith("error: --folds 5: every class needs at least 5 samples") and "lower --folds to" in err
    )
    assert main(["probe", "--train", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert main(["probe", "--features", str(tmp_path / "nope.h5"), "--out", str(tmp_path / "o")]) == 2
    assert "extract --images" in capsys.readouterr().err


def test_mae_linear_probe_is_bn_plus_linear_trained_by_sgd_and_separates_clusters():
    from histodistill.eval.probe import mae_linear_probe

    x, y = _clusters(n_per_class=20, spread=1.0)
    x = x * 50 + 10  # far from unit scale: the non-affine BatchNorm puts it back
    result = mae_linear_probe(x, y, x, y, seed=0, epochs=20, warmup_epochs=2, batch_size=16)
    assert result.metrics["accuracy"] == 1.0
    again = mae_linear_probe(x, y, x, y, seed=0, epochs=20, warmup_epochs=2, batch_size=16)
    np.testing.assert_array_equal(result.probs, again.probs)


def test_cli_linear_protocol_mae(tmp_path):
    x, y = _clusters(n_per_class=8)
    _write_features(tmp_path / "train.h5", x, y, ["a", "b", "c"])
    _write_features(tmp_path / "test.h5", x[::2], y[::2], ["a", "b", "c"])
    assert (
        main(
            [
                "probe",
                "--train",
                str(tmp_path / "train.h5"),
                "--test",
                str(tmp_path / "test.h5"),
                "--seeds",
                "0",
                "--linear-protocol",
                "mae",
                "--out",
                str(tmp_path / "mae"),
            ]
        )
        == 0
    )
    results = json.loads((tmp_path / "mae" / "probe.json").read_text())
    assert results["linear_protocol"] == "mae" and results["linear"]["mean"]["accuracy"] == 1.0


def test_mae_head_init_optimiser_and_per_step_lr_follow_main_linprobe(monkeypatch):
    # main_linprobe.py / run_mae_eval_linear.py: BatchNorm1d(D, affine=False, eps=1e-6) + Linear,
    # trunc_normal_ (std=0.01) weight; SGD momentum 0.9 without weight decay (SD-MAE's); before every step, lr
    # = blr x B / 256 x (a linear warm-up, then a half cosine to 0) at epoch + step / steps_per_epoch.
    # Documented deviation: the shared scheduler's warm-up is one step ahead, (step + 1) / warm-up steps, so
    # no step runs at lr 0.
    import torch

    from histodistill.eval import probe

    optimizers, lrs = [], []
    build = probe.build_optimizer
    monkeypatch.setattr(
        probe, "build_optimizer", lambda *a, **k: optimizers.append(build(*a, **k)) or optimizers[-1]
    )
    epochs, warmup, steps, batch, dim = 4, 2, 3, 8, 512

    def batches():
        generator = torch.Generator().manual_seed(0)
        for _ in range(epochs * steps):
            lrs.append(optimizers[0].param_groups[0]["lr"])  # the lr of the step this batch is for
            yield (
                torch.randn(batch, dim, generator=generator),
                torch.randint(0, 3, (batch,), generator=generator),
            )

    head = probe.train_mae_head(
        batches(), dim, 3, batch, steps, epochs=epochs, warmup_epochs=warmup, base_lr=0.1
    )
    norm, linear = head
    assert (
        isinstance(norm, torch.nn.BatchNorm1d) and not norm.affine and norm.eps == 1e-6 and not head.training
    )
    group = optimizers[0].param_groups[0]
    assert (
        isinstance(optimizers[0], torch.optim.SGD) and group["momentum"] == 0.9 and group["weight_decay"] == 0
    )
    peak = 0.1 * batch / 256
    expected = []
    for step in range(epochs * steps):
        t = step / steps
        expected.append(
            peak * (step + 1) / (warmup * steps)
            if t < warmup
            else peak * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (epochs - warmup)))
        )
    assert lrs == pytest.approx(expected, abs=1e-12)
    fresh = probe.train_mae_head(iter(()), dim, 3, batch, steps)  # no step taken: the initial head
    assert fresh[1].weight.std().item() == pytest.approx(0.01, rel=0.05) and not fresh[1].bias.any()

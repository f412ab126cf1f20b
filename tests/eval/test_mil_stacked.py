"""Training the folds × seeds of a CV together (`eval.mil_stacked.train_runs`) equals training them one at a
time (`eval.mil.train_fold`): same weights, predictions, histories and best epochs, dropout included; and
`cross_validate` (batched by default) writes what it writes one run at a time."""

from __future__ import annotations

import dataclasses
import math
from unittest.mock import patch

import numpy as np
import pytest
import torch
from torch.utils.data import Subset

from conftest import planted_features
from histodistill.data.bags import BagDataset, class_names, make_bags, read_labels
from histodistill.data.splits import make_splits
from histodistill.errors import UserError
from histodistill.eval import mil, mil_stacked
from histodistill.eval.mil_cv import CVConfig, TrainConfig, cross_validate
from histodistill.eval.mil_stacked import NotStackable, Run, _MaskedAdamW, _objective, train_runs
from histodistill.models.mil import MILOutput, create_mil
from histodistill.models.mil_stacked import stack_mil

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = {
    "mean": {},
    "abmil": {"hidden_dim": 16, "attention_dim": 8},
    "transmil": {"dim": 16, "heads": 2},
    "clam_sb": {"hidden_dim": 16, "attention_dim": 8, "k_sample": 3},
}
# ABMIL's attention bias w.bias (CLAM's attention.c.bias) shifts every attention logit of a bag alike, so the
# softmax never sees it: its gradient is float rounding noise (~1e-9), which Adam scales up to steps of about
# lr. It differs between any two float orders of the same sums, and changes no output; it is compared through
# the predictions.
NO_EFFECT = ("attention.w.bias", "attention.c.bias")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    features_dir, labels, _ = planted_features(tmp_path_factory.mktemp("planted"), n_cases=22)
    rows = read_labels(labels)
    return BagDataset(features_dir, make_bags(rows, class_names(rows))), make_splits(rows, 4, 0.25, seed=0)


def build_runs(dataset, splits, model_name, config, seeds=(0, 1), **model_kwargs):
    """The runs of one CV repeated over ``seeds``, built as `run_fold` builds a fold: the global seed, then
    the model, its statistics, and (for the stacked trainer) the RNG state its dropout draws from."""
    runs = []
    for seed in seeds:
        for fold, split in enumerate(splits):
            parts = mil.split_indices(dataset, split)
            torch.manual_seed(seed * 100 + fold)
            model = create_mil(
                model_name, dataset.feature_dim, 2, standardize=True, **SMALL[model_name] | model_kwargs
            )
            model.fit(torch.cat([dataset[i]["features"] for i in parts["train"]]))
            generator = torch.Generator().set_state(torch.get_rng_state())
            runs.append(
                Run(
                    model,
                    Subset(dataset, parts["train"]),
                    Subset(dataset, parts["val"]),
                    seed * 100 + fold,
                    generator,
                    name=f"fold {fold}, seed {seed}",
                )
            )
    return runs


def one_at_a_time(runs, config):
    results = []
    for run in runs:
        torch.set_rng_state(run.generator.get_state())  # the global stream right after the model was built
        results.append(
            mil.train_fold(run.model, run.train, run.val, dataclasses.replace(config, seed=run.seed))
        )
    return results


@pytest.mark.parametrize(
    ("model_name", "dropout", "batch_size", "early_stop", "lr"),
    [
        ("abmil", 0.0, 1, "none", 1e-2),
        ("abmil", 0.25, 1, "val_auroc", 5e-3),  # runs stop after 2, 3 or 4 epochs
        ("abmil", 0.25, 3, "val_loss", 1e-2),
        ("mean", 0.5, 2, "val_loss", 1e-2),  # one run stops after 2 epochs, the others train all 8
        ("clam_sb", 0.25, 2, "none", 1e-2),  # its own objective: bag and instance losses
    ],
)
def test_training_together_equals_one_at_a_time(dataset, model_name, dropout, batch_size, early_stop, lr):
    data, splits = dataset
    config = mil.TrainConfig(
        epochs=8,
        lr=lr,
        weight_decay=1e-2,
        early_stop=early_stop,
        patience=1,
        batch_size=batch_size,
        device="cpu",
    )
    alone = one_at_a_time(build_runs(data, splits, model_name, config, dropout=dropout), config)
    together = train_runs(build_runs(data, splits, model_name, config, dropout=dropout), config)
    assert len({len(run.train) for run in build_runs(data, splits, model_name, config)}) > 1, (
        "the folds should differ in size, so some runs sit out steps"
    )
    if early_stop != "none" and batch_size != 3:
        assert len({len(history) for _, _, history in alone}) > 1, "runs should stop at different epochs"
    test_bags = torch.stack([data[i]["features"][:12] for i in range(len(data))])  # (bags, 12, D)
    for (model_a, epoch_a, history_a), (model_b, epoch_b, history_b) in zip(alone, together, strict=True):
        assert epoch_a == epoch_b
        assert [row.keys() for row in history_a] == [row.keys() for row in history_b]
        for row_a, row_b in zip(history_a, history_b, strict=True):
            assert row_b == pytest.approx(row_a, abs=1e-5)
        b_state = model_b.state_dict()
        for name, value in model_a.state_dict().items():
            if not name.endswith(NO_EFFECT):
                torch.testing.assert_close(b_state[name], value, atol=1e-5, rtol=1e-5, msg=name)
        with torch.no_grad():
            out_a, out_b = model_a.eval()(test_bags), model_b.eval()(test_bags)
        torch.testing.assert_close(out_b.logits, out_a.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out_b.scores, out_a.scores, atol=1e-5, rtol=1e-5)


def test_a_run_without_a_bag_keeps_its_weights_and_adamw_state():
    torch.manual_seed(0)
    models = [create_mil("abmil", 6, 2, **SMALL["abmil"]) for _ in range(3)]
    stacked = stack_mil(models)
    optimizer = _MaskedAdamW(stacked, models[0], mil.TrainConfig(lr=1e-2, weight_decay=0.1), 3)
    params = dict(stacked.named_parameters())
    grads = {name: torch.randn_like(p) for name, p in params.items()}
    optimizer.step(grads, [0, 2])
    before = {name: p.detach().clone() for name, p in params.items()}
    moments = [[(m[0][1].clone(), m[1][1].clone()) for m in group[2]] for group in optimizer.groups]
    optimizer.step(grads, [0, 2])  # run 1 again without a bag
    for name, p in params.items():
        assert torch.equal(p[1], before[name][1]), name
        assert not torch.equal(p[0], before[name][0]), name
    for group, saved in zip(optimizer.groups, moments, strict=True):
        for (avg, avg_sq), (old_avg, old_avg_sq) in zip(group[2], saved, strict=True):
            assert torch.equal(avg[1], old_avg) and torch.equal(avg_sq[1], old_avg_sq)
        assert all(steps[1].item() == 0 and steps[0].item() == 2 for steps in group[3])


def test_transmil_is_refused_before_training(dataset):
    data, splits = dataset
    config = mil.TrainConfig(epochs=1, device="cpu")
    with pytest.raises(NotStackable, match="TransMIL"):
        train_runs(build_runs(data, splits[:2], "transmil", config, seeds=(0,)), config)


def test_a_non_finite_loss_and_an_overflowing_step_are_user_errors_naming_the_run(dataset):
    data, splits = dataset
    config = mil.TrainConfig(epochs=2, lr=1e38, early_stop="none", device="cpu")
    with pytest.raises(
        UserError, match=r"overflowed in fold 0, seed 0; fold 1, seed 0 \(`lr=1e\+38`.*Lower `lr=\.\.\.`"
    ):
        train_runs(build_runs(data, splits[:2], "abmil", config, seeds=(0,)), config)
    runs = build_runs(data, splits[:2], "abmil", config, seeds=(0,))
    with torch.no_grad():
        runs[1].model.mil.classifier.bias.fill_(float("inf"))
    with pytest.raises(
        UserError, match=r"non-finite \(bags \['slide\d+'\] of fold 1, seed 0\).*Lower `lr=\.\.\.`"
    ):
        train_runs(runs, dataclasses.replace(config, lr=1e-3))


@pytest.mark.parametrize(("model_name", "early_stop"), [("abmil", "none"), ("mean", "val_loss")])
def test_cross_validate_together_equals_one_at_a_time(tmp_path, model_name, early_stop):
    """The CV's default (folds × seeds trained together) writes what training them one at a time writes."""
    features, labels, _ = planted_features(tmp_path, n_cases=18)
    train = TrainConfig(epochs=4, lr=5e-3, early_stop=early_stop, patience=1, model_kwargs=SMALL[model_name])
    results = {
        batched: cross_validate(
            features,
            labels,
            tmp_path / str(batched),
            CVConfig(model=model_name, folds=3, seeds=2, batched=batched, train=train),
            log=lambda line: None,
        )
        for batched in (False, True)
    }
    alone, together = results[False], results[True]
    np.testing.assert_allclose(
        together.predictions.probs_per_seed, alone.predictions.probs_per_seed, atol=1e-5
    )
    assert together.auroc == pytest.approx(alone.auroc, abs=1e-6)
    assert [row["best_epoch"] for row in together.folds] == [row["best_epoch"] for row in alone.folds]
    assert (tmp_path / "True" / "seed_1" / "checkpoints" / "fold_2.safetensors").is_file()


def test_cross_validate_trains_transmil_one_at_a_time_and_says_why(tmp_path):
    features, labels, _ = planted_features(tmp_path, n_cases=8)
    lines = []
    cross_validate(
        features,
        labels,
        tmp_path / "run",
        CVConfig(model="transmil", folds=2, train=TrainConfig(epochs=1, model_kwargs=SMALL["transmil"])),
        log=lines.append,
    )
    assert any("one at a time, not together: TransMIL runs each bag alone" in line for line in lines), lines


def test_the_bag_cross_entropy_of_all_runs_at_once_is_each_runs_own_mean_and_ignores_empty_slots():
    """`_objective`'s one call for every run gives what each run's model.loss gives on its own bags (runs with
    3, 1 and no bags of a 3-bag step); an empty slot's inf logits reach no run's loss."""
    model = create_mil("abmil", 6, 2, **SMALL["abmil"])
    logits, labels = torch.randn(9, 2), torch.tensor([0, 1, 1, 0, 0, 0, 1, 0, 1])
    logits[4:] = float("inf")  # run 1's padding slots and run 2's empty slots
    chosen, stepping = [[0, 1, 2], [5], []], [0, 1]
    output = MILOutput(logits, torch.zeros(9, 4))
    got = _objective(model, 3, 3)(output, labels, chosen, stepping)
    expected = torch.stack(
        [
            model.loss(MILOutput(logits[:3], None), labels[:3]),
            model.loss(MILOutput(logits[3:4], None), labels[3:4]),
        ]
    )
    torch.testing.assert_close(got, expected)


def test_several_bags_per_step_take_one_adamw_step_per_group_of_bags_and_repeat_with_the_same_seeds(dataset):
    """``batch_size`` B: each run takes ceil(n / B) steps an epoch (the mean loss of B bags each); trained
    twice with the same seeds, dropout included, the weights are identical."""
    data, splits = dataset
    config = mil.TrainConfig(epochs=1, lr=1e-2, batch_size=3, device="cpu")
    optimizers, trained = [], []

    class Kept(_MaskedAdamW):
        def __init__(self, *args) -> None:
            super().__init__(*args)
            optimizers.append(self)

    for _ in range(2):
        runs = build_runs(data, splits, "abmil", config, seeds=(0,), dropout=0.25)
        with patch.object(mil_stacked, "_MaskedAdamW", Kept):
            trained.append(train_runs(runs, config))
        steps = optimizers[-1].groups[0][3][0]  # the first parameter's AdamW step count, per run
        assert [int(count) for count in steps] == [math.ceil(len(run.train) / 3) for run in runs]
    for (model_a, _, _), (model_b, _, _) in zip(*trained, strict=True):
        for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
            assert torch.equal(a, b), name

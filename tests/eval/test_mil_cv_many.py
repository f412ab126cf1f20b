"""`cross_validate_many`: one MIL cross-validation per features folder, in parallel spawned processes or in
this one, with the same predictions and files either way."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import planted_features
from histodistill.eval.mil_cv import CVConfig, TrainConfig
from histodistill.eval.mil_cv_many import cross_validate_many, mil_workers


@pytest.mark.slow  # ~9 s: two spawned processes import torch
def test_two_workers_give_the_predictions_and_files_of_one_process_and_log_each_run_whole(tmp_path):
    """A run is not bit-identical on 1 and 2 intra-op threads (measured: apart in the 8th digit on these
    bags), so this process runs on 2: the in-process runner must pin one thread, as each worker does."""
    import torch

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    features = {
        name: planted_features(tmp_path / name, n_cases=12, seed=seed)[0]
        for name, seed in (("a", 0), ("b", 1))
    }
    labels = tmp_path / "a" / "labels.csv"  # the same case ids and labels for both seeds of the fixture
    config = CVConfig(folds=2, seeds=2, train=TrainConfig(epochs=2, lr=2e-3, device="cpu"))
    results, logged, before = {}, {}, torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for workers in (1, 2):
            logged[workers] = []
            results[workers] = cross_validate_many(
                features,
                labels,
                tmp_path / f"out{workers}",
                config,
                workers=workers,
                log=logged[workers].append,
            )
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(before)
    for name in ("a", "b"):
        one, two = results[1][name], results[2][name]
        assert list(results[2]) == ["a", "b"] and one.predictions.bag_ids == two.predictions.bag_ids
        assert np.array_equal(one.predictions.probs_per_seed, two.predictions.probs_per_seed)
        assert two.runs == [tmp_path / "out2" / name / f"seed_{seed}" for seed in (0, 1)]
        for seed in (0, 1):
            files = (tmp_path / f"out{w}" / name / f"seed_{seed}" / "predictions.csv" for w in (1, 2))
            assert len({path.read_text() for path in files}) == 1
    # Each run's lines come whole, under its header, in either mode (workers: in the order they end).
    for lines in logged.values():
        headers = [i for i, line in enumerate(lines) if line.startswith("MIL on ")]
        assert sorted(lines[i] for i in headers) == ["MIL on a:", "MIL on b:"] and headers[0] == 0
        assert all(line.startswith("  ") for i, line in enumerate(lines) if i not in headers)
    assert sorted(logged[1]) == sorted(logged[2])


@pytest.mark.slow  # ~6 s: two spawned processes import torch
def test_a_bad_folder_in_a_worker_is_the_callers_user_error(tmp_path):
    from histodistill.errors import UserError

    features, labels, _ = planted_features(tmp_path, n_cases=12)
    (tmp_path / "empty").mkdir()
    config = CVConfig(folds=2, train=TrainConfig(epochs=1, device="cpu"))
    with pytest.raises(UserError, match="empty"):
        cross_validate_many(
            {"a": features, "empty": tmp_path / "empty"},
            labels,
            tmp_path / "out",
            config,
            workers=2,
            log=print,
        )


def test_workers_default_to_the_usable_cores_on_a_cpu_and_one_on_a_gpu(monkeypatch):
    import torch

    import histodistill.distributed

    monkeypatch.setattr(histodistill.distributed, "usable_cpus", lambda: 6)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert mil_workers("cpu") == mil_workers("auto") == 6
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert mil_workers("cuda") == mil_workers("cuda:1") == mil_workers("auto") == 1

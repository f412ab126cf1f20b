"""The MAE linear probe on images: fresh augmentation per epoch, a frozen encoder, seeded, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from histodistill.cli import main
from histodistill.eval.image_probe import ImageProbeData, eval_features, mae_image_probe, open_image_folders
from histodistill.eval.probe import mae_batch_orders
from histodistill.models.backbones import seeded_backbone

COLOURS = {"blue": (40, 60, 200), "red": (200, 50, 60)}


def _colour_folder(root, per_class, seed):
    """``root/<colour>/<i>.png``: 32-px noisy images of two colours, a task any random CNN's features
    separate."""
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def folders(tmp_path):
    return _colour_folder(tmp_path / "train", 3, seed=0), _colour_folder(tmp_path / "test", 2, seed=1)


@pytest.fixture
def data(folders, one_torch_thread):
    train, test = open_image_folders(*folders)
    return ImageProbeData(
        seeded_backbone("tiny/resnet18-64", None, pretrained=False), train, test, torch.device("cpu")
    )


def _probe(data, seed=0, epochs=2, batch_size=6):
    _, test = eval_features(data)
    return mae_image_probe(
        data, test.features, test.labels, seed, epochs=epochs, warmup_epochs=1, batch_size=batch_size
    )


def test_training_images_are_augmented_afresh_every_epoch_and_the_eval_path_is_deterministic(data):
    seen = []
    forward = data.backbone.forward
    data.backbone.forward = lambda images: seen.append(images.clone()) or forward(images)
    first, second = eval_features(data), eval_features(data)
    np.testing.assert_array_equal(first[0].features, second[0].features)
    np.testing.assert_array_equal(first[1].features, second[1].features)
    # (6, 3, 64, 64): the 6 training images, resized and centre-cropped, in folder order
    eval_inputs = seen[0]
    seen.clear()
    # One step per epoch, holding every training image.
    mae_image_probe(data, first[1].features, first[1].labels, seed=0, epochs=2, warmup_epochs=1, batch_size=6)
    assert len(seen) == 2
    orders = mae_batch_orders(6, 6, 2, seed=0)  # (1, 6) per epoch: which image each row of the batch is
    epoch_0 = seen[0][orders[0][0].argsort()]  # rows back in folder order
    epoch_1 = seen[1][orders[1][0].argsort()]
    for image in range(6):
        assert not torch.equal(epoch_0[image], epoch_1[image])  # a new crop/flip every epoch
        assert not torch.equal(epoch_0[image], eval_inputs[image])  # and not the eval view


def test_the_encoder_weights_and_batchnorm_statistics_do_not_change(data):
    before = {name: tensor.clone() for name, tensor in data.backbone.state_dict().items()}
    assert any("running_mean" in name for name in before)  # a CNN with BatchNorm: train mode would move these
    _probe(data, epochs=2, batch_size=3)
    after = data.backbone.state_dict()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name
    assert all(p.grad is None for p in data.backbone.parameters())  # features were taken without gradients


def test_a_seed_gives_the_same_metrics_and_another_seed_other_probabilities(data):
    first, again, other = _probe(data, seed=0), _probe(data, seed=0), _probe(data, seed=1)
    np.testing.assert_array_equal(first.probs, again.probs)
    assert first.metrics == again.metrics
    assert not np.array_equal(first.probs, other.probs)


def test_dataloader_workers_do_not_change_the_metrics(data):
    # Each image's draws are seeded by (seed, epoch, image), not by which process reads it.
    in_main = _probe(data, epochs=2)
    data.num_workers = 1
    np.testing.assert_array_equal(in_main.probs, _probe(data, epochs=2).probs)


def test_two_colour_classes_are_learnt(data):
    result = _probe(data, epochs=9, batch_size=3)
    assert result.metrics["accuracy"] == 1.0


def test_cli_writes_probe_json_for_image_folders(folders, tmp_path, one_torch_thread):
    train, test = folders
    argv = [
        "probe",
        "--train-images",
        str(train),
        "--test-images",
        str(test),
        "--model",
        "tiny/resnet18-64",
        "--random-init",
        "--linear-protocol",
        "mae",
        "--epochs",
        "3",
        "--batch-size",
        "3",
        "--seeds",
        "0",
        "--k",
        "3",
        "--workers",
        "0",
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(argv) == 0
    results = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert results["classes"] == ["blue", "red"] and results["linear_protocol"] == "mae"
    assert results["options"]["linear"] == {"epochs": 3, "batch_size": 3, "warmup_epochs": 0}
    assert (
        results["images"]["train_transform"] == "linprobe" and results["images"]["weights_source"] == "random"
    )
    assert {"linear", "knn"} <= results.keys() and len(results["linear"]["runs"]) == 1
    assert (tmp_path / "out" / "confusion_linear.png").is_file()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--test-images": "missing"}, "does not exist"),
        ({"--linear-protocol": "sklearn"}, "add --linear-protocol mae"),
        ({"--model": "resnet-eighteen"}, "unknown model"),
    ],
)
def test_cli_bad_image_inputs_are_one_error_line(folders, tmp_path, capsys, change, message):
    train, test = folders
    options = {
        "--train-images": str(train),
        "--test-images": str(test),
        "--model": "tiny/resnet18-64",
        "--linear-protocol": "mae",
    }
    options.update(
        {key: str(tmp_path / value) if value == "missing" else value for key, value in change.items()}
    )
    argv = [
        "probe",
        *[part for pair in options.items() for part in pair],
        "--random-init",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0]
    assert not (tmp_path / "o").exists()


def test_mae_training_options_need_the_mae_protocol(tmp_path, capsys):
    assert main(["probe", "--features", str(tmp_path), "--epochs", "5", "--out", str(tmp_path / "o")]) == 2
    assert (
        "--epochs set the MAE linear probe's training: add --linear-protocol mae" in capsys.readouterr().err
    )


def test_non_finite_features_of_augmented_images_stop_the_run(data):
    from histodistill.errors import UserError

    _, test = eval_features(data)
    data.backbone.forward = lambda images: torch.full((len(images), 512), float("nan"))
    with pytest.raises(UserError, match="non-finite features .* augmented images of"):
        mae_image_probe(data, test.features, test.labels, epochs=1, warmup_epochs=0, batch_size=3)


@pytest.mark.parametrize("flags", [["--device", "cpu"], ["--workers", "0"], ["--model", "tiny/resnet18-64"]])
def test_image_only_options_with_features_are_refused_not_ignored(tmp_path, capsys, flags):
    assert main(["probe", "--features", str(tmp_path), *flags, "--out", str(tmp_path / "o")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and flags[0] in errors[0] and "--train-images" in errors[0]

"""`histodistill fit` end to end on tiny data: the run directory, exact resume, the stop on a NaN loss."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from histodistill.cli import main
from histodistill.methods.supervised import Supervised

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "supervised" / "tiny_cpu.yaml"


class NanAtStep(Supervised):
    """Supervised, but the loss turns NaN from optimiser step ``nan_step`` on."""

    def __init__(self, nan_step: int = 3, **kwargs) -> None:
        super().__init__(**kwargs)
        self.nan_step = nan_step

    def objective(self, batch):
        losses = super().objective(batch)
        if self.global_step >= self.nan_step:
            losses["loss"] = losses["loss"] * float("nan")
        return losses


class StopAfterFirstEpoch(L.Callback):
    """Ends fitting after epoch 0, as an interrupted job would (its last.ckpt is already written)."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        trainer.should_stop = True


def fit(run_dir: Path, data: Path, *extra: str) -> int:
    """`histodistill fit` of the tiny supervised config on ``data``: 2 classes x 4 images, batch 4."""
    return main(
        [
            "fit",
            "--config",
            str(TINY),
            "--trainer.default_root_dir",
            str(run_dir),
            "--data.init_args.train.init_args.root",
            str(data / "train"),
            "--data.init_args.val.init_args.root",
            str(data / "val"),
            "--data.init_args.batch_size",
            "4",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.enable_model_summary",
            "false",
            *extra,
        ]
    )


@pytest.fixture
def two_class_data(tmp_path) -> Path:
    from conftest import make_image_folder

    make_image_folder(tmp_path / "data" / "train", classes=("a", "b"), per_class=4, size=16, seed=0)
    make_image_folder(tmp_path / "data" / "val", classes=("a", "b"), per_class=2, size=16, seed=1)
    return tmp_path / "data"


def state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]


def test_fit_writes_the_run_directory(tmp_path, two_class_data):
    run = tmp_path / "run"
    assert fit(run, two_class_data, "--model.init_args.num_classes", "2", "--trainer.max_epochs", "1") == 0
    for name in (
        "config.yaml",
        "metrics.csv",
        "metrics.json",
        "checkpoints/last.ckpt",
        "checkpoints/best-accuracy.ckpt",
        "checkpoints/best-macro_f1.ckpt",
        "figures/val_confusion.png",
    ):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    import json

    summary = json.loads((run / "metrics.json").read_text())
    assert summary["global_step"] == 2  # 8 images / batch 4, one epoch
    assert set(summary["best"]) == {"val/accuracy", "val/macro_f1"}
    assert 0.0 <= summary["final"]["val/accuracy"] <= 1.0
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["histodistill_backbone"]["state_dict_prefix"] == "backbone.model."
    # Issue 29 (disk use): last.ckpt resumes (optimiser state); a best checkpoint is weights and our backbone
    # record only, so it loads as a backbone yet is a fraction of last.ckpt's size.
    assert "optimizer_states" in checkpoint
    best = torch.load(run / "checkpoints" / "best-accuracy.ckpt", map_location="cpu", weights_only=True)
    assert (
        "optimizer_states" not in best
        and best["histodistill_backbone"] == checkpoint["histodistill_backbone"]
    )
    assert (run / "checkpoints" / "best-accuracy.ckpt").stat().st_size < 0.6 * (
        run / "checkpoints" / "last.ckpt"
    ).stat().st_size
    from histodistill.models.backbones import create_backbone

    create_backbone(run / "checkpoints" / "best-accuracy.ckpt")
    # The saved config reproduces the run: it names the overridden data and leaves out --resume/--overwrite.
    config = (run / "config.yaml").read_text()
    assert str(two_class_data / "train") in config and "resume" not in config
    # Resuming the finished run trains nothing and keeps what it wrote (it used to empty metrics.json's final
    # and rewrite its best values, which the demo reads).
    written = {name: (run / name).read_bytes() for name in ("metrics.json", "checkpoints/best-accuracy.ckpt")}
    assert (
        fit(
            run, two_class_data, "--model.init_args.num_classes", "2", "--trainer.max_epochs", "1", "--resume"
        )
        == 0
    )
    for name, content in written.items():
        assert (run / name).read_bytes() == content, name
    # A second fresh run into the same directory is refused rather than silently mixed in.
    assert fit(run, two_class_data, "--model.init_args.num_classes", "2") == 2


@pytest.mark.slow
def test_resumed_run_ends_with_the_same_weights(tmp_path, two_class_data):
    common = (
        "--model.init_args.num_classes",
        "2",
        "--trainer.max_epochs",
        "2",
        "--trainer.limit_val_batches",
        "0",
    )
    assert fit(tmp_path / "straight", two_class_data, *common) == 0
    interrupted = tmp_path / "interrupted"
    stop = "--trainer.callbacks+=test_fit.StopAfterFirstEpoch"
    assert fit(interrupted, two_class_data, *common, stop) == 0
    # one epoch
    assert torch.load(interrupted / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert fit(interrupted, two_class_data, *common, "--resume") == 0
    expected = state_dict(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    resumed = state_dict(interrupted / "checkpoints" / "last.ckpt")
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name


def test_nan_loss_stops_with_a_user_error_and_keeps_the_last_good_checkpoint(
    tmp_path, two_class_data, capsys
):
    run = tmp_path / "run"
    code = fit(
        run,
        two_class_data,
        "--model",
        "test_fit.NanAtStep",
        "--model.init_args.num_classes",
        "2",
        "--model.init_args.nan_step",
        "2",
        "--trainer.max_epochs",
        "2",
        "--trainer.limit_val_batches",
        "0",
    )
    assert code == 2
    error = capsys.readouterr().err
    assert "non-finite at step 2" in error and "Traceback" not in error
    assert f"({run / 'checkpoints' / 'last.ckpt'}) are from before this step" in error
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 2  # written at the end of epoch 0, before the bad step
    assert all(
        torch.isfinite(value).all()
        for value in checkpoint["state_dict"].values()
        if value.is_floating_point()
    )


def test_an_overflowing_optimiser_step_ends_like_a_nan_loss(tmp_path, two_class_data, capsys):
    # Adam's step size lr / (1 - beta1) no longer fits in a float32: torch raises inside optimizer.step().
    code = fit(
        tmp_path / "run",
        two_class_data,
        "--model.init_args.num_classes",
        "2",
        "--model.init_args.optim.lr",
        "1e38",
        "--model.init_args.optim.warmup_epochs",
        "0",
    )
    assert code == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error and [
        line[:42] for line in error.splitlines() if line.startswith("error:")
    ] == ["error: the optimiser step overflowed at st"]
    assert "No checkpoint was written before this step" in error
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def test_resume_without_a_checkpoint_is_a_user_error(tmp_path, two_class_data, capsys):
    assert fit(tmp_path / "empty", two_class_data, "--resume") == 2
    error = capsys.readouterr().err
    assert "error: --resume: " in error and "last.ckpt does not exist; run without --resume" in error


@pytest.mark.parametrize(
    ("option", "value", "problem"),
    [
        ("--model.init_args.label_smoothing", "1.5", "must be in [0, 1)"),  # the module's own argument
        ("--model.init_args.optim.lr", "-1.0", "must be > 0"),  # a nested config (OptimConfig)
    ],
)
def test_a_bad_config_value_is_one_line_naming_its_key(
    tmp_path, two_class_data, capsys, option, value, problem
):
    # Issue 31: a ConfigError raised while the module is built names the parameter (`lr=-1.0`); fit shows its
    # key.
    assert fit(tmp_path / "run", two_class_data, "--model.init_args.num_classes", "2", option, value) == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error
    assert [line for line in error.splitlines() if line.startswith("error:")] == [
        f"error: {option} {value}: {problem}"
    ]


def test_fit_help_lists_the_run_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--resume" in out and "--overwrite" in out and "--trainer.default_root_dir" in out


def test_a_tiny_recipe_without_its_data_names_the_command_that_makes_it(tmp_path, capsys, monkeypatch):
    # Issue 29: from a fresh folder the tiny recipe's demo_out/data/nuclei/train does not exist; the error
    # names the samples subcommand that writes it.
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(TINY), "--trainer.default_root_dir", str(tmp_path / "run")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error: " in line]
    assert errors == [
        "error: image folder demo_out/data/nuclei/train does not exist: pass a folder with one "
        "subfolder per class (root/<class>/<image>); `histodistill samples make-nuclei --out "
        "demo_out/data/nuclei` writes the sample nuclei task there"
    ]


def test_a_full_disk_while_saving_a_checkpoint_is_one_line(tmp_path, two_class_data, capsys, monkeypatch):
    # torch.save reports a full disk as RuntimeError "... file write failed" (issue 29: every command that
    # writes).
    from histodistill.engine import callbacks

    def full_disk(obj, path):
        raise RuntimeError(
            "[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
            "data/3: file write failed"
        )

    monkeypatch.setattr(callbacks.torch, "save", full_disk)
    assert (
        fit(
            tmp_path / "run",
            two_class_data,
            "--model.init_args.num_classes",
            "2",
            "--trainer.max_epochs",
            "1",
        )
        == 2
    )
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error: " in line]
    assert "Traceback" not in err and len(errors) == 1, err[-2000:]
    assert errors[0].startswith(
        f"error: no space left on the disk to write {tmp_path / 'run' / 'checkpoints'}"
    )
    assert "this run needs about" in errors[0] and "add --resume" in errors[0]
    assert not list((tmp_path / "run" / "checkpoints").glob("*.ckpt"))

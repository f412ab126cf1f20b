"""`histodistill extract` and `fit` weights: pretrained by default (here from a local stand-in of the Hugging
Face cache), one error line when they cannot be had, random only with --random-init and then said and
recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from histodistill.cli import main
from histodistill.commands import extract as extract_command
from histodistill.wsi.tiling import tile_slide

# timm's smallest architecture with published weights, and the hub repository timm loads them from.
NAME, HUB_ID = "test_resnet", "timm/test_resnet.r160_in1k"
TINY = Path(__file__).resolve().parents[2] / "configs" / "supervised" / "tiny_cpu.yaml"


@pytest.fixture
def tiles(tiny_slide, tmp_path):
    out = tmp_path / "tiles"
    tile_slide(tiny_slide.path, out, target_mpp=2.0, patch_size=32)
    return out


def _extract(tiles, out, *extra):
    return main(
        ["extract", "--model", NAME, "--coords", str(tiles), "--out", str(out), "--workers", "0", *extra]
    )


def _record(out, folder=f"features_{NAME}"):
    return json.loads((out / folder / "extractor.json").read_text())


def test_pretrained_weights_are_the_default(tiles, tmp_path, fake_hf_cache):
    torch.manual_seed(7)
    save_file(timm.create_model(NAME).state_dict(), tmp_path / "model.safetensors")
    fake_hf_cache(HUB_ID, {"model.safetensors": tmp_path / "model.safetensors"})
    assert _extract(tiles, tmp_path / "f") == 0
    assert _record(tmp_path / "f")["weights_source"] == f"timm:{HUB_ID}"


def test_unavailable_weights_are_one_error_line_before_any_work(tiles, tmp_path, fake_hf_cache, capsys):
    assert _extract(tiles, tmp_path / "f") == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and NAME in lines[0]
    assert "--random-init" in lines[0] and "--weights FILE" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "f").exists()


def test_random_init_is_said_and_recorded(tiles, tmp_path, capsys):
    assert _extract(tiles, tmp_path / "f", "--random-init") == 0
    assert "random initialisation" in capsys.readouterr().err
    record = _record(tmp_path / "f", f"features_{NAME}-random-init")
    assert record["weights_source"] == "random" and record["spec"]["source"] == "random"


def test_random_init_and_a_weights_file_contradict(tiles, tmp_path, capsys):
    assert _extract(tiles, tmp_path / "f", "--random-init", "--weights", str(tmp_path / "w.pth")) == 2
    assert "--random-init and --weights" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("cpus", "workers"), [({0, 1}, 2), (set(range(64)), extract_command.MAX_DEFAULT_WORKERS)]
)
def test_default_workers_are_the_cpus_available_capped(monkeypatch, cpus, workers):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: cpus, raising=False)
    assert extract_command.default_workers() == workers


def test_fit_recipe_with_an_imagenet_start_it_cannot_get_stops_with_one_line(tmp_path, fake_hf_cache, capsys):
    from conftest import make_image_folder

    data = tmp_path / "data"
    make_image_folder(data / "train", classes=("a", "b"), per_class=2, size=16)
    code = main(
        [
            "fit",
            "--config",
            str(TINY),
            "--model.init_args.pretrained",
            "true",
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
            "--data.init_args.train.init_args.root",
            str(data / "train"),
            "--data.init_args.val.init_args.root",
            str(data / "train"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert (
        len(errors) == 1
        and "'tiny/resnet18-64'" in errors[0]
        and "--model.init_args.pretrained False" in errors[0]
    )
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_random_init_of_a_checkpoint_is_refused_not_ignored(tiles, tmp_path, capsys):
    checkpoint = tmp_path / "last.ckpt"
    checkpoint.write_bytes(b"")
    assert (
        main(
            [
                "extract",
                "--model",
                str(checkpoint),
                "--random-init",
                "--coords",
                str(tiles),
                "--out",
                str(tmp_path / "f"),
            ]
        )
        == 2
    )
    assert "carries its own weights" in capsys.readouterr().err

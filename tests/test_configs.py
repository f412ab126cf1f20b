"""Every shipped YAML recipe parses and builds its model and data module; every ``*tiny*`` one trains.

Configs are found automatically (configs/**/*.yaml). Their data paths are pointed at generated tiny
data by dataset class: `TINY_DATA` maps a dataset class name to a function that writes tiny data
under a folder and returns the ``init_args`` to use instead. A config using a dataset class not in
the map fails with a message saying to add it here (see docs/training.md, "Configs and tests").
Data-module arguments that are paths (``tiles_dir``) are rewritten by name through `TINY_PATHS`.
Hub downloads are switched off: every ``pretrained``/``teacher_pretrained`` key becomes false (each
config states it: the default is pretrained; ``student_init: imagenet`` becomes ``random``), and checkpoints
of earlier runs (``*.ckpt`` values under ``model``, e.g. teachers) become a randomly initialised supervised
checkpoint of the student's architecture, except a ``backbone`` that is a run's checkpoint (fine-tuning
a pretrained encoder): that becomes an untrained checkpoint of the shipped config writing that run, and weight
files (``.bin``, ``.pth``, ``.pt``, ``.safetensors``) become null.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import yaml

from conftest import make_image_folder
from histodistill.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def _classes(num_classes: int) -> tuple[str, ...]:
    return tuple(f"class{i}" for i in range(num_classes))


def tiny_image_folder(folder: Path, init_args: dict, num_classes: int) -> dict:
    make_image_folder(folder, classes=_classes(num_classes), per_class=4, size=16)
    return {**init_args, "root": str(folder)}


def tiny_csv(folder: Path, init_args: dict, num_classes: int) -> dict:
    names = _classes(num_classes)
    make_image_folder(folder, classes=names, per_class=4, size=16)
    rows = ["path,label"] + [f"{name}/{i}.png,{name}" for name in names for i in range(4)]
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return {
        **{k: v for k, v in init_args.items() if k not in ("root", "split")},
        "csv": str(folder / "manifest.csv"),
    }


def tiny_hdf5(folder: Path, init_args: dict, num_classes: int) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    n = 4 * num_classes
    with h5py.File(folder / "x.h5", "w") as handle:
        handle["x"] = np.random.default_rng(0).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    with h5py.File(folder / "y.h5", "w") as handle:
        handle["y"] = (np.arange(n) % num_classes).astype(np.uint8).reshape(n, 1, 1, 1)
    return {
        **init_args,
        "x_path": str(folder / "x.h5"),
        "y_path": str(folder / "y.h5"),
        "x_key": "x",
        "y_key": "y",
    }


def tiny_tiles(folder: Path) -> str:
    """A tiling output (``<folder>/patches/*.h5``) of one small synthetic slide, 64-px tiles at 0.5 mpp."""
    from conftest import make_tissue_image
    from histodistill.wsi.tiff_writer import write_pyramid_tiff
    from histodistill.wsi.tiling import tile_slide

    slide = write_pyramid_tiff(
        folder / "slide.tif", make_tissue_image(512, 384, ((0, 0, 448, 320),)), mpp=0.5, tile=128
    )
    tile_slide(slide, folder, target_mpp=0.5, patch_size=64)
    return str(folder)


# Data-module arguments that are paths to data rather than dataset specs: name -> writer(folder) -> value.
TINY_PATHS: dict[str, Callable[[Path], Any]] = {"tiles_dir": tiny_tiles}

# Dataset class name -> writer of tiny data (folder, original init_args, num_classes) -> new init_args.
TINY_DATA: dict[str, Callable[[Path, dict, int], dict]] = {
    "ImageFolderDataset": tiny_image_folder,
    "CsvDataset": tiny_csv,
    "HDF5ArrayDataset": tiny_hdf5,
}


def point_at_tiny_data(node: Any, folder: Path, num_classes: int) -> Any:
    """Replace the init_args of every dataset spec under ``node`` with tiny generated data."""
    if isinstance(node, list):
        return [point_at_tiny_data(item, folder / str(i), num_classes) for i, item in enumerate(node)]
    if not isinstance(node, dict):
        return node
    name = str(node.get("class_path", "")).rsplit(".", 1)[-1]
    if name.endswith("Dataset") and not _holds_a_spec(node.get("init_args", {})):  # wrappers: recurse below
        if name not in TINY_DATA:
            pytest.fail(
                f"no tiny data for dataset class {name}: add a writer to TINY_DATA in tests/test_configs.py"
            )
        return {**node, "init_args": TINY_DATA[name](folder, node.get("init_args", {}), num_classes)}
    return {
        key: TINY_PATHS[key](folder / key)
        if key in TINY_PATHS
        else point_at_tiny_data(value, folder / key, num_classes)
        for key, value in node.items()
    }


def _holds_a_spec(node: Any) -> bool:
    if isinstance(node, dict):
        return "class_path" in node or any(_holds_a_spec(value) for value in node.values())
    return isinstance(node, list) and any(_holds_a_spec(item) for item in node)


WEIGHT_FILES = (".bin", ".pth", ".pt", ".safetensors")
PRETRAINED_KEYS = ("pretrained", "teacher_pretrained")
WEIGHTS_FLAG = {
    "weights": "pretrained",
    "student_weights": "pretrained",
    "teacher_weights": "teacher_pretrained",
}


def no_downloads(node: Any, stand_in: str) -> Any:
    """``pretrained`` keys become false; checkpoints of earlier runs (``*.ckpt``, e.g. a teacher) become
    ``stand_in`` (a checkpoint of the student's architecture, randomly initialised)."""
    if isinstance(node, dict):
        if node.get("student_init") == "imagenet":
            node = {**node, "student_init": "random"}
        node = {
            key: False if key in PRETRAINED_KEYS else no_downloads(value, stand_in)
            for key, value in node.items()
        }
        # A weights file turned null leaves a name, which would now load its published weights: say random.
        return node | {flag: False for key, flag in WEIGHTS_FLAG.items() if key in node and node[key] is None}
    if isinstance(node, list):
        return [no_downloads(item, stand_in) for item in node]
    if isinstance(node, str) and node.endswith(".ckpt"):
        return str(stand_in)
    if isinstance(node, str) and node.endswith(WEIGHT_FILES):
        return None  # a published model's weights file: build it randomly initialised instead
    return node


def stand_in_checkpoint(folder: Path, backbone: str, num_classes: int) -> Path:
    """A histodistill checkpoint of a randomly initialised supervised ``backbone`` classifier."""
    import torch

    from histodistill.methods.base import CHECKPOINT_BACKBONE_KEY, backbone_record
    from histodistill.methods.supervised import Supervised

    model = Supervised(backbone=backbone, num_classes=num_classes, pretrained=False)
    path = folder / "stand_in.ckpt"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), CHECKPOINT_BACKBONE_KEY: backbone_record(model)}, path)
    return path


def stand_in_pretraining(checkpoint: str, folder: Path) -> Path:
    """An untrained checkpoint of the shipped config whose run directory holds ``checkpoint``
    (``runs/<name>/checkpoints/last.ckpt`` is written by the config with ``default_root_dir:
    runs/<name>``)."""
    import torch

    from histodistill.engine.cli import HistodistillCLI
    from histodistill.methods.base import CHECKPOINT_BACKBONE_KEY, backbone_record

    run = str(Path(checkpoint).parents[1])
    sources = [
        p for p in CONFIGS if yaml.safe_load(p.read_text()).get("trainer", {}).get("default_root_dir") == run
    ]
    if not sources:
        pytest.fail(
            f"backbone {checkpoint}: no shipped config writes {run}; point it at a config's run directory"
        )
    cli = HistodistillCLI(
        [
            "--config",
            str(tiny_version(sources[0], folder)),
            "--trainer.accelerator",
            "cpu",
            "--trainer.default_root_dir",
            str(folder / "run"),
        ]
    )
    path = folder / "pretrained.ckpt"
    torch.save(
        {"state_dict": cli.model.state_dict(), CHECKPOINT_BACKBONE_KEY: backbone_record(cli.model)}, path
    )
    return path


def tiny_version(config_path: Path, tmp_path: Path) -> Path:
    config = yaml.safe_load(config_path.read_text())
    num_classes = int(config.get("model", {}).get("init_args", {}).get("num_classes", 3))
    config["data"] = point_at_tiny_data(config["data"], tmp_path / "data", num_classes)
    model_args = config["model"].get("init_args", {})
    if str(model_args.get("backbone", "")).endswith(".ckpt"):
        model_args["backbone"] = str(stand_in_pretraining(model_args["backbone"], tmp_path / "pretraining"))
    if ".ckpt" in yaml.safe_dump(config["model"]):
        stand_in = stand_in_checkpoint(tmp_path / "stand_in", model_args["backbone"], num_classes)
        config["model"] = no_downloads(config["model"], stand_in)
    else:
        config["model"] = no_downloads(config["model"], "")
    out = tmp_path / config_path.name
    out.write_text(yaml.safe_dump(config))
    return out


def test_configs_are_found():
    assert ROOT / "configs" / "supervised" / "tiny_cpu.yaml" in CONFIGS


@pytest.mark.parametrize("config_path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_states_pretrained_or_random(config_path):
    """Weights are pretrained by default; a recipe says which start it means wherever its class has the
    choice."""
    import importlib
    import inspect

    config = yaml.safe_load(config_path.read_text())
    unstated = []
    for section in ("model", "data"):
        spec = config.get(section, {})
        module, _, name = spec["class_path"].rpartition(".")
        parameters = inspect.signature(getattr(importlib.import_module(module), name)).parameters
        init_args = spec.get("init_args", {})
        for key in PRETRAINED_KEYS:
            named = init_args.get(
                "teacher" if key == "teacher_pretrained" else "backbone", init_args.get("student")
            )
            # a file wins
            local = init_args.get("teacher_weights" if key == "teacher_pretrained" else "weights")
            if (
                key in parameters
                and named
                and not str(named).endswith(".ckpt")
                and not local
                and key not in init_args
            ):
                unstated.append(f"{section}.init_args.{key}")
    assert unstated == []


@pytest.mark.parametrize("config_path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_builds_model_and_data(config_path, tmp_path):
    from histodistill.engine.cli import HistodistillCLI

    cli = HistodistillCLI(
        [
            "--config",
            str(tiny_version(config_path, tmp_path)),
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            "1",
            "--trainer.precision",
            "32",
        ]
    )
    import lightning as L

    from histodistill.methods.base import MethodModule

    assert isinstance(cli.model, MethodModule) and isinstance(cli.datamodule, L.LightningDataModule)


@pytest.mark.parametrize(
    "config_path",
    [p for p in CONFIGS if "tiny" in p.stem],
    ids=lambda p: str(p.relative_to(ROOT / "configs")),
)
def test_tiny_config_trains_end_to_end(config_path, tmp_path):
    run = tmp_path / "run"
    code = main(
        [
            "fit",
            "--config",
            str(tiny_version(config_path, tmp_path)),
            "--trainer.default_root_dir",
            str(run),
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "2",
            "--trainer.limit_val_batches",
            "1",
            "--data.init_args.batch_size",
            "4",
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    assert code == 0
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "metrics.json").is_file()


# MoMA's comparison (trinhvg/MoMA scripts/run_comparison.sh: -c CE, -d KD, -b feature) where it runs the
# method, else RepDistiller's scripts/run_cifar_distill.sh (-a 0: no KD; CE weight -r 1 by default).
OFFICIAL_WEIGHTS = {
    "fitnet": (1, 1, 100),
    "cc": (1, 1, 0.02),
    "crd": (1, 1, 0.8),
    "at": (1, 1, 1000),
    "semckd": (1, 0, 50),
    "simkd": (0, 0, 1),
    "sp": (1, 0, 3000),
    "vid": (1, 0, 1),
    "rkd": (1, 0, 1),
    "pkt": (1, 0, 30000),
    "ft": (1, 0, 200),
    "nst": (1, 0, 50),
    "ab": (1, 0, 0),
    "fsp": (1, 0, 0),  # RepDistiller sets β = 0 for them after their init stage
}


@pytest.mark.parametrize(
    "config_path",
    [
        ROOT / "configs" / "moma" / "official_effnet_b0_512.yaml",
        *sorted((ROOT / "configs" / "kd").glob("effnet_b0_512_*.yaml")),
    ],
    ids=lambda p: p.stem,
)
def test_momas_recipes_train_as_its_official_scripts(config_path):
    # train_student_moma.py / train_student_comparison.py: SGD(lr 0.05, momentum 0.9, weight_decay 1e-4) over
    # every trainable parameter, adjust_learning_rate with --cosine (eta_min = lr · 0.1³, per epoch), 50
    # epochs, fp32; EfficientNet-B0 from efficientnet(): dropout 0.2 in the classifier, drop-connect 0.2, BN
    # 0.01 / 1e-3.
    config = yaml.safe_load(config_path.read_text())
    args = config["model"]["init_args"]
    optim = args["optim"]
    assert (optim["name"], optim["lr"], optim["momentum"], optim["weight_decay"]) == ("sgd", 0.05, 0.9, 1e-4)
    assert optim["weight_decay_on"] == "all" and optim["schedule"] == "cosine_epoch"
    assert optim["min_lr"] == pytest.approx(0.05 * 0.1**3) and config["trainer"]["max_epochs"] == 50
    assert config["trainer"]["precision"] == "32-true"
    assert args["classifier_dropout"] == 0.2
    assert {k: args["backbone_kwargs"][k] for k in ("drop_path_rate", "bn_momentum", "bn_eps")} == {
        "drop_path_rate": 0.2,
        "bn_momentum": 0.01,
        "bn_eps": 1e-3,
    }
    assert {k: args["teacher_kwargs"][k] for k in ("bn_momentum", "bn_eps")} == {
        "bn_momentum": 0.01,
        "bn_eps": 1e-3,
    }
    name = config_path.stem.rsplit("_", 1)[1]
    if name in OFFICIAL_WEIGHTS:
        assert (args["w_ce"], args["w_kd"], args["w_feature"]) == OFFICIAL_WEIGHTS[name]
    if name == "crd":
        assert args["feature_options"]["feat_dim"] == 512  # train_student_comparison.py --feat_dim default

"""`histodistill export`: a checkpoint's backbone becomes a timm model folder that timm loads by itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import timm
import torch

from histodistill.cli import main
from histodistill.features.export import export_checkpoint
from histodistill.models.backbones import CHECKPOINT_BACKBONE_KEY, create_backbone


@pytest.fixture
def checkpoint(tmp_path):
    """A Lightning-style checkpoint of a method whose backbone sits at ``backbone.model``."""
    torch.manual_seed(0)
    backbone = create_backbone("tiny/vit-tiny-p8-64", pretrained=False).eval()
    state = {f"backbone.model.{k}": v for k, v in backbone.model.state_dict().items()}
    state["head.weight"] = torch.randn(4, backbone.num_features)  # the method's own parts are not exported
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save(
        {
            "epoch": 1,
            "global_step": 10,
            "state_dict": state,
            CHECKPOINT_BACKBONE_KEY: {
                "spec": backbone.spec.to_dict(),
                "state_dict_prefix": "backbone.model.",
            },
        },
        path,
    )
    return path, backbone


# Runs in a fresh interpreter that cannot import histodistill: the export must stand on timm alone.
STANDALONE = """
import sys, importlib.abc
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "histodistill":
            raise ImportError("histodistill is not installed here")
sys.meta_path.insert(0, Refuse())
import timm, torch
model = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
config = timm.data.resolve_data_config({}, model=model)
with torch.no_grad():
    out = model(torch.load(sys.argv[2]))
torch.save({"features": out, "input_size": config["input_size"], "mean": config["mean"],
            "crop_pct": config["crop_pct"]}, sys.argv[3])
"""


def test_export_writes_a_timm_config(tmp_path, checkpoint):
    path, backbone = checkpoint
    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(path), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["num_classes"] == 0
    assert config["num_features"] == 192
    assert config["model_args"] == {"patch_size": 8, "img_size": 64, "num_classes": 0}
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, 64, 64] and cfg["crop_pct"] == 1.0 and cfg["crop_mode"] == "center"
    assert cfg["mean"] == [0.485, 0.456, 0.406] and cfg["std"] == [0.229, 0.224, 0.225]
    assert "hf_hub_id" not in cfg and "url" not in cfg  # the base architecture's weights are not these
    ours = config["histodistill"]
    assert ours["preprocess"]["mpp"] == 0.5 and ours["source"] == "checkpoint:last.ckpt"

    # The directory is itself a model for create_backbone / extract.
    x = torch.randn(2, 3, 64, 64)
    reloaded = create_backbone(out).eval()
    torch.testing.assert_close(reloaded(x), backbone(x))
    assert reloaded.spec.source == "export:exported" and reloaded.spec.preprocess == backbone.spec.preprocess


def test_timm_alone_loads_the_export_without_histodistill(tmp_path, checkpoint):
    path, backbone = checkpoint
    out = tmp_path / "exported"
    export_checkpoint(path, out)
    x = torch.randn(2, 3, 64, 64)
    torch.save(x, tmp_path / "x.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", STANDALONE, str(out), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    loaded = torch.load(tmp_path / "y.pt")
    torch.testing.assert_close(loaded["features"], backbone(x))
    assert tuple(loaded["input_size"]) == (3, 64, 64) and tuple(loaded["mean"]) == (0.485, 0.456, 0.406)
    assert loaded["crop_pct"] == 1.0


def test_an_uploaded_export_loads_from_the_hub_by_id(tmp_path, checkpoint, fake_hf_cache):
    path, backbone = checkpoint
    out = export_checkpoint(path, tmp_path / "exported")
    fake_hf_cache("lab/tiny-vit", {name: out / name for name in ("config.json", "model.safetensors")})
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(
        timm.create_model("hf-hub:lab/tiny-vit", pretrained=True).eval()(x), backbone(x)
    )
    hub = create_backbone("hf-hub:lab/tiny-vit").eval()
    torch.testing.assert_close(hub(x), backbone(x))
    assert hub.spec.source == "hf-hub:lab/tiny-vit" and hub.spec.preprocess.input_size == 64


def test_a_timm_model_folder_without_our_record_loads_through_timm(tmp_path, checkpoint):
    path, backbone = checkpoint
    out = export_checkpoint(path, tmp_path / "exported")
    config = json.loads((out / "config.json").read_text())
    del config["histodistill"]  # as a folder written by timm's push_to_hf_hub / save_for_hf
    (out / "config.json").write_text(json.dumps(config))
    x = torch.randn(1, 3, 64, 64)
    loaded = create_backbone(out).eval()
    torch.testing.assert_close(loaded(x), backbone(x))
    assert loaded.spec.timm_name == "vit_tiny_patch16_224" and loaded.spec.preprocess.input_size == 64


def test_model_card_has_recipe_data_metrics_and_licence(tmp_path, checkpoint):
    path, _ = checkpoint
    run = path.parent.parent
    (run / "config.yaml").write_text(
        "model:\n  class_path: histodistill.methods.moma.MoMA\ndata:\n  init_args:\n    root: data/nct_crc\n"
    )
    (run / "metrics.json").write_text(json.dumps({"final": {"val/accuracy": 0.91234}, "best": {}}))
    out = tmp_path / "exported"
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(path),
                "--out",
                str(out),
                "--model-card",
                "--license",
                "cc-by-nc-4.0",
            ]
        )
        == 0
    )
    card = (out / "README.md").read_text()
    assert "license: cc-by-nc-4.0" in card and "library_name: timm" in card
    assert (
        "histodistill.methods.moma.MoMA" in card
        and "data/nct_crc" in card
        and "| val/accuracy | 0.9123 |" in card
    )
    assert 'timm.create_model("local-dir:exported", pretrained=True)' in card


def test_model_card_says_what_it_could_not_find(tmp_path, checkpoint):
    path, _ = checkpoint
    out = export_checkpoint(path, tmp_path / "exported", model_card=True)
    card = (out / "README.md").read_text()
    assert card.count("Not recorded:") == 3 and "license: unknown" in card


def test_export_refuses_to_overwrite_and_other_files(tmp_path, checkpoint, capsys):
    path, _ = checkpoint
    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(path), "--out", str(out)]) == 0
    assert main(["export", "--checkpoint", str(path), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(path), "--out", str(out), "--overwrite"]) == 0
    assert main(["export", "--checkpoint", str(tmp_path / "weights.pth"), "--out", str(out)]) == 2
    assert ".ckpt" in capsys.readouterr().err

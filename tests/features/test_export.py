"""`histodistill export`: a checkpoint's backbone becomes weights that timm itself loads strictly."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from histodistill.cli import main
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
            CHECKPOINT_BACKBONE_KEY: {"spec": backbone.spec.to_dict(), "state_dict_prefix": "backbone.model."},
        },
        path,
    )
    return path, backbone


def test_export_loads_strictly_into_plain_timm(tmp_path, checkpoint):
    path, backbone = checkpoint
    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(path), "--out", str(out)]) == 0

    spec = json.loads((out / "backbone.json").read_text())
    assert spec["preprocess"] == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "input_size": 64, "mpp": 0.5}
    model = timm.create_model(spec["timm_name"], num_classes=0, **spec["model_kwargs"]).eval()
    model.load_state_dict(load_file(out / "model.safetensors"), strict=True)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model(x), backbone(x))

    # The directory is itself a model for create_backbone / extract.
    reloaded = create_backbone(out).eval()
    torch.testing.assert_close(reloaded(x), backbone(x))
    assert reloaded.spec.source == "export:exported"


def test_export_refuses_to_overwrite_and_other_files(tmp_path, checkpoint, capsys):
    path, _ = checkpoint
    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(path), "--out", str(out)]) == 0
    assert main(["export", "--checkpoint", str(path), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(path), "--out", str(out), "--overwrite"]) == 0
    assert main(["export", "--checkpoint", str(tmp_path / "weights.pth"), "--out", str(out)]) == 2
    assert ".ckpt" in capsys.readouterr().err

"""Weight files as training scripts write them: read safely, or refused with one line that says how to fix
them."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from torch import nn

from histodistill.errors import UserError
from histodistill.models.weights import read_state_dict


def test_mae_style_checkpoint_with_argparse_namespace_loads(tmp_path):
    # facebookresearch/mae's misc.save_model: {'model', 'optimizer', 'epoch', 'scaler', 'args': Namespace}.
    model = nn.Linear(3, 2)
    args = argparse.Namespace(model="mae_vit_base_patch16", blr=1.5e-4, output_dir=Path("out"))
    torch.save(
        {"model": model.state_dict(), "optimizer": {}, "epoch": 399, "scaler": {}, "args": args},
        tmp_path / "checkpoint-399.pth",
    )
    state = read_state_dict(tmp_path / "checkpoint-399.pth")
    assert set(state) == {"weight", "bias"}
    torch.testing.assert_close(state["weight"], model.weight.detach())


def test_whole_pickled_model_is_refused_with_how_to_save_a_state_dict(tmp_path):
    torch.save(nn.Sequential(nn.Linear(3, 2)), tmp_path / "model.pth")
    with pytest.raises(UserError) as error:
        read_state_dict(tmp_path / "model.pth")
    message = str(error.value)
    assert "\n" not in message and "model.pth" in message
    assert "torch.nn.modules" in message and "only state dicts are loaded" in message
    assert "torch.save(model.state_dict()" in message

"""Pretrained weights by default, from the Hugging Face cache; a clear error, never random weights, when
they cannot be had. The hub is never reached: the cache is a local folder laid out like the real one."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from histodistill.errors import UserError
from histodistill.models.backbones import create_backbone

# timm's smallest architecture with published weights (0.4 M parameters), and where timm looks for them.
NAME, HUB_ID = "test_resnet", "timm/test_resnet.r160_in1k"


def _published_weights(tmp_path):
    """A stand-in for the hub's file: seeded weights that a random initialisation would not give."""
    torch.manual_seed(123)
    state = timm.create_model(NAME).state_dict()  # with the 1000-class head, as timm publishes it
    save_file(state, tmp_path / "model.safetensors")
    return state


def test_a_timm_name_loads_its_published_weights_by_default(tmp_path, fake_hf_cache):
    state = _published_weights(tmp_path)
    fake_hf_cache(HUB_ID, {"model.safetensors": tmp_path / "model.safetensors"})
    backbone = create_backbone(NAME)
    torch.testing.assert_close(backbone.model.conv1[0].weight, state["conv1.0.weight"])
    assert backbone.spec.source == f"timm:{HUB_ID}"


def test_missing_weights_offline_is_one_error_line_with_every_remedy(fake_hf_cache, capsys):
    with pytest.raises(UserError) as error:
        create_backbone(NAME)
    message = str(error.value)
    assert "\n" not in message and f"'{NAME}'" in message and HUB_ID in message
    for remedy in ("`weights=FILE`", "HF_HUB_OFFLINE", "HF_HOME", "`pretrained=False`"):
        assert remedy in message
    assert "random initialisation" not in capsys.readouterr().err  # nothing was built at random


def test_an_architecture_without_published_weights_is_not_silently_random():
    with pytest.raises(
        UserError, match="no pretrained weights for 'vit_giant_patch14_224'.*`pretrained=False`"
    ):
        create_backbone("vit_giant_patch14_224")


def test_random_weights_only_when_asked_and_said(capsys):
    backbone = create_backbone(NAME, pretrained=False)
    assert backbone.spec.source == "random"
    assert f"note: {NAME}: random initialisation" in capsys.readouterr().err


def test_a_local_file_needs_no_hub(tmp_path, capsys):
    state = _published_weights(tmp_path)
    # the hub would fail: offline, empty
    backbone = create_backbone(NAME, weights=tmp_path / "model.safetensors")
    torch.testing.assert_close(backbone.model.conv1[0].weight, state["conv1.0.weight"])
    assert backbone.spec.source == "weights:model.safetensors" and "random" not in capsys.readouterr().err


def test_gated_model_names_the_model_and_how_to_get_access(monkeypatch):
    from huggingface_hub.errors import GatedRepoError

    # What hf_hub_download raises for a gated repository without access (built without an HTTP response,
    # whose class depends on the huggingface_hub version).
    error = GatedRepoError.__new__(GatedRepoError)
    Exception.__init__(error, "401 Client Error: access to model MahmoodLab/UNI is restricted")

    def gated(*args, **kwargs):
        raise error

    monkeypatch.setattr(timm, "create_model", gated)
    with pytest.raises(
        UserError, match=r"'pathology/uni' from MahmoodLab/UNI: it is gated.*HF_TOKEN.*`weights=FILE`"
    ):
        create_backbone("pathology/uni")

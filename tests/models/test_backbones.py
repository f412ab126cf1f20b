"""The backbone registry: every entry builds and trains, weights load from every kind of source, and
nothing touches the network when random weights or a local file are asked for."""

from __future__ import annotations

import json
import socket
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from histodistill.errors import UserError
from histodistill.models.backbones import (
    CHECKPOINT_BACKBONE_KEY,
    BackboneEntry,
    BackboneSpec,
    Preprocess,
    create_backbone,
    list_backbones,
    random_like,
    register_backbone,
)
from histodistill.models.registry import Registry
from histodistill.optim.optimizer import OptimConfig

TINY = list_backbones("tiny")
# name -> (pooled dim, prefix tokens) from the model cards; every entry: tests/models/test_foundation.py
PATHOLOGY = {
    "pathology/uni": (1024, 1),
    "pathology/uni2-h": (1536, 9),
    "pathology/h-optimus-0": (1536, 5),
    "pathology/virchow2": (2560, 5),  # class token + mean patch token, 2 x 1280
}


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to open a connection is recorded and refused."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def test_registry_lists_the_promised_entries():
    assert set(TINY) == {
        "tiny/resnet18-64",
        "tiny/resnet34-64",
        "tiny/vit-tiny-p8-64",
        "tiny/efficientnet-b0-64",
    }
    assert set(PATHOLOGY) <= set(list_backbones("pathology"))


@pytest.mark.parametrize("name", TINY)
def test_tiny_backbone_shapes_finite_and_every_parameter_learns(name, no_network):
    torch.manual_seed(0)
    backbone = create_backbone(name, pretrained=False)
    size = backbone.spec.preprocess.input_size
    x = torch.randn(2, 3, size, size)
    pooled = backbone(x)
    assert pooled.shape == (2, backbone.num_features)
    assert torch.isfinite(pooled).all()
    features = backbone.forward_features(x)
    if backbone.feature_kind == "tokens":
        patches = (size // backbone.model.patch_embed.patch_size[0]) ** 2
        assert features.shape == (2, backbone.num_prefix_tokens + patches, backbone.num_features)
    else:
        assert features.ndim == 4 and features.shape[:2] == (2, backbone.num_features)
    pooled.square().mean().backward()
    # A zero gradient is legitimate (timm zero-initialises the last norm of each ResNet block); none is not.
    no_grad = [n for n, p in backbone.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    assert all(torch.isfinite(p.grad).all() for p in backbone.parameters())
    assert backbone.spec.source == "random" and not no_network


@pytest.mark.parametrize("name", sorted(PATHOLOGY))
def test_foundation_models_build_without_the_hub(name, no_network):
    # On the meta device: the real architecture and arguments, no memory and no weights.
    with torch.device("meta"):
        backbone = create_backbone(name, pretrained=False)
        pooled = backbone(torch.empty(1, 3, 224, 224))
    dim, prefix = PATHOLOGY[name]
    assert pooled.shape == (1, dim) and backbone.num_features == dim
    assert backbone.num_prefix_tokens == prefix and backbone.feature_kind == "tokens"
    assert backbone.spec.source == "random" and backbone.spec.preprocess.mpp == 0.5
    assert no_network == []


def test_spec_round_trips_through_json():
    spec = BackboneSpec(
        "pathology/uni2-h",
        "vit_giant_patch14_224",
        {"mlp_layer": "SwiGLUPacked", "reg_tokens": 8},
        Preprocess((0.1, 0.2, 0.3), (0.4, 0.5, 0.6), 224, 0.5),
        "random",
    )
    assert BackboneSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_timm_name_takes_preprocessing_from_timm_and_kwargs_change_input_size():
    # timm's pretrained_cfg
    assert create_backbone("vit_tiny_patch16_224", pretrained=False).spec.preprocess.input_size == 224
    backbone = create_backbone("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8)
    # A ViT built for 32 px accepts only 32 px: extraction must resize to what the model takes.
    size = backbone.spec.preprocess.input_size
    assert size == 32
    assert backbone(torch.randn(1, 3, size, size)).shape == (1, 192)
    assert (
        create_backbone("tiny/vit-tiny-p8-64", pretrained=False, img_size=32).spec.preprocess.input_size == 32
    )


def test_unknown_name_is_a_user_error_with_suggestions():
    with pytest.raises(UserError, match="Closest names: registered: tiny/resnet18-64"):
        create_backbone("resnet18-64")


def test_misspelt_name_suggests_the_closest_registered_and_timm_names():
    with pytest.raises(
        UserError, match=r"'resnet-18'.*registered: tiny/resnet18-64.*; timm: resnet18,"
    ) as error:
        create_backbone("resnet-18")
    assert "\n" not in str(error.value)


def _reference_and_input(name="tiny/resnet18-64"):
    torch.manual_seed(1)
    reference = create_backbone(name, pretrained=False).eval()
    return reference, torch.randn(2, 3, 64, 64)


def test_local_safetensors_weights_load_strictly(tmp_path):
    reference, x = _reference_and_input()
    save_file(reference.model.state_dict(), tmp_path / "w.safetensors")
    loaded = create_backbone("tiny/resnet18-64", weights=tmp_path / "w.safetensors").eval()
    torch.testing.assert_close(loaded(x), reference(x))
    assert loaded.spec.source == "weights:w.safetensors"


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_local_pth_with_wrapper_and_ddp_prefix_and_classifier(tmp_path, wrapper):
    reference, x = _reference_and_input()
    state = {f"module.{k}": v for k, v in reference.model.state_dict().items()}
    # A full ImageNet checkpoint carries the classifier our num_classes=0 model does not have.
    state["module.fc.weight"], state["module.fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    torch.save({wrapper: state, "epoch": 3}, tmp_path / "w.pth")
    loaded = create_backbone("tiny/resnet18-64", weights=tmp_path / "w.pth").eval()
    torch.testing.assert_close(loaded(x), reference(x))


def test_strict_load_lists_missing_and_unexpected_keys(tmp_path):
    state = create_backbone("tiny/resnet18-64", pretrained=False).model.state_dict()
    state.pop("conv1.weight")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(UserError, match=r"w\.pt.*1 missing: conv1\.weight.*1 unexpected: extra\.weight"):
        create_backbone("tiny/resnet18-64", weights=tmp_path / "w.pt")
    create_backbone("tiny/resnet18-64", weights=tmp_path / "w.pt", strict=False)  # tolerated when asked


def test_wrong_shapes_are_refused_even_non_strict(tmp_path):
    state = create_backbone("tiny/resnet18-64", pretrained=False).model.state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(UserError, match=r"conv1\.weight \(64, 3, 3, 3\) vs model \(64, 3, 7, 7\)"):
        create_backbone("tiny/resnet18-64", weights=tmp_path / "w.pt", strict=False)


def test_pickled_code_is_refused(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1)}, "evil": socket.socket}, tmp_path / "w.pth")
    with pytest.raises(UserError, match="socket.socket.*only state dicts are loaded"):
        create_backbone("tiny/resnet18-64", weights=tmp_path / "w.pth")


def test_our_checkpoint_rebuilds_its_backbone(tmp_path):
    reference, x = _reference_and_input("tiny/vit-tiny-p8-64")
    checkpoint = {
        "state_dict": {f"student.model.{k}": v for k, v in reference.model.state_dict().items()}
        | {"head.weight": torch.zeros(3, 192)},
        "hyper_parameters": {"optim": OptimConfig(lr=0.1)},  # our own dataclass: allowed
        CHECKPOINT_BACKBONE_KEY: {"spec": reference.spec.to_dict(), "state_dict_prefix": "student.model."},
    }
    torch.save(checkpoint, tmp_path / "last.ckpt")
    loaded = create_backbone(tmp_path / "last.ckpt").eval()
    torch.testing.assert_close(loaded(x[:1]), reference(x[:1]))
    assert loaded.spec.timm_name == "vit_tiny_patch16_224" and loaded.spec.source == "checkpoint:last.ckpt"


def test_random_like_keeps_the_spec_and_draws_new_weights(capsys):
    trained = create_backbone("tiny/vit-tiny-p8-64", pretrained=False)
    control = random_like(replace(trained.spec, source="checkpoint:last.ckpt"))
    assert control.spec == trained.spec and control.spec.preprocess.input_size == 64  # source "random" again
    # built for 64 px, as the spec
    assert control(torch.zeros(1, 3, 64, 64)).shape == (
        1,
        trained.num_features,
    )
    assert not torch.equal(control.model.patch_embed.proj.weight, trained.model.patch_embed.proj.weight)
    assert "tiny/vit-tiny-p8-64: random initialisation" in capsys.readouterr().err


def test_checkpoint_without_record_is_explained(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(UserError, match="not a histodistill checkpoint.*`weights=FILE`"):
        create_backbone(tmp_path / "other.ckpt")


def test_registry_refuses_duplicates_and_bad_names():
    registry = Registry("thing")
    registry.register("a/b", 1)

    @registry.register("a/c")
    def factory():
        return 2

    assert registry.list() == ["a/b", "a/c"] and registry.get("a/c") is factory
    with pytest.raises(ValueError, match="already registered"):
        registry.register("a/b", 3)
    with pytest.raises(ValueError, match="namespace/name"):
        registry.register("NoNamespace", 3)
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("tiny/resnet18-64", BackboneEntry("resnet18", {}, Preprocess()))

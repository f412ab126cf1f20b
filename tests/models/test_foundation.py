"""The pathology foundation models' table: every entry builds and gives its stated embedding width, the
preprocessing is the published one, and published weights load strictly from a Hugging Face cache laid
out as huggingface_hub lays it out (offline; random weights under the published names and formats)."""

from __future__ import annotations

import json
import re

import pytest
import timm
import torch
from safetensors.torch import save_file

from histodistill.errors import UserError
from histodistill.models.backbones import create_backbone, list_backbones
from histodistill.models.foundation import FOUNDATION_MODELS, PACKAGES
from histodistill.models.pooling import EMBEDDINGS

BY_NAME = {model.name: model for model in FOUNDATION_MODELS}
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
HIBOU = ((0.7068, 0.5755, 0.722), (0.195, 0.2316, 0.1816))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
LUNIT = ((0.70322989, 0.53606487, 0.66096631), (0.21716536, 0.26081574, 0.20723464))
OPENAI = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
# name -> (mean/std, input px, mpp, embedding dim), as the loaders and READMEs cited in docs/models.md state
# them.
PUBLISHED = {
    "pathology/uni": (IMAGENET, 224, 0.5, 1024),
    "pathology/uni2-h": (IMAGENET, 224, 0.5, 1536),
    "pathology/conch-v1": (OPENAI, 448, 0.5, 512),
    "pathology/conch-v1.5": (IMAGENET, 448, 0.5, 768),
    "pathology/virchow": (IMAGENET, 224, 0.5, 2560),
    "pathology/virchow2": (IMAGENET, 224, 0.5, 2560),
    "pathology/h-optimus-0": (HOPTIMUS, 224, 0.5, 1536),
    "pathology/h-optimus-1": (HOPTIMUS, 224, 0.5, 1536),
    "pathology/h0-mini": (HOPTIMUS, 224, 0.5, 768),
    "pathology/prov-gigapath": (IMAGENET, 224, 0.5, 1536),
    "pathology/phikon": (IMAGENET, 224, 0.5, 768),
    "pathology/phikon-v2": (IMAGENET, 224, 0.5, 1024),
    "pathology/hibou-b": (HIBOU, 224, 0.5, 768),
    "pathology/hibou-l": (HIBOU, 224, 0.5, 1024),
    "pathology/kaiko-vits8": (HALF, 224, 0.5, 384),
    "pathology/kaiko-vits16": (HALF, 224, 0.5, 384),
    "pathology/kaiko-vitb8": (HALF, 224, 0.5, 768),
    "pathology/kaiko-vitb16": (HALF, 224, 0.5, 768),
    "pathology/kaiko-vitl14": (HALF, 224, 0.5, 1024),
    "pathology/midnight-12k": (HALF, 224, 0.5, 3072),
    "pathology/lunit-vits8": (LUNIT, 224, 0.5, 384),
    "pathology/lunit-vits16": (LUNIT, 224, 0.5, 384),
    "pathology/ctranspath": (IMAGENET, 224, 1.0, 768),
    "pathology/gpfm": (IMAGENET, 224, 0.5, 1024),
    "pathology/musk": (HALF, 384, 0.5, 1024),
}


def test_every_published_model_is_registered_once_with_a_stated_embedding():
    assert set(BY_NAME) == set(PUBLISHED) and len(BY_NAME) == len(FOUNDATION_MODELS)
    assert set(list_backbones("pathology")) == set(PUBLISHED)
    for model in FOUNDATION_MODELS:
        assert model.embedding in EMBEDDINGS and model.citation and model.source, model.name
        assert model.build in ("timm hf-hub", "timm + state dict", "transformers", "package"), model.name


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preprocessing_and_width_are_the_published_ones(name):
    (mean, std), size, mpp, dim = PUBLISHED[name]
    model = BY_NAME[name]
    assert (model.preprocess.mean, model.preprocess.std) == (mean, std)
    assert (model.preprocess.input_size, model.preprocess.mpp, model.dim) == (size, mpp, dim)


@pytest.mark.parametrize("model", FOUNDATION_MODELS, ids=lambda m: m.name)
def test_every_entry_builds_and_gives_its_embedding_width(model):
    """The full architecture on PyTorch's meta device (no memory, no weights): a (1, 3, S, S) input at the
    published size gives (1, dim), and the preprocessing travels with the backbone."""
    if model.build == "package":
        with pytest.raises(UserError, match=re.escape(PACKAGES[model.requires])):
            create_backbone(model.name, pretrained=False)
        return
    size = model.preprocess.input_size
    with torch.device("meta"):
        backbone = create_backbone(model.name, pretrained=False)
        pooled = backbone(torch.empty(1, 3, size, size))
    assert pooled.shape == (1, model.dim) and backbone.num_features == model.dim
    assert backbone.spec.preprocess == model.preprocess and backbone.spec.embedding == model.embedding


def test_virchow2_embedding_is_class_token_and_mean_patch_token_without_registers():
    # Virchow2 at depth 1 (same tokens, registers and pooling; the full depth only repeats blocks).
    torch.manual_seed(0)
    backbone = create_backbone("pathology/virchow2", pretrained=False, depth=1).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        tokens = backbone.forward_features(x)  # (1, 1 + 4 + 256, 1280)
        pooled = backbone(x)
    assert tokens.shape == (1, 261, 1280) and backbone.num_prefix_tokens == 5
    torch.testing.assert_close(pooled, torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=-1))


def _timm_hub_config(architecture: str) -> dict:
    """A timm hub repository's config.json: architecture, no classifier, its pretrained_cfg."""
    cfg = timm.models.get_pretrained_cfg(architecture).to_dict()
    return {"architecture": architecture, "num_classes": 0, "pretrained_cfg": cfg}


def _write_json(path, data):
    path.write_text(json.dumps(data))
    return path


def test_kaiko_vits16_loads_strictly_from_the_hub_cache(tmp_path, fake_hf_cache):
    torch.manual_seed(1)
    state = timm.create_model("vit_small_patch16_224", num_classes=0).state_dict()
    save_file(state, tmp_path / "model.safetensors")
    hub_id = BY_NAME["pathology/kaiko-vits16"].hub_id
    fake_hf_cache(
        hub_id,
        {
            "model.safetensors": tmp_path / "model.safetensors",
            "config.json": _write_json(tmp_path / "config.json", _timm_hub_config("vit_small_patch16_224")),
        },
    )
    backbone = create_backbone("pathology/kaiko-vits16")
    assert backbone.spec.source == f"hf-hub:{hub_id}"
    assert all(torch.equal(value, backbone.model.state_dict()[key]) for key, value in state.items())
    assert backbone.spec.preprocess.mean == (0.5, 0.5, 0.5)  # ours, not the hub config's


def _ctranspath_published_state(model) -> dict:
    """Our random CTransPath in the published (timm 0.5) layout: patch merging at the end of a stage, with
    the attention masks and position indices that file carries, under ``model``."""
    state = {}
    for key, value in model.state_dict().items():
        match = re.match(r"layers\.(\d+)\.downsample\.(.*)", key)
        state[f"layers.{int(match[1]) - 1}.downsample.{match[2]}" if match else key] = value
    state["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)
    state["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    return {"model": state}


def test_ctranspath_loads_strictly_from_its_dataset_repository(tmp_path, fake_hf_cache):
    torch.manual_seed(2)
    reference = create_backbone("pathology/ctranspath", pretrained=False).eval()
    entry = BY_NAME["pathology/ctranspath"]
    torch.save(_ctranspath_published_state(reference.model), tmp_path / "CHIEF_CTransPath.pth")
    fake_hf_cache(entry.hub_id, {entry.weights_file: tmp_path / "CHIEF_CTransPath.pth"}, repo_type="dataset")
    loaded = create_backbone("pathology/ctranspath").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference(x))
    assert loaded.spec.source == "hf-hub:MahmoodLab/hest-bench"


def _phikon_published_state(width: int, depth: int, hidden: int) -> dict:
    """Random tensors under the key names of a transformers ViTModel file as published (transformers 4)."""
    state = {
        "embeddings.cls_token": torch.randn(1, 1, width),
        "embeddings.position_embeddings": torch.randn(1, 1 + 4, width),
        "embeddings.patch_embeddings.projection.weight": torch.randn(width, 3, 16, 16),
        "embeddings.patch_embeddings.projection.bias": torch.randn(width),
        "layernorm.weight": torch.randn(width),
        "layernorm.bias": torch.randn(width),
    }
    shapes = {
        "attention.attention.query": (width, width),
        "attention.attention.key": (width, width),
        "attention.attention.value": (width, width),
        "attention.output.dense": (width, width),
        "intermediate.dense": (hidden, width),
        "output.dense": (width, hidden),
        "layernorm_before": (width,),
        "layernorm_after": (width,),
    }
    for i in range(depth):
        for name, shape in shapes.items():
            state[f"encoder.layer.{i}.{name}.weight"] = torch.randn(*shape)
            state[f"encoder.layer.{i}.{name}.bias"] = torch.randn(shape[0])
    return state


def test_phikon_loads_strictly_with_its_published_config_and_file(tmp_path, fake_hf_cache):
    pytest.importorskip("transformers")
    # The published config.json decides the architecture: a tiny one keeps the test fast, same code path.
    config = {
        "model_type": "vit",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "image_size": 32,
        "patch_size": 16,
        "qkv_bias": True,
    }
    state = _phikon_published_state(32, 2, 64)
    torch.save(state, tmp_path / "pytorch_model.bin")
    fake_hf_cache(
        "owkin/phikon",
        {
            "pytorch_model.bin": tmp_path / "pytorch_model.bin",
            "config.json": _write_json(tmp_path / "config.json", config),
        },
    )
    backbone = create_backbone("pathology/phikon").eval()
    with torch.no_grad():
        tokens = backbone.forward_features(torch.randn(2, 3, 32, 32))
        pooled = backbone.pool(tokens)
    assert tokens.shape == (2, 5, 32) and torch.equal(pooled, tokens[:, 0])
    assert torch.equal(backbone.model.model.embeddings.cls_token, state["embeddings.cls_token"])
    assert backbone.spec.model_kwargs["hidden_size"] == 32 and backbone.spec.source == "hf-hub:owkin/phikon"


def test_phikon_file_missing_a_key_is_refused(tmp_path, fake_hf_cache):
    pytest.importorskip("transformers")
    state = _phikon_published_state(32, 1, 64)
    state.pop("layernorm.weight")
    torch.save(state, tmp_path / "pytorch_model.bin")
    config = {
        "model_type": "vit",
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "image_size": 32,
        "patch_size": 16,
    }
    fake_hf_cache(
        "owkin/phikon",
        {
            "pytorch_model.bin": tmp_path / "pytorch_model.bin",
            "config.json": _write_json(tmp_path / "config.json", config),
        },
    )
    with pytest.raises(UserError, match="missing keys: layernorm.weight"):
        create_backbone("pathology/phikon")


def test_a_local_published_phikon_file_needs_no_hub(tmp_path, capsys):
    pytest.importorskip("transformers")
    state = _phikon_published_state(32, 2, 64)
    torch.save(state, tmp_path / "pytorch_model.bin")
    tiny = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "image_size": 32,
    }
    backbone = create_backbone("pathology/phikon", weights=tmp_path / "pytorch_model.bin", **tiny)
    assert torch.equal(backbone.model.model.embeddings.cls_token, state["embeddings.cls_token"])
    assert backbone.spec.source == "weights:pytorch_model.bin"
    state.pop("layernorm.bias")
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match="1 missing keys: layernorm.bias"):
        create_backbone("pathology/phikon", weights=tmp_path / "pytorch_model.bin", **tiny)
    captured = capsys.readouterr()
    assert "LOAD REPORT" not in captured.out + captured.err  # transformers' report: our one line says it


def test_offline_published_file_is_one_error_line_with_the_remedies(fake_hf_cache):
    with pytest.raises(UserError) as error:
        create_backbone("pathology/gpfm")
    message = str(error.value)
    assert (
        "\n" not in message
        and "majiabo/GPFM" in message
        and "`weights=FILE` with the model 'pathology/gpfm'" in message
    )


def test_transformers_entries_name_the_extra_when_it_is_missing(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(
        UserError,
        match=re.escape(
            "pathology/hibou-b needs the Hugging Face transformers library, "
            'which is not installed: pip install "histodistill[hf]"'
        ),
    ):
        create_backbone("pathology/hibou-b", pretrained=False)


def test_docs_table_states_every_entry_with_its_embedding():
    from pathlib import Path

    text = (Path(__file__).parents[2] / "docs" / "models.md").read_text()
    for model in FOUNDATION_MODELS:
        assert f"| `{model.name}` |" in text and f"| {model.embedding}, {model.dim} |" in text, model.name

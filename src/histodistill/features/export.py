"""Export a backbone as a timm model folder: ``model.safetensors`` + a timm-native ``config.json``.

The folder stands alone: ``timm.create_model("local-dir:<dir>", pretrained=True)`` rebuilds the
architecture from ``config.json`` (``architecture``, ``model_args`` with ``num_classes: 0``) and loads the
weights strictly, without histodistill; after ``huggingface_hub.upload_folder`` the same works with
``hf-hub:<org>/<name>``. ``pretrained_cfg`` carries the preprocessing (mean, std, input size, crop) so
``timm.data.resolve_data_config`` / ``create_transform`` prepare images as the model was trained; our
`BackboneSpec` (mpp, source, our constructor arguments) is kept under the ``histodistill`` key, which timm
ignores. ``config.json`` is written last, so its presence marks a complete export. An optional model card
(``README.md``, `histodistill.features.model_card`) describes recipe, data, metrics and licence.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from histodistill.errors import UserError
from histodistill.features.model_card import write_model_card
from histodistill.io import atomic_path, write_json
from histodistill.models.backbones import (
    CHECKPOINT_BACKBONE_KEY,
    EXPORT_CONFIG,
    EXPORT_SPEC_KEY,
    EXPORT_WEIGHTS,
    Backbone,
    create_backbone,
)

# pretrained_cfg fields that say where the *source* weights came from: wrong for exported weights.
_SOURCE_FIELDS = (
    "url",
    "file",
    "state_dict",
    "hf_hub_id",
    "hf_hub_filename",
    "source",
    "tag",
    "architecture",
    "license",
    "origin_url",
    "paper_name",
    "paper_ids",
    "notes",
    "description",
    "label_names",
    "label_descriptions",
    "label_offset",
    "test_input_size",
    "test_crop_pct",
    "pool_size",
    "test_pool_size",
)
# Model arguments that steer timm's factory rather than the architecture.
_FACTORY_ARGS = ("pretrained_cfg_overlay",)


def timm_config(backbone: Backbone) -> dict[str, Any]:
    """The ``config.json`` timm's ``local-dir:``/``hf-hub:`` loaders read (see timm.models._hub), for
    ``backbone``.

    ``pretrained_cfg`` keeps timm's description of the architecture (first conv, classifier name) and
    takes its preprocessing from ``backbone.spec.preprocess``: our eval transform resizes the short side
    to the input size (bilinear, antialiased) and centre-crops it, i.e. ``crop_pct`` 1.0.
    """
    spec, pre = backbone.spec, backbone.spec.preprocess
    source_cfg = dict(getattr(backbone.model, "pretrained_cfg", None) or {})
    pretrained_cfg = {
        key: value for key, value in source_cfg.items() if key not in _SOURCE_FIELDS and value is not None
    }
    pretrained_cfg.update(
        input_size=[3, pre.input_size, pre.input_size],
        interpolation="bilinear",
        crop_pct=1.0,
        crop_mode="center",
        mean=list(pre.mean),
        std=list(pre.std),
        num_classes=0,
    )
    model_args = {key: value for key, value in spec.model_kwargs.items() if key not in _FACTORY_ARGS}
    return {
        "architecture": spec.timm_name,
        "num_classes": 0,
        "num_features": backbone.num_features,
        "model_args": {**model_args, "num_classes": 0},
        "pretrained_cfg": pretrained_cfg,
        EXPORT_SPEC_KEY: spec.to_dict(),
    }


def save_backbone(backbone: Backbone, out_dir: str | os.PathLike) -> Path:
    """Write ``backbone.model``'s weights and its ``config.json`` into ``out_dir``; returns ``out_dir``."""
    out_dir = Path(out_dir)
    # safetensors needs contiguous tensors that share no memory.
    state = {
        key: value.detach().cpu().contiguous().clone() for key, value in backbone.model.state_dict().items()
    }
    with atomic_path(out_dir / EXPORT_WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    write_json(out_dir / EXPORT_CONFIG, timm_config(backbone))
    return out_dir


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    model_card: bool = False,
    license_id: str = "unknown",
) -> Path:
    """Rebuild the backbone recorded in one of our checkpoints (``.ckpt``) and save it into ``out_dir``,
    with a model card (``README.md``) when ``model_card``. An existing complete export is kept unless
    ``overwrite``.
    """
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if checkpoint.suffix != ".ckpt":
        raise UserError(
            f"`checkpoint={checkpoint}`: expected a histodistill checkpoint (.ckpt with a "
            f"'{CHECKPOINT_BACKBONE_KEY}' record), e.g. <run>/checkpoints/last.ckpt"
        )
    if (out_dir / EXPORT_CONFIG).exists() and not overwrite:
        raise UserError(f"{out_dir} already holds an exported backbone; pass `overwrite=True` to replace it")
    backbone = create_backbone(checkpoint)
    save_backbone(backbone, out_dir)
    if model_card:
        write_model_card(out_dir, backbone, checkpoint, license_id)
    return out_dir

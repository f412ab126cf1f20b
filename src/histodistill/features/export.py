"""Export a backbone as plain timm weights: ``model.safetensors`` + ``backbone.json``.

The safetensors file loads strictly into ``timm.create_model(spec["timm_name"], num_classes=0,
**spec["model_kwargs"])`` (after `histodistill.models.backbones.timm_kwargs` for the few layer classes
named by string), so an exported model needs neither histodistill nor the method that trained it.
``backbone.json`` is the `BackboneSpec`, preprocessing included; it is written last, so its presence
marks a complete export.
"""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import save_file

from histodistill.errors import UserError
from histodistill.io import atomic_path, write_json
from histodistill.models.backbones import (
    CHECKPOINT_BACKBONE_KEY,
    EXPORT_SPEC,
    EXPORT_WEIGHTS,
    Backbone,
    create_backbone,
)


def save_backbone(backbone: Backbone, out_dir: str | os.PathLike) -> Path:
    """Write ``backbone.model``'s weights and its spec into ``out_dir``; returns ``out_dir``."""
    out_dir = Path(out_dir)
    # safetensors needs contiguous tensors that share no memory.
    state = {key: value.detach().cpu().contiguous().clone() for key, value in backbone.model.state_dict().items()}
    with atomic_path(out_dir / EXPORT_WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    write_json(out_dir / EXPORT_SPEC, backbone.spec.to_dict())
    return out_dir


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Rebuild the backbone recorded in one of our checkpoints (``.ckpt``) and save it into ``out_dir``.

    An existing complete export is kept unless ``overwrite``.
    """
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if checkpoint.suffix != ".ckpt":
        raise UserError(
            f"--checkpoint {checkpoint}: expected a histodistill checkpoint (.ckpt with a "
            f"'{CHECKPOINT_BACKBONE_KEY}' record), e.g. <run>/checkpoints/last.ckpt"
        )
    if (out_dir / EXPORT_SPEC).exists() and not overwrite:
        raise UserError(f"{out_dir} already holds an exported backbone; pass --overwrite to replace it")
    backbone = create_backbone(checkpoint)
    return save_backbone(backbone, out_dir)

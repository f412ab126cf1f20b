"""Architectures that are not timm model names: built by histodistill (CONCH v1.5's image tower, CTransPath)
or by transformers. `BUILDERS` maps each name (stored as ``BackboneSpec.timm_name``, so checkpoints and
random controls rebuild them) to a factory of ``model_kwargs``; `CONVERTERS` turn a published state dict
into the built model's keys where the layouts differ."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from histodistill.models.conch_tower import ConchVisionTower, convert_conch_state
from histodistill.models.ctranspath import convert_ctranspath_state, create_ctranspath
from histodistill.models.hf_encoder import CLASSES, create_hf_encoder


def _hf(architecture: str, **config: Any) -> nn.Module:
    return create_hf_encoder(architecture, config)


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "histodistill:conch-v1.5-vision": ConchVisionTower,
    "histodistill:ctranspath": create_ctranspath,
    **{name: partial(_hf, name) for name in CLASSES},
}
CONVERTERS: dict[str, Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]] = {
    "histodistill:conch-v1.5-vision": convert_conch_state,
    "histodistill:ctranspath": convert_ctranspath_state,
}


def is_transformers(architecture: str) -> bool:
    return architecture in CLASSES

"""Vision transformers built with Hugging Face ``transformers`` (Phikon, Phikon-v2, Hibou, Midnight), behind
the interface timm models give the rest of histodistill.

``transformers`` is an optional dependency (``pip install "histodistill[hf]"``), imported only when such a
model is built. Published weights are read by ``transformers``' own ``from_pretrained`` from a local folder
(the Hugging Face cache snapshot the caller downloaded), because only it knows how the published key
layout maps onto its current classes (transformers 5 renamed and split attention and SwiGLU weights);
loading is strict: any missing, unexpected or mis-shaped key is a `UserError`.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

import torch
from torch import nn

from histodistill.errors import UserError

EXTRA = 'pip install "histodistill[hf]"'
# Architecture names (as BackboneSpec.timm_name) -> (transformers model class, its config class).
CLASSES = {
    "transformers:ViTModel": ("ViTModel", "ViTConfig"),
    "transformers:Dinov2Model": ("Dinov2Model", "Dinov2Config"),
    "transformers:Dinov2WithRegistersModel": ("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig"),
}


class HFEncoder(nn.Module):
    """A transformers ViT (no pooling layer) as a token model: ``forward_features(x)`` (B, 3, S, S) ->
    (B, N, C) final normalised tokens ``[class, registers..., patches...]``; ``forward_head`` takes the
    class token (which is what transformers' ``pooler_output`` is for DINOv2 models)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        config = model.config
        self.num_features = int(config.hidden_size)
        self.num_prefix_tokens = 1 + int(getattr(config, "num_register_tokens", 0))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).last_hidden_state  # (B, N, C)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x[:, 0]


def require_transformers(what: str) -> ModuleType:
    """The transformers module, or a `UserError` naming ``what`` needs it and the extra that installs it."""
    try:
        import transformers
    except ImportError as error:
        raise UserError(
            f"{what} needs the Hugging Face transformers library, which is not installed: {EXTRA}"
        ) from error
    return transformers


def _classes(architecture: str) -> tuple[type, type]:
    transformers = require_transformers(architecture)
    model_name, config_name = CLASSES[architecture]
    return getattr(transformers, model_name), getattr(transformers, config_name)


def _model_kwargs(model_class: type) -> dict[str, Any]:
    # ViTModel would add a pooler (dense + tanh) that Phikon's published weights do not have.
    return {"add_pooling_layer": False} if model_class.__name__ == "ViTModel" else {}


def create_hf_encoder(architecture: str, config: dict[str, Any]) -> HFEncoder:
    """``architecture`` (a key of `CLASSES`) built from ``config`` (its config class's arguments), random."""
    model_class, config_class = _classes(architecture)
    return HFEncoder(model_class(config_class(**config), **_model_kwargs(model_class)))


def load_hf_encoder(
    architecture: str,
    config: dict[str, Any],
    folder: str | os.PathLike | None,
    origin: str,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> HFEncoder:
    """``architecture`` with ``config``, weights read by transformers from ``folder`` (``model.safetensors``
    or ``pytorch_model.bin`` in the published key layout) or taken from ``state_dict``; strict."""
    model_class, config_class = _classes(architecture)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its multi-line load report: the problems are our one error line below
    try:
        model, info = model_class.from_pretrained(
            folder,
            config=config_class(**config),
            state_dict=state_dict,
            output_loading_info=True,
            **_model_kwargs(model_class),
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    problems = [
        f"{len(info[key])} {key.replace('_', ' ')}: {', '.join(sorted(map(str, info[key]))[:8])}"
        for key in ("missing_keys", "unexpected_keys", "mismatched_keys")
        if info.get(key)
    ]
    if problems:
        raise UserError(
            f"the weights in {origin} do not fit {architecture} ({'; '.join(problems)}). Check that the file "
            "is the model's published one and that the configuration matches it"
        )
    return HFEncoder(model)

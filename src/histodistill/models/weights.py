"""Reading weights from local files safely, and loading them into a model with a clear error.

Weight files come in many wrappings: a bare state dict, ``{"state_dict": ...}`` or ``{"model": ...}``
(training scripts), keys prefixed ``module.`` (DDP) or ``_orig_mod.`` (torch.compile). Pickled
files are always read with ``torch.load(weights_only=True)``: a weight file must not be able to run
code. Our own Lightning checkpoints may also hold histodistill dataclasses (hyper-parameters), and
MAE/DINO-style checkpoints ``{"model": ..., "epoch": ..., "args": argparse.Namespace(...)}`` their
training arguments; those, and only those, are allowed on top of plain tensors and containers. A
whole pickled model (``torch.save(model)``) is refused with one line saying how to save a state dict.
"""

from __future__ import annotations

import importlib
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from histodistill.errors import UserError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# Wrapper keys that training scripts put around the state dict, in the order we look for them.
WRAPPER_KEYS = ("state_dict", "model", "module")
# Key prefixes added by DDP and torch.compile that never belong to the model itself.
STRIPPED_PREFIXES = ("module.", "_orig_mod.")
# Globals outside histodistill that checkpoints legitimately hold: Lightning's hparams dict, paths in
# hyper-parameters, and the argparse.Namespace that MAE/DINO/DeiT training scripts save as "args".
EXTRA_SAFE_GLOBALS = (
    "lightning.fabric.utilities.data.AttributeDict",
    "pathlib.PosixPath",
    "pathlib.WindowsPath",
    "argparse.Namespace",
)
SAVE_STATE_DICT = (
    "torch.save(model.state_dict(), 'weights.pth') or "
    "safetensors.torch.save_file(model.state_dict(), 'model.safetensors')"
)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A pickled checkpoint (``.ckpt``/``.pth``/``.pt``/``.bin``) as a dict, read with ``weights_only=True``.

    Globals that are not tensors or containers are allowed only when they are histodistill's own
    classes (e.g. an ``OptimConfig`` in Lightning's hyper-parameters) or in `EXTRA_SAFE_GLOBALS`; any
    other (a whole pickled model: ``torch.nn.modules...``, a training script's own class) is a
    `UserError` naming the first of them, before anything is unpickled.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist")
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError):
        names = []  # not torch's zip format (a legacy pickle): torch.load below judges it
    foreign = [name for name in names if not _allowed_global(name)]
    if foreign:
        raise UserError(
            f"{path} holds pickled Python objects ({_head(foreign, 3)}), e.g. a whole model saved with "
            f"torch.save(model); only state dicts are loaded, because unpickling objects runs code. "
            f"Save one where the model is defined: {SAVE_STATE_DICT}"
        )
    try:
        with torch.serialization.safe_globals([_import_global(name) for name in names]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise UserError(
            f"cannot read {path} as weights with torch.load(weights_only=True): {first_line(error)}. "
            f"Save the state dict alone: {SAVE_STATE_DICT}"
        ) from error
    if not isinstance(obj, Mapping):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a state dict. Save one: {SAVE_STATE_DICT}")
    return dict(obj)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a local weights file (safetensors or pickled), unwrapped and de-prefixed."""
    path = Path(path)
    if path.suffix in SAFETENSORS_SUFFIXES:
        if not path.is_file():
            raise UserError(f"weights file {path} does not exist")
        from safetensors.torch import load_file

        return unwrap_state_dict(load_file(str(path), device="cpu"))
    if path.suffix not in PICKLE_SUFFIXES:
        raise UserError(
            f"weights file {path} has an unknown suffix; use .safetensors or a .pth/.pt/.bin/.ckpt state dict"
        )
    return unwrap_state_dict(read_checkpoint(path))


def unwrap_state_dict(obj: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Descend through wrapper keys (``state_dict``, ``model``, ``module``), then strip DDP/compile
    prefixes."""
    while not _is_state_dict(obj):
        inner = next((obj[key] for key in WRAPPER_KEYS if isinstance(obj.get(key), Mapping)), None)
        if inner is None:
            raise UserError(
                f"no state dict found: top-level keys are {sorted(obj)[:10]}; expected tensors or one of "
                f"{WRAPPER_KEYS}"
            )
        obj = inner
    state = dict(obj)
    for prefix in STRIPPED_PREFIXES:
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix) :]: value for key, value in state.items()}
    return state


def load_weights(
    model: nn.Module, state: Mapping[str, torch.Tensor], origin: str, strict: bool = True
) -> None:
    """Load ``state`` into ``model``; mismatches raise a `UserError` naming ``origin`` and the keys.

    With ``strict=False`` missing and unexpected keys are tolerated, shape mismatches never are.
    """
    own = model.state_dict()
    wrong_shape = [
        f"{key} {tuple(value.shape)} vs model {tuple(own[key].shape)}"
        for key, value in state.items()
        if key in own and tuple(value.shape) != tuple(own[key].shape)
    ]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    problems = []
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} with another shape: {_head(wrong_shape)}")
    if strict and missing:
        problems.append(f"{len(missing)} missing: {_head(missing)}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_head(unexpected)}")
    if problems:
        raise UserError(
            f"the weights in {origin} do not fit the model ({'; '.join(problems)}). Check that the model "
            "name and its arguments (e.g. img_size, patch_size, init_values) match how the weights were "
            "trained" + ("." if wrong_shape else ", or load non-strictly (strict=False).")
        )
    model.load_state_dict(state, strict=strict)


def _is_state_dict(obj: Mapping[str, Any]) -> bool:
    return bool(obj) and all(isinstance(value, torch.Tensor) for value in obj.values())


def _head(items: list[str], count: int = 8) -> str:
    return ", ".join(items[:count]) + (", ..." if len(items) > count else "")


def _allowed_global(qualified: str) -> bool:
    return qualified.startswith("histodistill.") or qualified in EXTRA_SAFE_GLOBALS


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type when empty)."""
    # torch's unpickling errors are paragraphs of advice about weights_only; the first line is the fact.
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _import_global(qualified: str) -> type:
    module, _, name = qualified.rpartition(".")
    return getattr(importlib.import_module(module), name)

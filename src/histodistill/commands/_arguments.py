"""Argument types shared by the subcommands (a module, not a command: its name starts with ``_``)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

from histodistill.errors import Flag
from histodistill.io import unwritable_reason


def _writable(value: str, kind: str) -> str:
    if (reason := unwritable_reason(value, kind)) is not None:
        raise argparse.ArgumentTypeError(reason)
    return value


def output_folder(value: str) -> str:
    """``type=`` of an ``--out`` folder, checked while the arguments are parsed, before any work
    (`histodistill.io.unwritable_reason`): refused when empty, an existing file, or under a file."""
    return _writable(value, "folder")


def output_file(value: str) -> str:
    """``type=`` of an output file (`report --out`), checked while the arguments are parsed: refused when
    empty, an existing folder, or under a file."""
    return _writable(value, "file")


def add_model_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    """``--model``, ``--weights`` and ``--random-init``: which frozen backbone, with which weights
    (`histodistill.models.backbones.create_backbone`); checked by `check_model_arguments`."""
    parser.add_argument(
        "--model",
        required=required,
        metavar="NAME_OR_CKPT_OR_DIR",
        help="a registered name (e.g. tiny/resnet18-64, pathology/uni), any timm model name, an "
        "hf-hub: id, a histodistill .ckpt, or a directory made by `histodistill export`",
    )
    parser.add_argument(
        "--weights",
        metavar="FILE",
        help="local weights to load into --model (.safetensors, or a .pth/.pt/.bin state dict); "
        "without it a name loads its published pretrained weights (Hugging Face cache or hub) "
        "and a checkpoint or export uses its own",
    )
    parser.add_argument(
        "--random-init",
        action="store_true",
        help="randomly initialised weights (seed 0) instead of the pretrained ones; a baseline, said "
        "on stderr and recorded (extract: extractor.json; probe: probe.json)",
    )


def check_model_arguments(args: argparse.Namespace) -> None:
    """Refuse contradicting weight options (`UserError`) before any work."""
    from histodistill.errors import UserError

    if args.random_init and args.weights:
        raise UserError("--random-init and --weights contradict each other: pass one of them")
    if args.random_init and os.path.exists(args.model):
        raise UserError(
            f"--random-init applies to model names; {args.model} carries its own weights: "
            "pass its architecture's name (e.g. the timm name) for random weights"
        )


def command_flags(
    parser: argparse.ArgumentParser, parameters: Mapping[str, str] | None = None
) -> dict[str, Flag]:
    """The `Flag` of each library parameter a command passes, for `histodistill.errors.rendering_parameters`:
    every option of ``parser`` under its dest (``patch_size`` -> ``--patch-size``; a switch under
    ``dest=True``, e.g. ``overwrite=True`` -> ``--overwrite``), plus ``parameters``, the command's own
    ``PARAMETERS``: a library parameter (or ``name=value``) that an option passes under another name -> that
    option's dest (``{"target_mpp": "mpp", "pretrained=False": "random_init"}``). The options of nested
    subcommands (``samples make-nuclei``) count too."""
    by_dest: dict[str, tuple[str, Flag]] = {}
    actions = list(parser._actions)
    for action in actions:
        if isinstance(action, argparse._SubParsersAction):
            actions += [nested for sub in action.choices.values() for nested in sub._actions]
        if not action.option_strings or action.dest in ("help", "version"):
            continue
        option = max(action.option_strings, key=len)  # the long form
        if action.nargs == 0:  # store_true & co.: the option stands for one value
            by_dest[action.dest] = (f"{action.dest}={action.const}", Flag(option, switch=True))
        else:
            by_dest[action.dest] = (action.dest, Flag(option))
    flags = dict(by_dest.values())
    for parameter, dest in (parameters or {}).items():
        flags[parameter] = by_dest[dest][1]
    return flags

"""Turn a foundation-model teacher into your own fast student, and prove on your slides what it keeps.

  histodistill distill --teacher pathology/uni --student resnet18 --slides /data/cohort --out runs/uni_r18 \\
      [--labels labels.csv] [--method mcmkd|moma] [--steps N] [--mpp 0.5 --patch-size 224] [--devices N]

Stages (each resumes; a finished one is verified and skipped; a folder finished with other settings is
refused, naming the setting): tile, the teacher's features of every tile (once: the MCM-KD cache and the
teacher's slide features), fit, export, features of the students, the slide-level comparison (ABMIL CV
with --labels, feature agreement without), summary.json and report.html. See docs/distill.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

from histodistill.commands._arguments import output_folder

HELP = (
    "distil a foundation-model teacher into a fast student on your slides, and compare them on the slide task"
)
# Parameters of the stages' library calls that name an option here (`histodistill.errors`).
PARAMETERS = {"coords_dir": "coords", "slides_dir": "slides", "target_mpp": "mpp"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per `DistillConfig` field: its type, default and help live there."""
    from histodistill.pipelines.distill_config import DistillConfig

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    hints = typing.get_type_hints(DistillConfig)
    for item in dataclasses.fields(DistillConfig):
        flag, hint = "--" + item.name.replace("_", "-"), hints[item.name]
        required = item.default is dataclasses.MISSING
        help_text = item.metadata["help"] + (
            "" if required or item.default is None or item.default is False else f" (default {item.default})"
        )
        if hint is bool:
            parser.add_argument(flag, action="store_true", help=help_text)
        elif typing.get_origin(hint) is typing.Literal or item.metadata["choices"]:
            choices = item.metadata["choices"] or typing.get_args(hint)
            parser.add_argument(flag, choices=choices, default=item.default, help=help_text)
        else:
            kind = (
                next(arg for arg in typing.get_args(hint) if arg is not type(None))
                if typing.get_args(hint)
                else hint
            )
            convert = output_folder if item.name == "out" else kind
            parser.add_argument(
                flag,
                type=convert,
                required=required,
                help=help_text,
                **({} if required else {"default": item.default}),
            )


def run(args: argparse.Namespace) -> int:
    from histodistill.errors import render_parameters
    from histodistill.pipelines.distill import distill
    from histodistill.pipelines.distill_config import DistillConfig

    values = {item.name: getattr(args, item.name) for item in dataclasses.fields(DistillConfig)}
    values["out"] = Path(values["out"])
    # Errors are rendered by the CLI (`histodistill.cli`); the pipeline's lines here (`coords=...`: --coords).
    distill(DistillConfig(**values), log=lambda line: print(render_parameters(line, args._flags)))
    return 0

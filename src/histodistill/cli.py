"""The ``histodistill`` console script: one entry point, one subcommand per pipeline stage.

Each subcommand lives in its own module under ``histodistill.commands`` and is found there
automatically. A command module defines:

- ``HELP``: the one-line summary shown by ``histodistill --help``;
- ``add_arguments(parser)``: its options (imports nothing heavy, so ``--help`` stays fast);
- ``run(args) -> int | None``: the work (imports torch & co. lazily);
- optionally ``PARAMETERS``: library parameters that its options pass under another name, parameter ->
  the option's dest (``{"target_mpp": "mpp"}``), so that a library error naming `` `target_mpp=0.3` ``
  reads ``--mpp 0.3`` (`histodistill.errors`; the other options are found by their dest);
- optionally ``PASSTHROUGH = True`` and ``main(argv) -> int | None`` for commands that parse their
  own arguments (``fit`` hands them to LightningCLI, which renders its own keys).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from types import ModuleType

from histodistill import __version__, commands
from histodistill.commands._arguments import command_flags
from histodistill.errors import UserError, rendering_parameters
from histodistill.io import reporting_full_disk

# The order a user meets the stages in; commands not listed here are shown after them.
PIPELINE_ORDER = (
    "samples",
    "tile",
    "fit",
    "export",
    "extract",
    "probe",
    "mil",
    "heatmap",
    "report",
    "distill",
    "demo",
)


def _command_modules() -> dict[str, ModuleType]:
    found = {}
    for info in pkgutil.iter_modules(commands.__path__):
        if not info.name.startswith("_"):
            found[info.name.replace("_", "-")] = importlib.import_module(f"{commands.__name__}.{info.name}")
    rank = {name: i for i, name in enumerate(PIPELINE_ORDER)}
    return dict(sorted(found.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0])))


def build_parser(modules: dict[str, ModuleType]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="histodistill",
        description="Small, strong feature extractors for histopathology: tile slides, pretrain (SD-MAE), "
        "distill (MoMA), fine-tune on slide context (MCM-KD), extract features, probe, MIL, report.",
    )
    parser.add_argument("--version", action="version", version=f"histodistill {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in modules.items():
        if getattr(module, "PASSTHROUGH", False):
            # Listed for --help only; main() hands its argv over before argparse sees it.
            sub.add_parser(name, help=module.HELP, add_help=False)
            continue
        command_parser = sub.add_parser(name, help=module.HELP, description=module.__doc__)
        module.add_arguments(command_parser)
        command_parser.set_defaults(
            _run=module.run, _flags=command_flags(command_parser, getattr(module, "PARAMETERS", None))
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    modules = _command_modules()
    try:
        if argv and argv[0] in modules and getattr(modules[argv[0]], "PASSTHROUGH", False):
            return int(modules[argv[0]].main(argv[1:]) or 0)
        args = build_parser(modules).parse_args(argv)
        if not hasattr(args, "_run"):
            build_parser(modules).print_help()
            return 0
        # Every command that writes: a full disk is one line naming the file, not a traceback (commands that
        # can estimate the space their run needs report it from inside, see `reporting_full_disk`).
        # A library error names the parameters (`target_mpp=0.3`): the user reads the options they typed.
        with rendering_parameters(args._flags), reporting_full_disk(getattr(args, "out", None) or "."):
            return int(args._run(args) or 0)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished outputs are kept, unfinished ones were not written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

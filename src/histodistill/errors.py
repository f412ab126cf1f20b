"""The error types users see, and how a message names the parameter to fix.

Anything raised as `UserError` is printed by the CLI as ``error: <message>`` with exit code 2,
without a traceback. Everything else is a bug and keeps its traceback. `ConfigError` is the one type for
a bad configuration value (a number out of range, an unknown choice): a `UserError` and a `ValueError`.

The library speaks Python, the commands speak flags. A message names a parameter as the caller passed it,
in backticks with its value: `` `target_mpp=0.3`: finer than the slide's 0.5 um/px ``, `` pass
`overwrite=True` to replace them `` (``...`` when no value is meant: `` choose another `out_dir=...` ``). That
form is the marker: a backticked word without ``=`` (a dataset name such as `` `coords` ``) is not a
parameter. A command renders the parameters it knows as its options (`rendering_parameters` with the
command's `Flag` of each parameter), so a CLI user reads ``--mpp 0.3: ...`` and ``pass --overwrite``;
parameters the command does not know stay as written. The flags come from the running command's argparse
options by dest, plus its module's ``PARAMETERS`` where an option passes a library parameter of another
name (`histodistill.commands._arguments.command_flags`, used by `histodistill.cli`); ``histodistill fit``
renders a module's or data module's init argument as its key, ``--model.init_args.mask_ratio 1.5``
(`histodistill.engine.cli.config_flags`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import NamedTuple

# A parameter mention: `name=value` (Python identifier, then anything up to the closing backtick).
PARAMETER = re.compile(r"`(?P<name>[A-Za-z_][A-Za-z0-9_]*)=(?P<value>[^`]*)`")


class UserError(Exception):
    """Bad input or environment that the user can fix (unreadable slide, missing mpp, bad config)."""

    @property
    def parameters(self) -> dict[str, str]:
        """The parameters the message names, in order: ``{"target_mpp": "0.3"}`` (values as written)."""
        return {match["name"]: match["value"] for match in PARAMETER.finditer(str(self))}


class ConfigError(UserError, ValueError):
    """A configuration value the code cannot run with: out of range, not one of the choices, inconsistent
    with another. Also a `ValueError`, which is what a Python caller expects of a bad argument."""


class Flag(NamedTuple):
    """How a command takes a parameter: its ``option`` (``--mpp``), and whether it is a ``switch`` that takes
    no value (``--overwrite``)."""

    option: str
    switch: bool = False


def render_parameters(message: str, flags: Mapping[str, Flag]) -> str:
    """``message`` with every `` `name=value` `` whose parameter is in ``flags`` written as its flag:
    ``--mpp 0.3``, or the option alone for a value of ``...`` (``choose another --out``). A switch is keyed
    by the one ``name=value`` it stands for (``overwrite=True`` -> ``--overwrite``, ``pretrained=False`` ->
    ``--random-init``); other parameters, and other values of a switch, are left as they are."""

    def flag(match: re.Match) -> str:
        name, value = match["name"], match["value"]
        if (switch := flags.get(f"{name}={value}")) is not None:
            return switch.option
        found = flags.get(name)
        if found is None or found.switch:  # unknown here, or a switch given another value
            return match[0]
        return found.option if value == "..." else f"{found.option} {_unquoted(value)}"

    return PARAMETER.sub(flag, message)


@contextmanager
def rendering_parameters(flags: Mapping[str, Flag]) -> Iterator[None]:
    """Re-raise a `UserError` from the body with its parameters rendered as ``flags`` (`render_parameters`):
    the same error, its message rewritten, so the CLI's one line names the options the user typed."""
    try:
        yield
    except UserError as error:
        error.args = (render_parameters(str(error), flags),)
        raise


def _unquoted(value: str) -> str:
    """``'layer_norm'`` (a Python repr in the message) -> ``layer_norm``, as typed on a command line."""
    return value[1:-1] if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"" else value

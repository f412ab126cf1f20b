"""A library error names the parameter; a command renders the option the user typed (issue 31)."""

from __future__ import annotations

import argparse

import pytest

from histodistill.commands._arguments import command_flags
from histodistill.errors import ConfigError, Flag, UserError, render_parameters, rendering_parameters

FLAGS = {
    "target_mpp": Flag("--mpp"),
    "overwrite=True": Flag("--overwrite", switch=True),
    "pretrained=False": Flag("--random-init", switch=True),
}


def test_a_parameter_is_rendered_as_its_flag_with_its_value():
    assert (
        render_parameters("`target_mpp=0.3`: finer than the slide", FLAGS)
        == "--mpp 0.3: finer than the slide"
    )
    assert render_parameters("raise `target_mpp=...`", FLAGS) == "raise --mpp"
    assert render_parameters("`target_mpp='x'`: not a number", FLAGS) == "--mpp x: not a number"


def test_a_switch_is_rendered_only_for_the_value_it_stands_for():
    assert (
        render_parameters("pass `overwrite=True` to replace them", FLAGS)
        == "pass --overwrite to replace them"
    )
    assert render_parameters("`pretrained=False`: random weights", FLAGS) == "--random-init: random weights"
    assert render_parameters("`overwrite=False` keeps them", FLAGS) == "`overwrite=False` keeps them"


def test_what_is_not_a_known_parameter_is_left_as_written():
    # A dataset name in backticks is no parameter; a parameter the command does not take keeps its Python
    # form.
    message = "no `coords` dataset; `patch_size=256` and `target_mpp` unchanged"
    assert render_parameters(message, FLAGS) == message


def test_the_error_carries_its_parameters():
    error = UserError(
        "`target_mpp=0.3`: finer than the slide's 0.5 um/px; pass `overwrite=True`, not `coords`"
    )
    assert error.parameters == {"target_mpp": "0.3", "overwrite": "True"}


def test_a_config_error_is_a_user_error_and_a_value_error():
    assert issubclass(ConfigError, UserError) and issubclass(ConfigError, ValueError)


def test_rendering_rewrites_the_same_error():
    with pytest.raises(ConfigError, match=r"^--mpp -1: must be positive$"), rendering_parameters(FLAGS):
        raise ConfigError("`target_mpp=-1`: must be positive")


def test_a_commands_flags_come_from_its_parser_and_its_renames():
    parser = argparse.ArgumentParser()
    parser.add_argument("slides")
    parser.add_argument("--patch-size", type=int)
    parser.add_argument("--mpp", "-m", metavar="UM")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--random-init", action="store_true")
    flags = command_flags(parser, {"target_mpp": "mpp", "pretrained=False": "random_init"})
    assert flags == {
        "patch_size": Flag("--patch-size"),
        "mpp": Flag("--mpp"),
        "target_mpp": Flag("--mpp"),
        "overwrite=True": Flag("--overwrite", switch=True),
        "random_init=True": Flag("--random-init", switch=True),
        "pretrained=False": Flag("--random-init", switch=True),
    }

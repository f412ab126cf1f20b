"""Keep the docs honest: the CLI reference matches the parsers, and paths and links in the docs exist.

docs/cli.md has one heading per command (``## `histodistill tile` ``, and for nested actions
``### `histodistill samples make-nuclei` ``). Inside a heading's block every ``--option`` mentioned
must exist in that command's parser, every option of the parser must have a table row
(``| `--option ARG` | default | meaning |``), and the default column must say what the parser does:
``required``, ``off`` (a flag), ``–`` (no default; free text may follow) or the value in backticks.
`fit` is skipped: its options come from LightningCLI and the recipe's classes.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from histodistill.cli import _command_modules, build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CLI_DOC = DOCS / "cli.md"
PAGES = sorted(DOCS.glob("*.md")) + [ROOT / "README.md"]
SKIPPED_COMMANDS = {"fit"}

HEADING = re.compile(r"^(#+) `histodistill ([a-z][a-z -]*)`\s*$", re.MULTILINE)
OPTION = re.compile(r"(?<![\w.-])--[a-zA-Z][\w-]*(?![\w.])")  # `--trainer.devices` is not an argparse option
ROW = re.compile(r"^\| `(--[\w-]+)[^`]*`[^|]*\| ([^|]*) \|", re.MULTILINE)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(
        (action.choices for action in parser._actions if isinstance(action, argparse._SubParsersAction)), {}
    )


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {name: action for name, action in parser._option_string_actions.items() if name.startswith("--")}


def _options_below(parser: argparse.ArgumentParser) -> set[str]:
    """Options of ``parser`` and of all its nested actions (text under `samples` may name `--out`)."""
    found = set(_options(parser))
    for child in _subparsers(parser).values():
        found |= _options_below(child)
    return found


def _command_parser(words: list[str]) -> argparse.ArgumentParser:
    parser = build_parser(_command_modules())
    for word in words:
        parser = _subparsers(parser)[word]
    return parser


def _sections() -> dict[tuple[str, ...], str]:
    """``{("samples", "fetch"): text under that heading up to the next heading of any level}``."""
    text = CLI_DOC.read_text()
    headings = list(re.finditer(r"^#+ .*$", text, re.MULTILINE))
    sections = {}
    for index, heading in enumerate(headings):
        match = HEADING.match(heading.group(0))
        if match:
            end = headings[index + 1].start() if index + 1 < len(headings) else len(text)
            sections[tuple(match.group(2).split())] = text[heading.end() : end]
    return sections


def _checked_sections() -> list[tuple[str, ...]]:
    return [words for words in _sections() if words[0] not in SKIPPED_COMMANDS]


def _strip_code(text: str) -> str:
    """Markdown without fenced blocks and inline code spans: links and paths inside them are examples."""
    return re.sub(r"`[^`\n]*`", "", re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL))


def test_every_command_has_a_section():
    documented = {words[0] for words in _sections() if len(words) == 1}
    missing = sorted(set(_command_modules()) - documented)
    assert not missing, f"docs/cli.md has no `## \\`histodistill <command>\\`` section for {missing}"


def test_every_nested_action_has_a_section():
    sections = _sections()
    parser = build_parser(_command_modules())
    for command, command_parser in _subparsers(parser).items():
        for action in _subparsers(command_parser):
            assert (command, action) in sections, (
                f"docs/cli.md has no section for `histodistill {command} {action}`"
            )


@pytest.mark.parametrize("words", _checked_sections(), ids=" ".join)
def test_options_mentioned_exist(words):
    known = _options_below(_command_parser(list(words)))
    mentioned = set(OPTION.findall(_sections()[words]))
    unknown = sorted(mentioned - known)
    assert not unknown, (
        f"docs/cli.md, `histodistill {' '.join(words)}` mentions options its parser lacks: {unknown}"
    )


@pytest.mark.parametrize("words", _checked_sections(), ids=" ".join)
def test_every_option_has_a_row_with_the_parser_default(words):
    parser = _command_parser(list(words))
    rows = dict(ROW.findall(_sections()[words]))
    for name, action in _options(parser).items():
        if name == "--help" or name != action.option_strings[-1]:
            continue
        assert name in rows, f"docs/cli.md, `histodistill {' '.join(words)}`: no table row for {name}"
        _check_default(" ".join(words), name, action, rows[name].strip())
    positionals = [action for action in parser._actions if not action.option_strings and action.nargs != 0]
    for action in positionals:
        if not isinstance(action, argparse._SubParsersAction):
            metavar = action.metavar or action.dest.upper()
            assert metavar in _sections()[words], (
                f"`histodistill {' '.join(words)}`: {metavar} is not documented"
            )


def _check_default(command: str, name: str, action: argparse.Action, cell: str) -> None:
    where = f"docs/cli.md, `histodistill {command}` {name}"
    if cell == "required":
        assert action.required, f"{where}: documented as required, but the parser does not require it"
    elif cell == "off":
        assert action.nargs == 0 and action.default is False, f"{where}: documented as an off flag"
    elif cell.startswith("–"):
        assert action.default is None and not action.required, (
            f"{where}: documented without a default, parser has {action.default!r}"
        )
    else:
        value = re.fullmatch(r"`([^`]*)`", cell)
        assert value, f"{where}: default cell {cell!r} is none of required / off / – / `value`"
        default = action.default
        shown = " ".join(map(str, default)) if isinstance(default, list) else str(default)
        assert value.group(1) == shown, (
            f"{where}: documented default {value.group(1)!r}, parser default {shown!r}"
        )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_config_paths_exist(page):
    mentioned = set(re.findall(r"(?<![\w/])configs/[\w./-]+?\.yaml", page.read_text()))
    missing = sorted(path for path in mentioned if not (ROOT / path).is_file())
    assert not missing, f"{page.relative_to(ROOT)} names config files that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_exist(page):
    targets = re.findall(r"\]\(([^)\s]+)\)", _strip_code(page.read_text()))
    relative = {t.split("#")[0] for t in targets if not re.match(r"[a-z]+:|#", t)}
    missing = sorted(t for t in relative if not (page.parent / t).exists())
    assert not missing, f"{page.relative_to(ROOT)} links to files that do not exist: {missing}"

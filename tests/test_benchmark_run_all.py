"""benchmarks/run_all.py runs what it can and says what it skips: a script that reads a finished demo
(its ``--demo`` option) gets run_all's ``--demo DIR``, or is skipped with a line, never run to an argparse
error. No benchmark runs here: the subprocess and the page assembly are replaced."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO_SCRIPTS = ("distill_chain", "mcmkd_bn", "mil")  # each declares --demo (the first two require it)


@pytest.fixture
def run_all(monkeypatch, tmp_path):
    """The module with its subprocess and assembly recorded instead of done; ``.calls`` holds the argvs."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import run_all

    calls = []
    monkeypatch.setattr(run_all.subprocess, "call", lambda argv, cwd: calls.append(argv) or 0)
    monkeypatch.setattr(run_all, "assemble", lambda: tmp_path / "benchmarks.md")
    run_all.calls = calls
    return run_all


def _main(run_all, monkeypatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["run_all.py", *args])
    return run_all.main()


def test_without_demo_the_demo_scripts_are_skipped_each_with_a_line(run_all, monkeypatch, capsys):
    assert _main(run_all, monkeypatch) == 0
    out = capsys.readouterr().out
    ran = {argv[2].removeprefix("benchmarks.") for argv in run_all.calls}
    assert {"tiling", "moma", "distill"} <= ran
    assert not ran & {"common", "tuning_slides", "run_all"}  # shared helpers and itself are no benchmarks
    for name in (*DEMO_SCRIPTS, "mcmkd_targets"):
        assert name not in ran
        assert f"== skipped benchmarks/{name}.py: " in out
    assert "`python -m benchmarks.mcmkd_bn --demo DIR`" in out
    assert "run `python -m benchmarks.mcmkd_targets --teacher TEACHER --student STUDENT`" in out
    assert all("--demo" not in argv for argv in run_all.calls)


def test_with_demo_the_demo_scripts_get_it(run_all, monkeypatch, capsys, tmp_path):
    assert _main(run_all, monkeypatch, "--demo", str(tmp_path)) == 0
    given = {argv[2].removeprefix("benchmarks."): argv[3:] for argv in run_all.calls}
    for name in DEMO_SCRIPTS:
        assert given[name] == ["--demo", str(tmp_path)]
    assert given["tiling"] == []
    assert "mcmkd_targets" not in given  # it needs --teacher and --student, not a demo


def test_a_demo_script_asked_for_by_name_without_demo_is_an_error_before_any_run(
    run_all, monkeypatch, capsys
):
    with pytest.raises(SystemExit) as exit_:
        _main(run_all, monkeypatch, "--only", "tiling", "distill_chain")
    assert exit_.value.code == 2
    assert "error: --only distill_chain: it reads a finished demo" in capsys.readouterr().err
    assert run_all.calls == []


def test_a_new_script_is_read_from_its_own_arguments(run_all, tmp_path):
    # No list to edit: a script declares what it needs in its argparse calls.
    script = tmp_path / "new_bench.py"
    script.write_text(
        "import argparse\n"
        "parser = argparse.ArgumentParser()\n"
        'parser.add_argument("--demo", type=str, required=True, help="x")\n'
        'parser.add_argument("-w", "--work", default="w")\n'
        'parser.add_argument("--ckpt", required=False)\n'
    )
    assert run_all.options(script) == {"--demo": True, "--work": False, "--ckpt": False}

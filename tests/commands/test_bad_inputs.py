"""The contract every subcommand keeps on bad input: exit 2, exactly one `error:` line, no traceback.

Each command's path inputs get four kinds of bad value: a missing file, a wrong folder (one that exists
but holds something else), a foreign file (a file of another kind) and an empty folder. Commands are
discovered from `histodistill.cli`, so a new command fails `test_every_command_has_bad_inputs` until it
is added to `INPUTS`. Everything runs in-process and stops before any real work, so the test is cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from histodistill.cli import _command_modules, main

KINDS = ("missing file", "wrong folder", "foreign file", "empty folder")


def bad_path(root: Path, kind: str) -> Path:
    """A path of one bad kind under ``root``."""
    if kind == "missing file":
        return root / "no_such_input.h5"
    if kind == "foreign file":
        path = root / "holiday.jpg"  # not a JPEG either: bytes of another kind entirely
        path.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
        return path
    path = root / kind.replace(" ", "_")
    path.mkdir()
    if kind == "wrong folder":
        (path / "notes.txt").write_text("minutes of the meeting\n")
        (path / "photos").mkdir()
    return path


def good_features(root: Path) -> Path:
    """A valid features folder and labels for the inputs that are not under test."""
    folder = root / "good_features"
    folder.mkdir()
    for slide_id in ("a", "b"):
        with h5py.File(folder / f"{slide_id}.h5", "w") as handle:
            handle["features"] = np.ones((3, 4), np.float32)
            handle["coords"] = np.zeros((3, 2), np.int64)
    return folder


def good_labels(root: Path) -> Path:
    path = root / "good_labels.csv"
    path.write_text("case_id,slide_id,label\na,a,0\nb,b,1\n")
    return path


def good_images(root: Path) -> Path:
    """A valid image folder (root/<class>/<image>) for probe's image input that is not under test."""
    from conftest import make_image_folder

    return make_image_folder(root / "good_images", per_class=1)


def probe_images(train: Path, test: Path, out: Path) -> list[str]:
    return [
        "probe",
        "--train-images",
        str(train),
        "--test-images",
        str(test),
        "--model",
        "tiny/resnet18-64",
        "--random-init",
        "--linear-protocol",
        "mae",
        "--out",
        str(out),
    ]


def good_run(root: Path) -> Path:
    """A `mil` run directory with one attention file, for heatmap's --slides input."""
    attention = root / "good_run" / "attention"
    attention.mkdir(parents=True)
    with h5py.File(attention / "a.h5", "w") as handle:
        handle["coords"] = np.zeros((2, 2), np.int64)
        handle["scores"] = np.ones(2, np.float32)
    return root / "good_run"


Argv = Callable[[Path, Path], list[str]]  # (bad path, tmp dir) -> argv


def good_slides(root: Path) -> Path:
    """A folder holding one slide file (never opened: the checks stop before tiling)."""
    folder = root / "good_slides"
    folder.mkdir()
    (folder / "a.tif").write_bytes(b"II*\x00")
    return folder


def distill(inputs: list[str], root: Path) -> list[str]:
    return [
        "distill",
        "--teacher",
        "tiny/resnet18-64",
        "--student",
        "tiny/resnet18-64",
        "--student-random-init",
        "--out",
        str(root / "out"),
        *inputs,
    ]


# command -> {input: argv with the bad path in that input}. Output folders are not inputs: a missing or
# empty one is valid. `samples` and `demo` read no files: their bad input is a file given as --out,
# or an unknown sample name.
INPUTS: dict[str, dict[str, Argv]] = {
    "samples": {"--out": lambda p, t: ["samples", "make-slides", "--out", str(p)]},
    "tile": {"SOURCE": lambda p, t: ["tile", str(p), "--out", str(t / "out")]},
    "fit": {"--config": lambda p, t: ["fit", "--config", str(p)]},
    "export": {"--checkpoint": lambda p, t: ["export", "--checkpoint", str(p), "--out", str(t / "out")]},
    "extract": {
        "--coords": lambda p, t: [
            "extract",
            "--model",
            "tiny/resnet18-64",
            "--coords",
            str(p),
            "--out",
            str(t / "out"),
        ],
        "--images": lambda p, t: [
            "extract",
            "--model",
            "tiny/resnet18-64",
            "--images",
            str(p),
            "--out",
            str(t / "out"),
            "--workers",
            "0",
        ],
    },
    "probe": {
        "--features": lambda p, t: ["probe", "--features", str(p), "--out", str(t / "out")],
        "--train-images": lambda p, t: probe_images(p, good_images(t), t / "out"),
        "--test-images": lambda p, t: probe_images(good_images(t), p, t / "out"),
    },
    "mil": {
        "--features": lambda p, t: [
            "mil",
            "--features",
            str(p),
            "--labels",
            str(good_labels(t)),
            "--out",
            str(t / "out"),
        ],
        "--labels": lambda p, t: [
            "mil",
            "--features",
            str(good_features(t)),
            "--labels",
            str(p),
            "--out",
            str(t / "out"),
        ],
    },
    "heatmap": {
        "--run": lambda p, t: ["heatmap", "--run", str(p), "--slides", str(t)],
        "--slides": lambda p, t: ["heatmap", "--run", str(good_run(t)), "--slides", str(p)],
    },
    "report": {"RUN_DIR": lambda p, t: ["report", str(p)]},
    "distill": {
        "--slides": lambda p, t: distill(["--slides", str(p)], t),
        "--coords": lambda p, t: distill(["--coords", str(p)], t),
        "--labels": lambda p, t: distill(["--slides", str(good_slides(t)), "--labels", str(p)], t),
    },
    "demo": {"--out": lambda p, t: ["demo", "--out", str(p), "--quick"]},
    "models": {},  # reads no file and takes no input: it prints the registry
}
# Kinds that are valid for an input, with the reason (everything else must be refused).
VALID = {
    ("samples", "--out"): {
        "missing file": "a new output folder",
        "empty folder": "an output folder",
        "wrong folder": "an output folder may hold other files",
    },
    ("demo", "--out"): {
        "missing file": "a new output folder",
        "empty folder": "an output folder",
        "wrong folder": "an output folder may hold other files",
    },
}
EXTRA_CASES = {("samples", "unknown sample name"): lambda p, t: ["samples", "fetch", "no_such_sample"]}

CASES = [
    pytest.param((argv_of, kind), id=f"{command} {name} {kind}")
    for command, inputs in INPUTS.items()
    for name, argv_of in inputs.items()
    for kind in KINDS
    if kind not in VALID.get((command, name), {})
] + [
    pytest.param((argv_of, "missing file"), id=f"{command} {name}")
    for (command, name), argv_of in EXTRA_CASES.items()
]


def test_every_command_has_bad_inputs():
    assert set(INPUTS) == set(_command_modules()), "add the new command's inputs to INPUTS"


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys, case):
    argv_of, kind = case
    argv = argv_of(bad_path(tmp_path, kind), tmp_path)
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse and `fit`'s jsonargparse exit themselves, with status 2
        code = exit_.code
    captured = capsys.readouterr()
    err = captured.err
    assert code == 2, (argv, err[-500:])
    assert "Traceback" not in err + captured.out
    # Ours print "error: ...", argparse's "histodistill CMD: error: ...": one line either way.
    assert len([line for line in err.splitlines() if "error: " in line]) == 1, err
    # Nothing is written before refusing, except tile's status/<slide>.json, its record of a failed slide.
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file() and p.parent.name != "status"]
    assert not written, f"wrote {written} before refusing"


# command -> argv with OUT as its output place (a folder; `report --out` and nothing else is a file). Only the
# output is bad here: argparse checks it (`output_folder`, `output_file`) and `fit` its run directory, before
# anything else is looked at.
RECIPE = Path(__file__).resolve().parents[2] / "configs" / "supervised" / "tiny_cpu.yaml"
OUTPUTS: dict[str, Argv] = {
    "samples": lambda o, t: ["samples", "make-nuclei", "--out", o],
    "tile": lambda o, t: ["tile", str(t), "--out", o],
    "fit": lambda o, t: ["fit", "--config", str(RECIPE), "--trainer.default_root_dir", o],
    "export": lambda o, t: ["export", "--checkpoint", str(t / "run.ckpt"), "--out", o],
    "extract": lambda o, t: ["extract", "--model", "tiny/resnet18-64", "--coords", str(t), "--out", o],
    "probe": lambda o, t: ["probe", "--features", str(t), "--out", o],
    "mil": lambda o, t: ["mil", "--features", str(t), "--labels", str(t / "labels.csv"), "--out", o],
    "heatmap": lambda o, t: ["heatmap", "--run", str(t), "--slides", str(t), "--out", o],
    "report": lambda o, t: ["report", str(t), "--out", o],
    "demo": lambda o, t: ["demo", "--quick", "--out", o],
    "distill": lambda o, t: [
        "distill",
        "--teacher",
        "tiny/resnet18-64",
        "--student",
        "resnet18",
        "--slides",
        str(t),
        "--out",
        o,
    ],
}


WRITES_NOTHING = {"models"}  # prints to the terminal only


def test_every_command_has_its_output_checked():
    assert set(OUTPUTS) | WRITES_NOTHING == set(_command_modules()), "add the new command's output to OUTPUTS"


def read_only_folder(root: Path, monkeypatch) -> Path:
    """A folder nobody may write into: mode 0555, and, for root (whom modes do not stop), `os.access`
    answering as it does on a read-only mount (EROFS), the issue-29 case of `extract --out` on a read-only
    share."""
    import os

    folder = root / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        inside = Path(path).resolve().is_relative_to(folder.resolve())
        return False if inside and mode & os.W_OK else real_access(path, mode, *args, **kwargs)

    if os.geteuid() == 0:
        monkeypatch.setattr(os, "access", access)
    return folder


MESSAGES = {"empty": "empty path", "under a file": "which is a file", "read-only": "is not writable"}


@pytest.mark.parametrize("kind", sorted(MESSAGES))
@pytest.mark.parametrize("command", sorted(OUTPUTS))
def test_an_output_nothing_can_be_written_to_is_one_error_line_and_exit_2(
    tmp_path, capsys, monkeypatch, command, kind
):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder\n")
    # "" would silently mean the current folder; a missing folder under a read-only one could not be made.
    out = {"empty": "", "under a file": str(blocker / "results")}.get(kind)
    if kind == "read-only":
        out = str(read_only_folder(tmp_path, monkeypatch) / "results")
    try:
        code = main(OUTPUTS[command](out, tmp_path))
    except SystemExit as exit_:  # argparse and `fit`'s jsonargparse exit themselves, with status 2
        code = exit_.code
    captured = capsys.readouterr()
    assert code == 2, captured.err[-500:]
    assert "Traceback" not in captured.err + captured.out
    errors = [line for line in captured.err.splitlines() if "error: " in line]
    assert len(errors) == 1 and MESSAGES[kind] in errors[0], errors
    made = {"notes.txt"} | ({"read_only"} if kind == "read-only" else set())
    assert {p.name for p in tmp_path.iterdir()} == made  # nothing written
    if kind == "read-only":
        assert not any((tmp_path / "read_only").iterdir())


def test_a_full_disk_in_any_command_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    # Issue 29, "every command that writes": commands without an estimate of their own still end in one line
    # (histodistill.cli wraps each in `reporting_full_disk`), naming the file and what was written so far.
    import errno
    import tempfile

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "mkstemp", full)  # every atomic write starts with one
    out = tmp_path / "slides"
    assert main(["samples", "make-slides", "--out", str(out), "--n-slides", "2"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error: " in line]
    assert "Traceback" not in err and len(errors) == 1, err
    assert errors[0].startswith(f"error: no space left on the disk to write {out}")
    assert f"were written to {out} so far" in errors[0] and "it resumes" in errors[0]

